"""MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear
Bottlenecks", CVPR 2018), RepDistiller's CIFAR variant ``mobile_half``.

Width multiplier 0.5 and expansion 6, with the reference's CIFAR quirks: the
stem is a stride-2 3×3 conv (so stages run at 16, 16, 8, 4, 4, 2, 2 pixels on
32×32 inputs), every inverted residual keeps its 1×1 expansion conv even when
t = 1, activations are ReLU (not ReLU6), and the 1×1 head stays 1280 wide.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from slkd_jax.models.layers import Conv, classifier_head, conv_bn
from slkd_jax.models.registry import register

# (expansion t, output channels c, blocks n, first stride s), already scaled by
# the width multiplier 0.5 as RepDistiller's ``int(c * 0.5)`` does.
_HALF_SETTING = ((1, 8, 1, 1), (6, 12, 2, 1), (6, 16, 3, 2), (6, 32, 4, 2),
                 (6, 48, 3, 1), (6, 80, 3, 2), (6, 160, 1, 1))
# Blocks after which the reference exposes a feature map (its f1..f4).
_FEATURE_STAGES = (1, 2, 4, 6)


class InvertedResidual(nn.Module):
  """1×1 expand + BN + ReLU → 3×3 depthwise (stride) + BN + ReLU → 1×1
  project + BN (linear bottleneck); identity residual iff stride 1 and the
  channel count is unchanged.

  Submodules are named after the PyTorch ``conv`` Sequential's indices
  (``conv_0, conv_1, conv_3, conv_4, conv_6, conv_7``; 2 and 5 are ReLUs).
  """
  features: int
  strides: int
  expansion: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    hidden = x.shape[-1] * self.expansion
    d = self.dtype
    out = conv_bn(Conv(hidden, 1, 1, 0, dtype=d, name="conv_0"), "conv_1",
                  x, train, mask)
    out = conv_bn(Conv(hidden, 3, self.strides, 1, groups=hidden, dtype=d,
                       name="conv_3"), "conv_4", out, train, mask)
    out = conv_bn(Conv(self.features, 1, 1, 0, dtype=d, name="conv_6"),
                  "conv_7", out, train, mask, relu=False)
    if self.strides == 1 and x.shape[-1] == self.features:
      return x + out
    return out


class MobileNetV2(nn.Module):
  """RepDistiller's ``mobile_half`` (MobileNetV2 ×0.5, t = 6) for CIFAR.

  Features (``features=True``, mdistiller cifar/mobilenetv2.py
  ``forward``): ``feats`` = [stem, outputs of block groups 1, 2, 4 and 6]
  (f0..f4, at 16, 16, 8, 4 and 2 pixels on 32×32 inputs; not the 1280-wide
  head); ``pooled_feat`` = the head's global average, the classifier input.
  mdistiller's MobileNetV2 has no ``preact_feats``; ours repeats ``feats``:
  a group ends in a linear bottleneck (no ReLU), so its output already is
  the output of the BN its ``get_bn_before_relu`` names (plus the
  residual), and the stem entry is post-ReLU as in the other families.
  """
  num_classes: int = 100
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               features: bool = False, mask=None):
    d = self.dtype
    x = conv_bn(Conv(16, 3, 2, 1, dtype=d, name="conv1_0"), "conv1_1",
                x, train, mask)
    feats = [x]
    for s, (t, c, n, first_stride) in enumerate(_HALF_SETTING):
      for i in range(n):
        x = InvertedResidual(c, first_stride if i == 0 else 1, t, d,
                             name=f"blocks_{s}_{i}")(x, train, mask)
      if s in _FEATURE_STAGES:
        feats.append(x)
    x = conv_bn(Conv(1280, 1, 1, 0, dtype=d, name="conv2_0"), "conv2_1",
                x, train, mask)
    # The reference's AvgPool2d(H, ceil_mode=True) covers the whole final map;
    # a global mean is the same and also works for other input sizes.
    return classifier_head(x, self.num_classes, "normal", d, "classifier_0",
                           features, feats, feats)


@register("MobileNetV2")
def _mobilenetv2(num_classes, dtype):
  return MobileNetV2(num_classes, dtype)
