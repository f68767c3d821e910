"""Aggregate finished runs: mean ± std over seeds of each stage's top-1.

  python -m slkd_jax.report runs/r32x4_r8x4_seed0 runs/r32x4_r8x4_seed1 ...

Reads each workdir's ``<stage>/metrics.jsonl`` and prints, per stage, the
best-epoch top-1 (the mdistiller/SLKD convention) and the last-epoch top-1
(RepDistiller's) of the trained network, as mean ± std over the workdirs
(sample std, ``ddof=1``), plus the fused SL-T's and the teacher's.

Only finished stages count: a stage is finished when its eval records reach
its config's ``num_epochs``. Unfinished stages are listed below the table,
marked, with the last epoch they reached, and never enter a mean. When a log
holds an epoch more than once (a crash, then a resume from an older
checkpoint), the last record of that epoch counts.

The stage config is ``<stage>/config.json`` (its recipe resolved into
``loss``); a stage without one counts as unfinished. Runs of a
stage whose configs differ in anything but the seed and the
:data:`IGNORED_KEYS` (and ``slkd.*`` for methods without SL-Ts) are not
averaged: the report exits with status 2 and names the keys and the
workdirs (``--ignore KEY`` adds a key to skip).

A study's workdir (``config.study``, docs/studies.md) stands for itself
(its teacher stage) and its runs ``runs/<r>``, each read as a workdir.
A workdir named twice (``runs/a`` and ``runs/a/``, or through a symlink) is
counted once, with a warning.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import sys
from typing import Any, Iterable, Sequence

from slkd_jax import config as config_lib
from slkd_jax import metrics

# Config keys whose value does not change what a run measures (declared in
# slkd_jax/config.py, with the resume check), so runs differing in them are
# still averaged.
IGNORED_KEYS: tuple[str, ...] = (config_lib.RANDOM_DRAW_KEYS
                                 + config_lib.NO_EFFECT_KEYS)

_ABSENT = "<absent>"


class ConfigMismatchError(ValueError):
  """Runs of one stage differ in a config key that changes their meaning."""


@dataclasses.dataclass
class StageRun:
  """One stage of one workdir: its per-epoch eval history and config."""
  workdir: str
  stage: str
  history: list[dict[str, Any]]  # one record per epoch, by epoch, no "eval/"
  config: dict[str, Any] | None  # flattened to dotted keys; None: not found

  @property
  def num_epochs(self) -> int | None:
    """The stage's configured epochs, None when its config is unknown."""
    return None if self.config is None else self.config.get("num_epochs")

  @property
  def last_epoch(self) -> int:
    return self.history[-1]["epoch"] if self.history else 0

  @property
  def finished(self) -> bool:
    return self.num_epochs is not None and self.last_epoch >= self.num_epochs

  @property
  def result(self) -> list[dict[str, Any]]:
    """The history the reported numbers come from: the epochs of a
    ``num_epochs`` run (later ones, from a rerun with a smaller
    ``num_epochs``, are not part of it), after
    ``report_best_after_epoch`` where the config sets one (TESKD: 150)."""
    history = [r for r in self.history if r["epoch"] <= self.num_epochs]
    return metrics.reported_history(
        history, self.config.get("report_best_after_epoch", 0) or 0)


def unique_workdirs(workdirs: Sequence[str]) -> tuple[list[str], list[str]]:
  """``(workdirs without repeats, warnings)``; two names are the same
  workdir when their real paths (symlinks resolved) are equal."""
  seen: dict[str, str] = {}
  kept, warnings = [], []
  for workdir in workdirs:
    real = os.path.realpath(workdir)
    if real in seen:
      warnings.append(f"warning: {workdir} is the same directory as "
                      f"{seen[real]} ({real}); counted once")
      continue
    seen[real] = workdir
    kept.append(workdir)
  return kept, warnings


def warn_unreadable(path: str, line_numbers: Sequence[int]) -> None:
  """One line on stderr: ``path`` has unreadable lines, which the report
  skips (a record lost there is not silently missing from a mean)."""
  count = len(line_numbers)
  shown = ", ".join(str(n) for n in line_numbers[:10]) + (
      ", ..." if count > 10 else "")
  print(f"warning: {path}: {count} unreadable line{'s' if count > 1 else ''} "
        f"skipped (line{'s' if count > 1 else ''} {shown}; not JSON: a write "
        f"cut short by a crash?)", file=sys.stderr)


