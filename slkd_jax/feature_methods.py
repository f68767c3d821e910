"""The feature-based comparison methods of the SLKD paper, as rows of the
method table (:mod:`slkd_jax.methods`): FitNet, AT, SP, RKD, PKT, NST, KDSVD
and VID, exact to mdistiller.

Each is a *feature term* over the student's and the frozen teacher's
:class:`~slkd_jax.models.Outputs` (and, for FitNet and VID, a trainable
connector from :mod:`slkd_jax.connectors`); the student objective is
``ce_weight · CE + feat_weight · term`` as in mdistiller's distillers. The
losses themselves are in :mod:`slkd_jax.feature_losses`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from slkd_jax import connectors, feature_losses as fl, losses

FeatureTerm = Callable[..., jax.Array]


def _fitnet(s, t, settings, modules, mask):
  hint = settings.hint_layer
  regressed = modules["connector"](s.feats[hint], train=True, mask=mask)
  return fl.fitnet_loss(regressed, t.feats[hint], mask)


def _vid(s, t, settings, modules, mask):
  means, log_scales = modules["connector"](list(s.feats[1:]))
  return fl.vid_loss(means, log_scales, list(t.feats[1:]), settings.eps, mask)


def _at(s, t, settings, modules, mask):
  return fl.at_loss(list(s.feats[1:]), list(t.feats[1:]), settings.p, mask)


def _sp(s, t, settings, modules, mask):
  return fl.sp_loss([s.feats[-1]], [t.feats[-1]], mask)


def _rkd(s, t, settings, modules, mask):
  return fl.rkd_loss(s.pooled_feat, t.pooled_feat, settings.distance_weight,
                     settings.angle_weight, settings.pdist_eps,
                     settings.pdist_squared, mask)


def _pkt(s, t, settings, modules, mask):
  return fl.pkt_loss(s.pooled_feat, t.pooled_feat, settings.eps, mask)


def _nst(s, t, settings, modules, mask):
  return fl.nst_loss(list(s.feats[1:]), list(t.feats[1:]), mask)


def _kdsvd(s, t, settings, modules, mask):
  return fl.kdsvd_loss(list(s.feats[1:]), list(t.feats[1:]), settings.k,
                       mask)


@dataclasses.dataclass(frozen=True)
class FeatureMethod:
  """A feature-based method: its term, and its connector (if any)."""
  name: str
  term: FeatureTerm
  description: str
  has_connector: bool = False


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
]}


def objective(method: FeatureMethod):
  """The student objective of ``method``: ``w_ce·CE + w_feat·term``.

  The teacher's outputs are detached here (it is frozen; mdistiller runs it
  under ``no_grad``)."""

  def student_objective(outputs, labels, mask, hp, *, settings, modules,
                        **_):
    teacher = jax.lax.stop_gradient(outputs.teacher_features)
    ce = losses.cross_entropy(outputs.student, labels, mask)
    feat = method.term(outputs.student_features, teacher, settings, modules,
                       mask)
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
  return {"connector": connectors.make_connector(
      name, connectors.feature_shapes(student, size),
      connectors.feature_shapes(teacher, size),
      hint_layer=getattr(settings, "hint_layer", 2),
      init_pred_var=getattr(settings, "init_pred_var", 5.0),
      eps=getattr(settings, "eps", 1e-5), dtype=dtype)}


def module_example_inputs(name: str, module_name: str, student: nn.Module,
                          teacher: nn.Module, settings: Any, image_size: int):
  """``(args, kwargs)`` that initialise module ``module_name`` of method
  ``name``: zeros of the student's feature shapes for one image."""
  del module_name, teacher  # FitNet and VID own one module each
  shapes = connectors.feature_shapes(student, (image_size, image_size))
  if name == "fitnet":
    return (jnp.zeros(shapes[settings.hint_layer]),), {"train": False}
  return ([jnp.zeros(s) for s in shapes[1:]],), {}
