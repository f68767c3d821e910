"""The training and evaluation steps: pure functions, one ``jax.jit`` each.

One shared train step serves every method. It runs the frozen teacher (eval
mode, no gradient, unless the method asks for train mode), the student and
the stacked networks (SL-Ts; train mode) on the same batch, asks the method
for its loss (``Method.objective``, plus ``Method.slt_objective`` for the
SL-Ts), takes **one** ``value_and_grad`` of the sum over the student's, the
SL-Ts' and the method's modules' parameters, and applies the reference SGD
to each. A method whose update is not one gradient of a summed loss
(SLKD*'s sequential update, DML's peers) supplies its own step instead
(``Method.build_step``), built from the same pieces
(:mod:`slkd_jax.step_parts`).

The batch is sharded on the mesh axis ``data`` and the state is replicated,
so XLA turns the batch reductions (losses, BatchNorm statistics) into
all-reduces: the numbers do not depend on the number of devices or
processes.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from slkd_jax import losses, parallel, step_cache
from slkd_jax import step_parts as parts
from slkd_jax.methods import Context, HParams, Logits
from slkd_jax.stage import Stage
from slkd_jax.state import DistillState, ModelState
from slkd_jax.step_parts import (Batch, Metrics, apply_ensemble, apply_train,
                                 sgd_update)

__all__ = ["apply_ensemble", "apply_train", "sgd_update", "build_train_step",
           "make_train_step", "build_eval_step", "make_eval_step"]

Step = Callable[[DistillState, ModelState | None, Batch, HParams],
                tuple[DistillState, Metrics]]


def build_train_step(stage: Stage) -> Step:
  """The pure (un-jitted) train step of a stage's method.

  ``step(state_without_teacher, teacher, batch, hp) -> (state, metrics)``;
  the teacher is a separate argument so the jitted step can donate the
  trainable state but not the frozen teacher. The method's own step where
  it has one (``Method.build_step``), else the shared one.
  """
  if stage.method.build_step is not None:
    return stage.method.build_step(stage)
  return _shared_step(stage)


def _loss_fn(stage: Stage, state: DistillState, teacher, teacher_out, batch,
             hp: HParams):
  """The summed loss as a function of the trained parameters ``(student,
  SL-Ts, modules)``; aux: the logits (features dropped), the terms, the new
  BatchNorm statistics of each part and the method's new buffers."""
  method, nets = stage.method, stage.nets
  images, mask = batch["image"], batch["mask"]
  z_t, t_features = parts.split_outputs(teacher_out)
  slts = state.slts

  def loss_fn(params):
    student_params, slt_params, module_params = params
    out, student_stats = apply_train(nets.student, student_params,
                                     state.student.batch_stats, images, mask,
                                     method.features)
    z_s, s_features = parts.split_outputs(out)
    z_k = fused = slt_stats = None
    if slts is not None:
      z_k, slt_stats = apply_ensemble(
          nets.slt, ModelState(slt_params, slts.batch_stats), images,
          train=True, mask=mask, impl=stage.ensemble)
      fused = losses.fuse_logits(z_k, hp.fusion_weights)
    logits = Logits(z_s, z_t, z_k, fused, s_features, t_features)
    module_stats = {}
    ctx = Context(
        settings=stage.settings,
        modules=parts.bind_modules(nets.modules, state.modules, module_params,
                                   module_stats),
        teacher=jax.lax.stop_gradient(teacher), networks=nets,
        buffers=state.buffers, rng=parts.step_rng(hp, state.step),
        detach_fused_target=stage.detach_fused_target)
    loss, terms, buffers = method.objective(logits, batch, hp, ctx)
    if method.slt_objective is not None:
      slt_total, slt_terms, _ = method.slt_objective(z_k, z_t, batch, hp)
      terms = {**terms, "student/loss": loss, "slt/loss": slt_total,
               **slt_terms}
      loss = loss + slt_total
    logits = logits.replace(student_features=None, teacher_features=None)
    return loss, (logits, terms, (student_stats, slt_stats, module_stats),
                  buffers)

  return loss_fn


def _trained_params(state: DistillState):
  """``(student, SL-Ts or None, {module: params} or None)``."""
  return (state.student.params,
          None if state.slts is None else state.slts.params,
          None if state.modules is None else
          {k: m.params for k, m in state.modules.items()})


