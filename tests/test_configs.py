"""The preset config files (configs/*.py) and config validation.

Loading a config only builds a ConfigDict: nothing here trains or compiles.
"""

import importlib.util
import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

from slkd_jax import config as config_lib
from slkd_jax import config_checks
from slkd_jax import errors
from slkd_jax import data, methods

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def _load(name):
  # Config files are plain files, not a package: load them by path as
  # ml_collections' config_flags does.
  spec = importlib.util.spec_from_file_location(
      f"slkd_test_configs_{name}", CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


cifar = _load("cifar100")
imagenet = _load("imagenet")


def _all_args():
  for module in (cifar, imagenet):
    for preset in module.PRESETS:
      yield module, preset
    for method in methods.METHODS:  # every method on one pair
      row = methods.get(method)
      if row.student_archs:  # teskd: its own presets
        continue
      if module is imagenet and row.init_buffers is not None:
        continue  # CRD's memory needs a dataset index (test_crd_method.py)
      yield module, f"{module.DEFAULT_PRESET},{method}"


@pytest.mark.parametrize("module,arg", list(_all_args()),
                         ids=lambda v: getattr(v, "__name__", v))
def test_every_preset_loads_and_validates(module, arg):
  c = module.get_config(arg)
  config_checks.validate(c)
  preset, _, method = arg.partition(",")
  assert c.method == (method or "slkd")
  p = module.PRESETS[preset]
  assert (c.teacher.arch, c.student.arch) == (p.teacher, p.student)
  # The dataset's shape agrees with the data pipeline's table.
  assert data.dataset_info(c.data.name) == (c.data.num_classes,
                                            c.data.image_size)
  assert c.teacher.checkpoint is None  # the user points it at a teacher


def test_paper_pairs_are_presets():
  pairs = ["resnet32x4-resnet8x4", "resnet56-resnet8", "wrn_40_2-wrn_40_1",
           "wrn_40_2-wrn_16_2", "vgg13-vgg11", "vgg13-vgg8",
           "resnet32x4-ShuffleV2", "resnet32x4-ShuffleV1",
           "ResNet50-MobileNetV2", "vgg13-MobileNetV2", "wrn_40_2-ShuffleV1"]
  for pair in pairs:
    assert cifar.PRESETS[pair].paper is not None, pair
  for pair in ("resnet56-resnet20", "resnet110-resnet32", "resnet110-resnet20"):
    assert pair in cifar.PRESETS
  assert cifar.paper_top1("resnet32x4-resnet8x4", "slkd") == 76.85
  assert cifar.paper_top1("resnet32x4-resnet8x4", "slkd_seq") == 75.61
  assert cifar.paper_top1("resnet32x4-resnet8x4", "ce") == 72.50
  assert cifar.paper_top1("vgg13-MobileNetV2", "slkd_slt_only") == 68.76
  assert cifar.paper_top1("resnet56-resnet20", "slkd") is None


def test_docstring_table_matches_presets():
  doc_lines = cifar.__doc__.splitlines()
  for row in cifar.results_table():
    assert row in doc_lines, row
  for preset in imagenet.PRESETS:
    assert preset in imagenet.__doc__


@pytest.mark.parametrize("module", [cifar, imagenet], ids=["cifar", "imagenet"])
def test_no_arg_equals_default_preset(module):
  assert (module.get_config().to_dict()
          == module.get_config(f"{module.DEFAULT_PRESET},slkd").to_dict())
  assert module.get_config("").to_dict() == module.get_config().to_dict()


def test_cifar_default():
  c = cifar.get_config()
  assert (c.teacher.arch, c.student.arch) == ("resnet32x4", "resnet8x4")
  assert c.method == "slkd" and c.slkd.num_slts == 2
  loss = methods.loss_settings(c)
  assert loss.temperature == 4.0
  assert (loss.ce_weight, loss.kd_weight) == (0.1, 0.9)
  assert (loss.fused_weight, loss.fused_ce_weight,
          loss.fused_kd_weight) == (1.0, 1.0, 1.0)
  assert loss.slt_ce_weight is None and loss.slt_kd_weight is None
  assert not methods.loss_overrides(c)
  assert c.optim.learning_rate == 0.05
  assert c.batch_size == 64 and c.num_epochs == 240
  assert tuple(c.optim.decay_epochs) == (150, 180, 210)
  assert c.optim.decay_rate == 0.1
  assert c.optim.weight_decay == 5e-4 and c.optim.momentum == 0.9
  assert c.data.name == "cifar100" and c.data.num_classes == 100
  assert c.data.image_size == 32 and c.eval_batch_size >= 256
  assert c.dtype == "float32"
  assert (c.teacher.num_epochs, c.teacher.learning_rate) == (240, 0.05)
  assert c.checkpoint_every_epochs == 10


def test_cifar_mobile_students_use_low_lr():
  for name, p in cifar.PRESETS.items():
    c = cifar.get_config(name)
    low = p.student in ("MobileNetV2", "ShuffleV1", "ShuffleV2")
    assert c.optim.learning_rate == (0.01 if low else 0.05), name
    assert c.teacher.learning_rate == 0.05, name  # teachers: never mobile
  assert cifar.get_config("vgg13-MobileNetV2,dkd").optim.learning_rate == 0.01
  assert cifar.get_config("wrn_40_2-ShuffleV1,ce").optim.learning_rate == 0.01


@pytest.mark.parametrize("pair,beta", [
    ("resnet56-resnet20", 2.0), ("resnet110-resnet32", 2.0),
    ("wrn_40_2-wrn_16_2", 6.0), ("wrn_40_2-wrn_40_1", 6.0),
    ("vgg13-vgg8", 6.0), ("vgg13-MobileNetV2", 6.0),
    ("resnet32x4-resnet8x4", 8.0), ("resnet32x4-ShuffleV1", 8.0),
    ("ResNet50-MobileNetV2", 8.0), ("wrn_40_2-ShuffleV1", 8.0)])
def test_cifar_dkd_beta_per_pair(pair, beta):
  c = cifar.get_config(f"{pair},dkd")
  assert c.method == "dkd"
  loss = methods.loss_settings(c)
  assert loss.dkd_beta == beta
  assert (loss.ce_weight, loss.dkd_alpha) == (1.0, 1.0)
  assert (loss.temperature, loss.dkd_warmup) == (4.0, 20.0)


def test_cifar_method_weights():
  c = cifar.get_config("resnet56-resnet8,ce")
  assert methods.loss_settings(c).ce_weight == 1.0
  for method in ("kd", "slkd_t_only", "slkd_slt_only", "slkd_seq"):
    loss = methods.loss_settings(cifar.get_config(f"vgg13-vgg8,{method}"))
    assert (loss.temperature, loss.ce_weight, loss.kd_weight) == (
        4.0, 0.1, 0.9), method


def test_imagenet_recipe():
  c = imagenet.get_config()
  assert (c.teacher.arch, c.student.arch) == ("imagenet_resnet34",
                                              "imagenet_resnet18")
  assert c.method == "slkd" and c.slkd.num_slts == 2
  assert c.data.name == "imagenet2012" and c.data.num_classes == 1000
  assert c.data.image_size == 224
  assert c.batch_size == 512 and c.num_epochs == 100
  assert c.optim.learning_rate == 0.2
  assert tuple(c.optim.decay_epochs) == (30, 60, 90)
  assert c.optim.decay_rate == 0.1
  assert c.optim.weight_decay == 1e-4 and c.optim.momentum == 0.9
  loss = methods.loss_settings(c)
  assert loss.temperature == 1.0
  assert (loss.ce_weight, loss.kd_weight) == (0.5, 0.5)
  assert c.dtype == "bfloat16"
  assert c.eval_batch_size >= 500
  mv1 = imagenet.get_config("resnet50-mobilenetv1")
  assert (mv1.teacher.arch, mv1.student.arch) == ("imagenet_resnet50",
                                                  "imagenet_mobilenetv1")
  for pair, beta in (("resnet34-resnet18", 0.5), ("resnet50-mobilenetv1", 2.0)):
    d = methods.loss_settings(imagenet.get_config(f"{pair},dkd"))
    assert d.dkd_beta == beta
    assert (d.temperature, d.dkd_warmup) == (1.0, 1.0)
    assert (d.ce_weight, d.dkd_alpha) == (1.0, 1.0)


@pytest.mark.parametrize("module", [cifar, imagenet], ids=["cifar", "imagenet"])
def test_unknown_preset_or_method_names_the_choices(module):
  with pytest.raises(ValueError) as e:
    module.get_config("resnet9-resnet1")
  for preset in module.PRESETS:
    assert preset in str(e.value)
  with pytest.raises(ValueError) as e:
    module.get_config(f"{module.DEFAULT_PRESET},fitnetz")
  assert "fitnetz" in str(e.value)
  for method in methods.METHODS:
    assert method in str(e.value)


def _set(c, dotted, value):
  *parents, leaf = dotted.split(".")
  for p in parents:
    c = c[p]
  c[leaf] = value


@pytest.mark.parametrize("key,value", [
    ("method", "foo"),
    ("slkd.num_slts", 0),
    ("loss.temperature", -1.0),
    ("student.arch", "resnet9"),
    ("teacher.arch", "resnet9"),
    ("slkd.ensemble", "x"),
    ("slkd.fusion_weights", (0.5, 0.3, 0.2)),  # K = 2
    ("batch_size", 0),
    ("eval_batch_size", 0),
    ("optim.momentum", 1.5),
    ("optim.learning_rate", 0.0),
    ("optim.weight_decay", -1e-4),
    ("optim.decay_epochs", (180, 150)),
    ("loss.kd_weight", -0.1),
    ("dtype", "float16"),
    ("checkpoint_every_epochs", 0),
    ("keep_checkpoints", 0),
    ("log_every_steps", -1),
    ("optim.decay_rate", -0.1),
    ("slkd.fusion_weights", (1.5, -0.5)),
    ("slkd.fusion_weights", (0.3, 0.3)),
    ("seed", 2**64 + 1),
    ("compare_with", ("kd", "kd")),
    ("compare_with", ("slkd",)),
    ("recipes.dkd.dkd_warmup", 0.0),
    ("recipes.kd.kd_weight", -1.0),
    ("preemption_check_seconds", 0.0),
    ("data.shuffle_buffer", 0),
    ("data.num_threads", 0),
    ("data.ram_budget_gb", -1.0),
])
def test_validate_names_the_bad_key(key, value):
  c = cifar.get_config()
  config_checks.validate(c)
  _set(c, key, value)
  if key.startswith("recipes."):
    c.compare_with = (key.split(".")[1],)
  with pytest.raises(errors.ConfigError) as e:
    config_checks.validate(c)
  assert key.split(".", 2)[-1] in str(e.value)


# ml_collections' own loader still calls the deprecated load_module().
@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
def test_config_flags_like_the_cli():
  # What `python -m slkd_jax.main --config=configs/cifar100.py:...` does.
  # The overrides are read from sys_argv (sys.argv by default), so pass the
  # same argv to the flag and to the parser.
  def parse(argv):
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)
    fv(argv)
    return fv.config

  teacher = "/x/cifar_teachers/vgg13_vanilla/ckpt_epoch_240.pth"
  c = parse(["prog",
             f"--config={CONFIGS / 'cifar100.py'}:vgg13-MobileNetV2,dkd",
             "--config.loss.dkd_beta=3.0", "--config.method=kd",
             f"--config.teacher.checkpoint={teacher}"])
  assert (c.teacher.arch, c.student.arch) == ("vgg13", "MobileNetV2")
  assert c.method == "kd" and c.loss.dkd_beta == 3.0
  assert c.teacher.checkpoint == teacher
  config_checks.validate(c)

  c = parse(["prog", f"--config={CONFIGS / 'imagenet.py'}",
             "--config.slkd.num_slts=3"])
  assert c.student.arch == "imagenet_resnet18" and c.slkd.num_slts == 3


