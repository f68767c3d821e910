"""The run configuration: defaults and validation.

Config files in ``configs/`` start from :func:`base_config` and override what
their preset needs. :func:`validate` runs before anything compiles and names
the key, the bad value and what is allowed.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from slkd_jax import methods, models

DTYPES = ("float32", "bfloat16")
ENSEMBLES = ("unrolled", "vmap")


def base_config() -> ml_collections.ConfigDict:
  """Defaults: CIFAR-100, resnet32x4 → resnet8x4, SLKD with K = 2, the
  reference hyper-parameters (SPEC.md sections 2 and 4)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.method = "slkd"
  c.dtype = "float32"  # compute dtype; params, BN stats and logits are f32.

  c.data = ml_collections.ConfigDict()
  c.data.name = "cifar100"
  c.data.source = "tfds"  # cifar100 only: "tfds" | "cifar-100-python"
  c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.data.drop_last = False  # the reference keeps the last partial batch
  c.data.num_classes = 100
  c.data.image_size = 32
  # Synthetic data only (benchmarks, tests).
  c.data.num_train = 256
  c.data.num_test = 64

  c.batch_size = 64  # global, over all devices and processes
  c.eval_batch_size = 256
  c.num_epochs = 240

  c.teacher = ml_collections.ConfigDict()
  c.teacher.arch = "resnet32x4"
  # An orbax checkpoint dir (ours), a workdir of a previous run, or a PyTorch
  # .pth; None trains the teacher first (stage "teacher").
  c.teacher.checkpoint = ml_collections.FieldReference(None, field_type=str)
  # Stage "teacher" (CE) recipe, used only when no checkpoint is given; the
  # reference teachers train like CIFAR students (SPEC.md section 4).
  c.teacher.num_epochs = 240
  c.teacher.learning_rate = 0.05

  c.student = ml_collections.ConfigDict()
  c.student.arch = "resnet8x4"

  c.slkd = ml_collections.ConfigDict()
  c.slkd.num_slts = 2
  c.slkd.ensemble = "unrolled"  # "vmap" | "unrolled"; see train_step.py
  c.slkd.detach_fused_target = False  # False = reference code
  c.slkd.fusion_weights = ml_collections.FieldReference(None, field_type=tuple)

  c.loss = ml_collections.ConfigDict()
  c.loss.temperature = 4.0
  c.loss.ce_weight = 0.1
  c.loss.kd_weight = 0.9
  c.loss.fused_weight = 1.0
  c.loss.fused_ce_weight = 1.0
  c.loss.fused_kd_weight = 1.0
  # None ties the SL-Ts' weights to the student's (reference).
  c.loss.slt_ce_weight = ml_collections.FieldReference(None, field_type=float)
  c.loss.slt_kd_weight = ml_collections.FieldReference(None, field_type=float)
  c.loss.dkd_alpha = 1.0
  c.loss.dkd_beta = 8.0
  c.loss.dkd_warmup = 20.0

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 0.05
  c.optim.momentum = 0.9
  c.optim.weight_decay = 5e-4
  c.optim.decay_epochs = (150, 180, 210)
  c.optim.decay_rate = 0.1

  # Further methods distilled from the same teacher after ``method``, each in
  # its own stage; a comparison table closes the run (the quickstart's demo).
  c.compare_with = ()

  c.log_every_steps = 50
  c.checkpoint_every_epochs = 10
  c.keep_checkpoints = 2
  return c


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
    raise ValueError(f"unknown {dataset} preset {preset!r}; available "
                     f"presets: {', '.join(presets)} (optionally followed by "
                     f"',METHOD' with METHOD one of "
                     f"{', '.join(methods.METHODS)})")
  if method not in methods.METHODS:
    raise ValueError(f"unknown method {method!r} in {arg!r}; available "
                     f"methods: {', '.join(methods.METHODS)}")
  return preset, method


