"""The feature-based comparison methods of the SLKD paper, exact to
mdistiller: FitNet, AT, SP, RKD, PKT, NST, KDSVD and VID (OFD and ReviewKD,
the same family with more machinery, have their own modules).

Each is a *feature term* ``term(s, t, mask, hp, ctx)`` over the student's
and the frozen teacher's :class:`~slkd_jax.models.Outputs` (and, for FitNet
and VID, a trainable connector defined here); the objective is
``ce_weight · CE + feat_weight · term`` as in mdistiller's distillers
(:func:`feature_method`). The losses themselves are in
:mod:`slkd_jax.feature_losses`.

Connectors, as mdistiller builds them: :class:`ConvReg` (FitNet's regressor,
``mdistiller/distillers/_common.py``: a conv chosen from the two shapes,
BatchNorm, ReLU) and :class:`VIDConnector` (one :class:`VIDRegressor` per
layer: 1×1 conv – ReLU – 1×1 conv – ReLU – 1×1 conv, no biases, and its
log-scale). Layers are :mod:`slkd_jax.models.layers`' PyTorch-faithful
Conv/BatchNorm with PyTorch's *default* initialisation (mdistiller
re-initialises nothing there); parameter paths follow the PyTorch module
paths (``conv_reg.conv`` / ``conv_reg.bn``; ``regressors.0.2`` →
``regressors_0/2``). mdistiller calls ``distiller.train()``, so ConvReg's
BatchNorm normalises with batch statistics (its running statistics are
never read): pass ``train=True`` and the batch ``mask``. Shapes are NHWC.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from slkd_jax import errors, losses, models
from slkd_jax import feature_losses as fl
from slkd_jax.methods.base import (BOOL, POSITIVE, Context, HParams, Logits,
                                   Loss, Method, check, int_at_least)
from slkd_jax.models.layers import BatchNorm, Conv, param_dtype

Shape = Sequence[int]

#: mdistiller's settings (``engine/cfg.py``) of each method: CE and feature
#: weights, and the method's own.
DEFAULTS: dict[str, dict[str, Any]] = {
    # CFG.FITNET: HINT_LAYER 2, CE 1.0, FEAT 100.0 (INPUT_SIZE (32, 32):
    # the data's image size here).
    "fitnet": dict(ce_weight=1.0, feat_weight=100.0, hint_layer=2),
    # CFG.AT: P 2, CE 1.0, FEAT 1000.0.
    "at": dict(ce_weight=1.0, feat_weight=1000.0, p=2),
    # CFG.SP: CE 1.0, FEAT 3000.0.
    "sp": dict(ce_weight=1.0, feat_weight=3000.0),
    # CFG.RKD: DISTANCE_WEIGHT 25, ANGLE_WEIGHT 50, PDIST.EPSILON 1e-12,
    # PDIST.SQUARED False, CE 1.0, FEAT 1.0.
    "rkd": dict(ce_weight=1.0, feat_weight=1.0, distance_weight=25.0,
                angle_weight=50.0, pdist_eps=1e-12, pdist_squared=False),
    # CFG.PKT: CE 1.0, FEAT 30000.0; eps 1e-7 is pkt_loss's default argument.
    "pkt": dict(ce_weight=1.0, feat_weight=30000.0, eps=1e-7),
    # CFG.NST: CE 1.0, FEAT 50.0.
    "nst": dict(ce_weight=1.0, feat_weight=50.0),
    # CFG.KDSVD: K 1, CE 1.0, FEAT 1.0.
    "kdsvd": dict(ce_weight=1.0, feat_weight=1.0, k=1),
    # CFG.VID: EPS 1e-5, INIT_PRED_VAR 5.0, CE 1.0, FEAT 1.0.
    "vid": dict(ce_weight=1.0, feat_weight=1.0, init_pred_var=5.0, eps=1e-5),
}

#: Allowed values of the family's own settings (others: non-negative).
SETTING_RULES = {"hint_layer": int_at_least(0), "p": POSITIVE,
                 "eps": POSITIVE, "init_pred_var": POSITIVE,
                 "k": int_at_least(1), "pdist_squared": BOOL}

FeatureTerm = Callable[..., jax.Array]


def feature_objective(name: str, term: FeatureTerm):
  """The objective ``w_ce·CE + w_feat·term`` of feature method ``name``.

  The teacher's outputs are detached here (it is frozen; mdistiller runs it
  under ``no_grad``)."""

  def objective(logits: Logits, batch, hp: HParams, ctx: Context) -> Loss:
    labels, mask = batch["label"], batch["mask"]
    t_features = jax.lax.stop_gradient(logits.teacher_features)
    ce = losses.cross_entropy(logits.student, labels, mask)
    feat = term(logits.student_features, t_features, mask, hp, ctx)
    return Loss(hp.ce_weight * ce + hp.feat_weight * feat,
                {"student/ce": ce, f"student/{name}": feat})

  return objective


def feature_method(name: str, description: str, term: FeatureTerm,
                   defaults: dict[str, Any], **kwargs) -> Method:
  """A method of the ``w_ce·CE + w_feat·term`` family: the teacher runs,
  both networks return their features."""
  return Method(name, description, feature_objective(name, term),
                uses_teacher=True, features=True, feature_term=term,
                defaults=defaults,
                setting_rules={**SETTING_RULES,
                               **kwargs.pop("setting_rules", {})}, **kwargs)


# ---------------------------------------------------------------------------
# The terms (mdistiller's feature selection: :func:`select_features`).


def fitnet_term(s, t, mask, hp, ctx: Context):
  hint = ctx.settings.hint_layer
  regressed = ctx.modules["connector"](s.feats[hint], train=True, mask=mask)
  return fl.fitnet_loss(regressed, t.feats[hint], mask)


def vid_term(s, t, mask, hp, ctx: Context):
  means, log_scales = ctx.modules["connector"](list(s.feats[1:]))
  return fl.vid_loss(means, log_scales, list(t.feats[1:]), ctx.settings.eps,
                     mask)


def at_term(s, t, mask, hp, ctx: Context):
  return fl.at_loss(list(s.feats[1:]), list(t.feats[1:]), ctx.settings.p,
                    mask)


def sp_term(s, t, mask, hp, ctx: Context):
  return fl.sp_loss([s.feats[-1]], [t.feats[-1]], mask)


def rkd_term(s, t, mask, hp, ctx: Context):
  st = ctx.settings
  return fl.rkd_loss(s.pooled_feat, t.pooled_feat, st.distance_weight,
                     st.angle_weight, st.pdist_eps, st.pdist_squared, mask)


def pkt_term(s, t, mask, hp, ctx: Context):
  return fl.pkt_loss(s.pooled_feat, t.pooled_feat, ctx.settings.eps, mask)


def nst_term(s, t, mask, hp, ctx: Context):
  return fl.nst_loss(list(s.feats[1:]), list(t.feats[1:]), mask)


def kdsvd_term(s, t, mask, hp, ctx: Context):
  return fl.kdsvd_loss(list(s.feats[1:]), list(t.feats[1:]), ctx.settings.k,
                       mask)


def select_features(method: str, outputs, hint_layer: int = 2):
  """What mdistiller feeds ``method``'s loss, from a network's outputs.

  Args:
    method: a feature method (``ofd`` included).
    outputs: what a zoo network returns with ``features=True``
      (:class:`slkd_jax.models.Outputs`: ``feats``, ``pooled_feat``).
    hint_layer: FitNet's hint layer.

  Returns:
    fitnet: ``feats[hint_layer]``; at/nst/kdsvd/vid: ``feats[1:]``;
    sp: ``[feats[-1]]``; rkd/pkt: ``pooled_feat``; ofd: ``preact_feats[1:]``
    (ReviewKD's levels: :func:`slkd_jax.methods.reviewkd.reviewkd_levels`).
  """
  feats, pooled = list(outputs.feats), outputs.pooled_feat
  if method == "ofd":
    return list(outputs.preact_feats)[1:]
  if method == "fitnet":
    return feats[hint_layer]
  if method in ("at", "nst", "kdsvd", "vid"):
    return feats[1:]
  if method == "sp":
    return [feats[-1]]
  if method in ("rkd", "pkt"):
    return pooled
  raise ValueError(f"unknown feature method {method!r}; expected one of "
                   f"{sorted(DEFAULTS)} or ofd")


# ---------------------------------------------------------------------------
# FitNet's connector.


def _uniform(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class TorchConvTranspose(nn.Module):
  """``nn.ConvTranspose2d(in, features, k, stride, padding)`` (groups 1).

  The kernel is ``(k, k, in, out)``: PyTorch's ``(in, out, k, k)`` weight
  transposed by ``(2, 3, 0, 1)``. Init is PyTorch's default, whose fan-in is
  read off the weight's dim 1, i.e. ``out·k²`` (uniform ±1/sqrt(fan-in) for
  weight and bias).
  """
  features: int
  kernel_size: int
  strides: int = 1
  padding: int = 0
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, s, p = self.kernel_size, self.strides, self.padding
    bound = 1.0 / math.sqrt(self.features * k * k)
    pdtype = param_dtype(self.dtype)
    kernel = self.param("kernel", _uniform(bound),
                        (k, k, x.shape[-1], self.features), pdtype)
    # A transposed conv is the conv of the stride-dilated input with the
    # spatially flipped kernel, padded by k - 1 - p on each side.
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel[::-1, ::-1].astype(self.dtype),
        window_strides=(1, 1), padding=((k - 1 - p, k - 1 - p),) * 2,
        lhs_dilation=(s, s), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      bias = self.param("bias", _uniform(bound), (self.features,), pdtype)
      y = y + bias.astype(self.dtype)
    return y


def conv_reg_spec(s_shape: Shape, t_shape: Shape) -> dict[str, Any]:
  """mdistiller ConvReg's choice of conv for NHWC student/teacher shapes.

  Returns ``dict(kind, kernel_size, strides, padding)``: a 3×3 stride-2 conv
  when the student is twice the teacher's height, a 4×4 stride-2 transposed
  conv when half, else a ``(1 + s_H − t_H)``-sized valid conv (checked in
  this order; heights decide, as in mdistiller).
  """
  (_, s_h, s_w, _), (_, t_h, t_w, _) = s_shape, t_shape
  if s_h == 2 * t_h:
    return dict(kind="conv", kernel_size=3, strides=2, padding=1)
  if s_h * 2 == t_h:
    return dict(kind="transpose", kernel_size=4, strides=2, padding=1)
  if s_h >= t_h:
    if s_h - t_h != s_w - t_w:
      raise ValueError(f"ConvReg: non-square kernel ({1 + s_h - t_h}, "
                       f"{1 + s_w - t_w}) for student {tuple(s_shape)} and "
                       f"teacher {tuple(t_shape)} is not supported")
    return dict(kind="conv", kernel_size=1 + s_h - t_h, strides=1, padding=0)
  raise ValueError(f"ConvReg: student height {s_h} cannot be mapped to "
                   f"teacher height {t_h}")


class ConvReg(nn.Module):
  """FitNet's convolutional regressor: conv (see :func:`conv_reg_spec`,
  with bias) → BatchNorm → ReLU (if ``use_relu``), to the teacher's channels.

  Attributes:
    s_shape / t_shape: NHWC shapes of the student's / teacher's hint feature.
  """
  s_shape: tuple[int, ...]
  t_shape: tuple[int, ...]
  use_relu: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool,
               mask: jax.Array | None = None) -> jax.Array:
    spec = conv_reg_spec(self.s_shape, self.t_shape)
    t_c = self.t_shape[-1]
    if spec["kind"] == "transpose":
      conv = TorchConvTranspose(t_c, spec["kernel_size"], spec["strides"],
                                spec["padding"], dtype=self.dtype, name="conv")
    else:
      conv = Conv(t_c, spec["kernel_size"], spec["strides"], spec["padding"],
                  use_bias=True, init_scheme="torch", dtype=self.dtype,
                  name="conv")
    y = BatchNorm(dtype=self.dtype, name="bn")(conv(x), train, mask)
    return nn.relu(y) if self.use_relu else y


# ---------------------------------------------------------------------------
# VID's connector.


def vid_log_scale_init(channels: int, init_pred_var: float = 5.0,
                       eps: float = 1e-5, dtype=jnp.float32) -> jax.Array:
  """mdistiller's ``log(exp(init_pred_var − eps) − 1)`` for each channel.

  Computed in float64 and rounded to ``dtype`` (mdistiller: a float32
  tensor), so that ``log(1 + exp(·)) + eps`` is ``init_pred_var``.
  """
  value = np.log(np.exp(init_pred_var - eps) - 1.0)
  return jnp.full((channels,), value, dtype)


class VIDRegressor(nn.Module):
  """One layer of VID: μ = conv1×1–ReLU–conv1×1–ReLU–conv1×1 (no biases,
  PyTorch default init; submodules ``0``, ``2``, ``4`` as the Sequential).

  ``__call__(f_s, target_size)`` first average-pools the student to
  ``(target_size, target_size)`` when it is larger (the teacher's height),
  as mdistiller pools before regressing. Returns ``(μ, log_scale)``.

  The log-scale: mdistiller keeps it in a plain Python list, so it is neither
  registered nor given to the optimizer — it stays at its initial value
  (σ² = init_pred_var) forever. With ``learn_log_scale=False`` (default,
  mdistiller) it is that constant and no variable; ``True`` makes it a
  trainable ``params`` entry ``log_scale`` (the VID authors' intent).
  """
  features: int
  init_pred_var: float = 5.0
  eps: float = 1e-5
  learn_log_scale: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, target_size: int | None = None
               ) -> tuple[jax.Array, jax.Array]:
    if target_size is not None and x.shape[1] > target_size:
      x = fl.adaptive_avg_pool(x, (target_size, target_size))
    for i in (0, 2, 4):
      if i:
        x = nn.relu(x)
      x = Conv(self.features, 1, 1, 0, use_bias=False, init_scheme="torch",
               dtype=self.dtype, name=str(i))(x)
    pdtype = param_dtype(self.dtype)
    init = vid_log_scale_init(self.features, self.init_pred_var, self.eps,
                              pdtype)
    if self.learn_log_scale:
      log_scale = self.param("log_scale", lambda key, s, d: init.astype(d),
                             (self.features,), pdtype)
    else:
      log_scale = init
    return x, log_scale


class VIDConnector(nn.Module):
  """VID's regressors for all distilled layers (``regressors_<i>``).

  Attributes:
    t_channels: teacher channels per layer (mdistiller: ``feats[1:]``).
    target_sizes: teacher heights per layer (the student is pooled to them).
  """
  t_channels: tuple[int, ...]
  target_sizes: tuple[int, ...]
  init_pred_var: float = 5.0
  eps: float = 1e-5
  learn_log_scale: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats_s: Sequence[jax.Array]
               ) -> tuple[list[jax.Array], list[jax.Array]]:
    if not len(feats_s) == len(self.t_channels) == len(self.target_sizes):
      raise ValueError(f"VIDConnector: {len(feats_s)} student features for "
                       f"{len(self.t_channels)} regressors")
    means, log_scales = [], []
    for i, (f, c, size) in enumerate(zip(feats_s, self.t_channels,
                                         self.target_sizes)):
      mu, log_scale = VIDRegressor(c, self.init_pred_var, self.eps,
                                   self.learn_log_scale, self.dtype,
                                   name=f"regressors_{i}")(f, size)
      means.append(mu)
      log_scales.append(log_scale)
    return means, log_scales


def make_connector(method: str, s_shapes: Sequence[Shape],
                   t_shapes: Sequence[Shape], *, hint_layer: int = 2,
                   init_pred_var: float = 5.0, eps: float = 1e-5,
                   learn_log_scale: bool = False, dtype=jnp.float32
                   ) -> nn.Module | None:
  """The connector mdistiller builds for ``method`` (None if it has none).

  ``s_shapes`` / ``t_shapes``: NHWC shapes of student's and teacher's
  ``feats``, as :func:`slkd_jax.models.feature_shapes` returns them.
  fitnet → ``ConvReg(s[hint_layer], t[hint_layer])``; vid → a
  :class:`VIDConnector` over ``feats[1:]``.
  """
  s_shapes = [tuple(int(d) for d in s) for s in s_shapes]
  t_shapes = [tuple(int(d) for d in s) for s in t_shapes]
  if method == "fitnet":
    return ConvReg(s_shapes[hint_layer], t_shapes[hint_layer], dtype=dtype)
  if method == "vid":
    return VIDConnector(tuple(s[-1] for s in t_shapes[1:]),
                        tuple(s[1] for s in t_shapes[1:]), init_pred_var,
                        eps, learn_log_scale, dtype)
  return None


def _shapes(student, teacher, image_size: int):
  size = (image_size, image_size)
  return models.feature_shapes(student, size), models.feature_shapes(
      teacher, size)


def _connector_of(name: str):
  """``make_modules`` of FitNet / VID: ``{'connector': module}`` from the
  two networks' feature shapes at the data's image size (mdistiller's
  ``get_feat_shapes``)."""

  def make_modules(student, teacher, settings, dtype, image_size):
    s_shapes, t_shapes = _shapes(student, teacher, image_size)
    return {"connector": make_connector(
        name, s_shapes, t_shapes,
        hint_layer=getattr(settings, "hint_layer", 2),
        init_pred_var=getattr(settings, "init_pred_var", 5.0),
        eps=getattr(settings, "eps", 1e-5), dtype=dtype)}

  return make_modules


def fitnet_module_inputs(name, student, teacher, settings, image_size):
  """Zeros of the student's hint feature for one image."""
  shapes = models.feature_shapes(student, (image_size, image_size))
  return (jnp.zeros(shapes[settings.hint_layer]),), {"train": False}


def vid_module_inputs(name, student, teacher, settings, image_size):
  """Zeros of the student's ``feats[1:]`` for one image."""
  shapes = models.feature_shapes(student, (image_size, image_size))
  return ([jnp.zeros(s) for s in shapes[1:]],), {}


# ---------------------------------------------------------------------------
# Settings against the networks (stage.resolve).


def check_fitnet(student, teacher, settings, image_size: int) -> None:
  """``hint_layer`` indexes a feature level of both networks, whose shapes
  ConvReg can map onto each other."""
  s_shapes, t_shapes = _shapes(student, teacher, image_size)
  hint, n = settings.hint_layer, min(len(s_shapes), len(t_shapes))
  key = "recipes.fitnet.hint_layer"
  check(0 <= hint < n, key, hint, f"an int in [0, {n}) (the student has "
        f"{len(s_shapes)} feature levels, the teacher {len(t_shapes)})")
  try:
    conv_reg_spec(s_shapes[hint], t_shapes[hint])
  except ValueError as e:
    check(False, key, hint, f"a level whose shapes ConvReg can map ({e})")


def check_levels(name: str):
  """``check_networks`` of the methods that pair ``feats[1:]`` level by
  level (AT, NST, KDSVD, VID): as many levels in both networks (the losses
  pair them strictly; mdistiller's ``zip`` would drop the extra ones)."""

  def check_networks(student, teacher, settings, image_size: int) -> None:
    s_shapes, t_shapes = _shapes(student, teacher, image_size)
    if len(s_shapes) != len(t_shapes):
      raise errors.ConfigError(
          f"method {name!r} pairs the feature levels one by one, but the "
          f"student has {len(s_shapes)} and the teacher {len(t_shapes)}: "
          "choose config.student.arch / config.teacher.arch with as many")

  return check_networks


METHODS = (
    feature_method("fitnet", "FitNet: hint regression (Romero 2015)",
                   fitnet_term, DEFAULTS["fitnet"],
                   check_networks=check_fitnet,
                   make_modules=_connector_of("fitnet"),
                   module_inputs=fitnet_module_inputs),
    feature_method("at", "attention transfer (Zagoruyko 2017)", at_term,
                   DEFAULTS["at"], check_networks=check_levels("at")),
    feature_method("sp", "similarity-preserving KD (Tung 2019)", sp_term,
                   DEFAULTS["sp"]),
    feature_method("rkd", "relational KD (Park 2019)", rkd_term,
                   DEFAULTS["rkd"]),
    feature_method("pkt", "probabilistic knowledge transfer (Passalis 2018)",
                   pkt_term, DEFAULTS["pkt"]),
    feature_method("nst", "neuron selectivity transfer (Huang 2017)",
                   nst_term, DEFAULTS["nst"],
                   check_networks=check_levels("nst")),
    feature_method("kdsvd", "KD with singular value decomposition (Lee 2018)",
                   kdsvd_term, DEFAULTS["kdsvd"],
                   check_networks=check_levels("kdsvd")),
    feature_method("vid", "variational information distillation (Ahn 2019)",
                   vid_term, DEFAULTS["vid"], check_networks=check_levels("vid"),
                   make_modules=_connector_of("vid"),
                   module_inputs=vid_module_inputs),
)
