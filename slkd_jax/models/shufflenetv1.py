"""ShuffleNet V1 (Zhang et al., "ShuffleNet: An Extremely Efficient
Convolutional Neural Network for Mobile Devices", CVPR 2018), as RepDistiller's
CIFAR ``ShuffleV1``: 3 groups, stage widths 240/480/960 with 4/8/4 units.

The stem is a 1×1 conv 3→24 without pooling, so the stages run at 16, 8 and 4
pixels on 32×32 inputs. All convolutions are bias-free and keep PyTorch's
default initialisation.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from slkd_jax.models.layers import (TorchConv, apply_stage, avg_pool,
                                    channel_shuffle, classifier_head, conv_bn)
from slkd_jax.models.registry import register

_OUT_PLANES = (240, 480, 960)
_NUM_BLOCKS = (4, 8, 4)
_GROUPS = 3
_STEM = 24


class Bottleneck(nn.Module):
  """ShuffleNet unit: grouped 1×1 + BN + ReLU → channel shuffle → depthwise
  3×3 (stride) + BN + ReLU → grouped 1×1 + BN, merged with the shortcut, ReLU.

  With stride 2 the unit produces ``features`` new channels and concatenates
  a 3×3/2 average pool of its input (padding counted, always ÷9); with stride
  1 it adds the identity. The first 1×1 conv is ungrouped when the input is
  the 24-channel stem (too few channels to split into groups), and the shuffle
  then uses one group, i.e. is the identity, as in the reference. With
  ``return_preact`` it returns ``(out, preact)``, ``preact`` the merge before
  the final ReLU (the reference's ``is_last`` output).
  """
  features: int
  strides: int
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool, mask=None, return_preact: bool = False):
    d = self.dtype
    mid = self.features // 4
    g = 1 if x.shape[-1] == _STEM else self.groups
    out = conv_bn(TorchConv(mid, 1, 1, 0, groups=g, dtype=d, name="conv1"),
                  "bn1", x, train, mask)
    out = channel_shuffle(out, g)
    out = conv_bn(TorchConv(mid, 3, self.strides, 1, groups=mid, dtype=d,
                            name="conv2"), "bn2", out, train, mask)
    out = conv_bn(TorchConv(self.features, 1, 1, 0, groups=self.groups,
                            dtype=d, name="conv3"), "bn3", out, train, mask,
                  relu=False)
    if self.strides == 2:
      preact = jnp.concatenate([out, avg_pool(x, 3, 2, 1)], axis=-1)
    else:
      preact = out + x
    out = nn.relu(preact)
    return (out, preact) if return_preact else out


class ShuffleNetV1(nn.Module):
  """RepDistiller's ``ShuffleV1`` for CIFAR.

  Features (``features=True``, mdistiller cifar/ShuffleNetv1.py
  ``forward``): ``feats`` = [stem, the three stage outputs] (post-ReLU, at
  32, 16, 8 and 4 pixels on 32×32 inputs); ``preact_feats`` = [stem, each
  stage's last unit before its final ReLU]; ``pooled_feat`` = the classifier
  input.
  """
  num_classes: int = 100
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               features: bool = False, mask=None):
    d = self.dtype
    x = conv_bn(TorchConv(_STEM, 1, 1, 0, dtype=d, name="conv1"),
                "bn1", x, train, mask)
    feats, preacts = [x], [x]
    for stage, (planes, blocks) in enumerate(zip(_OUT_PLANES, _NUM_BLOCKS)):
      units = []
      for i in range(blocks):
        # The first unit's branch only adds the channels the pooled input
        # does not already supply.
        branch = planes - (x.shape[-1] if i == 0 else 0)
        units.append(Bottleneck(branch, 2 if i == 0 else 1, _GROUPS, d,
                                name=f"layer{stage + 1}_{i}"))
      x, preact = apply_stage(units, x, train, mask, features)
      feats.append(x)
      preacts.append(preact)
    # The reference's avg_pool2d(out, 4) covers the whole 4×4 map.
    return classifier_head(x, self.num_classes, "torch", d, "linear",
                           features, feats, preacts)


@register("ShuffleV1")
def _shufflev1(num_classes, dtype):
  return ShuffleNetV1(num_classes, dtype)
