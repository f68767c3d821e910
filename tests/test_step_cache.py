"""Steps are kept per program: a stage resolved again reuses its compiled
steps; a stage that computes anything differently gets its own."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slkd_jax import config as config_lib
from slkd_jax import (config_checks, methods, parallel, step_cache, studies,
                      train_step)
from slkd_jax import stage as stage_lib
from slkd_jax import state as state_lib


def tiny_config(**overrides):
  """A resolved stage of a resnet8 SLKD run on 8×8 images (``overrides``
  by dotted key)."""
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
  # However the arguments are passed.
  assert (train_step.make_train_step(stage=again, mesh=mesh)
          is train_step.make_train_step(first, mesh))


# What reaches the step only as hyper-parameters (HParams inputs).
HYPER_PARAMETERS = {
    "seed": 3, "optim.learning_rate": 0.5, "optim.decay_epochs": (1,),
    "slkd.fusion_weights": (0.3, 0.7),
    **{f"loss.{key}": 0.25 for key in methods.LOSS_KEYS},
}


@pytest.mark.parametrize("method", ["slkd", "dkd", "fitnet"])
def test_hyper_parameters_are_not_part_of_the_program(method):
  """The claim the key rests on: stages that differ in their
  hyper-parameters trace to the same program."""
  mesh = parallel.make_mesh()
  first = tiny_config(method=method)
  other = tiny_config(method=method, **HYPER_PARAMETERS)
  assert (train_step.make_train_step(first, mesh)
          is train_step.make_train_step(other, mesh))
  teacher = state_lib.ModelState(*jax.eval_shape(
      lambda: state_lib.init_variables(first.nets.teacher, jax.random.key(0),
                                       first.image_shape)))
  state = jax.eval_shape(lambda: state_lib.init_trainable(
      first, jax.random.key(0), mesh))
  batch = {"image": jax.ShapeDtypeStruct((8, 8, 8, 3), jnp.float32),
           "label": jax.ShapeDtypeStruct((8,), jnp.int32),
           "mask": jax.ShapeDtypeStruct((8,), bool)}
  hp = jax.eval_shape(lambda: first.hparams(1))
  programs = [
      (str(jax.make_jaxpr(train_step.build_train_step(stage))(
          state, teacher, batch, hp)),
       str(jax.make_jaxpr(train_step.build_eval_step(stage))(
           state.replace(teacher=teacher), batch, hp)))
      for stage in (first, other)]
  assert programs[0] == programs[1]


@pytest.mark.parametrize("method", ["slkd", "crd", "vid"])
def test_hyper_parameters_are_not_part_of_a_fresh_state(method, monkeypatch):
  """Fresh states are kept per program too: their programs (keys, modules,
  buffers) also trace the same for stages that differ in hyper-parameters."""
  monkeypatch.setattr(step_cache, "MAX_PROGRAMS", 0)  # each builds its own
  mesh = parallel.make_mesh()
  labels = np.arange(40) % 5
  programs = [
      str(jax.make_jaxpr(lambda root: state_lib.init_trainable(
          stage, root, mesh, labels))(jax.random.key(0)))
      for stage in (tiny_config(method=method),
                    tiny_config(method=method, **HYPER_PARAMETERS))]
  assert programs[0] == programs[1]


@pytest.mark.parametrize("overrides", [
    {"method": "kd"},
    {"student.arch": "resnet14"},
    {"slkd.num_slts": 3},
    {"slkd.ensemble": "vmap"},
    {"slkd.detach_fused_target": True},
    {"optim.weight_decay": 1e-3},
    {"optim.nesterov": True},
    {"optim.momentum": 0.8},
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
  key = lambda **fields: dataclasses.replace(  # noqa: E731
      stage, **fields).program_key()
  assert key(image_size=8) == key(image_size=8)
  assert key(image_size=8) != key(image_size=8.0)  # int and float trace apart
  assert key(detach_fused_target=True) != key(detach_fused_target=1)
  assert key(options={"eps": 0.0}) != key(options={"eps": -0.0})
  assert key(options={"eps": [1.0]}) == key(options={"eps": [1.0]})


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
