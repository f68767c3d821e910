"""MobileNetV1 for ImageNet (Howard et al., "MobileNets: Efficient
Convolutional Neural Networks for Mobile Vision Applications", 2017), as
mdistiller's ``MobileNetV1`` (the usual ImageNet KD student).

A stride-2 3×3 stem to 32 channels, then 13 depthwise-separable layers
(depthwise 3×3 + BN + ReLU, pointwise 1×1 + BN + ReLU) up to 1024 channels;
ReLU, not ReLU6. Convolutions are bias-free with PyTorch's default
initialisation.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from slkd_jax.models.layers import TorchConv, classifier_head, conv_bn
from slkd_jax.models.registry import register

# (output channels, stride) of model.1 .. model.13.
_SEPARABLE = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
              (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2),
              (1024, 1))
# Layers whose outputs mdistiller exposes as its four stage features (at 56,
# 28, 14 and 7 pixels on 224×224 inputs).
_FEATURE_LAYERS = (3, 5, 11, 13)


class MobileNetV1(nn.Module):
  """mdistiller's ImageNet MobileNetV1.

  Parameter paths follow the reference's single ``model`` Sequential:
  ``model_0_{0,1}`` for the stem, ``model_i_{0,1,3,4}`` for the depthwise and
  pointwise conv/BN pairs of layer i (indices 2 and 5 are ReLUs).

  Features (``features=True``, mdistiller imagenet/mobilenetv1.py
  ``forward``): ``feats`` = the outputs of layers 3, 5, 11 and 13 (four
  entries, no stem; 56, 28, 14 and 7 pixels at 224), ``preact_feats`` = the
  same before their last ReLU (the pointwise BN outputs), ``pooled_feat`` =
  the classifier input.
  """
  num_classes: int = 1000
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               features: bool = False, mask=None):
    d = self.dtype
    x = conv_bn(TorchConv(32, 3, 2, 1, dtype=d, name="model_0_0"),
                "model_0_1", x, train, mask)
    feats, preacts = [], []
    for i, (out, stride) in enumerate(_SEPARABLE, start=1):
      c = x.shape[-1]
      x = conv_bn(TorchConv(c, 3, stride, 1, groups=c, dtype=d,
                            name=f"model_{i}_0"), f"model_{i}_1", x, train,
                  mask)
      preact = conv_bn(TorchConv(out, 1, 1, 0, dtype=d, name=f"model_{i}_3"),
                       f"model_{i}_4", x, train, mask, relu=False)
      x = nn.relu(preact)
      if i in _FEATURE_LAYERS:
        feats.append(x)
        preacts.append(preact)
    # The reference ends with AvgPool2d(7), the whole 7×7 map at 224 pixels;
    # a global mean is the same there and also serves smaller inputs.
    return classifier_head(x, self.num_classes, "torch", d, "fc", features,
                           feats, preacts)


@register("imagenet_mobilenetv1", image_size=224, num_classes=1000)
def _imagenet_mobilenetv1(num_classes, dtype):
  return MobileNetV1(num_classes, dtype)
