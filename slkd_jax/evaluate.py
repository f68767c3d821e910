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
from typing import Sequence

from absl import flags
from ml_collections import config_flags

from slkd_jax import cli
from slkd_jax.errors import CheckpointError, ConfigError

PROG = "python -m slkd_jax.evaluate"


def define_flags(fv: flags.FlagValues, argv: Sequence[str]) -> None:
  """The flags of ``python -m slkd_jax.evaluate``."""
  flags.DEFINE_string("workdir", None, "A training workdir.", flag_values=fv)
  flags.DEFINE_list("stage", None, "Stages to evaluate (default: every stage "
                    "of the workdir).", flag_values=fv)
  flags.DEFINE_enum("checkpoint", "best", ["best", "latest"],
                    "Which checkpoint of each stage: the best epoch's, or the "
                    "newest training checkpoint.", flag_values=fv)
  flags.DEFINE_string("model", None, "A standalone model: a stage's "
                      "best_model/final_model dir, a converted teacher, or a "
                      ".pth (a workdir goes to --workdir).", flag_values=fv)
  flags.DEFINE_string("arch", None, "Architecture of a .pth --model.",
                      flag_values=fv)
  config_flags.DEFINE_config_file(
      "config", None, "With --model: the config whose data to evaluate on.",
      flag_values=fv, sys_argv=list(argv))


_COLUMNS = ["stage", "checkpoint", "epoch", "network", "top-1", "top-5"]


def _stage_config(stage_dir: str):
  import ml_collections
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
  from slkd_jax import evaluation, parallel, teachers, train_step
  from slkd_jax import data as data_lib
  from slkd_jax import stage as stage_lib
  from slkd_jax import state as state_lib
  stage_dir = os.path.join(workdir, stage)
  config = _stage_config(stage_dir)
  directory = _checkpoint_dir(stage_dir, which)  # before minutes of setup
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
  trainable, meta = _restore(directory, which, state.replace(teacher=None),
                             mesh)
  result = evaluation.evaluate(train_step.make_eval_step(resolved, mesh),
                          trainable.replace(teacher=teacher), eval_data,
                          resolved.hparams(max(meta["epoch"], 1)))
  return _rows(stage, which, meta["epoch"], result)


def _instead(which: str) -> str:
  return ("; evaluate the newest training checkpoint with "
          "--checkpoint=latest" if which == "best" else "")


def _checkpoint_dir(stage_dir: str, which: str) -> str:
  """The stage's directory of ``which`` checkpoints; a
  :class:`CheckpointError` when there is none (``Checkpointer`` would
  create it)."""
  directory = os.path.join(stage_dir,
                           "best" if which == "best" else "checkpoints")
  if not os.path.isdir(directory):
    raise CheckpointError(f"{directory} does not exist: the stage has no "
                          f"{which} checkpoint{_instead(which)}")
  return directory


def _restore(directory: str, which: str, trainable, mesh):
  """``(state, meta)`` of the newest readable checkpoint in ``directory``
  (of ``which`` kind), or a :class:`CheckpointError` that says what to
  evaluate instead."""
  from slkd_jax import checkpoint
  ckpt = checkpoint.Checkpointer(directory, 1)
  try:
    restored = ckpt.restore_latest(checkpoint.abstract_like(trainable, mesh))
  except CheckpointError:  # its advice is for training: ours instead
    raise CheckpointError(f"none of the checkpoints in {directory} can be "
                          f"read (see the warnings above){_instead(which)}"
                          ) from None
  finally:
    ckpt.close()
  if restored is None:
    raise CheckpointError(f"{directory} holds no checkpoint yet"
                          f"{_instead(which)}")
  return restored