# The reference recipe of every method, written out from mdistiller's CIFAR
# configs and the SLKD code (docs/method.md §3), independently of
# config_lib.method_recipe: what each stage must train with.
MDISTILLER_DKD_BETA = {
    "resnet56-resnet20": 2.0, "resnet110-resnet32": 2.0,
    "wrn_40_2-wrn_16_2": 6.0, "wrn_40_2-wrn_40_1": 6.0, "vgg13-vgg8": 6.0,
    "vgg13-vgg11": 6.0, "vgg13-MobileNetV2": 6.0}


# mdistiller's engine/cfg.py: CE 1 and the feature weight of each method.
MDISTILLER_FEAT_WEIGHT = {"fitnet": 100.0, "at": 1000.0, "sp": 3000.0,
                          "rkd": 1.0, "pkt": 30000.0, "nst": 50.0,
                          "kdsvd": 1.0, "vid": 1.0, "crd": 0.8, "ofd": 0.001,
                          "reviewkd": 1.0}
# mdistiller's CFG.CRD (engine/cfg.py).
MDISTILLER_CRD = {"feat_dim": 128, "nce_k": 16384, "nce_t": 0.07,
                  "nce_momentum": 0.5, "mode": "exact"}


def reference_recipe(pair: str, method: str) -> dict:
  if method in MDISTILLER_FEAT_WEIGHT:
    # configs/cifar100/reviewkd.yaml: REVIEWKD_WEIGHT 5.0 for its one pair.
    weight = (5.0 if (method, pair) == ("reviewkd", "resnet32x4-resnet8x4")
              else MDISTILLER_FEAT_WEIGHT[method])
    return {"ce_weight": 1.0, "feat_weight": weight,
            **(MDISTILLER_CRD if method == "crd" else {})}
  if method == "ce":
    return {"ce_weight": 1.0}
  if method == "dml":  # Zhang et al. 2018: CE + KL(p_j ‖ p_k), T = 1
    return {"ce_weight": 1.0, "kd_weight": 1.0, "temperature": 1.0}
  if method == "dkd":
    return {"ce_weight": 1.0, "dkd_alpha": 1.0, "temperature": 4.0,
            "dkd_warmup": 20.0,
            "dkd_beta": MDISTILLER_DKD_BETA.get(pair, 8.0)}
  recipe = {"ce_weight": 0.1, "kd_weight": 0.9, "temperature": 4.0}
  if method.startswith("slkd") and method != "slkd_t_only":
    recipe.update(fused_weight=1.0, fused_ce_weight=1.0, fused_kd_weight=1.0,
                  slt_ce_weight=None, slt_kd_weight=None)
  return recipe