def eval_history(path: str) -> list[dict[str, Any]]:
  """The eval records of a ``metrics.jsonl`` (keys without ``eval/``), one
  per epoch in epoch order; a repeated epoch keeps its last record, which
  the resumed run wrote. Unreadable lines are skipped with a warning
  (:func:`warn_unreadable`)."""
  by_epoch: dict[int, dict[str, Any]] = {}
  records, unreadable = metrics.read_jsonl_checked(path)
  if unreadable:
    warn_unreadable(path, unreadable)
  records = [r for r in records if "eval/student/top1" in r]
  for index, record in enumerate(records):
    record = {k.removeprefix("eval/"): v for k, v in record.items()}
    record.setdefault("epoch", index + 1)  # logs that lack it: by position
    by_epoch[record["epoch"]] = record
  return [by_epoch[e] for e in sorted(by_epoch)]


def _read_json(path: str) -> dict[str, Any] | None:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    return None


def stage_config(workdir: str, stage: str) -> dict[str, Any] | None:
  """The flat config of one stage (``<stage>/config.json``, written by
  training when the stage starts); None when there is none."""
  own = _read_json(os.path.join(workdir, stage, "config.json"))
  return None if own is None else config_lib.flatten(own)


def with_study_runs(workdirs: Iterable[str]) -> list[str]:
  """``workdirs``, each study's followed by its runs' (``runs/<r>``)."""
  expanded = []
  for workdir in workdirs:
    expanded.append(workdir)
    runs = glob.glob(os.path.join(workdir, "runs", "*", "config.json"))
    indices = sorted(int(os.path.basename(os.path.dirname(p))) for p in runs
                     if os.path.basename(os.path.dirname(p)).isdigit())
    expanded += [os.path.join(workdir, "runs", str(r)) for r in indices]
  return expanded


def load_runs(workdirs: Iterable[str]) -> list[StageRun]:
  """Every stage with eval records in ``workdirs``, finished or not."""
  runs = []
  for workdir in workdirs:
    for path in sorted(glob.glob(os.path.join(workdir, "*", "metrics.jsonl"))):
      history = eval_history(path)
      if history:
        stage = os.path.basename(os.path.dirname(path))
        runs.append(StageRun(workdir, stage, history,
                             stage_config(workdir, stage)))
  return runs


def check_configs(runs: Sequence[StageRun],
                  ignore: Iterable[str] = IGNORED_KEYS) -> None:
  """Raises :class:`ConfigMismatchError` (a one-line message naming the
  stage, the keys, their values and the workdirs) when runs of one stage
  differ in a key that is not ignored."""
  by_stage: dict[str, list[StageRun]] = {}
  for run in runs:
    by_stage.setdefault(run.stage, []).append(run)
  for stage, group in by_stage.items():
    # A section is skipped when no run's method reads it.
    unused = set.intersection(*(set(config_lib.unused_sections(
        (r.config or {}).get("method"))) for r in group))
    skip = tuple(ignore) + tuple(sorted(unused))
    keys = sorted({k for r in group for k in r.config or {}})
    differing = [k for k in keys if not config_lib.is_listed(k, skip)
                 and len({_value(r, k) for r in group}) > 1]
    if differing:
      details = "; ".join(f"{k} ({_values_by_workdir(group, k)})"
                          for k in differing)
      raise ConfigMismatchError(
          f"stage {stage!r}: the runs differ in more than the seed, not "
          f"averaging them: {details} (--ignore KEY if a key does not matter)")


def _canonical(value: Any) -> Any:
  # 4 and 4.0 are the same setting (a command-line override may give either).
  if isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if isinstance(value, list):
    return [_canonical(v) for v in value]
  return value


def _value(run: StageRun, key: str) -> str:
  """``key``'s value in ``run``'s config as comparable text."""
  return json.dumps(_canonical((run.config or {}).get(key, _ABSENT)))


def _values_by_workdir(runs: Sequence[StageRun], key: str) -> str:
  """``"4.0: runs/a, runs/b vs 2.0: runs/c"``."""
  groups: dict[str, list[str]] = {}
  for run in runs:
    groups.setdefault(_value(run, key), []).append(run.workdir)
  return " vs ".join(f"{v}: {', '.join(w)}" for v, w in groups.items())


# The columns of metrics.stage_row averaged over seeds (its best epoch is
# not: it differs from seed to seed).
AVERAGED = ("best top-1", "last top-1", "fused SL-T best", "teacher top-1")
COLUMNS = ["stage", "runs", "seeds", *AVERAGED]


