"""The outer training loop: stages, epochs, evaluation, checkpoints, metrics.

A run is a short list of *stages* in one workdir:

1. ``teacher`` — only when ``config.teacher.checkpoint`` is None and some
   method needs a teacher: the teacher architecture trained with CE (the
   reference teacher recipe).
2. ``<method>`` — the distillation stage of ``config.method``, then one stage
   per method of ``config.compare_with``, all from the same frozen teacher.

Each stage lives in ``workdir/<stage>/`` (``checkpoints/``, ``metrics.jsonl``,
``tensorboard/``, ``plots/``, ``summary.md``) and resumes automatically from
its latest checkpoint; a finished stage is skipped. Everything with side
effects (I/O, logging, signals) is here; the numerics live in
:mod:`slkd_jax.train_step`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from slkd_jax import checkpoint, methods, metrics, parallel, train_step
from slkd_jax import config as config_lib
from slkd_jax import data as data_lib
from slkd_jax import state as state_lib

TEACHER_STAGE = "teacher"


class Preempted(Exception):
  """Training stopped on SIGTERM after saving a checkpoint."""


class NonFiniteLossError(FloatingPointError):
  """A loss term became NaN/Inf; the message names the step and the term."""


@dataclasses.dataclass
class StageResult:
  """What a finished stage leaves behind."""
  name: str
  method: str
  state: state_lib.DistillState
  history: list[dict[str, Any]]


# ---------------------------------------------------------------------------
# Signals: SIGTERM (SLURM preemption, `kill`) asks the loop to save and stop.


class _StopFlag:
  requested = False

  @classmethod
  def handler(cls, signum, frame):
    del frame
    logging.warning("signal %d received: saving a checkpoint and stopping",
                    signum)
    cls.requested = True


def _install_signal_handlers() -> None:
  _StopFlag.requested = False
  try:
    signal.signal(signal.SIGTERM, _StopFlag.handler)
  except ValueError:
    pass  # not the main thread (e.g. a notebook worker): no handler.


def _stop_agreed(check_now: bool) -> bool:
  """Whether every process should stop now. Across processes the flag is
  all-gathered (only at ``check_now`` steps, to keep the hot loop free of
  collectives), so all of them stop at the same step."""
  if jax.process_count() == 1:
    return _StopFlag.requested
  if not check_now:
    return False
  from jax.experimental import multihost_utils
  flags = multihost_utils.process_allgather(np.asarray(_StopFlag.requested))
  return bool(np.any(flags))


# ---------------------------------------------------------------------------
# Configs of the stages.


def stage_config(config: ml_collections.ConfigDict, method: str
                 ) -> ml_collections.ConfigDict:
  """The config of one stage: ``config`` with ``method`` set, or for the
  teacher stage the teacher architecture trained with CE on its recipe."""
  c = ml_collections.ConfigDict(config.to_dict())
  if method == TEACHER_STAGE:
    c.method = "ce"
    c.student.arch = config.teacher.arch
    c.num_epochs = config.teacher.num_epochs
    c.optim.learning_rate = config.teacher.learning_rate
  else:
    c.method = method
  return c


# ---------------------------------------------------------------------------
# Evaluation.


def evaluate(eval_fn, state, eval_data) -> dict[str, float]:
  """One pass over the eval split: top-1/top-5 (%) and CE per network."""
  total = None
  for batch in eval_data:
    sums = eval_fn(state, batch)
    total = sums if total is None else _add(total, sums)
  host = parallel.global_to_host(total)
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


def _check_finite(step: int, averages: dict[str, Any], stage: str,
                  ckpt: checkpoint.Checkpointer) -> None:
  bad = [k for k, v in averages.items()
         if not np.all(np.isfinite(np.asarray(v, np.float64)))]
  if bad:
    ckpt.wait()  # the last good checkpoint must be complete on disk
    saved_steps = ckpt.all_steps()
    checkpoint_dir = ckpt.directory
    last = saved_steps[-1] if saved_steps else None
    raise NonFiniteLossError(
        f"stage {stage!r}: non-finite {', '.join(sorted(bad))} at step {step}. "
        f"The last good checkpoint is step {last} in {checkpoint_dir} (none "
        f"is written after a non-finite loss). Lower optim.learning_rate or "
        f"check the data, then rerun the same command to resume from it."
        if last is not None else
        f"stage {stage!r}: non-finite {', '.join(sorted(bad))} at step {step}, "
        f"before the first checkpoint. Lower optim.learning_rate or check the "
        f"data.")


def _flatten_metrics(values: dict[str, Any]) -> dict[str, float]:
  """``{'slt_acc': [a, b]}`` → ``{'slt_0/acc': a, 'slt_1/acc': b}``."""
  flat = {}
  for key, value in values.items():
    value = np.asarray(value)
    if value.ndim == 0:
      flat[key] = float(value)
    else:
      prefix, _, rest = key.partition("_")
      for k, v in enumerate(value):
        flat[f"{prefix}_{k}/{rest}"] = float(v)
  return flat


# ---------------------------------------------------------------------------
# One stage.


def run_stage(config: ml_collections.ConfigDict, name: str, stage_dir: str,
              mesh, train_data, eval_data,
              teacher: state_lib.ModelState | None) -> StageResult:
  """Train ``config.method`` for ``config.num_epochs``, resuming if possible.

  Raises:
    Preempted: SIGTERM arrived; a checkpoint was saved.
    NonFiniteLossError: a loss term became NaN/Inf.
  """
  is_main = jax.process_index() == 0
  nets = state_lib.build_networks(config)
  state = state_lib.create_state(config, mesh, teacher)
  ckpt = checkpoint.Checkpointer(os.path.join(stage_dir, "checkpoints"),
                                 config.keep_checkpoints)
  epoch, start_step, history = 0, 0, []
  restored = ckpt.restore_latest(checkpoint.abstract_like(state, mesh))
  if restored is not None:
    state, meta = restored
    epoch, start_step = meta["epoch"], meta["step_in_epoch"]
    history = meta["history"]
    logging.info("stage %s: resumed at epoch %d, step %d (global step %d)",
                 name, epoch + 1, start_step, int(jax.device_get(state.step)))
  if epoch >= config.num_epochs:
    ckpt.close()
    return StageResult(name, config.method, state, history)

  step_fn = train_step.make_train_step(config, mesh, nets)
  eval_fn = train_step.make_eval_step(config, mesh, nets)
  writer = metrics.MetricWriter(stage_dir, enabled=is_main)
  steps_per_epoch = train_data.steps_per_epoch
  global_step = epoch * steps_per_epoch + start_step
  bar = metrics.ProgressBar(config.num_epochs * steps_per_epoch, desc=name,
                            enabled=is_main, initial_step=global_step)
  log_every = max(1, config.log_every_steps)

  def meta(epoch_, step_in_epoch):
    return {"epoch": epoch_, "step_in_epoch": step_in_epoch,
            "history": history, "stage": name, "method": config.method,
            "config": json.loads(config.to_json_best_effort())}

  try:
    while epoch < config.num_epochs:
      hp = methods.make_hparams(config, epoch + 1)
      window, window_steps, epoch_sums, epoch_steps = None, 0, {}, 0
      for step_in_epoch, batch in enumerate(
          train_data.epoch(epoch, start_step), start_step):
        state, step_metrics = step_fn(state, batch, hp)
        global_step += 1
        window = step_metrics if window is None else _add(window, step_metrics)
        window_steps += 1
        last_of_epoch = step_in_epoch + 1 == steps_per_epoch
        log_now = (step_in_epoch + 1) % log_every == 0 or last_of_epoch
        if log_now:
          sums = _flatten_metrics(jax.device_get(window))
          averages = {k: v / window_steps for k, v in sums.items()}
          _check_finite(global_step, averages, name, ckpt)
          for k, v in sums.items():
            epoch_sums[k] = epoch_sums.get(k, 0.0) + v
          epoch_steps += window_steps
          writer.write(global_step, averages, prefix="train/",
                       epoch=epoch + 1, stage=name)
          bar.update(global_step, images_per_step=train_data.batch_size,
                     loss=averages["loss"])
          window, window_steps = None, 0
        if _stop_agreed(check_now=log_now):
          ckpt.save(global_step, state, meta(epoch, step_in_epoch + 1))
          ckpt.wait()
          raise Preempted(f"stage {name}: stopped at step {global_step}; "
                          f"rerun the same command to resume")
      start_step = 0
      epoch += 1
      record = {"epoch": epoch, **evaluate(eval_fn, state, eval_data)}
      record.update({k: v / max(epoch_steps, 1) for k, v in epoch_sums.items()
                     if k in ("loss", "kl_student_teacher",
                              "kl_student_fused")})
      history.append(record)
      writer.write(global_step, record, prefix="eval/", epoch=epoch,
                   stage=name)
      logging.info("stage %s epoch %d/%d: %s", name, epoch, config.num_epochs,
                   _eval_line(record))
      if epoch % config.checkpoint_every_epochs == 0 or (
          epoch == config.num_epochs):
        ckpt.save(global_step, state, meta(epoch, 0))
      if is_main:
        metrics.plot_history(history, os.path.join(stage_dir, "plots"))
  finally:
    bar.close()
    writer.close()
    ckpt.close()
  if is_main:
    _write_stage_summary(stage_dir, name, history)
  return StageResult(name, config.method, state, history)


def _eval_line(record: dict[str, Any]) -> str:
  keys = [k for k in record if k.endswith("/top1")]
  return ", ".join(f"{k.split('/')[0]} {record[k]:.2f}%" for k in keys)


NETWORK_ORDER = ("student", "slt_fused", "teacher")


def network_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per network: best top-1 (and its epoch), last top-1 and top-5."""
  names = sorted({k.split("/")[0] for h in history for k in h
                  if k.endswith("/top1")},
                 key=lambda n: (NETWORK_ORDER.index(n)
                                if n in NETWORK_ORDER else 1.5, n))
  rows = []
  for net in names:
    best, best_epoch, last = metrics.best_and_last(history, f"{net}/top1")
    _, _, last5 = metrics.best_and_last(history, f"{net}/top5")
    rows.append({"network": net, "best top-1": best, "best epoch": best_epoch,
                 "last top-1": last, "last top-5": last5})
  return rows


