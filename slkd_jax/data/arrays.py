"""The on-device array pipeline shared by CIFAR-100, digits and synthetic data.

The whole dataset (uint8) is held replicated on every device. Per epoch one
jitted call draws the permutation from ``(seed, epoch)``; per step one jitted
call gathers the batch, augments it (zero-pad + random crop, optional
horizontal flip) with per-example keys derived from ``(seed, epoch, step)``,
normalises it and returns it sharded on ``data``. No host work runs between
steps, the batches are pure functions of ``(seed, epoch, step)`` (exact
resume), and because the random numbers are drawn for the global batch shape
inside ``jit`` they do not depend on the device or process count.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from slkd_jax import parallel
from slkd_jax.data.common import DatasetError

# fold_in tags that keep the data streams apart from each other and from any
# other use of the same seed (model init, dropout, ...).
_PERMUTATION_TAG = 0x5045524D  # "PERM"
_AUGMENT_TAG = 0x41554731  # "AUG1"


@dataclasses.dataclass(frozen=True)
class Augment:
  """Training augmentation: zero-pad ``pad`` pixels, random crop back to the
  original size, horizontal flip with probability 0.5 when ``flip``."""
  pad: int = 4
  flip: bool = True


def check_arrays(images: np.ndarray, labels: np.ndarray, *, name: str,
                 split: str, image_shape: Sequence[int] | None,
                 num_classes: int) -> None:
  """Raise :class:`DatasetError` naming what is wrong with a split's arrays.

  Checks: uint8 images ``[N, H, W, 3]`` of ``image_shape`` (when given),
  integer labels ``[N]`` in ``[0, num_classes)``.
  """
  where = f"{name} {split} split"
  if images.ndim != 4 or images.shape[-1] != 3:
    raise DatasetError(f"{where}: images have shape {images.shape}; expected "
                       f"[N, H, W, 3] (NHWC, RGB).")
  if image_shape is not None and tuple(images.shape[1:]) != tuple(image_shape):
    raise DatasetError(f"{where}: images are {tuple(images.shape[1:])}; "
                       f"expected {tuple(image_shape)}.")
  if images.dtype != np.uint8:
    raise DatasetError(f"{where}: images are {images.dtype}; expected uint8 "
                       f"pixels in [0, 255].")
  if labels.shape != (images.shape[0],):
    raise DatasetError(f"{where}: labels have shape {labels.shape}; expected "
                       f"({images.shape[0]},), one per image.")
  if not np.issubdtype(labels.dtype, np.integer):
    raise DatasetError(f"{where}: labels are {labels.dtype}; expected "
                       f"integers.")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise DatasetError(f"{where}: labels span [{labels.min()}, "
                       f"{labels.max()}]; expected [0, {num_classes - 1}] "
                       f"({num_classes} classes).")
  if images.shape[0] == 0:
    raise DatasetError(f"{where} is empty.")


def replicate(x: np.ndarray | jax.Array, mesh: jax.sharding.Mesh
              ) -> jax.Array:
  """A global array holding ``x`` whole on every device of ``mesh``.

  Built from a callback so it works with several processes: each process
  supplies its own devices' copies from the (identical) host array.
  """
  sharding = parallel.replicated(mesh)
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]
              ) -> jax.Array:
  """uint8 pixels → float32 ``(x / 255 - mean) / std`` per channel, as
  torchvision's ToTensor + Normalize."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def augment(key: jax.Array, images: jax.Array, aug: Augment) -> jax.Array:
  """Pad-crop (and flip) a uint8 batch ``[B, H, W, C]``, one key per example.

  Padding is zeros on the uint8 image, so padded pixels normalise to
  ``-mean / std`` as in the reference (torchvision ``RandomCrop(32,
  padding=4)`` before ``ToTensor``).
  """
  b, h, w, c = images.shape
  keys = jax.random.split(key, b)
  p = aug.pad

  def one(k, img):
    k_crop, k_flip = jax.random.split(k)
    if p:
      img = jnp.pad(img, ((p, p), (p, p), (0, 0)))
      dy, dx = jax.random.randint(k_crop, (2,), 0, 2 * p + 1)
      img = jax.lax.dynamic_slice(img, (dy, dx, 0), (h, w, c))
    if aug.flip:
      img = jnp.where(jax.random.bernoulli(k_flip), img[:, ::-1], img)
    return img

  return jax.vmap(one)(keys, images)


