"""ImageNet (TFDS ``imagenet2012``) read per process, assembled into global
batches (docs/method.md §5).

Every process reads its own shard of each split
(``tfds.split_for_jax_process``), decodes and augments it with a bounded
``tf.data`` pipeline, and contributes ``batch_size / process_count``
examples per step; :func:`slkd_jax.parallel.host_local_to_global` makes the
global array. The host ships uint8 pixels (4× less traffic than float32) and
a jitted function normalises them on device. A small queue of batches
already on device overlaps host and device work.

Train: random-resized-crop 224 (scale 0.08–1, ratio 3/4–4/3) + flip. Eval:
resize the shorter side to 256, centre crop 224. Both normalise with the
ImageNet mean/std.

Exact resume: each epoch's file order and shuffle are seeded from ``(seed,
epoch)``, augmentation uses stateless random ops seeded from ``(seed, epoch,
process, position)``, and resuming at ``start_step`` skips the records before
decoding them. All processes run the same number of steps: shards shorter
than ``steps_per_epoch × local batch`` are padded with masked examples.

TFDS needs the ImageNet archives downloaded by hand (no public URL); this
module never touches the network.
"""

from __future__ import annotations

import collections
from typing import Any, Iterator

import jax
import numpy as np

from slkd_jax import parallel
from slkd_jax.data import arrays
from slkd_jax.data.common import (DatasetError, import_tfds, resolve_data_dir,
                                  setting, tfds_data_dirs, tfds_said)

NAME = "imagenet2012"
NUM_CLASSES = 1000
IMAGE_SIZE = 224
RESIZE_SIZE = 256
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
TRAIN_SPLIT, EVAL_SPLIT = "train", "validation"

# Per-process pipeline settings come from the data config (config.data;
# defaults in slkd_jax.data.SETTINGS): shuffle_buffer (encoded JPEGs of
# ~110 kB each), host_prefetch, device_prefetch, ram_budget_gb, num_threads.


def _missing(data_dir: str | None, error: Exception) -> DatasetError:
  """One line: where TFDS looked, what it said, how to prepare ImageNet."""
  where = tfds_data_dirs(data_dir)
  return DatasetError(
      f"ImageNet (TFDS dataset '{NAME}') could not be loaded from "
      f"data_dir={where!r} ({tfds_said(error)}); slkd_jax never downloads "
      f"during training and TFDS cannot download ImageNet itself: download "
      f"ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from "
      f"https://image-net.org (login required) into {where}/downloads/manual/"
      f", run `tfds build {NAME} --data_dir={where}` (or --manual_dir=DIR if "
      f"the archives are elsewhere), then set data.data_dir={where!r} on "
      f"every host.")


def _builder(data_dir: str | None):
  """The TFDS builder, with its features checked (no network: try_gcs off)."""
  tfds = import_tfds()
  try:
    builder = tfds.builder(NAME, data_dir=data_dir, try_gcs=False)
  except Exception as e:  # noqa: BLE001 - reported with the fix.
    raise _missing(data_dir, e) from e
  features = builder.info.features
  shape = tuple(features["image"].shape)
  if len(shape) != 3 or shape[-1] != 3:
    raise DatasetError(f"{NAME}: images have shape {shape}; expected "
                       f"(H, W, 3) RGB.")
  num_classes = features["label"].num_classes
  if num_classes != NUM_CLASSES:
    raise DatasetError(f"{NAME}: labels have {num_classes} classes; "
                       f"expected {NUM_CLASSES} (label range [0, 999]).")
  return builder


def _open(builder, split, data_dir, *, shuffle_seed: int | None = None):
  """The undecoded records of ``split`` (image bytes, label)."""
  tfds = import_tfds()
  read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, skip_prefetch=True)
  try:
    return builder.as_dataset(
        split=split, shuffle_files=shuffle_seed is not None,
        decoders={"image": tfds.decode.SkipDecoding()},
        read_config=read_config)
  except Exception as e:  # noqa: BLE001 - AssertionError when not prepared.
    raise _missing(data_dir, e) from e


def _process_splits(split: str) -> list[Any]:
  """Every process's shard of ``split`` (this process's is at its index)."""
  tfds = import_tfds()
  n = jax.process_count()
  return [tfds.split_for_jax_process(split, process_index=p, process_count=n)
          for p in range(n)]


def _shard_sizes(builder, shards, data_dir) -> list[int]:
  """Examples in each shard, from the datasets' cardinality (known without
  reading, also under ``tfds.testing.mock_data``)."""
  sizes = []
  for shard in shards:
    n = int(_open(builder, shard, data_dir).cardinality())
    if n < 0:
      raise DatasetError(f"{NAME}: TFDS does not know the size of {shard}; "
                         f"rebuild the dataset with `tfds build {NAME}`.")
    sizes.append(n)
  return sizes


