"""Wide Residual Networks (Zagoruyko & Komodakis, "Wide Residual Networks",
BMVC 2016), as in RepDistiller / mdistiller.

``wrn_d_k``: depth ``d = 6n+4``, widen factor ``k``; a 3×3 stem (no BN) then
three groups of ``n`` pre-activation BasicBlocks with 16k / 32k / 64k
channels at 32, 16 and 8 pixels, a final BN+ReLU, global average pool and fc.
Dropout is off in the reference configurations, so it is not implemented.

Parameter paths follow the PyTorch module tree
(``block1.layer.0.convShortcut`` → ``block1/layer_0/convShortcut``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from slkd_jax.models.layers import BatchNorm, Conv, classifier_head
from slkd_jax.models.registry import register


class WideBasicBlock(nn.Module):
  """Pre-activation block: BN-ReLU-conv3×3(stride)-BN-ReLU-conv3×3 + shortcut.

  With equal input and output widths the shortcut is the raw input. Otherwise
  the reference activates the input itself first (``x = relu(bn1(x))``), and
  the shortcut is a bias-free 1×1 conv (stride, no BN) of that *activated*
  input; this asymmetry matters for checkpoint fidelity.

  With ``return_bn1`` it returns ``(out, bn1(x))``: mdistiller's WRN takes
  the pre-activation of a group's input from this BN (wrn.py
  ``f1_pre = self.block2.layer[0].bn1(f1)``).
  """
  planes: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool, mask=None, return_bn1: bool = False):
    equal_in_out = x.shape[-1] == self.planes
    bn1 = BatchNorm(dtype=self.dtype, name="bn1")(x, train, mask)
    act = nn.relu(bn1)
    out = Conv(self.planes, 3, self.strides, 1, dtype=self.dtype,
               name="conv1")(act)
    out = nn.relu(BatchNorm(dtype=self.dtype, name="bn2")(out, train, mask))
    out = Conv(self.planes, 3, 1, 1, dtype=self.dtype, name="conv2")(out)
    if equal_in_out:
      # The reference never strides an equal-width block (only the first block
      # of a group strides, and it always widens), so the identity is safe.
      shortcut = x
    else:
      shortcut = Conv(self.planes, 1, self.strides, 0, dtype=self.dtype,
                      name="convShortcut")(act)
    out = shortcut + out
    return (out, bn1) if return_bn1 else out


class NetworkBlock(nn.Module):
  """A group of ``num_layers`` blocks; only the first one strides / widens.

  Its blocks are named ``layer_i`` to mirror PyTorch's ``NetworkBlock.layer``
  ``nn.Sequential``. With ``return_bn1`` it returns ``(out, bn1)``, ``bn1``
  its first block's ``bn1`` applied to the group's input.
  """
  num_layers: int
  planes: int
  strides: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool, mask=None, return_bn1: bool = False):
    bn1 = None
    for i in range(self.num_layers):
      block = WideBasicBlock(self.planes, self.strides if i == 0 else 1,
                             self.dtype, name=f"layer_{i}")
      if i == 0 and return_bn1:
        x, bn1 = block(x, train, mask, return_bn1=True)
      else:
        x = block(x, train, mask)
    return (x, bn1) if return_bn1 else x


class WideResNet(nn.Module):
  """WRN of depth ``6n+4`` and widen factor ``widen`` for 32×32 inputs.

  Features (``features=True``, mdistiller cifar/wrn.py ``forward``):
  ``feats`` = [stem conv output (no BN in the stem), block1, block2, block3
  outputs], all raw residual sums (WRN blocks are pre-activation, so a
  group's output has no ReLU of its own); ``preact_feats`` = [stem, then each
  group output through the BN that activates it next: ``block2.layer_0.bn1``,
  ``block3.layer_0.bn1``, the final ``bn1``]; ``pooled_feat`` = the global
  average of ReLU(bn1(block3)), the classifier input. mdistiller re-applies
  those BNs to f1/f2/f3 after the forward, which in train mode updates their
  running statistics a second time; here the preacts are the BN outputs the
  forward computes anyway (the same values), and the statistics move once.
  """
  depth: int
  widen: int
  num_classes: int = 100
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               features: bool = False, mask=None):
    if (self.depth - 4) % 6:
      raise ValueError(f"WRN depth must be 6n+4, got {self.depth}")
    n = (self.depth - 4) // 6
    widths = (16 * self.widen, 32 * self.widen, 64 * self.widen)
    x = Conv(16, 3, 1, 1, dtype=self.dtype, name="conv1")(x)
    feats, preacts = [x], [x]
    for i, (planes, strides) in enumerate(zip(widths, (1, 2, 2))):
      group = NetworkBlock(n, planes, strides, self.dtype,
                           name=f"block{i + 1}")
      if features and i > 0:
        # The preact of group i's output is group i+1's first bn1 of it.
        x, bn1 = group(x, train, mask, return_bn1=True)
        preacts.append(bn1)
      else:
        x = group(x, train, mask)
      feats.append(x)
    bn1 = BatchNorm(dtype=self.dtype, name="bn1")(x, train, mask)
    preacts.append(bn1)
    # The reference's avg_pool2d(out, 8) is global on the 8×8 map of a 32×32
    # input.
    return classifier_head(nn.relu(bn1), self.num_classes, "torch_zero_bias",
                           self.dtype, "fc", features, feats, preacts)


def _register(depth: int, widen: int) -> None:
  register(f"wrn_{depth}_{widen}")(lambda num_classes, dtype: WideResNet(
      depth, widen, num_classes, dtype))


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
  _register(_depth, _widen)
