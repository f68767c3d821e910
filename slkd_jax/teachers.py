"""The frozen teacher of a run: where it comes from, and the copy that the
workdir keeps.

``config.teacher.checkpoint`` names the teacher: a previous slkd_jax workdir
(the teacher it distilled from, or its finished teacher stage), a model
written by slkd_jax (:mod:`slkd_jax.artifact`), a teacher converted by
:mod:`slkd_jax.convert_torch`, or a PyTorch ``.pth`` file. None trains it in
the run's first stage.

The distillation stages of a workdir must all use one teacher, and a resumed
stage the teacher it started with. So the teacher is stored once per workdir
(``WORKDIR/frozen_teacher``, with where it came from) rather than in every
checkpoint; a later run of the same workdir uses that copy, and refuses a
config that now names a different teacher.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from absl import logging

from slkd_jax import artifact, parallel
from slkd_jax.config import TEACHER_STAGE
from slkd_jax.errors import ConfigError
from slkd_jax.state import ModelState

FROZEN_TEACHER_DIR = "frozen_teacher"


def source_of(config) -> dict:
  """Where ``config``'s teacher comes from (what identifies it)."""
  t = config.teacher
  if t.checkpoint is None:
    return {"arch": t.arch, "stage": TEACHER_STAGE,
            "num_epochs": t.num_epochs, "learning_rate": t.learning_rate}
  return {"arch": t.arch, "checkpoint": os.path.abspath(t.checkpoint)}


def describe(config) -> str:
  """Which teacher ``config``'s stages distil from, in words (the teacher
  stage's *final* state, as the reference distils from its last epoch)."""
  source = source_of(config)
  if "checkpoint" in source:
    return _describe(source)
  return "the final state (not the best epoch) of " + _describe(source)


def _describe(source: dict) -> str:
  if "checkpoint" in source:
    return f"teacher.checkpoint={source['checkpoint']!r}"
  return (f"a {source['arch']} trained in this workdir's teacher stage "
          f"(teacher.num_epochs={source['num_epochs']}, "
          f"teacher.learning_rate={source['learning_rate']})")


def to_mesh(variables: dict, config, mesh) -> ModelState:
  """Replicated device arrays in the run's parameter dtype (at least
  float32; float64 runs get float64 teachers)."""
  dtype = jnp.promote_types(jnp.dtype(config.dtype), jnp.float32)
  cast = lambda x: (jnp.asarray(x, dtype)  # noqa: E731
                    if jnp.issubdtype(x.dtype, jnp.floating) else x)
  state = ModelState(jax.tree.map(cast, variables["params"]),
                     jax.tree.map(cast, variables.get("batch_stats", {})))
  return jax.device_put(state, parallel.replicated(mesh))


def load_frozen(workdir: str, config, mesh) -> ModelState | None:
  """The workdir's frozen teacher, or None when it has none yet.

  Raises:
    ConfigError: the config names another teacher than the one the
      workdir's stages were distilled from.
  """
  path = os.path.join(workdir, FROZEN_TEACHER_DIR)
  if not artifact.is_artifact(path):
    return None
  variables, meta = artifact.load(path)
  saved, now = meta.get("teacher_source"), source_of(config)
  if saved != now:
    raise ConfigError(
        f"this workdir's stages were distilled from {_describe(saved)}, but "
        f"the config now asks for {_describe(now)}; set it back, or use a "
        f"new --workdir (the stages must share one teacher)")
  return to_mesh(variables, config, mesh)


def save_frozen(workdir: str, teacher: ModelState, config) -> None:
  """Store the teacher once in the workdir (process 0)."""
  if jax.process_index() == 0:
    artifact.save(os.path.join(workdir, FROZEN_TEACHER_DIR),
                  teacher.variables, arch=config.teacher.arch,
                  num_classes=config.data.num_classes,
                  teacher_source=source_of(config))
  parallel.sync_processes("slkd_jax.teachers.save_frozen")


def _from_workdir(path: str) -> str:
  """The model file of a previous run's workdir: the teacher it distilled
  from, else its finished teacher stage."""
  for candidate in (os.path.join(path, FROZEN_TEACHER_DIR),
                    os.path.join(path, TEACHER_STAGE, "final_model")):
    if artifact.is_artifact(candidate):
      return candidate
  raise ConfigError(
      f"config.teacher.checkpoint={path!r} is a workdir without a finished "
      f"teacher: resume it first (run with --workdir={path})")


def load_checkpoint(config, mesh) -> ModelState:
  """The teacher named by ``config.teacher.checkpoint`` (see the module
  docstring), checked against ``config.teacher.arch`` and the classes."""
  path = config.teacher.checkpoint
  arch, num_classes = config.teacher.arch, config.data.num_classes
  if not os.path.exists(path):
    raise ConfigError(f"config.teacher.checkpoint={path!r} does not exist")
  if os.path.isdir(os.path.join(path, TEACHER_STAGE)) or os.path.isdir(
      os.path.join(path, FROZEN_TEACHER_DIR)):
    path = _from_workdir(path)
  if artifact.is_artifact(path):
    variables, meta = artifact.load(path)
    if (meta["arch"], meta["num_classes"]) != (arch, num_classes):
      raise ConfigError(
          f"config.teacher.checkpoint={path!r} holds a {meta['arch']} with "
          f"{meta['num_classes']} classes, but the config asks for a {arch} "
          f"(teacher.arch) with {num_classes} (data.num_classes)")
  else:
    from slkd_jax import convert_torch
    variables, meta = convert_torch.load_converted(path, arch, num_classes)
  logging.info("teacher %s loaded from %s", arch, path)
  return to_mesh(variables, config, mesh)
