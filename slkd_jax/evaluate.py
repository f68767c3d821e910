"""Evaluate a finished (or running) workdir, or a standalone model.

  python -m slkd_jax.evaluate --workdir=runs/r32x4_r8x4 [--stage=slkd]
      [--checkpoint=best|latest]
  python -m slkd_jax.evaluate --model=runs/r32x4_r8x4/slkd/best_model \\
      --config=configs/cifar100.py

With ``--workdir`` it restores each stage's best (or latest) checkpoint and
the workdir's frozen teacher and prints top-1/top-5 on the evaluation split
of the student, the teacher, each SL-T and the fused SL-T: the same
program as training's per-epoch evaluation, so the best checkpoint
reproduces the run's reported best top-1 exactly; a study's workdir
(docs/studies.md) also each of its runs (``runs/<r>/<stage>``). With ``--model`` it
evaluates one network (a stage's ``best_model`` / ``final_model``, a
teacher converted by :mod:`slkd_jax.convert_torch`, or a PyTorch ``.pth``
with ``--arch``) on the data of ``--config``.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.")
_STAGE = flags.DEFINE_list("stage", None, "Stages to evaluate (default: "
                           "every stage of the workdir).")
_CHECKPOINT = flags.DEFINE_enum("checkpoint", "best", ["best", "latest"],
                                "Which checkpoint of each stage.")
_MODEL = flags.DEFINE_string("model", None, "A standalone model: an "
                             "artifact dir, a converted teacher, or a .pth.")
_ARCH = flags.DEFINE_string("arch", None, "Architecture of a .pth --model.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "With --model: the config whose data to evaluate on.")

_COLUMNS = ["stage", "checkpoint", "epoch", "network", "top-1", "top-5"]


def _stage_config(stage_dir: str):
  import ml_collections
  from slkd_jax.errors import ConfigError
  path = os.path.join(stage_dir, "config.json")
  if not os.path.isfile(path):
    raise ConfigError(f"{stage_dir} is not a stage of a workdir (no "
                      f"config.json)")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def _rows(stage: str, which: str, epoch, result: dict) -> list[dict]:
  from slkd_jax import metrics
  return [{"stage": stage, "checkpoint": which, "epoch": epoch,
           "network": row["network"], "top-1": row["last top-1"],
           "top-5": row["last top-5"]}
          for row in metrics.network_rows([result])]


def evaluate_stage(workdir: str, stage: str, which: str, mesh) -> list[dict]:
  """Rows of :data:`_COLUMNS` for one stage's checkpoint."""
  from slkd_jax import checkpoint, evaluation, parallel, teachers, train_step
  from slkd_jax import data as data_lib
  from slkd_jax import stage as stage_lib
  from slkd_jax import state as state_lib
  from slkd_jax.errors import CheckpointError
  stage_dir = os.path.join(workdir, stage)
  config = _stage_config(stage_dir)
  parallel.configure_jax(config)
  resolved = stage_lib.resolve(config)
  teacher = None
  if resolved.method.uses_teacher:
    teacher = teachers.load_frozen(workdir, config, mesh)
    if teacher is None:
      raise CheckpointError(f"{workdir} has no frozen_teacher: the "
                            f"distillation stages never started")
  train_data, eval_data = data_lib.create_datasets(
      config.data, batch_size=config.batch_size,
      eval_batch_size=config.eval_batch_size, seed=config.seed, mesh=mesh)
  state = state_lib.create_state(resolved, mesh, teacher,
                                 getattr(train_data, "labels", None))
  directory = "best" if which == "best" else "checkpoints"
  ckpt = checkpoint.Checkpointer(os.path.join(stage_dir, directory), 1)
  try:
    restored = ckpt.restore_latest(checkpoint.abstract_like(
        state.replace(teacher=None), mesh))
  finally:
    ckpt.close()
  if restored is None:
    raise CheckpointError(f"{stage_dir}/{directory} holds no checkpoint yet")
  trainable, meta = restored
  result = evaluation.evaluate(train_step.make_eval_step(resolved, mesh),
                          trainable.replace(teacher=teacher), eval_data,
                          resolved.hparams(max(meta["epoch"], 1)))
  return _rows(stage, which, meta["epoch"], result)


