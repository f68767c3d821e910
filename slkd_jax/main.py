"""Command line: ``python -m slkd_jax.main --config=configs/cifar100.py``.

Flags: ``--config`` (an ml_collections config file, optionally
``file.py:preset``, with dotted overrides such as ``--config.method=kd``) and
``--workdir``. Several processes (``launch/``) initialise ``jax.distributed``
first. All logic lives in :func:`slkd_jax.train.run`.
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  std_logging.getLogger("absl").addFilter(_QuietLibraries())
  # Before anything touches a device.
  from slkd_jax import parallel
  parallel.maybe_initialize_distributed(
      _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from slkd_jax import train
  try:
    train.run(_CONFIG.value, _WORKDIR.value)
  except train.Preempted as e:
    logging.warning("%s", e)
  except (ValueError, train.NonFiniteLossError,
          train.checkpoint.CheckpointError, FileNotFoundError) as e:
    # Configuration, data and checkpoint problems: one clear line, no trace.
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
