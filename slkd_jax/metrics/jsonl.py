"""``metrics.jsonl``: one JSON object per line, appended, resumable.

A crash can cut the last line short. A resumed run first calls
:func:`truncate_jsonl`, which cuts such a line (and the records of steps
the resume redoes), so the file reads back whole; readers that meet an
unreadable line anyway say so (:func:`read_jsonl_checked`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, TextIO

from absl import logging

from slkd_jax.metrics.values import to_python


def _ends_mid_line(path: str) -> bool:
  """Whether ``path`` is non-empty and its last byte is not a newline."""
  with open(path, "rb") as f:
    f.seek(0, os.SEEK_END)
    if f.tell() == 0:
      return False
    f.seek(-1, os.SEEK_END)
    return f.read(1) != b"\n"


class JsonlWriter:
  """Appends one JSON object per line: ``{"step": ..., **fields, **scalars}``.

  The file is opened in append mode, so a resumed run continues the log of
  the run it resumes. Every line is flushed at once: a crash loses nothing
  that was written. A file that ends mid-line (a write cut short) gets a
  newline first, so no record is ever appended onto a partial one.
  Non-finite floats are written as the ``NaN`` / ``Infinity`` tokens that
  Python's ``json`` reads back (a diverged loss stays visible rather than
  turning into ``null``).
  """

  def __init__(self, path: str | os.PathLike):
    """Opens (creating parent directories) ``path`` for appending."""
    self.path = os.fspath(path)
    parent = os.path.dirname(self.path)
    if parent:
      os.makedirs(parent, exist_ok=True)
    self._file: TextIO | None = open(self.path, "a", encoding="utf-8")
    if _ends_mid_line(self.path):
      self._file.write("\n")

  def write(self, step: int, scalars: Mapping[str, Any], **fields: Any) -> None:
    """Writes one line; ``fields`` (epoch, stage, ...) precede ``scalars``."""
    if self._file is None:
      raise ValueError(f"JsonlWriter({self.path!r}) is closed")
    record: dict[str, Any] = {"step": int(step)}
    for key, value in fields.items():
      record[key] = to_python(value)
    for key, value in scalars.items():
      record[str(key)] = to_python(value)
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


def _parse(line: bytes) -> dict[str, Any] | None:
  """The record of one line, or None when it is not a JSON object."""
  try:
    record = json.loads(line.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError):
    return None
  return record if isinstance(record, dict) else None


def _lines(path: str | os.PathLike) -> list[bytes]:
  with open(path, "rb") as f:
    return f.read().splitlines(keepends=True)


def read_jsonl_checked(path: str | os.PathLike
                       ) -> tuple[list[dict[str, Any]], list[int]]:
  """``(records, numbers of the unreadable lines)`` of a ``metrics.jsonl``
  (lines counted from 1; blank lines are neither)."""
  records, unreadable = [], []
  for number, line in enumerate(_lines(path), 1):
    if not line.strip():
      continue
    record = _parse(line)
    if record is None:
      unreadable.append(number)
    else:
      records.append(record)
  return records, unreadable


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads a file written by :class:`JsonlWriter` back into a list of dicts.

  Unreadable lines (a last line cut short by a kill) are skipped;
  :func:`read_jsonl_checked` also says which.
  """
  return read_jsonl_checked(path)[0]


def truncate_jsonl(path: str | os.PathLike, last_step: int) -> int:
  """Prepares a resumed run's log: keeps every complete record up to
  ``last_step`` (the restored checkpoint's), drops the records of later
  steps (work abandoned by a crash or a stop, which the resume redoes, so
  every step and epoch appears once) and cuts unreadable lines (a write cut
  short), logging how many lines and bytes it cut. Rewrites atomically,
  and only when something changes; returns how many records were dropped.
  """
  if not os.path.exists(path):
    return 0
  lines = _lines(path)
  kept, dropped, cut = [], 0, []
  for number, line in enumerate(lines, 1):
    record = _parse(line)
    if record is None:
      if line.strip():
        cut.append((number, len(line)))
    elif record.get("step", 0) > last_step:
      dropped += 1
    else:  # a complete record whose newline was never written gets one
      kept.append(line if line.endswith(b"\n") else line + b"\n")
  if kept == lines:
    return 0
  tmp = f"{os.fspath(path)}.tmp"
  with open(tmp, "wb") as f:
    f.writelines(kept)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  if cut:
    numbers = ", ".join(str(n) for n, _ in cut)
    logging.warning(
        "%s: cut %d unreadable line%s (%d bytes; line %s of %d), left by a "
        "write cut short (a crash or a kill); kept the %d complete records "
        "up to step %d", os.fspath(path), len(cut),
        "" if len(cut) == 1 else "s", sum(n for _, n in cut), numbers,
        len(lines), len(kept), last_step)
  return dropped
