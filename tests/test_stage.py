"""stage.resolve checks a method's settings against the networks' feature
shapes (jax.eval_shape, nothing compiled): a setting that does not fit is a
one-line ConfigError naming it, before any training."""

import pytest

from slkd_jax import config as config_lib
from slkd_jax import config_checks
from slkd_jax import errors, models
from slkd_jax import stage as stage_lib


def stage_config(method, student="resnet8", teacher="resnet14", **recipe):
  c = config_lib.base_config()
  c.method = method
  c.student.arch, c.teacher.arch = student, teacher
  c.data.num_classes = 10
  for key, value in recipe.items():
    c.recipes[method][key] = value
  config_checks.validate(c)  # the key/range checks pass: the value is an int
  return config_lib.stage_config(c, method)


def test_fitnet_hint_layer_beyond_the_networks_fails_in_resolve():
  assert len(models.feature_shapes(models.create("resnet8"))) == 4
  with pytest.raises(errors.ConfigError) as e:
    stage_lib.resolve(stage_config("fitnet", hint_layer=9))
  message = str(e.value)
  assert "\n" not in message
  assert "recipes.fitnet.hint_layer=9" in message and "[0, 4)" in message


def test_fitnet_hint_layer_in_range_resolves():
  stage = stage_lib.resolve(stage_config("fitnet", hint_layer=3))
  assert stage.nets.modules["connector"].s_shape[-1] == 64


@pytest.mark.parametrize("method", ["at", "nst", "kdsvd", "vid"])
def test_level_by_level_methods_refuse_networks_of_other_depths(method):
  # vgg8 has one feature level more than a CIFAR ResNet.
  with pytest.raises(errors.ConfigError, match="student has 5") as e:
    stage_lib.resolve(stage_config(method, student="vgg8"))
  assert "\n" not in str(e.value)


def test_ofd_teacher_without_enough_margins_fails_in_resolve():
  with pytest.raises(errors.ConfigError, match="3 BatchNorms"):
    stage_lib.resolve(stage_config("ofd", student="imagenet_resnet18",
                                   teacher="imagenet_resnet34"))