def _model_dir_mistake(path: str) -> str | None:
  """Advice when ``--model`` names a training workdir or a stage of one
  (``--model`` takes one network's directory)."""
  if not os.path.isfile(os.path.join(path, "config.json")):
    return None
  if _stages(path):
    return (f"--model={path} is a training workdir: evaluate it with "
            f"--workdir={path}, or one network with "
            f"--model={os.path.join(path, '<stage>', 'best_model')}")
  if any(os.path.isdir(os.path.join(path, d))
         for d in ("best_model", "final_model", "best", "checkpoints")):
    workdir, stage = os.path.split(os.path.normpath(path))
    return (f"--model={path} is a stage of a training workdir: evaluate it "
            f"with --workdir={workdir} --stage={stage}, or its network with "
            f"--model={os.path.join(path, 'best_model')}")
  return None


def evaluate_model(path: str, config, arch: str | None, mesh) -> list[dict]:
  """Rows of :data:`_COLUMNS` for one standalone network (placed as a
  teacher is: replicated, in the run's parameter dtype)."""
  import jax.numpy as jnp
  from slkd_jax import (artifact, convert_torch, evaluation, parallel,
                        teachers, train_step)
  from slkd_jax import data as data_lib
  from slkd_jax import stage as stage_lib
  from slkd_jax import state as state_lib
  if artifact.is_artifact(path):
    variables, meta = artifact.load(path)
  elif mistake := _model_dir_mistake(path):
    raise ConfigError(mistake)
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
  then of each run's (labelled ``runs/<r>/<stage>``). A progress line on
  stderr counts the stages (each compiles its evaluation: minutes on a CPU).
  """
  import jax
  from slkd_jax import metrics
  jobs = _stage_jobs(workdir, stages)
  rows = []
  bar = metrics.ProgressBar(len(jobs), "evaluate",
                            enabled=jax.process_index() == 0)
  with bar:
    for done, (directory, stage, label) in enumerate(jobs):
      bar.update(done, stage=label)
      try:
        rows += [{**row, "stage": label}
                 for row in evaluate_stage(directory, stage, which, mesh)]
      except CheckpointError as e:
        if directory == workdir:
          raise
        print(f"note: {label}: {e}", file=sys.stderr)  # a diverged run
      bar.update(done + 1, stage=label)
  if not rows:
    raise ConfigError(f"{workdir} has no stage {', '.join(stages or [])} to "
                      f"evaluate")
  return rows


def _stage_jobs(workdir: str, stages: list[str] | None
                ) -> list[tuple[str, str, str]]:
  """``(directory, stage, label)`` of each stage to evaluate: the
  workdir's, then (a study) each run's, labelled ``runs/<r>/<stage>``."""
  from slkd_jax import report
  directories = report.with_study_runs([workdir])
  jobs = []
  for directory in directories:
    found = _stages(directory)
    wanted = stages or found
    if len(directories) > 1:  # a study: a stage lives in its runs or not
      wanted = [s for s in wanted if s in found]
    prefix = os.path.relpath(directory, workdir)
    jobs += [(directory, stage, os.path.normpath(os.path.join(prefix, stage)))
             for stage in wanted]
  return jobs


def run_evaluation(fv: flags.FlagValues, positional: list[str]) -> None:
  """Evaluate ``--workdir`` or ``--model`` and print the table."""
  from slkd_jax import metrics, parallel
  cli.unexpected(positional)
  if fv.model:
    config = cli.config_value(fv["config"])
    if config is None:
      raise ConfigError("--model needs --config (the data to evaluate on)")
    rows = evaluate_model(fv.model, config, fv.arch, parallel.make_mesh())
  elif fv.workdir:
    workdir = os.path.abspath(fv.workdir)
    if not os.path.isdir(workdir):
      raise ConfigError(f"--workdir={workdir} is not a directory")
    rows = evaluate_workdir(workdir, fv.stage, fv.checkpoint,
                            parallel.make_mesh())
  else:
    raise ConfigError("give --workdir (a training run) or --model (one "
                      "network); see --help")
  print(metrics.summary_table(rows, _COLUMNS), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m slkd_jax.evaluate``; ``argv``: the arguments after the
  program name (default ``sys.argv[1:]``). Returns the exit status."""
  return cli.run(define_flags, run_evaluation, argv, prog=PROG, doc=__doc__)


if __name__ == "__main__":
  cli.start(main)
