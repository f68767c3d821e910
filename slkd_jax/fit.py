"""The training loop of one stage: R runs in one compiled step.

Every stage is trained here, whether it is a single run (R = 1) or a study
(R runs, :mod:`slkd_jax.studies`). The runs' trainable states are stacked on
a run axis and updated by one jitted, sharded step; the frozen teacher is an
argument of that step, never part of the trainable or checkpointed state.
The loop reads top to bottom: restore, then per epoch train (log windows,
the stop agreement, the NaN rule), evaluate, checkpoint, keep the best;
then write what a finished stage leaves (:mod:`slkd_jax.stage_files`).

One NaN rule: the step freezes a run whose loss or new parameters are not
finite (its state stops changing); the loop records the exact step and the
non-finite terms, leaves the run out of the summary, and stops the stage
with :class:`NonFiniteLossError` only when every run has diverged — for a
single run, at once, naming the step, the terms and the last good
checkpoint (none is written after a non-finite loss).

On disk a single run keeps the layout it always had (``<stage>/checkpoints``
hold its own state); a study's checkpoints hold every run stacked and each
run's files live in ``runs/<r>/<stage>`` (docs/studies.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from slkd_jax import (artifact, checkpoint, evaluation, metrics, parallel,
                      preemption, stage_files, studies)
from slkd_jax import config as config_lib
from slkd_jax import data as data_lib
from slkd_jax import state as state_lib
from slkd_jax.errors import ConfigError, NonFiniteLossError
from slkd_jax.models.layers import count_params
from slkd_jax.plan import RUNS_DIR, StagePlan
from slkd_jax.preemption import Preempted
from slkd_jax.stage_files import StageResult

#: Train metrics kept in an epoch's eval record (the paper's Figure 2).
_TRAIN_KEYS_IN_RECORD = ("loss", "student/kl_teacher", "student/kl_fused")


class TrainBatches:
  """A stage's training batches: one order shared by every run, or each
  run's own (stacked on a leading run axis)."""

  def __init__(self, datasets: list, mesh):
    self.datasets = datasets
    self.shared = len(datasets) == 1  # else one per run
    first = datasets[0]
    self.steps_per_epoch, self.batch_size = (first.steps_per_epoch,
                                             first.batch_size)
    self.labels = getattr(first, "labels", None)
    self._stack = jax.jit(lambda *batches: studies.stack(batches),
                          out_shardings=studies.batch_sharding(mesh, False))

  def epoch(self, epoch: int, start_step: int = 0):
    if self.shared:
      yield from self.datasets[0].epoch(epoch, start_step)
      return
    for batches in zip(*(d.epoch(epoch, start_step) for d in self.datasets)):
      yield self._stack(*batches)


def train_batches(plan: StagePlan, mesh, run_data) -> TrainBatches:
  """The stage's training data: ``run_data`` (seeded by the run's
  ``order_seed``) wherever its order is a run's, else one dataset per
  distinct order."""
  config = plan.config
  seeds = [config_lib.order_seed(c) for c in plan.run_configs]
  if plan.shared_data:
    seeds = seeds[:1]
  by_seed = {config_lib.order_seed(config): run_data}
  for seed in seeds:  # one per order; each epoch() is its own iterator
    if seed not in by_seed:
      by_seed[seed] = data_lib.create_datasets(
          config.data, batch_size=config.batch_size,
          eval_batch_size=config.eval_batch_size, seed=seed, mesh=mesh)[0]
  return TrainBatches([by_seed[seed] for seed in seeds], mesh)


