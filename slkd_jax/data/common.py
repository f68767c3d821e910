"""What every input pipeline shares: the error a user fixes, the data
settings and their defaults, and TensorFlow Datasets' import and messages.

Kept apart from the package's ``__init__`` (which dispatches to the
pipelines) so that the pipelines import it without importing the package
that imports them.
"""

from __future__ import annotations

import os
from typing import Any

from slkd_jax import errors


class DatasetError(errors.UserError, ValueError):
  """A dataset is missing or malformed; the message says how to fix it."""


# The settings of ``config.data`` the pipelines read, with the defaults
# ``slkd_jax.config.base_config()`` declares (a test keeps the two equal).
# They fill in keys a partial config (a dict, in tests and notebooks) leaves
# out; None means "automatic" and is never replaced.
SETTINGS: dict[str, Any] = {
    "source": "tfds",
    "data_dir": None,
    "drop_last": False,
    "shuffle_buffer": 10_000,
    "host_prefetch": 2,
    "device_prefetch": 2,
    "ram_budget_gb": None,
    "num_threads": None,
    "data_seed": 0,
    "mean": None,
    "std": None,
}


def _get(config: Any, key: str, default: Any = None) -> Any:
  """``config.key`` for ConfigDicts, dicts and plain objects, else default."""
  if isinstance(config, dict):
    return config.get(key, default)
  try:
    return getattr(config, key)
  except (AttributeError, KeyError):
    return default


def setting(config: Any, key: str) -> Any:
  """The data setting ``key`` (one of :data:`SETTINGS`) of ``config``.

  The config's value as it is (0 stays 0, None stays None); the default of
  :data:`SETTINGS` only where the config does not define ``key`` at all.
  """
  return _get(config, key, SETTINGS[key])


def resolve_data_dir(config: Any) -> str | None:
  """``config.data_dir`` with ``~`` expanded; None when unset or empty.

  An empty string means the default, as None does: TFDS would otherwise
  search the current directory (it treats ``''`` as a relative path).
  """
  value = setting(config, "data_dir")
  if value is None or not str(value).strip():
    return None
  return os.path.expanduser(str(value))


def import_tfds():
  """Import TensorFlow Datasets with TensorFlow kept off the GPUs.

  TensorFlow only decodes and augments on the host; left alone it would
  reserve GPU memory that JAX needs.
  """
  # Quiet TF's C++ start-up banner unless the user asked for it.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    pass  # TF was initialised earlier (by the user); nothing more to do.
  import tensorflow_datasets as tfds
  return tfds


def tfds_said(error: BaseException) -> str:
  """The first sentence of a TFDS error, on one line (TFDS's own messages
  go on with advice that does not apply here, such as download=True)."""
  text = " ".join(str(error).split())
  head, dot, _ = text.partition(". ")
  return f"{type(error).__name__}: {head}{dot.strip()}"


def tfds_data_dirs(data_dir: str | None) -> str:
  """The directory TFDS searches for ``data_dir`` (None: its default), for
  error messages and the ``tfds build`` command they suggest.

  Asks TFDS itself where it can (its default is fixed when it is imported,
  from ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
  """
  if data_dir:
    return str(data_dir)
  try:
    from tensorflow_datasets.core import constants
    default = constants.DATA_DIR
  except ImportError:
    default = os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
  return os.path.expanduser(str(default))
