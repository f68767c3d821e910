"""Name → model registry.

Every family module registers its networks with :func:`register`; users call
:func:`slkd_jax.models.create`. Registry names are the reference zoos' names
(RepDistiller / mdistiller), ImageNet models prefixed ``imagenet_``.

Naming convention for parameters (the checkpoint converter relies on it): a
flax submodule's path is the PyTorch module path with every numeric segment
joined to its parent by ``_`` (``layer1.0.downsample.1`` →
``layer1_0/downsample_1``). Conv and Linear parameters are ``kernel`` (HWIO /
``[in, out]``) and ``bias``; BatchNorm has params ``scale``, ``bias`` and
batch_stats ``mean``, ``var``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

Builder = Callable[..., nn.Module]


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """A registered network: its builder and the image size it expects."""
  name: str
  builder: Builder
  image_size: int
  default_num_classes: int


_REGISTRY: dict[str, ModelInfo] = {}


def register(name: str, image_size: int = 32, num_classes: int = 100
             ) -> Callable[[Builder], Builder]:
  """Decorator: register ``builder(num_classes, dtype) -> nn.Module``."""

  def wrap(builder: Builder) -> Builder:
    if name in _REGISTRY:
      raise ValueError(f"model {name!r} registered twice")
    _REGISTRY[name] = ModelInfo(name, builder, image_size, num_classes)
    return builder

  return wrap


def available() -> list[str]:
  """Sorted names of all registered models."""
  return sorted(_REGISTRY)


def info(name: str) -> ModelInfo:
  """The :class:`ModelInfo` of ``name``; a clear error for unknown names."""
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ValueError(f"unknown model {name!r}; available: "
                     f"{', '.join(available())}") from None


def create(name: str, num_classes: int | None = None,
           dtype: Any = jnp.float32) -> nn.Module:
  """Build the flax module registered as ``name``.

  Args:
    name: registry name, e.g. ``'resnet32x4'`` or ``'imagenet_resnet18'``.
    num_classes: classifier width (default: 100 for CIFAR models, 1000 for
      ImageNet models).
    dtype: compute dtype (``jnp.float32``, ``jnp.bfloat16`` or
      ``jnp.float64``); parameters, BatchNorm statistics and logits are at
      least float32 (float64 under float64, see ``layers.param_dtype``).

  Returns:
    A module called as ``module.apply(variables, images, train=bool,
    features=False, mask=None)`` on NHWC images, returning logits
    ``[B, num_classes]``; with ``features=True`` it returns an
    :class:`slkd_jax.models.Outputs` (logits plus mdistiller's ``feats``,
    ``preact_feats`` and ``pooled_feat``).
  """
  model = info(name)
  if num_classes is None:
    num_classes = model.default_num_classes
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  return model.builder(num_classes=num_classes, dtype=jnp.dtype(dtype))