@dataclasses.dataclass
class _Loop:
  """What the epoch loop of one stage works with (built once per stage)."""
  plan: StagePlan
  mesh: Any
  data: TrainBatches
  eval_data: Any
  teacher: Any
  ckpt: checkpoint.Checkpointer
  best_ckpts: list[checkpoint.Checkpointer]
  stop: preemption.StopAgreement
  histories: list[list[dict[str, Any]]]
  diverged: list[dict[str, Any] | None]

  @property
  def runs(self) -> int:
    return self.plan.runs

  def hparams(self, epoch: int):
    """Every run's hyper-parameters of ``epoch``, stacked and replicated."""
    return jax.device_put(
        studies.stack([s.hparams(epoch) for s in self.plan.stages]),
        parallel.replicated(self.mesh))

  def saved_tree(self, states, alive):
    """What the stage's checkpoints hold: a single run's own state, or every
    run's with their alive flags."""
    if self.plan.study:
      return {"runs": states, "alive": alive}
    return studies.take_run(states, 0)

  def meta(self, epoch: int, step_in_epoch: int) -> dict[str, Any]:
    """The JSON item of the stage's checkpoints."""
    if not self.plan.study:
      return self.run_meta(0, epoch, step_in_epoch)
    return {"epoch": epoch, "step_in_epoch": step_in_epoch,
            "histories": self.histories, "diverged": self.diverged,
            "stage": self.plan.name, "method": self.plan.method,
            "config": json.loads(self.plan.config.to_json_best_effort())}

  def run_meta(self, r: int, epoch: int, step_in_epoch: int = 0):
    """Run ``r``'s checkpoint meta, as its separate run writes it."""
    return {"epoch": epoch, "step_in_epoch": step_in_epoch,
            "history": self.histories[r], "stage": self.plan.name,
            "method": self.plan.method,
            "config": json.loads(
                self.plan.run_configs[r].to_json_best_effort())}


# ---------------------------------------------------------------------------
# The stage.


def fit(plan: StagePlan, mesh, run_data, eval_data, teacher,
        stop: preemption.StopAgreement) -> dict[str, StageResult]:
  """Train ``plan`` (every run) to its last epoch, resuming if possible.

  Returns each run's result: ``{name: result}`` for a single run,
  ``{'runs/<r>/<name>': result}`` for a study.

  Raises:
    Preempted: a stop was agreed; a checkpoint was saved first.
    NonFiniteLossError: every run diverged.
    ConfigError: the stage's checkpoint belongs to a different config.
  """
  first = plan.stages[0]
  data = train_batches(plan, mesh, run_data)
  state_lib.check_inputs(first, teacher, data.labels)
  teacher = (jax.device_put(teacher, parallel.replicated(mesh))
             if first.method.uses_teacher else None)
  loop = _Loop(plan, mesh, data, eval_data, teacher,
               checkpoint.Checkpointer(os.path.join(plan.stage_dir,
                                                    "checkpoints"),
                                       plan.config.keep_checkpoints),
               [checkpoint.Checkpointer(os.path.join(d, "best"), 1)
                for d in plan.run_dirs],
               stop, [[] for _ in plan.stages], [None] * plan.runs)
  try:
    states = studies.create_runs_state(
        first, mesh, [c.seed for c in plan.run_configs], data.labels)
    if jax.process_index() == 0:
      log_parameter_counts(plan.name + (" (each run)" if plan.study else ""),
                           studies.run_slice(states, 0))
    states, alive, epoch, start_step = _restore(loop, states)
    trains = epoch < plan.config.num_epochs
    if trains:
      states = _train(loop, states, alive, epoch, start_step)
  finally:
    for ckpt in (loop.ckpt, *loop.best_ckpts):
      ckpt.close()
  _finish(loop, states, trains)
  return {(os.path.join(RUNS_DIR, str(r), plan.name) if plan.study
           else plan.name): StageResult(
               plan.name, plan.method, studies.take_run(states, r),
               loop.histories[r], teacher)
          for r in range(plan.runs)}


def log_parameter_counts(name: str, state) -> None:
  """Parameters per trained network and the method's extra modules
  (mdistiller's "extra parameters")."""
  counts = {"student": count_params(state.student.params)}
  if state.slts is not None:
    counts["SL-Ts (all)"] = count_params(state.slts.params)
  for module, module_state in (state.modules or {}).items():
    counts[f"extra: {module}"] = count_params(module_state.params)
  logging.info("stage %s parameters: %s", name,
               ", ".join(f"{k} {v:,}" for k, v in counts.items()))
  if state.buffers:
    leaves = jax.tree_util.tree_leaves_with_path(state.buffers)
    logging.info("stage %s buffers (not trained, on every device): %s; "
                 "%.1f MiB", name, ", ".join(
                     f"{jax.tree_util.keystr(path)} {tuple(x.shape)}"
                     for path, x in leaves),
                 sum(x.nbytes for _, x in leaves) / 2**20)


