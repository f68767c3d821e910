"""A study's config is refused in one line when it asks for what a study
cannot do: vary values without runs (no ``study.seeds``), or vary a key
that changes the compiled program. Config validation only, no training."""

import os
import subprocess
import sys

import pytest

from slkd_jax import errors
from slkd_jax import config as config_lib
from slkd_jax import config_checks

from test_train import REPO, _cli_env, _cli_flags
from test_train import tiny_config as synthetic_config


def test_vary_without_seeds_is_refused_naming_study_seeds():
  config = synthetic_config(method="kd")
  config.study.vary.temperature = (2.0, 4.0)
  with pytest.raises(errors.ConfigError,
                     match=r"^config\.study\.vary\.temperature is set but "
                     r"config\.study\.seeds is None.*set study\.seeds") as e:
    config_checks.validate(config)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("key", sorted(config_lib.STUDY_FIXED_KEYS))
def test_keys_that_change_the_program_cannot_vary(key):
  config = synthetic_config(method="kd")
  config.study.seeds = (0, 1)
  config.study.vary[key] = (1, 2)
  with pytest.raises(errors.ConfigError,
                     match=rf"^config\.study\.vary\.{key} cannot vary: "
                     rf".*train separate runs for other {key} values$") as e:
    config_checks.validate(config)
  assert "\n" not in str(e.value) and "spelling" not in str(e.value)


def test_momentum_says_why_it_cannot_vary_even_without_seeds():
  config = synthetic_config(method="kd")
  config.study.vary.momentum = (0.9, 0.8)
  with pytest.raises(errors.ConfigError,
                     match="optim.momentum is a constant of the compiled "
                     "optimizer"):
    config_checks.validate(config)


def test_a_varying_key_is_still_accepted():
  config = synthetic_config(method="kd")
  config.study.seeds = (0, 1)
  config.study.vary.temperature = (2.0, 4.0)
  config_checks.validate(config)
  assert [c.loss.temperature for c in config_lib.run_configs(config)] == [
      2.0, 4.0]


def test_the_cli_says_why_momentum_cannot_vary(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "slkd_jax.main",
       *_cli_flags(tmp_path, "--config.study.seeds=(0,1)",
                   "--config.study.vary.momentum=(0.9,0.8)")],
      cwd=REPO, env=_cli_env(1), capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr
  assert ("error: config.study.vary.momentum cannot vary: optim.momentum is "
          "a constant of the compiled optimizer") in out.stderr
  assert "spelling" not in out.stderr and "Traceback" not in out.stderr
  assert not os.path.exists(tmp_path / "kd")