def _write_stage_summary(stage_dir: str, name: str,
                         history: list[dict[str, Any]]) -> None:
  table = metrics.summary_table(network_rows(history),
                                ["network", "best top-1", "best epoch",
                                 "last top-1", "last top-5"])
  with open(os.path.join(stage_dir, "summary.md"), "w") as f:
    f.write(f"# stage {name}\n\n{table}\n")


# ---------------------------------------------------------------------------
# The teacher.


def _teacher_from_workdir(path: str, config, mesh) -> state_lib.ModelState:
  """The finished teacher stage of a previous run's workdir."""
  cfg = stage_config(config, TEACHER_STAGE)
  target = checkpoint.abstract_like(
      state_lib.create_state(cfg, mesh, None), mesh)
  ckpt = checkpoint.Checkpointer(
      os.path.join(path, TEACHER_STAGE, "checkpoints"))
  try:
    restored = ckpt.restore_latest(target)
  finally:
    ckpt.close()
  if restored is None or restored[1]["epoch"] < restored[1]["config"][
      "num_epochs"]:
    raise ValueError(
        f"config.teacher.checkpoint={path!r}: that workdir's teacher stage "
        f"has not finished; resume it (run with --workdir={path}) first")
  student = restored[0].student
  return state_lib.ModelState(student.params, student.batch_stats)