def restore_latest(ckpt: checkpoint.Checkpointer, name: str, stage_dir: str,
                   config, target) -> tuple[Any, dict[str, Any]] | None:
  """``(tree, meta)`` of a stage's latest readable checkpoint (restored
  into ``target``'s shapes and shardings), None when it has none.

  Raises:
    ConfigError: the checkpoint was written under a config whose meaning
      differs (architecture, batch size, recipe, ...): named in one line.
  """
  saved = ckpt.latest_meta()
  if saved is not None:  # before the state: another arch has other shapes
    _check_resume_config(name, stage_dir, config, saved["config"])
  restored = ckpt.restore_latest(target)
  if restored is not None and (saved is None
                               or restored[1]["config"] != saved["config"]):
    _check_resume_config(name, stage_dir, config, restored[1]["config"])
  return restored


def _check_resume_config(name: str, stage_dir: str, config,
                         saved: dict[str, Any]) -> None:
  conflicts, accepted = config_lib.resume_changes(saved, config)
  if conflicts:
    changes = ", ".join(f"{k}: {old!r} -> {new!r}"
                        for k, (old, new) in conflicts.items())
    raise ConfigError(
        f"stage {name!r} in {stage_dir} was started with another "
        f"config ({changes}); set these back to resume it, or use a new "
        f"--workdir")
  for key, (old, new) in accepted.items():
    logging.info("stage %s: %s changed from %r to %r since the checkpoint",
                 name, key, old, new)


def _restore(loop: _Loop, states):
  """``(states, alive, epoch, step_in_epoch)`` from the stage's latest
  checkpoint; a fresh start when there is none."""
  replicated = parallel.replicated(loop.mesh)
  alive = studies.all_alive(loop.runs, loop.mesh)
  restored = restore_latest(
      loop.ckpt, loop.plan.name, loop.plan.stage_dir, loop.plan.config,
      checkpoint.abstract_like(loop.saved_tree(states, alive), loop.mesh))
  if restored is None:
    return states, alive, 0, 0
  tree, meta = restored
  if loop.plan.study:
    states, alive = tree["runs"], tree["alive"]
    loop.histories[:] = meta["histories"]
    loop.diverged[:] = meta["diverged"]
  else:
    states = jax.jit(lambda t: studies.stack([t]),
                     out_shardings=replicated)(tree)
    loop.histories[0][:] = meta["history"]
  logging.info("stage %s: resumed at epoch %d, step %d (global step %d)",
               loop.plan.name, meta["epoch"] + 1, meta["step_in_epoch"],
               meta["epoch"] * loop.data.steps_per_epoch
               + meta["step_in_epoch"])
  return states, alive, meta["epoch"], meta["step_in_epoch"]


# ---------------------------------------------------------------------------
# The epoch loop.


class _CompiledOnFirstBatch:
  """The stage's step, compiled ahead of time for the first batch's shapes
  (every batch has them): the memory estimate comes from the compiled
  program, and a program too large for the device fails before training."""

  def __init__(self, loop: _Loop, bar):
    self._loop, self._bar, self._step = loop, bar, None

  def __call__(self, states, alive, batch, hps):
    if self._step is None:
      with self._bar.above():
        self._step = _compile(self._loop, states, batch, hps)
    return self._step(states, alive, self._loop.teacher, batch, hps)


