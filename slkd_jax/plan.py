"""A run's config resolved once: every stage, every run of it, their dirs.

:func:`plan_run` turns the user's config into a list of :class:`StagePlan`
before anything trains, so a bad setting of the last stage fails before the
first one starts, and no code below reads the ``ConfigDict`` to decide what
to compute. A single run is a study of one: its stage has one run, whose
directory is the stage's own (``workdir/<stage>``); a study's run ``r`` lives
in ``workdir/runs/<r>/<stage>`` (docs/studies.md).
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections

from slkd_jax import config as config_lib
from slkd_jax import stage as stage_lib

TEACHER_STAGE = config_lib.TEACHER_STAGE
RUNS_DIR = "runs"


@dataclasses.dataclass(frozen=True)
class StagePlan:
  """One stage of a run, resolved.

  Attributes:
    name: the stage's name (``teacher`` or a method).
    config: the stage's config (for a study, the study's).
    run_configs: run ``r``'s config, as the separate run that trains
      exactly it would have it (a single run: ``(config,)``).
    stages: run ``r``'s resolved :class:`~slkd_jax.stage.Stage`.
    stage_dir: ``workdir/<name>`` (the checkpoints of all runs together).
    run_dirs: run ``r``'s stage directory (a single run: ``stage_dir``).
    study: whether the stage is trained as a study (its checkpoints hold
      every run stacked, its runs' files live apart).
    impl: how the step maps over runs (``'vmap'`` or ``'unrolled'``).
    shared_data: whether every run sees the same batches.
  """
  name: str
  config: ml_collections.ConfigDict
  run_configs: tuple[ml_collections.ConfigDict, ...]
  stages: tuple[stage_lib.Stage, ...]
  stage_dir: str
  run_dirs: tuple[str, ...]
  study: bool
  impl: str
  shared_data: bool

  @property
  def runs(self) -> int:
    return len(self.stages)

  @property
  def method(self) -> str:
    return self.config.method


def run_dir(workdir: str, r: int) -> str:
  """Run ``r``'s workdir inside a study's."""
  return os.path.join(workdir, RUNS_DIR, str(r))


def _single(config, name: str, workdir: str) -> StagePlan:
  stage_dir = os.path.join(workdir, name)
  return StagePlan(name, config, (config,), (stage_lib.resolve(config),),
                   stage_dir, (stage_dir,), study=False, impl="unrolled",
                   shared_data=True)


def _study(config, run_configs, name: str, workdir: str) -> StagePlan:
  runs = tuple(config_lib.stage_config(c, name) for c in run_configs)
  return StagePlan(
      name, config_lib.stage_config(config, name), runs,
      tuple(stage_lib.resolve(c) for c in runs),
      os.path.join(workdir, name),
      tuple(os.path.join(run_dir(workdir, r), name)
            for r in range(len(runs))),
      study=True, impl=config.study.impl or config.slkd.ensemble,
      shared_data=bool(config.study.shared_data))


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """Every stage of a run in training order, and a study's runs.

  Attributes:
    config: the run's config.
    workdir: its (absolute) workdir.
    stages: the teacher stage first when there is one, then the
      distillation stages.
    study_runs: run ``r``'s whole config in a study (``workdir/runs/<r>/
      config.json``), empty for a single run.
  """
  config: ml_collections.ConfigDict
  workdir: str
  stages: tuple[StagePlan, ...]
  study_runs: tuple[ml_collections.ConfigDict, ...]


def plan_run(config: ml_collections.ConfigDict, workdir: str,
             with_teacher_stage: bool) -> RunPlan:
  """Resolve every stage of ``config`` in ``workdir``: the teacher stage
  first when ``with_teacher_stage``, then the distillation stages (each a
  study when ``config.study.seeds`` is set).

  Raises:
    ConfigError: a stage's settings do not fit its networks or method.
  """
  plans = []
  if with_teacher_stage:  # trained once, shared by a study's runs
    plans.append(_single(config_lib.stage_config(config, TEACHER_STAGE),
                         TEACHER_STAGE, workdir))
  run_configs = (config_lib.run_configs(config)
                 if config_lib.is_study(config) else None)
  for method in config_lib.stage_methods(config):
    if run_configs is None:
      plans.append(_single(config_lib.stage_config(config, method), method,
                           workdir))
    else:
      plans.append(_study(config, run_configs, method, workdir))
  return RunPlan(config, workdir, tuple(plans), tuple(run_configs or ()))
