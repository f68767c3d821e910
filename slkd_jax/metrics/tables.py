"""The numbers a stage, a run and a set of seeds report, and their tables:
best-epoch and last-epoch accuracy per network, a stage's headline row,
mean ± std over seeds, and markdown tables of rows."""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from slkd_jax.metrics.values import to_python


def _is_missing(value: Any) -> bool:
  if value is None:
    return True
  try:
    return math.isnan(float(value))
  except (TypeError, ValueError):
    return False


def best_and_last(history: Sequence[Mapping[str, Any]], key: str,
                  mode: str = "max") -> tuple[Any, Any, Any]:
  """``(best value, its epoch, last value)`` of ``key`` over per-epoch dicts.

  Entries without ``key`` are skipped; NaN never counts as best. The epoch is
  the entry's ``'epoch'`` (its 1-based position when absent); ties go to the
  earliest epoch. ``mode='min'`` picks the smallest value (losses, KL).
  Returns ``(None, None, None)`` when no entry has ``key``.
  """
  if mode not in ("max", "min"):
    raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
  best = best_epoch = last = None
  for index, entry in enumerate(history):
    if key not in entry:
      continue
    value = to_python(entry[key])
    last = value
    if _is_missing(value):
      continue
    better = (best is None or (value > best if mode == "max" else value < best))
    if better:
      best, best_epoch = value, entry.get("epoch", index + 1)
  return best, best_epoch, last


def _network_order(name: str) -> tuple:
  # student first, then SL-Ts by index, fused, teacher, anything else.
  if name == "student":
    return (0, 0, name)
  if name.startswith("slt_") and name[4:].isdigit():
    return (1, int(name[4:]), name)
  if name == "slt_fused":
    return (2, 0, name)
  if name == "teacher":
    return (3, 0, name)
  return (4, 0, name)


def networks(history: Sequence[Mapping[str, Any]]) -> list[str]:
  """The networks with a ``<net>/top1`` value in ``history``: the student,
  the SL-Ts by index, the fused SL-T, the teacher, then any others."""
  names = {k.rsplit("/", 1)[0] for entry in history for k, v in entry.items()
           if isinstance(k, str) and k.endswith("/top1") and v is not None}
  return sorted(names, key=_network_order)


NETWORK_COLUMNS = ("network", "best top-1", "best epoch", "last top-1",
                   "last top-5")


def network_rows(history: Sequence[Mapping[str, Any]],
                 names: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """One row of :data:`NETWORK_COLUMNS` per network of a per-epoch eval
  history (entries ``{"epoch", "<net>/top1", "<net>/top5", ...}``).

  ``names`` picks the networks and their order (default :func:`networks`);
  a network absent from ``history`` gets ``None`` cells (printed ``-``).
  A history of one record (a single evaluation) gives that record's numbers
  as both best and last.
  """
  rows = []
  for net in networks(history) if names is None else names:
    best, best_epoch, last = best_and_last(history, f"{net}/top1")
    rows.append({"network": net, "best top-1": best, "best epoch": best_epoch,
                 "last top-1": last,
                 "last top-5": best_and_last(history, f"{net}/top5")[2]})
  return rows


STAGE_COLUMNS = ("best top-1", "best epoch", "last top-1", "fused SL-T best",
                 "teacher top-1")


def stage_row(history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """The headline numbers of one stage (:data:`STAGE_COLUMNS`): best top-1
  (and its epoch) and last top-1 of its trained network (``student``), the
  fused SL-T's best and the frozen teacher's top-1 (its last; ``None`` where
  the stage has no such network)."""
  student, fused, teacher = network_rows(
      history, ("student", "slt_fused", "teacher"))
  return {"best top-1": student["best top-1"],
          "best epoch": student["best epoch"],
          "last top-1": student["last top-1"],
          "fused SL-T best": fused["best top-1"],
          "teacher top-1": teacher["last top-1"]}


def reported_history(history: Sequence[Mapping[str, Any]], after_epoch: int
                     ) -> Sequence[Mapping[str, Any]]:
  """The epochs the best top-1 is reported over: those after
  ``after_epoch`` (``config.report_best_after_epoch``; TESKD: 150), or every
  epoch while there is none (``after_epoch`` 0, or a short run)."""
  later = [h for h in history if h.get("epoch", 0) > after_epoch]
  return later or list(history)


def mean_std(values: Iterable[Any], fmt: str = "{:.2f}", ddof: int = 1) -> str:
  """``"mean ± std"`` over seeds, e.g. ``"73.41 ± 0.22"``.

  The std is the sample standard deviation (``ddof=1``, the usual choice when
  reporting a handful of seeds); a single value is printed alone, since its
  spread is unknown. ``None`` entries are ignored; no values gives ``"-"``.
  """
  data = [float(to_python(v)) for v in values if v is not None]
  if not data:
    return "-"
  mean = float(np.mean(data))
  if len(data) <= ddof:
    return fmt.format(mean)
  std = float(np.std(data, ddof=ddof))
  return f"{fmt.format(mean)} ± {fmt.format(std)}"


def _cell(value: Any, float_fmt: str) -> str:
  if value is None:
    return "-"
  value = to_python(value)
  if isinstance(value, float):
    return float_fmt.format(value)
  return str(value)


def _is_number(value: Any) -> bool:
  value = to_python(value)
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def summary_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
                  float_fmt: str = "{:.2f}") -> str:
  """A markdown-compatible table with columns padded to equal width.

  Missing cells show ``-``; floats use ``float_fmt``. Columns whose cells
  are all numbers are right-aligned (``---:`` in markdown), others left.
  """
  columns = list(columns)
  cells = [[_cell(row.get(c), float_fmt) for c in columns] for row in rows]
  numeric = [
      all(_is_number(row[c]) for row in rows if row.get(c) is not None) and
      any(row.get(c) is not None for row in rows) for c in columns
  ]
  # At least 3 wide so the markdown separator '---' fits.
  widths = [max([len(c), 3] + [len(r[i]) for r in cells])
            for i, c in enumerate(columns)]

  def fmt_row(texts: Sequence[str]) -> str:
    padded = [t.rjust(w) if num else t.ljust(w)
              for t, w, num in zip(texts, widths, numeric)]
    return "| " + " | ".join(padded) + " |"

  separator = "| " + " | ".join(
      ("-" * (w - 1) + ":") if num else "-" * w
      for w, num in zip(widths, numeric)) + " |"
  lines = [fmt_row(columns), separator] + [fmt_row(r) for r in cells]
  return "\n".join(lines)
