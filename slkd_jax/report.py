"""Aggregate finished runs: mean ± std over seeds of each stage's top-1.

  python -m slkd_jax.report runs/r32x4_r8x4_seed0 runs/r32x4_r8x4_seed1 ...

Reads each workdir's ``<stage>/metrics.jsonl`` and prints, per stage, the
best-epoch top-1 (the mdistiller/SLKD convention) and the last-epoch top-1
(RepDistiller's) of the trained network, as mean ± std over the workdirs
(sample std, ``ddof=1``), plus the fused SL-T's and the teacher's.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

from slkd_jax import metrics


def stage_histories(workdir: str) -> dict[str, list[dict]]:
  """``{stage: [per-epoch eval records]}`` of one workdir (eval keys without
  the ``eval/`` prefix)."""
  histories = {}
  for path in sorted(glob.glob(os.path.join(workdir, "*", "metrics.jsonl"))):
    records = [{k.removeprefix("eval/"): v for k, v in r.items()}
               for r in metrics.read_jsonl(path) if "eval/student/top1" in r]
    if records:
      histories[os.path.basename(os.path.dirname(path))] = records
  return histories


def aggregate(workdirs: list[str]) -> list[dict]:
  """One row per stage: mean ± std over ``workdirs`` of best/last top-1."""
  per_stage: dict[str, list[list[dict]]] = {}
  for workdir in workdirs:
    for stage, history in stage_histories(workdir).items():
      per_stage.setdefault(stage, []).append(history)
  rows = []
  for stage, histories in per_stage.items():
    row = {"stage": stage, "runs": len(histories)}
    for label, key, pick in (("best top-1", "student/top1", 0),
                             ("last top-1", "student/top1", 2),
                             ("fused SL-T best", "slt_fused/top1", 0),
                             ("teacher top-1", "teacher/top1", 2)):
      row[label] = metrics.mean_std(
          metrics.best_and_last(h, key)[pick] for h in histories)
    rows.append(row)
  return rows


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdirs", nargs="+", help="finished run workdirs")
  args = parser.parse_args(argv)
  missing = [w for w in args.workdirs if not os.path.isdir(w)]
  if missing:
    print(f"error: not a directory: {', '.join(missing)}", file=sys.stderr)
    return 2
  rows = aggregate(args.workdirs)
  if not rows:
    print("error: no evaluated stage found (metrics.jsonl with eval records) "
          f"in {', '.join(args.workdirs)}", file=sys.stderr)
    return 2
  print(metrics.summary_table(rows, ["stage", "runs", "best top-1",
                                     "last top-1", "fused SL-T best",
                                     "teacher top-1"]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
