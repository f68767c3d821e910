"""CIFAR-100 held on device, augmented inside ``jit`` (docs/method.md §5).

The two splits are read once into uint8 arrays, either from TFDS
(``cifar100``) or from the ``cifar-100-python`` pickle folder that
torchvision and most KD code bases already keep on disk. From there the
on-device array pipeline of :mod:`.arrays` takes over: per-epoch
permutations from ``(seed, epoch)``, 4-pixel zero pad + random 32×32 crop +
horizontal flip + normalisation in ``jit``. The reference keeps the last
partial batch (782 steps of 64 per epoch, the last of 16 images); so do we,
padded to the full batch size and masked, unless ``drop_last`` is set.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import jax
import numpy as np

from slkd_jax.data import arrays
from slkd_jax.data.common import (DatasetError, import_tfds, resolve_data_dir,
                                  setting, tfds_data_dirs, tfds_said)

NUM_CLASSES = 100
IMAGE_SHAPE = (32, 32, 3)
NUM_TRAIN, NUM_TEST = 50_000, 10_000
# RepDistiller / mdistiller normalisation constants.
MEAN = (0.5071, 0.4867, 0.4408)
STD = (0.2675, 0.2565, 0.2761)
AUGMENT = arrays.Augment(pad=4, flip=True)

SOURCES = ("tfds", "cifar-100-python")
PYTHON_FOLDER = "cifar-100-python"
PYTHON_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"

Split = tuple[np.ndarray, np.ndarray]


def _tfds_missing(data_dir: str | None, error: Exception) -> DatasetError:
  """One line: where TFDS looked, what it said, how to prepare the data."""
  where = tfds_data_dirs(data_dir)
  return DatasetError(
      f"CIFAR-100 (TFDS dataset 'cifar100') could not be loaded from "
      f"data_dir={where!r} ({tfds_said(error)}); slkd_jax never downloads "
      f"during training: on a machine with internet run `tfds build cifar100 "
      f"--data_dir={where}` and copy {os.path.join(where, 'cifar100')} here "
      f"(or set data.data_dir to where it is), or use the torchvision folder: "
      f"data.source='cifar-100-python' and data.data_dir set to the folder "
      f"holding '{PYTHON_FOLDER}/' (from {PYTHON_URL}).")


def load_tfds(data_dir: str | None = None) -> tuple[Split, Split]:
  """Read CIFAR-100 train and test from TFDS into uint8/int32 numpy arrays.

  Never touches the network (``download=False``, ``try_gcs=False``); a
  missing dataset raises :class:`DatasetError` with the command to build it.
  Each split is read as one batch of its full size, which is what
  ``tfds.load(batch_size=-1)`` does, but sized from the dataset's
  cardinality so it also works where TFDS does not know the split sizes
  (e.g. under ``tfds.testing.mock_data``).
  """
  tfds = import_tfds()
  out = []
  for split in ("train", "test"):
    try:
      ds = tfds.load("cifar100", split=split, data_dir=data_dir,
                     download=False, try_gcs=False, shuffle_files=False)
    except Exception as e:  # TFDS raises AssertionError, OSError, ...
      raise _tfds_missing(data_dir, e) from e
    ds = ds.map(lambda ex: (ex["image"], ex["label"]))
    n = int(ds.cardinality())
    if n <= 0:  # unknown or infinite cardinality: count once.
      n = int(ds.reduce(0, lambda c, _: c + 1))
    images, labels = tfds.as_numpy(ds.batch(n).get_single_element())
    out.append((np.asarray(images), np.asarray(labels)))
  return out[0], out[1]


def _python_dir(data_dir: str | None) -> str:
  """The ``cifar-100-python`` folder: ``data_dir`` itself or its child."""
  candidates = []
  if data_dir:
    candidates = [os.path.join(data_dir, PYTHON_FOLDER), data_dir]
  for d in candidates:
    if (os.path.isfile(os.path.join(d, "train")) and
        os.path.isfile(os.path.join(d, "test"))):
      return d
  looked = " and ".join(repr(c) for c in candidates) or "nowhere"
  raise DatasetError(
      f"CIFAR-100 ({PYTHON_FOLDER} format): no 'train' and 'test' files in "
      f"{looked} (data.data_dir={data_dir!r}). Set data.data_dir to the folder "
      f"holding '{PYTHON_FOLDER}/' (what torchvision.datasets.CIFAR100("
      f"root=...) downloads), or download and extract {PYTHON_URL} there on "
      f"a machine with internet. Or use data.source='tfds'.")


def _load_pickle(path: str) -> dict[str, Any]:
  """The dict stored in ``path``, or a one-line :class:`DatasetError` naming
  the file when it cannot be read or is damaged (truncated download, partial
  extraction, other bytes)."""
  fix = (f"download {PYTHON_URL} again and re-extract it (it unpacks to "
         f"'{PYTHON_FOLDER}/', replacing {os.path.dirname(path) or '.'})")
  try:
    with open(path, "rb") as f:
      # The files are Python 2 pickles; 'bytes' keeps their keys as bytes.
      entry = pickle.load(f, encoding="bytes")
  except OSError as e:
    raise DatasetError(f"{path}: cannot be read ({e.strerror or e}); check "
                       f"its permissions, or {fix}.") from e
  except Exception as e:  # noqa: BLE001 - damaged bytes raise almost anything.
    why = " ".join(f"{type(e).__name__}: {e}".split())  # one line
    raise DatasetError(f"{path}: not a readable CIFAR-100 pickle ({why}); the "
                       f"file is damaged or incomplete: {fix}.") from e
  if not isinstance(entry, dict):
    raise DatasetError(f"{path}: holds a {type(entry).__name__}, not the dict "
                       f"of a CIFAR-100 pickle; {fix}.")
  return {k.decode() if isinstance(k, bytes) else k: v
          for k, v in entry.items()}


def _read_pickle(path: str) -> tuple[np.ndarray, np.ndarray]:
  """One split of the pickle format: ``data`` [N, 3072] uint8 (1024 red,
  1024 green, 1024 blue values, row-major), ``fine_labels`` [N]."""
  entry = _load_pickle(path)
  if "data" not in entry or "fine_labels" not in entry:
    raise DatasetError(f"{path}: not a CIFAR-100 pickle (keys "
                       f"{sorted(entry)}; expected 'data' and 'fine_labels').")
  data = np.asarray(entry["data"])
  if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
    raise DatasetError(f"{path}: 'data' has shape {data.shape}; expected "
                       f"[N, 3072] (3×32×32 per row).")
  images = data.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  labels = np.asarray(entry["fine_labels"], np.int64)
  return np.ascontiguousarray(images), labels


def load_python(data_dir: str | None) -> tuple[Split, Split]:
  """Read CIFAR-100 from the ``cifar-100-python`` pickle folder."""
  folder = _python_dir(data_dir)
  return (_read_pickle(os.path.join(folder, "train")),
          _read_pickle(os.path.join(folder, "test")))


def load(data_config: Any) -> tuple[Split, Split]:
  """Both splits from the source the config names, checked."""
  source = setting(data_config, "source")
  data_dir = resolve_data_dir(data_config)
  if source == "tfds":
    train, test = load_tfds(data_dir)
  elif source == PYTHON_FOLDER:
    train, test = load_python(data_dir)
  else:
    raise DatasetError(f"data.source={source!r} is not a CIFAR-100 source; "
                       f"choose one of {SOURCES}.")
  for split, (x, y) in (("train", train), ("test", test)):
    arrays.check_arrays(x, y, name=f"cifar100 ({source})", split=split,
                        image_shape=IMAGE_SHAPE, num_classes=NUM_CLASSES)
  return ((train[0], train[1].astype(np.int32)),
          (test[0], test[1].astype(np.int32)))


def create(data_config: Any, *, batch_size: int, eval_batch_size: int,
           seed: int, mesh: jax.sharding.Mesh):
  """CIFAR-100 training and evaluation data (see :func:`create_datasets`)."""
  train, test = load(data_config)
  # data.mean / data.std override the constants (TESKD: CIFAR-10's).
  mean = setting(data_config, "mean") or MEAN
  std = setting(data_config, "std") or STD
  return arrays.make_array_datasets(
      train, test, mean=mean, std=std, augment=AUGMENT,
      num_classes=NUM_CLASSES, batch_size=batch_size,
      eval_batch_size=eval_batch_size, seed=seed, mesh=mesh,
      drop_last=bool(setting(data_config, "drop_last")))
