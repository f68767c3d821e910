"""The outer training loop: stages, epochs, evaluation, checkpoints, metrics.

A run is a short list of *stages* in one workdir:

1. ``teacher`` — only when ``config.teacher.checkpoint`` is None and some
   method needs a teacher: the teacher architecture trained with CE (the
   reference teacher recipe).
2. ``<method>`` — the distillation stage of ``config.method``, then one stage
   per method of ``config.compare_with``, all from the same frozen teacher
   (stored once in ``workdir/frozen_teacher``), each with its own method's
   recipe (:func:`slkd_jax.config.stage_config`).

Each stage lives in ``workdir/<stage>/``: ``config.json`` (the stage's
effective config), ``checkpoints/`` (the latest ones), ``best/`` (the
best epoch's state), ``best_model/`` and ``final_model/`` (the trained
network alone, :mod:`slkd_jax.artifact`), ``metrics.jsonl``,
``tensorboard/``, ``plots/`` and ``summary.md``. A stage resumes from its
latest checkpoint, refusing a config whose meaning changed; a finished stage
is skipped. The config is resolved once, up front, into the run's plan
(:mod:`slkd_jax.plan`), so a bad setting of any stage fails before the first
trains. Each stage is trained by the one loop of :mod:`slkd_jax.fit` (a
single run is a study of one); this module orders the stages, provides the
data and the frozen teacher, and writes the run's summary. The numerics
live in :mod:`slkd_jax.train_step`.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import ml_collections
from absl import logging

from slkd_jax import fit, methods, parallel, preemption, stage_files, teachers
from slkd_jax import config as config_lib
from slkd_jax import config_checks
from slkd_jax import data as data_lib
from slkd_jax import state as state_lib
from slkd_jax.errors import ConfigError, NonFiniteLossError
from slkd_jax.plan import RunPlan, plan_run
from slkd_jax.preemption import Preempted
from slkd_jax.stage_files import StageResult
from slkd_jax.workdir import check_workdir, workdir_lock

TEACHER_STAGE = config_lib.TEACHER_STAGE
stage_config = config_lib.stage_config

__all__ = ["NonFiniteLossError", "Preempted", "StageResult", "run",
           "check_workdir", "stage_config"]


def _check_data(config, train_data) -> None:
  if train_data.num_classes != config.data.num_classes:
    raise ConfigError(
        f"config.data.num_classes={config.data.num_classes} but dataset "
        f"{config.data.name!r} has {train_data.num_classes} classes")
  size = config.data.image_size
  if tuple(train_data.image_shape) != (size, size, 3):
    raise ConfigError(
        f"config.data.image_size={config.data.image_size} but dataset "
        f"{config.data.name!r} yields images of shape "
        f"{tuple(train_data.image_shape)}")


def _distils(config) -> bool:
  return any(methods.get(m).uses_teacher
             for m in config_lib.stage_methods(config))


def _trains_teacher(config, workdir: str, frozen) -> bool:
  """Whether the run has a teacher stage: no ``teacher.checkpoint``, a
  method that distils, and no frozen teacher yet unless the teacher stage's
  directory is there (then it is restored, finished, for the summary)."""
  return (config.teacher.checkpoint is None and _distils(config)
          and (frozen is None
               or os.path.isdir(os.path.join(workdir, TEACHER_STAGE))))


def _freeze_teacher(plan: RunPlan, mesh, results):
  """The frozen teacher of the distillation stages the first time: the
  teacher stage's result or ``config.teacher.checkpoint``, stored in the
  workdir (``frozen_teacher/``)."""
  config, workdir = plan.config, plan.workdir
  if config.teacher.checkpoint is None:
    trained = results[TEACHER_STAGE]
    student = trained.state.student
    teacher = state_lib.ModelState(student.params, student.batch_stats)
    logging.info(
        "distilling from the teacher stage's final state (epoch %d, top-1 "
        "%s%%; the reference distils from its last epoch, not its best)",
        len(trained.history),
        f"{trained.history[-1]['student/top1']:.2f}" if trained.history
        else "-")
  else:
    teacher = teachers.load_checkpoint(config, mesh)
  teachers.save_frozen(workdir, teacher, config)
  return teacher


class _RunProgress:
  """One log line per stage for the whole run: stages done, time spent and
  the time left, estimated from the images/s of the stages trained so far
  (each stage's own bar shows its steps)."""

  def __init__(self, plan: RunPlan, steps_per_epoch: int):
    self._names = [s.name for s in plan.stages]
    self._images = [s.config.num_epochs * steps_per_epoch
                    * s.config.batch_size * s.runs for s in plan.stages]
    self._start = time.monotonic()
    self._seconds = self._trained = 0.0

  def stage_started(self, i: int) -> float:
    left = sum(self._images[i:])
    eta = (f"; about {_duration(left * self._seconds / self._trained)} left"
           if self._trained else "")
    logging.info("run: stage %d of %d (%s); %d done in %s%s", i + 1,
                 len(self._names), self._names[i], i,
                 _duration(time.monotonic() - self._start), eta)
    return time.monotonic()

  def stage_done(self, i: int, started: float) -> None:
    seconds = time.monotonic() - started
    if seconds > 1.0:  # not a finished stage restored and skipped
      self._seconds += seconds
      self._trained += self._images[i]


def _duration(seconds: float) -> str:
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {seconds:02d}s"


def _train_stages(plan: RunPlan, mesh, data, stop, teacher
                  ) -> dict[str, StageResult]:
  """Every stage of ``plan`` in order, each resumed or skipped if done
  (``teacher``: the workdir's frozen teacher, None when it has none yet)."""
  results: dict[str, StageResult] = {}
  distils = _distils(plan.config)
  progress = _RunProgress(plan, data[0].steps_per_epoch)
  for i, stage in enumerate(plan.stages):
    stop.check_now(f"before stage {stage.name}")
    started = progress.stage_started(i)
    if stage.name != TEACHER_STAGE and distils and teacher is None:
      teacher = _freeze_teacher(plan, mesh, results)
    results.update(fit.fit(stage, mesh, *data, teacher, stop))
    progress.stage_done(i, started)
  return results


def run(config: ml_collections.ConfigDict, workdir: str
        ) -> dict[str, StageResult]:
  """Run every stage of ``config`` in ``workdir``; resume where it stopped.

  Returns the finished stages by name (a study's runs as
  ``runs/<r>/<stage>``). On SIGTERM/SIGINT it saves, logs how to resume,
  and raises :class:`Preempted`.
  """
  config_checks.validate(config)
  workdir = check_workdir(workdir)
  with workdir_lock(workdir):  # one run per workdir at a time
    return _run(config, workdir)


def _run(config: ml_collections.ConfigDict, workdir: str
         ) -> dict[str, StageResult]:
  mesh = parallel.make_mesh()
  for key in ("batch_size", "eval_batch_size"):
    parallel.check_global_batch(config[key], mesh, key)
  # Before anything trains: a workdir distilled from another teacher is
  # refused here.
  frozen = (teachers.load_frozen(workdir, config, mesh) if _distils(config)
            else None)
  plan = plan_run(config, workdir, _trains_teacher(config, workdir, frozen))
  logging.info(
      "processes: %d (this is %d), devices: %d (%d local, %s); global batch "
      "%d = %d per device", jax.process_count(), jax.process_index(),
      mesh.size, jax.local_device_count(), jax.devices()[0].platform,
      config.batch_size, config.batch_size // mesh.size)
  for key, value in methods.loss_overrides(config).items():
    logging.info("loss.%s=%r overrides the recipe of every stage", key, value)
  if not os.path.exists(os.path.join(workdir, "config.json")):
    _write_run_config(config, workdir)  # rewritten when the run succeeds

  data = data_lib.create_datasets(
      config.data, batch_size=config.batch_size,
      eval_batch_size=config.eval_batch_size,
      seed=config_lib.order_seed(config), mesh=mesh)
  _check_data(config, data[0])
  stop = preemption.StopAgreement(preemption.StopSignal().install(),
                                  config.preemption_check_seconds)
  results = _train_stages(plan, mesh, data, stop, frozen)
  _write_run_config(config, workdir)
  if jax.process_index() == 0:
    _write_summaries(plan, results)
  parallel.sync_processes("slkd_jax.train.run")
  stop.check_now("after the last stage (every stage is finished and saved)")
  return results


def _write_summaries(plan: RunPlan, results: dict[str, StageResult]) -> None:
  """The workdir's ``summary.md`` (printed), and a study's runs' files."""
  config = plan.config
  if plan.study_runs:
    stage_files.write_run_workdirs(plan.workdir, plan.study_runs, results,
                                   config)
  table = stage_files.comparison_table(
      {name: dataclasses.replace(
          r, history=stage_files.reported(r.history, config))
       for name, r in results.items()})
  if _distils(config):
    table = f"Teacher: {teachers.describe(config)}.\n\n{table}"
  studies = [s for s in plan.stages if s.study]
  if studies:  # each stage's runs, mean ± std
    table = "\n\n".join([table, *map(stage_files.study_summary, studies)])
  with open(os.path.join(plan.workdir, "summary.md"), "w") as f:
    f.write(table + "\n")
  print(table, flush=True)


def _write_run_config(config, workdir: str) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
