"""VGG with BatchNorm (Simonyan & Zisserman, "Very Deep Convolutional Networks
for Large-Scale Image Recognition", ICLR 2015), CIFAR variant of RepDistiller /
mdistiller (fully connected head replaced by one Linear layer).

Five blocks of conv3×3 (with bias) + BN + ReLU, widths 64/128/256/512/512;
2×2 max-pools after blocks 0–2; global average pool; Linear 512→C.

Parameter paths follow the PyTorch ``nn.Sequential`` indices: conv ``k`` of
block ``i`` is ``block{i}_{3k}``, its BN ``block{i}_{3k+1}`` (index ``3k+2``
is the parameter-free ReLU).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from slkd_jax.models.layers import BatchNorm, Conv, classifier_head, max_pool
from slkd_jax.models.registry import register

#: Convolution widths per block (RepDistiller's cfg 'S', 'A', 'B', 'D', 'E').
_CONFIGS = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512),
              (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256, 256, 256, 256),
              (512, 512, 512, 512), (512, 512, 512, 512)),
}


class VGG(nn.Module):
  """VGG-BN for CIFAR.

  The reference max-pools after block 3 only when the input is 64 pixels high
  (``if h == 64: x = self.pool3(x)``), so at 32×32 block 4 runs at 4×4; we keep
  that rule.

  Features (``features=True``, mdistiller cifar/vgg.py ``forward``):
  ``feats`` = the five block outputs after ReLU and before pooling (f0..f4);
  ``preact_feats`` = [f0, then blocks 1-4 before their last ReLU] (the
  reference's ``block{i}`` Sequentials drop their final ReLU, so it has them
  for free; block 0's entry is post-ReLU there too); ``pooled_feat`` = the
  classifier input.
  """
  config: Sequence[Sequence[int]]
  num_classes: int = 100
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               features: bool = False, mask=None):
    height = x.shape[1]
    feats, preacts = [], []
    for i, widths in enumerate(self.config):
      for k, planes in enumerate(widths):
        x = Conv(planes, 3, 1, 1, use_bias=True, dtype=self.dtype,
                 name=f"block{i}_{3 * k}")(x)
        preact = BatchNorm(dtype=self.dtype, name=f"block{i}_{3 * k + 1}")(
            x, train, mask)
        x = nn.relu(preact)
      feats.append(x)
      preacts.append(x if i == 0 else preact)
      if i < 3 or (i == 3 and height == 64):  # pool0..pool2 (and pool3)
        x = max_pool(x, 2, 2)
    return classifier_head(x, self.num_classes, "normal", self.dtype,
                           "classifier", features, feats, preacts)


def _register(name: str) -> None:
  register(name)(lambda num_classes, dtype: VGG(
      _CONFIGS[name], num_classes, dtype))


for _name in _CONFIGS:
  _register(_name)
