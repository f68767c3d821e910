"""The checks of a run's config: before anything compiles, each names the
first bad key, its value and what is allowed (one line, a ConfigError).

Generic keys are checked here; a method's own settings and sections by the
method (:meth:`slkd_jax.methods.base.Method.validate` and its setting
rules), and its settings against the networks when the stage is resolved
(:func:`slkd_jax.stage.resolve`).
"""

from __future__ import annotations

from slkd_jax import errors, methods, models
from slkd_jax.config import (DTYPES, STUDY_FIXED_KEYS, STUDY_KEYS, is_study,
                             run_configs, stage_methods)
from slkd_jax.methods.base import NON_NEGATIVE, POSITIVE, Rule
from slkd_jax.methods.base import check as _check
from slkd_jax.methods.base import is_int as _is_int
from slkd_jax.methods.base import is_number as _is_number
from slkd_jax.step_parts import ENSEMBLES


def validate(config: ml_collections.ConfigDict) -> None:
  """Raise :class:`~slkd_jax.errors.ConfigError` naming the first bad key,
  its value and the rule, before anything compiles."""
  _validate_run(config)
  _validate_models(config)
  for method in stage_methods(config):
    _validate_loss(config, method)
    methods.get(method).validate(config)  # its own sections and archs
  _validate_optim(config.optim)
  _validate_cadence(config)
  _validate_study_vary(config)
  if is_study(config):
    _validate_study(config)


def _validate_study_vary(config) -> None:
  """``study.vary`` only on keys that can vary, and only in a study."""
  study = config.get("study")
  if study is None:
    return
  varied = [key for key, values in study.vary.items() if values is not None]
  for key in varied:
    if key in STUDY_FIXED_KEYS:
      raise errors.ConfigError(
          f"config.study.vary.{key} cannot vary: {STUDY_FIXED_KEYS[key]}; "
          f"a study varies only values the step reads as arrays "
          f"({', '.join(STUDY_KEYS)}); train separate runs for other "
          f"{key} values")
  if varied and study.seeds is None:
    raise errors.ConfigError(
        f"config.study.vary.{varied[0]} is set but config.study.seeds is "
        f"None, so there is no study to vary it over: set study.seeds, one "
        f"seed per run (e.g. --config.study.seeds='(0,1)' for 2 values)")


def _validate_study(config) -> None:
  """``config.study``: every run validated as the separate run it is."""
  study = config.study
  seeds = tuple(study.seeds)
  _check(len(seeds) >= 1 and all(_is_int(s, 0, 2**32) for s in seeds),
         "study.seeds", study.seeds, "None (one run) or a tuple of ints in "
         "[0, 2**32), one per run")
  for key, values in study.vary.items():
    _check(values is None or len(values) == len(seeds), f"study.vary.{key}",
           values, f"None or {len(seeds)} values, one per run of "
           f"study.seeds")
  _check(study.impl in (None, *ENSEMBLES), "study.impl", study.impl,
         f"None (as slkd.ensemble) or one of {', '.join(ENSEMBLES)}")
  _check(isinstance(study.shared_data, bool), "study.shared_data",
         study.shared_data, "True or False")
  for r, run in enumerate(run_configs(config)):
    try:
      validate(run)
    except errors.ConfigError as e:
      raise errors.ConfigError(f"study run {r}: {e}") from None


def _validate_run(config) -> None:
  _check(config.method in methods.METHODS, "method", config.method,
         f"one of {', '.join(methods.METHODS)}")
  compare = tuple(config.compare_with)
  _check(all(m in methods.METHODS for m in compare), "compare_with", compare,
         f"a tuple of methods from {', '.join(methods.METHODS)}")
  _check(len(set(stage_methods(config))) == len(compare) + 1, "compare_with",
         compare, f"methods other than config.method={config.method!r}, each "
         "once (every method is one stage)")
  _check(config.dtype in DTYPES, "dtype", config.dtype,
         f"one of {', '.join(DTYPES)}")
  for key in ("batch_size", "eval_batch_size", "num_epochs"):
    _check(_is_int(config[key], 1), key, config[key], "an int >= 1")
  _check(_is_int(config.seed, 0, 2**32), "seed", config.seed,
         "an int in [0, 2**32)")
  order = config.data.get("order_seed")
  _check(order is None or _is_int(order, 0, 2**32), "data.order_seed", order,
         "None (the run's seed) or an int in [0, 2**32)")
  _check(isinstance(config.deterministic, bool), "deterministic",
         config.deterministic, "True or False")


