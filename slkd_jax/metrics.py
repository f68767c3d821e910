"""Training reporting with side effects: logs, TensorBoard, progress, plots.

Used by the outer training loop only (never inside ``jit``). The module
imports nothing but numpy and the standard library, so it works on the GPU
image, which has neither TensorFlow nor TensorBoard: TensorBoard event files
are hand-encoded (protobuf + TFRecord framing + CRC32C) below. matplotlib is
imported lazily inside :func:`plot_history`.

Contents:

* :class:`JsonlWriter` -- one JSON object per line, appended (resumable).
* :class:`TensorBoardWriter` -- scalar event files without TensorFlow.
* :class:`MetricWriter` -- both of the above; a no-op on non-zero processes.
* :class:`ProgressBar` -- one-line progress with images/s and ETA.
* :func:`best_and_last`, :func:`mean_std`, :func:`summary_table` -- the
  final report (best-epoch and last-epoch accuracy, mean ± std over seeds).
* :func:`plot_history` -- accuracy curves and the paper's Figure 2
  learning trajectories as PNG files.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import time
from typing import Any, Iterable, Mapping, Sequence, TextIO

import numpy as np

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
# TensorBoard event files, hand-encoded


def _make_crc32c_table() -> list[int]:
  # Castagnoli polynomial, reflected (LSB-first) form, as TFRecord uses.
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_CRC32C_TABLE = _make_crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of ``data``; ``crc32c(b"123456789") == 0xE3069283``."""
  crc = 0xFFFFFFFF
  table = _CRC32C_TABLE
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """The TFRecord checksum: CRC-32C rotated right by 15 bits plus a constant.

  Masking keeps the CRC of data that itself contains CRCs well distributed.
  """
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord_frame(data: bytes) -> bytes:
  """Frames one record: length, CRC of length, data, CRC of data."""
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", masked_crc32c(length)) + data +
          struct.pack("<I", masked_crc32c(data)))


# Protobuf wire types.
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


def _varint(value: int) -> bytes:
  # int64 fields encode negatives as their 64-bit two's complement.
  value &= 0xFFFFFFFFFFFFFFFF
  out = bytearray()
  while True:
    bits = value & 0x7F
    value >>= 7
    if value:
      out.append(bits | 0x80)
    else:
      out.append(bits)
      return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
  return _varint((field << 3) | wire_type)


def _field_double(field: int, value: float) -> bytes:
  return _key(field, _FIXED64) + struct.pack("<d", value)


def _field_float(field: int, value: float) -> bytes:
  # Through numpy so that values beyond float32 range become inf rather
  # than raising as struct.pack('<f') does.
  return _key(field, _FIXED32) + np.float32(value).astype("<f4").tobytes()


def _field_int(field: int, value: int) -> bytes:
  return _key(field, _VARINT) + _varint(int(value))


def _field_bytes(field: int, value: bytes) -> bytes:
  return _key(field, _LENGTH_DELIMITED) + _varint(len(value)) + value


def _file_version_event(wall_time: float) -> bytes:
  # Event{wall_time=1, file_version=3}
  return _field_double(1, wall_time) + _field_bytes(3, b"brain.Event:2")


def _scalar_event(wall_time: float, step: int,
                  values: Sequence[tuple[str, float]]) -> bytes:
  # Event{wall_time=1, step=2, summary=5: Summary{value=1: Value{tag=1,
  # simple_value=2}}}
  summary = b"".join(
      _field_bytes(1, _field_bytes(1, tag.encode("utf-8")) +
                   _field_float(2, value))
      for tag, value in values)
  return (_field_double(1, wall_time) + _field_int(2, step) +
          _field_bytes(5, summary))


