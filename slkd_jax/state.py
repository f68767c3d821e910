"""Functional train states for the teacher, the student and the stacked SL-Ts.

* :class:`ModelState` — variables of a frozen network (the teacher).
* :class:`TrainState` — a trained network: step, params, batch_stats and the
  optimiser state. The K SL-Ts are **one** ``TrainState`` whose every leaf has
  a leading axis of size K.
* :class:`DistillState` — everything one training step reads and writes.

All are ``flax.struct`` dataclasses (pytrees), so they pass through ``jit``,
shard, donate and checkpoint as plain trees.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from slkd_jax import parallel
from slkd_jax.models.layers import param_dtype

PyTree = Any

#: fold_in tags of the run's key for the method's buffers and for the
#: per-step randomness of its objective (CRD's negatives).
BUFFERS_TAG = 0x42554646  # "BUFF"
STEP_RNG_TAG = 0x53524E47  # "SRNG"


@flax.struct.dataclass
class ModelState:
  """Parameters and BatchNorm statistics of a network."""
  params: PyTree
  batch_stats: PyTree

  @property
  def variables(self) -> dict[str, PyTree]:
    """The flax variables dict for ``module.apply``."""
    return {"params": self.params, "batch_stats": self.batch_stats}


@flax.struct.dataclass
class TrainState(ModelState):
  """A network being trained: :class:`ModelState` plus step and optimiser."""
  step: jax.Array
  opt_state: optax.OptState


@flax.struct.dataclass
class DistillState:
  """The state of a distillation run.

  Attributes:
    step: global training step (number of completed steps).
    student: the network being distilled (for method ``ce``: the network
      trained from scratch, e.g. a teacher).
    slts: the K self-learning teachers, stacked on a leading axis; ``None``
      when the method uses none.
    teacher: the frozen teacher; ``None`` for method ``ce``.
    modules: the method's extra trainable modules (name → state; FitNet's
      and VID's ``'connector'``), trained with the student's optimiser;
      ``None`` when it has none.
    buffers: the method's non-trainable state that the step updates (CRD's
      memory banks; name → array), ``None`` when it has none.
  """
  step: jax.Array
  student: TrainState
  slts: TrainState | None = None
  teacher: ModelState | None = None
  modules: dict[str, TrainState] | None = None
  buffers: dict[str, jax.Array] | None = None


def init_variables(model: nn.Module, key: jax.Array, image_shape
                   ) -> tuple[PyTree, PyTree]:
  """``(params, batch_stats)`` of ``model`` for NHWC ``image_shape``."""
  variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32),
                         train=False)
  return variables["params"], variables.get("batch_stats", {})


def init_train_state(model: nn.Module, tx: optax.GradientTransformation,
                     key: jax.Array, image_shape) -> TrainState:
  """A fresh :class:`TrainState` (step 0, the model's own initialisers)."""
  params, batch_stats = init_variables(model, key, image_shape)
  return TrainState(params=params, batch_stats=batch_stats,
                    step=jnp.zeros((), jnp.int32), opt_state=tx.init(params))


def init_stacked_train_state(model: nn.Module, tx: optax.GradientTransformation,
                             keys: jax.Array, image_shape) -> TrainState:
  """K independent fresh states stacked on a leading axis (``jax.vmap``).

  Each SL-T gets its own random init (``keys[k]``), not a copy of another.
  """
  return jax.vmap(lambda k: init_train_state(model, tx, k, image_shape))(keys)


# ---------------------------------------------------------------------------
# A fresh state for a stage.


def _init_module(stage, name: str, key) -> TrainState:
  """A fresh state of the method's module ``name`` (its own initialisers,
  shapes from the student's features)."""
  args, kwargs = stage.method.module_inputs(
      name, stage.nets.student, stage.nets.teacher, stage.settings,
      stage.image_size)
  variables = stage.nets.modules[name].init(key, *args, **kwargs)
  params = variables["params"]
  return TrainState(params=params,
                    batch_stats=variables.get("batch_stats", {}),
                    step=jnp.zeros((), jnp.int32),
                    opt_state=stage.tx.init(params))


def init_trainable(stage, root: jax.Array, train_labels=None) -> DistillState:
  """The trainable part of a fresh :class:`DistillState` from the run's key
  ``root`` (pure: jit- and vmap-able; no teacher).

  RNG: ``root`` folded with 1 for the student, 2 for the SL-Ts (SL-T ``k``
  uses ``split(key_slts, K)[k]``: independent inits), 3, 4, ... for the
  method's modules in name order and :data:`BUFFERS_TAG` for its buffers.
  """
  method, nets, tx = stage.method, stage.nets, stage.tx
  shape = stage.image_shape
  student = init_train_state(nets.student, tx, jax.random.fold_in(root, 1),
                             shape)
  slts = None
  if nets.slt is not None:
    keys = jax.random.split(jax.random.fold_in(root, 2), nets.num_slts)
    slts = init_stacked_train_state(nets.slt, tx, keys, shape)
  modules = None
  if nets.modules:
    modules = {name: _init_module(stage, name, jax.random.fold_in(root, 3 + i))
               for i, name in enumerate(sorted(nets.modules))}
  buffers = None
  if method.init_buffers is not None:
    buffers = method.init_buffers(
        jax.random.fold_in(root, BUFFERS_TAG), stage.settings, train_labels,
        param_dtype(stage.dtype))
  return DistillState(step=jnp.zeros((), jnp.int32), student=student,
                      slts=slts, modules=modules, buffers=buffers)


def check_inputs(stage, teacher: ModelState | None, train_labels) -> None:
  """A teacher where the method distils, labels where it keeps memory."""
  method = stage.method
  if method.uses_teacher and teacher is None:
    raise ValueError(f"method {method.name!r} needs a teacher: set "
                     "config.teacher.checkpoint or train one first")
  if method.init_buffers is not None and train_labels is None:
    raise ValueError(f"method {method.name!r} keeps per-example memory and "
                     "needs the training labels (train_labels=)")


def create_state(stage, mesh, teacher: ModelState | None = None,
                 train_labels=None) -> DistillState:
  """A fresh, replicated :class:`DistillState` for a stage
  (:func:`init_trainable` from ``key(stage.seed)``).

  Args:
    stage: the resolved stage (:func:`slkd_jax.stage.resolve`).
    mesh: device mesh; the state is replicated over it.
    teacher: the frozen teacher's variables, required when the method uses a
      teacher.
    train_labels: the training labels in dataset order (host ``[N]``),
      required by methods with buffers (CRD's memory and class table).
  """
  check_inputs(stage, teacher, train_labels)
  replicated = parallel.replicated(mesh)
  state = jax.jit(lambda root: init_trainable(stage, root, train_labels),
                  out_shardings=replicated)(jax.random.key(stage.seed))
  if stage.method.uses_teacher:
    state = state.replace(teacher=jax.device_put(teacher, replicated))
  return state
