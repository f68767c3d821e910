"""What a method is: the interface every module of :mod:`slkd_jax.methods`
fills in, and the types its objective reads.

A method (:class:`Method`) says

* **which networks run**: ``uses_teacher`` (the frozen teacher),
  ``num_stacked`` (K stacked networks of the teacher's architecture trained
  with the student: SLKD's SL-Ts, DML's peers), ``features`` (the student
  and the teacher return :class:`~slkd_jax.models.Outputs`);
* **its loss**: ``objective(logits, batch, hp, ctx) -> Loss`` (and the
  SL-Ts' own, ``slt_objective``);
* **its settings**: ``defaults`` (``config.recipes.<method>``),
  ``pair_defaults`` (per teacher/student pair) and ``setting_rules`` (the
  allowed values of its own settings);
* **its validation**: ``check_config`` (its config sections, before anything
  is built) and ``check_networks`` (its settings against the networks'
  feature shapes, when the stage is resolved);
* **its extra state**: ``make_modules`` / ``module_inputs`` (trainable
  connectors, embeddings) and ``init_buffers`` (non-trainable state);
* optionally **a step of its own** (``build_step``), **other eval
  networks** (``eval_logits``) and **what it deploys** (``deployed_model``).

Everything not set has the default of a plain distiller: one gradient of
the summed loss (:func:`slkd_jax.train_step.build_train_step`), the student
(and teacher, SL-Ts) evaluated, the student deployed.

This module imports no other module of the package except errors, so any
method module may import it.
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any, Callable, Mapping, NamedTuple

import flax
import jax

from slkd_jax import errors


@flax.struct.dataclass
class HParams:
  """Hyper-parameters passed to the step as (replicated) arrays.

  float64 when the run's ``config.dtype`` is ``'float64'`` (so a float64 run
  is not rounded to float32 through its loss weights), float32 otherwise.
  """
  learning_rate: jax.Array
  temperature: jax.Array
  ce_weight: jax.Array
  kd_weight: jax.Array
  fused_weight: jax.Array
  fused_ce_weight: jax.Array
  fused_kd_weight: jax.Array
  slt_ce_weight: jax.Array
  slt_kd_weight: jax.Array
  fusion_weights: jax.Array  # [K] ([0] without SL-Ts)
  dkd_alpha: jax.Array
  dkd_beta: jax.Array
  dkd_warmup_factor: jax.Array  # min(epoch / warmup, 1), epoch 1-indexed
  feat_weight: jax.Array  # feature-based methods' term weight
  epoch: jax.Array  # the 1-indexed epoch (methods with their own warm-up)
  # The run's seed (uint32): the key of per-step randomness (CRD's
  # negatives), an array so that runs of one study draw their own.
  seed: jax.Array


@flax.struct.dataclass
class Logits:
  """What the networks of one step produced: logits of the student
  ``[B,C]``, the teacher ``[B,C]`` or None, the SL-Ts ``[K,B,C]`` or None
  and their fusion ``[B,C]`` or None; for methods with ``features`` also the
  student's and the teacher's :class:`~slkd_jax.models.Outputs`."""
  student: jax.Array
  teacher: jax.Array | None = None
  slts: jax.Array | None = None
  fused: jax.Array | None = None
  student_features: Any = None
  teacher_features: Any = None


@dataclasses.dataclass(frozen=True)
class Context:
  """What an objective may read besides the logits, the batch and ``hp``.

  Attributes:
    settings: the stage's loss settings (:func:`loss_settings`; static).
    modules: the method's trainable modules bound to their current
      parameters (name → callable).
    teacher: the frozen teacher's :class:`~slkd_jax.state.ModelState`
      (gradient stopped) or None.
    networks: the run's :class:`~slkd_jax.stage.Networks`.
    buffers: the method's current buffers (``init_buffers``) or None.
    rng: a key of this step (from the run's seed and the global step).
    detach_fused_target: stop the gradient of SLKD's fused SL-T target.
  """
  settings: Any = None
  modules: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
  teacher: Any = None
  networks: Any = None
  buffers: Any = None
  rng: jax.Array | None = None
  detach_fused_target: bool = False


class Loss(NamedTuple):
  """An objective's result: the scalar to minimise, its logged terms (keyed
  ``<network>/<quantity>``) and, for methods with buffers, the new
  buffers."""
  value: jax.Array
  terms: dict[str, jax.Array]
  buffers: dict[str, Any] | None = None


#: ``objective(logits, batch, hp, ctx) -> Loss``; ``batch`` holds ``label``,
#: ``mask`` (real examples) and, on the device-resident pipelines, ``index``.
Objective = Callable[[Logits, dict, HParams, Context], Loss]


# ---------------------------------------------------------------------------
# Validation vocabulary (config.py and the methods' checks share it).


def is_int(value: Any, lower: int, upper: float = math.inf) -> bool:
  """An int (not a bool) in ``[lower, upper)``."""
  return (isinstance(value, int) and not isinstance(value, bool)
          and lower <= value < upper)


def is_number(value: Any) -> bool:
  """A finite int or float (not a bool)."""
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
  """A one-line :class:`~slkd_jax.errors.ConfigError` naming ``config.key``,
  its value and what is allowed, unless ``ok``."""
  if not ok:
    raise errors.ConfigError(f"config.{key}={value!r} is invalid: {allowed}")


@dataclasses.dataclass(frozen=True)
class Rule:
  """The allowed values of one setting: a predicate and its description."""
  ok: Callable[[Any], bool]
  allowed: str


NON_NEGATIVE = Rule(lambda v: is_number(v) and v >= 0,
                    "a non-negative number")
POSITIVE = Rule(lambda v: is_number(v) and v > 0, "a positive number")
FRACTION = Rule(lambda v: is_number(v) and 0 <= v < 1, "in [0, 1)")
BOOL = Rule(lambda v: isinstance(v, bool), "True or False")


def int_at_least(lower: int) -> Rule:
  """An int >= ``lower``."""
  return Rule(lambda v: is_int(v, lower), f"an int >= {lower}")


def one_of(choices: tuple[str, ...]) -> Rule:
  """One of ``choices``."""
  return Rule(lambda v: v in choices, f"one of {', '.join(choices)}")


# ---------------------------------------------------------------------------
# The interface.


@dataclasses.dataclass(frozen=True)
class Method:
  """One method: its networks, loss, settings, validation and extra state.

  Attributes:
    name: registry name (``config.method``).
    description: one line for ``--help`` and errors.
    objective: the loss (:data:`Objective`).
    uses_teacher: runs the frozen teacher.
    uses_slts: its stacked networks are SLKD's SL-Ts (fused with
      ``slkd.fusion_weights``, learning CE + KD from the teacher).
    peers: DML: the student is peer 0 and ``DistillState.slts`` holds peers
      1..K−1, trained from scratch (``uses_slts`` stays False).
    features: the student and the teacher return their feature maps
      (:class:`~slkd_jax.models.Outputs`) to the objective.
    teacher_train_mode: the teacher runs in train mode (batch statistics;
      its updated running statistics are discarded): OFD's reference.
    slt_objective: ``f(slt_logits, teacher_logits, batch, hp) -> Loss``:
      the SL-Ts' own loss (SLKD's Σ_j L_SLT_j), added to :attr:`objective`
      in the same gradient by the shared step.
    feature_term: the feature term of the ``w_ce·CE + w_feat·term`` family
      (:mod:`slkd_jax.methods.feature`), None for other methods.
    defaults: its recipe settings beyond :data:`LOSS_KEYS` and its own
      values of those keys (its reference's weights).
    pair_defaults: per (teacher arch, student arch): the reference's values
      for that pair over :attr:`defaults` (mdistiller's per-pair yaml).
    setting_rules: allowed values of its settings where they are not "a
      non-negative number" (``config.validate`` checks every setting).
    student_archs: the student architectures it can train (empty: any).
    check_config: ``f(config)``: its checks of the config sections it reads
      (one-line ConfigError), run by ``config.validate``.
    check_networks: ``f(student, teacher, settings, image_size)``: its
      settings against the networks' feature shapes (``jax.eval_shape``,
      nothing compiled), run by :func:`slkd_jax.stage.resolve` before
      :attr:`make_modules`.
    num_stacked: ``f(config) -> K``: how many stacked networks of the
      teacher's architecture train with the student (None: none).
    fusion_weights: ``f(config) -> (w_1..w_K)`` for SL-T methods.
    make_modules: ``f(student, teacher, settings, dtype, image_size) ->
      {name: module}``: its extra trainable modules, trained with the
      student's optimiser.
    module_inputs: ``f(name, student, teacher, settings, image_size) ->
      (args, kwargs)`` that initialise module ``name``.
    init_buffers: ``f(key, settings, train_labels, dtype) -> dict``: its
      non-trainable state (``DistillState.buffers``); the objective reads
      ``ctx.buffers`` and returns the new ones in :class:`Loss`.
    build_step: ``f(stage) -> step`` for a method whose update is not one
      gradient of the summed loss, with the signature of
      :func:`slkd_jax.train_step.build_train_step`'s result.
    eval_logits: ``f(state, stage, images, hp) -> {name: logits}`` for
      methods that evaluate other networks than student / teacher / SL-Ts.
    deployed_model: ``f(variables, arch) -> (variables, arch)``: the
      network it deploys from the trained student (TESKD: the backbone).
  """
  name: str
  description: str
  objective: Objective
  uses_teacher: bool = False
  uses_slts: bool = False
  peers: bool = False
  features: bool = False
  teacher_train_mode: bool = False
  slt_objective: Callable[..., Loss] | None = None
  feature_term: Callable[..., jax.Array] | None = None
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  pair_defaults: Mapping[tuple[str, str], Mapping[str, Any]] = (
      dataclasses.field(default_factory=dict))
  setting_rules: Mapping[str, Rule] = dataclasses.field(default_factory=dict)
  student_archs: tuple[str, ...] = ()
  check_config: Callable[[Any], None] | None = None
  check_networks: Callable[..., None] | None = None
  num_stacked: Callable[[Any], int] | None = None
  fusion_weights: Callable[[Any], tuple[float, ...]] | None = None
  make_modules: Callable[..., dict] | None = None
  module_inputs: Callable[..., tuple] | None = None
  init_buffers: Callable[..., dict] | None = None
  build_step: Callable[[Any], Callable] | None = None
  eval_logits: Callable[..., dict[str, jax.Array]] | None = None
  deployed_model: Callable[..., tuple[dict, str]] | None = None

  def validate(self, config: Any) -> None:
    """The method's checks of a config that runs it (ConfigError)."""
    check(not self.student_archs or config.student.arch in self.student_archs,
          "student.arch", config.student.arch,
          f"method {self.name!r} trains one of " + ", ".join(
              self.student_archs))
    if self.check_config is not None:
      self.check_config(config)


# ---------------------------------------------------------------------------
# Loss settings.

#: The loss settings every method's recipe defines (``config.recipes.<m>``)
#: and that ``config.loss`` may override.
LOSS_KEYS = ("temperature", "ce_weight", "kd_weight", "fused_weight",
             "fused_ce_weight", "fused_kd_weight", "slt_ce_weight",
             "slt_kd_weight", "dkd_alpha", "dkd_beta", "dkd_warmup",
             "feat_weight")


def loss_overrides(config: Any) -> dict[str, float]:
  """The ``config.loss`` keys set explicitly (not None): they replace the
  recipe's value in every stage."""
  return {k: config.loss[k] for k in LOSS_KEYS if config.loss[k] is not None}


def loss_settings(config: Any, method: str | None = None
                  ) -> types.SimpleNamespace:
  """The loss settings a stage of ``method`` (default ``config.method``)
  trains with: that method's recipe (``config.recipes[method]``, set per
  dataset and pair by the presets), with the explicit ``config.loss``
  overrides applied. ``slt_*_weight`` None means tied to the student's."""
  settings = dict(config.recipes[method or config.method])
  settings.update(loss_overrides(config))
  return types.SimpleNamespace(**settings)


def setting_key(config: Any, method: str, key: str) -> str:
  """The config key that sets ``method``'s setting ``key``:
  ``loss.<key>`` when overridden there, else ``recipes.<method>.<key>``."""
  if key in LOSS_KEYS and config.loss[key] is not None:
    return f"loss.{key}"
  return f"recipes.{method}.{key}"
