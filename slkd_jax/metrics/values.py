"""Numbers as the logs need them: JSON-able Python values and float scalars.

jax arrays are handled through ``np.asarray``, so nothing in
:mod:`slkd_jax.metrics` has to import jax.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np


def to_python(value: Any) -> Any:
  """Turns numpy / jax scalars and small arrays into JSON-able Python
  values (nested mappings and sequences too); anything else becomes its
  ``str`` so the log keeps a readable trace."""
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, Mapping):
    return {str(k): to_python(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_python(v) for v in value]
  try:
    array = np.asarray(value)
  except Exception:  # Not array-like: keep a readable trace in the log.
    return str(value)
  if array.dtype == object:
    return str(value)
  return array.item() if array.ndim == 0 else array.tolist()


def to_scalar(value: Any) -> float | None:
  """A float for TensorBoard, or None when ``value`` is not a numeric
  scalar."""
  if isinstance(value, (str, bytes)) or value is None:
    return None
  try:
    array = np.asarray(value)
  except Exception:
    return None
  if array.size != 1 or not (np.issubdtype(array.dtype, np.number) or
                             array.dtype == np.bool_):
    return None
  return float(array.reshape(()))
