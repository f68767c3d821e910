"""The pieces every train step is made of: forwards, the SGD update, bound
modules, the step's key and the batch metrics.

The shared step (:mod:`slkd_jax.train_step`) and the methods' own steps
(SLKD*'s sequential update, DML's peers, in :mod:`slkd_jax.methods`) are
built from these, so this module sits below both and imports neither.

The K stacked networks (SL-Ts, DML's peers 1..K−1) are applied either with
``jax.vmap`` over their stacked state or by an unrolled loop over the leading
axis (``config.slkd.ensemble``); both compute the same function. vmap turns
every conv into a grouped conv with batched kernels, which XLA:CPU runs ~8×
slower than K dense convs (measured, docs/notes.md), hence the unrolled
default; ``benchmarks/`` measures GPUs.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from slkd_jax import losses, optim
from slkd_jax.models import Outputs
from slkd_jax.state import STEP_RNG_TAG, ModelState, TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

#: How stacked networks are applied (``config.slkd.ensemble``).
ENSEMBLES = ("unrolled", "vmap")


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


def split_outputs(out) -> tuple[jax.Array | None, Outputs | None]:
  """``(logits, Outputs or None)`` of a forward with or without features
  (``(None, None)`` for no forward)."""
  if isinstance(out, Outputs):
    return out.logits, out
  return out, None


def teacher_forward(method, teacher_model: nn.Module | None,
                    teacher: ModelState | None, images, mask):
  """The frozen teacher's output on ``images`` (gradient stopped), or None
  without a teacher network.

  Eval mode, unless ``method.teacher_train_mode`` (OFD's reference puts the
  teacher in train mode with the rest: batch statistics, its updated running
  statistics discarded); with ``method.features`` an
  :class:`~slkd_jax.models.Outputs`.
  """
  if teacher_model is None:
    return None
  if method.teacher_train_mode:
    out, _ = apply_train(teacher_model, teacher.params, teacher.batch_stats,
                         images, mask, method.features)
  else:
    out = teacher_model.apply(teacher.variables, images, train=False,
                              features=method.features)
  return jax.lax.stop_gradient(out)


def bind_modules(modules: dict[str, nn.Module],
                 states: dict[str, TrainState] | None, params,
                 new_stats: dict) -> dict[str, Any]:
  """The method's modules as callables on their current ``params`` (for the
  objective); each call records the module's updated BatchNorm statistics
  in ``new_stats`` (returned through the loss's aux, never read from
  outside the trace)."""
  bound = {}
  for name, module in modules.items():
    def call(*args, _name=name, _module=module, **kwargs):
      variables = {"params": params[_name],
                   "batch_stats": states[_name].batch_stats}
      out, updates = _module.apply(variables, *args, mutable=["batch_stats"],
                                   **kwargs)
      new_stats[_name] = updates.get("batch_stats", variables["batch_stats"])
      return out
    bound[name] = call
  return bound


def sgd_update(state: TrainState, grads, batch_stats, tx, lr) -> TrainState:
  """The reference SGD step of one trained network (or stacked ones)."""
  buffer, opt_state = tx.update(grads, state.opt_state, state.params)
  return state.replace(params=optim.apply_sgd(state.params, buffer, lr),
                       batch_stats=batch_stats, opt_state=opt_state,
                       step=state.step + 1)


def step_rng(hp, step: jax.Array) -> jax.Array:
  """The key of this step's randomness (CRD's negatives): from the run's
  seed ``hp.seed`` and the global step, so exact on resume."""
  return jax.random.fold_in(jax.random.fold_in(
      jax.random.key(hp.seed), STEP_RNG_TAG), step)


def batch_metrics(logits, labels, mask, hp) -> Metrics:
  """Batch accuracies and the paper's Figure 2 quantities (KL at T = 1) of a
  :class:`~slkd_jax.methods.Logits`, keyed ``<network>/<quantity>`` as the
  eval metrics are."""
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