def aggregate(runs: Sequence[StageRun]) -> list[dict]:
  """One row per stage: mean ± std over the finished ``runs`` of best/last
  top-1 (unfinished runs are skipped)."""
  per_stage: dict[str, list[StageRun]] = {}
  for run in runs:
    if run.finished:
      per_stage.setdefault(run.stage, []).append(run)
  rows = []
  for stage, group in per_stage.items():
    picks = [metrics.stage_row(r.result) for r in group]
    row = {"stage": stage, "runs": len(group),
           "seeds": ",".join(str(r.config.get("seed")) for r in group)}
    for label in AVERAGED:
      row[label] = metrics.mean_std(p[label] for p in picks)
    rows.append(row)
  return rows


def seed_warnings(runs: Sequence[StageRun]) -> list[str]:
  """Warnings for finished runs of a stage sharing a seed: they are not
  independent samples, so the std understates the spread."""
  warnings, seen = [], {}
  for run in runs:
    if not run.finished:
      continue
    key = (run.stage, json.dumps(run.config.get("seed")))
    if key in seen:
      warnings.append(f"warning: stage {run.stage!r}: {seen[key]} and "
                      f"{run.workdir} have the same seed {key[1]}")
    else:
      seen[key] = run.workdir
  return warnings


def unfinished_lines(runs: Sequence[StageRun]) -> list[str]:
  """One marked line per unfinished stage, with the last epoch it reached."""
  lines = []
  for run in runs:
    if run.finished:
      continue
    if run.config is None:
      target = "? (no config.json)"
    elif run.num_epochs is None:
      target = "? (no num_epochs in its config)"
    else:
      target = str(run.num_epochs)
    lines.append(f"  [unfinished] {run.workdir} {run.stage}: "
                 f"epoch {run.last_epoch}/{target}")
  return lines


PROG = "python -m slkd_jax.report"


def define_flags(fv, argv: Sequence[str]) -> None:
  """The flags of ``python -m slkd_jax.report WORKDIR...``."""
  from absl import flags  # noqa: PLC0415
  del argv  # no config flag
  flags.DEFINE_multi_string(
      "ignore", [], "A further config key (dotted) that may differ between "
      "runs; repeatable. Always ignored: " + ", ".join(IGNORED_KEYS),
      flag_values=fv)


def report_workdirs(fv, workdirs: list[str]) -> int:
  """Print the table of ``workdirs``; 2 (with one line on stderr) when
  there is nothing to report."""
  from slkd_jax import errors  # noqa: PLC0415
  if not workdirs:
    raise errors.ConfigError(f"name the run workdirs: {PROG} WORKDIR... "
                             f"(one a seed)")
  missing = [w for w in workdirs if not os.path.isdir(w)]
  if missing:
    raise errors.ConfigError(f"not a directory: {', '.join(missing)}")
  workdirs, warnings = unique_workdirs(with_study_runs(workdirs))
  for warning in warnings:
    print(warning, file=sys.stderr)
  runs = load_runs(workdirs)
  try:
    check_configs([r for r in runs if r.finished],
                  IGNORED_KEYS + tuple(fv.ignore))
  except ConfigMismatchError as e:
    raise errors.ConfigError(str(e)) from None
  for warning in seed_warnings(runs):
    print(warning, file=sys.stderr)
  return _print_report(runs, workdirs)


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m slkd_jax.report WORKDIR... [--ignore=KEY]``; ``argv``: the
  arguments after the program name (default ``sys.argv[1:]``). Returns the
  exit status (:mod:`slkd_jax.cli`): 2, with one line on stderr, when there
  is nothing to report or the runs' configs differ."""
  from slkd_jax import cli  # noqa: PLC0415
  return cli.run(define_flags, report_workdirs, argv, prog=PROG, doc=__doc__)


def _print_report(runs: Sequence[StageRun], workdirs: Sequence[str]) -> int:
  rows, unfinished = aggregate(runs), unfinished_lines(runs)
  if rows:
    print(metrics.summary_table(rows, COLUMNS))
  if unfinished:
    print(("\n" if rows else "") +
          "Unfinished stages, not in any mean (last eval epoch/num_epochs):")
    print("\n".join(unfinished))
  if not rows:
    what = "finished stage" if runs else (
        "evaluated stage (metrics.jsonl with eval records)")
    print(f"error: no {what} in {', '.join(workdirs)}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  from slkd_jax import cli
  cli.start(main)
