"""Checkpoints of a training stage: orbax ``CheckpointManager`` in the workdir.

A checkpoint holds the whole :class:`~slkd_jax.state.DistillState` (item
``state``) and a JSON item ``meta`` with the data position (epoch and step
within it), the eval history and the config, so a resumed run continues
exactly where the interrupted one stopped. Saves are asynchronous; restores go
straight into the current mesh's shardings, so a run can resume on a different
device count. A damaged latest checkpoint is reported and the previous one is
used instead: work is never silently lost.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from slkd_jax import parallel

_ITEMS = ("state", "meta")


class CheckpointError(RuntimeError):
  """No usable checkpoint could be restored; the message says what to do."""


def abstract_like(tree: Any, mesh) -> Any:
  """``ShapeDtypeStruct``\\ s of ``tree`` replicated on ``mesh`` (a restore
  target that needs no device memory of its own)."""
  sharding = parallel.replicated(mesh)
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


class Checkpointer:
  """Save and restore a stage's state in ``directory``.

  Args:
    directory: where checkpoints go (one sub-directory per step).
    max_to_keep: how many recent checkpoints to keep (≥ 2 keeps a fallback
      for a damaged latest one).
  """

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             create=True),
        item_names=_ITEMS)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Start an asynchronous save of ``state`` and ``meta`` at ``step``.

    Overwrites nothing: a step that already has a checkpoint is skipped.
    """
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True)

  def wait(self) -> None:
    """Block until pending saves are on disk."""
    self._manager.wait_until_finished()

  def restore_latest(self, target: Any) -> tuple[Any, dict[str, Any]] | None:
    """Restore the newest readable checkpoint into ``target``'s structure.

    Args:
      target: a tree of ``jax.ShapeDtypeStruct`` (see :func:`abstract_like`)
        or arrays giving structure, dtypes and shardings.

    Returns:
      ``(state, meta)``, or ``None`` when the directory has no checkpoint.

    Raises:
      CheckpointError: checkpoints exist but none can be read.
    """
    steps = self.all_steps()
    errors = []
    for step in reversed(steps):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            meta=ocp.args.JsonRestore()))
        if errors:
          logging.warning(
              "checkpoint(s) %s in %s could not be read (%s); resumed from "
              "the previous one, step %d", [s for s, _ in errors],
              self.directory, errors[0][1], step)
        return restored.state, dict(restored.meta)
      except Exception as e:  # orbax raises many types for damaged files
        errors.append((step, f"{type(e).__name__}: {str(e)[:300]}"))
    if errors:
      raise CheckpointError(
          f"none of the checkpoints {steps} in {self.directory} can be read "
          f"(latest error: {errors[0][1]}). Move the directory away to start "
          f"this stage afresh, or point --workdir elsewhere.")
    return None

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
