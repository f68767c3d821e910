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
is skipped. Everything with side effects (I/O, logging, signals) is here;
the numerics live in :mod:`slkd_jax.train_step`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from slkd_jax import (artifact, checkpoint, methods, metrics, parallel,
                      preemption, teachers, train_step)
from slkd_jax import config as config_lib
from slkd_jax import data as data_lib
from slkd_jax import stage as stage_lib
from slkd_jax import state as state_lib
from slkd_jax.errors import ConfigError, NonFiniteLossError
from slkd_jax.preemption import Preempted
from slkd_jax.workdir import check_workdir

TEACHER_STAGE = config_lib.TEACHER_STAGE
stage_config = config_lib.stage_config

__all__ = ["NonFiniteLossError", "Preempted", "StageResult", "run",
           "run_stage", "evaluate", "stage_config"]


@dataclasses.dataclass
class StageResult:
  """What a finished stage leaves behind."""
  name: str
  method: str
  state: state_lib.DistillState
  history: list[dict[str, Any]]


@dataclasses.dataclass
class _Loop:
  """What the epoch loop of one stage works with (built once per stage)."""
  config: ml_collections.ConfigDict
  stage: stage_lib.Stage
  name: str
  stage_dir: str
  mesh: Any
  train_data: Any
  eval_data: Any
  ckpt: checkpoint.Checkpointer
  best_ckpt: checkpoint.Checkpointer
  stop: preemption.StopAgreement
  history: list[dict[str, Any]]

  def meta(self, epoch: int, step_in_epoch: int) -> dict[str, Any]:
    return {"epoch": epoch, "step_in_epoch": step_in_epoch,
            "history": self.history, "stage": self.name,
            "method": self.config.method,
            "config": json.loads(self.config.to_json_best_effort())}


# ---------------------------------------------------------------------------
# Evaluation and metrics.


def evaluate(eval_fn, state, eval_data, hp) -> dict[str, float]:
  """One pass over the eval split: top-1/top-5 (%) and CE per network
  (``hp``: the hyper-parameters of the epoch evaluated, for the fusion)."""
  return eval_record(parallel.global_to_host(
      eval_sums(lambda batch: eval_fn(state, batch, hp), eval_data)))


def eval_sums(sums_of, eval_data):
  """The eval step's sums (``sums_of(batch)``) added over the split."""
  total = None
  for batch in eval_data:
    sums = sums_of(batch)
    total = sums if total is None else _add(total, sums)
  return total


def eval_record(host: dict[str, Any]) -> dict[str, float]:
  """Host sums of one pass → top-1/top-5 (%) and mean CE per network, the
  stacked SL-Ts as ``slt_0``, ``slt_1``, ..."""
  host = dict(host)
  count = float(host.pop("count"))
  result = {}
  for key, value in host.items():
    net, name = key.split("/")
    scale = 100.0 / count if name in ("top1", "top5") else 1.0 / count
    if net == "slt":  # [K] -> slt_0, slt_1, ...
      for k, v in enumerate(np.asarray(value)):
        result[f"slt_{k}/{name}"] = float(v) * scale
    else:
      result[key] = float(value) * scale
  result["eval_examples"] = count
  return result


@jax.jit
def _add(a, b):
  return jax.tree.map(lambda x, y: x + y, a, b)


def _check_finite(step: int, averages: dict[str, Any], loop: _Loop) -> None:
  bad = [k for k, v in averages.items()
         if not np.all(np.isfinite(np.asarray(v, np.float64)))]
  if not bad:
    return
  loop.ckpt.wait()  # the last good checkpoint must be complete on disk
  steps = loop.ckpt.all_steps()
  where = (f"The last good checkpoint is step {steps[-1]} in "
           f"{loop.ckpt.directory} (none is written after a non-finite "
           f"loss). Lower optim.learning_rate or check the data, then rerun "
           f"the same command to resume from it." if steps else
           "before the first checkpoint. Lower optim.learning_rate or check "
           "the data.")
  raise NonFiniteLossError(f"stage {loop.name!r}: non-finite "
                           f"{', '.join(sorted(bad))} at step {step}. {where}")


def flatten_metrics(values: dict[str, Any]) -> dict[str, float]:
  """``{'slt/acc': [a, b]}`` → ``{'slt_0/acc': a, 'slt_1/acc': b}``: one
  ``<network>/<quantity>`` key per stacked network."""
  flat = {}
  for key, value in values.items():
    value = np.asarray(value)
    if value.ndim == 0:
      flat[key] = float(value)
    else:
      network, _, quantity = key.partition("/")
      for k, v in enumerate(value):
        flat[f"{network}_{k}/{quantity}"] = float(v)
  return flat


