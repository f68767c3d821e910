"""SLKD (Liu, Li and Cheng, arXiv:2304.11923) and its ablations: the
student learns from the frozen teacher and from the logit-level fusion of K
self-learning teachers (SL-Ts) that train alongside it (docs/method.md §2).

=================  =======  =====  ==========================================
method             teacher  SL-Ts  student objective
=================  =======  =====  ==========================================
``slkd``           yes      K      w_ce·CE + w_kd·KD_T(z_s,z_t)
                                   + w_p·(w_ce_cs·CE + w_kd_cs·KD_T(z_s,z_c))
``slkd_t_only``    yes      no     = ``kd`` (paper Table 7: teacher only)
``slkd_slt_only``  yes      K      ``slkd`` with w_kd = 0 for the student
``slkd_seq``       yes      K      SLKD*: SL-Ts step first, then the student
                                   learns from the *updated* SL-Ts' fusion
=================  =======  =====  ==========================================

The SL-Ts learn Σ_j w_ce·CE + w_kd·KD from labels and teacher
(:func:`slt_objective`). ``slkd`` and ``slkd_slt_only`` take one gradient
of the summed loss (the shared step); ``slkd_seq`` has its own step
(:func:`build_sequential_step`). The losses are in :mod:`slkd_jax.losses`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from slkd_jax import losses
from slkd_jax import step_parts as parts
from slkd_jax.methods.base import (Context, HParams, Logits, Loss, Method,
                                   check, is_int, is_number)
from slkd_jax.methods.logit import kd_objective
from slkd_jax.state import ModelState


def student_objective(logits: Logits, batch, hp: HParams, ctx: Context, *,
                      teacher_term: bool = True) -> Loss:
  """L_student of docs/method.md §2 (without the teacher's KD term for
  ``teacher_term=False``); the fused target is detached as
  ``ctx.detach_fused_target`` says."""
  return Loss(*losses.slkd_student_loss(
      logits.student, logits.teacher, logits.fused, batch["label"],
      temperature=hp.temperature, ce_weight=hp.ce_weight,
      kd_weight=hp.kd_weight if teacher_term else 0.0,
      fused_weight=hp.fused_weight, fused_ce_weight=hp.fused_ce_weight,
      fused_kd_weight=hp.fused_kd_weight,
      detach_fused_target=ctx.detach_fused_target, mask=batch["mask"]))


def slt_only_objective(logits: Logits, batch, hp: HParams, ctx: Context
                       ) -> Loss:
  """``slkd_slt_only``: L_student with w_kd = 0."""
  return student_objective(logits, batch, hp, ctx, teacher_term=False)


def slt_objective(slt_logits, teacher_logits, batch, hp: HParams) -> Loss:
  """Σ_j L_SLT_j, with the SL-Ts' weights (tied to the student's by
  default, :meth:`slkd_jax.stage.Stage.hparams`)."""
  return Loss(*losses.slt_loss(
      slt_logits, teacher_logits, batch["label"], temperature=hp.temperature,
      ce_weight=hp.slt_ce_weight, kd_weight=hp.slt_kd_weight,
      mask=batch["mask"]))


def _updated_slts(stage, slts, z_t, batch, hp):
  """SLKD* part 1: the SL-Ts take an SGD step on Σ_j L_SLT_j alone.
  Returns ``(slts, loss, terms)``."""

  def loss_fn(slt_params):
    z_k, stats = parts.apply_ensemble(
        stage.nets.slt, ModelState(slt_params, slts.batch_stats),
        batch["image"], train=True, mask=batch["mask"], impl=stage.ensemble)
    total, terms, _ = stage.method.slt_objective(z_k, z_t, batch, hp)
    return total, (terms, stats)

  (total, (terms, stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(slts.params)
  slts = parts.sgd_update(slts, grads, stats, stage.tx, hp.learning_rate)
  return slts, total, terms


def build_sequential_step(stage) -> Callable:
  """SLKD*'s step (``build_step`` of ``slkd_seq``): update the SL-Ts on
  L_SLT, then the student on the fusion of the *updated* SL-Ts (forward on
  the same batch in train mode, their running statistics not updated a
  second time, gradient stopped)."""
  method, nets = stage.method, stage.nets

  def step(state, teacher, batch, hp: HParams):
    images, labels, mask = batch["image"], batch["label"], batch["mask"]
    z_t = parts.teacher_forward(method, nets.teacher, teacher, images, mask)
    slts, slt_total, slt_terms = _updated_slts(stage, state.slts, z_t, batch,
                                               hp)
    z_k, _ = parts.apply_ensemble(nets.slt, slts, images, train=True,
                                  mask=mask, impl=stage.ensemble)
    z_k = jax.lax.stop_gradient(z_k)
    fused = losses.fuse_logits(z_k, hp.fusion_weights)
    ctx = Context(settings=stage.settings, teacher=teacher, networks=nets,
                  detach_fused_target=True)

    def student_loss_fn(student_params):
      z_s, stats = parts.apply_train(nets.student, student_params,
                                     state.student.batch_stats, images, mask)
      logits = Logits(z_s, z_t, z_k, fused)
      loss, terms, _ = method.objective(logits, batch, hp, ctx)
      return loss, (logits, terms, stats)

    (student_total, (logits, terms, stats)), grads = jax.value_and_grad(
        student_loss_fn, has_aux=True)(state.student.params)
    student = parts.sgd_update(state.student, grads, stats, stage.tx,
                               hp.learning_rate)
    metrics = {"loss": student_total + slt_total, **terms,
               "student/loss": student_total, "slt/loss": slt_total,
               **slt_terms, **parts.batch_metrics(logits, labels, mask, hp)}
    return state.replace(step=state.step + 1, student=student,
                         slts=slts), metrics

  return step


# ---------------------------------------------------------------------------
# The SL-Ts' configuration (config.slkd).


def num_slts(config: Any) -> int:
  """K, the number of SL-Ts (``config.slkd.num_slts``)."""
  return config.slkd.num_slts


def fusion_weights(config: Any) -> tuple[float, ...]:
  """``config.slkd.fusion_weights``, or uniform 1/K."""
  weights = config.slkd.fusion_weights
  if weights is not None:
    return tuple(float(w) for w in weights)
  k = num_slts(config)
  return (1.0 / k,) * k


def check_config(config: Any) -> None:
  """``config.slkd``: K ≥ 1, the ensemble's implementation and K fusion
  weights summing to 1."""
  k = config.slkd.num_slts
  check(is_int(k, 1), "slkd.num_slts", k, "an int >= 1")
  check(config.slkd.ensemble in parts.ENSEMBLES, "slkd.ensemble",
        config.slkd.ensemble, f"one of {', '.join(parts.ENSEMBLES)}")
  weights = config.slkd.fusion_weights
  if weights is not None:
    check(len(weights) == k and all(is_number(w) and w >= 0 for w in weights)
          and abs(sum(weights) - 1.0) < 1e-6, "slkd.fusion_weights",
          weights, f"None (uniform 1/K) or {k} non-negative weights, one per "
          "SL-T, summing to 1")


def _with_slts(name: str, description: str, objective, **kwargs) -> Method:
  """A method of the family that trains K SL-Ts."""
  return Method(name, description, objective, uses_teacher=True,
                uses_slts=True, slt_objective=slt_objective,
                num_stacked=num_slts, fusion_weights=fusion_weights,
                check_config=check_config, **kwargs)


METHODS = (
    _with_slts("slkd", "SLKD: teacher + K fused self-learning teachers",
               student_objective),
    Method("slkd_t_only", "ablation: the student learns from the teacher "
           "only (= kd)", kd_objective, uses_teacher=True),
    _with_slts("slkd_slt_only", "ablation: the student learns from CE and the "
               "fused SL-Ts only", slt_only_objective),
    _with_slts("slkd_seq", "SLKD*: SL-Ts step first, the student learns from "
               "the updated SL-Ts", student_objective,
               build_step=build_sequential_step),
)
