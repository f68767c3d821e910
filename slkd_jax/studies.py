"""Studies: R runs of one stage trained in one compiled step.

The R runs share the stage (method, networks, recipe) and differ in their
initialisation key (their seed) and in any :class:`~slkd_jax.methods.HParams`
value (learning rate, temperature, loss and fusion weights, DKD's β, ...).
Their trainable states are stacked on a leading *run axis*; the batch, its
order and augmentation, and the frozen teacher are shared (that is what lets
the teacher's forward pass run once for all runs). The step is the stage's
own pure step, ``jax.vmap``-ed over the run axis or unrolled over it (the
same switch as the SL-Ts: vmap turns convolutions into grouped ones, slow on
XLA:CPU); both compute the same numbers as R separate runs with the same
seeds and hyper-parameters (``tests/test_studies.py``).

A run whose loss or parameters become NaN/Inf is frozen: from that step on
its state no longer changes (the step returns it unchanged) and ``alive``
marks it, so one diverging run never ends the others.

Runs share the data order and augmentation unless the study asks for one
order per run (``shared_data=False``: the batch then has a run axis too and
the teacher runs once per run). The driver (per-run metrics, summaries and
best checkpoints under ``workdir/runs/<r>/``) is :mod:`slkd_jax.fit`, which
trains a single run as a study of one.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from slkd_jax import errors, parallel, step_cache, train_step
from slkd_jax.methods import HParams
from slkd_jax.stage import Stage
from slkd_jax.state import DistillState, ModelState, init_trainable

RunsStep = Callable[..., tuple[DistillState, jax.Array, dict]]


def stack(trees: Sequence) -> object:
  """Pytrees of equal structure → one pytree with a leading run axis."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def run_slice(tree, r: int):
  """Run ``r`` of a pytree with a leading run axis."""
  return jax.tree.map(lambda leaf: leaf[r], tree)


def all_alive(runs: int, mesh) -> jax.Array:
  """Every run's alive flag set, placed as the study step returns the flags
  (replicated on the mesh), so the step's second call does not trace and
  compile it again."""
  return jax.device_put(jnp.ones(runs, bool), parallel.replicated(mesh))


@jax.jit
def take_run(states, r):
  """:func:`run_slice` of device-resident states as one compiled program
  for every ``r``: indexing leaf by leaf dispatches (and first compiles) one
  op per leaf, ~0.1 s per state on 8 CPU devices."""
  return run_slice(states, r)


def create_runs_state(stage: Stage, mesh, seeds: Sequence[int],
                      train_labels=None) -> DistillState:
  """R fresh trainable states (run ``r`` initialised as a single run with
  seed ``seeds[r]`` would be), stacked on a leading axis and replicated.
  The frozen teacher is never part of them: the steps take it as an
  argument (``train_labels``: as :func:`slkd_jax.state.create_state`)."""
  keys = jnp.stack([jax.random.key(int(s)) for s in seeds])
  return init_trainable(stage, keys, mesh, train_labels)


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves))


def _over_runs(fn, impl: str, axes: tuple):
  """``fn`` mapped over the run axis of the arguments whose ``axes`` entry
  is 0 (None: shared), vmapped or unrolled; outputs stacked on the run
  axis."""
  if impl == "vmap":
    return jax.vmap(fn, in_axes=axes)
  if impl != "unrolled":
    raise ValueError(f"runs impl must be 'vmap' or 'unrolled', got {impl!r}")

  def unrolled(*args):
    runs = next(a for a, axis in zip(args, axes) if axis == 0)
    count = jax.tree.leaves(runs)[0].shape[0]
    return stack([fn(*(arg if axis is None else run_slice(arg, r)
                       for arg, axis in zip(args, axes)))
                  for r in range(count)])

  return unrolled


def build_runs_step(stage: Stage, impl: str, shared_batch: bool = True,
                    freeze: bool = True) -> RunsStep:
  """The pure step of R runs: ``step(states, alive, teacher, batch, hps) ->
  (states, alive, metrics)`` with every output on the run axis (the batch
  too unless ``shared_batch``).

  ``alive`` ``[R]`` bool: runs that have not diverged. With ``freeze`` (a
  study), a run that is not alive, or whose new loss or parameters are not
  finite, keeps its state. Without it (a single run, which stops at its
  first non-finite loss), a run is alive while its loss is finite and the
  step is exactly the single run's (no select, no extra reductions: the
  same numbers on any number of CPU threads). ``metrics['alive']`` is the
  flag after this step (1 or 0).
  """
  single = train_step.build_train_step(stage)

  def guarded(state, alive, teacher, batch, hp):
    new, metrics = single(state, teacher, batch, hp)
    keep = alive & jnp.isfinite(metrics["loss"])
    if freeze:
      keep = keep & _all_finite((new.student, new.slts, new.modules))
      # One conditional, not a select per leaf: XLA fuses the whole
      # finiteness test (one term per leaf) into every leaf's select, which
      # made an unrolled study of R = 3 compile 3x as long. Same numbers;
      # under vmap it becomes those selects.
      new = jax.lax.cond(keep, lambda: new, lambda: state)
    # int: the driver adds metrics over steps (bools would saturate).
    return new, keep, {**metrics, "alive": keep.astype(jnp.int32)}

  return _over_runs(guarded, impl, (0, 0, None, None if shared_batch else 0,
                                    0))


