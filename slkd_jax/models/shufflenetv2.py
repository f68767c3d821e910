"""ShuffleNet V2 (Ma et al., "ShuffleNet V2: Practical Guidelines for
Efficient CNN Architecture Design", ECCV 2018), as RepDistiller's CIFAR
``ShuffleV2`` (net_size 1): stage widths 116/232/464, 3/7/3 basic units after
each stage's down-sampling unit, 1×1 head to 1024 channels.

The stem is a 1×1 conv 3→24 without pooling, so the stages run at 16, 8 and 4
pixels on 32×32 inputs. All convolutions are bias-free and keep PyTorch's
default initialisation.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from slkd_jax.models.layers import (TorchConv, apply_stage, channel_shuffle,
                                    classifier_head, conv_bn)
from slkd_jax.models.registry import register

_OUT_CHANNELS = (116, 232, 464)
_NUM_BLOCKS = (3, 7, 3)
_HEAD = 1024


class DownBlock(nn.Module):
  """Stride-2 unit: two branches over the whole input, concatenated
  ``[left, right]`` and shuffled with 2 groups.

  left: depthwise 3×3/2 + BN → 1×1 + BN + ReLU (conv1/bn1, conv2/bn2);
  right: 1×1 + BN + ReLU → depthwise 3×3/2 + BN → 1×1 + BN + ReLU
  (conv3..5/bn3..5). Each branch yields ``features // 2`` channels.
  """
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    d = self.dtype
    c_in, mid = x.shape[-1], self.features // 2
    left = conv_bn(TorchConv(c_in, 3, 2, 1, groups=c_in, dtype=d,
                             name="conv1"), "bn1", x, train, mask, relu=False)
    left = conv_bn(TorchConv(mid, 1, 1, 0, dtype=d, name="conv2"),
                   "bn2", left, train, mask)
    right = conv_bn(TorchConv(mid, 1, 1, 0, dtype=d, name="conv3"),
                    "bn3", x, train, mask)
    right = conv_bn(TorchConv(mid, 3, 2, 1, groups=mid, dtype=d,
                              name="conv4"), "bn4", right, train, mask,
                    relu=False)
    right = conv_bn(TorchConv(mid, 1, 1, 0, dtype=d, name="conv5"),
                    "bn5", right, train, mask)
    return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class BasicBlock(nn.Module):
  """Stride-1 unit: split the channels in half, keep the first half, transform
  the second (1×1 + BN + ReLU → depthwise 3×3 + BN → 1×1 + BN + ReLU),
  concatenate ``[kept, transformed]`` and shuffle with 2 groups.

  With ``return_preact`` it returns ``(out, preact)`` as the reference's
  ``is_last`` unit: ``preact = [kept, bn3 output before its ReLU]``,
  concatenated but *not* shuffled (ShuffleNetv2.py ``BasicBlock.forward``).
  """
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool, mask=None, return_preact: bool = False):
    d = self.dtype
    c = x.shape[-1] // 2  # split ratio 0.5, int() as in the reference
    kept, out = x[..., :c], x[..., c:]
    out = conv_bn(TorchConv(c, 1, 1, 0, dtype=d, name="conv1"),
                  "bn1", out, train, mask)
    out = conv_bn(TorchConv(c, 3, 1, 1, groups=c, dtype=d, name="conv2"),
                  "bn2", out, train, mask, relu=False)
    preact = conv_bn(TorchConv(c, 1, 1, 0, dtype=d, name="conv3"),
                     "bn3", out, train, mask, relu=False)
    merged = jnp.concatenate([kept, nn.relu(preact)], axis=-1)
    out = channel_shuffle(merged, 2)
    if return_preact:
      return out, jnp.concatenate([kept, preact], axis=-1)
    return out


class ShuffleNetV2(nn.Module):
  """RepDistiller's ``ShuffleV2`` (net_size 1) for CIFAR.

  Features (``features=True``, mdistiller cifar/ShuffleNetv2.py
  ``forward``): ``feats`` = [stem, the three stage outputs] (at 32, 16, 8
  and 4 pixels on 32×32 inputs; not the 1024-wide head); ``preact_feats`` =
  [stem, each stage's last unit's unshuffled preact, see
  :class:`BasicBlock`]; ``pooled_feat`` = the head's global average, the
  classifier input.
  """
  num_classes: int = 100
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               features: bool = False, mask=None):
    d = self.dtype
    x = conv_bn(TorchConv(24, 1, 1, 0, dtype=d, name="conv1"), "bn1",
                x, train, mask)
    feats, preacts = [x], [x]
    for stage, (channels, blocks) in enumerate(zip(_OUT_CHANNELS,
                                                   _NUM_BLOCKS)):
      # layer{k}.0 is the down-sampling unit, layer{k}.1.. the basic units.
      units = [DownBlock(channels, d, name=f"layer{stage + 1}_0")]
      units += [BasicBlock(d, name=f"layer{stage + 1}_{i}")
                for i in range(1, blocks + 1)]
      x, preact = apply_stage(units, x, train, mask, features)
      feats.append(x)
      preacts.append(preact)
    x = conv_bn(TorchConv(_HEAD, 1, 1, 0, dtype=d, name="conv2"),
                "bn2", x, train, mask)
    # The reference's avg_pool2d(out, 4) covers the whole 4×4 map.
    return classifier_head(x, self.num_classes, "torch", d, "linear",
                           features, feats, preacts)


@register("ShuffleV2")
def _shufflev2(num_classes, dtype):
  return ShuffleNetV2(num_classes, dtype)