def set_method_weights(c: ml_collections.ConfigDict, method: str, *,
                       ce_weight: float, kd_weight: float, dkd_beta: float,
                       dkd_warmup: float) -> None:
  """The reference's loss weights of ``method`` (SPEC.md sections 2–3).

  ``ce``: CE weight 1. ``dkd``: mdistiller's DKD (CE 1, α 1, the pair's β,
  the dataset's warm-up). ``kd`` and the SLKD family: the dataset's
  ``ce_weight`` / ``kd_weight`` (CIFAR 0.1 / 0.9, ImageNet 0.5 / 0.5) and
  SLKD's fused-SL-T weights 1.
  """
  if method == "ce":
    c.loss.ce_weight = 1.0
  elif method == "dkd":
    c.loss.ce_weight = 1.0
    c.loss.dkd_alpha = 1.0
    c.loss.dkd_beta = dkd_beta
    c.loss.dkd_warmup = dkd_warmup
  else:
    c.loss.ce_weight = ce_weight
    c.loss.kd_weight = kd_weight
    c.loss.fused_weight = 1.0
    c.loss.fused_ce_weight = 1.0
    c.loss.fused_kd_weight = 1.0


def _fail(key: str, value: Any, allowed: str) -> None:
  raise ValueError(f"config.{key}={value!r} is invalid: {allowed}")


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
  if not ok:
    _fail(key, value, allowed)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raise ``ValueError`` naming the first bad key, its value and the rule."""
  method = None
  try:
    method = methods.get(config.method)
  except ValueError as e:
    _fail("method", config.method, str(e).split("; ", 1)[-1])
  _check(config.dtype in DTYPES, "dtype", config.dtype,
         f"one of {', '.join(DTYPES)}")
  for key in ("student", "teacher"):
    arch = config[key].arch
    _check(arch in models.available(), f"{key}.arch", arch,
           "a model name from slkd_jax.models.available(): "
           + ", ".join(models.available()))
  _check(isinstance(config.data.num_classes, int)
         and config.data.num_classes >= 2, "data.num_classes",
         config.data.num_classes, "an int >= 2")
  for key in ("batch_size", "eval_batch_size", "num_epochs", "seed"):
    value = config[key]
    lower = 0 if key == "seed" else 1
    _check(isinstance(value, int) and value >= lower, key, value,
           f"an int >= {lower}")
  if method.uses_slts:
    k = config.slkd.num_slts
    _check(isinstance(k, int) and k >= 1, "slkd.num_slts", k, "an int >= 1")
    weights = config.slkd.fusion_weights
    if weights is not None:
      _check(len(weights) == k, "slkd.fusion_weights", weights,
             f"None (uniform 1/K) or {k} weights, one per SL-T")
  for name in config.compare_with:
    _check(name in methods.METHODS, "compare_with", config.compare_with,
           f"a tuple of methods from {', '.join(methods.METHODS)}")
  _check(config.teacher.num_epochs >= 1 and config.teacher.learning_rate > 0,
         "teacher", (config.teacher.num_epochs, config.teacher.learning_rate),
         "teacher.num_epochs >= 1 and teacher.learning_rate > 0")
  _check(config.slkd.ensemble in ENSEMBLES, "slkd.ensemble",
         config.slkd.ensemble, f"one of {', '.join(ENSEMBLES)}")
  _check(config.loss.temperature > 0, "loss.temperature",
         config.loss.temperature, "a positive number")
  _check(config.loss.dkd_warmup > 0, "loss.dkd_warmup", config.loss.dkd_warmup,
         "a positive number of epochs")
  for key in ("ce_weight", "kd_weight", "fused_weight", "fused_ce_weight",
              "fused_kd_weight", "dkd_alpha", "dkd_beta"):
    value = config.loss[key]
    _check(value >= 0, f"loss.{key}", value, "a non-negative number")
  opt = config.optim
  _check(opt.learning_rate > 0, "optim.learning_rate", opt.learning_rate,
         "a positive number")
  _check(0 <= opt.momentum < 1, "optim.momentum", opt.momentum, "in [0, 1)")
  _check(opt.weight_decay >= 0, "optim.weight_decay", opt.weight_decay,
         "a non-negative number")
  _check(list(opt.decay_epochs) == sorted(opt.decay_epochs),
         "optim.decay_epochs", opt.decay_epochs, "epochs in increasing order")
