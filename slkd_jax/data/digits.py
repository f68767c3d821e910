"""The offline quickstart dataset: scikit-learn's 8×8 handwritten digits.

``sklearn.datasets.load_digits`` ships inside scikit-learn (1,797 images, 10
classes), so a complete distillation run needs no download. The images are
upsampled bilinearly to 32×32, given 3 identical channels and stored as
uint8, so CIFAR models run on them unchanged. A fixed stratified split keeps
1,437 images for training and 360 for testing. Training augmentation is
pad-4 + random crop only: digits are not mirror-symmetric, so no flips.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

from slkd_jax.data import arrays
from slkd_jax.data.common import DatasetError, setting

NUM_CLASSES = 10
IMAGE_SIZE = 32
NUM_TEST = 360
SPLIT_SEED = 0


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """``[n_out, n_in]`` bilinear interpolation weights (half-pixel centres,
  edges clamped), so ``R @ img @ R.T`` resizes an image."""
  src = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
  src = np.clip(src, 0, n_in - 1)
  lo = np.floor(src).astype(int)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  r = np.zeros((n_out, n_in))
  r[np.arange(n_out), lo] += 1 - frac
  r[np.arange(n_out), hi] += frac
  return r


@functools.lru_cache(maxsize=1)
def load_arrays() -> tuple[tuple[np.ndarray, np.ndarray],
                           tuple[np.ndarray, np.ndarray]]:
  """``((train_images, train_labels), (test_images, test_labels))``.

  Images uint8 ``[N, 32, 32, 3]``, labels int32. Deterministic: numpy
  float64 interpolation and a fixed split seed give the same bytes on every
  machine and process.
  """
  try:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
  except ImportError as e:
    raise DatasetError("The digits dataset needs scikit-learn (it ships the "
                       "data): pip install scikit-learn.") from e
  digits = load_digits()
  images = digits.images / 16.0  # [N, 8, 8] in [0, 1]
  r = _resize_matrix(images.shape[1], IMAGE_SIZE)
  up = np.einsum("oi,nij,pj->nop", r, images, r)
  up = np.clip(np.rint(up * 255.0), 0, 255).astype(np.uint8)
  up = np.repeat(up[..., None], 3, axis=-1)
  labels = digits.target.astype(np.int32)
  train_idx, test_idx = train_test_split(
      np.arange(len(labels)), test_size=NUM_TEST, stratify=labels,
      random_state=SPLIT_SEED)
  # Sorted so the split's order does not depend on sklearn's shuffling.
  train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
  return ((up[train_idx], labels[train_idx]),
          (up[test_idx], labels[test_idx]))


def mean_std(images: np.ndarray) -> tuple[tuple[float, ...],
                                          tuple[float, ...]]:
  """Per-channel mean and std of uint8 images, in [0, 1] units."""
  x = images.astype(np.float64) / 255.0
  mean = x.mean(axis=(0, 1, 2))
  std = x.std(axis=(0, 1, 2))
  return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def create(data_config: Any, *, batch_size: int, eval_batch_size: int,
           seed: int, mesh: jax.sharding.Mesh):
  """Digits training and evaluation data (see :func:`create_datasets`).

  Normalised with the mean/std of the training split.
  """
  train, test = load_arrays()
  for split, (x, y) in (("train", train), ("test", test)):
    arrays.check_arrays(x, y, name="digits", split=split,
                        image_shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
                        num_classes=NUM_CLASSES)
  mean, std = mean_std(train[0])
  return arrays.make_array_datasets(
      train, test, mean=mean, std=std,
      augment=arrays.Augment(pad=4, flip=False), num_classes=NUM_CLASSES,
      batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed,
      mesh=mesh, drop_last=bool(setting(data_config, "drop_last")))
