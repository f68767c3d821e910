"""The SLKD training and evaluation steps: pure functions, one ``jax.jit`` each.

One train step runs the frozen teacher (eval mode, no gradient), the K
stacked SL-Ts and the student (train mode) on the same batch, takes **one**
``value_and_grad`` of the summed loss over the student's and the SL-Ts'
parameters, and applies the reference SGD to both. The batch is sharded on
the mesh axis ``data`` and the state is replicated, so XLA turns the batch
reductions (losses, BatchNorm statistics) into all-reduces: the numbers do not
depend on the number of devices or processes.

The K SL-Ts are applied either with ``jax.vmap`` over their stacked state or
by an unrolled loop over the leading axis (``config.slkd.ensemble``); both
compute the same function. vmap turns every conv into a grouped conv with
batched kernels, which XLA:CPU runs ~8× slower than K dense convs (measured,
docs/notes.md), hence the unrolled default; ``benchmarks/`` measures GPUs.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from slkd_jax import losses, methods, optim, parallel
from slkd_jax.methods import HParams, Logits
from slkd_jax.models import Outputs
from slkd_jax.stage import Networks, Stage
from slkd_jax.state import STEP_RNG_TAG, DistillState, ModelState, TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def apply_ensemble(model: nn.Module, stacked: ModelState, images: jax.Array,
                   *, train: bool, mask: jax.Array | None, impl: str
                   ) -> tuple[jax.Array, Any]:
  """Apply K stacked networks to the same images.

  Args:
    model: the shared architecture.
    stacked: a state whose leaves have a leading axis K.
    images: ``[B, H, W, C]``.
    train: batch statistics (and updated running statistics) if true.
    mask: ``[B]`` real-example mask for BatchNorm.
    impl: ``'vmap'`` or ``'unrolled'`` (same numbers, different kernels).

  Returns:
    ``(logits [K, B, C], new batch_stats stacked [K, ...])``; the statistics
    are the input ones in eval mode.
  """

  def one(params, batch_stats):
    variables = {"params": params, "batch_stats": batch_stats}
    if not train:
      return model.apply(variables, images, train=False), batch_stats
    logits, updates = model.apply(variables, images, train=True, mask=mask,
                                  mutable=["batch_stats"])
    return logits, updates["batch_stats"]

  if impl == "vmap":
    return jax.vmap(one)(stacked.params, stacked.batch_stats)
  if impl != "unrolled":
    raise ValueError(f"ensemble impl must be 'vmap' or 'unrolled', got {impl!r}")
  k = jax.tree.leaves(stacked.params)[0].shape[0]
  outs = [one(*jax.tree.map(lambda leaf: leaf[i],
                            (stacked.params, stacked.batch_stats)))
          for i in range(k)]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def apply_train(model: nn.Module, params, batch_stats, images, mask,
                features: bool = False):
  """A train-mode forward: ``(output, new batch_stats)`` (BatchNorm on the
  real examples of the global batch)."""
  out, updates = model.apply({"params": params, "batch_stats": batch_stats},
                             images, train=True, mask=mask, features=features,
                             mutable=["batch_stats"])
  return out, updates["batch_stats"]


def _split(out):
  """``(logits, Outputs or None)`` of a forward with or without features."""
  if isinstance(out, Outputs):
    return out.logits, out
  return out, None


def _bind_modules(nets: Networks, states: dict[str, TrainState] | None,
                  params, new_stats: dict):
  """The method's modules as callables on their current ``params`` (for the
  objective); each call records the module's updated BatchNorm statistics
  in ``new_stats`` (returned through the loss's aux, never read from
  outside the trace)."""
  bound = {}
  for name, module in nets.modules.items():
    def call(*args, _name=name, _module=module, **kwargs):
      variables = {"params": params[_name],
                   "batch_stats": states[_name].batch_stats}
      out, updates = _module.apply(variables, *args, mutable=["batch_stats"],
                                   **kwargs)
      new_stats[_name] = updates.get("batch_stats", variables["batch_stats"])
      return out
    bound[name] = call
  return bound


def _student_objective(method: methods.Method, state: DistillState, logits,
                       batch, hp, **kwargs):
  """``(loss, terms, buffers)`` of ``method``'s student objective; methods
  with buffers also see them, the batch (dataset ``index``) and a key of
  this step (from the run's seed ``hp.seed`` and the global step: exact on
  resume)."""
  labels, mask = batch["label"], batch["mask"]
  if method.init_buffers is None:
    return (*method.student_objective(logits, labels, mask, hp, **kwargs),
            None)
  rng = jax.random.fold_in(jax.random.fold_in(
      jax.random.key(hp.seed), STEP_RNG_TAG), state.step)
  return method.student_objective(logits, labels, mask, hp,
                                  buffers=state.buffers, batch=batch, rng=rng,
                                  **kwargs)


def sgd_update(state: TrainState, grads, batch_stats, tx, lr) -> TrainState:
  """The reference SGD step of one trained network (or stacked ones)."""
  buffer, opt_state = tx.update(grads, state.opt_state, state.params)
  return state.replace(params=optim.apply_sgd(state.params, buffer, lr),
                       batch_stats=batch_stats, opt_state=opt_state,
                       step=state.step + 1)


def _batch_metrics(logits: Logits, labels, mask, hp: HParams) -> Metrics:
  """Batch accuracies and the paper's Figure 2 quantities (KL at T = 1),
  keyed ``<network>/<quantity>`` as the eval metrics are."""
  m = {"student/acc": losses.accuracy(logits.student, labels, mask)}
  if logits.teacher is not None:
    m["teacher/acc"] = losses.accuracy(logits.teacher, labels, mask)
    m["student/kl_teacher"] = losses.kl_divergence(logits.student,
                                                   logits.teacher, 1.0, mask)
  if logits.slts is not None:
    m["slt/acc"] = jax.vmap(losses.accuracy, (0, None, None))(
        logits.slts, labels, mask)
    m["slt_fused/acc"] = losses.accuracy(logits.fused, labels, mask)
    m["student/kl_fused"] = losses.kl_divergence(logits.student, logits.fused,
                                                 1.0, mask)
  m["learning_rate"] = hp.learning_rate
  return m


def build_train_step(stage: Stage
                     ) -> Callable[[DistillState, ModelState | None, Batch,
                                    HParams], tuple[DistillState, Metrics]]:
  """The pure (un-jitted) train step of a stage's method.

  ``step(state_without_teacher, teacher, batch, hp) -> (state, metrics)``;
  the teacher is a separate argument so the jitted step can donate the
  trainable state but not the frozen teacher.
  """
  method, nets, tx = stage.method, stage.nets, stage.tx
  detach, impl, settings = (stage.detach_fused_target, stage.ensemble,
                            stage.settings)
  if method.build_step is not None:
    return method.build_step(stage)

  # OFD's reference puts the teacher in train mode with the rest (batch
  # statistics; its updated running statistics are never read): discarded.
  teacher_train = (method.feature is not None
                   and method.feature.teacher_train_mode)

  def teacher_outputs(teacher: ModelState | None, images, mask):
    if nets.teacher is None:
      return None
    if teacher_train:
      out, _ = apply_train(nets.teacher, teacher.params, teacher.batch_stats,
                           images, mask, method.features)
    else:
      out = nets.teacher.apply(teacher.variables, images, train=False,
                               features=method.features)
    return jax.lax.stop_gradient(out)

  def joint_step(state: DistillState, teacher, batch, hp):
    images, labels, mask = batch["image"], batch["label"], batch["mask"]
    z_t, t_features = _split(teacher_outputs(teacher, images, mask))
    slts = state.slts

    def loss_fn(params):
      student_params, slt_params, module_params = params
      out, student_stats = apply_train(nets.student, student_params,
                                       state.student.batch_stats, images,
                                       mask, method.features)
      z_s, s_features = _split(out)
      z_k = fused = slt_stats = None
      if slts is not None:
        z_k, slt_stats = apply_ensemble(
            nets.slt, ModelState(slt_params, slts.batch_stats), images,
            train=True, mask=mask, impl=impl)
        fused = losses.fuse_logits(z_k, hp.fusion_weights)
      logits = Logits(z_s, z_t, z_k, fused, s_features, t_features)
      module_stats = {}
      loss, terms, buffers = _student_objective(
          method, state, logits, batch, hp,
          detach_fused_target=detach,
          settings=settings,
          modules=_bind_modules(nets, state.modules, module_params,
                                module_stats),
          teacher=teacher, networks=nets)
      if slts is not None:
        slt_total, slt_terms = losses.slt_loss(
            z_k, z_t, labels, temperature=hp.temperature,
            ce_weight=hp.slt_ce_weight, kd_weight=hp.slt_kd_weight, mask=mask)
        terms = {**terms, "student/loss": loss, "slt/loss": slt_total,
                 **slt_terms}
        loss = loss + slt_total
      logits = logits.replace(student_features=None, teacher_features=None)
      return loss, (logits, terms, student_stats, slt_stats, module_stats,
                    buffers)

    params = (state.student.params, None if slts is None else slts.params,
              None if state.modules is None else
              {k: m.params for k, m in state.modules.items()})
    (loss, (logits, terms, student_stats, slt_stats, module_stats,
            buffers)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    student = sgd_update(state.student, grads[0], student_stats, tx,
                         hp.learning_rate)
    if slts is not None:
      slts = sgd_update(slts, grads[1], slt_stats, tx, hp.learning_rate)
    modules = state.modules
    if modules is not None:
      modules = {k: sgd_update(m, grads[2][k], module_stats[k], tx,
                               hp.learning_rate) for k, m in modules.items()}
    metrics = {"loss": loss, **terms,
               **_batch_metrics(logits, labels, mask, hp)}
    return state.replace(step=state.step + 1, student=student, slts=slts,
                         modules=modules, buffers=buffers), metrics

  def sequential_step(state: DistillState, teacher, batch, hp):
    """SLKD*: update the SL-Ts on L_SLT, then the student on the fusion of
    the *updated* SL-Ts (forward on the same batch, gradient stopped)."""
    images, labels, mask = batch["image"], batch["label"], batch["mask"]
    z_t = teacher_outputs(teacher, images, mask)
    slts = state.slts

    def slt_loss_fn(slt_params):
      z_k, stats = apply_ensemble(nets.slt, ModelState(slt_params,
                                                       slts.batch_stats),
                                  images, train=True, mask=mask, impl=impl)
      total, terms = losses.slt_loss(
          z_k, z_t, labels, temperature=hp.temperature,
          ce_weight=hp.slt_ce_weight, kd_weight=hp.slt_kd_weight, mask=mask)
      return total, (terms, stats)

    (slt_total, (slt_terms, slt_stats)), slt_grads = jax.value_and_grad(
        slt_loss_fn, has_aux=True)(slts.params)
    slts = sgd_update(slts, slt_grads, slt_stats, tx, hp.learning_rate)
    # Train-mode forward (batch statistics, as the PyTorch modules would be),
    # running statistics not updated a second time.
    z_k, _ = apply_ensemble(nets.slt, slts, images, train=True, mask=mask,
                            impl=impl)
    z_k = jax.lax.stop_gradient(z_k)
    fused = losses.fuse_logits(z_k, hp.fusion_weights)

    def student_loss_fn(student_params):
      z_s, stats = apply_train(nets.student, student_params,
                               state.student.batch_stats, images, mask)
      logits = Logits(z_s, z_t, z_k, fused)
      loss, terms = method.student_objective(
          logits, labels, mask, hp, detach_fused_target=True,
          settings=settings, modules={}, teacher=teacher, networks=nets)
      return loss, (logits, terms, stats)

    (student_total, (logits, terms, student_stats)), grads = (
        jax.value_and_grad(student_loss_fn, has_aux=True)(
            state.student.params))
    student = sgd_update(state.student, grads, student_stats, tx,
                         hp.learning_rate)
    metrics = {"loss": student_total + slt_total, **terms,
               "student/loss": student_total, "slt/loss": slt_total,
               **slt_terms, **_batch_metrics(logits, labels, mask, hp)}
    return state.replace(step=state.step + 1, student=student,
                         slts=slts), metrics

  return sequential_step if method.sequential else joint_step


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


def build_eval_step(stage: Stage
                    ) -> Callable[[DistillState, Batch, HParams], Metrics]:
  """Pure eval step ``(state, batch, hp)``: per-network *sums* over the
  batch's real examples.

  Returns ``{'count', '<net>/top1', '<net>/top5', '<net>/ce'}`` for ``student``,
  ``teacher``, ``slt_<k>`` (as one ``slt/...`` array ``[K]``) and
  ``slt_fused`` (fused with ``hp.fusion_weights``, as in training), all in
  eval mode; sums (not means) so the caller can add batches and divide once,
  counting every example exactly once.
  """
  method, nets, impl = stage.method, stage.nets, stage.ensemble

  def sums(logits, labels, weights):
    return {
        "top1": jnp.sum(weights * losses.topk_correct(logits, labels, 1)),
        "top5": jnp.sum(weights * losses.topk_correct(logits, labels, 5)),
        "ce": jnp.sum(weights * losses.per_example_cross_entropy(logits,
                                                                 labels)),
    }

  def eval_step(state: DistillState, batch: Batch, hp: HParams) -> Metrics:
    images, labels = batch["image"], batch["label"]
    weights = batch["mask"].astype(jnp.float32)
    out = {"count": jnp.sum(weights)}
    if method.eval_logits is not None:
      networks = method.eval_logits(state, nets, images)
    else:
      networks = {"student": nets.student.apply(state.student.variables,
                                                images, train=False)}
      if method.uses_teacher:
        networks["teacher"] = nets.teacher.apply(state.teacher.variables,
                                                 images, train=False)
      if method.uses_slts:
        z_k, _ = apply_ensemble(nets.slt, state.slts, images, train=False,
                                mask=None, impl=impl)
        networks["slt_fused"] = losses.fuse_logits(z_k, hp.fusion_weights)
        per_slt = jax.vmap(sums, (0, None, None))(z_k, labels, weights)
        out.update({f"slt/{k}": v for k, v in per_slt.items()})
    for name, logits in networks.items():
      out.update({f"{name}/{k}": v for k, v in
                  sums(logits, labels, weights).items()})
    return out

  return eval_step


def make_eval_step(stage: Stage, mesh
                   ) -> Callable[[DistillState, Batch, HParams], Metrics]:
  """The jitted, sharded eval step (see :func:`build_eval_step`)."""
  replicated = parallel.replicated(mesh)
  return jax.jit(build_eval_step(stage),
                 in_shardings=(replicated, parallel.batch_sharding(mesh),
                               replicated),
                 out_shardings=replicated)