# ---------------------------------------------------------------------------
# One stage.


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


def restore_latest(ckpt: checkpoint.Checkpointer, name: str, stage_dir: str,
                   config, target) -> tuple[Any, dict[str, Any]] | None:
  """``(state, meta)`` of a stage's latest readable checkpoint (restored
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


def _restore(loop: _Loop, state) -> tuple[Any, int, int]:
  """Resume from the stage's latest checkpoint: ``(state, epoch,
  step_in_epoch)``; a fresh start when there is none."""
  restored = restore_latest(
      loop.ckpt, loop.name, loop.stage_dir, loop.config,
      checkpoint.abstract_like(state.replace(teacher=None), loop.mesh))
  if restored is None:
    return state, 0, 0
  trainable, meta = restored
  loop.history[:] = meta["history"]
  epoch, step_in_epoch = meta["epoch"], meta["step_in_epoch"]
  logging.info("stage %s: resumed at epoch %d, step %d (global step %d)",
               loop.name, epoch + 1, step_in_epoch,
               int(jax.device_get(trainable.step)))
  return trainable.replace(teacher=state.teacher), epoch, step_in_epoch


def _train_epoch(loop: _Loop, step_fn, state, epoch: int, start_step: int,
                 writer, bar):
  """Train one epoch from ``start_step``; returns ``(state, averages of the
  logged train metrics)``.

  Raises:
    Preempted: a stop was agreed; a checkpoint was saved first.
    NonFiniteLossError: a loss term became NaN/Inf.
  """
  hp = loop.stage.hparams(epoch + 1)
  steps_per_epoch = loop.train_data.steps_per_epoch
  global_step = epoch * steps_per_epoch + start_step
  log_every = loop.config.log_every_steps
  window, window_steps, epoch_sums, epoch_steps = None, 0, {}, 0
  for step_in_epoch, batch in enumerate(
      loop.train_data.epoch(epoch, start_step), start_step):
    state, step_metrics = step_fn(state, batch, hp)
    global_step += 1
    window = step_metrics if window is None else _add(window, step_metrics)
    window_steps += 1
    stop = loop.stop.should_stop(global_step)
    if ((step_in_epoch + 1) % log_every == 0 or stop
        or step_in_epoch + 1 == steps_per_epoch):
      sums = flatten_metrics(jax.device_get(window))
      averages = {k: v / window_steps for k, v in sums.items()}
      _check_finite(global_step, averages, loop)  # before any save
      for k, v in sums.items():
        epoch_sums[k] = epoch_sums.get(k, 0.0) + v
      epoch_steps += window_steps
      writer.write(global_step, averages, prefix="train/", epoch=epoch + 1,
                   stage=loop.name)
      bar.update(global_step, images_per_step=loop.train_data.batch_size,
                 loss=averages["loss"])
      window, window_steps = None, 0
    if stop:
      loop.ckpt.save(global_step, state.replace(teacher=None),
                     loop.meta(epoch, step_in_epoch + 1))
      loop.ckpt.wait()
      raise Preempted(f"stage {loop.name}: stopped at step {global_step} "
                      f"after saving a checkpoint; rerun the same command "
                      f"to resume")
  return state, {k: v / max(epoch_steps, 1) for k, v in epoch_sums.items()}


def _end_of_epoch(loop: _Loop, eval_fn, state, epoch: int, train_means,
                  writer) -> None:
  """Evaluate, record, and save the checkpoint / best state as due."""
  config, is_main = loop.config, jax.process_index() == 0
  global_step = epoch * loop.train_data.steps_per_epoch
  record = {"epoch": epoch, **evaluate(eval_fn, state, loop.eval_data,
                                       loop.stage.hparams(epoch))}
  record.update({k: v for k, v in train_means.items()
                 if k in ("loss", "student/kl_teacher", "student/kl_fused")})
  loop.history.append(record)
  writer.write(global_step, record, prefix="eval/", epoch=epoch,
               stage=loop.name)
  logging.info("stage %s epoch %d/%d: %s", loop.name, epoch, config.num_epochs,
               _eval_line(record))
  trainable = state.replace(teacher=None)
  if epoch % config.checkpoint_every_epochs == 0 or (
      epoch == config.num_epochs):
    loop.ckpt.save(global_step, trainable, loop.meta(epoch, 0))
  if is_best_epoch(loop.history, config, epoch):
    # One save at a time: concurrent async saves of two managers at the same
    # step collide in orbax's multi-process barriers.
    loop.ckpt.wait()
    loop.best_ckpt.save(global_step, trainable, loop.meta(epoch, 0))
    loop.best_ckpt.wait()
    if is_main:
      save_model(loop.stage, loop.config, loop.stage_dir, "best_model",
                 state, epoch, record)
  if is_main:
    metrics.plot_history(loop.history, os.path.join(loop.stage_dir, "plots"))


def reported(history: list[dict[str, Any]], config) -> list[dict[str, Any]]:
  """The epochs a stage's best is reported over (after
  ``config.report_best_after_epoch``; TESKD: 150)."""
  return metrics.reported_history(history,
                                  config.get("report_best_after_epoch", 0))


def is_best_epoch(history: list[dict[str, Any]], config, epoch: int) -> bool:
  """Whether ``epoch`` (just recorded) is the best reported one so far."""
  return metrics.best_and_last(reported(history, config),
                               "student/top1")[1] == epoch


def save_model(stage: stage_lib.Stage, config, stage_dir: str, name: str,
               state, epoch: int, record) -> None:
  """A stage's trained network alone in ``stage_dir/name`` (loadable as a
  teacher): the student, or what its method deploys from it (TESKD: the
  backbone)."""
  variables, arch = state.student.variables, config.student.arch
  if stage.method.deployed_model is not None:
    variables, arch = stage.method.deployed_model(variables, arch)
  artifact.save(os.path.join(stage_dir, name), variables, arch=arch,
                num_classes=config.data.num_classes,
                source={"stage": os.path.basename(stage_dir),
                        "method": config.method, "epoch": epoch},
                top1=record.get("student/top1"),
                top5=record.get("student/top5"))


def run_stage(config: ml_collections.ConfigDict, name: str, stage_dir: str,
              mesh, train_data, eval_data,
              teacher: state_lib.ModelState | None,
              stop: preemption.StopAgreement) -> StageResult:
  """Train ``config.method`` for ``config.num_epochs``, resuming if possible.

  Raises:
    Preempted: a stop signal arrived; a checkpoint was saved.
    NonFiniteLossError: a loss term became NaN/Inf.
    ConfigError: the stage's checkpoint belongs to a different config.
  """
  is_main = jax.process_index() == 0
  loop = _Loop(config, stage_lib.resolve(config), name, stage_dir, mesh,
               train_data, eval_data,
               checkpoint.Checkpointer(os.path.join(stage_dir, "checkpoints"),
                                       config.keep_checkpoints),
               checkpoint.Checkpointer(os.path.join(stage_dir, "best"), 1),
               stop, [])
  try:
    state = state_lib.create_state(loop.stage, mesh, teacher,
                                   getattr(train_data, "labels", None))
    if is_main:
      log_parameter_counts(name, state)
    state, epoch, start_step = _restore(loop, state)
    trains = epoch < config.num_epochs
    if trains:
      state = _train_stage(loop, state, epoch, start_step)
  finally:
    loop.ckpt.close()
    loop.best_ckpt.close()
  if is_main:
    if trains or not artifact.is_artifact(
        os.path.join(stage_dir, "final_model")):
      save_model(loop.stage, config, stage_dir, "final_model", state,
                 config.num_epochs, loop.history[-1] if loop.history else {})
    write_stage_summary(stage_dir, name, reported(loop.history, config))
  return StageResult(name, config.method, state, loop.history)


def log_parameter_counts(name: str, state) -> None:
  """Parameters per trained network and the method's extra modules
  (mdistiller's "extra parameters")."""
  from slkd_jax.models.layers import count_params
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


def _train_stage(loop: _Loop, state, epoch: int, start_step: int):
  """The epoch loop of a stage from ``(epoch, start_step)`` to the end."""
  config, is_main = loop.config, jax.process_index() == 0
  steps_per_epoch = loop.train_data.steps_per_epoch
  global_step = epoch * steps_per_epoch + start_step
  if is_main:
    dropped = metrics.truncate_jsonl(
        os.path.join(loop.stage_dir, "metrics.jsonl"), global_step)
    if dropped:
      logging.info("stage %s: dropped %d metric records of steps after the "
                   "checkpoint (step %d)", loop.name, dropped, global_step)
    with open(os.path.join(loop.stage_dir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  logging.info("stage %s (%s): loss settings %s", loop.name, config.method,
               dict(config.loss))
  step_fn = train_step.make_train_step(loop.stage, loop.mesh)
  eval_fn = train_step.make_eval_step(loop.stage, loop.mesh)
  writer = metrics.MetricWriter(loop.stage_dir, enabled=is_main)
  bar = metrics.ProgressBar(config.num_epochs * steps_per_epoch,
                            desc=loop.name, enabled=is_main,
                            initial_step=global_step)
  try:
    while epoch < config.num_epochs:
      state, train_means = _train_epoch(loop, step_fn, state, epoch,
                                        start_step, writer, bar)
      start_step, epoch = 0, epoch + 1
      _end_of_epoch(loop, eval_fn, state, epoch, train_means, writer)
  finally:
    bar.close()
    writer.close()
  return state


def _eval_line(record: dict[str, Any]) -> str:
  keys = [k for k in record if k.endswith("/top1")]
  return ", ".join(f"{k.split('/')[0]} {record[k]:.2f}%" for k in keys)


def write_stage_summary(stage_dir: str, name: str,
                         history: list[dict[str, Any]]) -> None:
  table = metrics.summary_table(metrics.network_rows(history),
                                metrics.NETWORK_COLUMNS)
  with open(os.path.join(stage_dir, "summary.md"), "w") as f:
    f.write(f"# stage {name}\n\n{table}\n")


# ---------------------------------------------------------------------------
# The run.


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


def _teacher(config, workdir, mesh, data, stop, results):
  """The frozen teacher of the distillation stages: the workdir's copy, or
  the teacher stage's result, or ``config.teacher.checkpoint``; stored in
  the workdir the first time."""
  frozen = teachers.load_frozen(workdir, config, mesh)
  stage_dir = os.path.join(workdir, TEACHER_STAGE)
  if config.teacher.checkpoint is None and (
      frozen is None or os.path.isdir(stage_dir)):
    # Finished: restored and skipped. Its history feeds the final table.
    results[TEACHER_STAGE] = run_stage(
        stage_config(config, TEACHER_STAGE), TEACHER_STAGE, stage_dir, mesh,
        *data, None, stop)
  if frozen is not None:
    return frozen
  if config.teacher.checkpoint is None:
    student = results[TEACHER_STAGE].state.student
    teacher = state_lib.ModelState(student.params, student.batch_stats)
  else:
    teacher = teachers.load_checkpoint(config, mesh)
  teachers.save_frozen(workdir, teacher, config)
  return teacher


def run(config: ml_collections.ConfigDict, workdir: str
        ) -> dict[str, StageResult]:
  """Run every stage of ``config`` in ``workdir``; resume where it stopped.

  Returns the finished stages by name. On SIGTERM/SIGINT it saves, logs how
  to resume, and raises :class:`Preempted`.
  """
  config_lib.validate(config)
  workdir = check_workdir(workdir)
  mesh = parallel.make_mesh()
  for key in ("batch_size", "eval_batch_size"):
    parallel.check_global_batch(config[key], mesh, key)
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

  stages = config_lib.stage_methods(config)
  results: dict[str, StageResult] = {}
  teacher = None
  if any(methods.get(m).uses_teacher for m in stages):
    teacher = _teacher(config, workdir, mesh, data, stop, results)
  study = config_lib.is_study(config)
  for method in stages:
    if study:
      from slkd_jax import train_study  # noqa: PLC0415 (imports this module)
      results.update(train_study.run_stage(config, method, workdir, mesh,
                                           *data, teacher, stop))
    else:
      results[method] = run_stage(stage_config(config, method), method,
                                  os.path.join(workdir, method), mesh, *data,
                                  teacher, stop)
  _write_run_config(config, workdir)
  if jax.process_index() == 0:
    if study:
      train_study.write_run_workdirs(config, workdir, results)
    table = comparison_table(
        {name: dataclasses.replace(r, history=reported(r.history, config))
         for name, r in results.items()})
    if study:  # each stage's runs, mean ± std
      table = "\n\n".join([table, *(train_study.summary(workdir, m)
                                     for m in stages)])
    with open(os.path.join(workdir, "summary.md"), "w") as f:
      f.write(table + "\n")
    print(table, flush=True)
  parallel.sync_processes("slkd_jax.train.run")
  return results


def _write_run_config(config, workdir: str) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))


def comparison_table(results: dict[str, StageResult]) -> str:
  """Best/last top-1 of each stage's trained network (the student, or the
  teacher for the teacher stage), plus the SL-T fusion where present."""
  rows = [{"stage": name, "method": result.method,
           **metrics.stage_row(result.history)}
          for name, result in results.items()]
  return metrics.summary_table(rows, ["stage", "method",
                                      *metrics.STAGE_COLUMNS])