def _compile(loop: _Loop, states, batch, hps):
  plan = loop.plan
  logging.info("stage %s: compiling the train step (%d run%s)...", plan.name,
               plan.runs, "s" if plan.runs > 1 else "")
  start = time.monotonic()
  step, estimate = studies.compile_runs_step(
      plan.stages[0], loop.mesh, plan.impl, states, loop.teacher, batch, hps,
      shared_batch=loop.data.shared, freeze=plan.study)
  how = (f"{plan.runs} runs in one program ({plan.impl} over runs, "
         f"{'shared' if loop.data.shared else 'per-run'} data order), "
         if plan.study else "")
  logging.info("stage %s: compiled in %.1f s; %sabout %.1f MiB per device%s",
               plan.name, time.monotonic() - start, how,
               estimate["total_bytes"] / 2**20,
               f", {estimate['per_run_bytes'] / 2**20:.1f} MiB per run"
               if plan.study else "")
  return step


def _train(loop: _Loop, states, alive, epoch: int, start_step: int):
  """The epoch loop from ``(epoch, start_step)`` to the stage's end."""
  plan, is_main = loop.plan, jax.process_index() == 0
  config = plan.config
  steps_per_epoch = loop.data.steps_per_epoch
  if is_main:
    _prepare_run_dirs(loop, epoch * steps_per_epoch + start_step)
  logging.info("stage %s (%s): loss settings %s", plan.name, plan.method,
               dict(config.loss))
  eval_fn = studies.make_runs_eval_step(plan.stages[0], loop.mesh, plan.impl)
  names = stage_files.display_names(plan.name)
  writers = [metrics.MetricWriter(d, enabled=is_main, network_names=names)
             for d in plan.run_dirs]
  bar = metrics.ProgressBar(
      config.num_epochs * steps_per_epoch,
      desc=plan.name + (f" ×{plan.runs}" if plan.study else ""),
      enabled=is_main, initial_step=epoch * steps_per_epoch + start_step)
  step_fn = _CompiledOnFirstBatch(loop, bar)
  try:
    while epoch < config.num_epochs:
      started = time.monotonic()
      states, alive, train_means, images = _train_epoch(
          loop, step_fn, states, alive, epoch, start_step, writers, bar)
      start_step, epoch = 0, epoch + 1
      with bar.above():
        _end_of_epoch(loop, eval_fn, states, alive, epoch, train_means,
                      writers, (time.monotonic() - started, images))
  finally:
    bar.close()
    for writer in writers:
      writer.close()
  return states


def _prepare_run_dirs(loop: _Loop, global_step: int) -> None:
  """Each run's stage directory as its separate run has it: its
  ``config.json``, and no metric records past the checkpoint."""
  for r, directory in enumerate(loop.plan.run_dirs):
    os.makedirs(directory, exist_ok=True)
    dropped = metrics.truncate_jsonl(os.path.join(directory, "metrics.jsonl"),
                                     global_step)
    if dropped:
      logging.info("stage %s: dropped %d metric records of steps after the "
                   "checkpoint (step %d) in %s", loop.plan.name, dropped,
                   global_step, directory)
    with open(os.path.join(directory, "config.json"), "w") as f:
      f.write(loop.plan.run_configs[r].to_json_best_effort(indent=2))


def _train_epoch(loop: _Loop, step_fn, states, alive, epoch: int,
                 start_step: int, writers, bar):
  """Train every run one epoch from ``start_step``: ``(states, alive, each
  run's means of the logged train metrics, images trained)``.

  Raises:
    Preempted: a stop was agreed; the stage's checkpoint was saved first.
    NonFiniteLossError: every run has diverged.
  """
  hps = loop.hparams(epoch + 1)
  steps_per_epoch = loop.data.steps_per_epoch
  global_step = epoch * steps_per_epoch + start_step
  log_every = loop.plan.config.log_every_steps
  images_per_step = loop.data.batch_size * loop.runs
  window, window_steps, images = None, 0, 0
  epoch_sums = [{} for _ in range(loop.runs)]
  epoch_steps = [0] * loop.runs
  for step_in_epoch, batch in enumerate(loop.data.epoch(epoch, start_step),
                                        start_step):
    states, alive, step_metrics = step_fn(states, alive, batch, hps)
    global_step += 1
    images += images_per_step
    window = (step_metrics if window is None
              else evaluation.add(window, step_metrics))
    window_steps += 1
    stop = loop.stop.should_stop(global_step)
    if ((step_in_epoch + 1) % log_every == 0 or stop
        or step_in_epoch + 1 == steps_per_epoch):
      written = _log_window(loop, jax.device_get(window), global_step,
                            window_steps, epoch, writers)
      for r, run_sums in written.items():
        for k, v in run_sums.items():
          epoch_sums[r][k] = epoch_sums[r].get(k, 0.0) + v
        epoch_steps[r] += window_steps
      _update_bar(loop, bar, global_step, images_per_step, written,
                  window_steps)
      window, window_steps = None, 0
    if stop:
      loop.ckpt.save(global_step, loop.saved_tree(states, alive),
                     loop.meta(epoch, step_in_epoch + 1))
      loop.ckpt.wait()
      raise Preempted(f"stage {loop.plan.name}: stopped at step "
                      f"{global_step} after saving a checkpoint; rerun the "
                      f"same command to resume")
  return states, alive, [{k: v / max(n, 1) for k, v in sums.items()}
                         for sums, n in zip(epoch_sums, epoch_steps)], images


