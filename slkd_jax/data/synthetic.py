"""Synthetic data of any shape, for benchmarks and tests.

Uniform random uint8 images with uniform random labels (nothing to learn),
drawn with numpy from the seed so every process builds the same arrays, and
fed through the same on-device pipeline as CIFAR-100 (pad-crop + flip).
Needs neither TensorFlow nor any file.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from slkd_jax.data import arrays
from slkd_jax.data.common import DatasetError, _get, setting

DEFAULTS = dict(image_size=32, num_classes=10, num_train=1024, num_test=256)
# Statistics of uniform bytes in [0, 255] scaled to [0, 1].
MEAN = (0.5, 0.5, 0.5)
STD = (float(np.sqrt((256.0**2 - 1) / 12) / 255),) * 3


def _image_size(data_config: Any) -> int | tuple[int, int]:
  size = _get(data_config, "image_size", None) or DEFAULTS["image_size"]
  if isinstance(size, (int, np.integer)):
    return int(size)
  h, w = (int(s) for s in size)
  return h if h == w else (h, w)


def info(data_config: Any = None) -> tuple[int, int | tuple[int, int]]:
  """``(num_classes, image_size)`` from the config, with defaults
  (``image_size`` is an int for square images, else ``(H, W)``)."""
  return (int(_get(data_config, "num_classes", None) or
              DEFAULTS["num_classes"]), _image_size(data_config))


def make_arrays(num_examples: int, image_size: int | tuple[int, int],
                num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """``num_examples`` random uint8 images ``[N, H, W, 3]`` and int32 labels."""
  h, w = ((image_size, image_size) if isinstance(image_size, int)
          else tuple(image_size))
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (num_examples, h, w, 3), dtype=np.uint8)
  labels = rng.integers(0, num_classes, (num_examples,), dtype=np.int32)
  return images, labels


def create(data_config: Any, *, batch_size: int, eval_batch_size: int,
           seed: int, mesh: jax.sharding.Mesh):
  """Synthetic training and evaluation data (see :func:`create_datasets`).

  Config keys: ``image_size`` (int or (H, W)), ``num_classes``,
  ``num_train``, ``num_test``, ``drop_last``, ``data_seed``.
  """
  num_classes, image_size = info(data_config)
  num_train = int(_get(data_config, "num_train", None) or
                  DEFAULTS["num_train"])
  num_test = int(_get(data_config, "num_test", None) or DEFAULTS["num_test"])
  if num_classes < 1 or num_train < 1 or num_test < 1:
    raise DatasetError(f"synthetic data needs num_classes, num_train and "
                       f"num_test >= 1; got {num_classes}, {num_train}, "
                       f"{num_test}.")
  # The data itself is fixed by ``data_seed`` (default 0), not by the run's
  # seed, as a real dataset would be; train and test use distinct streams.
  data_seed = int(setting(data_config, "data_seed"))
  train = make_arrays(num_train, image_size, num_classes, 2 * data_seed)
  test = make_arrays(num_test, image_size, num_classes, 2 * data_seed + 1)
  return arrays.make_array_datasets(
      train, test, mean=MEAN, std=STD, augment=arrays.Augment(pad=4, flip=True),
      num_classes=num_classes, batch_size=batch_size,
      eval_batch_size=eval_batch_size, seed=seed, mesh=mesh,
      drop_last=bool(setting(data_config, "drop_last")))
