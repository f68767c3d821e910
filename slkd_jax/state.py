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

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from slkd_jax import parallel, step_cache
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


def _fresh_train_state(tx: optax.GradientTransformation, params: PyTree,
                       batch_stats: PyTree) -> TrainState:
  """A :class:`TrainState` at step 0 around initial variables."""
  return TrainState(params=params, batch_stats=batch_stats,
                    step=jnp.zeros((), jnp.int32), opt_state=tx.init(params))


@functools.partial(jax.jit, static_argnames=("model", "image_shape"))
def network_variables(model: nn.Module, keys: jax.Array, image_shape
                      ) -> tuple[PyTree, PyTree]:
  """:func:`init_variables` of ``model`` for every key of ``keys`` (any
  leading shape: runs, stacked networks), laid out like ``keys``.

  One compiled program per architecture, input shape and key layout, kept
  for the process: the random initialisers are most of the compile time of
  a fresh state, and every stage and run that builds the same network (a
  table's students, a study's stages) reuses it.
  """
  return _mapped(lambda key: init_variables(model, key, image_shape),
                 keys.ndim)(keys)


def _mapped(fn, ndim: int):
  """``fn`` vmapped over ``ndim`` leading axes."""
  for _ in range(ndim):
    fn = jax.vmap(fn)
  return fn


# ---------------------------------------------------------------------------
# A fresh state for a stage.


def _init_module(stage, name: str, key) -> TrainState:
  """A fresh state of the method's module ``name`` (its own initialisers,
  shapes from the student's features)."""
  args, kwargs = stage.method.module_inputs(
      name, stage.nets.student, stage.nets.teacher, stage.settings,
      stage.image_size)
  variables = stage.nets.modules[name].init(key, *args, **kwargs)
  return _fresh_train_state(stage.tx, variables["params"],
                            variables.get("batch_stats", {}))


def _network_keys(root: jax.Array, num_slts: int):
  """The student's key and the ``[K]`` SL-Ts' keys (None without SL-Ts)."""
  student = jax.random.fold_in(root, 1)
  if not num_slts:
    return student, None
  return student, jax.random.split(jax.random.fold_in(root, 2), num_slts)


def _assemble(stage, root: jax.Array, student_vars, slt_vars, train_labels
              ) -> DistillState:
  """The trainable state around the networks' initial variables: optimiser
  states, the method's modules and buffers (pure: jit- and vmap-able)."""
  method, nets, tx = stage.method, stage.nets, stage.tx
  student = _fresh_train_state(tx, *student_vars)
  slts = None
  if slt_vars is not None:
    slts = jax.vmap(lambda p, s: _fresh_train_state(tx, p, s))(*slt_vars)
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


def init_trainable(stage, roots: jax.Array, mesh, train_labels=None
                   ) -> DistillState:
  """The trainable part of fresh :class:`DistillState` s, one per key of
  ``roots`` (shape ``[]``, or ``[R]``: runs stacked on a leading axis),
  replicated on ``mesh``; no teacher.

  RNG: each root folded with 1 for the student, 2 for the SL-Ts (SL-T ``k``
  uses ``split(key_slts, K)[k]``: independent inits), 3, 4, ... for the
  method's modules in name order and :data:`BUFFERS_TAG` for its buffers.

  The networks' variables come from :func:`network_variables` (compiled
  once per architecture), their keys and the rest of the state from two
  small programs kept per stage program (:mod:`slkd_jax.step_cache`): the
  same numbers as one program for everything, and a network or stage built
  again (another stage, method, run or resume) is not compiled again.
  """
  nets = stage.nets
  labels = (_labels_key(train_labels)
            if stage.method.init_buffers is not None else None)
  split_keys, assemble = _init_programs(stage, mesh, roots.ndim, labels)
  student_keys, slt_keys = split_keys(roots)
  shape = stage.image_shape
  student_vars = network_variables(nets.student, student_keys, shape)
  slt_vars = (None if slt_keys is None else
              network_variables(nets.slt, slt_keys, shape))
  return assemble(roots, student_vars, slt_vars)


def _labels_key(train_labels) -> tuple | None:
  """The training labels as a hashable value (they are constants of the
  assembly program: CRD's class table is built from them on the host)."""
  if train_labels is None:
    return None
  labels = np.asarray(train_labels)
  return labels.dtype.str, labels.shape, labels.tobytes()


@step_cache.per_program
def _init_programs(stage, mesh, ndim: int, labels_key):
  """The jitted programs of :func:`init_trainable` around the networks'
  (kept per program, like the steps): the networks' keys from the roots,
  and the assembly of the state."""
  replicated = parallel.replicated(mesh)
  num_slts = stage.nets.num_slts if stage.nets.slt is not None else 0
  labels = None
  if labels_key is not None:
    dtype, shape, data = labels_key
    labels = np.frombuffer(data, dtype).reshape(shape)
  # Placed by jit, not device_put: on several processes the mesh has devices
  # this process cannot address.
  split_keys = jax.jit(
      _mapped(lambda root: _network_keys(root, num_slts), ndim),
      out_shardings=replicated)
  assemble = jax.jit(
      _mapped(lambda root, s, t: _assemble(stage, root, s, t, labels), ndim),
      out_shardings=replicated)
  return split_keys, assemble


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
  state = init_trainable(stage, jax.random.key(stage.seed), mesh,
                         train_labels)
  if stage.method.uses_teacher:
    state = state.replace(
        teacher=jax.device_put(teacher, parallel.replicated(mesh)))
  return state