def _update_bar(loop: _Loop, bar, global_step, images_per_step, written,
                window_steps) -> None:
  if loop.plan.study:
    bar.update(global_step, images_per_step=images_per_step,
               runs=f"{sum(d is None for d in loop.diverged)}/{loop.runs}")
  else:
    bar.update(global_step, images_per_step=images_per_step,
               loss=written[0]["loss"] / window_steps)


def _log_window(loop: _Loop, sums, global_step: int, window_steps: int,
                epoch: int, writers) -> dict[int, dict[str, float]]:
  """Record the runs that diverged in this window (the step from the count
  of steps they were alive, the terms that are not finite) and write the
  others' train metrics; returns the written runs' metric sums.

  Raises:
    NonFiniteLossError: every run has now diverged.
  """
  alive_steps = np.asarray(sums.pop("alive"))
  written = {}
  for r in range(loop.runs):
    if loop.diverged[r] is not None:
      continue
    values = evaluation.flatten_metrics(studies.run_slice(sums, r))
    if alive_steps[r] < window_steps:
      step = global_step - window_steps + int(alive_steps[r]) + 1
      bad = sorted(k for k, v in values.items() if not np.isfinite(v))
      loop.diverged[r] = {"step": step, "epoch": epoch + 1,
                          "terms": bad or ["parameters"]}
      if loop.plan.study:
        logging.warning(
            "stage %s: run %d (%s) diverged at step %d (non-finite %s); it "
            "is frozen and left out of the summary, the other runs go on",
            loop.plan.name, r, stage_files.describe_run(loop.plan, r), step,
            ", ".join(loop.diverged[r]["terms"]))
      continue
    averages = {k: v / window_steps for k, v in values.items()}
    writers[r].write(global_step, averages, prefix="train/", epoch=epoch + 1,
                     stage=loop.plan.name)
    written[r] = values
  if not written:
    raise _every_run_diverged(loop)
  return written


def _every_run_diverged(loop: _Loop) -> NonFiniteLossError:
  loop.ckpt.wait()  # the last good checkpoint must be complete on disk
  steps = loop.ckpt.all_steps()
  where = (f"The last good checkpoint is step {steps[-1]} in "
           f"{loop.ckpt.directory} (none is written after a non-finite "
           f"loss). Lower optim.learning_rate or check the data, then rerun "
           f"the same command to resume from it." if steps else
           "before the first checkpoint. Lower optim.learning_rate or check "
           "the data.")
  if loop.runs == 1:
    last = loop.diverged[0]
    what = f"non-finite {', '.join(last['terms'])} at step {last['step']}"
  else:
    what = (f"every run diverged (the last at step "
            f"{max(d['step'] for d in loop.diverged)}; study.vary's learning "
            f"rates may be too high)")
  return NonFiniteLossError(f"stage {loop.plan.name!r}: {what}. {where}")


