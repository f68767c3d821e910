"""The BatchNorm before each stage's last ReLU, per zoo family (OFD's margins).

mdistiller's OFD reads the teacher's ``get_bn_before_relu()``: one BatchNorm
per distilled stage, whose affine (scale γ, bias β) defines the Gaussian the
pre-ReLU response is assumed to follow. :func:`bn_before_relu_paths` names
the same BatchNorms in our parameter trees (flax paths; the PyTorch module
path is :func:`slkd_jax.convert_torch.torch_module_path` of it) and
:func:`bn_before_relu` reads their ``(scale, bias)`` from a network's params.

The lists are mdistiller's, family by family (``mdistiller/models/*``):

* CIFAR ResNet (``resnet*``): ``layer{1,2,3}[-1].bn2`` (three stages);
* RepDistiller's CIFAR ``ResNet50`` (resnetv2): ``layer{1..4}[-1].bn3``;
* ImageNet ResNet: ``layer{2,3,4}[-1].bn2`` (bn3 for bottlenecks) — layer1
  is left out (commented out in the reference), so only three;
* WRN: ``block2.layer[0].bn1``, ``block3.layer[0].bn1``, ``bn1``;
* VGG: the last BatchNorm of ``block1`` .. ``block4``;
* MobileNetV2: the projection BN ``conv[-1]`` of the last block of block
  groups 1, 2, 4 and 6;
* ImageNet MobileNetV1: the pointwise BN of ``model[3]``, ``[5]``, ``[11]``,
  ``[13]``;
* ShuffleNetV1/V2: not supported (mdistiller raises ``NotImplementedError``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from slkd_jax import errors
from slkd_jax.models import (mobilenet_imagenet, mobilenetv2, resnet_cifar,
                             resnet_imagenet, shufflenetv1, shufflenetv2, vgg,
                             wrn)

Path = tuple[str, ...]


def _cifar_resnet(model: resnet_cifar.CifarResNet) -> list[Path]:
  last = (model.depth - 2) // 6 - 1
  return [(f"layer{s}_{last}", "bn2") for s in (1, 2, 3)]


def _resnet(model: resnet_imagenet.ResNet) -> list[Path]:
  bn = "bn3" if model.bottleneck else "bn2"
  # RepDistiller's CIFAR ResNet50 lists all four stages, the ImageNet
  # reference only stages 2-4.
  stages = range(1, 5) if model.cifar else range(2, 5)
  return [(f"layer{s}_{model.stage_sizes[s - 1] - 1}", bn) for s in stages]


def _wrn(model: wrn.WideResNet) -> list[Path]:
  del model
  return [("block2", "layer_0", "bn1"), ("block3", "layer_0", "bn1"),
          ("bn1",)]


def _vgg(model: vgg.VGG) -> list[Path]:
  return [(f"block{i}_{3 * (len(model.config[i]) - 1) + 1}",)
          for i in (1, 2, 3, 4)]


def _mobilenetv2(model: mobilenetv2.MobileNetV2) -> list[Path]:
  del model
  blocks = {s: n for s, (_, _, n, _) in enumerate(mobilenetv2._HALF_SETTING)}
  return [(f"blocks_{s}_{blocks[s] - 1}", "conv_7")
          for s in mobilenetv2._FEATURE_STAGES]


def _mobilenetv1(model: mobilenet_imagenet.MobileNetV1) -> list[Path]:
  del model
  return [(f"model_{i}_4",) for i in mobilenet_imagenet._FEATURE_LAYERS]


_FAMILIES = (
    (resnet_cifar.CifarResNet, _cifar_resnet),
    (resnet_imagenet.ResNet, _resnet),
    (wrn.WideResNet, _wrn),
    (vgg.VGG, _vgg),
    (mobilenetv2.MobileNetV2, _mobilenetv2),
    (mobilenet_imagenet.MobileNetV1, _mobilenetv1),
)
_UNSUPPORTED = (shufflenetv1.ShuffleNetV1, shufflenetv2.ShuffleNetV2)


def bn_before_relu_paths(model: nn.Module) -> list[Path]:
  """Flax paths of ``model``'s BatchNorms before each stage's last ReLU
  (mdistiller's ``get_bn_before_relu``, in its order).

  Raises:
    ConfigError: for ShuffleNets (mdistiller does not support them as OFD
      teachers) and for networks of no known family.
  """
  if isinstance(model, _UNSUPPORTED):
    raise errors.ConfigError(
        f"OFD: {type(model).__name__} cannot be the teacher (mdistiller's "
        "get_bn_before_relu is not implemented for ShuffleNets)")
  for cls, paths in _FAMILIES:
    if isinstance(model, cls):
      return paths(model)
  raise errors.ConfigError(f"OFD: no BatchNorm-before-ReLU list for "
                           f"{type(model).__name__}")


def bn_before_relu(model: nn.Module, params: Any
                   ) -> list[tuple[jax.Array, jax.Array]]:
  """``(scale, bias)`` of each BatchNorm of :func:`bn_before_relu_paths`,
  read from ``model``'s ``params`` (one ``[C]`` pair per stage)."""
  pairs = []
  for path in bn_before_relu_paths(model):
    node = params
    for key in path:
      node = node[key]
    pairs.append((node["scale"], node["bias"]))
  return pairs