def evaluate_model(path: str, config, arch: str | None, mesh) -> list[dict]:
  """Rows of :data:`_COLUMNS` for one standalone network (placed as a
  teacher is: replicated, in the run's parameter dtype)."""
  import jax.numpy as jnp
  from slkd_jax import (artifact, convert_torch, evaluation, parallel, teachers,
                        train_step)
  from slkd_jax import data as data_lib
  from slkd_jax import stage as stage_lib
  from slkd_jax import state as state_lib
  if artifact.is_artifact(path):
    variables, meta = artifact.load(path)
  else:
    variables, meta = convert_torch.load_converted(path, arch,
                                                   config.data.num_classes)
  config = config.copy_and_resolve_references()
  config.method, config.student.arch = "ce", meta["arch"]
  parallel.configure_jax(config)
  model = teachers.to_mesh(variables, config, mesh)
  _, eval_data = data_lib.create_datasets(
      config.data, batch_size=config.batch_size,
      eval_batch_size=config.eval_batch_size, seed=config.seed, mesh=mesh)
  state = state_lib.DistillState(step=jnp.zeros((), jnp.int32), student=model)
  resolved = stage_lib.resolve(config)
  result = evaluation.evaluate(train_step.make_eval_step(resolved, mesh), state,
                          eval_data, resolved.hparams(1))
  return _rows(os.path.basename(os.path.normpath(path)), "model",
               meta.get("source", {}).get("epoch", "-")
               if isinstance(meta.get("source"), dict) else "-", result)


def _stages(workdir: str) -> list[str]:
  """The workdir's stages in run order (teacher, method, compare_with...),
  then any others."""
  from slkd_jax.config import TEACHER_STAGE
  found = {d for d in os.listdir(workdir)
           if os.path.isfile(os.path.join(workdir, d, "config.json"))}
  order = [TEACHER_STAGE]
  run_config = os.path.join(workdir, "config.json")
  if os.path.isfile(run_config):
    with open(run_config) as f:
      run = json.load(f)
    order += [run.get("method"), *run.get("compare_with", [])]
  return ([s for s in order if s in found]
          + sorted(found.difference(order)))


def evaluate_workdir(workdir: str, stages: list[str] | None, which: str,
                     mesh) -> list[dict]:
  """Rows of every stage (or of ``stages``) of ``workdir``; for a study,
  then of each run's (labelled ``runs/<r>/<stage>``)."""
  from slkd_jax import report
  from slkd_jax.errors import CheckpointError, ConfigError
  directories = report.with_study_runs([workdir])
  rows = []
  for directory in directories:
    found = _stages(directory)
    wanted = stages or found
    if len(directories) > 1:  # a study: a stage lives in its runs or not
      wanted = [s for s in wanted if s in found]
    prefix = os.path.relpath(directory, workdir)
    for stage in wanted:
      label = os.path.normpath(os.path.join(prefix, stage))
      try:
        rows += [{**row, "stage": label}
                 for row in evaluate_stage(directory, stage, which, mesh)]
      except CheckpointError as e:
        if directory == workdir:
          raise
        print(f"note: {label}: {e}", file=sys.stderr)  # a diverged run
  if not rows:
    raise ConfigError(f"{workdir} has no stage {', '.join(stages or [])} to "
                      f"evaluate")
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from slkd_jax import errors, metrics, parallel
  try:
    mesh = parallel.make_mesh()
    if _MODEL.value:
      if _CONFIG.value is None:
        raise errors.ConfigError("--model needs --config (the data to "
                                 "evaluate on)")
      rows = evaluate_model(_MODEL.value, _CONFIG.value, _ARCH.value, mesh)
    elif _WORKDIR.value:
      workdir = os.path.abspath(_WORKDIR.value)
      if not os.path.isdir(workdir):
        raise errors.ConfigError(f"--workdir={workdir} is not a directory")
      rows = evaluate_workdir(workdir, _STAGE.value, _CHECKPOINT.value, mesh)
    else:
      raise errors.ConfigError("give --workdir (a training run) or --model")
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(metrics.summary_table(rows, _COLUMNS), flush=True)


if __name__ == "__main__":
  app.run(main)