def _epoch_order(*, seed: int, epoch: jax.Array, num_examples: int,
                 length: int) -> jax.Array:
  """The example order of one epoch, ``length`` indices long.

  A permutation of all examples drawn from ``(seed, epoch)``. When the epoch
  keeps its last partial batch, the order is extended (wrapping around) to
  whole batches; those extra positions are masked out by the step.
  """
  key = jax.random.fold_in(jax.random.PRNGKey(seed), _PERMUTATION_TAG)
  key = jax.random.fold_in(key, epoch)
  perm = jax.random.permutation(key, num_examples).astype(jnp.int32)
  return perm[jnp.arange(length) % num_examples]


def _train_batch(images, labels, order, epoch, step, *, seed: int,
                 batch_size: int, num_examples: int, aug: Augment | None,
                 mean, std, sharding) -> dict[str, jax.Array]:
  """Batch ``step`` of an epoch whose order is ``order``."""
  start = step * batch_size
  idx = jax.lax.dynamic_slice_in_dim(order, start, batch_size)
  # Shard the indices first so every device gathers only its own examples.
  idx = jax.lax.with_sharding_constraint(idx, sharding)
  mask = (start + jnp.arange(batch_size)) < num_examples
  x = jnp.take(images, idx, axis=0)
  if aug is not None:
    key = jax.random.fold_in(jax.random.PRNGKey(seed), _AUGMENT_TAG)
    key = jax.random.fold_in(jax.random.fold_in(key, epoch), step)
    x = augment(key, x, aug)
  return {"image": normalize(x, mean, std),
          "label": jnp.take(labels, idx, axis=0),
          "mask": mask,
          "index": idx}


def _eval_batch(images, labels, step, *, batch_size: int, num_examples: int,
                mean, std, sharding) -> dict[str, jax.Array]:
  """Batch ``step`` of the split in order; positions past the end are padding
  (they repeat example 0 and are masked)."""
  pos = step * batch_size + jnp.arange(batch_size)
  mask = pos < num_examples
  idx = jax.lax.with_sharding_constraint(jnp.where(mask, pos, 0), sharding)
  return {"image": normalize(jnp.take(images, idx, axis=0), mean, std),
          "label": jnp.take(labels, idx, axis=0),
          "mask": mask}


@functools.lru_cache(maxsize=64)
def _program(fn, out_shardings, **settings):
  """``fn`` with its static ``settings`` bound, jitted once per distinct
  value: the datasets of a resume, of a table's cells or of a study's
  separate runs reuse the compiled programs."""
  return jax.jit(functools.partial(fn, **settings),
                 out_shardings=out_shardings)


