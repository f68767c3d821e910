"""The run configuration: its defaults, and the configs derived from it.

Config files in ``configs/`` start from :func:`base_config` and override what
their preset needs. A run's config is resolved into each stage's
(:func:`stage_config`) and, in a study, each run's (:func:`run_configs`);
which keys change what a run computes is declared here once, for the resume
check and ``report`` alike. The checks of a config, run before anything
compiles, are :mod:`slkd_jax.config_checks`.
"""

from __future__ import annotations

import difflib
import json
from typing import Any

import ml_collections

from slkd_jax import errors, methods

DTYPES = ("float32", "bfloat16", "float64")


def base_config() -> ml_collections.ConfigDict:
  """Defaults: CIFAR-100, resnet32x4 → resnet8x4, SLKD with K = 2, the
  reference hyper-parameters (docs/method.md §2 and §4)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.method = "slkd"
  # Compute dtype. Params, BN statistics and logits are float32 for
  # bfloat16/float32 compute and float64 for "float64" (exact comparisons
  # with the PyTorch reference; enables jax_enable_x64).
  c.dtype = "float32"

  c.data = ml_collections.ConfigDict()
  c.data.name = "cifar100"
  c.data.source = "tfds"  # cifar100 only: "tfds" | "cifar-100-python"
  # None (or "") = TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
  c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.data.drop_last = False  # the reference keeps the last partial batch
  c.data.num_classes = 100
  c.data.image_size = 32
  # Per-channel normalisation (in [0, 1] units); None = the dataset's own
  # constants (CIFAR-100: RepDistiller's). TESKD uses CIFAR-10's.
  c.data.mean = ml_collections.FieldReference(None, field_type=tuple)
  c.data.std = ml_collections.FieldReference(None, field_type=tuple)
  # ImageNet host pipeline (tf.data, per process); other datasets live on
  # the devices and ignore these.
  c.data.shuffle_buffer = 10_000  # encoded JPEGs held for shuffling
  c.data.host_prefetch = 2  # batches tf.data prepares ahead
  c.data.device_prefetch = 2  # batches already transferred to the devices
  # tf.data autotune RAM budget in GiB; None = tf.data's (half the RAM).
  c.data.ram_budget_gb = ml_collections.FieldReference(None, field_type=float)
  # tf.data private thread pool size; None = TF's shared pool (all cores).
  c.data.num_threads = ml_collections.FieldReference(None, field_type=int)
  # Synthetic data only (benchmarks, tests); data_seed fixes the images and
  # labels themselves, independently of the run's seed.
  c.data.num_train = 256
  c.data.num_test = 64
  c.data.data_seed = 0
  # The seed of the training order and augmentation; None = the run's seed.
  # A study's runs share one order (run 0's) and record it here.
  c.data.order_seed = ml_collections.FieldReference(None, field_type=int)

  c.batch_size = 64  # global, over all devices and processes
  c.eval_batch_size = 256
  c.num_epochs = 240

  c.teacher = ml_collections.ConfigDict()
  c.teacher.arch = "resnet32x4"
  # An orbax checkpoint dir (ours), a workdir of a previous run, or a PyTorch
  # .pth; None trains the teacher first (stage "teacher").
  c.teacher.checkpoint = ml_collections.FieldReference(None, field_type=str)
  # Stage "teacher" (CE) recipe, used only when no checkpoint is given; the
  # reference teachers train like CIFAR students (docs/method.md §4).
  c.teacher.num_epochs = 240
  c.teacher.learning_rate = 0.05

  c.student = ml_collections.ConfigDict()
  c.student.arch = "resnet8x4"

  c.slkd = ml_collections.ConfigDict()
  c.slkd.num_slts = 2
  c.slkd.ensemble = "unrolled"  # "vmap" | "unrolled"; see train_step.py
  c.slkd.detach_fused_target = False  # False = reference code
  c.slkd.fusion_weights = ml_collections.FieldReference(None, field_type=tuple)

  # DML (method "dml", docs/dml.md): K peers, peer 0 = student.arch, peers
  # 1..K-1 = teacher.arch, applied like the SL-Ts (slkd.ensemble).
  c.dml = ml_collections.ConfigDict()
  c.dml.num_peers = 2
  # "sequential" (the paper's Algorithm 1) | "simultaneous"; not "update":
  # ConfigDict.update is a method.
  c.dml.update_order = "sequential"

  # Each method's loss settings for this dataset / pair (``set_recipes``);
  # every stage runs with the recipe of its own method.
  c.recipes = recipes(temperature=4.0, ce_weight=0.1, kd_weight=0.9,
                      dkd_beta=8.0, dkd_warmup=20.0)
  # Explicit overrides: None = the stage method's recipe; a value replaces
  # it in every stage (logged). ``--config.recipes.dkd.dkd_beta=6`` changes
  # one method's recipe only.
  c.loss = ml_collections.ConfigDict(
      {key: ml_collections.FieldReference(None, field_type=float)
       for key in methods.LOSS_KEYS})

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 0.05
  c.optim.momentum = 0.9
  c.optim.weight_decay = 5e-4
  c.optim.decay_epochs = (150, 180, 210)
  c.optim.decay_rate = 0.1
  c.optim.nesterov = False  # PyTorch SGD(nesterov=True): TESKD's recipe

  # Further methods distilled from the same teacher after ``method``, each in
  # its own stage; a comparison table closes the run (the quickstart's demo).
  c.compare_with = ()

  # The reported best top-1 (and the best checkpoint) is over the epochs
  # after this one (TESKD: 150); 0 = every epoch (mdistiller).
  c.report_best_after_epoch = 0

  c.study = study_section()

  c.log_every_steps = 50
  c.checkpoint_every_epochs = 10
  # Rotating recent checkpoints (>= 2 keeps a fallback for a damaged latest
  # one); the best epoch's checkpoint is kept besides, in best/.
  c.keep_checkpoints = 2
  # How often (wall clock) all processes agree on a pending SIGTERM/SIGINT:
  # well inside SLURM's grace period (--signal=TERM@120).
  c.preemption_check_seconds = 10.0
  # GPU: XLA's deterministic ops (bit-identical reruns; slower scatter and
  # reductions). CPU runs are deterministic without it (the CLI sets
  # parallel.CPU_DETERMINISM_FLAGS for any CPU count).
  c.deterministic = False
  return c


#: What may differ between the runs of one study: the values the step takes
#: as arrays (:class:`~slkd_jax.methods.HParams`). ``study.vary.<key>`` sets
#: the config key named here, one value per run.
STUDY_KEYS = {**{key: f"loss.{key}" for key in methods.LOSS_KEYS},
              "learning_rate": "optim.learning_rate",
              "fusion_weights": "slkd.fusion_weights"}

_COMPILED_OPTIMIZER = ("a constant of the compiled optimizer (optim.py), "
                       "not an array the step reads")
_SHARED_SCHEDULE = ("the learning-rate schedule is shared by the runs "
                    "(vary learning_rate to scale it)")
#: Keys a study is asked to vary that it cannot: each changes the compiled
#: program, so ``study.vary.<key>`` exists only to say why (validation
#: refuses it) instead of "no such key".
STUDY_FIXED_KEYS = {
    "momentum": f"optim.momentum is {_COMPILED_OPTIMIZER}",
    "weight_decay": f"optim.weight_decay is {_COMPILED_OPTIMIZER}",
    "nesterov": f"optim.nesterov is {_COMPILED_OPTIMIZER}",
    "decay_epochs": _SHARED_SCHEDULE,
    "decay_rate": _SHARED_SCHEDULE,
    "batch_size": "the batch shape is compiled into the step",
    "num_epochs": "the runs share one epoch loop",
    "num_slts": "slkd.num_slts is the number of SL-Ts, a shape of the "
                "compiled state",
    "arch": "the architectures are compiled into the step",
    "method": "each method compiles its own step (compare methods with "
              "compare_with)",
    "dtype": "the compute dtype is compiled into the step",
    "seed": "the runs' seeds are study.seeds",
}


def study_section() -> ml_collections.ConfigDict:
  """``config.study`` (docs/studies.md): R runs of every distillation stage
  trained as one program. ``seeds``: run ``r``'s seed (None: one run, with
  ``config.seed``); ``vary.<key>``: run ``r``'s value of that
  hyper-parameter (:data:`STUDY_KEYS`), a tuple as long as ``seeds``;
  (the keys of :data:`STUDY_FIXED_KEYS` are there to be refused);
  ``impl``: ``'vmap'`` | ``'unrolled'`` over the run axis (None: as
  ``slkd.ensemble``); ``shared_data``: one training order and augmentation
  for all runs (run 0's; the teacher's forward pass is then computed once),
  or False: each run its own (its seed's), as separate runs would have."""
  return ml_collections.ConfigDict({
      "seeds": ml_collections.FieldReference(None, field_type=tuple),
      "vary": {key: ml_collections.FieldReference(None, field_type=tuple)
               for key in (*STUDY_KEYS, *STUDY_FIXED_KEYS)},
      "impl": ml_collections.FieldReference(None, field_type=str),
      "shared_data": True,
  })


def order_seed(config) -> int:
  """The seed of the training order and augmentation
  (``data.order_seed``, else the run's seed)."""
  seed = config.data.get("order_seed")
  return config.seed if seed is None else seed


def is_study(config) -> bool:
  """Whether ``config`` trains its distillation stages as a study."""
  study = config.get("study")
  return study is not None and study.seeds is not None


def run_configs(config: ml_collections.ConfigDict
                ) -> list[ml_collections.ConfigDict]:
  """The R runs of a study, each as the config of a separate run that would
  train exactly that run: its seed, its ``vary`` values set on the keys of
  :data:`STUDY_KEYS`, the shared training order as ``data.order_seed`` (with
  ``study.shared_data``) and no study section of its own."""
  study = config.study
  runs = []
  for r, seed in enumerate(study.seeds):
    c = ml_collections.ConfigDict(config.to_dict())
    c.seed = seed
    for key, values in study.vary.items():
      if values is not None:
        section, name = STUDY_KEYS[key].split(".")
        c[section][name] = values[r]
    if study.shared_data and c.data.order_seed is None:
      c.data.order_seed = study.seeds[0]
    c.study = study_section()
    runs.append(c)
  return runs


def did_you_mean(name: str, choices) -> str:
  """``' (did you mean 'x'?)'`` for the closest of ``choices``, or ''."""
  close = difflib.get_close_matches(name, list(choices), n=3)
  return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""


def parse_preset(arg: str | None, presets, default_preset: str,
                 default_method: str, dataset: str) -> tuple[str, str]:
  """A config file's ``PAIR`` / ``PAIR,METHOD`` argument → (preset, method).

  ``--config=configs/cifar100.py:vgg13-vgg8,dkd`` passes ``'vgg13-vgg8,dkd'``;
  either part may be left out for the file's default.
  """
  arg = (arg or "").strip()
  preset, _, method = arg.partition(",")
  preset = preset.strip() or default_preset
  method = method.strip() or default_method
  if preset not in presets:
    raise errors.ConfigError(
        f"unknown {dataset} preset {preset!r}{did_you_mean(preset, presets)}; "
        f"available presets: {', '.join(presets)} (optionally followed by "
        f"',METHOD' with METHOD one of {', '.join(methods.METHODS)})")
  if method not in methods.METHODS:
    raise errors.ConfigError(
        f"unknown method {method!r} in {arg!r}"
        f"{did_you_mean(method, methods.METHODS)}; available methods: "
        f"{', '.join(methods.METHODS)}")
  return preset, method


def method_recipe(method: str, *, temperature: float, ce_weight: float,
                  kd_weight: float, dkd_beta: float, dkd_warmup: float,
                  pair: tuple[str, str] | None = None) -> dict[str, Any]:
  """The reference's loss settings of ``method`` for one dataset and pair
  (docs/method.md §3).

  The dataset's settings, then the method's own (``Method.defaults``) and
  those of the ``pair`` (teacher arch, student arch) for it
  (``Method.pair_defaults``). ``ce``: CE weight 1. ``dkd``: mdistiller's
  DKD (CE 1, α 1, the pair's β, the dataset's warm-up). ``kd`` and the
  SLKD family: the dataset's
  ``ce_weight`` / ``kd_weight`` (CIFAR 0.1 / 0.9, ImageNet 0.5 / 0.5) and
  SLKD's fused-SL-T weights 1; the SL-Ts' weights tied to the student's.
  The feature-based methods: mdistiller's CE 1, feature weight, method
  settings and per-pair yaml values; ``dml``: the DML paper's CE 1, KL 1
  at T = 1 (docs/dml.md). Every recipe
  defines every key of :data:`methods.LOSS_KEYS`.
  """
  row = methods.get(method)
  recipe = {"temperature": temperature, "ce_weight": ce_weight,
            "kd_weight": kd_weight, "fused_weight": 1.0,
            "fused_ce_weight": 1.0, "fused_kd_weight": 1.0,
            "slt_ce_weight": None, "slt_kd_weight": None, "dkd_alpha": 1.0,
            "dkd_beta": dkd_beta, "dkd_warmup": dkd_warmup,
            "feat_weight": 0.0}
  recipe.update(row.defaults)
  recipe.update(row.pair_defaults.get(pair, {}))
  return recipe


def recipes(**dataset_settings) -> ml_collections.ConfigDict:
  """``config.recipes``: :func:`method_recipe` of every method, one
  sub-config each, for one dataset and pair (keyword arguments as there,
  ``pair`` included)."""
  tree = {}
  for name in methods.METHODS:
    recipe = method_recipe(name, **dataset_settings)
    tree[name] = {k: (ml_collections.FieldReference(v, field_type=float)
                      if k.startswith("slt_") else v)
                  for k, v in recipe.items()}
  return ml_collections.ConfigDict(tree)


def stage_methods(config) -> list[str]:
  """The methods of the run's distillation stages, in order."""
  return [config.method, *config.compare_with]


# ---------------------------------------------------------------------------
# Stages and resuming.

TEACHER_STAGE = "teacher"

# Which config keys change what a run computes: declared once, read by the
# resume check (below) and by ``slkd_jax.report`` (which runs it averages).
# A dotted key also covers its sub-keys.

#: Keys that change nothing a stage computes: how fast, from where, how
#: often it logs and saves; what other stages the run trains.
NO_EFFECT_KEYS: tuple[str, ...] = (
    "log_every_steps", "checkpoint_every_epochs", "keep_checkpoints",
    "preemption_check_seconds",
    "deterministic",  # bit-identical reruns on GPU, not other numbers
    # Eval is exact at any batch size (BatchNorm in eval mode, the padded
    # last batch masked).
    "eval_batch_size",
    # Where the data lives and how fast its batches arrive, not which ones.
    "data.data_dir", "data.host_prefetch", "data.device_prefetch",
    "data.ram_budget_gb", "data.num_threads",
    # vmap or unrolled SL-Ts compute the same function (train_step.py).
    "slkd.ensemble",
    # The run's other stages, each trained on its own from the same teacher.
    "compare_with",
    # Every method's recipe: a stage's own is resolved into ``loss``, which
    # is compared.
    "recipes",
)

#: Keys of the random draws that runs of one experiment differ in (a study
#: runs them as one program): what ``report`` averages over.
RANDOM_DRAW_KEYS: tuple[str, ...] = (
    "seed", "data.order_seed",
    "data.shuffle_buffer",  # changes the order only, as the seed does
    "study",
)

#: Keys a stopped stage may resume under with a new value: those without
#: effect, more epochs, where the teacher is read from (the workdir's
#: frozen copy is checked on its own), and which epochs are reported.
RESUMABLE_KEYS: tuple[str, ...] = NO_EFFECT_KEYS + (
    "num_epochs", "teacher", "report_best_after_epoch")


def unused_sections(method: str) -> tuple[str, ...]:
  """Config sections ``method`` never reads (``slkd`` without SL-Ts,
  ``dml`` without peers): free to differ between its runs. None for an
  unknown method (compared: the safe side)."""
  row = methods.METHODS.get(method)
  if row is None:
    return ()
  return (() if row.uses_slts else ("slkd",)) + (
      () if row.peers else ("dml",))


def is_listed(key: str, listed: tuple[str, ...]) -> bool:
  """Whether dotted ``key`` is one of ``listed`` or under one of them."""
  return any(key == k or key.startswith(k + ".") for k in listed)


def stage_config(config: ml_collections.ConfigDict, stage: str
                 ) -> ml_collections.ConfigDict:
  """The config one stage runs with: ``method`` set to the stage's, and
  ``loss`` resolved to that method's recipe plus the explicit overrides (so
  no stage runs with another method's weights). The teacher stage trains
  the teacher architecture with CE on the teacher recipe."""
  c = ml_collections.ConfigDict(config.to_dict())
  if stage == TEACHER_STAGE:
    c.method = "ce"
    c.student.arch = config.teacher.arch
    c.num_epochs = config.teacher.num_epochs
    c.optim.learning_rate = config.teacher.learning_rate
  else:
    c.method = stage
  c.loss = ml_collections.ConfigDict(vars(methods.loss_settings(c)))
  return c


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (a config as JSON, flat)."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def resume_changes(saved: dict[str, Any], current: ml_collections.ConfigDict
                   ) -> tuple[dict[str, tuple], dict[str, tuple]]:
  """Compare a stage's saved config (JSON) with the current stage config.

  Returns ``(conflicts, accepted)``, each ``{key: (saved, current)}``:
  changes of keys that alter the run's meaning, and changes of
  :data:`RESUMABLE_KEYS` (and of ``slkd.*`` for methods without SL-Ts,
  ``dml.*`` for methods other than DML).
  """
  now = flatten(json.loads(current.to_json_best_effort()))
  before = flatten(saved)
  free = RESUMABLE_KEYS + unused_sections(current.method)
  conflicts, accepted = {}, {}
  for key in sorted(set(now) | set(before)):
    old, new = before.get(key), now.get(key)
    if old == new:
      continue
    (accepted if is_listed(key, free) else conflicts)[key] = (old, new)
  return conflicts, accepted
