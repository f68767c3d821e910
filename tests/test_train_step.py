"""The sharded train step: ensemble equivalence, device-count invariance,
padding semantics and every method of the table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slkd_jax import config as config_lib
from slkd_jax import methods, parallel
from slkd_jax import state as state_lib
from slkd_jax import train_step

NUM_CLASSES = 5
IMAGE_SIZE = 8  # CIFAR nets pool globally: tiny images keep compiles short.


def tiny_config(method="slkd", num_slts=2, **slkd):
  c = config_lib.base_config()
  c.method = method
  c.teacher.arch = "resnet8"
  c.student.arch = "resnet8"
  c.data.num_classes = NUM_CLASSES
  c.data.image_size = IMAGE_SIZE
  c.slkd.num_slts = num_slts
  c.slkd.update(slkd)
  c.optim.learning_rate = 0.1
  config_lib.validate(c)
  return c


def random_teacher(c):
  nets = state_lib.build_networks(c)
  model = nets.teacher or models_create(c)
  params, stats = state_lib.init_variables(
      model, jax.random.key(42), state_lib.image_shape(c))
  # Non-trivial running statistics, so eval-mode BN is really exercised.
  stats = jax.tree.map(lambda s: s + 0.1, stats)
  return state_lib.ModelState(params, stats)


def models_create(c):
  from slkd_jax import models
  return models.create(c.teacher.arch, NUM_CLASSES)


def make_batch(n_real, n_total, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(n_total, IMAGE_SIZE, IMAGE_SIZE, 3))
  labels = rng.integers(0, NUM_CLASSES, n_total)
  return {"image": images.astype(np.float32), "label": labels.astype(np.int32),
          "mask": np.arange(n_total) < n_real}


def run_steps(c, mesh, batches, num_steps=1, state=None, step=None):
  """``num_steps`` steps per batch; returns the final state on the host and
  the metrics of the last step."""
  if state is None:
    state = state_lib.create_state(c, mesh, random_teacher(c))
  step = step or train_step.make_train_step(c, mesh)
  hp = methods.make_hparams(c, epoch=1)
  metrics = None
  for batch in batches:
    global_batch = parallel.host_local_to_global(batch, mesh)
    for _ in range(num_steps):
      state, metrics = step(state, global_batch, hp)
  return jax.device_get(state), jax.device_get(metrics)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


def test_vmap_and_unrolled_ensembles_give_the_same_states():
  mesh = parallel.make_mesh()
  batches = [make_batch(16, 16)]
  vmap_state, vmap_metrics = run_steps(
      tiny_config(num_slts=3, ensemble="vmap"), mesh, batches, num_steps=2)
  loop_state, loop_metrics = run_steps(
      tiny_config(num_slts=3, ensemble="unrolled"), mesh, batches, num_steps=2)
  assert_trees_close(vmap_state, loop_state)
  assert_trees_close(vmap_metrics, loop_metrics)


def test_detached_slts_equal_separate_single_slt_updates():
  """With the fused target detached each SL-T learns from labels and teacher
  only, so K stacked SL-Ts = K independent single-SL-T runs."""
  mesh = parallel.make_mesh()
  batches = [make_batch(16, 16, seed) for seed in range(2)]
  c3 = tiny_config(num_slts=3, detach_fused_target=True)
  stacked, _ = run_steps(c3, mesh, batches)
  # On the host: each run donates (consumes) the device buffers it is given.
  initial = jax.device_get(state_lib.create_state(c3, mesh, random_teacher(c3)))
  c1 = tiny_config(num_slts=1, detach_fused_target=True)
  single_step = train_step.make_train_step(c1, mesh)  # compiled once
  for k in range(3):
    single = initial.replace(slts=jax.tree.map(lambda x: x[k:k + 1],
                                               initial.slts))
    single, _ = run_steps(c1, mesh, batches, state=single, step=single_step)
    assert_trees_close(jax.tree.map(lambda x: x[k], stacked.slts),
                       jax.tree.map(lambda x: x[0], single.slts))


def test_reference_default_couples_the_slts():
  """Without detaching, the student's fused term trains the SL-Ts too: their
  update differs from the detached one."""
  mesh = parallel.make_mesh()
  batches = [make_batch(16, 16)]
  coupled, _ = run_steps(tiny_config(detach_fused_target=False), mesh, batches)
  detached, _ = run_steps(tiny_config(detach_fused_target=True), mesh, batches)
  assert_trees_close(coupled.student, detached.student)  # same student grads
  diff = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                      coupled.slts.params, detached.slts.params)
  assert max(jax.tree.leaves(diff)) > 1e-6


def test_one_device_and_eight_devices_agree():
  c = tiny_config()
  batches = [make_batch(16, 16, seed) for seed in range(3)]
  one, one_metrics = run_steps(c, parallel.make_mesh(jax.devices()[:1]),
                               batches)
  eight, eight_metrics = run_steps(c, parallel.make_mesh(), batches)
  assert len(jax.devices()) == 8
  assert_trees_close(one, eight)  # params, BN statistics, momentum buffers
  assert_trees_close(one_metrics, eight_metrics)


def test_padded_batch_equals_the_smaller_real_batch():
  """The reference trains on the last partial batch; padding + mask must give
  exactly that step (losses and BatchNorm statistics over real images only)."""
  c = tiny_config()
  real = make_batch(12, 12)
  padded = {k: np.concatenate([v, v[:4]]) for k, v in real.items()}
  padded["mask"] = np.arange(16) < 12
  small, small_metrics = run_steps(c, parallel.make_mesh(jax.devices()[:4]),
                                   [real])
  masked, masked_metrics = run_steps(c, parallel.make_mesh(), [padded])
  assert_trees_close(small, masked)
  assert_trees_close(small_metrics, masked_metrics)


def test_teacher_is_frozen_and_state_advances():
  c = tiny_config()
  mesh = parallel.make_mesh()
  teacher = random_teacher(c)
  state = state_lib.create_state(c, mesh, teacher)
  final, metrics = run_steps(c, mesh, [make_batch(16, 16)], num_steps=2,
                             state=state)
  assert_trees_close(final.teacher, teacher, rtol=0, atol=0)
  assert int(final.step) == 2 and int(final.student.step) == 2
  np.testing.assert_array_equal(final.slts.step, [2, 2])
  expected = {"loss", "student_loss", "slt_loss", "student_ce",
              "student_kd_teacher", "student_kd_fused", "slt_ce",
              "slt_kd_teacher", "student_acc", "teacher_acc", "slt_acc",
              "fused_acc", "kl_student_teacher", "kl_student_fused",
              "learning_rate"}
  assert expected <= set(metrics)
  assert metrics["slt_acc"].shape == (2,)
  # Different random inits per SL-T (not copies of each other).
  first = jax.tree.leaves(final.slts.params)[0]
  assert np.max(np.abs(first[0] - first[1])) > 1e-3


@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_every_method_decreases_its_loss(method):
  c = tiny_config(method)
  c.optim.learning_rate = 0.02  # a stable step size for every objective
  mesh = parallel.make_mesh()
  state = state_lib.create_state(
      c, mesh, random_teacher(c) if methods.get(method).uses_teacher else None)
  step = train_step.make_train_step(c, mesh)
  hp = methods.make_hparams(c, epoch=30)  # DKD fully warmed up
  batch = parallel.host_local_to_global(make_batch(16, 16), mesh)
  history = []
  for _ in range(6):
    state, metrics = step(state, batch, hp)
    history.append(float(metrics["loss"]))
  assert np.isfinite(history).all()
  assert history[-1] < history[0], history


def test_eval_step_counts_real_examples_only():
  c = tiny_config()
  mesh = parallel.make_mesh()
  state = state_lib.create_state(c, mesh, random_teacher(c))
  evaluate = train_step.make_eval_step(c, mesh)
  batch = make_batch(11, 16)
  sums = jax.device_get(evaluate(state, parallel.host_local_to_global(batch,
                                                                      mesh)))
  assert float(sums["count"]) == 11
  for name in ("student", "teacher", "slt_fused"):
    assert 0 <= float(sums[f"{name}/top1"]) <= float(sums[f"{name}/top5"]) <= 11
  assert sums["slt/top1"].shape == (2,)
  # Top-1 equals a direct eval-mode forward on the real examples.
  nets = state_lib.build_networks(c)
  logits = nets.student.apply(state.student.variables, batch["image"][:11],
                              train=False)
  expected = np.sum(np.argmax(logits, -1) == batch["label"][:11])
  assert float(sums["student/top1"]) == expected


def test_hparams_change_without_recompiling():
  c = tiny_config("kd")
  mesh = parallel.make_mesh()
  step_fn = train_step.build_train_step(c)
  traces = []

  def counting(*args):
    traces.append(1)
    return step_fn(*args)

  replicated = parallel.replicated(mesh)
  jitted = jax.jit(counting, in_shardings=(replicated, replicated,
                                           parallel.batch_sharding(mesh),
                                           replicated))
  state = state_lib.create_state(c, mesh, random_teacher(c))
  batch = parallel.host_local_to_global(make_batch(16, 16), mesh)
  for epoch in (1, 151, 200):
    c.loss.temperature = float(epoch)
    _, metrics = jitted(state.replace(teacher=None), state.teacher, batch,
                        methods.make_hparams(c, epoch))
  assert len(traces) == 1
  assert float(metrics["learning_rate"]) == pytest.approx(0.001)


def test_bfloat16_compute_keeps_float32_state():
  c = tiny_config()
  c.dtype = "bfloat16"
  mesh = parallel.make_mesh()
  final, metrics = run_steps(c, mesh, [make_batch(16, 16)], num_steps=2)
  assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(
      (final.student.params, final.student.batch_stats, final.slts.params,
       final.slts.opt_state)))
  assert np.isfinite(metrics["loss"]) and metrics["loss"].dtype == np.float32
  # Close to the float32 step (bf16 rounding only).
  reference, _ = run_steps(tiny_config(), mesh, [make_batch(16, 16)],
                           num_steps=2)
  np.testing.assert_allclose(
      jax.tree.leaves(final.student.params)[0],
      jax.tree.leaves(reference.student.params)[0], atol=0.05)
