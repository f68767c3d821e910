"""Reporting: JSONL logs, TensorBoard, progress, tables, plots.

Used by the outer training loop, ``evaluate`` and ``report`` (never inside
``jit``). Importing it loads numpy and tqdm only: tensorboardX (which pulls
in torch when installed) is imported when a :class:`MetricWriter` is
enabled, matplotlib inside :func:`plot_history`.

Contents:

* :class:`JsonlWriter` -- one JSON object per line, appended (resumable).
* :class:`MetricWriter` -- JSONL plus TensorBoard event files
  (``tensorboardX``); a no-op on non-zero processes.
* :class:`ProgressBar` -- ``tqdm`` progress with images/s and ETA; plain
  lines every 10% when not on a terminal.
* :func:`best_and_last`, :func:`network_rows`, :func:`stage_row`,
  :func:`mean_std`, :func:`summary_table` -- the tables of training,
  ``evaluate`` and ``report`` (best-epoch and last-epoch accuracy, mean ± std
  over seeds).
* :func:`plot_history` -- accuracy curves and the paper's Figure 2
  learning trajectories as PNG files.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
from typing import Any, Iterable, Mapping, Sequence, TextIO

import numpy as np
import tqdm

# --------------------------------------------------------------------------
# Value conversion


def _to_python(value: Any) -> Any:
  """Turns numpy / jax scalars and small arrays into JSON-able Python values.

  jax arrays are handled through ``np.asarray`` so this module never has to
  import jax.
  """
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, Mapping):
    return {str(k): _to_python(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_python(v) for v in value]
  try:
    array = np.asarray(value)
  except Exception:  # Not array-like: keep a readable trace in the log.
    return str(value)
  if array.dtype == object:
    return str(value)
  return array.item() if array.ndim == 0 else array.tolist()


def _to_scalar(value: Any) -> float | None:
  """A float for TensorBoard, or None when ``value`` is not a numeric scalar."""
  if isinstance(value, (str, bytes)) or value is None:
    return None
  try:
    array = np.asarray(value)
  except Exception:
    return None
  if array.size != 1 or not (np.issubdtype(array.dtype, np.number) or
                             array.dtype == np.bool_):
    return None
  return float(array.reshape(()))


# --------------------------------------------------------------------------
# JSONL


class JsonlWriter:
  """Appends one JSON object per line: ``{"step": ..., **fields, **scalars}``.

  The file is opened in append mode, so a resumed run continues the log of
  the run it resumes. Every line is flushed at once: a crash loses nothing
  that was written. Non-finite floats are written as the ``NaN`` /
  ``Infinity`` tokens that Python's ``json`` reads back (a diverged loss stays
  visible rather than turning into ``null``).
  """

  def __init__(self, path: str | os.PathLike):
    """Opens (creating parent directories) ``path`` for appending."""
    self.path = os.fspath(path)
    parent = os.path.dirname(self.path)
    if parent:
      os.makedirs(parent, exist_ok=True)
    self._file: TextIO | None = open(self.path, "a", encoding="utf-8")

  def write(self, step: int, scalars: Mapping[str, Any], **fields: Any) -> None:
    """Writes one line; ``fields`` (epoch, stage, ...) precede ``scalars``."""
    if self._file is None:
      raise ValueError(f"JsonlWriter({self.path!r}) is closed")
    record: dict[str, Any] = {"step": int(step)}
    for key, value in fields.items():
      record[key] = _to_python(value)
    for key, value in scalars.items():
      record[str(key)] = _to_python(value)
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def close(self) -> None:
    """Closes the file; further closes are no-ops."""
    if self._file is not None:
      self._file.close()
      self._file = None

  def __enter__(self) -> "JsonlWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads a file written by :class:`JsonlWriter` back into a list of dicts.

  A truncated last line (the process was killed mid-write) is ignored.
  """
  records = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def truncate_jsonl(path: str | os.PathLike, last_step: int) -> int:
  """Drops the records of steps after ``last_step`` (work abandoned by a
  crash or a stop, which a resume from ``last_step`` redoes), so every step
  and epoch appears once. Rewrites atomically; returns how many were
  dropped."""
  if not os.path.exists(path):
    return 0
  records = read_jsonl(path)
  kept = [r for r in records if r.get("step", 0) <= last_step]
  if len(kept) == len(records):
    return 0
  tmp = f"{os.fspath(path)}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in kept)
  os.replace(tmp, path)
  return len(records) - len(kept)


# --------------------------------------------------------------------------
# TensorBoard


# Distinguishes the event files of writers opened in the same second by the
# same process; tensorboardX names files by second and host and would
# overwrite the first.
_WRITER_COUNT = itertools.count()


