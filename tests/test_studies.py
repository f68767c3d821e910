"""R runs in one compiled step (``slkd_jax.studies``) equal R separate runs
with the same seeds and hyper-parameters, vmapped or unrolled; a diverging
run is frozen and the others go on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slkd_jax import config as config_lib
from slkd_jax import errors, parallel, studies, train_step
from slkd_jax import stage as stage_lib
from slkd_jax import state as state_lib

SEEDS = (0, 1, 2)
TEMPERATURES = (4.0, 2.0, 1.0)


def tiny_config(method="slkd", seed=0):
  c = config_lib.base_config()
  c.method, c.seed, c.dtype = method, seed, "float64"
  c.data.name, c.data.image_size, c.data.num_classes = "synthetic", 8, 5
  c.teacher.arch = c.student.arch = "resnet8"
  c.slkd.num_slts = 1  # the run axis is what is tested; keep compiles small
  c.batch_size = 16
  return config_lib.stage_config(c, method)


def teacher_of(stage):
  params, stats = state_lib.init_variables(stage.nets.teacher,
                                           jax.random.key(7), stage.image_shape)
  return state_lib.ModelState(params, jax.tree.map(lambda s: s + 0.1, stats))


def batches(mesh, n):
  rng = np.random.default_rng(0)
  for _ in range(n):
    yield jax.device_put(
        {"image": rng.standard_normal((16, 8, 8, 3)),
         "label": rng.integers(0, 5, 16).astype(np.int32),
         "mask": np.arange(16) < 13}, parallel.batch_sharding(mesh))


def separate_run(method, seed, temperature, mesh, n):
  stage = stage_lib.resolve(tiny_config(method, seed))
  state = state_lib.create_state(stage, mesh, teacher_of(stage))
  step = train_step.make_train_step(stage, mesh)
  hp = stage.hparams(1).replace(temperature=jnp.asarray(temperature))
  for batch in batches(mesh, n):
    state, _ = step(state, batch, hp)
  return jax.device_get(state.replace(teacher=None))


def study(method, impl, mesh, n, temperatures=TEMPERATURES,
          learning_rates=None):
  stage = stage_lib.resolve(tiny_config(method))
  states = studies.create_runs_state(stage, mesh, SEEDS, teacher_of(stage))
  hps = studies.stack([
      stage.hparams(1).replace(
          temperature=jnp.asarray(t),
          learning_rate=(stage.hparams(1).learning_rate if learning_rates is None
                         else jnp.asarray(learning_rates[r])))
      for r, t in enumerate(temperatures)])
  step = studies.make_runs_step(stage, mesh, impl)
  alive = jnp.ones(len(SEEDS), bool)
  for batch in batches(mesh, n):
    states, alive, metrics = step(states, alive, batch, hps)
  return jax.device_get(states.replace(teacher=None)), np.asarray(alive)


@pytest.mark.parametrize("method,impl", [("slkd", "unrolled"),
                                         ("kd", "vmap")])
def test_runs_in_one_step_equal_separate_runs(method, impl):
  with jax.enable_x64(True):
    mesh = parallel.make_mesh()
    together, alive = study(method, impl, mesh, 2)
    assert alive.all()
    for r, (seed, t) in enumerate(zip(SEEDS, TEMPERATURES)):
      alone = separate_run(method, seed, t, mesh, 2)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(
          a, b, rtol=1e-10, atol=1e-13), studies.run_slice(together, r), alone)


def test_a_diverging_run_is_frozen_and_the_others_go_on():
  with jax.enable_x64(True):
    mesh = parallel.make_mesh()
    stage = stage_lib.resolve(tiny_config("kd"))
    fresh = jax.device_get(studies.create_runs_state(stage, mesh, SEEDS,
                                                     teacher_of(stage)))
    together, alive = study("kd", "vmap", mesh, 2,
                            learning_rates=(0.05, jnp.nan, 0.05))
    assert alive.tolist() == [True, False, True]
    jax.tree.map(np.testing.assert_array_equal,
                 studies.run_slice(together, 1),
                 studies.run_slice(fresh.replace(teacher=None), 1))
    for r in (0, 2):
      alone = separate_run("kd", SEEDS[r], TEMPERATURES[r], mesh, 2)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(
          a, b, rtol=1e-10, atol=1e-13), studies.run_slice(together, r), alone)


def test_a_study_of_crd_is_refused_in_one_line():
  c = tiny_config("kd")
  c.method = "crd"
  stage = stage_lib.resolve(config_lib.stage_config(c, "crd"))
  with pytest.raises(errors.ConfigError, match="not supported yet"):
    studies.build_runs_step(stage, "vmap")


def test_memory_estimate_grows_with_the_runs():
  mesh = parallel.make_mesh(jax.devices()[:1])
  estimates = []
  with jax.enable_x64(True):
    stage = stage_lib.resolve(tiny_config("kd"))
    batch = next(batches(mesh, 1))
    for runs in (1, 2):
      states = studies.create_runs_state(stage, mesh, SEEDS[:runs],
                                         teacher_of(stage))
      hps = studies.stack([stage.hparams(1)] * runs)
      estimates.append(studies.memory_estimate(stage, mesh, "unrolled",
                                               states, batch, hps))
  one, two = estimates
  assert 0 < one["per_run_bytes"] <= one["total_bytes"]
  # A second run adds at least its own state (params, momentum, stats).
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(
      studies.run_slice(states.replace(teacher=None), 0)))
  assert two["total_bytes"] - one["total_bytes"] >= state_bytes