def _validate_models(config) -> None:
  for key in ("student", "teacher"):
    arch = config[key].arch
    _check(arch in models.available(), f"{key}.arch", arch,
           "a model name from slkd_jax.models.available(): "
           + ", ".join(models.available()))
  _check(_is_int(config.data.num_classes, 2), "data.num_classes",
         config.data.num_classes, "an int >= 2")
  teacher = config.teacher
  _check(_is_int(teacher.num_epochs, 1), "teacher.num_epochs",
         teacher.num_epochs, "an int >= 1")
  _check(_is_number(teacher.learning_rate) and teacher.learning_rate > 0,
         "teacher.learning_rate", teacher.learning_rate, "a positive number")
  _check(teacher.checkpoint is None or bool(teacher.checkpoint.strip()),
         "teacher.checkpoint", teacher.checkpoint,
         "None (train the teacher first) or a path")


def _validate_loss(config, method: str) -> None:
  """The loss settings ``method``'s stage trains with (its recipe and the
  ``config.loss`` overrides); the message names the key that set them."""
  rules = methods.get(method).setting_rules
  for key, value in vars(methods.loss_settings(config, method)).items():
    rule = rules.get(key) or _LOSS_RULES.get(key, NON_NEGATIVE)
    _check(rule.ok(value), methods.setting_key(config, method, key), value,
           rule.allowed)


# The common loss settings beyond "a non-negative number"; a method's own
# settings have their rules in the method (Method.setting_rules).
_TIED = Rule(lambda v: v is None or NON_NEGATIVE.ok(v),
             "None (tied to the student's weight) or a non-negative number")
_LOSS_RULES = {"temperature": POSITIVE, "dkd_warmup": POSITIVE,
               "slt_ce_weight": _TIED, "slt_kd_weight": _TIED}


def _validate_optim(opt) -> None:
  _check(_is_number(opt.learning_rate) and opt.learning_rate > 0,
         "optim.learning_rate", opt.learning_rate, "a positive number")
  _check(_is_number(opt.momentum) and 0 <= opt.momentum < 1,
         "optim.momentum", opt.momentum, "in [0, 1)")
  _check(_is_number(opt.weight_decay) and opt.weight_decay >= 0,
         "optim.weight_decay", opt.weight_decay, "a non-negative number")
  epochs = list(opt.decay_epochs)
  _check(all(_is_int(e, 0) for e in epochs) and epochs == sorted(set(epochs)),
         "optim.decay_epochs", opt.decay_epochs,
         "non-negative int epochs in increasing order")
  _check(_is_number(opt.decay_rate) and opt.decay_rate > 0,
         "optim.decay_rate", opt.decay_rate, "a positive number")
  _check(isinstance(opt.get("nesterov", False), bool), "optim.nesterov",
         opt.get("nesterov"), "True or False")


def _validate_cadence(config) -> None:
  for key, lower in (("log_every_steps", 1), ("checkpoint_every_epochs", 1),
                     ("keep_checkpoints", 1)):
    _check(_is_int(config[key], lower), key, config[key], f"an int >= {lower}")
  _validate_data_settings(config.data)
  after = config.get("report_best_after_epoch", 0)
  _check(_is_int(after, 0), "report_best_after_epoch", after, "an int >= 0")
  _check(_is_number(config.preemption_check_seconds)
         and config.preemption_check_seconds > 0, "preemption_check_seconds",
         config.preemption_check_seconds, "a positive number of seconds")


def _validate_data_settings(data) -> None:
  for key, lower in (("shuffle_buffer", 1), ("host_prefetch", 0),
                     ("device_prefetch", 0), ("data_seed", 0)):
    _check(_is_int(data[key], lower), f"data.{key}", data[key],
           f"an int >= {lower}")
  _check(data.num_threads is None or _is_int(data.num_threads, 1),
         "data.num_threads", data.num_threads, "None (automatic) or an int >= 1")
  for key in ("mean", "std"):
    value = data.get(key)
    _check(value is None or data.name == "cifar100", f"data.{key}", value,
           "None: only CIFAR-100 takes other normalisation constants")
    _check(value is None or (len(value) == 3 and all(
        _is_number(v) and (v > 0 or key == "mean") for v in value)),
           f"data.{key}", value, "None (the dataset's constants) or 3 "
           "per-channel numbers in [0, 1] units" + (", positive" if key ==
                                                     "std" else ""))
  _check(data.ram_budget_gb is None or (_is_number(data.ram_budget_gb)
                                        and data.ram_budget_gb > 0),
         "data.ram_budget_gb", data.ram_budget_gb,
         "None (automatic) or a positive number of GiB")