class TensorBoardWriter:
  """Writes scalar summaries as a TensorBoard event file, without TensorFlow.

  The file is ``<logdir>/events.out.tfevents.<int(time)>.<hostname>``; when
  that name is taken (two writers in the same second), ``.1``, ``.2``, ... is
  appended: TensorBoard reads every file whose name contains ``tfevents``.
  Each writer starts a new file, so a resumed run adds a file next to the old
  ones and TensorBoard merges them by step.
  """

  def __init__(self, logdir: str | os.PathLike):
    """Creates ``logdir`` and a new event file holding the version record."""
    self.logdir = os.fspath(logdir)
    os.makedirs(self.logdir, exist_ok=True)
    base = os.path.join(
        self.logdir,
        f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}")
    path, suffix = base, 0
    while True:
      try:
        # 'xb' so two writers never interleave records in one file.
        self._file = open(path, "xb")
        break
      except FileExistsError:
        suffix += 1
        path = f"{base}.{suffix}"
    self.path = path
    self._closed = False
    self._file.write(tfrecord_frame(_file_version_event(time.time())))
    self._file.flush()

  def scalars(self, step: int, values: Mapping[str, Any]) -> None:
    """Writes one event at ``step`` with a ``simple_value`` per numeric entry.

    Entries that are not numeric scalars (strings, arrays) are skipped.
    Values are stored as float32, as TensorBoard does.
    """
    if self._closed:
      raise ValueError(f"TensorBoardWriter({self.logdir!r}) is closed")
    pairs = []
    for tag, value in values.items():
      scalar = _to_scalar(value)
      if scalar is not None:
        pairs.append((str(tag), scalar))
    if not pairs:
      return
    self._file.write(tfrecord_frame(_scalar_event(time.time(), step, pairs)))

  def flush(self) -> None:
    """Pushes buffered records to the OS so TensorBoard sees them."""
    if not self._closed:
      self._file.flush()

  def close(self) -> None:
    """Flushes and closes the file; further closes are no-ops."""
    if not self._closed:
      self._file.close()
      self._closed = True

  def __enter__(self) -> "TensorBoardWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# --------------------------------------------------------------------------
# Combined writer