def build_runs_eval_step(stage: Stage, impl: str):
  """The pure eval step of R runs: ``(states, teacher, batch, hps) ->``
  the sums of :func:`slkd_jax.train_step.build_eval_step` with a leading
  run axis (the batch is shared)."""
  single = train_step.build_eval_step(stage)
  return _over_runs(
      lambda state, teacher, batch, hp: single(
          state.replace(teacher=teacher), batch, hp),
      impl, (0, None, None, 0))


def batch_sharding(mesh, shared_batch: bool):
  """A study's batch sharding: examples on ``data`` (after the run axis
  when each run has its own batch)."""
  if shared_batch:
    return parallel.batch_sharding(mesh)
  return NamedSharding(mesh, P(None, parallel.DATA_AXIS))


@step_cache.per_program
def _jit_runs_step(stage: Stage, mesh, impl: str, shared_batch: bool = True,
                   freeze: bool = True):
  replicated = parallel.replicated(mesh)
  return jax.jit(
      build_runs_step(stage, impl, shared_batch, freeze),
      in_shardings=(replicated, replicated, replicated,
                    batch_sharding(mesh, shared_batch), replicated),
      out_shardings=(replicated, replicated, replicated),
      donate_argnums=(0,))


def make_runs_step(stage: Stage, mesh, impl: str, shared_batch: bool = True,
                   freeze: bool = True) -> RunsStep:
  """The jitted, sharded study step ``step(states, alive, teacher, batch,
  hps)``: batch sharded on ``data``, the rest replicated, the trainable
  states donated; the frozen teacher (never donated, never checkpointed)
  is an argument of its own."""
  return _jit_runs_step(stage, mesh, impl, shared_batch, freeze)


def compile_runs_step(stage: Stage, mesh, impl: str, states: DistillState,
                      teacher: ModelState | None, batch, hps: HParams,
                      shared_batch: bool = True, freeze: bool = True):
  """:func:`make_runs_step` compiled ahead of the first step for these
  argument shapes: ``(step, estimate)``, the estimate the device memory of
  the program from its memory analysis (XLA's own accounting, per device):
  ``total_bytes`` (arguments + outputs + temporaries − donated aliases) and
  ``per_run_bytes`` (the total less the shared teacher and batch, over R
  runs). ``hps`` must be replicated (``jax.device_put``).

  Raises:
    ConfigError: the total exceeds the device's memory limit, where the
      backend reports one (GPUs): fewer runs fit; nothing was trained.
  """
  runs = int(jax.tree.leaves(states.student.params)[0].shape[0])
  alive = all_alive(runs, mesh)
  compiled = _jit_runs_step(stage, mesh, impl, shared_batch, freeze).lower(
      states, alive, teacher, batch, hps).compile()
  stats = compiled.memory_analysis()
  total = (stats.argument_size_in_bytes + stats.output_size_in_bytes
           + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
  shared = sum(x.nbytes for x in jax.tree.leaves((teacher, batch)))
  estimate = {"total_bytes": int(total),
              "per_run_bytes": int(max(total - shared, 0) // runs)}
  local = next(d for d in mesh.devices.flat
               if d.process_index == jax.process_index())
  limit = (local.memory_stats() or {}).get("bytes_limit")
  if limit and total > limit:
    raise errors.ConfigError(
        f"{runs} runs need about {total / 2**30:.1f} GiB per device "
        f"({estimate['per_run_bytes'] / 2**30:.2f} GiB per run) but the "
        f"device has {limit / 2**30:.1f} GiB: use at most "
        f"{max(int((limit - shared) // max(estimate['per_run_bytes'], 1)), 0)}"
        f" runs (fewer study.seeds)")
  return compiled, estimate


@step_cache.per_program
def make_runs_eval_step(stage: Stage, mesh, impl: str):
  """The jitted, sharded eval step of R runs: ``(states, teacher, batch,
  hps) ->`` per-run sums (see :func:`build_runs_eval_step`)."""
  replicated = parallel.replicated(mesh)
  return jax.jit(build_runs_eval_step(stage, impl),
                 in_shardings=(replicated, replicated,
                               parallel.batch_sharding(mesh), replicated),
                 out_shardings=replicated)