class MetricWriter:
  """JSONL (``<workdir>/metrics.jsonl``) plus TensorBoard event files
  (``<workdir>/tensorboard/``).

  The event files are written by ``tensorboardX.SummaryWriter`` (no
  TensorFlow needed), imported only when a writer is enabled. Each writer
  starts a new file, so a resumed run adds a file next to the old ones and
  TensorBoard merges them by step. With ``enabled=False`` (every process but
  process 0 of a multi-host run) each call is a no-op and nothing is created
  on disk, so the caller needs no ``if process_index == 0`` around its
  logging.
  """

  def __init__(self, workdir: str | os.PathLike, enabled: bool = True,
               flush_secs: float = 10.0):
    """Opens both writers under ``workdir`` when ``enabled``; TensorBoard
    sees new scalars within ``flush_secs`` (written by a background thread)."""
    self.workdir = os.fspath(workdir)
    self.enabled = enabled
    self._jsonl: JsonlWriter | None = None
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter
      os.makedirs(self.workdir, exist_ok=True)
      self._jsonl = JsonlWriter(os.path.join(self.workdir, "metrics.jsonl"))
      self._tb = SummaryWriter(
          os.path.join(self.workdir, "tensorboard"), flush_secs=flush_secs,
          filename_suffix=f".{os.getpid()}.{next(_WRITER_COUNT)}")

  def write(self, step: int, scalars: Mapping[str, Any], *, prefix: str = "",
            **extra_fields: Any) -> None:
    """Logs ``scalars`` at ``step`` under keys/tags ``prefix + key``.

    ``extra_fields`` (e.g. ``epoch=3, stage="slkd"``) go to the JSONL line
    only; TensorBoard gets the numeric scalars (as float32), others are
    skipped.
    """
    if not self.enabled or self._jsonl is None:
      return
    named = {f"{prefix}{key}": value for key, value in scalars.items()}
    self._jsonl.write(step, named, **extra_fields)
    for tag, value in named.items():
      scalar = _to_scalar(value)
      if scalar is not None:
        self._tb.add_scalar(tag, scalar, int(step))

  def flush(self) -> None:
    """Flushes what the TensorBoard thread has written (JSONL lines are
    flushed as written; :meth:`close` writes out every pending event)."""
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    """Writes out every pending event and closes both writers; further
    closes are no-ops."""
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# --------------------------------------------------------------------------
# Progress


class _Discard:
  """A text sink: tqdm keeps counting and timing, nothing is drawn."""

  def write(self, text: str) -> int:
    return len(text)

  def flush(self) -> None:
    pass


class ProgressBar:
  """Training progress through ``tqdm``: ``desc: step/total percent
  [elapsed<ETA, steps/s, images/s=..., values]``.

  On a TTY tqdm redraws the line in place (at most every ``min_interval``
  seconds). Elsewhere (log files, CI, SLURM) tqdm draws nothing and a plain
  line is printed each time another 10% of the steps is done, so logs stay
  short and free of carriage returns. Rates are tqdm's moving averages
  (``smoothing``), so the first interval (XLA compilation) fades out.
  """

  def __init__(self, total_steps: int, desc: str = "", enabled: bool = True,
               stream: TextIO | None = None, *, initial_step: int = 0,
               min_interval: float = 0.1, smoothing: float = 0.3):
    """``initial_step`` is where a resumed run starts counting from;
    ``enabled=False`` (non-main processes) shows nothing."""
    self.total_steps = int(total_steps)
    # Looked up here, not in the signature, so a sys.stderr replaced after
    # import (pytest capture, redirection) is honoured.
    self.stream = sys.stderr if stream is None else stream
    try:
      self._tty = bool(self.stream.isatty())
    except (AttributeError, ValueError):
      self._tty = False
    self._bar = None
    if not enabled:
      return
    plain = (f"{desc}: " if desc else "") + (
        "{n_fmt}/{total_fmt} {percentage:3.0f}% "
        "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")
    self._bar = tqdm.tqdm(
        total=self.total_steps, initial=int(initial_step), desc=desc or None,
        unit="step", file=self.stream if self._tty else _Discard(),
        # tqdm measures the rate when it redraws: off a TTY, where drawing
        # costs nothing, at every update.
        mininterval=min_interval if self._tty else 0.0, miniters=1,
        smoothing=smoothing, dynamic_ncols=True,
        bar_format=None if self._tty else plain)
    self._next_decile = self._decile(int(initial_step)) + 1
    self._printed_step: int | None = None

  def _decile(self, step: int) -> int:
    return int(10 * step / self.total_steps) if self.total_steps > 0 else 10

  def update(self, step: int, images_per_step: int = 0, **values: Any) -> None:
    """Reports that ``step`` steps are done, each of ``images_per_step``.

    ``values`` (e.g. ``loss=..., ce=...``) are shown as ``key=value``; pass
    host floats (a device array here forces a device sync).
    """
    if self._bar is None:
      return
    values = {k: _to_python(v) for k, v in values.items()}
    self._set_postfix(images_per_step, values)
    self._bar.update(int(step) - self._bar.n)
    # Again with the rate this update measured (a TTY redraw above showed
    # the previous one).
    self._set_postfix(images_per_step, values)
    if not self._tty and (self._decile(self._bar.n) >= self._next_decile or
                          self._bar.n >= self.total_steps):
      self._next_decile = self._decile(self._bar.n) + 1
      self._print_line()

  def _set_postfix(self, images_per_step: int, values: dict) -> None:
    """Shows images/s (tqdm's smoothed steps/s times ``images_per_step``;
    its overall average before the first) and ``values``."""
    info = self._bar.format_dict
    steps_per_s = info["rate"] or (
        (info["n"] - info["initial"]) / info["elapsed"]
        if info["elapsed"] > 0 else 0.0)
    if steps_per_s * images_per_step > 0:
      values = {"images/s": f"{steps_per_s * images_per_step:,.0f}", **values}
    self._bar.set_postfix(values, refresh=False)

  def _print_line(self) -> None:
    if self._printed_step != self._bar.n:
      self.stream.write(str(self._bar) + "\n")
      self.stream.flush()
      self._printed_step = self._bar.n

  def close(self) -> None:
    """Shows the final state and ends the line; further closes are no-ops."""
    if self._bar is None:
      return
    if not self._tty:
      self._print_line()
    self._bar.close()
    self._bar = None

  def __enter__(self) -> "ProgressBar":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# --------------------------------------------------------------------------