def _epoch_seed(seed: int, epoch: int) -> int:
  """A 31-bit seed for epoch ``epoch``, mixed so neighbours differ a lot."""
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]
             >> 1)


def _options(data_config: Any):
  import tensorflow as tf
  options = tf.data.Options()
  options.deterministic = True  # exact resume needs a fixed order.
  options.experimental_optimization.map_parallelization = True
  ram_gb = setting(data_config, "ram_budget_gb")
  if ram_gb is not None:  # None: tf.data's own budget (half the RAM)
    options.autotune.ram_budget = int(ram_gb * 2**30)
  threads = setting(data_config, "num_threads")
  if threads is not None:  # None: TF's shared inter-op pool
    options.threading.private_threadpool_size = int(threads)
  return options


def _to_uint8(image):
  import tensorflow as tf
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def decode_train(data, label, seed):
  """Random-resized-crop 224 + flip of one JPEG; ``seed`` int64 [2]."""
  import tensorflow as tf
  shape = tf.image.extract_jpeg_shape(data)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32,
                                        [1, 1, 4]),
      seed=seed, min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3),
      area_range=(0.08, 1.0), max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  # Decode only the crop window: most of the JPEG's pixels are never needed.
  window = tf.stack([begin[0], begin[1], size[0], size[1]])
  image = tf.io.decode_and_crop_jpeg(data, window, channels=3)
  image = tf.image.resize(image, [IMAGE_SIZE, IMAGE_SIZE], method="bilinear",
                          antialias=True)
  image = tf.image.stateless_random_flip_left_right(image, seed=seed + 1)
  return {"image": _to_uint8(image), "label": tf.cast(label, tf.int32),
          "mask": tf.constant(True)}


def decode_eval(data, label):
  """Resize the shorter side to 256, centre crop 224 (torchvision's
  ``Resize(256)`` + ``CenterCrop(224)`` sizes and rounding)."""
  import tensorflow as tf
  image = tf.io.decode_jpeg(data, channels=3)
  hw = tf.shape(image)[:2]
  h, w = hw[0], hw[1]
  short, long = tf.minimum(h, w), tf.maximum(h, w)
  new_long = (RESIZE_SIZE * long) // short
  new_h = tf.where(h <= w, RESIZE_SIZE, new_long)
  new_w = tf.where(h <= w, new_long, RESIZE_SIZE)
  image = tf.image.resize(image, tf.stack([new_h, new_w]), method="bilinear",
                          antialias=True)
  top = tf.cast(tf.round(tf.cast(new_h - IMAGE_SIZE, tf.float32) / 2),
                tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - IMAGE_SIZE, tf.float32) / 2),
                 tf.int32)
  image = image[top:top + IMAGE_SIZE, left:left + IMAGE_SIZE]
  image = tf.ensure_shape(image, (IMAGE_SIZE, IMAGE_SIZE, 3))
  return {"image": _to_uint8(image), "label": tf.cast(label, tf.int32),
          "mask": tf.constant(True)}


def _padding(count: int):
  """``count`` masked all-zero examples to fill the last batches."""
  import tensorflow as tf
  pad = {"image": tf.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), tf.uint8),
         "label": tf.constant(0, tf.int32), "mask": tf.constant(False)}
  return tf.data.Dataset.from_tensors(pad).repeat(count)


def _normalize_fn(mesh):
  sharding = parallel.batch_sharding(mesh)

  def fn(batch):
    return dict(batch, image=arrays.normalize(batch["image"], MEAN, STD))
  return jax.jit(fn, out_shardings=sharding)


def _to_device(ds, mesh, normalize, depth: int
               ) -> Iterator[dict[str, jax.Array]]:
  """Global, normalised batches from local numpy ones, ``depth`` ahead."""
  tfds = import_tfds()
  queue = collections.deque()
  for local in tfds.as_numpy(ds):
    queue.append(normalize(parallel.host_local_to_global(local, mesh)))
    if len(queue) > depth:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