def load_teacher(config, mesh) -> state_lib.ModelState:
  """The frozen teacher named by ``config.teacher.checkpoint``: a previous
  slkd_jax workdir, a teacher converted by :mod:`slkd_jax.convert_torch`, or
  a PyTorch ``.pth`` file (converted on the fly)."""
  path = config.teacher.checkpoint
  if os.path.isdir(os.path.join(path, TEACHER_STAGE, "checkpoints")):
    return _teacher_from_workdir(path, config, mesh)
  from slkd_jax import convert_torch
  variables, meta = convert_torch.load_teacher(
      path, config.teacher.arch, config.data.num_classes)
  logging.info("teacher %s loaded from %s", meta["arch"], path)
  return jax.device_put(
      state_lib.ModelState(variables["params"], variables["batch_stats"]),
      parallel.replicated(mesh))


# ---------------------------------------------------------------------------
# The run.


def _check_data(config, train_data) -> None:
  if train_data.num_classes != config.data.num_classes:
    raise ValueError(
        f"config.data.num_classes={config.data.num_classes} but dataset "
        f"{config.data.name!r} has {train_data.num_classes} classes")
  expected = state_lib.image_shape(config)
  if tuple(train_data.image_shape) != expected:
    raise ValueError(
        f"config.data.image_size={config.data.image_size} but dataset "
        f"{config.data.name!r} yields images of shape "
        f"{tuple(train_data.image_shape)}")


