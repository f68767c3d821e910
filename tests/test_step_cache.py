"""Steps are kept per program: a stage resolved again reuses its compiled
steps; a stage that computes anything differently gets its own."""

import dataclasses

import jax
import pytest

from slkd_jax import config as config_lib
from slkd_jax import config_checks, parallel, step_cache, studies, train_step
from slkd_jax import stage as stage_lib


def tiny_config(**overrides):
  c = config_lib.base_config()
  c.teacher.arch = c.student.arch = "resnet8"
  c.data.num_classes, c.data.image_size = 5, 8
  for key, value in overrides.items():
    *path, leaf = key.split(".")
    target = c
    for part in path:
      target = target[part]
    target[leaf] = value
  config_checks.validate(c)
  return stage_lib.resolve(c)


def test_a_stage_resolved_again_reuses_its_steps():
  mesh = parallel.make_mesh()
  first, again = tiny_config(), tiny_config()
  assert first is not again
  assert (train_step.make_train_step(first, mesh)
          is train_step.make_train_step(again, mesh))
  assert (train_step.make_eval_step(first, mesh)
          is train_step.make_eval_step(again, mesh))
  assert (studies.make_runs_step(first, mesh, "unrolled")
          is studies.make_runs_step(again, mesh, "unrolled"))
  assert (studies.make_runs_eval_step(first, mesh, "vmap")
          is studies.make_runs_eval_step(again, mesh, "vmap"))


@pytest.mark.parametrize("overrides", [
    {"seed": 3},  # the run's seed and learning rates are hyper-parameters
    {"optim.learning_rate": 0.5, "optim.decay_epochs": (1,)},
])
def test_seed_and_schedule_are_not_part_of_the_program(overrides):
  mesh = parallel.make_mesh()
  assert (train_step.make_train_step(tiny_config(), mesh)
          is train_step.make_train_step(tiny_config(**overrides), mesh))


@pytest.mark.parametrize("overrides", [
    {"method": "kd"},
    {"student.arch": "resnet14"},
    {"slkd.num_slts": 3},
    {"slkd.ensemble": "vmap"},
    {"slkd.detach_fused_target": True},
    {"slkd.fusion_weights": (0.3, 0.7)},
    {"optim.weight_decay": 1e-3},
    {"optim.nesterov": True},
    {"loss.temperature": 2.0},
    {"dtype": "bfloat16"},
    {"data.image_size": 16},
])
def test_anything_else_gets_its_own_program(overrides):
  mesh = parallel.make_mesh()
  base = train_step.make_train_step(tiny_config(), mesh)
  assert train_step.make_train_step(tiny_config(**overrides), mesh) is not base


def test_mesh_and_switches_are_part_of_the_key():
  stage = tiny_config()
  eight, one = parallel.make_mesh(), parallel.make_mesh(jax.devices()[:1])
  assert (train_step.make_train_step(stage, eight)
          is not train_step.make_train_step(stage, one))
  runs = studies.make_runs_step(stage, eight, "unrolled")
  for other in (studies.make_runs_step(stage, eight, "vmap"),
                studies.make_runs_step(stage, eight, "unrolled", False),
                studies.make_runs_step(stage, eight, "unrolled", True, False)):
    assert other is not runs


def test_keys_tell_apart_what_python_calls_equal():
  stage = tiny_config()
  settings = vars(stage.settings)
  name = next(k for k, v in settings.items() if isinstance(v, float))
  key = lambda value: step_cache.program_key(dataclasses.replace(  # noqa: E731
      stage, settings=type(stage.settings)(**{**settings, name: value})))
  assert key(1.0) == key(1.0)
  assert key(1) != key(1.0)  # an int and a float constant trace differently
  assert key(0.0) != key(-0.0)
  assert key(True) != key(1)


def test_only_the_most_recent_programs_are_kept(monkeypatch):
  monkeypatch.setattr(step_cache, "MAX_PROGRAMS", 2)
  built = []

  @step_cache.per_program
  def build(stage, tag):
    built.append(tag)
    return object()

  stage = tiny_config()
  kept = build(stage, "a")
  build(stage, "b")
  assert build(stage, "a") is kept and built == ["a", "b"]
  build(stage, "c")  # drops "b", the least recently used
  build(stage, "a")
  build(stage, "b")
  assert built == ["a", "b", "c", "b"]
