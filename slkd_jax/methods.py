"""The method table: which networks a method runs and which losses it sums.

=================  =========  =====  ==============================================
method             teacher    SL-Ts  student objective (SL-Ts: Σ_j w_ce·CE + w_kd·KD)
=================  =========  =====  ==============================================
``ce``             no         no     CE (teacher training / student from scratch)
``kd``             yes        no     w_ce·CE + w_kd·KD_T(z_s, z_t)       (Hinton)
``dkd``            yes        no     w_ce·CE + warm·DKD(α, β, T)         (Zhao)
``slkd``           yes        K      w_ce·CE + w_kd·KD_T(z_s,z_t)
                                     + w_p·(w_ce_cs·CE + w_kd_cs·KD_T(z_s,z_c))
``slkd_t_only``    yes        no     = ``kd`` (paper Table 7: teacher only)
``slkd_slt_only``  yes        K      ``slkd`` with w_kd = 0 for the student
``slkd_seq``       yes        K      SLKD*: SL-Ts step first, then the student
                                     learns from the *updated* SL-Ts' fusion
``teskd``          no         no     TESKD: backbone + 3 branches, one network
                                     (:mod:`slkd_jax.teskd`)
``dml``            no         no     K peers (student + K−1 stacked in ``slts``),
                                     each CE + mean_j KD_T(z_k, sg(z_j)) (Zhang)
=================  =========  =====  ==============================================

Loss weights and the temperature arrive as :class:`HParams` arrays, so a study
can change them (or ``jax.vmap`` over runs) without recompiling.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any, Callable

import flax
import jax

from slkd_jax import crd, feature_methods, losses, teskd
from slkd_jax import feature_losses as fl


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
  and their fusion ``[B,C]`` or None; for feature-based methods also the
  student's and the teacher's :class:`~slkd_jax.models.Outputs`."""
  student: jax.Array
  teacher: jax.Array | None = None
  slts: jax.Array | None = None
  fused: jax.Array | None = None
  student_features: Any = None
  teacher_features: Any = None


StudentObjective = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def _ce_objective(logits: Logits, labels, mask, hp: HParams, **_):
  ce = losses.cross_entropy(logits.student, labels, mask)
  return ce, {"student/ce": ce}


def _kd_objective(logits: Logits, labels, mask, hp: HParams, **_):
  ce = losses.cross_entropy(logits.student, labels, mask)
  kd = losses.kd_loss(logits.student, jax.lax.stop_gradient(logits.teacher),
                      hp.temperature, mask)
  return hp.ce_weight * ce + hp.kd_weight * kd, {"student/ce": ce,
                                                 "student/kd_teacher": kd}


def _dkd_objective(logits: Logits, labels, mask, hp: HParams, **_):
  ce = losses.cross_entropy(logits.student, labels, mask)
  dkd = losses.dkd_loss(logits.student, jax.lax.stop_gradient(logits.teacher),
                        labels, hp.dkd_alpha, hp.dkd_beta, hp.temperature, mask)
  return (hp.ce_weight * ce + hp.dkd_warmup_factor * dkd,
          {"student/ce": ce, "student/dkd": dkd})


def _slkd_objective(logits: Logits, labels, mask, hp: HParams, *,
                    detach_fused_target: bool, teacher_term: bool = True,
                    **_):
  return losses.slkd_student_loss(
      logits.student, logits.teacher, logits.fused, labels,
      temperature=hp.temperature, ce_weight=hp.ce_weight,
      kd_weight=hp.kd_weight if teacher_term else 0.0,
      fused_weight=hp.fused_weight, fused_ce_weight=hp.fused_ce_weight,
      fused_kd_weight=hp.fused_kd_weight,
      detach_fused_target=detach_fused_target, mask=mask)


