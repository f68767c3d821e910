"""The feature-based comparison methods of the SLKD paper, as rows of the
method table (:mod:`slkd_jax.methods`): FitNet, AT, SP, RKD, PKT, NST, KDSVD,
VID, OFD and ReviewKD, exact to mdistiller.

Each is a *feature term* ``term(s, t, settings, modules, mask, ctx)`` over
the student's and the frozen teacher's :class:`~slkd_jax.models.Outputs`
(and, for FitNet, VID, OFD and ReviewKD, a trainable connector from
:mod:`slkd_jax.connectors`); ``ctx`` (:class:`TermContext`) carries the
step's hyper-parameters, the frozen teacher's variables and the networks.
The student objective is ``ce_weight · CE + feat_weight · term`` as in
mdistiller's distillers. The losses themselves are in
:mod:`slkd_jax.feature_losses`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from slkd_jax import connectors, errors, feature_losses as fl, losses
from slkd_jax.models.bn_before_relu import bn_before_relu

FeatureTerm = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class TermContext:
  """What a feature term may read besides the features: the step's
  :class:`~slkd_jax.methods.HParams` (``hp.epoch`` for warm-ups), the
  frozen teacher's :class:`~slkd_jax.state.ModelState` and the run's
  :class:`~slkd_jax.stage.Networks`."""
  hp: Any = None
  teacher: Any = None
  networks: Any = None


def _fitnet(s, t, settings, modules, mask, ctx):
  hint = settings.hint_layer
  regressed = modules["connector"](s.feats[hint], train=True, mask=mask)
  return fl.fitnet_loss(regressed, t.feats[hint], mask)


def _vid(s, t, settings, modules, mask, ctx):
  means, log_scales = modules["connector"](list(s.feats[1:]))
  return fl.vid_loss(means, log_scales, list(t.feats[1:]), settings.eps, mask)


def _at(s, t, settings, modules, mask, ctx):
  return fl.at_loss(list(s.feats[1:]), list(t.feats[1:]), settings.p, mask)


def _sp(s, t, settings, modules, mask, ctx):
  return fl.sp_loss([s.feats[-1]], [t.feats[-1]], mask)


def _rkd(s, t, settings, modules, mask, ctx):
  return fl.rkd_loss(s.pooled_feat, t.pooled_feat, settings.distance_weight,
                     settings.angle_weight, settings.pdist_eps,
                     settings.pdist_squared, mask)


def _pkt(s, t, settings, modules, mask, ctx):
  return fl.pkt_loss(s.pooled_feat, t.pooled_feat, settings.eps, mask)


def _nst(s, t, settings, modules, mask, ctx):
  return fl.nst_loss(list(s.feats[1:]), list(t.feats[1:]), mask)


def _kdsvd(s, t, settings, modules, mask, ctx):
  return fl.kdsvd_loss(list(s.feats[1:]), list(t.feats[1:]), settings.k,
                       mask)


def ofd_margins(teacher_model, teacher_params, t_channels) -> list[jax.Array]:
  """OFD's margins for the distilled teacher stages of ``t_channels``.

  mdistiller indexes the teacher's ``get_bn_before_relu()`` list from its
  start (``margins[i]`` for the i-th aligned stage); a list too short or of
  other channel counts crashes there and is a ConfigError here.
  """
  bns = check_ofd_teacher(teacher_model, teacher_params, t_channels)
  return [fl.ofd_margin(scale, bias) for scale, bias in bns]


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


def _ofd(s, t, settings, modules, mask, ctx):
  s_feats, t_feats = connectors.align_last(s.preact_feats[1:],
                                           t.preact_feats[1:])
  margins = ofd_margins(ctx.networks.teacher, ctx.teacher.params,
                        [f.shape[-1] for f in t_feats])
  regressed = modules["connector"](s_feats, train=True, mask=mask)
  return fl.ofd_loss(regressed, t_feats, margins, mask)


def reviewkd_warmup(epoch, warmup_epochs) -> jax.Array:
  """ReviewKD's ``min(epoch / WARMUP_EPOCHS, 1)`` (1-indexed epoch); 1 for
  a warm-up of 0 epochs."""
  return jnp.minimum(epoch / max(float(warmup_epochs), 1e-12), 1.0)


def _reviewkd(s, t, settings, modules, mask, ctx):
  levels_s = connectors.reviewkd_levels(s, bool(settings.stu_preact))
  levels_t = connectors.reviewkd_levels(t, True, teacher=True)
  results = modules["connector"](levels_s, train=True, mask=mask)
  return (reviewkd_warmup(ctx.hp.epoch, settings.warmup_epochs)
          * fl.hcl_loss(results, levels_t, mask))


@dataclasses.dataclass(frozen=True)
class FeatureMethod:
  """A feature-based method: its term, and its connector (if any).

  ``teacher_train_mode``: mdistiller runs the teacher in train mode
  (BatchNorm on batch statistics) — OFD's ``train()`` override puts every
  child, the teacher included, in train mode; the step must then apply the
  teacher with ``train=True`` (and the batch mask) and discard its updated
  statistics.
  """
  name: str
  term: FeatureTerm
  description: str
  has_connector: bool = False
  teacher_train_mode: bool = False


FEATURE_METHODS: dict[str, FeatureMethod] = {m.name: m for m in [
    FeatureMethod("fitnet", _fitnet, "FitNet: hint regression (Romero 2015)",
                  has_connector=True),
    FeatureMethod("at", _at, "attention transfer (Zagoruyko 2017)"),
    FeatureMethod("sp", _sp, "similarity-preserving KD (Tung 2019)"),
    FeatureMethod("rkd", _rkd, "relational KD (Park 2019)"),
    FeatureMethod("pkt", _pkt, "probabilistic knowledge transfer (Passalis "
                  "2018)"),
    FeatureMethod("nst", _nst, "neuron selectivity transfer (Huang 2017)"),
    FeatureMethod("kdsvd", _kdsvd, "KD with singular value decomposition "
                  "(Lee 2018)"),
    FeatureMethod("vid", _vid, "variational information distillation (Ahn "
                  "2019)", has_connector=True),
    FeatureMethod("ofd", _ofd, "overhaul of feature distillation (Heo 2019)",
                  has_connector=True, teacher_train_mode=True),
    FeatureMethod("reviewkd", _reviewkd, "knowledge review (Chen 2021)",
                  has_connector=True),
]}


def objective(method: FeatureMethod):
  """The student objective of ``method``: ``w_ce·CE + w_feat·term``.

  The teacher's outputs are detached here (it is frozen; mdistiller runs it
  under ``no_grad``)."""

  def student_objective(outputs, labels, mask, hp, *, settings, modules,
                        teacher=None, networks=None, **_):
    t_features = jax.lax.stop_gradient(outputs.teacher_features)
    ce = losses.cross_entropy(outputs.student, labels, mask)
    ctx = TermContext(hp, jax.lax.stop_gradient(teacher), networks)
    feat = method.term(outputs.student_features, t_features, settings,
                       modules, mask, ctx)
    return (hp.ce_weight * ce + hp.feat_weight * feat,
            {"student/ce": ce, f"student/{method.name}": feat})

  return student_objective


def make_modules(name: str, student: nn.Module, teacher: nn.Module,
                 settings: Any, dtype, image_size: int
                 ) -> dict[str, nn.Module]:
  """The trainable modules of method ``name`` for these two networks, by
  name (built from their feature shapes at the data's image size, as
  mdistiller's ``get_feat_shapes``); empty for methods without any."""
  if not FEATURE_METHODS[name].has_connector:
    return {}
  size = (image_size, image_size)
  s_shapes = connectors.feature_shapes(student, size)
  t_shapes = connectors.feature_shapes(teacher, size)
  if name == "ofd":
    _, t_channels = connectors.ofd_channels(s_shapes, t_shapes)
    abstract = jax.eval_shape(
        teacher.init, jax.random.key(0),
        jnp.zeros((1, *size, 3), jnp.float32))["params"]
    check_ofd_teacher(teacher, abstract, t_channels)  # fail here, not in jit
    return {"connector": connectors.OFDConnector(tuple(t_channels), dtype)}
  if name == "reviewkd":
    spec = connectors.reviewkd_spec(student, teacher, size)
    return {"connector": connectors.ReviewKDConnector(
        **{k: tuple(v) for k, v in spec.items()}, dtype=dtype)}
  return {"connector": connectors.make_connector(
      name, s_shapes, t_shapes,
      hint_layer=getattr(settings, "hint_layer", 2),
      init_pred_var=getattr(settings, "init_pred_var", 5.0),
      eps=getattr(settings, "eps", 1e-5), dtype=dtype)}


def module_example_inputs(name: str, module_name: str, student: nn.Module,
                          teacher: nn.Module, settings: Any, image_size: int):
  """``(args, kwargs)`` that initialise module ``module_name`` of method
  ``name``: zeros of the student's feature shapes for one image."""
  del module_name, teacher  # each method owns one module
  size = (image_size, image_size)
  shapes = connectors.feature_shapes(student, size)
  if name == "fitnet":
    return (jnp.zeros(shapes[settings.hint_layer]),), {"train": False}
  if name == "ofd":  # the connector keeps the deepest stages it needs
    return ([jnp.zeros(s) for s in shapes[1:]],), {"train": False}
  if name == "reviewkd":  # feats + the pooled feature as a 1x1 map
    pooled = connectors.output_shapes(student, size).pooled_feat.shape[-1]
    return ([jnp.zeros(s) for s in shapes] + [jnp.zeros((1, 1, 1, pooled))],
            ), {"train": False}
  return ([jnp.zeros(s) for s in shapes[1:]],), {}
