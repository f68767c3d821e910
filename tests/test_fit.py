"""The one training loop (slkd_jax.fit): stopping at once on a signal
that arrives between steps, at a stage boundary or after the last step."""

import os
import signal

import pytest

from slkd_jax import evaluation, fit, studies, train
from test_train import tiny_config


def _sigterm_when(monkeypatch, module, name, when):
  """Wrap ``module.name`` to send this process SIGTERM before the call
  for which ``when(call_number)`` is true."""
  original, calls = getattr(module, name), []

  def wrapped(*args, **kwargs):
    calls.append(name)
    if when(len(calls)):
      os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)

  monkeypatch.setattr(module, name, wrapped)
  return calls


def test_a_stop_in_a_studys_last_eval_exits_75_with_everything_saved(
    tmp_path, monkeypatch):
  config = tiny_config(method="kd")
  config.study.seeds = (0, 1)
  # teacher: 1 epoch, study: 2 epochs → the third eval pass is the last.
  _sigterm_when(monkeypatch, evaluation, "eval_sums", lambda n: n == 3)
  with pytest.raises(train.Preempted, match="after the last stage"):
    train.run(config, str(tmp_path))
  for r in ("0", "1"):
    assert os.path.isfile(tmp_path / "runs" / r / "kd" / "final_model" /
                          "model.json")
  assert os.path.isfile(tmp_path / "summary.md")
  monkeypatch.undo()
  compiles = _sigterm_when(monkeypatch, studies, "compile_runs_step",
                           lambda n: False)
  results = train.run(config, str(tmp_path))  # nothing left to train
  assert compiles == []
  assert [h["epoch"] for h in results["runs/1/kd"].history] == [1, 2]


def test_a_stop_at_a_stage_boundary_stops_before_the_next_stage_compiles(
    tmp_path, monkeypatch):
  config = tiny_config(method="kd")
  stages = []
  original = fit.fit

  def fit_then_sigterm(plan, *args):
    stages.append(plan.name)
    result = original(plan, *args)
    os.kill(os.getpid(), signal.SIGTERM)  # the teacher stage just ended
    return result

  monkeypatch.setattr(fit, "fit", fit_then_sigterm)
  compiles = _sigterm_when(monkeypatch, studies, "compile_runs_step",
                           lambda n: False)
  with pytest.raises(train.Preempted, match="before stage kd"):
    train.run(config, str(tmp_path))
  assert stages == ["teacher"] and len(compiles) == 1
  assert not os.path.exists(tmp_path / "kd" / "checkpoints")


def test_a_bad_setting_of_a_later_stage_fails_before_anything_trains(
    tmp_path):
  """Every stage is resolved (its settings checked against its networks)
  before the teacher stage starts."""
  config = tiny_config(method="kd")
  config.compare_with = ("fitnet",)
  config.recipes.fitnet.hint_layer = 9
  with pytest.raises(train.ConfigError, match="hint_layer=9"):
    train.run(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "teacher")
