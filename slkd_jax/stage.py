"""A stage's config, resolved once: method, loss settings, networks,
optimiser and the per-epoch hyper-parameters.

The driver resolves each stage's config (:func:`slkd_jax.config.stage_config`)
into a :class:`Stage` before anything is built; the state, the train and eval
steps and the hyper-parameters are then built from the :class:`Stage` alone,
so no code below the driver reads the ``ConfigDict`` again.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import jax.numpy as jnp
import optax

from slkd_jax import methods, models, optim, step_cache
from slkd_jax.methods import HParams


@dataclasses.dataclass(frozen=True)
class Networks:
  """The flax modules of a run: the student, the frozen teacher (or None),
  the architecture of the ``num_slts`` stacked networks (SL-Ts, DML's peers
  1..K−1: the teacher's; or None) and the method's extra trainable modules
  by name."""
  student: Any
  teacher: Any | None
  slt: Any | None
  num_slts: int
  modules: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The step-decay learning-rate schedule (docs/method.md §4)."""
  learning_rate: float
  decay_epochs: tuple[int, ...]
  decay_rate: float

  def __call__(self, epoch: int) -> float:
    return optim.learning_rate(self.learning_rate, epoch, self.decay_epochs,
                               self.decay_rate)


@dataclasses.dataclass(frozen=True)
class Stage:
  """Everything one stage trains with.

  Attributes:
    method: the row of the method table.
    settings: the stage's loss settings (its recipe with the ``config.loss``
      overrides, :func:`slkd_jax.methods.loss_settings`).
    nets: the flax modules.
    tx: the reference SGD (without ``−lr``) of every trained part.
    schedule: the learning rate by (1-indexed) epoch.
    fusion_weights: the SL-Ts' fusion weights (empty without SL-Ts).
    ensemble: ``'vmap'`` or ``'unrolled'`` (stacked SL-Ts).
    detach_fused_target: stop the gradient of the fused SL-T target.
    seed: the run's seed (initialisation and per-step randomness).
    dtype: the compute dtype name (``config.dtype``).
    image_size: the input's height and width.
    options: the method's own config section (``config.<method>``, e.g.
      ``dml.update_order``), empty if it has none.
  """
  method: methods.Method
  settings: types.SimpleNamespace
  nets: Networks
  tx: optax.GradientTransformation
  schedule: Schedule
  fusion_weights: tuple[float, ...]
  ensemble: str
  detach_fused_target: bool
  seed: int
  dtype: str
  image_size: int
  options: dict[str, Any] = dataclasses.field(default_factory=dict)

  def program_key(self) -> tuple:
    """Equal for stages whose steps and fresh states are the same programs
    (:mod:`slkd_jax.step_cache`): every field but what reaches the step as
    :meth:`hparams` inputs, i.e. the seed, the schedule, the fusion weights
    (also in ``options``: config.slkd) and the settings named in
    :data:`slkd_jax.methods.LOSS_KEYS`."""
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
              if f.name not in _HYPER_PARAMETER_FIELDS}
    fields["settings"] = _without(vars(self.settings), methods.LOSS_KEYS)
    fields["options"] = _without(self.options, _HYPER_PARAMETER_FIELDS)
    return step_cache.frozen(fields)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, 3)

  def hparams(self, epoch: int) -> HParams:
    """The :class:`HParams` of (1-indexed) ``epoch``.

    DKD's warm-up factor is ``min(epoch / warmup, 1)``. SL-T loss weights
    default to (are tied to) the student's ``ce_weight`` / ``kd_weight`` as
    in the reference. The arrays are float64 for a float64 run (0.1 or 0.05
    in float32 would leak float32 rounding into it), float32 otherwise.
    """
    loss = self.settings
    dtype = jnp.float64 if self.dtype == "float64" else jnp.float32
    arr = lambda v: jnp.asarray(v, dtype)  # noqa: E731
    tied = lambda v, default: default if v is None else v  # noqa: E731
    return HParams(
        learning_rate=arr(self.schedule(epoch)),
        temperature=arr(loss.temperature),
        ce_weight=arr(loss.ce_weight),
        kd_weight=arr(loss.kd_weight),
        fused_weight=arr(loss.fused_weight),
        fused_ce_weight=arr(loss.fused_ce_weight),
        fused_kd_weight=arr(loss.fused_kd_weight),
        slt_ce_weight=arr(tied(loss.slt_ce_weight, loss.ce_weight)),
        slt_kd_weight=arr(tied(loss.slt_kd_weight, loss.kd_weight)),
        fusion_weights=arr(self.fusion_weights).reshape(
            (len(self.fusion_weights),)),
        dkd_alpha=arr(loss.dkd_alpha),
        dkd_beta=arr(loss.dkd_beta),
        dkd_warmup_factor=arr(min(epoch / max(loss.dkd_warmup, 1e-12), 1.0)),
        feat_weight=arr(loss.feat_weight),
        epoch=arr(epoch),
        seed=jnp.asarray(self.seed, jnp.uint32),
    )


#: Stage fields that reach the step only through :meth:`Stage.hparams`.
_HYPER_PARAMETER_FIELDS = ("seed", "schedule", "fusion_weights")


def _without(items: dict, names) -> dict:
  return {k: v for k, v in items.items() if k not in names}


def resolve(config) -> Stage:
  """The :class:`Stage` of a (stage's) run config.

  Builds the networks and checks the method's settings against their
  feature shapes (``jax.eval_shape``: nothing runs or compiles), so a
  setting that does not fit the networks is a one-line
  :class:`~slkd_jax.errors.ConfigError` here, before any training.
  """
  method = methods.get(config.method)
  settings = methods.loss_settings(config)
  opt = config.optim
  return Stage(
      method=method, settings=settings,
      nets=_build_networks(config, method, settings),
      tx=optim.sgd_direction(opt.weight_decay, opt.momentum,
                             nesterov=bool(opt.nesterov)),
      schedule=Schedule(opt.learning_rate, tuple(opt.decay_epochs),
                        opt.decay_rate),
      fusion_weights=(method.fusion_weights(config)
                      if method.fusion_weights is not None else ()),
      ensemble=config.slkd.ensemble,
      detach_fused_target=bool(config.slkd.detach_fused_target),
      seed=config.seed, dtype=config.dtype,
      image_size=config.data.image_size,
      options=dict(config.get(method.name, {})))


def _build_networks(config, method: methods.Method, settings) -> Networks:
  """Student, teacher, stacked networks (the teacher's architecture) and
  the method's modules, compute dtype set; the method's network checks run
  before its modules are built."""
  dtype = jnp.dtype(config.dtype)
  n = config.data.num_classes
  stacked = method.num_stacked is not None
  teacher = (models.create(config.teacher.arch, n, dtype)
             if method.uses_teacher or stacked else None)
  student = models.create(config.student.arch, n, dtype)
  size = config.data.image_size
  if method.check_networks is not None:
    method.check_networks(student, teacher, settings, size)
  modules = {}
  if method.make_modules is not None:
    modules = method.make_modules(student, teacher, settings, dtype, size)
  return Networks(
      student=student,
      teacher=teacher if method.uses_teacher else None,
      slt=teacher if stacked else None,
      num_slts=method.num_stacked(config) if stacked else 0,
      modules=modules)