class MetricWriter:
  """JSONL (``<workdir>/metrics.jsonl``) plus TensorBoard (``<workdir>/tensorboard``).

  With ``enabled=False`` (every process but process 0 of a multi-host run)
  each call is a no-op and nothing is created on disk, so the caller needs no
  ``if process_index == 0`` around its logging.
  """

  def __init__(self, workdir: str | os.PathLike, enabled: bool = True):
    """Opens both writers under ``workdir`` when ``enabled``."""
    self.workdir = os.fspath(workdir)
    self.enabled = enabled
    self._jsonl: JsonlWriter | None = None
    self._tb: TensorBoardWriter | None = None
    if enabled:
      os.makedirs(self.workdir, exist_ok=True)
      self._jsonl = JsonlWriter(os.path.join(self.workdir, "metrics.jsonl"))
      self._tb = TensorBoardWriter(os.path.join(self.workdir, "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, Any], *, prefix: str = "",
            **extra_fields: Any) -> None:
    """Logs ``scalars`` at ``step`` under keys/tags ``prefix + key``.

    ``extra_fields`` (e.g. ``epoch=3, stage="slkd"``) go to the JSONL line
    only; TensorBoard gets the numeric scalars. The TensorBoard file is
    flushed each call: the loop writes a few times per epoch, not per step.
    """
    if not self.enabled or self._jsonl is None:
      return
    named = {f"{prefix}{key}": value for key, value in scalars.items()}
    self._jsonl.write(step, named, **extra_fields)
    self._tb.scalars(step, named)
    self._tb.flush()

  def flush(self) -> None:
    """Flushes the TensorBoard file (JSONL lines are flushed as written)."""
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    """Closes both writers; further closes are no-ops."""
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
# Progress bar


def _format_duration(seconds: float) -> str:
  if not math.isfinite(seconds) or seconds < 0:
    return "?"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def _format_value(value: Any) -> str:
  try:
    return f"{float(value):.4g}"
  except (TypeError, ValueError):
    return str(value)


class ProgressBar:
  """A dependency-free one-line progress display.

  Shows ``desc step/total percent | images/s | elapsed | ETA | values``. On a
  TTY the line is rewritten in place with ``\\r`` (at most every
  ``min_interval`` seconds); otherwise (log files, CI) a plain line is
  printed each time another 10% of the steps is done, so logs stay short.

  Throughput is an exponential moving average of per-update rates, so the
  first interval (which includes XLA compilation) fades out quickly.
  """

  def __init__(self, total_steps: int, desc: str = "", enabled: bool = True,
               stream: TextIO | None = None, *, initial_step: int = 0,
               min_interval: float = 0.1, smoothing: float = 0.3):
    """``initial_step`` is where a resumed run starts counting from."""
    self.total_steps = int(total_steps)
    self.desc = desc
    self.enabled = enabled
    # Default looked up here, not in the signature, so a sys.stderr
    # replaced after import (pytest capture, redirection) is honoured.
    self.stream = sys.stderr if stream is None else stream
    try:
      self._tty = bool(self.stream.isatty())
    except (AttributeError, ValueError):
      self._tty = False
    self._min_interval = min_interval
    self._smoothing = smoothing
    self._start = self._last_time = time.monotonic()
    self._initial_step = self._last_step = self._step = int(initial_step)
    self._steps_per_s: float | None = None
    self._images_per_s: float | None = None
    self._values: dict[str, Any] = {}
    self._last_draw = -math.inf
    self._line_len = 0
    self._next_decile = self._decile(self._step) + 1
    self._printed_step: int | None = None
    self._closed = False

  def _decile(self, step: int) -> int:
    if self.total_steps <= 0:
      return 10
    return int(10 * step / self.total_steps)

  def _ema(self, old: float | None, new: float) -> float:
    return new if old is None else self._smoothing * new + (1 - self._smoothing) * old

  def update(self, step: int, images_per_step: int = 0, **values: Any) -> None:
    """Reports that ``step`` steps are done, each of ``images_per_step``.

    ``values`` (e.g. ``loss=..., ce=...``) are shown as ``key=value``; pass
    host floats (a device array here forces a device sync).
    """
    if not self.enabled or self._closed:
      return
    now = time.monotonic()
    done = int(step) - self._last_step
    elapsed = now - self._last_time
    if done > 0 and elapsed > 0:
      self._steps_per_s = self._ema(self._steps_per_s, done / elapsed)
      self._images_per_s = self._ema(self._images_per_s,
                                     done * images_per_step / elapsed)
      self._last_time, self._last_step = now, int(step)
    self._step = int(step)
    if values:
      self._values = values
    finished = self._step >= self.total_steps
    if self._tty:
      if finished or now - self._last_draw >= self._min_interval:
        self._draw(now)
    elif self._decile(self._step) >= self._next_decile or finished:
      self._next_decile = self._decile(self._step) + 1
      if self._printed_step != self._step:
        self._draw(now)

  def line(self, now: float | None = None) -> str:
    """The current progress line (without ``\\r`` or newline)."""
    now = time.monotonic() if now is None else now
    total = max(self.total_steps, 0)
    pct = 100.0 * self._step / total if total else 100.0
    parts = [f"{self.desc} {self._step}/{total} {pct:5.1f}%".strip()]
    ips = self._images_per_s
    parts.append(f"{ips:,.1f} images/s" if ips is not None else "? images/s")
    parts.append(f"elapsed {_format_duration(now - self._start)}")
    if self._steps_per_s:
      eta = max(total - self._step, 0) / self._steps_per_s
    else:
      eta = math.inf
    parts.append(f"ETA {_format_duration(eta)}")
    if self._values:
      parts.append(" ".join(f"{k}={_format_value(v)}"
                            for k, v in self._values.items()))
    return " | ".join(parts)

  def _draw(self, now: float) -> None:
    text = self.line(now)
    if self._tty:
      # Pad with spaces to erase the tail of a longer previous line.
      pad = max(self._line_len - len(text), 0)
      self.stream.write("\r" + text + " " * pad)
      self._line_len = len(text)
    else:
      self.stream.write(text + "\n")
    self.stream.flush()
    self._last_draw = now
    self._printed_step = self._step

  def close(self) -> None:
    """Draws the final state and ends the line; further closes are no-ops."""
    if not self.enabled or self._closed:
      return
    now = time.monotonic()
    if self._printed_step != self._step or self._tty:
      self._draw(now)
    if self._tty:
      self.stream.write("\n")
      self.stream.flush()
    self._closed = True

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


def _network_order(key: str) -> tuple:
  # student first, then SL-Ts by index, fused, teacher, anything else.
  name = key.rsplit("/", 1)[0]
  if name == "student":
    return (0, 0, name)
  if name.startswith("slt_") and name[4:].isdigit():
    return (1, int(name[4:]), name)
  if name == "slt_fused":
    return (2, 0, name)
  if name == "teacher":
    return (3, 0, name)
  return (4, 0, name)


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
    "kl_student_teacher": "KL(p_teacher ‖ p_student)",
    "kl_student_fused": "KL(p_fused ‖ p_student)",
}


def plot_history(history: Sequence[Mapping[str, Any]],
                 out_dir: str | os.PathLike) -> list[str]:
  """Writes PNG plots of a per-epoch eval history; returns the written paths.

  * ``accuracy.png``: eval top-1 per epoch of every ``'<net>/top1'`` key.
  * ``trajectory.png``: the learning trajectories of the paper's Figure 2,
    per-epoch ``kl_student_teacher`` and ``kl_student_fused``.

  A plot whose keys appear in no entry is skipped (no file written).
  """
  top1_keys = sorted({k for entry in history for k in entry
                      if isinstance(k, str) and k.endswith("/top1")},
                     key=_network_order)
  kl_keys = [k for k in _TRAJECTORY_LABELS
             if any(entry.get(k) is not None for entry in history)]
  top1_keys = [k for k in top1_keys
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
