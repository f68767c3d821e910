"""TESKD: Teacher Evolution via Self-Knowledge Distillation (Li et al.,
"Student Helping Teacher", arXiv 2110.00329), as its official code trains.

One network (:mod:`slkd_jax.models.resnet_kuangliu`'s ``teskd_*``): the
backbone ("teacher", the network that is deployed) and three branches
("students") on a top-down path over the backbone's stages. The objective
(official ``utils.train``, ``distill_loss/KD.py``)::

  L = w_ce · [w_bb·CE(z_bb) + Σ_j w_j·CE(z_j)]
    + w_kd · Σ_j T²·KL(q ‖ softmax(z_j/T)),  q = softmax(z_bb/T) + 1e-7
    + w_fea · Σ_j Σ_{b,c} (f_j − sg(f̄))²

CE is a batch mean; the KL is ``KLDivLoss(reduction='batchmean')`` with the
target q **not** detached (the backbone learns from its branches through q:
"student helping teacher") and 1e-7 added to q without renormalising; the
feature term is a *sum* over batch and channels with the backbone's pooled
feature f̄ detached. Defaults (official ``main.py``): T = 4, w_ce 0.2,
w_kd 0.8, w_fea 1e-7, all w_bb, w_j 1. ``detach_kd_target`` stops the
gradient through q (an ablation; not the reference).

Branch j = 1, 2, 3 is the official ``b1, b2, b3`` of the training loop's
logits: b1 is the *deepest* head (``fc_b3``), see the model module.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp

from slkd_jax import errors, losses, models
from slkd_jax.methods.base import (BOOL, Context, HParams, Logits, Loss,
                                   Method)
from slkd_jax.models import resnet_kuangliu

#: TESKD's loss settings (official main.py defaults, whatever the dataset):
#: T 4, CE 0.2, KL 0.8, feature 1e-7, backbone and branch CE weights 1, KL
#: target not detached.
TESKD_DEFAULTS = {"temperature": 4.0, "ce_weight": 0.2, "kd_weight": 0.8,
                  "feat_weight": 1e-7, "backbone_ce_weight": 1.0,
                  "branch1_ce_weight": 1.0, "branch2_ce_weight": 1.0,
                  "branch3_ce_weight": 1.0, "detach_kd_target": False}

#: The official KL_Loss adds this to the target probabilities.
TARGET_EPSILON = 1e-7
NUM_BRANCHES = 3


def kl_loss(input_logits: jax.Array, target_logits: jax.Array,
            temperature: jax.Array | float, mask: jax.Array | None = None
            ) -> jax.Array:
  """Official ``KL_Loss``: ``T² · (1/B) Σ_b Σ_c q (log q − log p)`` with
  ``q = softmax(z_tgt/T) + 1e-7`` (not renormalised, not detached) and
  ``log p = log_softmax(z_in/T)``; B counts the real (``mask``) examples."""
  chex.assert_rank(input_logits, 2)
  chex.assert_equal_shape([input_logits, target_logits])
  f32 = jnp.promote_types(input_logits.dtype, jnp.float32)
  log_p = jax.nn.log_softmax(input_logits.astype(f32) / temperature)
  q = jax.nn.softmax(target_logits.astype(f32) / temperature) + TARGET_EPSILON
  per_example = jnp.sum(q * (jnp.log(q) - log_p), axis=-1)
  return temperature**2 * losses.masked_mean(per_example, mask)


def feature_loss(branch_feat: jax.Array, backbone_feat: jax.Array,
                 mask: jax.Array | None = None) -> jax.Array:
  """Official ``Fea_Loss`` with the backbone feature detached: the *sum*
  over real examples and channels of ``(f_j − sg(f̄))²`` where ``f_j > 0`` or
  ``f̄ > 0`` (both are post-ReLU averages, so that mask only drops zeros)."""
  chex.assert_rank(branch_feat, 2)
  chex.assert_equal_shape([branch_feat, backbone_feat])
  target = jax.lax.stop_gradient(backbone_feat)
  active = (branch_feat > 0) | (target > 0)
  sq = jnp.where(active, jnp.square(branch_feat - target), 0.0)
  per_example = jnp.sum(sq, axis=-1)
  if mask is not None:
    per_example = per_example * mask.astype(per_example.dtype)
  return jnp.sum(per_example)


def teskd_loss(backbone_logits: jax.Array, branch_logits: jax.Array,
               backbone_feat: jax.Array, branch_feats: jax.Array,
               labels: jax.Array, mask: jax.Array | None = None, *,
               temperature, ce_weight, kd_weight, feat_weight,
               backbone_ce_weight=1.0, branch_ce_weights=(1.0, 1.0, 1.0),
               detach_kd_target: bool = False
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The TESKD objective (module docstring) and its terms.

  Args:
    backbone_logits: z_bb ``[B, C]``.
    branch_logits: ``[3, B, C]``, official b1, b2, b3 (deepest first).
    backbone_feat: f̄ ``[B, D]`` (detached here).
    branch_feats: ``[3, B, D]``, same branch order.
    labels: ``[B]`` int.
    mask: ``[B]`` real-example mask (padded last batch).
    temperature, ce_weight, kd_weight, feat_weight: T, w_ce, w_kd, w_fea.
    backbone_ce_weight, branch_ce_weights: w_bb and (w_1, w_2, w_3).
    detach_kd_target: stop the gradient through the KL target (ablation).

  Returns:
    ``(loss, terms)``: ``student/teskd_ce`` (the bracketed weighted CE
    sum), ``student/teskd_kl`` (Σ_j KL), ``student/teskd_fea`` (Σ_j Fea),
    the backbone's ``student/ce`` and each branch's ``branch_<j>/ce``.
  """
  chex.assert_rank([branch_logits, branch_feats], 3)
  chex.assert_axis_dimension(branch_logits, 0, NUM_BRANCHES)
  target = (jax.lax.stop_gradient(backbone_logits) if detach_kd_target
            else backbone_logits)
  ce_bb = losses.cross_entropy(backbone_logits, labels, mask)
  terms = {"student/ce": ce_bb}
  ce = backbone_ce_weight * ce_bb
  kl = fea = 0.0
  for j in range(NUM_BRANCHES):
    ce_j = losses.cross_entropy(branch_logits[j], labels, mask)
    terms[f"branch_{j + 1}/ce"] = ce_j
    ce = ce + branch_ce_weights[j] * ce_j
    kl = kl + kl_loss(branch_logits[j], target, temperature, mask)
    fea = fea + feature_loss(branch_feats[j], backbone_feat, mask)
  loss = ce_weight * ce + kd_weight * kl + feat_weight * fea
  terms.update({"student/teskd_ce": ce, "student/teskd_kl": kl,
                "student/teskd_fea": fea})
  return loss, terms