def run(config: ml_collections.ConfigDict, workdir: str
        ) -> dict[str, StageResult]:
  """Run every stage of ``config`` in ``workdir``; resume where it stopped.

  Returns the finished stages by name. On SIGTERM it saves, logs how to
  resume, and raises :class:`Preempted`.
  """
  config_lib.validate(config)
  mesh = parallel.make_mesh()
  for key in ("batch_size", "eval_batch_size"):
    parallel.check_global_batch(config[key], mesh, key)
  logging.info(
      "processes: %d (this is %d), devices: %d (%d local, %s); global batch "
      "%d = %d per device", jax.process_count(), jax.process_index(),
      mesh.size, jax.local_device_count(), jax.devices()[0].platform,
      config.batch_size, config.batch_size // mesh.size)
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  train_data, eval_data = data_lib.create_datasets(
      config.data, batch_size=config.batch_size,
      eval_batch_size=config.eval_batch_size, seed=config.seed, mesh=mesh)
  _check_data(config, train_data)
  _install_signal_handlers()

  stage_methods = [config.method, *config.compare_with]
  results: dict[str, StageResult] = {}
  teacher = None
  if any(methods.get(m).uses_teacher for m in stage_methods):
    if config.teacher.checkpoint is None:
      results[TEACHER_STAGE] = run_stage(
          stage_config(config, TEACHER_STAGE), TEACHER_STAGE,
          os.path.join(workdir, TEACHER_STAGE), mesh, train_data, eval_data,
          None)
      student = results[TEACHER_STAGE].state.student
      teacher = state_lib.ModelState(student.params, student.batch_stats)
    else:
      teacher = load_teacher(config, mesh)
  for method in stage_methods:
    results[method] = run_stage(stage_config(config, method), method,
                                os.path.join(workdir, method), mesh,
                                train_data, eval_data, teacher)
  if is_main:
    table = comparison_table(results)
    with open(os.path.join(workdir, "summary.md"), "w") as f:
      f.write(table + "\n")
    print(table, flush=True)
  parallel.sync_processes("slkd_jax.train.run")
  return results


def comparison_table(results: dict[str, StageResult]) -> str:
  """Best/last top-1 of each stage's trained network (the student, or the
  teacher for the teacher stage), plus the SL-T fusion where present."""
  rows = []
  for name, result in results.items():
    best, best_epoch, last = metrics.best_and_last(result.history,
                                                   "student/top1")
    fused = metrics.best_and_last(result.history, "slt_fused/top1")[0]
    teacher = metrics.best_and_last(result.history, "teacher/top1")[2]
    rows.append({"stage": name, "method": result.method,
                 "best top-1": best, "best epoch": best_epoch,
                 "last top-1": last,
                 "fused SL-T top-1": fused if fused is not None else "-",
                 "teacher top-1": teacher if teacher is not None else "-"})
  return metrics.summary_table(rows, ["stage", "method", "best top-1",
                                      "best epoch", "last top-1",
                                      "fused SL-T top-1", "teacher top-1"])