def effective(c, stage):
  return dict(config_lib.stage_config(c, stage).loss)


@pytest.mark.parametrize("pair", list(cifar.PRESETS))
def test_every_stage_runs_its_own_methods_recipe(pair):
  for loaded_as in ("slkd", "dkd"):
    c = cifar.get_config(f"{pair},{loaded_as}")
    c.compare_with = tuple(m for m in methods.METHODS if m != loaded_as
                           and not methods.get(m).student_archs)
    config_checks.validate(c)
    for stage in (loaded_as, *c.compare_with):
      got = effective(c, stage)
      for key, want in reference_recipe(pair, stage).items():
        assert got[key] == want, (pair, loaded_as, stage, key)


def test_compare_with_dkd_stage_uses_the_dkd_recipe_of_the_pair():
  # The README's example: SLKD, then KD and DKD from the same teacher.
  c = cifar.get_config("vgg13-vgg8")
  c.compare_with = ("kd", "dkd")
  dkd, kd = effective(c, "dkd"), effective(c, "kd")
  assert (dkd["ce_weight"], dkd["dkd_beta"], dkd["dkd_alpha"]) == (1.0, 6.0,
                                                                   1.0)
  assert (kd["ce_weight"], kd["kd_weight"]) == (0.1, 0.9)
  teacher = config_lib.stage_config(c, config_lib.TEACHER_STAGE)
  assert teacher.method == "ce" and teacher.loss.ce_weight == 1.0
  assert teacher.student.arch == "vgg13"


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
def test_cli_method_and_overrides_follow_the_recipes():
  def parse(*overrides):
    argv = ["prog", f"--config={CONFIGS / 'cifar100.py'}:vgg13-vgg8,dkd",
            *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)
    fv(argv)
    return fv.config

  # --config.method=kd on a DKD preset: KD's CE weight 0.1, not DKD's 1.0.
  c = parse("--config.method=kd")
  assert effective(c, c.method)["ce_weight"] == 0.1
  # An explicit override wins in every stage ...
  c = parse("--config.loss.ce_weight=0.5", "--config.compare_with=('kd',)")
  assert effective(c, "dkd")["ce_weight"] == effective(c, "kd")["ce_weight"]
  assert effective(c, "kd")["ce_weight"] == 0.5
  assert methods.loss_overrides(c) == {"ce_weight": 0.5}
  # ... and a recipe override only in its method's stage.
  c = parse("--config.recipes.dkd.dkd_beta=3.0", "--config.compare_with=('kd',)")
  assert effective(c, "dkd")["dkd_beta"] == 3.0
  assert effective(c, "dkd")["ce_weight"] == 1.0
  assert effective(c, "kd")["kd_weight"] == 0.9


def test_resume_changes_split_meaning_from_cadence():
  import json
  c = config_lib.stage_config(cifar.get_config("vgg13-vgg8,kd"), "kd")
  saved = json.loads(c.to_json_best_effort())
  now = config_lib.stage_config(cifar.get_config("vgg13-vgg8,kd"), "kd")
  now.num_epochs, now.log_every_steps = 300, 7
  now.teacher.checkpoint = "/elsewhere"  # checked by the frozen teacher
  now.slkd.num_slts = 3  # kd has no SL-Ts
  conflicts, accepted = config_lib.resume_changes(saved, now)
  assert not conflicts
  assert {"num_epochs", "log_every_steps", "teacher.checkpoint",
          "slkd.num_slts"} <= set(accepted)
  now.batch_size, now.student.arch, now.seed = 128, "vgg11", 3
  now.loss.ce_weight = 0.3
  conflicts, _ = config_lib.resume_changes(saved, now)
  assert set(conflicts) == {"batch_size", "student.arch", "seed",
                            "loss.ce_weight"}
