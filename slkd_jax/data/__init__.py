"""Input pipelines: CIFAR-100, ImageNet, scikit-learn digits, synthetic data.

Every dataset comes through one interface, :func:`create_datasets`, which
returns a training and an evaluation object. Both yield batches of the same
form::

  {'image': float32 [B, H, W, 3] (normalised),
   'label': int32 [B],
   'mask': bool [B]}   # False for padding examples

(the device-resident training data adds ``'index'``: int32 [B], each
example's index in the dataset, for methods with per-example memory)

as global ``jax.Array``\\ s sharded on the mesh axis ``data``
(:func:`slkd_jax.parallel.batch_sharding`). ``B`` never changes: the last
partial batch of an epoch (train) or of the split (eval) is padded to ``B``
and masked, so the step compiles once and losses, BatchNorm statistics and
accuracies count only real examples.

Two implementations sit behind it:

* :mod:`.arrays`: small datasets (CIFAR-100, digits, synthetic) live whole on
  every device; each epoch's permutation and the augmentation run inside
  ``jit`` as pure functions of ``(seed, epoch, step)``, so no host pipeline
  runs during training and resuming is exact.
* :mod:`.imagenet`: a ``tf.data`` pipeline per process over its own TFDS
  shard, assembled into global arrays.

This package is the only place that imports TensorFlow, and only inside the
functions that need it: importing :mod:`slkd_jax.data` does not, and digits
and synthetic data work without TensorFlow installed.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol

import jax

from slkd_jax.data.common import (SETTINGS, DatasetError, _get,  # noqa: F401
                                  import_tfds, resolve_data_dir, setting,
                                  tfds_data_dirs, tfds_said)


# name -> (num_classes, image_size). Synthetic data takes both from the config.
DATASET_INFO: dict[str, tuple[int, int]] = {
    "cifar100": (100, 32),
    "imagenet2012": (1000, 224),
    "digits": (10, 32),
}
DATASET_NAMES = ("cifar100", "imagenet2012", "digits", "synthetic")


def dataset_info(name: str, data_config: Any = None) -> tuple[int, int]:
  """``(num_classes, image_size)`` of dataset ``name``.

  For ``'synthetic'`` both come from ``data_config`` (keys ``num_classes``,
  ``image_size``), with the defaults of :mod:`.synthetic`.
  """
  if name == "synthetic":
    from slkd_jax.data import synthetic
    return synthetic.info(data_config)
  if name not in DATASET_INFO:
    raise DatasetError(f"data.name={name!r} is not a dataset; choose one of "
                       f"{', '.join(DATASET_NAMES)}.")
  return DATASET_INFO[name]


Batch = dict[str, jax.Array]


class TrainData(Protocol):
  """What every training dataset offers (see :func:`create_datasets`)."""

  num_examples: int
  batch_size: int  # global
  steps_per_epoch: int
  num_classes: int
  image_shape: tuple[int, int, int]

  def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
    """The batches of 0-indexed ``epoch`` from ``start_step`` on."""
    ...


class EvalData(Protocol):
  """What every evaluation dataset offers: one pass over the whole split."""

  num_examples: int
  batch_size: int  # global
  num_batches: int
  num_classes: int
  image_shape: tuple[int, int, int]

  def __iter__(self) -> Iterator[Batch]:
    ...


def create_datasets(data_config: Any, *, batch_size: int, eval_batch_size: int,
                    seed: int, mesh: jax.sharding.Mesh
                    ) -> tuple[TrainData, EvalData]:
  """Build the training and evaluation data named by ``data_config.name``.

  Args:
    data_config: attribute (or key) access to ``name`` ('cifar100' |
      'imagenet2012' | 'digits' | 'synthetic'), ``data_dir`` (TFDS data_dir,
      or for ``source='cifar-100-python'`` the folder holding
      ``cifar-100-python/`` or that folder itself; None or '' = TFDS
      default), ``source`` ('tfds' | 'cifar-100-python', CIFAR-100 only),
      ``drop_last`` (default False: keep the last partial batch, masked, as
      the reference does), for ImageNet ``shuffle_buffer``,
      ``host_prefetch``, ``device_prefetch``, ``ram_budget_gb``,
      ``num_threads``, and for synthetic data ``image_size``,
      ``num_classes``, ``num_train``, ``num_test``, ``data_seed``. Keys it
      does not define take the defaults of :data:`SETTINGS`.
    batch_size: global training batch size (divisible by the device count).
    eval_batch_size: global evaluation batch size.
    seed: data seed; each epoch's order and augmentation derive from
      ``(seed, epoch, step)`` only.
    mesh: the 1-D ``('data',)`` mesh batches are sharded on.

  Returns:
    ``(train, eval)`` following :class:`TrainData` and :class:`EvalData`.
  """
  name = _get(data_config, "name")
  kwargs = dict(batch_size=batch_size, eval_batch_size=eval_batch_size,
                seed=seed, mesh=mesh)
  if name == "cifar100":
    from slkd_jax.data import cifar
    return cifar.create(data_config, **kwargs)
  if name == "imagenet2012":
    from slkd_jax.data import imagenet
    return imagenet.create(data_config, **kwargs)
  if name == "digits":
    from slkd_jax.data import digits
    return digits.create(data_config, **kwargs)
  if name == "synthetic":
    from slkd_jax.data import synthetic
    return synthetic.create(data_config, **kwargs)
  raise DatasetError(f"data.name={name!r} is not a dataset; choose one of "
                     f"{', '.join(DATASET_NAMES)}.")
