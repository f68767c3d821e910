"""R runs in one compiled step (``slkd_jax.studies``) equal R separate runs
with the same seeds and hyper-parameters, vmapped or unrolled; a diverging
run is frozen and the others go on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slkd_jax import config as config_lib
from slkd_jax import parallel, studies, train_step
from slkd_jax import stage as stage_lib
from slkd_jax import state as state_lib

SEEDS = (0, 1, 2)
TEMPERATURES = (4.0, 2.0, 1.0)


LABELS = np.arange(40, dtype=np.int32) % 5  # CRD's memory: 40 examples


def tiny_config(method="slkd", seed=0):
  c = config_lib.base_config()
  c.method, c.seed, c.dtype = method, seed, "float64"
  c.data.name, c.data.image_size, c.data.num_classes = "synthetic", 8, 5
  c.teacher.arch = c.student.arch = "resnet8"
  c.slkd.num_slts = 1  # the run axis is what is tested; keep compiles small
  c.batch_size = 16
  c.recipes.crd.nce_k, c.recipes.crd.feat_dim = 8, 16
  return config_lib.stage_config(c, method)


def teacher_of(stage):
  params, stats = state_lib.init_variables(stage.nets.teacher,
                                           jax.random.key(7), stage.image_shape)
  return state_lib.ModelState(params, jax.tree.map(lambda s: s + 0.1, stats))


def host_batches(n, data_seed=0):
  rng = np.random.default_rng(data_seed)
  for i in range(n):
    yield {"image": rng.standard_normal((16, 8, 8, 3)),
           "label": rng.integers(0, 5, 16).astype(np.int32),
           "mask": np.arange(16) < 13,
           "index": (np.arange(16, dtype=np.int32) + 16 * i) % 40}


def batches(mesh, n, data_seed=0):
  for batch in host_batches(n, data_seed):
    yield jax.device_put(batch, parallel.batch_sharding(mesh))


def run_batches(mesh, n):
  """Run r's own batches (data seed r), stacked on a run axis."""
  for per_run in zip(*(host_batches(n, r) for r in range(len(SEEDS)))):
    yield jax.device_put(studies.stack(per_run),
                         studies.batch_sharding(mesh, shared_batch=False))


def separate_run(method, seed, temperature, mesh, n, data_seed=0):
  stage = stage_lib.resolve(tiny_config(method, seed))
  state = state_lib.create_state(stage, mesh, teacher_of(stage), LABELS)
  step = train_step.make_train_step(stage, mesh)
  hp = stage.hparams(1).replace(temperature=jnp.asarray(temperature))
  for batch in batches(mesh, n, data_seed):
    state, _ = step(state, batch, hp)
  return jax.device_get(state.replace(teacher=None))


def study(method, impl, mesh, n, temperatures=TEMPERATURES,
          learning_rates=None, shared_batch=True):
  stages = [stage_lib.resolve(tiny_config(method, seed)) for seed in SEEDS]
  states = studies.create_runs_state(stages[0], mesh, SEEDS, LABELS)
  teacher = jax.device_put(teacher_of(stages[0]), parallel.replicated(mesh))
  hps = studies.stack([
      stage.hparams(1).replace(
          temperature=jnp.asarray(t),
          # Not weak-typed, as the stage's own: the same program as above.
          learning_rate=(stage.hparams(1).learning_rate if learning_rates is None
                         else jnp.asarray(learning_rates[r], jnp.float64)))
      for r, (stage, t) in enumerate(zip(stages, temperatures))])
  step = studies.make_runs_step(stages[0], mesh, impl, shared_batch)
  alive = studies.all_alive(len(SEEDS), mesh)
  data = batches(mesh, n) if shared_batch else run_batches(mesh, n)
  for batch in data:
    states, alive, metrics = step(states, alive, teacher, batch, hps)
  return jax.device_get(states), np.asarray(alive)


def mesh_for(impl):
  """All 8 devices, but one for vmap: XLA:CPU's float64 grouped
  convolutions (vmapped kernels) cost about the same per device whatever its
  share of the batch, 8x the time on 8 fake devices (16.5 s vs 2.1 s per
  study step). The runs are what is tested here; tests/test_train_step.py
  checks 1 vs 8 devices."""
  return parallel.make_mesh(jax.devices()[:1] if impl == "vmap" else None)


def assert_runs_equal(together, r, alone):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-10, atol=1e-13), studies.run_slice(together, r), alone)


@pytest.mark.parametrize("method,impl", [("slkd", "unrolled"),
                                         ("kd", "vmap"),
                                         ("crd", "unrolled")])
def test_runs_in_one_step_equal_separate_runs(method, impl):
  """CRD too: each run's memory and its negatives (drawn from its own seed,
  ``hp.seed``) are its own."""
  with jax.enable_x64(True):
    mesh = mesh_for(impl)
    together, alive = study(method, impl, mesh, 2)
    assert alive.all()
    for r, (seed, t) in enumerate(zip(SEEDS, TEMPERATURES)):
      assert_runs_equal(together, r, separate_run(method, seed, t, mesh, 2))


def test_runs_with_their_own_batches_equal_separate_runs():
  with jax.enable_x64(True):
    mesh = mesh_for("vmap")
    together, _ = study("kd", "vmap", mesh, 2, shared_batch=False)
    for r, (seed, t) in enumerate(zip(SEEDS, TEMPERATURES)):
      assert_runs_equal(together, r,
                        separate_run("kd", seed, t, mesh, 2, data_seed=r))


@pytest.mark.parametrize("impl", ["vmap", "unrolled"])
def test_a_diverging_run_is_frozen_and_the_others_go_on(impl):
  """Both impls: unrolled, the step keeps a run's state with a conditional;
  vmapped, with a select per leaf."""
  with jax.enable_x64(True):
    mesh = mesh_for(impl)
    stage = stage_lib.resolve(tiny_config("kd"))
    fresh = jax.device_get(studies.create_runs_state(stage, mesh, SEEDS))
    together, alive = study("kd", impl, mesh, 2,
                            learning_rates=(0.05, jnp.nan, 0.05))
    assert alive.tolist() == [True, False, True]
    jax.tree.map(np.testing.assert_array_equal,
                 studies.run_slice(together, 1),
                 studies.run_slice(fresh, 1))
    for r in (0, 2):
      alone = separate_run("kd", SEEDS[r], TEMPERATURES[r], mesh, 2)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(
          a, b, rtol=1e-10, atol=1e-13), studies.run_slice(together, r), alone)


def test_memory_estimate_grows_with_the_runs():
  mesh = parallel.make_mesh(jax.devices()[:1])
  estimates = []
  with jax.enable_x64(True):
    stage = stage_lib.resolve(tiny_config("kd"))
    batch = next(batches(mesh, 1))
    for runs in (1, 2):
      states = studies.create_runs_state(stage, mesh, SEEDS[:runs])
      hps = jax.device_put(studies.stack([stage.hparams(1)] * runs),
                           parallel.replicated(mesh))
      estimates.append(studies.compile_runs_step(
          stage, mesh, "unrolled", states,
          jax.device_put(teacher_of(stage), parallel.replicated(mesh)),
          batch, hps)[1])
  one, two = estimates
  assert 0 < one["per_run_bytes"] <= one["total_bytes"]
  # A second run adds at least its own state (params, momentum, stats).
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(
      studies.run_slice(states, 0)))
  assert two["total_bytes"] - one["total_bytes"] >= state_bytes
