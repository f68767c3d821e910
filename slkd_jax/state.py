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

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from slkd_jax import feature_methods, methods, models, optim, parallel

PyTree = Any


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
  """
  step: jax.Array
  student: TrainState
  slts: TrainState | None = None
  teacher: ModelState | None = None
  modules: dict[str, TrainState] | None = None


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
# Builders from a run config.


@dataclasses.dataclass(frozen=True)
class Networks:
  """The flax modules of a run (the SL-Ts share the teacher's architecture;
  ``modules``: the method's extra trainable modules by name)."""
  student: nn.Module
  teacher: nn.Module | None
  slt: nn.Module | None
  num_slts: int
  modules: dict[str, nn.Module] = dataclasses.field(default_factory=dict)


def build_networks(config) -> Networks:
  """Student, teacher and SL-T modules for ``config`` (compute dtype set).

  DML (``method.peers``): ``slt`` is the architecture of peers 1..K−1
  (``config.teacher.arch``), ``num_slts`` = K − 1, no teacher."""
  method = methods.get(config.method)
  dtype = jnp.dtype(config.dtype)
  n = config.data.num_classes
  teacher = (models.create(config.teacher.arch, n, dtype)
             if method.uses_teacher or method.uses_slts or method.peers
             else None)
  student = models.create(config.student.arch, n, dtype)
  modules = {}
  if method.features:
    modules = feature_methods.make_modules(
        method.name, student, teacher, methods.loss_settings(config), dtype,
        config.data.image_size)
  return Networks(
      student=student,
      teacher=teacher if method.uses_teacher else None,
      slt=teacher if method.uses_slts or method.peers else None,
      num_slts=(config.slkd.num_slts if method.uses_slts else
                config.dml.num_peers - 1 if method.peers else 0),
      modules=modules)


def make_optimizer(config) -> optax.GradientTransformation:
  """The reference SGD (without ``−lr``) shared by the student and SL-Ts."""
  return optim.sgd_direction(config.optim.weight_decay, config.optim.momentum)


def image_shape(config) -> tuple[int, int, int]:
  size = config.data.image_size
  return (size, size, 3)


def _init_module(config, name: str, module: nn.Module, student: nn.Module,
                 tx, key) -> TrainState:
  """A fresh state of the method's module ``name`` (its own initialisers,
  shapes from the student's features)."""
  args, kwargs = feature_methods.module_example_inputs(
      config.method, name, student, methods.loss_settings(config),
      config.data.image_size)
  variables = module.init(key, *args, **kwargs)
  params = variables["params"]
  return TrainState(params=params,
                    batch_stats=variables.get("batch_stats", {}),
                    step=jnp.zeros((), jnp.int32), opt_state=tx.init(params))


def create_state(config, mesh, teacher: ModelState | None = None
                 ) -> DistillState:
  """A fresh, replicated :class:`DistillState` for ``config``.

  Args:
    config: run config (``slkd_jax.config``).
    mesh: device mesh; the state is replicated over it.
    teacher: the frozen teacher's variables, required when the method uses a
      teacher.

  RNG: ``key(seed)`` folded with 1 for the student, 2 for the SL-Ts (SL-T
  ``k`` uses ``split(key_slts, K)[k]``: independent inits) and 3, 4, ... for
  the method's modules in name order.
  """
  method = methods.get(config.method)
  if method.uses_teacher and teacher is None:
    raise ValueError(f"method {config.method!r} needs a teacher: set "
                     "config.teacher.checkpoint or train one first")
  nets = build_networks(config)
  tx = make_optimizer(config)
  shape = image_shape(config)

  def init(root):
    student = init_train_state(nets.student, tx, jax.random.fold_in(root, 1),
                               shape)
    slts = None
    if nets.slt is not None:
      keys = jax.random.split(jax.random.fold_in(root, 2), nets.num_slts)
      slts = init_stacked_train_state(nets.slt, tx, keys, shape)
    modules = None
    if nets.modules:
      modules = {name: _init_module(config, name, module, nets.student, tx,
                                    jax.random.fold_in(root, 3 + i))
                 for i, (name, module) in enumerate(
                     sorted(nets.modules.items()))}
    return DistillState(step=jnp.zeros((), jnp.int32), student=student,
                        slts=slts, modules=modules)

  replicated = parallel.replicated(mesh)
  state = jax.jit(init, out_shardings=replicated)(
      jax.random.key(config.seed))
  if method.uses_teacher:
    state = state.replace(teacher=jax.device_put(teacher, replicated))
  return state