def _shared_step(stage: Stage) -> Step:
  """One gradient of the method's summed loss; every trained part takes
  the reference SGD step (see the module docstring)."""
  method, nets, tx = stage.method, stage.nets, stage.tx

  def step(state: DistillState, teacher, batch: Batch, hp: HParams):
    teacher_out = parts.teacher_forward(method, nets.teacher, teacher,
                                        batch["image"], batch["mask"])
    loss_fn = _loss_fn(stage, state, teacher, teacher_out, batch, hp)
    (loss, (logits, terms, stats, buffers)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(_trained_params(state))
    student_stats, slt_stats, module_stats = stats
    lr = hp.learning_rate
    student = sgd_update(state.student, grads[0], student_stats, tx, lr)
    slts = state.slts
    if slts is not None:
      slts = sgd_update(slts, grads[1], slt_stats, tx, lr)
    modules = state.modules
    if modules is not None:
      modules = {k: sgd_update(m, grads[2][k], module_stats[k], tx, lr)
                 for k, m in modules.items()}
    metrics = {"loss": loss, **terms, **parts.batch_metrics(
        logits, batch["label"], batch["mask"], hp)}
    return state.replace(step=state.step + 1, student=student, slts=slts,
                         modules=modules, buffers=buffers), metrics

  return step


@step_cache.per_program
def make_train_step(stage: Stage, mesh
                    ) -> Callable[[DistillState, Batch, HParams],
                                  tuple[DistillState, Metrics]]:
  """The jitted, sharded train step: ``step(state, batch, hp)``.

  The batch is sharded on ``data``; state, hyper-parameters and metrics are
  replicated. The trainable part of ``state`` is donated (its buffers are
  reused for the new state: do not use the old state afterwards); the frozen
  teacher is passed separately and not donated. Metrics are global means
  over the real (``mask``) examples.
  """
  replicated = parallel.replicated(mesh)
  jitted = jax.jit(
      build_train_step(stage),
      in_shardings=(replicated, replicated, parallel.batch_sharding(mesh),
                    replicated),
      out_shardings=(replicated, replicated),
      donate_argnums=(0,))

  def step(state: DistillState, batch: Batch, hp: HParams):
    new_state, metrics = jitted(state.replace(teacher=None), state.teacher,
                                batch, hp)
    return new_state.replace(teacher=state.teacher), metrics

  return step


def default_eval_logits(state: DistillState, stage: Stage, images, hp
                        ) -> dict[str, jax.Array]:
  """Eval-mode logits of the student, the teacher (if the stage has one),
  each SL-T (``slt``, stacked ``[K, B, C]``) and their fusion with
  ``hp.fusion_weights`` (``slt_fused``), as in training."""
  nets = stage.nets
  out = {"student": nets.student.apply(state.student.variables, images,
                                       train=False)}
  if nets.teacher is not None:
    out["teacher"] = nets.teacher.apply(state.teacher.variables, images,
                                        train=False)
  if nets.slt is not None:
    out["slt"], _ = apply_ensemble(nets.slt, state.slts, images, train=False,
                                   mask=None, impl=stage.ensemble)
    out["slt_fused"] = losses.fuse_logits(out["slt"], hp.fusion_weights)
  return out


def _sums(logits, labels, weights) -> Metrics:
  """top-1, top-5 and CE summed over the weighted examples."""
  return {
      "top1": jnp.sum(weights * losses.topk_correct(logits, labels, 1)),
      "top5": jnp.sum(weights * losses.topk_correct(logits, labels, 5)),
      "ce": jnp.sum(weights * losses.per_example_cross_entropy(logits,
                                                               labels)),
  }


def build_eval_step(stage: Stage
                    ) -> Callable[[DistillState, Batch, HParams], Metrics]:
  """Pure eval step ``(state, batch, hp)``: per-network *sums* over the
  batch's real examples.

  Returns ``{'count', '<net>/top1', '<net>/top5', '<net>/ce'}`` for each
  network the method evaluates (``Method.eval_logits``, by default
  :func:`default_eval_logits`: ``student``, ``teacher``, ``slt`` (an array
  ``[K]`` per quantity, one per SL-T) and ``slt_fused``), all in eval mode;
  sums (not means) so the caller can add batches and divide once, counting
  every example exactly once.
  """
  predict = stage.method.eval_logits or default_eval_logits

  def eval_step(state: DistillState, batch: Batch, hp: HParams) -> Metrics:
    labels = batch["label"]
    weights = batch["mask"].astype(jnp.float32)
    out = {"count": jnp.sum(weights)}
    for name, logits in predict(state, stage, batch["image"], hp).items():
      sums = _sums if logits.ndim == 2 else jax.vmap(_sums, (0, None, None))
      out.update({f"{name}/{k}": v for k, v in
                  sums(logits, labels, weights).items()})
    return out

  return eval_step


@step_cache.per_program
def make_eval_step(stage: Stage, mesh
                   ) -> Callable[[DistillState, Batch, HParams], Metrics]:
  """The jitted, sharded eval step (see :func:`build_eval_step`)."""
  replicated = parallel.replicated(mesh)
  return jax.jit(build_eval_step(stage),
                 in_shardings=(replicated, parallel.batch_sharding(mesh),
                               replicated),
                 out_shardings=replicated)
