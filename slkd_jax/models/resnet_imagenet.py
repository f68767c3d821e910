"""Four-stage ResNets (He et al., "Deep Residual Learning for Image
Recognition", CVPR 2016): torchvision's ImageNet ResNet-18/34/50 and
RepDistiller's CIFAR ``ResNet50`` (``models/resnetv2.py``).

Both share the stage layout (widths 64/128/256/512, the first block of stages
2-4 downsampling) and differ in the stem, the shortcut's attribute name and the
classifier's name:

* ImageNet (torchvision): 7×7/2 conv + BN + ReLU + 3×3/2 max-pool, shortcut
  ``downsample``, classifier ``fc``;
* CIFAR (RepDistiller): 3×3/1 conv + BN + ReLU, no pooling, shortcut
  ``shortcut``, classifier ``linear``.

The bottleneck puts its stride on the 3×3 conv (torchvision's "ResNet v1.5",
which RepDistiller's resnetv2 also does).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from slkd_jax.models.layers import (BatchNorm, Conv, apply_stage,
                                    classifier_head, max_pool)
from slkd_jax.models.registry import register
# torchvision's BasicBlock has exactly the CIFAR ResNet's structure and names.
from slkd_jax.models.resnet_cifar import BasicBlock


class Bottleneck(nn.Module):
  """1×1-BN-ReLU, 3×3(stride)-BN-ReLU, 1×1 (4× planes)-BN + shortcut, ReLU.

  The shortcut is a 1×1 conv (stride) + BN whenever the stride or the channel
  count changes, the identity otherwise. ``shortcut_name`` is the PyTorch
  attribute holding it (``'downsample'`` in torchvision, ``'shortcut'`` in
  RepDistiller), so the parameters are ``<name>_0`` (conv) and ``<name>_1``
  (BN). With ``return_preact`` it returns ``(out, preact)``, ``preact`` the
  sum before the final ReLU.
  """
  planes: int
  strides: int = 1
  shortcut_name: str = "downsample"
  dtype: Any = jnp.float32

  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool, mask=None, return_preact: bool = False):
    out_channels = self.expansion * self.planes
    out = Conv(self.planes, 1, 1, 0, dtype=self.dtype, name="conv1")(x)
    out = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(out, train, mask))
    out = Conv(self.planes, 3, self.strides, 1, dtype=self.dtype,
               name="conv2")(out)
    out = nn.relu(BatchNorm(dtype=self.dtype, name="bn2")(out, train, mask))
    out = Conv(out_channels, 1, 1, 0, dtype=self.dtype, name="conv3")(out)
    out = BatchNorm(dtype=self.dtype, name="bn3")(out, train, mask)
    if self.strides != 1 or x.shape[-1] != out_channels:
      x = Conv(out_channels, 1, self.strides, 0, dtype=self.dtype,
               name=f"{self.shortcut_name}_0")(x)
      x = BatchNorm(dtype=self.dtype,
                    name=f"{self.shortcut_name}_1")(x, train, mask)
    preact = out + x
    out = nn.relu(preact)
    return (out, preact) if return_preact else out


class ResNet(nn.Module):
  """Four-stage ResNet, torchvision's ImageNet topology or RepDistiller's
  CIFAR one (``cifar=True``).

  Attributes:
    stage_sizes: blocks per stage, e.g. ``(3, 4, 6, 3)``.
    bottleneck: :class:`Bottleneck` blocks if true, else :class:`BasicBlock`.
    cifar: RepDistiller's CIFAR variant (3×3/1 stem without max-pool,
      shortcut ``shortcut``, classifier ``linear``) instead of torchvision's
      ImageNet one (7×7/2 stem + 3×3/2 max-pool, ``downsample``, ``fc``).
    num_classes: classifier width.
    dtype: compute dtype.

  Features (``features=True``), five entries each, as mdistiller's
  ``forward``: ``feats`` = [stem, stage1..stage4] post-ReLU, ``preact_feats``
  = [stem, each stage's last residual sum before its ReLU], ``pooled_feat``
  = the classifier input. The stem entry is post-ReLU in both lists, but
  where it is taken differs between the two references:

  * ImageNet (mdistiller imagenet/resnet.py): *before* the max-pool (112 px
    at 224). mdistiller means ``preact_feats[0]`` to be bn1's output
    (``stem = x; x = self.relu(x)``), but that ReLU is in-place, so the
    tensor it returns (and its ImageNet ReviewKD student, ``STU_PREACT``,
    trains on) is post-ReLU; we return what it returns.
  * CIFAR (mdistiller cifar/resnetv2.py): the stem output, no max-pool.
  """
  stage_sizes: Sequence[int]
  bottleneck: bool
  cifar: bool = False
  num_classes: int = 1000
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               features: bool = False, mask=None):
    if self.cifar:
      x = Conv(64, 3, 1, 1, dtype=self.dtype, name="conv1")(x)
    else:
      x = Conv(64, 7, 2, 3, dtype=self.dtype, name="conv1")(x)
    x = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, train, mask))
    feats, preacts = [x], [x]
    if not self.cifar:
      x = max_pool(x, 3, 2, 1)
    for stage, num_blocks in enumerate(self.stage_sizes):
      x, preact = apply_stage(self._stage(stage, num_blocks), x, train,
                              mask, features)
      feats.append(x)
      preacts.append(preact)
    return classifier_head(x, self.num_classes, "torch", self.dtype,
                           "linear" if self.cifar else "fc", features, feats,
                           preacts)

  def _stage(self, stage: int, num_blocks: int) -> list[nn.Module]:
    """The blocks of stage ``stage`` (0-based), named ``layer{k}_{i}``."""
    planes = 64 * 2**stage
    blocks = []
    for i in range(num_blocks):
      strides = 2 if (stage > 0 and i == 0) else 1
      name = f"layer{stage + 1}_{i}"
      if self.bottleneck:
        blocks.append(Bottleneck(planes, strides,
                                 "shortcut" if self.cifar else "downsample",
                                 self.dtype, name=name))
      else:
        blocks.append(BasicBlock(planes, strides, self.dtype, name=name))
    return blocks


def _register_imagenet(name: str, stage_sizes: Sequence[int],
                       bottleneck: bool) -> None:
  register(name, image_size=224, num_classes=1000)(
      lambda num_classes, dtype: ResNet(tuple(stage_sizes), bottleneck,
                                        False, num_classes, dtype))


_register_imagenet("imagenet_resnet18", (2, 2, 2, 2), False)
_register_imagenet("imagenet_resnet34", (3, 4, 6, 3), False)
_register_imagenet("imagenet_resnet50", (3, 4, 6, 3), True)

register("ResNet50")(lambda num_classes, dtype: ResNet(
    (3, 4, 6, 3), True, True, num_classes, dtype))
