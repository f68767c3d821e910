"""The outer loop of a study: R runs of a distillation stage in one program.

With ``config.study.seeds`` set, :func:`slkd_jax.train.run` trains every
distillation stage as a study (the teacher stage, when there is one, is
trained once and shared). Run ``r`` is exactly the separate run of
``config_lib.run_configs(config)[r]`` (its seed, its ``study.vary`` values,
the shared data order as ``data.order_seed``), and is laid out as one:

* ``workdir/runs/<r>/``: ``config.json`` (the run's config: train it alone
  with it and you get the same run), ``summary.md``, ``frozen_teacher``
  (a link to the study's), and per stage ``<stage>/`` with ``config.json``,
  ``metrics.jsonl``, ``tensorboard/``, ``plots/``, ``summary.md``,
  ``best/`` (the run's best epoch), ``best_model/``, ``final_model/`` and
  ``checkpoints/`` (its final state), so ``slkd_jax.report`` and
  ``slkd_jax.evaluate --workdir=workdir/runs/<r>`` work unchanged;
* ``workdir/<stage>/``: the study itself: ``checkpoints/`` (every run's
  state, resumed as a whole), ``study.json`` (each run's seed, varied
  values and status) and ``summary.md`` (each run's best and last top-1,
  mean ± std over the runs that did not diverge).

A run whose loss or parameters become NaN/Inf is frozen by the step
(:mod:`slkd_jax.studies`), reported with the step and the non-finite terms,
and left out of the summary; the others go on. Only when every run has
diverged does the stage stop with :class:`NonFiniteLossError`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from slkd_jax import (checkpoint, metrics, parallel, preemption, studies,
                      teachers, train)
from slkd_jax import config as config_lib
from slkd_jax import data as data_lib
from slkd_jax import stage as stage_lib
from slkd_jax.errors import NonFiniteLossError
from slkd_jax.preemption import Preempted

RUNS_DIR = "runs"


@dataclasses.dataclass
class _Study:
  """What the epoch loop of one study stage works with."""
  config: ml_collections.ConfigDict  # the study's stage config
  run_configs: list[ml_collections.ConfigDict]  # run r's stage config
  stages: list[stage_lib.Stage]  # run r's resolved stage
  name: str
  stage_dir: str
  run_dirs: list[str]
  mesh: Any
  impl: str
  data: _TrainBatches
  eval_data: Any
  ckpt: checkpoint.Checkpointer
  best_ckpts: list[checkpoint.Checkpointer]
  stop: preemption.StopAgreement
  histories: list[list[dict[str, Any]]]
  diverged: list[dict[str, Any] | None]

  @property
  def runs(self) -> int:
    return len(self.stages)

  def hparams(self, epoch: int):
    """Every run's hyper-parameters of ``epoch``, stacked and replicated."""
    return jax.device_put(
        studies.stack([s.hparams(epoch) for s in self.stages]),
        parallel.replicated(self.mesh))

  def meta(self, epoch: int, step_in_epoch: int) -> dict[str, Any]:
    return {"epoch": epoch, "step_in_epoch": step_in_epoch,
            "histories": self.histories, "diverged": self.diverged,
            "stage": self.name, "method": self.config.method,
            "config": json.loads(self.config.to_json_best_effort())}

  def run_meta(self, r: int, epoch: int) -> dict[str, Any]:
    """Run ``r``'s checkpoint meta, as its separate run would write it."""
    return {"epoch": epoch, "step_in_epoch": 0, "history": self.histories[r],
            "stage": self.name, "method": self.config.method,
            "config": json.loads(self.run_configs[r].to_json_best_effort())}


