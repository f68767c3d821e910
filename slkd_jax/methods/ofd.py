"""OFD — a comprehensive overhaul of feature distillation (Heo et al. 2019),
exact to mdistiller (``mdistiller/distillers/OFD.py``; docs/ofd_reviewkd.md).

The student objective is ``1.0 · CE + 0.001 · L_ofd`` over the
``preact_feats[1:]`` of both networks aligned to their deepest common stages,
through one conv1×1-BN connector per stage (:class:`OFDConnector`) and the
teacher's margins (:func:`ofd_margins`). mdistiller's ``OFD.train()`` puts
the teacher in train mode too (``teacher_train_mode``). The loss and the
margin are in :mod:`slkd_jax.feature_losses`.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from slkd_jax import errors, models
from slkd_jax import feature_losses as fl
from slkd_jax.methods.base import Context
from slkd_jax.methods.feature import feature_method
from slkd_jax.models.bn_before_relu import bn_before_relu
from slkd_jax.models.layers import BatchNorm, Conv

#: CFG.OFD: CE 1.0, FEAT 0.001 (the OFD code's "/ 1000"),
#: CONNECTOR.KERNEL_SIZE 1 (the only size the connector builds).
DEFAULTS = dict(ce_weight=1.0, feat_weight=0.001)

#: mdistiller's per-pair yaml: configs/imagenet/r50_mv1/ofd.yaml FEAT 1e-4.
PAIR_DEFAULTS = {("imagenet_resnet50", "imagenet_mobilenetv1"): dict(
    feat_weight=1e-4)}


def align_last(*lists: Sequence[Any]) -> list[list[Any]]:
  """mdistiller's ``_align_list``: each list cut to its last ``min`` length
  entries (the deepest stages)."""
  n = min(len(x) for x in lists)
  return [list(x)[len(x) - n:] for x in lists]


class OFDConnector(nn.Module):
  """OFD's connectors (mdistiller ``ConnectorConvBN``, kernel size 1):
  per stage a bias-free 1×1 conv from the student's to the teacher's
  channels, initialised N(0, sqrt(2/n)) with n = k·k·out_channels (He
  normal, fan-out), then BatchNorm (γ 1, β 0). Submodules
  ``connectors_<i>/0`` (conv) and ``connectors_<i>/1`` (BN), as
  ``connectors.connectors.<i>.{0,1}``.

  ``__call__(feats_s, train, mask)``: the student's ``preact_feats[1:]``,
  NHWC; the deepest ``len(t_channels)`` of them are regressed (mdistiller's
  ``_align_list``) and returned. BatchNorm uses batch statistics in
  training (mdistiller trains the distiller's children in train mode).
  """
  t_channels: tuple[int, ...]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats_s: Sequence[jax.Array], train: bool,
               mask: jax.Array | None = None) -> list[jax.Array]:
    n = len(self.t_channels)
    if len(feats_s) < n:
      raise ValueError(f"OFDConnector: {len(feats_s)} student features for "
                       f"{n} connectors")
    feats_s = list(feats_s)[len(feats_s) - n:]
    out = []
    for i, (f, c) in enumerate(zip(feats_s, self.t_channels)):
      y = Conv(c, 1, 1, 0, use_bias=False, init_scheme="he_fan_out",
               dtype=self.dtype, name=f"connectors_{i}_0")(f)
      out.append(BatchNorm(dtype=self.dtype, name=f"connectors_{i}_1")(
          y, train, mask))
    return out


def ofd_channels(s_shapes, t_shapes) -> tuple[list[int], list[int]]:
  """Student and teacher channels of OFD's connectors: ``[1:]`` of each
  network's stage channels, aligned to the deepest common stages."""
  s_c, t_c = align_last([s[-1] for s in s_shapes[1:]],
                        [t[-1] for t in t_shapes[1:]])
  return s_c, t_c


def check_ofd_teacher(teacher_model, teacher_params, t_channels):
  """The teacher's (scale, bias) pairs of the distilled stages, or a
  ConfigError (also works on ``jax.eval_shape`` params)."""
  bns = bn_before_relu(teacher_model, teacher_params)
  t_channels = list(t_channels)
  if len(bns) < len(t_channels):
    raise errors.ConfigError(
        f"OFD: the teacher has {len(bns)} BatchNorms before ReLUs for "
        f"{len(t_channels)} distilled stages (mdistiller fails too)")
  got = [int(scale.shape[0]) for scale, _ in bns[:len(t_channels)]]
  if got != t_channels:
    raise errors.ConfigError(f"OFD: margin channels {got} do not match the "
                             f"teacher's distilled stages {t_channels}")
  return bns[:len(t_channels)]


def ofd_margins(teacher_model, teacher_params, t_channels) -> list[jax.Array]:
  """OFD's margins for the distilled teacher stages of ``t_channels``.

  mdistiller indexes the teacher's ``get_bn_before_relu()`` list from its
  start (``margins[i]`` for the i-th aligned stage); a list too short or of
  other channel counts crashes there and is a ConfigError here.
  """
  bns = check_ofd_teacher(teacher_model, teacher_params, t_channels)
  return [fl.ofd_margin(scale, bias) for scale, bias in bns]


def ofd_term(s, t, mask, hp, ctx: Context):
  """L_ofd over the aligned stages (the connector regresses the student)."""
  s_feats, t_feats = align_last(s.preact_feats[1:], t.preact_feats[1:])
  margins = ofd_margins(ctx.networks.teacher, ctx.teacher.params,
                        [f.shape[-1] for f in t_feats])
  regressed = ctx.modules["connector"](s_feats, train=True, mask=mask)
  return fl.ofd_loss(regressed, t_feats, margins, mask)


def make_modules(student, teacher, settings, dtype, image_size: int
                 ) -> dict[str, nn.Module]:
  """``{'connector': OFDConnector}`` for the two networks' aligned stages;
  a ConfigError when the teacher's BatchNorms do not fit them (checked on
  ``jax.eval_shape`` parameters: nothing runs)."""
  del settings
  size = (image_size, image_size)
  _, t_channels = ofd_channels(models.feature_shapes(student, size),
                               models.feature_shapes(teacher, size))
  abstract = jax.eval_shape(
      teacher.init, jax.random.key(0),
      jnp.zeros((1, *size, 3), jnp.float32))["params"]
  check_ofd_teacher(teacher, abstract, t_channels)  # fail here, not in jit
  return {"connector": OFDConnector(tuple(t_channels), dtype)}


def module_inputs(name, student, teacher, settings, image_size: int):
  """The student's ``preact_feats[1:]`` shapes for one image (the connector
  keeps the deepest stages it needs)."""
  shapes = models.feature_shapes(student, (image_size, image_size))
  return ([jnp.zeros(s) for s in shapes[1:]],), {"train": False}


METHOD = feature_method(
    "ofd", "overhaul of feature distillation (Heo 2019)", ofd_term, DEFAULTS,
    pair_defaults=PAIR_DEFAULTS, teacher_train_mode=True,
    make_modules=make_modules, module_inputs=module_inputs)