def objective(logits: Logits, batch, hp: HParams, ctx: Context) -> Loss:
  """The ``teskd`` student objective: reads the model's
  :class:`~slkd_jax.models.resnet_kuangliu.TeskdOutputs` from
  ``logits.student_features``; T, w_ce, w_kd, w_fea from ``hp`` (arrays),
  w_bb, w_j and the detach switch from the recipe (static)."""
  out, settings = logits.student_features, ctx.settings
  if not isinstance(out, resnet_kuangliu.TeskdOutputs):
    raise errors.ConfigError(
        f"method 'teskd' needs a TESKD model as config.student.arch (one of "
        f"{', '.join(resnet_kuangliu.BACKBONE_OF)}); its network returned "
        f"{type(out).__name__}")
  return Loss(*teskd_loss(
      out.logits, out.branch_logits, out.pooled_feat, out.branch_pooled,
      batch["label"], batch["mask"], temperature=hp.temperature,
      ce_weight=hp.ce_weight, kd_weight=hp.kd_weight,
      feat_weight=hp.feat_weight,
      backbone_ce_weight=settings.backbone_ce_weight,
      branch_ce_weights=(settings.branch1_ce_weight,
                         settings.branch2_ce_weight,
                         settings.branch3_ce_weight),
      detach_kd_target=bool(settings.detach_kd_target)))


def eval_logits(state, stage, images, hp) -> dict[str, jax.Array]:
  """Eval-mode logits: ``student`` (the backbone, which the best checkpoint
  follows) and ``branch_1..3`` (official b1..b3, deepest first)."""
  del hp
  out = stage.nets.student.apply(state.student.variables, images,
                                 train=False, features=True)
  named = {"student": out.logits}
  for j in range(NUM_BRANCHES):
    named[f"branch_{j + 1}"] = out.branch_logits[j]
  return named


# ---------------------------------------------------------------------------
# Export: the backbone alone.


def backbone_arch(arch: str) -> str:
  """The backbone registry name of TESKD model ``arch``."""
  try:
    return resnet_kuangliu.BACKBONE_OF[arch]
  except KeyError:
    raise errors.ConfigError(
        f"{arch!r} is not a TESKD model; choose one of "
        f"{', '.join(resnet_kuangliu.BACKBONE_OF)}") from None


def export_backbone(variables: dict[str, Any], arch: str) -> dict[str, Any]:
  """The variables of the backbone of TESKD model ``arch``: the heads'
  sub-trees dropped, the rest unchanged (the backbone's names are the same
  in both models)."""
  backbone = models.create(backbone_arch(arch))
  shapes = jax.eval_shape(lambda: backbone.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  return {col: {name: variables[col][name] for name in shapes[col]}
          for col in ("params", "batch_stats")}


def deployed_model(variables: dict[str, Any], arch: str
                   ) -> tuple[dict[str, Any], str]:
  """``Method.deployed_model``: a TESKD run deploys its backbone alone
  (heads dropped, names unchanged), so the stage's ``best_model/`` and
  ``final_model/`` are ``cifar_resnet18`` / ``cifar_resnet34`` artifacts that
  any method can use as its teacher."""
  return export_backbone(variables, arch), backbone_arch(arch)


METHOD = Method(
    "teskd", "TESKD: a backbone taught by its own hierarchical branches "
    "(Li 2021)", objective, features=True, defaults=TESKD_DEFAULTS,
    setting_rules={"detach_kd_target": BOOL},
    student_archs=tuple(resnet_kuangliu.BACKBONE_OF),
    eval_logits=eval_logits, deployed_model=deployed_model)
