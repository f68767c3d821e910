"""A trained network as a standalone file: variables + architecture.

``DIR/model.msgpack`` holds ``{'params', 'batch_stats'}`` (flax msgpack,
dtypes kept: float64 runs stay float64) and ``DIR/model.json`` says what
they are (``arch``, ``num_classes``, ``dtype`` and where they came from).
Training writes one per stage (``<stage>/best_model``, ``<stage>/final_model``)
and the workdir's frozen teacher; ``config.teacher.checkpoint`` and
``python -m slkd_jax.evaluate --model`` read them. Writes are atomic
(temporary name, then rename), so a killed write never looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import flax.serialization
import jax
import numpy as np

from slkd_jax import errors

METADATA_FILE = "model.json"
VARIABLES_FILE = "model.msgpack"
FORMAT = "slkd_jax.model"


def is_artifact(path: str) -> bool:
  """Whether ``path`` is a directory written by :func:`save`."""
  return os.path.isfile(os.path.join(path, METADATA_FILE))


def save(path: str, variables: dict[str, Any], *, arch: str, num_classes: int,
         **info: Any) -> str:
  """Write ``variables`` of ``models.create(arch, num_classes)`` to ``path``
  (replacing what is there). ``info``: JSON-able facts to record (source,
  epoch, top-1...). Call on one process only. Returns the absolute path."""
  path = os.path.abspath(path)
  host = jax.tree.map(np.asarray, jax.device_get(
      {"params": variables["params"],
       "batch_stats": variables.get("batch_stats", {})}))
  leaves = jax.tree.leaves(host)
  meta = {"format": FORMAT, "version": 1, "arch": arch,
          "num_classes": int(num_classes),
          "dtype": str(leaves[0].dtype) if leaves else "float32",
          "num_params": int(sum(x.size for x in
                                jax.tree.leaves(host["params"]))),
          **info}
  tmp = f"{path}.tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  with open(os.path.join(tmp, VARIABLES_FILE), "wb") as f:
    f.write(flax.serialization.msgpack_serialize(host))
  with open(os.path.join(tmp, METADATA_FILE), "w") as f:
    json.dump(meta, f, indent=2)
  shutil.rmtree(path, ignore_errors=True)
  os.replace(tmp, path)
  return path


def load(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """``(variables, meta)`` of an artifact; numpy leaves.

  Raises:
    CheckpointError: ``path`` is not a readable artifact.
  """
  meta_path = os.path.join(path, METADATA_FILE)
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    with open(os.path.join(path, VARIABLES_FILE), "rb") as f:
      variables = flax.serialization.msgpack_restore(f.read())
    if meta.get("format") != FORMAT or "params" not in variables:
      raise ValueError(f"not a {FORMAT} artifact")
  except (OSError, ValueError, TypeError) as e:
    raise errors.CheckpointError(
        f"{path} is not a readable model ({type(e).__name__}: "
        f"{str(e)[:200]}); write it again (rerun its training stage, or "
        f"convert the PyTorch checkpoint again)") from None
  variables.setdefault("batch_stats", {})
  return variables, meta
