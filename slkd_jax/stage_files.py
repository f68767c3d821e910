"""What a run leaves on disk besides checkpoints and metrics: trained
models, summaries, a study's own files and its runs' workdirs.

Layout (docs/studies.md for studies): each run's stage directory holds
``best_model/`` and ``final_model/`` (the trained network alone,
:mod:`slkd_jax.artifact`) and ``summary.md``; a study's stage directory
holds ``study.json`` and ``summary.md`` (every run, mean ± std); the
workdir's ``summary.md`` compares the stages; a study's ``runs/<r>/`` reads
as the workdir of the separate run ``r``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from slkd_jax import artifact, metrics, teachers
from slkd_jax.plan import RUNS_DIR, TEACHER_STAGE, StagePlan, run_dir


@dataclasses.dataclass
class StageResult:
  """What a finished stage (or one run of a study stage) leaves behind:
  the trained state (without the frozen teacher, which is ``teacher``)."""
  name: str
  method: str
  state: Any
  history: list[dict[str, Any]]
  teacher: Any = None


def reported(history: list[dict[str, Any]], config) -> list[dict[str, Any]]:
  """The epochs a stage's best is reported over (after
  ``config.report_best_after_epoch``; TESKD: 150)."""
  return metrics.reported_history(history,
                                  config.get("report_best_after_epoch", 0))


def is_best_epoch(history: list[dict[str, Any]], config, epoch: int) -> bool:
  """Whether ``epoch`` (just recorded) is the best reported one so far."""
  return metrics.best_and_last(reported(history, config),
                               "student/top1")[1] == epoch


def save_model(stage, config, stage_dir: str, name: str, state, epoch: int,
               record) -> None:
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


def display_names(stage: str) -> dict[str, str]:
  """How a stage's networks are shown (logs, summaries, plots,
  TensorBoard): the teacher stage trains the teacher in the ``student``
  slot of the metrics, so it is shown as the teacher there."""
  return {"student": "teacher"} if stage == TEACHER_STAGE else {}


def summary_rows(stage: str, history: list[dict[str, Any]]) -> list[dict]:
  """A stage's :data:`~slkd_jax.metrics.NETWORK_COLUMNS` rows as shown: the
  trained network by its role, the frozen teacher without a best epoch
  (it is the same network every epoch)."""
  names = display_names(stage)
  rows = metrics.network_rows(history)
  for row in rows:
    if row["network"] == "teacher":
      row.update({"network": "teacher (frozen)", "best epoch": "-"})
    else:
      row["network"] = names.get(row["network"], row["network"])
  return rows


def write_stage_summary(stage_dir: str, name: str,
                        history: list[dict[str, Any]]) -> None:
  """``stage_dir/summary.md``: best/last top-1 and top-5 per network."""
  table = metrics.summary_table(summary_rows(name, history),
                                metrics.NETWORK_COLUMNS)
  with open(os.path.join(stage_dir, "summary.md"), "w") as f:
    f.write(f"# stage {name}\n\n{table}\n")


def comparison_table(results: dict[str, StageResult]) -> str:
  """Best/last top-1 of each stage's trained network (the student, or the
  teacher for the teacher stage), plus the SL-T fusion where present."""
  rows = [{"stage": name, "method": result.method,
           **metrics.stage_row(result.history)}
          for name, result in results.items()]
  return metrics.summary_table(rows, ["stage", "method",
                                      *metrics.STAGE_COLUMNS])


def describe_run(plan: StagePlan, r: int) -> str:
  """``seed 3, temperature 8.0``: what distinguishes run ``r``."""
  parts = [f"seed {plan.run_configs[r].seed}"]
  for key, values in plan.config.study.vary.items():
    if values is not None:
      parts.append(f"{key} {values[r]}")
  return ", ".join(parts)


def _study_rows(plan: StagePlan, histories, diverged) -> list[dict]:
  """One row per run (seed, varied values, status, best/last top-1)."""
  rows = []
  for r in range(plan.runs):
    row = {"run": r, "seed": plan.run_configs[r].seed}
    for key, values in plan.config.study.vary.items():
      if values is not None:
        row[key] = values[r]
    row["status"] = ("done" if diverged[r] is None else
                     f"diverged at step {diverged[r]['step']} "
                     f"({', '.join(diverged[r]['terms'])})")
    best, best_epoch, last = metrics.best_and_last(
        reported(histories[r], plan.config), "student/top1")
    row.update({"best top-1": best, "best epoch": best_epoch,
                "last top-1": last})
    rows.append(row)
  return rows


def write_study_files(plan: StagePlan, histories, diverged) -> None:
  """A study stage's ``summary.md`` (every run, then mean ± std over the
  runs that did not diverge) and ``study.json``."""
  rows = _study_rows(plan, histories, diverged)
  kept = [row for row in rows if row["status"] == "done"
          and row["best top-1"] is not None]
  mean = {"run": f"mean ± std ({len(kept)}/{len(rows)})"}
  for key in ("best top-1", "last top-1"):
    mean[key] = (metrics.mean_std([row[key] for row in kept]) if kept
                 else "-")
  table = metrics.summary_table(rows + [mean], list(rows[0]))
  with open(os.path.join(plan.stage_dir, "summary.md"), "w") as f:
    f.write(f"# study {plan.name}: {plan.runs} runs\n\n{table}\n")
  with open(os.path.join(plan.stage_dir, "study.json"), "w") as f:
    json.dump({"stage": plan.name, "runs": rows,
               "run_dirs": list(plan.run_dirs)}, f, indent=2)


def study_summary(plan: StagePlan) -> str:
  """The study summary (``<stage>/summary.md``) of a finished stage."""
  with open(os.path.join(plan.stage_dir, "summary.md")) as f:
    return f.read().strip()


def write_run_workdirs(workdir: str, run_configs,
                       results: dict[str, StageResult], config) -> None:
  """Each study run's ``config.json``, ``summary.md`` and link to the
  study's frozen teacher: a run directory reads as the workdir of a
  separate run."""
  for r, run_config in enumerate(run_configs):
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
        result, history=reported(result.history, config))
            for key, result in results.items() if key.startswith(prefix)}
    with open(os.path.join(directory, "summary.md"), "w") as f:
      f.write(comparison_table(mine) + "\n")
