"""The run's working directory: checked and created before anything runs."""

from __future__ import annotations

import os

import jax

from slkd_jax import checkpoint
from slkd_jax.errors import ConfigError


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
