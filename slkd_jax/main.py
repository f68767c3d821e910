"""Command line: ``python -m slkd_jax.main --config=configs/cifar100.py``.

Flags: ``--config`` (an ml_collections config file, optionally
``file.py:preset``, with dotted overrides such as ``--config.method=kd``) and
``--workdir``. Several processes (``launch/``) initialise ``jax.distributed``
first. All logic lives in :func:`slkd_jax.train.run`.

Exit status: 0 done; 2 a problem the message explains (config, data,
checkpoint, missing extra, diverged loss), printed as one line; 75
(:data:`slkd_jax.preemption.PREEMPTED_EXIT_CODE`) stopped by SIGTERM/SIGINT
after saving a checkpoint: rerun the same command to resume. Anything else is
a bug and keeps its traceback.
"""

import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/cifar100.py:resnet32x4-resnet8x4",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, metrics and plots go; a run resumes "
    "from it automatically.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for a multi-process "
    "run; default: $SLKD_COORDINATOR, or SLURM auto-detection.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in a multi-process run "
    "(default: $SLKD_NUM_PROCESSES or SLURM's).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index (default: $SLKD_PROCESS_ID or "
    "SLURM's).")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries:
  """Drop INFO records of chatty libraries (orbax logs every save step by
  step) so progress and results stay readable; warnings still pass."""

  def filter(self, record) -> bool:
    return (record.levelno > std_logging.INFO
            or "orbax" not in record.pathname)


def _flag_error_line(error: BaseException, argv: list[str]) -> str:
  """One line for a flag-parsing failure: the innermost cause, the config
  override it came from for an unknown key."""
  cause = error
  while cause.__cause__ is not None or cause.__context__ is not None:
    cause = cause.__cause__ or cause.__context__
  if isinstance(cause, (AttributeError, KeyError)):
    key = str(cause).strip("'\" ")
    flag = next((a.split("=")[0] for a in argv
                 if a.startswith("--config.") and key in a.split("=")[0]),
                f"--config...{key}")
    return (f"{flag}: the config has no key {key!r}; check the spelling "
            f"against the config file")
  from slkd_jax.errors import UserError
  if isinstance(error, flags.Error) and not isinstance(cause, (OSError,
                                                               UserError)):
    cause = error  # absl's message names the flag and the value
  lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
  if isinstance(cause, OSError) and lines:
    return lines[-1]  # "[Errno 2] No such file or directory: '...'"
  return lines[0] if lines else type(cause).__name__


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag, config file, preset or config key
  reported in one line (exit 2) instead of nested tracebacks."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - all of it is the user's input
    print(f"error: {_flag_error_line(e, argv)}", file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  std_logging.getLogger("absl").addFilter(_QuietLibraries())
  from slkd_jax import errors, preemption
  try:
    config = _CONFIG.value
    config.get("method")  # the file loads lazily: a failure surfaces here
  except OSError as e:  # the config file failed to load
    print(f"error: --config: {_flag_error_line(e, sys.argv)}", file=sys.stderr)
    sys.exit(2)
  try:
    from slkd_jax import parallel
    parallel.configure_jax(config)
    # Before anything touches a device.
    parallel.maybe_initialize_distributed(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from slkd_jax import train
    train.run(config, _WORKDIR.value)
  except preemption.Preempted as e:
    logging.warning("%s", e)
    sys.exit(preemption.PREEMPTED_EXIT_CODE)
  except errors.UserError as e:
    # Configuration, data and checkpoint problems: one clear line, no trace.
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
