"""The workdir of a run: checked before use, and held by one run at a time.

Two runs started on the same workdir would both train, resume from each
other's checkpoints and write every ``metrics.jsonl`` record twice.
:func:`workdir_lock` makes the second one fail at once instead, naming the
run that holds the workdir.

The lock is ``fcntl.flock`` on ``<workdir>/run.lock``, taken by process 0
of a run (the process that writes metrics and summaries). The kernel
releases it when the holding process exits or is killed, so a lock left by
a crashed or killed run is taken over by the next run without anyone
deleting a file. The file records its holder (pid, host, start time) for
the message; the file itself stays (emptied) after a clean release, since
deleting it could let two runs lock two different files of the same name.
On a filesystem without ``flock`` support the run goes on unlocked, with a
warning.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from typing import Any, Iterator

import jax
from absl import logging

from slkd_jax import checkpoint
from slkd_jax.errors import ConfigError

#: The lock file's name inside the workdir.
LOCK_FILE = "run.lock"

# flock unsupported (some network filesystems): run unlocked, warned.
_NO_LOCKING = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def check_workdir(workdir: str | None) -> str:
  """The absolute workdir, created if needed; a clear error when it cannot
  be used."""
  if not workdir or not workdir.strip():
    raise ConfigError("--workdir is empty: give the directory for "
                      "checkpoints and metrics")
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir} is a file, not a directory")
  if jax.process_index() == 0:
    try:
      os.makedirs(workdir, exist_ok=True)
    except OSError as e:
      raise ConfigError(f"cannot create --workdir={workdir} "
                        f"({e.strerror or e})") from None
    checkpoint.check_writable(workdir)
  return workdir


def _holder_record() -> dict[str, Any]:
  """Who holds the lock: this process, its host and since when."""
  return {"pid": os.getpid(), "host": socket.gethostname(),
          "since": datetime.datetime.now().astimezone().isoformat(
              timespec="seconds")}


def _read_holder(fd: int) -> dict[str, Any] | None:
  """The holder recorded in the lock file; None when empty or unreadable
  (released cleanly, or its holder is still writing it)."""
  os.lseek(fd, 0, os.SEEK_SET)
  text = os.read(fd, 4096).decode("utf-8", errors="replace").strip()
  try:
    holder = json.loads(text) if text else None
  except json.JSONDecodeError:
    return None
  return holder if isinstance(holder, dict) else None


def _describe(holder: dict[str, Any] | None) -> str:
  if holder is None:
    return "another process (it has not recorded itself yet)"
  return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
          f"since {holder.get('since', '?')}")


def _write_holder(fd: int) -> None:
  data = json.dumps(_holder_record()).encode("utf-8") + b"\n"
  os.ftruncate(fd, 0)
  os.pwrite(fd, data, 0)
  os.fsync(fd)


@contextlib.contextmanager
def workdir_lock(workdir: str, enabled: bool | None = None) -> Iterator[None]:
  """Holds ``workdir`` for this run while the block runs.

  ``enabled`` (default: this is process 0) says whether this process takes
  the lock; the other processes of a multi-process run are covered by
  their process 0.

  Raises:
    ConfigError: another live run holds the workdir; the message names it
      (pid, host, since when) and what to do.
  """
  if enabled is None:
    enabled = jax.process_index() == 0
  if not enabled:
    yield
    return
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    if not _lock(fd, path, workdir):
      yield  # no flock on this filesystem: unlocked, warned
      return
    try:
      yield
    finally:
      os.ftruncate(fd, 0)  # a clean release leaves no holder behind
  finally:
    os.close(fd)  # releases the lock


def _lock(fd: int, path: str, workdir: str) -> bool:
  """Takes the lock on ``fd`` and records this process as its holder;
  False when the filesystem cannot lock."""
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    raise ConfigError(
        f"--workdir={workdir} is in use by another run: "
        f"{_describe(_read_holder(fd))} (lock {path}); wait for it to "
        f"finish or stop it, or choose another --workdir") from None
  except OSError as e:
    if e.errno not in _NO_LOCKING:
      raise
    logging.warning("cannot lock %s (%s): the filesystem does not support "
                    "flock; nothing stops a second run on this workdir",
                    path, e.strerror or e)
    return False
  stale = _read_holder(fd)
  if stale is not None:
    logging.warning("took over the lock of %s: %s, which ended without "
                    "releasing it (killed or crashed)", workdir,
                    _describe(stale))
  _write_holder(fd)
  return True
