"""Checkpoints of a training stage: orbax ``CheckpointManager`` in the workdir.

A checkpoint holds the trainable :class:`~slkd_jax.state.DistillState`
(item ``state``; the frozen teacher is stored once per workdir, not in every
checkpoint) and a JSON item ``meta`` with the data position (epoch and step
within it), the eval history and the stage config, so a resumed run
continues exactly where the interrupted one stopped. Saves are asynchronous;
restores go straight into the current mesh's shardings, so a run can resume
on a different device count.

A damaged checkpoint is reported in one line and the previous one is used:
process 0 decides which step is readable and every process restores that
one, so processes never diverge. Saving a step that exists replaces it (a
damaged step is never kept), and an unwritable directory fails at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from slkd_jax import parallel
from slkd_jax.errors import CheckpointError

_ITEMS = ("state", "meta")
# Loggers that report a damaged checkpoint at length while orbax reads it.
_NOISY_LOGGERS = ("absl", "orbax", "asyncio", "jax", "tensorstore")

__all__ = ["CheckpointError", "Checkpointer", "abstract_like"]


def abstract_like(tree: Any, mesh) -> Any:
  """``ShapeDtypeStruct``\\ s of ``tree`` replicated on ``mesh`` (a restore
  target that needs no device memory of its own)."""
  sharding = parallel.replicated(mesh)
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def check_writable(directory: str) -> None:
  """Fail at once, naming ``directory``, when checkpoints cannot be written
  there (orbax would otherwise retry for minutes and lose the epoch)."""
  probe = os.path.join(directory, f".write_test_{uuid.uuid4().hex}")
  try:
    os.makedirs(directory, exist_ok=True)
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise CheckpointError(
        f"cannot write checkpoints to {directory} ({e.strerror or e}); make "
        f"it writable or choose another --workdir") from None


@contextlib.contextmanager
def _quiet():
  """Silence the libraries' per-file error logs while probing a possibly
  damaged checkpoint; we report each damaged step in one line."""
  loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
  levels = [lg.level for lg in loggers]
  for lg in loggers:
    lg.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    for lg, level in zip(loggers, levels):
      lg.setLevel(level)


def _save_each_array_once_on_cpu() -> None:
  """On CPU devices orbax's default (replica-parallel) save cuts every
  replicated array into one slice per device, a dispatch each: with 8 CPU
  devices a small state's save takes 2.5x as long. GPUs already default to
  one transfer per array; so do CPUs here. What is written is the same."""
  if jax.default_backend() != "cpu":
    return
  default = ocp.type_handlers.get_type_handler(jax.Array)
  if getattr(default, "_use_replica_parallel", False):
    handler = ocp.type_handlers.ArrayHandler(
        use_replica_parallel=False,
        array_metadata_store=getattr(default, "_array_metadata_store", None))
    with _quiet():  # orbax warns about any override
      ocp.type_handlers.register_type_handler(jax.Array, handler,
                                              override=True)


class Checkpointer:
  """Save and restore a stage's state in ``directory``.

  Args:
    directory: where checkpoints go (one sub-directory per step).
    max_to_keep: how many recent checkpoints to keep (>= 2 keeps a fallback
      for a damaged latest one).
  """

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    _save_each_array_once_on_cpu()
    if jax.process_index() == 0:
      check_writable(self.directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             create=True),
        item_names=_ITEMS)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Start an asynchronous save of ``state`` and ``meta`` at ``step``,
    replacing a checkpoint already there (it may be a damaged one)."""
    if step in self._manager.all_steps():
      self._manager.wait_until_finished()
      self._manager.delete(step)
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True)

  def wait(self) -> None:
    """Block until pending saves are on disk."""
    self._manager.wait_until_finished()

  def latest_meta(self) -> dict[str, Any] | None:
    """The ``meta`` item of the newest checkpoint whose meta is readable
    (no state read: lets a caller check the config before restoring)."""
    for step in reversed(self.all_steps()):
      try:
        with _quiet():
          restored = self._manager.restore(step, args=ocp.args.Composite(
              meta=ocp.args.JsonRestore()))
        return dict(restored.meta)
      except Exception:  # noqa: BLE001 - damaged: restore_latest reports it
        continue
    return None

  def _try_restore(self, step: int, target: Any):
    try:
      with _quiet():
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            meta=ocp.args.JsonRestore()))
      return (restored.state, dict(restored.meta)), None
    except Exception as e:  # orbax raises many types for damaged files
      return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"

  def restore_latest(self, target: Any) -> tuple[Any, dict[str, Any]] | None:
    """Restore the newest readable checkpoint into ``target``'s structure.

    Every process tries the same steps, newest first, and a step counts as
    readable only when it is readable on all of them, so all processes
    resume from the same step.

    Args:
      target: a tree of ``jax.ShapeDtypeStruct`` (see :func:`abstract_like`)
        or arrays giving structure, dtypes and shardings.

    Returns:
      ``(state, meta)``, or ``None`` when the directory has no checkpoint.

    Raises:
      CheckpointError: checkpoints exist but none can be read.
    """
    steps = self.all_steps()
    for step in reversed(steps):
      restored, error = self._try_restore(step, target)
      if _on_all_processes(restored is not None):
        if step != steps[-1]:
          logging.warning("resuming from step %d in %s, the newest readable "
                          "checkpoint", step, self.directory)
        return restored
      logging.warning("checkpoint step %d in %s is damaged (%s)", step,
                      self.directory, error or "unreadable on another process")
    if steps:
      raise CheckpointError(
          f"none of the checkpoints {steps} in {self.directory} can be read "
          f"(see the warnings above). Move the directory away to start this "
          f"stage afresh, or point --workdir elsewhere.")
    return None

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _on_all_processes(ok: bool) -> bool:
  """``ok`` and-ed over all processes (the same answer everywhere)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  flags = multihost_utils.process_allgather(np.asarray(ok, np.int32))
  return bool(np.all(flags))
