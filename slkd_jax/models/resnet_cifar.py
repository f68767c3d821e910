"""CIFAR ResNets (He et al., "Deep Residual Learning for Image Recognition",
CVPR 2016, section 4.2), as in RepDistiller / mdistiller.

Depth 6n+2 with post-activation BasicBlocks; three stages at 32, 16 and 8
pixels. ``resnet8x4`` / ``resnet32x4`` are the 4× wider variants the KD
literature uses (widths 32/64/128/256, so even the first block has a 1×1
projection shortcut, 32→64).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from slkd_jax.models.layers import (BatchNorm, Conv, apply_stage,
                                    classifier_head)
from slkd_jax.models.registry import register


class BasicBlock(nn.Module):
  """conv3×3(stride)-BN-ReLU-conv3×3-BN + shortcut, then ReLU.

  The shortcut is a 1×1 conv (stride) + BN whenever the stride or the channel
  count changes, the identity otherwise. With ``return_preact`` it returns
  ``(out, preact)``, ``preact`` the sum before the final ReLU (mdistiller's
  ``is_last`` block output).
  """
  planes: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool, mask=None, return_preact: bool = False):
    out = Conv(self.planes, 3, self.strides, 1, dtype=self.dtype,
               name="conv1")(x)
    out = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(out, train, mask))
    out = Conv(self.planes, 3, 1, 1, dtype=self.dtype, name="conv2")(out)
    out = BatchNorm(dtype=self.dtype, name="bn2")(out, train, mask)
    if self.strides != 1 or x.shape[-1] != self.planes:
      x = Conv(self.planes, 1, self.strides, 0, dtype=self.dtype,
               name="downsample_0")(x)
      x = BatchNorm(dtype=self.dtype, name="downsample_1")(x, train, mask)
    preact = out + x
    out = nn.relu(preact)
    return (out, preact) if return_preact else out


class CifarResNet(nn.Module):
  """ResNet of depth ``6n+2`` for 32×32 inputs.

  Features (``features=True``, mdistiller cifar/resnet.py ``forward``):
  ``feats`` = [stem, stage1, stage2, stage3] (post-ReLU), ``preact_feats`` =
  [stem, the three stages' sums before their last ReLU], ``pooled_feat`` =
  the classifier input.
  """
  depth: int
  widths: Sequence[int]  # stem, stage1, stage2, stage3
  num_classes: int = 100
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               features: bool = False, mask=None):
    if (self.depth - 2) % 6:
      raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {self.depth}")
    n = (self.depth - 2) // 6
    x = Conv(self.widths[0], 3, 1, 1, dtype=self.dtype, name="conv1")(x)
    x = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, train, mask))
    feats, preacts = [x], [x]
    for stage, planes in enumerate(self.widths[1:]):
      blocks = [BasicBlock(planes, 2 if (stage > 0 and i == 0) else 1,
                           self.dtype, name=f"layer{stage + 1}_{i}")
                for i in range(n)]
      x, preact = apply_stage(blocks, x, train, mask, features)
      feats.append(x)
      preacts.append(preact)
    return classifier_head(x, self.num_classes, "torch", self.dtype, "fc",
                           features, feats, preacts)


def _register(name: str, depth: int, widths: Sequence[int]) -> None:
  register(name)(lambda num_classes, dtype: CifarResNet(
      depth, tuple(widths), num_classes, dtype))


for _depth in (8, 14, 20, 32, 44, 56, 110):
  _register(f"resnet{_depth}", _depth, (16, 16, 32, 64))
_register("resnet8x4", 8, (32, 64, 128, 256))
_register("resnet32x4", 32, (32, 64, 128, 256))
