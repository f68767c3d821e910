"""Command line: ``python -m slkd_jax.main --config=configs/cifar100.py``.

Flags: ``--config`` (an ml_collections config file, optionally
``file.py:preset``, with dotted overrides such as ``--config.method=kd``) and
``--workdir``. Several processes (``launch/``) initialise ``jax.distributed``
first. All logic lives in :func:`slkd_jax.train.run`.

Exit status (:mod:`slkd_jax.cli`, the same for every command): 0 done; 2 a
problem the message explains (config, data, checkpoint, missing extra,
diverged loss, full disk), printed as one line; 75
(:data:`slkd_jax.preemption.PREEMPTED_EXIT_CODE`) stopped by SIGTERM/SIGINT
after saving a checkpoint: rerun the same command to resume. Anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Sequence

from absl import flags
from ml_collections import config_flags

from slkd_jax import cli

PROG = "python -m slkd_jax.main"


def define_flags(fv: flags.FlagValues, argv: Sequence[str]) -> None:
  """The flags of ``python -m slkd_jax.main`` (``argv``: for the config
  overrides)."""
  config_flags.DEFINE_config_file(
      "config", None,
      "Config file, e.g. configs/cifar100.py:resnet32x4-resnet8x4",
      flag_values=fv, lock_config=True, sys_argv=list(argv))
  flags.DEFINE_string(
      "workdir", None, "Where checkpoints, metrics and plots go; a run "
      "resumes from it automatically.", flag_values=fv)
  flags.DEFINE_string(
      "coordinator_address", None, "host:port of process 0 for a "
      "multi-process run; default: $SLKD_COORDINATOR, or SLURM "
      "auto-detection.", flag_values=fv)
  flags.DEFINE_integer(
      "num_processes", None, "Processes in a multi-process run (default: "
      "$SLKD_NUM_PROCESSES or SLURM's).", flag_values=fv)
  flags.DEFINE_integer(
      "process_id", None, "This process's index (default: $SLKD_PROCESS_ID "
      "or SLURM's).", flag_values=fv)
  flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)


def run_training(fv: flags.FlagValues, positional: list[str]) -> None:
  """Load the config, join the other processes, train."""
  cli.unexpected(positional)
  config = cli.config_value(fv["config"])
  from slkd_jax import parallel, train as train_lib
  parallel.configure_jax(config)
  # Before anything touches a device.
  parallel.maybe_initialize_distributed(
      fv.coordinator_address, fv.num_processes, fv.process_id)
  train_lib.run(config, fv.workdir)


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m slkd_jax.main``; ``argv``: the arguments after the program
  name (default ``sys.argv[1:]``). Returns the exit status."""
  return cli.run(define_flags, run_training, argv, prog=PROG, doc=__doc__,
                 output=lambda fv: fv.workdir)


if __name__ == "__main__":
  cli.start(main)
