"""Stopping a run cleanly: SIGTERM (SLURM preemption, ``kill``) and SIGINT
(Ctrl-C) ask the training loop to save a checkpoint and stop.

All processes must stop at the same step (the save is collective). A signal
usually reaches every process, but not at the same moment, so the processes
*agree* on the stop: at steps they all choose alike they all-gather their
flags. Those steps are spaced by wall-clock time (``check_seconds``,
converted to steps with process 0's measured step time and shared in the
same all-gather), so a slow ImageNet step is never more than about
``check_seconds`` away from a check, and a fast CIFAR step does not pay a
host synchronisation every step.

A preempted run exits with :data:`PREEMPTED_EXIT_CODE` so schedulers can
requeue it (``launch/slurm.sh`` does).
"""

from __future__ import annotations

import signal
import time

import jax
import numpy as np
from absl import logging

#: Exit status of a run stopped by SIGTERM/SIGINT after saving a checkpoint
#: (EX_TEMPFAIL: "try again later"); rerunning the command resumes it.
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
  """Training stopped on SIGTERM/SIGINT after saving a checkpoint."""


class StopSignal:
  """SIGTERM/SIGINT handlers that record a stop request.

  A second SIGINT while a stop is pending raises ``KeyboardInterrupt``
  (the user insists; the last checkpoint stays).
  """

  def __init__(self):
    self.requested = False

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    logging.warning("signal %s received: saving a checkpoint and stopping "
                    "(exit status %d; rerun the command to resume)",
                    signal.Signals(signum).name, PREEMPTED_EXIT_CODE)
    self.requested = True

  def install(self) -> "StopSignal":
    """Install the handlers (only possible in the main thread)."""
    for signum in (signal.SIGTERM, signal.SIGINT):
      try:
        signal.signal(signum, self._handle)
      except ValueError:
        pass  # not the main thread (e.g. a notebook worker): no handler.
    return self


class StopAgreement:
  """Decides, identically on every process, whether to stop after a step.

  Args:
    stop_signal: this process's :class:`StopSignal`.
    check_seconds: target wall-clock interval between agreements.
  """

  def __init__(self, stop_signal: StopSignal, check_seconds: float):
    self._signal = stop_signal
    self._check_seconds = check_seconds
    self._next_check = None
    self._last = (None, time.monotonic())

  def should_stop(self, step: int) -> bool:
    """Whether all processes stop after global step ``step``."""
    if jax.process_count() == 1:
      return self._signal.requested
    if self._next_check is None:  # first step: start measuring
      self._next_check, self._last = step + 1, (step, time.monotonic())
    if step < self._next_check:
      return False
    last_step, last_time = self._last
    now = time.monotonic()
    seconds_per_step = (now - last_time) / max(step - last_step, 1)
    from jax.experimental import multihost_utils
    gathered = multihost_utils.process_allgather(
        np.asarray([float(self._signal.requested), seconds_per_step]))
    # Process 0's step time spaces the next check, the same on every process.
    interval = self._check_seconds / max(float(gathered[0, 1]), 1e-6)
    self._next_check = step + int(np.clip(interval, 1, 10_000))
    self._last = (step, now)
    return bool(np.any(gathered[:, 0] > 0))

  def agreed_now(self) -> bool:
    """Whether any process has a stop request: a collective, called by every
    process at the same point (between stages, after the last one)."""
    if jax.process_count() == 1:
      return self._signal.requested
    from jax.experimental import multihost_utils
    gathered = multihost_utils.process_allgather(
        np.asarray([float(self._signal.requested)]))
    return bool(np.any(gathered > 0))

  def check_now(self, where: str) -> None:
    """Stop at once (:class:`Preempted`) when a stop was requested; nothing
    is in flight to save (``where``: e.g. ``before stage kd``).

    Raises:
      Preempted: a stop was requested on some process.
    """
    if self.agreed_now():
      raise Preempted(f"stopped {where}; rerun the same command to resume")