class ImageNetTrainData:
  """ImageNet training batches (see :class:`slkd_jax.data.TrainData`)."""

  def __init__(self, builder, data_config: Any, *, batch_size: int,
               seed: int, mesh: jax.sharding.Mesh):
    parallel.check_global_batch(batch_size, mesh, "batch_size")
    self._builder, self._mesh, self._config = builder, mesh, data_config
    self._data_dir = resolve_data_dir(data_config)
    shards = _process_splits(TRAIN_SPLIT)
    sizes = _shard_sizes(builder, shards, self._data_dir)
    self._split = shards[jax.process_index()]
    self.num_examples = sum(sizes)
    self.batch_size = batch_size
    self.local_batch_size = batch_size // jax.process_count()
    drop_last = bool(setting(data_config, "drop_last"))
    n, b = self.num_examples, batch_size
    self.steps_per_epoch = n // b if drop_last else -(-n // b)
    if self.steps_per_epoch == 0:
      raise DatasetError(f"drop_last=True with batch_size={b} larger than "
                         f"the {n} training examples leaves no batch.")
    # Each process yields exactly steps × local batch examples: its real
    # ones (at most that many), then masked padding.
    self._length = self.steps_per_epoch * self.local_batch_size
    self._keep = min(sizes[jax.process_index()], self._length)
    self.num_classes = NUM_CLASSES
    self.image_shape = (IMAGE_SIZE, IMAGE_SIZE, 3)
    self.seed = seed
    self._normalize = _normalize_fn(mesh)

  def dataset(self, epoch: int, start_step: int = 0):
    """This process's ``tf.data`` pipeline for ``epoch`` from ``start_step``
    (local uint8 batches)."""
    import tensorflow as tf
    cfg = self._config
    epoch_seed = _epoch_seed(self.seed, epoch)
    ds = _open(self._builder, self._split, self._data_dir,
               shuffle_seed=epoch_seed)
    ds = ds.shuffle(int(setting(cfg, "shuffle_buffer")), seed=epoch_seed,
                    reshuffle_each_iteration=False)
    ds = ds.take(self._keep).enumerate()
    start = start_step * self.local_batch_size
    # Skip before decoding, so resuming costs reading, not decoding.
    ds = ds.skip(start)
    # Distinct augmentation seeds per process (its shard is distinct data).
    offset = jax.process_index() << 32

    def decode(i, ex):
      seed = tf.stack([tf.constant(epoch_seed, tf.int64), i + offset])
      return decode_train(ex["image"], ex["label"], seed)

    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    pad = self._length - max(start, self._keep)
    if pad > 0:
      ds = ds.concatenate(_padding(pad))
    ds = ds.batch(self.local_batch_size, drop_remainder=True)
    ds = ds.prefetch(int(setting(cfg, "host_prefetch")))
    return ds.with_options(_options(cfg))

  def epoch(self, epoch: int, start_step: int = 0
            ) -> Iterator[dict[str, jax.Array]]:
    """Yield the global batches of 0-indexed ``epoch`` from ``start_step``."""
    if not 0 <= start_step <= self.steps_per_epoch:
      raise ValueError(f"start_step={start_step} outside [0, "
                       f"{self.steps_per_epoch}].")
    depth = int(setting(self._config, "device_prefetch"))
    return _to_device(self.dataset(epoch, start_step), self._mesh,
                      self._normalize, depth)


class ImageNetEvalData:
  """One pass over the validation split, every example exactly once, on any
  number of processes (see :class:`slkd_jax.data.EvalData`)."""

  def __init__(self, builder, data_config: Any, *, batch_size: int,
               mesh: jax.sharding.Mesh):
    parallel.check_global_batch(batch_size, mesh, "eval_batch_size")
    self._builder, self._mesh, self._config = builder, mesh, data_config
    self._data_dir = resolve_data_dir(data_config)
    shards = _process_splits(EVAL_SPLIT)
    sizes = _shard_sizes(builder, shards, self._data_dir)
    self._split = shards[jax.process_index()]
    self._local_size = sizes[jax.process_index()]
    self.num_examples = sum(sizes)
    self.batch_size = batch_size
    self.local_batch_size = batch_size // jax.process_count()
    # Enough batches for the largest shard; smaller ones are padded.
    self.num_batches = -(-max(sizes) // self.local_batch_size)
    self.num_classes = NUM_CLASSES
    self.image_shape = (IMAGE_SIZE, IMAGE_SIZE, 3)
    self._normalize = _normalize_fn(mesh)

  def __len__(self) -> int:
    return self.num_batches

  def dataset(self):
    """This process's ``tf.data`` pipeline (local uint8 batches)."""
    import tensorflow as tf
    ds = _open(self._builder, self._split, self._data_dir)
    ds = ds.map(lambda ex: decode_eval(ex["image"], ex["label"]),
                num_parallel_calls=tf.data.AUTOTUNE)
    pad = self.num_batches * self.local_batch_size - self._local_size
    if pad > 0:
      ds = ds.concatenate(_padding(pad))
    ds = ds.batch(self.local_batch_size, drop_remainder=True)
    ds = ds.prefetch(int(setting(self._config, "host_prefetch")))
    return ds.with_options(_options(self._config))

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    depth = int(setting(self._config, "device_prefetch"))
    return _to_device(self.dataset(), self._mesh, self._normalize, depth)


def create(data_config: Any, *, batch_size: int, eval_batch_size: int,
           seed: int, mesh: jax.sharding.Mesh):
  """ImageNet training and evaluation data (see :func:`create_datasets`)."""
  builder = _builder(resolve_data_dir(data_config))
  train = ImageNetTrainData(builder, data_config, batch_size=batch_size,
                            seed=seed, mesh=mesh)
  evaluation = ImageNetEvalData(builder, data_config,
                                batch_size=eval_batch_size, mesh=mesh)
  return train, evaluation