class _TrainBatches:
  """The study's training batches: one order shared by every run, or each
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


def _train_datasets(config, run_configs, mesh, run_data) -> _TrainBatches:
  """One training dataset (the shared order) or one per run; ``run_data``
  (the run's own, seeded by ``order_seed(config)``) is reused where its
  order is a run's."""
  seeds = [config_lib.order_seed(c) for c in run_configs]
  if config.study.shared_data:
    seeds = seeds[:1]
  by_seed = {config_lib.order_seed(config): run_data}
  for seed in seeds:  # one per order; each epoch() is its own iterator
    if seed not in by_seed:
      by_seed[seed] = data_lib.create_datasets(
          config.data, batch_size=config.batch_size,
          eval_batch_size=config.eval_batch_size, seed=seed, mesh=mesh)[0]
  return _TrainBatches([by_seed[seed] for seed in seeds], mesh)


def run_dir(workdir: str, r: int) -> str:
  """Run ``r``'s workdir inside a study's."""
  return os.path.join(workdir, RUNS_DIR, str(r))


# ---------------------------------------------------------------------------
# One study stage.


def run_stage(config: ml_collections.ConfigDict, name: str, workdir: str,
              mesh, train_data, eval_data, teacher,
              stop: preemption.StopAgreement) -> dict[str, train.StageResult]:
  """Train stage ``name`` of the study ``config`` (every run), resuming if
  possible; returns each run's result as ``runs/<r>/<name>``
  (``train_data``: the run's, seeded by ``order_seed(config)``).

  Raises:
    Preempted: a stop signal arrived; a checkpoint was saved.
    NonFiniteLossError: every run diverged.
    ConfigError: the study's checkpoint belongs to a different config.
  """
  runs = [config_lib.stage_config(c, name)
          for c in config_lib.run_configs(config)]
  stage_config = config_lib.stage_config(config, name)
  stage_dir = os.path.join(workdir, name)
  run_dirs = [os.path.join(run_dir(workdir, r), name)
              for r in range(len(runs))]
  study = _Study(
      stage_config, runs, [stage_lib.resolve(c) for c in runs], name,
      stage_dir, run_dirs, mesh,
      config.study.impl or config.slkd.ensemble,
      _train_datasets(stage_config, runs, mesh, train_data), eval_data,
      checkpoint.Checkpointer(os.path.join(stage_dir, "checkpoints"),
                              config.keep_checkpoints),
      [checkpoint.Checkpointer(os.path.join(d, "best"), 1) for d in run_dirs],
      stop, [[] for _ in runs], [None] * len(runs))
  try:
    states = studies.create_runs_state(
        study.stages[0], mesh, [c.seed for c in runs], teacher,
        study.data.labels)
    if jax.process_index() == 0:
      train.log_parameter_counts(f"{name} (each run)", studies.run_slice(
          states.replace(teacher=None), 0))
    states, alive, epoch, start_step = _restore(study, states)
    trains = epoch < stage_config.num_epochs
    if trains:
      states = _train(study, states, alive, epoch, start_step)
  finally:
    for ckpt in (study.ckpt, *study.best_ckpts):
      ckpt.close()
  _finish_runs(study, states, trains)
  return {os.path.join(RUNS_DIR, str(r), name): train.StageResult(
      name, stage_config.method,
      studies.run_slice(states.replace(teacher=None), r).replace(
          teacher=states.teacher), study.histories[r])
          for r in range(study.runs)}


def _restore(study: _Study, states):
  """``(states, alive, epoch, step_in_epoch)`` from the study's latest
  checkpoint; a fresh start when there is none."""
  alive = jax.device_put(jnp.ones(study.runs, bool),
                         parallel.replicated(study.mesh))
  target = checkpoint.abstract_like(
      {"runs": states.replace(teacher=None), "alive": alive}, study.mesh)
  restored = train.restore_latest(study.ckpt, study.name, study.stage_dir,
                                  study.config, target)
  if restored is None:
    return states, alive, 0, 0
  tree, meta = restored
  study.histories[:] = meta["histories"]
  study.diverged[:] = meta["diverged"]
  logging.info("study %s: resumed at epoch %d, step %d", study.name,
               meta["epoch"] + 1, meta["step_in_epoch"])
  return (tree["runs"].replace(teacher=states.teacher), tree["alive"],
          meta["epoch"], meta["step_in_epoch"])


def _compile(study: _Study, states, batch, hps):
  """The study step compiled for these shapes; logs its memory estimate
  (and fails early, in one line, when it cannot fit)."""
  step, estimate = studies.compile_runs_step(
      study.stages[0], study.mesh, study.impl, states, batch, hps,
      shared_batch=study.data.shared)
  logging.info("study %s: %d runs in one program (%s over runs, %s data "
               "order): about %.1f MiB per device, %.1f MiB per run",
               study.name, study.runs, study.impl,
               "shared" if study.data.shared else "per-run",
               estimate["total_bytes"] / 2**20,
               estimate["per_run_bytes"] / 2**20)
  return step


def _train(study: _Study, states, alive, epoch: int, start_step: int):
  """The epoch loop of a study from ``(epoch, start_step)`` to the end."""
  config, is_main = study.config, jax.process_index() == 0
  steps_per_epoch = study.data.steps_per_epoch
  global_step = epoch * steps_per_epoch + start_step
  if is_main:
    _prepare_run_dirs(study, global_step)
  eval_fn = studies.make_runs_eval_step(study.stages[0], study.mesh,
                                        study.impl)
  writers = [metrics.MetricWriter(d, enabled=is_main) for d in study.run_dirs]
  bar = metrics.ProgressBar(config.num_epochs * steps_per_epoch,
                            desc=f"{study.name} ×{study.runs}",
                            enabled=is_main, initial_step=global_step)
  step_fn = None
  try:
    while epoch < config.num_epochs:
      hps = study.hparams(epoch + 1)
      if step_fn is None:  # every batch has the first one's shapes
        step_fn = _compile(study, states, next(study.data.epoch(0)), hps)
      states, alive, train_means = _train_epoch(
          study, step_fn, states, alive, hps, epoch, start_step, writers, bar)
      start_step, epoch = 0, epoch + 1
      _end_of_epoch(study, eval_fn, states, alive, epoch, train_means,
                    writers)
  finally:
    bar.close()
    for writer in writers:
      writer.close()
  return states


def _prepare_run_dirs(study: _Study, global_step: int) -> None:
  """Each run's stage directory as its separate run would have it:
  ``config.json``, and metrics past the checkpoint dropped."""
  for r, directory in enumerate(study.run_dirs):
    os.makedirs(directory, exist_ok=True)
    metrics.truncate_jsonl(os.path.join(directory, "metrics.jsonl"),
                           global_step)
    with open(os.path.join(directory, "config.json"), "w") as f:
      f.write(study.run_configs[r].to_json_best_effort(indent=2))


def _train_epoch(study: _Study, step_fn, states, alive, hps, epoch: int,
                 start_step: int, writers, bar):
  """Train every run one epoch from ``start_step``: ``(states, alive,
  each run's means of the logged train metrics)``.

  Raises:
    Preempted: a stop was agreed; the study's checkpoint was saved first.
    NonFiniteLossError: every run has diverged.
  """
  steps_per_epoch = study.data.steps_per_epoch
  global_step = epoch * steps_per_epoch + start_step
  log_every = study.config.log_every_steps
  window, window_steps = None, 0
  epoch_sums = [{} for _ in range(study.runs)]
  epoch_steps = [0] * study.runs
  for step_in_epoch, batch in enumerate(study.data.epoch(epoch, start_step),
                                        start_step):
    states, alive, step_metrics = step_fn(states, alive, batch, hps)
    global_step += 1
    window = step_metrics if window is None else train._add(window,
                                                            step_metrics)
    window_steps += 1
    stop = study.stop.should_stop(global_step)
    if ((step_in_epoch + 1) % log_every == 0 or stop
        or step_in_epoch + 1 == steps_per_epoch):
      for r, run_sums in _log_window(study, jax.device_get(window),
                                     global_step, window_steps, epoch,
                                     writers).items():
        for k, v in run_sums.items():
          epoch_sums[r][k] = epoch_sums[r].get(k, 0.0) + v
        epoch_steps[r] += window_steps
      bar.update(global_step,
                 images_per_step=study.data.batch_size * study.runs,
                 runs=f"{sum(d is None for d in study.diverged)}/"
                      f"{study.runs}")
      window, window_steps = None, 0
    if stop:
      study.ckpt.save(global_step, {"runs": states.replace(teacher=None),
                                    "alive": alive},
                      study.meta(epoch, step_in_epoch + 1))
      study.ckpt.wait()
      raise Preempted(f"study {study.name}: stopped at step {global_step} "
                      f"after saving a checkpoint; rerun the same command "
                      f"to resume")
  return states, alive, [{k: v / max(n, 1) for k, v in sums.items()}
                         for sums, n in zip(epoch_sums, epoch_steps)]


def _log_window(study: _Study, sums, global_step: int, window_steps: int,
                epoch: int, writers) -> dict[int, dict[str, float]]:
  """Record the runs that diverged in this window (the step from the
  count of steps they were alive, the terms that are not finite) and write
  the others' train metrics; returns the written runs' metric sums."""
  alive_steps = np.asarray(sums.pop("alive"))
  written = {}
  for r in range(study.runs):
    if study.diverged[r] is not None:
      continue
    values = train.flatten_metrics(studies.run_slice(sums, r))
    if alive_steps[r] < window_steps:
      step = global_step - window_steps + int(alive_steps[r]) + 1
      bad = sorted(k for k, v in values.items() if not np.isfinite(v))
      study.diverged[r] = {"step": step, "epoch": epoch + 1,
                           "terms": bad or ["parameters"]}
      logging.warning(
          "study %s: run %d (%s) diverged at step %d (non-finite %s); it is "
          "frozen and left out of the summary, the other runs go on",
          study.name, r, _describe_run(study, r), step,
          ", ".join(study.diverged[r]["terms"]))
      continue
    averages = {k: v / window_steps for k, v in values.items()}
    writers[r].write(global_step, averages, prefix="train/", epoch=epoch + 1,
                     stage=study.name)
    written[r] = values
  if not written and all(d is not None for d in study.diverged):
    study.ckpt.wait()
    raise NonFiniteLossError(
        f"study {study.name}: every run diverged (the last at step "
        f"{global_step}); lower optim.learning_rate (or study.vary's) and "
        f"rerun; the last good checkpoint is in {study.ckpt.directory}")
  return written


def _describe_run(study: _Study, r: int) -> str:
  """``seed 3, temperature 8.0``: what distinguishes run ``r``."""
  parts = [f"seed {study.run_configs[r].seed}"]
  for key, values in study.config.study.vary.items():
    if values is not None:
      parts.append(f"{key} {values[r]}")
  return ", ".join(parts)


def _end_of_epoch(study: _Study, eval_fn, states, alive, epoch: int,
                  train_means, writers) -> None:
  """Evaluate every run, record the live ones, save the study's checkpoint
  and each run's best state as due."""
  config, is_main = study.config, jax.process_index() == 0
  global_step = epoch * study.data.steps_per_epoch
  hps = study.hparams(epoch)
  sums = parallel.global_to_host(train.eval_sums(
      lambda batch: eval_fn(states, batch, hps), study.eval_data))
  live = [r for r in range(study.runs) if study.diverged[r] is None]
  for r in live:
    record = {"epoch": epoch, **train.eval_record(studies.run_slice(sums, r))}
    record.update({k: v for k, v in train_means[r].items()
                   if k in ("loss", "student/kl_teacher", "student/kl_fused")})
    study.histories[r].append(record)
    writers[r].write(global_step, record, prefix="eval/", epoch=epoch,
                     stage=study.name)
  logging.info("study %s epoch %d/%d: student top-1 %s", study.name, epoch,
               config.num_epochs, ", ".join(
                   f"run {r} {study.histories[r][-1]['student/top1']:.2f}%"
                   for r in live))
  trainable = states.replace(teacher=None)
  if epoch % config.checkpoint_every_epochs == 0 or (
      epoch == config.num_epochs):
    study.ckpt.save(global_step, {"runs": trainable, "alive": alive},
                    study.meta(epoch, 0))
  for r in live:
    history = study.histories[r]
    if not train.is_best_epoch(history, config, epoch):
      continue
    run_state = studies.run_slice(trainable, r)
    study.ckpt.wait()  # one save at a time (orbax's barriers)
    study.best_ckpts[r].save(global_step, run_state, study.run_meta(r, epoch))
    study.best_ckpts[r].wait()
    if is_main:
      train.save_model(study.stages[r], study.run_configs[r],
                       study.run_dirs[r], "best_model", run_state, epoch,
                       history[-1])
  if is_main:
    for r in live:
      metrics.plot_history(study.histories[r],
                           os.path.join(study.run_dirs[r], "plots"))


# ---------------------------------------------------------------------------
# What a finished study leaves behind.


def _finish_runs(study: _Study, states, trained: bool) -> None:
  """Each run's final state (``checkpoints/``) and ``final_model``, its
  ``summary.md``; the study's ``study.json`` and ``summary.md``."""
  config, is_main = study.config, jax.process_index() == 0
  trainable = states.replace(teacher=None)
  final_step = config.num_epochs * study.data.steps_per_epoch
  for r, directory in enumerate(study.run_dirs):
    run_state = studies.run_slice(trainable, r)
    history = study.histories[r]
    ckpt = checkpoint.Checkpointer(os.path.join(directory, "checkpoints"), 1)
    try:
      if trained or not ckpt.all_steps():
        ckpt.save(final_step, run_state, study.run_meta(
            r, history[-1]["epoch"] if history else 0))
        ckpt.wait()
    finally:
      ckpt.close()
    if is_main:
      train.save_model(study.stages[r], study.run_configs[r], directory,
                       "final_model", run_state, config.num_epochs,
                       history[-1] if history else {})
      train.write_stage_summary(directory, study.name,
                                train.reported(history, config))
  if is_main:
    _write_study_files(study)


def _study_rows(study: _Study) -> list[dict[str, Any]]:
  """One row per run (seed, varied values, status, best/last top-1)."""
  rows = []
  for r in range(study.runs):
    row = {"run": r, "seed": study.run_configs[r].seed}
    for key, values in study.config.study.vary.items():
      if values is not None:
        row[key] = values[r]
    diverged = study.diverged[r]
    row["status"] = ("done" if diverged is None else
                     f"diverged at step {diverged['step']} "
                     f"({', '.join(diverged['terms'])})")
    best, best_epoch, last = metrics.best_and_last(
        train.reported(study.histories[r], study.config), "student/top1")
    row.update({"best top-1": best, "best epoch": best_epoch,
                "last top-1": last})
    rows.append(row)
  return rows


def _write_study_files(study: _Study) -> None:
  rows = _study_rows(study)
  kept = [row for row in rows if row["status"] == "done"
          and row["best top-1"] is not None]
  columns = list(rows[0])
  mean = {"run": f"mean ± std ({len(kept)}/{len(rows)})"}
  for key in ("best top-1", "last top-1"):
    mean[key] = (metrics.mean_std([row[key] for row in kept]) if kept
                 else "-")
  table = metrics.summary_table(rows + [mean], columns)
  with open(os.path.join(study.stage_dir, "summary.md"), "w") as f:
    f.write(f"# study {study.name}: {study.runs} runs\n\n{table}\n")
  with open(os.path.join(study.stage_dir, "study.json"), "w") as f:
    json.dump({"stage": study.name, "runs": rows,
               "run_dirs": study.run_dirs}, f, indent=2)


def summary(workdir: str, stage: str) -> str:
  """The study summary (``<stage>/summary.md``) of a finished stage."""
  with open(os.path.join(workdir, stage, "summary.md")) as f:
    return f.read().strip()


def write_run_workdirs(config: ml_collections.ConfigDict, workdir: str,
                       results: dict[str, train.StageResult]) -> None:
  """Each run's ``config.json``, ``summary.md`` and link to the study's
  frozen teacher: a run directory reads as the workdir of a separate run."""
  for r, run_config in enumerate(config_lib.run_configs(config)):
    directory = run_dir(workdir, r)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
      f.write(run_config.to_json_best_effort(indent=2))
    link = os.path.join(directory, teachers.FROZEN_TEACHER_DIR)
    if (os.path.isdir(os.path.join(workdir, teachers.FROZEN_TEACHER_DIR))
        and not os.path.lexists(link)):
      os.symlink(os.path.join("..", "..", teachers.FROZEN_TEACHER_DIR), link)
    prefix = os.path.join(RUNS_DIR, str(r)) + os.sep
    mine = {key[len(prefix):]: dataclasses.replace(
        result, history=train.reported(result.history, config))
            for key, result in results.items() if key.startswith(prefix)}
    with open(os.path.join(directory, "summary.md"), "w") as f:
      f.write(train.comparison_table(mine) + "\n")