def _end_of_epoch(loop: _Loop, eval_fn, states, alive, epoch: int,
                  train_means, writers, timing) -> None:
  """Evaluate every run, record the live ones, save the checkpoint and each
  run's best state as due."""
  plan, is_main = loop.plan, jax.process_index() == 0
  config = plan.config
  global_step = epoch * loop.data.steps_per_epoch
  hps = loop.hparams(epoch)
  sums = parallel.global_to_host(evaluation.eval_sums(
      lambda batch: eval_fn(states, loop.teacher, batch, hps),
      loop.eval_data))
  live = [r for r in range(loop.runs) if loop.diverged[r] is None]
  for r in live:
    record = {"epoch": epoch,
              **evaluation.eval_record(studies.run_slice(sums, r))}
    record.update({k: v for k, v in train_means[r].items()
                   if k in _TRAIN_KEYS_IN_RECORD})
    loop.histories[r].append(record)
    writers[r].write(global_step, record, prefix="eval/", epoch=epoch,
                     stage=plan.name)
  _log_epoch(loop, epoch, live, timing)
  if epoch % config.checkpoint_every_epochs == 0 or (
      epoch == config.num_epochs):
    loop.ckpt.save(global_step, loop.saved_tree(states, alive),
                   loop.meta(epoch, 0))
  for r in live:
    if not stage_files.is_best_epoch(loop.histories[r], config, epoch):
      continue
    run_state = studies.take_run(states, r)
    # One save at a time: concurrent async saves of two managers at the same
    # step collide in orbax's multi-process barriers.
    loop.ckpt.wait()
    loop.best_ckpts[r].save(global_step, run_state, loop.run_meta(r, epoch))
    loop.best_ckpts[r].wait()
    if is_main:
      stage_files.save_model(plan.stages[r], plan.run_configs[r],
                             plan.run_dirs[r], "best_model", run_state, epoch,
                             loop.histories[r][-1])
  if is_main:
    for r in live:
      metrics.plot_history(loop.histories[r],
                           os.path.join(plan.run_dirs[r], "plots"),
                           stage_files.display_names(plan.name))


def _log_epoch(loop: _Loop, epoch: int, live: list[int], timing) -> None:
  seconds, images = timing
  plan = loop.plan
  if plan.study:
    scores = ", ".join(f"run {r} {loop.histories[r][-1]['student/top1']:.2f}%"
                       for r in live)
    scores = f"student top-1 {scores}"
  else:
    scores = evaluation.eval_line(loop.histories[0][-1],
                                  stage_files.display_names(plan.name))
  logging.info("stage %s epoch %d/%d (%.1f s, %.0f images/s): %s", plan.name,
               epoch, plan.config.num_epochs, seconds,
               images / max(seconds, 1e-9), scores)


# ---------------------------------------------------------------------------
# What a finished stage leaves behind.


def _finish(loop: _Loop, states, trained: bool) -> None:
  """Each run's ``final_model`` and ``summary.md`` (and, in a study, its
  final state in ``checkpoints/``); a study's own files."""
  plan, is_main = loop.plan, jax.process_index() == 0
  config = plan.config
  final_step = config.num_epochs * loop.data.steps_per_epoch
  for r, directory in enumerate(plan.run_dirs):
    run_state, history = studies.take_run(states, r), loop.histories[r]
    if plan.study:  # a single run's final state is the stage's checkpoint
      _save_final_state(directory, final_step, run_state, trained,
                        loop.run_meta(r, history[-1]["epoch"]
                                      if history else 0))
    if is_main:
      if trained or not artifact.is_artifact(
          os.path.join(directory, "final_model")):
        stage_files.save_model(plan.stages[r], plan.run_configs[r],
                               directory, "final_model", run_state,
                               config.num_epochs,
                               history[-1] if history else {})
      stage_files.write_stage_summary(
          directory, plan.name, stage_files.reported(history, config))
  if is_main and plan.study:
    stage_files.write_study_files(plan, loop.histories, loop.diverged)


def _save_final_state(directory, step, run_state, trained, meta) -> None:
  ckpt = checkpoint.Checkpointer(os.path.join(directory, "checkpoints"), 1)
  try:
    if trained or not ckpt.all_steps():
      ckpt.save(step, run_state, meta)
      ckpt.wait()
  finally:
    ckpt.close()

