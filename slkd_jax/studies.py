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

Not yet: the driver (per-run metrics, summaries and best checkpoints under
``workdir/runs/<r>/``) and methods whose step draws random numbers from the
run's seed (CRD's negatives), which a study refuses for now.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from slkd_jax import errors, parallel, train_step
from slkd_jax.methods import HParams
from slkd_jax.stage import Stage
from slkd_jax.state import DistillState, ModelState, check_inputs, init_trainable

RunsStep = Callable[..., tuple[DistillState, jax.Array, dict]]


def stack(trees: Sequence) -> object:
  """Pytrees of equal structure → one pytree with a leading run axis."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def run_slice(tree, r: int):
  """Run ``r`` of a pytree with a leading run axis."""
  return jax.tree.map(lambda leaf: leaf[r], tree)


def _check_stage(stage: Stage) -> None:
  if stage.method.init_buffers is not None:
    raise errors.ConfigError(
        f"method {stage.method.name!r} draws per-step random numbers from "
        f"the run's seed (its memory's negatives); studies of it are not "
        f"supported yet: train its runs separately")


def create_runs_state(stage: Stage, mesh, seeds: Sequence[int],
                      teacher: ModelState | None = None) -> DistillState:
  """R fresh states (run ``r`` initialised as a single run with seed
  ``seeds[r]`` would be), stacked on a leading axis and replicated; the
  teacher is attached once, without a run axis."""
  _check_stage(stage)
  check_inputs(stage, teacher, None)
  keys = jnp.stack([jax.random.key(int(s)) for s in seeds])
  replicated = parallel.replicated(mesh)
  states = jax.jit(jax.vmap(lambda root: init_trainable(stage, root)),
                   out_shardings=replicated)(keys)
  if stage.method.uses_teacher:
    states = states.replace(teacher=jax.device_put(teacher, replicated))
  return states


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves))


def build_runs_step(stage: Stage, impl: str) -> RunsStep:
  """The pure step of R runs: ``step(states, alive, teacher, batch, hps) ->
  (states, alive, metrics)`` with every output on the run axis.

  ``alive`` ``[R]`` bool: runs that have not diverged. A run that is not
  alive, or whose new loss or parameters are not finite, keeps its state;
  ``metrics['alive']`` is its flag after this step.
  """
  _check_stage(stage)
  single = train_step.build_train_step(stage)

  def guarded(state, alive, teacher, batch, hp):
    new, metrics = single(state, teacher, batch, hp)
    keep = alive & jnp.isfinite(metrics["loss"]) & _all_finite(
        (new.student, new.slts, new.modules))
    new = jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, state)
    return new, keep, {**metrics, "alive": keep}

  if impl == "vmap":
    return jax.vmap(guarded, in_axes=(0, 0, None, None, 0))
  if impl != "unrolled":
    raise ValueError(f"runs impl must be 'vmap' or 'unrolled', got {impl!r}")

  def unrolled(states, alive, teacher, batch, hps):
    outs = [guarded(run_slice(states, r), alive[r], teacher, batch,
                    run_slice(hps, r)) for r in range(alive.shape[0])]
    return stack(outs)

  return unrolled


def _jit_runs_step(stage: Stage, mesh, impl: str):
  replicated = parallel.replicated(mesh)
  return jax.jit(
      build_runs_step(stage, impl),
      in_shardings=(replicated, replicated, replicated,
                    parallel.batch_sharding(mesh), replicated),
      out_shardings=(replicated, replicated, replicated),
      donate_argnums=(0,))


def make_runs_step(stage: Stage, mesh, impl: str
                   ) -> Callable[[DistillState, jax.Array, dict, HParams],
                                 tuple[DistillState, jax.Array, dict]]:
  """The jitted, sharded study step ``step(states, alive, batch, hps)``:
  batch sharded on ``data``, states and metrics replicated, the trainable
  states donated, the teacher passed once (not donated)."""
  jitted = _jit_runs_step(stage, mesh, impl)

  def step(states: DistillState, alive, batch, hps: HParams):
    new, alive, metrics = jitted(states.replace(teacher=None), alive,
                                 states.teacher, batch, hps)
    return new.replace(teacher=states.teacher), alive, metrics

  return step


def memory_estimate(stage: Stage, mesh, impl: str, states: DistillState,
                    batch, hps: HParams) -> dict[str, int]:
  """Device memory of the study step from its compiled program's memory
  analysis (XLA's own accounting, per device): ``total_bytes`` (arguments +
  outputs + temporaries − donated aliases) and ``per_run_bytes`` (the total
  less the shared teacher and batch, over R runs).

  Raises:
    ConfigError: the total exceeds the device's memory limit, where the
      backend reports one (GPUs): fewer runs fit; nothing was trained.
  """
  runs = int(jax.tree.leaves(states.student.params)[0].shape[0])
  alive = jnp.ones(runs, bool)
  stats = _jit_runs_step(stage, mesh, impl).lower(
      states.replace(teacher=None), alive, states.teacher, batch,
      hps).compile().memory_analysis()
  total = (stats.argument_size_in_bytes + stats.output_size_in_bytes
           + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
  shared = sum(x.nbytes for x in jax.tree.leaves((states.teacher, batch)))
  estimate = {"total_bytes": int(total),
              "per_run_bytes": int(max(total - shared, 0) // runs)}
  limit = (mesh.devices.flat[0].memory_stats() or {}).get("bytes_limit")
  if limit and total > limit:
    raise errors.ConfigError(
        f"{runs} runs need about {total / 2**30:.1f} GiB per device "
        f"({estimate['per_run_bytes'] / 2**30:.2f} GiB per run) but the "
        f"device has {limit / 2**30:.1f} GiB: use at most "
        f"{max(int((limit - shared) // max(estimate['per_run_bytes'], 1)), 0)}"
        f" runs")
  return estimate