# Final report


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
    value = _to_python(entry[key])
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
  data = [float(_to_python(v)) for v in values if v is not None]
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
  value = _to_python(value)
  if isinstance(value, float):
    return float_fmt.format(value)
  return str(value)


def _is_number(value: Any) -> bool:
  value = _to_python(value)
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


# --------------------------------------------------------------------------
# Plots


def _series(history: Sequence[Mapping[str, Any]], key: str
            ) -> tuple[list[float], list[float]]:
  xs, ys = [], []
  for index, entry in enumerate(history):
    value = entry.get(key)
    if value is None:
      continue
    xs.append(float(entry.get("epoch", index + 1)))
    ys.append(float(_to_python(value)))
  return xs, ys


# What the step computes (losses.kl_divergence(student, target) at T = 1):
# the target's distribution comes first inside the KL.
_TRAJECTORY_LABELS = {
    "student/kl_teacher": "KL(p_teacher ‖ p_student)",
    "student/kl_fused": "KL(p_fused ‖ p_student)",
}


def plot_history(history: Sequence[Mapping[str, Any]],
                 out_dir: str | os.PathLike) -> list[str]:
  """Writes PNG plots of a per-epoch eval history; returns the written paths.

  * ``accuracy.png``: eval top-1 per epoch of every ``'<net>/top1'`` key.
  * ``trajectory.png``: the learning trajectories of the paper's Figure 2,
    per-epoch ``student/kl_teacher`` and ``student/kl_fused``.

  A plot whose keys appear in no entry is skipped (no file written).
  """
  top1_keys = [f"{net}/top1" for net in networks(history)]
  kl_keys = [k for k in _TRAJECTORY_LABELS
             if any(entry.get(k) is not None for entry in history)]
  if not top1_keys and not kl_keys:
    return []

  # The Agg canvas directly, not pyplot: no global backend switch and no
  # figure registry to leak, whatever backend the caller's process uses.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.ticker import MaxNLocator

  os.makedirs(out_dir, exist_ok=True)
  written = []

  def save(keys, labels, ylabel, title, filename):
    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for key, label in zip(keys, labels):
      xs, ys = _series(history, key)
      ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # Whole epochs.
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(os.fspath(out_dir), filename)
    fig.savefig(path, format="png")
    written.append(path)

  if top1_keys:
    save(top1_keys, [k.rsplit("/", 1)[0] for k in top1_keys],
         "top-1 accuracy (%)", "Eval top-1 per epoch", "accuracy.png")
  if kl_keys:
    save(kl_keys, [_TRAJECTORY_LABELS[k] for k in kl_keys],
         "KL divergence (T = 1)", "Learning trajectories", "trajectory.png")
  return written