@dataclasses.dataclass(frozen=True)
class Method:
  """One row of the method table.

  Attributes:
    name: registry name (``config.method``).
    uses_teacher: runs the frozen teacher.
    uses_slts: trains K stacked SL-Ts alongside the student.
    sequential: SLKD*: the SL-Ts update first and the student then learns from
      the updated SL-Ts (gradient stopped); otherwise one joint gradient of
      the summed loss.
    student_objective: ``f(logits, labels, mask, hp, *,
      detach_fused_target, settings, modules, teacher, networks)`` →
      (loss, terms); ``settings`` are the stage's loss settings
      (:func:`loss_settings`), ``modules`` the method's trainable modules
      bound to their current parameters (name → callable), ``teacher`` the
      frozen teacher's :class:`~slkd_jax.state.ModelState` (or None) and
      ``networks`` the run's :class:`~slkd_jax.stage.Networks`.
    description: one line for ``--help`` and errors.
    feature: the feature-based method (:mod:`slkd_jax.feature_methods`),
      if the row is one.
    returns_features: the student and the teacher return their features
      (:class:`~slkd_jax.models.Outputs`) to the objective.
    defaults: the method's own recipe settings beyond :data:`LOSS_KEYS`
      (and its reference CE / feature weights), from its reference code.
    make_modules: ``f(student, teacher, settings, dtype, image_size) ->
      {name: module}``: the method's extra trainable modules (connectors,
      embeddings), trained with the student's optimiser.
    module_inputs: ``f(name, student, teacher, settings, image_size) ->
      (args, kwargs)`` that initialise module ``name``.
    pair_defaults: per (teacher arch, student arch): the reference's
      settings for that pair over :attr:`defaults` (mdistiller's per-pair
      yaml files, e.g. ReviewKD's weight 5 for resnet32x4 → resnet8x4).
    build_step: a method whose update is not "one gradient of the summed
      loss" supplies its own pure step builder ``f(config, nets, tx,
      settings) -> step`` with the signature of
      :func:`slkd_jax.train_step.build_train_step`'s result.
    eval_logits: ``f(state, nets, images) -> {name: logits}`` for methods
      that evaluate networks other than student / teacher / SL-Ts (branches,
      peers); None for the default.
    init_buffers: for methods with non-trainable state updated by the step
      (CRD's memory banks): ``f(key, settings, train_labels, dtype) ->
      dict`` of arrays, kept in :attr:`DistillState.buffers`. The objective
      then also receives ``buffers`` (current), ``batch`` (with the
      examples' dataset ``index``) and ``rng`` (a key of this step) and
      returns ``(loss, terms, new_buffers)``.
    student_archs: the student architectures the method can train (empty:
      any); checked by the config's validation.
    deployed_model: ``f(variables, arch) -> (variables, arch)``: the network
      the method deploys from the trained student (TESKD: the backbone
      without its branches), saved as the stage's model artifacts; None:
      the student as it is.
    peers: DML: the student is peer 0 and ``DistillState.slts`` holds peers
      1..K−1 (the teacher's architecture), trained from scratch; no frozen
      teacher, no fusion (``uses_slts`` stays False: it means SLKD's SL-Ts).
  """
  name: str
  uses_teacher: bool
  uses_slts: bool
  student_objective: StudentObjective
  description: str
  sequential: bool = False
  feature: feature_methods.FeatureMethod | None = None
  returns_features: bool = False
  defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
  make_modules: Callable[..., dict] | None = None
  module_inputs: Callable[..., tuple] | None = None
  pair_defaults: dict[tuple[str, str], dict[str, Any]] = dataclasses.field(
      default_factory=dict)
  build_step: Callable[..., Callable] | None = None
  eval_logits: Callable[..., dict[str, jax.Array]] | None = None
  init_buffers: Callable[..., dict[str, jax.Array]] | None = None
  student_archs: tuple[str, ...] = ()
  deployed_model: Callable[..., tuple[dict, str]] | None = None
  peers: bool = False

  @property
  def features(self) -> bool:
    """Whether the student and the teacher return their feature maps."""
    return self.feature is not None or self.returns_features


def _feature_row(f: feature_methods.FeatureMethod) -> Method:
  """The method-table row of a feature-based method (mdistiller's CE 1,
  its feature weight and settings; connectors where it has one)."""
  return Method(
      f.name, True, False, feature_methods.objective(f), f.description,
      feature=f, defaults={k: v for k, v in fl.FEATURE_DEFAULTS[f.name].items()
                           if k != "input_size"},
      make_modules=functools.partial(feature_methods.make_modules, f.name),
      module_inputs=functools.partial(feature_methods.module_example_inputs,
                                      f.name),
      pair_defaults={(t, s): v for (m, t, s), v in
                     fl.FEATURE_PAIR_OVERRIDES.items() if m == f.name})


def _slt_only(logits, labels, mask, hp, *, detach_fused_target, **_):
  return _slkd_objective(logits, labels, mask, hp,
                         detach_fused_target=detach_fused_target,
                         teacher_term=False)


def _dml_step(*args, **kwargs):
  from slkd_jax import dml  # dml builds on train_step, which imports us
  return dml.build_step(*args, **kwargs)


def _dml_eval_logits(*args, **kwargs):
  from slkd_jax import dml
  return dml.eval_logits(*args, **kwargs)


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("ce", False, False, _ce_objective,
           "cross-entropy only (teacher training, student from scratch)"),
    Method("kd", True, False, _kd_objective, "Hinton KD"),
    Method("dkd", True, False, _dkd_objective, "decoupled KD (Zhao 2022)"),
    Method("slkd", True, True, _slkd_objective,
           "SLKD: teacher + K fused self-learning teachers"),
    Method("slkd_t_only", True, False, _kd_objective,
           "ablation: the student learns from the teacher only (= kd)"),
    Method("slkd_slt_only", True, True, _slt_only,
           "ablation: the student learns from CE and the fused SL-Ts only"),
    Method("slkd_seq", True, True, _slkd_objective,
           "SLKD*: SL-Ts step first, the student learns from the updated "
           "SL-Ts", sequential=True),
    *[_feature_row(f) for f in feature_methods.FEATURE_METHODS.values()],
    Method("crd", True, False, crd.objective, "contrastive representation "
           "distillation (Tian 2020)", returns_features=True,
           defaults=crd.CRD_DEFAULTS, make_modules=crd.make_modules,
           module_inputs=crd.module_inputs, init_buffers=crd.init_buffers),
    Method("teskd", False, False, teskd.objective,
           "TESKD: a backbone taught by its own hierarchical branches "
           "(Li 2021)", eval_logits=teskd.eval_logits, returns_features=True,
           defaults=teskd.TESKD_DEFAULTS,
           student_archs=tuple(teskd.resnet_kuangliu.BACKBONE_OF),
           deployed_model=teskd.deployed_model),
    Method("dml", False, False, _ce_objective,
           "deep mutual learning (Zhang 2018): K peers teach each other",
           build_step=_dml_step, eval_logits=_dml_eval_logits, peers=True,
           # The DML paper: CE + mean KL at T = 1, every dataset.
           defaults={"temperature": 1.0, "ce_weight": 1.0, "kd_weight": 1.0}),
]}


def get(name: str) -> Method:
  """The :class:`Method` called ``name``; a clear error otherwise."""
  try:
    return METHODS[name]
  except KeyError:
    raise ValueError(f"config.method={name!r} is not a method; choose one of "
                     f"{', '.join(METHODS)}") from None


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
