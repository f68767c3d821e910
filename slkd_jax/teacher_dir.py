"""A converted teacher on disk: ``DIR/variables/`` (orbax) and
``DIR/teacher.json`` (what it is, written last so that its presence marks a
complete conversion), and :func:`load_converted`, which reads such a
directory or converts a PyTorch file on the fly.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any, Mapping

import numpy as np

from slkd_jax.errors import ConversionError
from slkd_jax.torch_checkpoint import load_torch_checkpoint
from slkd_jax.torch_keys import (check_variables, convert_state_dict,
                                 flatten, num_classes_of, unflatten)

METADATA_FILE = "teacher.json"
VARIABLES_DIR = "variables"
_FORMAT = "slkd_jax.teacher"


def save_teacher(variables: Mapping[str, Any], out_dir: str, arch: str,
                 num_classes: int | None = None, source: str | None = None,
                 overwrite: bool = False) -> str:
  """Write a teacher checkpoint: orbax variables plus a JSON metadata file.

  Layout: ``out_dir/variables/`` (``ocp.StandardCheckpointer``, float32 numpy
  leaves) and ``out_dir/teacher.json`` (``arch``, ``num_classes``,
  ``source``, counts), written last so that its presence marks a complete
  checkpoint. Single-process only (the CLI's use).

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}`` of
      ``models.create(arch, num_classes)``; checked against it.
    out_dir: directory to create.
    arch: registry name.
    num_classes: classifier width; inferred from the classifier if None.
    source: where the weights came from (recorded in the metadata).
    overwrite: replace an existing teacher checkpoint in ``out_dir``.

  Returns:
    The absolute path of ``out_dir``.
  """
  import jax
  import orbax.checkpoint as ocp

  if num_classes is None:
    num_classes = num_classes_of(variables)
  # Plain nested dicts of host float32 arrays: restores then need no target
  # and come back as numpy whatever the devices.
  variables = unflatten({k: np.asarray(jax.device_get(v), np.float32)
                          for k, v in flatten(variables).items()})
  check_variables(variables, arch, num_classes, "the variables to save")
  out_dir = os.path.abspath(out_dir)
  meta_path = os.path.join(out_dir, METADATA_FILE)
  var_path = os.path.join(out_dir, VARIABLES_DIR)
  if os.path.exists(meta_path) or os.path.exists(var_path):
    if not overwrite:
      raise FileExistsError(f"{out_dir} already holds a teacher checkpoint; "
                            f"pass overwrite=True (--force) to replace it")
    if os.path.exists(meta_path):
      os.remove(meta_path)  # first, so a failed rewrite never looks complete
    shutil.rmtree(var_path, ignore_errors=True)
  os.makedirs(out_dir, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(var_path, variables)
    checkpointer.wait_until_finished()
  flat = flatten(variables)
  meta = {
      "format": _FORMAT,
      "version": 1,
      "arch": arch,
      "num_classes": int(num_classes),
      "source": None if source is None else str(source),
      "num_params": sum(math.prod(v.shape) for k, v in flat.items()
                        if k[0] == "params"),
      "num_batch_stats": sum(math.prod(v.shape) for k, v in flat.items()
                             if k[0] == "batch_stats"),
  }
  with open(meta_path, "w") as f:
    json.dump(meta, f, indent=2)
  return out_dir


def _redo_hint(path: str, arch: str | None) -> str:
  return (f"re-create it with `python -m slkd_jax.convert_torch --arch "
          f"{arch or '<arch>'} --checkpoint <ckpt.pth> --out {path} --force`, "
          f"or set config.teacher.checkpoint to the .pth file itself")


def load_converted(path: str, arch: str | None = None,
                   num_classes: int | None = None, allow_pickle: bool = True
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Host variables of a converted network: our converter's directory or a
  PyTorch file converted on the fly (teachers.load_checkpoint places any
  teacher source on the mesh; this is its PyTorch part).

  Args:
    path: a directory written by :func:`save_teacher` (or the CLI), or a
      PyTorch checkpoint file (``.pth``), converted on the fly.
    arch: the expected architecture; required for PyTorch files, checked
      against the metadata for our checkpoints.
    num_classes: the expected classifier width (checked when given).
    allow_pickle: see :func:`load_torch_checkpoint`.

  Returns:
    ``(variables, meta)``: float32 numpy ``{'params', 'batch_stats'}`` and a
    dict with at least ``arch``, ``num_classes`` and ``source``.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise ConversionError(
        f"teacher checkpoint {path} does not exist; convert a PyTorch teacher "
        f"with `python -m slkd_jax.convert_torch --arch {arch or '<arch>'} "
        f"--checkpoint <ckpt.pth> --out {path}`, or set "
        f"config.teacher.checkpoint to the .pth file itself")

  if os.path.isfile(path):
    if arch is None:
      raise ConversionError(f"{path} is a PyTorch checkpoint: converting it needs "
                       f"the architecture (arch=..., config.teacher.arch)")
    variables = convert_state_dict(
        arch, load_torch_checkpoint(path, allow_pickle), num_classes)
    found = num_classes_of(variables)
    if num_classes is not None and found != num_classes:
      raise ConversionError(f"{path} has {found} classes, expected {num_classes}")
    flat = flatten(variables)
    meta = {"format": "pytorch", "arch": arch, "num_classes": found,
            "source": os.path.abspath(path),
            "num_params": sum(math.prod(v.shape) for k, v in flat.items()
                              if k[0] == "params")}
    return variables, meta

  meta_path = os.path.join(path, METADATA_FILE)
  if not os.path.isfile(meta_path):
    raise ConversionError(
        f"{path} is not a teacher checkpoint (no {METADATA_FILE}: missing, or "
        f"an interrupted conversion); {_redo_hint(path, arch)}")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    saved_arch, saved_classes = meta["arch"], int(meta["num_classes"])
  except (ValueError, KeyError, TypeError) as e:
    raise ConversionError(f"{meta_path} is corrupt ({type(e).__name__}: {e}); "
                     f"{_redo_hint(path, arch)}") from e
  if arch is not None and arch != saved_arch:
    raise ConversionError(f"teacher checkpoint {path} holds a {saved_arch!r}, but "
                     f"the config asks for {arch!r} (config.teacher.arch)")
  if num_classes is not None and num_classes != saved_classes:
    raise ConversionError(f"teacher checkpoint {path} has {saved_classes} classes, "
                     f"but {num_classes} are expected")

  import orbax.checkpoint as ocp

  var_path = os.path.abspath(os.path.join(path, VARIABLES_DIR))
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      restored = checkpointer.restore(var_path)
    variables = unflatten({k: np.asarray(v, np.float32)
                            for k, v in flatten(restored).items()})
    check_variables(variables, saved_arch, saved_classes,
                     f"the teacher checkpoint {path}")
  except Exception as e:  # orbax raises many types for damaged files
    raise ConversionError(f"teacher checkpoint {path} is missing or corrupt "
                     f"({type(e).__name__}: {str(e)[:500]}); "
                     f"{_redo_hint(path, saved_arch)}") from e
  return variables, meta