class ArrayTrainData:
  """Training batches from a device-resident array dataset.

  Attributes:
    num_examples: examples in the split.
    batch_size: global batch size.
    steps_per_epoch: ``ceil(N / B)``, or ``N // B`` with ``drop_last``.
    num_classes: number of classes.
    image_shape: ``(H, W, 3)``.
    augment: the training augmentation (None: none).
    mean, std: per-channel normalisation constants in [0, 1] units.
    labels: the training labels on the host (``[N]`` int32, in dataset
      index order; methods that sample by class, such as CRD, use them).

  Training batches also carry ``'index'``: each example's index in the
  dataset (padding positions repeat a real index and are masked).
  """

  def __init__(self, images: np.ndarray | jax.Array,
               labels: np.ndarray | jax.Array, *, batch_size: int, seed: int,
               mesh: jax.sharding.Mesh, mean: Sequence[float],
               std: Sequence[float], augment: Augment | None,
               num_classes: int, drop_last: bool = False):
    parallel.check_global_batch(batch_size, mesh, "batch_size")
    n = int(images.shape[0])
    if drop_last and n < batch_size:
      raise DatasetError(f"drop_last=True with batch_size={batch_size} larger "
                         f"than the {n} training examples leaves no batch.")
    self.num_examples = n
    self.batch_size = batch_size
    self.steps_per_epoch = n // batch_size if drop_last else -(-n // batch_size)
    self.num_classes = num_classes
    self.image_shape = tuple(int(d) for d in images.shape[1:])
    self.seed = seed
    self.augment = augment
    self.mean, self.std = tuple(mean), tuple(std)
    self.labels = np.asarray(jax.device_get(labels), np.int32)
    self._images = replicate(images, mesh)
    self._labels = replicate(np.asarray(labels, np.int32)
                             if not isinstance(labels, jax.Array) else labels,
                             mesh)
    sharding = parallel.batch_sharding(mesh)
    self._order_fn = _program(
        _epoch_order, parallel.replicated(mesh), seed=seed, num_examples=n,
        length=self.steps_per_epoch * batch_size)
    self._batch_fn = _program(
        _train_batch, sharding, seed=seed, batch_size=batch_size,
        num_examples=n, aug=augment, mean=tuple(mean), std=tuple(std),
        sharding=sharding)

  def epoch_order(self, epoch: int) -> jax.Array:
    """The (replicated) example order of ``epoch``; for tests and tools."""
    return self._order_fn(epoch=np.int32(epoch))

  def epoch(self, epoch: int, start_step: int = 0
            ) -> Iterator[dict[str, jax.Array]]:
    """Yield the batches of 0-indexed ``epoch`` from ``start_step`` on.

    One jitted call per epoch (the order) and one per step; nothing else
    runs on the host, so the loop never waits for input.
    """
    if not 0 <= start_step <= self.steps_per_epoch:
      raise ValueError(f"start_step={start_step} outside [0, "
                       f"{self.steps_per_epoch}].")
    order = self.epoch_order(epoch)
    e = np.int32(epoch)
    for step in range(start_step, self.steps_per_epoch):
      yield self._batch_fn(self._images, self._labels, order, e,
                           np.int32(step))


class ArrayEvalData:
  """Evaluation batches over a device-resident split, in order, exactly once.

  The last batch is padded to ``batch_size`` and masked.
  """

  def __init__(self, images: np.ndarray | jax.Array,
               labels: np.ndarray | jax.Array, *, batch_size: int,
               mesh: jax.sharding.Mesh, mean: Sequence[float],
               std: Sequence[float], num_classes: int):
    parallel.check_global_batch(batch_size, mesh, "eval_batch_size")
    n = int(images.shape[0])
    self.num_examples = n
    self.batch_size = batch_size
    self.num_batches = -(-n // batch_size)
    self.num_classes = num_classes
    self.image_shape = tuple(int(d) for d in images.shape[1:])
    self._images = replicate(images, mesh)
    self._labels = replicate(np.asarray(labels, np.int32)
                             if not isinstance(labels, jax.Array) else labels,
                             mesh)
    sharding = parallel.batch_sharding(mesh)
    self._batch_fn = _program(
        _eval_batch, sharding, batch_size=batch_size, num_examples=n,
        mean=tuple(mean), std=tuple(std), sharding=sharding)

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    for step in range(self.num_batches):
      yield self._batch_fn(self._images, self._labels, np.int32(step))


def make_array_datasets(train: tuple[np.ndarray, np.ndarray],
                        test: tuple[np.ndarray, np.ndarray], *,
                        mean: Sequence[float], std: Sequence[float],
                        augment: Augment | None, num_classes: int,
                        batch_size: int, eval_batch_size: int, seed: int,
                        mesh: jax.sharding.Mesh, drop_last: bool = False
                        ) -> tuple[ArrayTrainData, ArrayEvalData]:
  """Training and evaluation data from ``(images uint8, labels)`` pairs."""
  train_data = ArrayTrainData(
      *train, batch_size=batch_size, seed=seed, mesh=mesh, mean=mean, std=std,
      augment=augment, num_classes=num_classes, drop_last=drop_last)
  eval_data = ArrayEvalData(*test, batch_size=eval_batch_size, mesh=mesh,
                            mean=mean, std=std, num_classes=num_classes)
  return train_data, eval_data
