"""ReviewKD — distilling knowledge via knowledge review (Chen et al. 2021),
exact to mdistiller (``mdistiller/distillers/ReviewKD.py``;
docs/ofd_reviewkd.md).

The student objective is ``1.0 · CE + w · min(epoch / WARMUP, 1) · HCL``:
attention-based fusion modules (:class:`ABF`, together
:class:`ReviewKDConnector`) review the student's levels from the deepest
(the pooled feature as a 1×1 map) to the shallowest, and the hierarchical
context loss (:func:`slkd_jax.feature_losses.hcl_loss`) compares each with
the teacher's level. mdistiller hard-codes the ABFs' shapes per pair in
yaml; :func:`reviewkd_spec` derives them from the two networks.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from slkd_jax import errors, models
from slkd_jax import feature_losses as fl
from slkd_jax.methods.base import POSITIVE, Context
from slkd_jax.methods.feature import feature_method
from slkd_jax.models.layers import BatchNorm, Conv, param_dtype

#: CFG.REVIEWKD: CE_WEIGHT 1.0, REVIEWKD_WEIGHT 1.0, WARMUP_EPOCHS 20,
#: STU_PREACT False (0/1 here: recipe values are numbers). SHAPES,
#: OUT_SHAPES, IN_CHANNELS and OUT_CHANNELS follow from the pair
#: (:func:`reviewkd_spec`).
DEFAULTS = dict(ce_weight=1.0, feat_weight=1.0, warmup_epochs=20.0,
                stu_preact=0)

#: mdistiller's per-pair yaml files over :data:`DEFAULTS`.
PAIR_DEFAULTS = {
    # configs/cifar100/reviewkd.yaml: REVIEWKD_WEIGHT 5.0.
    ("resnet32x4", "resnet8x4"): dict(feat_weight=5.0),
    # configs/imagenet/r34_r18/reviewkd.yaml.
    ("imagenet_resnet34", "imagenet_resnet18"): dict(
        feat_weight=1.0, warmup_epochs=1.0, stu_preact=1),
    # configs/imagenet/r50_mv1/reviewkd.yaml.
    ("imagenet_resnet50", "imagenet_mobilenetv1"): dict(
        feat_weight=8.0, warmup_epochs=1.0, stu_preact=1),
}

#: ``nn.init.kaiming_uniform_(w, a=1)``: uniform ±sqrt(3 / fan_in).
_kaiming_uniform_a1 = nn.initializers.variance_scaling(1.0, "fan_in",
                                                       "uniform")


class ABF(nn.Module):
  """One attention-based fusion module (mdistiller ``ABF``).

  conv1 (1×1, no bias, kaiming_uniform a=1) + BN maps the student level to
  ``mid_channels``; with ``fuse``, the residual from the deeper level is
  nearest-resized to ``shape`` and the two are blended with a 2-channel
  sigmoid attention (``att_conv``: 1×1 conv with bias, PyTorch default
  init); the result is nearest-resized to ``out_shape`` if its width
  differs, and conv2 (3×3, no bias, kaiming_uniform a=1) + BN maps it to
  ``out_channels``. Returns ``(output, residual)`` (the residual is the map
  before conv2, after resizing). Parameter paths follow PyTorch:
  ``conv1_0``, ``conv1_1``, ``conv2_0``, ``conv2_1``, ``att_conv_0``.
  """
  mid_channels: int
  out_channels: int
  fuse: bool
  dtype: Any = jnp.float32

  def _conv(self, x, features, k, name):
    pdtype = param_dtype(self.dtype)
    return nn.Conv(features, (k, k), padding=((k // 2, k // 2),) * 2,
                   use_bias=False, kernel_init=_kaiming_uniform_a1,
                   dtype=self.dtype, param_dtype=pdtype, name=name)(
                       x.astype(self.dtype))

  @nn.compact
  def __call__(self, x: jax.Array, residual: jax.Array | None, shape: int,
               out_shape: int, train: bool, mask: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    x = BatchNorm(dtype=self.dtype, name="conv1_1")(
        self._conv(x, self.mid_channels, 1, "conv1_0"), train, mask)
    if self.fuse:
      y = fl.nearest_resize(residual, (shape, shape))
      z = Conv(2, 1, 1, 0, use_bias=True, init_scheme="torch",
               dtype=self.dtype, name="att_conv_0")(
                   jnp.concatenate([x, y], axis=-1))
      z = nn.sigmoid(z)
      x = x * z[..., 0:1] + y * z[..., 1:2]
    if x.shape[2] != out_shape:  # mdistiller compares the width
      x = fl.nearest_resize(x, (out_shape, out_shape))
    out = BatchNorm(dtype=self.dtype, name="conv2_1")(
        self._conv(x, self.out_channels, 3, "conv2_0"), train, mask)
    return out, x


class ReviewKDConnector(nn.Module):
  """ReviewKD's ABFs (mdistiller ``ReviewKD.abfs``), knowledge review from
  the deepest level (the pooled feature as a 1×1 map) to the shallowest.

  Attributes are mdistiller's config lists (:func:`reviewkd_spec`):
  ``in_channels`` / ``out_channels`` shallow → deep (pooled last),
  ``shapes`` / ``out_shapes`` deep → shallow (pooled first). The middle
  width is ``min(512, in_channels[-1])`` (mdistiller's MAX_MID_CHANNEL is
  read but never used). ``abfs_0`` is the pooled level's module (no fusion),
  as the reversed ModuleList.

  ``__call__(levels, train, mask)``: the student's levels shallow → deep
  (:func:`reviewkd_levels`); the deepest ``len(in_channels)`` are used
  (mdistiller's ``zip`` drops the shallower ones). Returns the outputs
  shallow → deep (the teacher's ``preact_feats[1:] + [pooled]`` shapes).
  """
  in_channels: tuple[int, ...]
  out_channels: tuple[int, ...]
  shapes: tuple[int, ...]
  out_shapes: tuple[int, ...]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, levels: Sequence[jax.Array], train: bool,
               mask: jax.Array | None = None) -> list[jax.Array]:
    n = len(self.in_channels)
    if len(levels) < n:
      raise ValueError(f"ReviewKDConnector: {len(levels)} student levels "
                       f"for {n} ABFs")
    levels = list(levels)[len(levels) - n:]
    mid = min(512, self.in_channels[-1])
    abfs = [ABF(mid, self.out_channels[n - 1 - j], fuse=j > 0,
                dtype=self.dtype, name=f"abfs_{j}") for j in range(n)]
    x = list(levels)[::-1]
    out, residual = abfs[0](x[0], None, self.shapes[0], self.out_shapes[0],
                            train, mask)
    results = [out]
    for f, abf, shape, out_shape in zip(x[1:], abfs[1:], self.shapes[1:],
                                        self.out_shapes[1:]):
      out, residual = abf(f, residual, shape, out_shape, train, mask)
      results.insert(0, out)
    return results


def reviewkd_levels(outputs, preact: bool, teacher: bool = False
                    ) -> list[jax.Array]:
  """The maps ReviewKD reads from one network's outputs, shallow → deep.

  Student: ``feats`` (``preact_feats`` if ``preact``: mdistiller's
  STU_PREACT) + the pooled feature as a 1×1 map. Teacher:
  ``preact_feats[1:]`` + the pooled feature.
  """
  pooled = outputs.pooled_feat[:, None, None, :]
  if teacher:
    return list(outputs.preact_feats)[1:] + [pooled]
  return list(outputs.preact_feats if preact else outputs.feats) + [pooled]


def reviewkd_spec(student: nn.Module, teacher: nn.Module,
                  input_size: tuple[int, int] = (32, 32)) -> dict[str, list]:
  """mdistiller's per-pair ReviewKD lists, derived from the two networks.

  Returns ``dict(in_channels, out_channels, shapes, out_shapes)`` as
  mdistiller's REVIEWKD.IN_CHANNELS, OUT_CHANNELS, SHAPES and OUT_SHAPES
  (which its yaml files hard-code per pair): one level per teacher level
  (``preact_feats[1:]`` + pooled); the student's deepest levels of
  ``feats + [pooled]``; heights of the square maps.

  Raises:
    ConfigError: the student has fewer levels than the teacher, or a map
      is not square.
  """
  s_out = models.output_shapes(student, input_size)
  t_out = models.output_shapes(teacher, input_size)
  as_map = lambda p: (1, 1, 1, p.shape[-1])  # noqa: E731
  t_levels = [f.shape for f in t_out.feats[1:]] + [as_map(t_out.pooled_feat)]
  s_levels = [f.shape for f in s_out.feats] + [as_map(s_out.pooled_feat)]
  n = len(t_levels)
  if len(s_levels) < n:
    raise errors.ConfigError(
        f"ReviewKD: the student has {len(s_levels)} levels (feats + pooled), "
        f"fewer than the teacher's {n}")
  s_levels = s_levels[len(s_levels) - n:]
  if any(shape[1] != shape[2] for shape in s_levels + t_levels):
    raise errors.ConfigError("ReviewKD: feature maps must be square "
                             f"(student {s_levels}, teacher {t_levels})")
  return dict(in_channels=[s[-1] for s in s_levels],
              out_channels=[t[-1] for t in t_levels],
              shapes=[s[1] for s in s_levels][::-1],
              out_shapes=[t[1] for t in t_levels][::-1])


def reviewkd_warmup(epoch, warmup_epochs) -> jax.Array:
  """ReviewKD's ``min(epoch / WARMUP_EPOCHS, 1)`` (1-indexed epoch); 1 for
  a warm-up of 0 epochs."""
  return jnp.minimum(epoch / max(float(warmup_epochs), 1e-12), 1.0)


def reviewkd_term(s, t, mask, hp, ctx: Context):
  """The warmed-up HCL of the ABFs' outputs against the teacher's levels."""
  settings = ctx.settings
  levels_s = reviewkd_levels(s, bool(settings.stu_preact))
  levels_t = reviewkd_levels(t, True, teacher=True)
  results = ctx.modules["connector"](levels_s, train=True, mask=mask)
  return (reviewkd_warmup(hp.epoch, settings.warmup_epochs)
          * fl.hcl_loss(results, levels_t, mask))


def make_modules(student, teacher, settings, dtype, image_size: int
                 ) -> dict[str, nn.Module]:
  """``{'connector': ReviewKDConnector}`` for the pair (a ConfigError when
  the networks' levels do not fit, from ``jax.eval_shape``)."""
  del settings
  spec = reviewkd_spec(student, teacher, (image_size, image_size))
  return {"connector": ReviewKDConnector(
      **{k: tuple(v) for k, v in spec.items()}, dtype=dtype)}


def module_inputs(name, student, teacher, settings, image_size: int):
  """The student's ``feats`` + the pooled feature as a 1×1 map, for one
  image."""
  size = (image_size, image_size)
  shapes = models.feature_shapes(student, size)
  pooled = models.output_shapes(student, size).pooled_feat.shape[-1]
  return ([jnp.zeros(s) for s in shapes] + [jnp.zeros((1, 1, 1, pooled))],
          ), {"train": False}


METHOD = feature_method(
    "reviewkd", "knowledge review (Chen 2021)", reviewkd_term, DEFAULTS,
    pair_defaults=PAIR_DEFAULTS, setting_rules={"warmup_epochs": POSITIVE},
    make_modules=make_modules, module_inputs=module_inputs)
