"""The logit methods: ``ce`` (a network alone), ``kd`` (Hinton) and ``dkd``
(decoupled KD, Zhao et al. 2022), as mdistiller computes them
(docs/method.md §3). The losses are in :mod:`slkd_jax.losses`.
"""

from __future__ import annotations

import jax

from slkd_jax import losses
from slkd_jax.methods.base import Context, HParams, Logits, Loss, Method


def ce_objective(logits: Logits, batch, hp: HParams, ctx: Context) -> Loss:
  """CE(z_s, y) (weight 1)."""
  ce = losses.cross_entropy(logits.student, batch["label"], batch["mask"])
  return Loss(ce, {"student/ce": ce})


def kd_objective(logits: Logits, batch, hp: HParams, ctx: Context) -> Loss:
  """w_ce·CE + w_kd·KD_T(z_s, sg(z_t))."""
  labels, mask = batch["label"], batch["mask"]
  ce = losses.cross_entropy(logits.student, labels, mask)
  kd = losses.kd_loss(logits.student, jax.lax.stop_gradient(logits.teacher),
                      hp.temperature, mask)
  return Loss(hp.ce_weight * ce + hp.kd_weight * kd,
              {"student/ce": ce, "student/kd_teacher": kd})


def dkd_objective(logits: Logits, batch, hp: HParams, ctx: Context) -> Loss:
  """w_ce·CE + min(epoch / warmup, 1)·DKD(α, β, T)."""
  labels, mask = batch["label"], batch["mask"]
  ce = losses.cross_entropy(logits.student, labels, mask)
  dkd = losses.dkd_loss(logits.student, jax.lax.stop_gradient(logits.teacher),
                        labels, hp.dkd_alpha, hp.dkd_beta, hp.temperature, mask)
  return Loss(hp.ce_weight * ce + hp.dkd_warmup_factor * dkd,
              {"student/ce": ce, "student/dkd": dkd})


METHODS = (
    Method("ce", "cross-entropy only (teacher training, student from scratch)",
           ce_objective, defaults={"ce_weight": 1.0}),
    Method("kd", "Hinton KD", kd_objective, uses_teacher=True),
    # mdistiller's DKD: CE weight 1 (α, β, warm-up: the dataset's recipe).
    Method("dkd", "decoupled KD (Zhao 2022)", dkd_objective,
           uses_teacher=True, defaults={"ce_weight": 1.0}),
)
