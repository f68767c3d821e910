"""The sharded train step: ensemble equivalence, device-count invariance,
padding semantics and every method of the table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slkd_jax import config as config_lib
from slkd_jax import config_checks
from slkd_jax import losses, methods, optim, parallel
from slkd_jax import stage as stage_lib
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
  config_checks.validate(c)
  return c


def random_teacher(c, seed=42):
  nets = stage_lib.resolve(c).nets
  model = nets.teacher or models_create(c)
  params, stats = state_lib.init_variables(
      model, jax.random.key(seed), stage_lib.resolve(c).image_shape)
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


def run_steps(c, mesh, batches, num_steps=1, state=None, step=None, hp=None):
  """``num_steps`` steps per batch (hyper-parameters of epoch 1 unless
  ``hp``); returns the final state on the host and the metrics of the last
  step."""
  if state is None:
    state = state_lib.create_state(stage_lib.resolve(c), mesh, random_teacher(c))
  else:  # a host state, placed as the step returns it: no second trace
    state = jax.device_put(state, parallel.replicated(mesh))
  step = step or train_step.make_train_step(stage_lib.resolve(c), mesh)
  hp = stage_lib.resolve(c).hparams(1) if hp is None else hp
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
  initial = jax.device_get(state_lib.create_state(stage_lib.resolve(c3), mesh, random_teacher(c3)))
  c1 = tiny_config(num_slts=1, detach_fused_target=True)
  single_step = train_step.make_train_step(stage_lib.resolve(c1), mesh)  # compiled once
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


def test_fresh_states_compile_each_network_init_once():
  """A network's random init (most of a fresh state's compile time) is one
  program per architecture and key layout, shared by the stages that build
  it; every leaf of the state is replicated over the mesh."""
  mesh = parallel.make_mesh()
  jax.clear_caches()
  kd = state_lib.create_state(stage_lib.resolve(tiny_config(method="kd")),
                              mesh, random_teacher(tiny_config()))
  assert state_lib.network_variables._cache_size() == 1  # the student
  slkd = state_lib.create_state(stage_lib.resolve(tiny_config(num_slts=2)),
                                mesh, random_teacher(tiny_config()))
  assert state_lib.network_variables._cache_size() == 2  # + the [2] SL-Ts
  for leaf in jax.tree.leaves((kd, slkd)):
    assert leaf.sharding.is_fully_replicated
    assert leaf.sharding.device_set == set(mesh.devices.flat)
  # Same seed, same student: its init does not depend on the method.
  assert_trees_close(jax.device_get(kd.student.params),
                     jax.device_get(slkd.student.params), rtol=0, atol=0)


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
  state = state_lib.create_state(stage_lib.resolve(c), mesh, teacher)
  final, metrics = run_steps(c, mesh, [make_batch(16, 16)], num_steps=2,
                             state=state)
  assert_trees_close(final.teacher, teacher, rtol=0, atol=0)
  assert int(final.step) == 2 and int(final.student.step) == 2
  np.testing.assert_array_equal(final.slts.step, [2, 2])
  expected = {"loss", "student/loss", "slt/loss", "student/ce",
              "student/kd_teacher", "student/kd_fused", "slt/ce",
              "slt/kd_teacher", "student/acc", "teacher/acc", "slt/acc",
              "slt_fused/acc", "student/kl_teacher", "student/kl_fused",
              "learning_rate"}
  assert expected <= set(metrics)
  assert metrics["slt/acc"].shape == (2,)
  # Different random inits per SL-T (not copies of each other).
  first = jax.tree.leaves(final.slts.params)[0]
  assert np.max(np.abs(first[0] - first[1])) > 1e-3


@pytest.mark.parametrize("method", sorted(
    m for m in methods.METHODS  # TESKD trains its own networks only:
    if not methods.get(m).student_archs))  # tests/test_teskd.py
def test_every_method_decreases_its_loss(method):
  c = tiny_config(method)
  c.optim.learning_rate = 0.02  # a stable step size for every objective
  if method == "crd":  # a memory of the 16 examples; 8 negatives each
    c.recipes.crd.nce_k = 8
  mesh = parallel.make_mesh()
  stage = stage_lib.resolve(c)
  batch = make_batch(16, 16)
  state = state_lib.create_state(
      stage, mesh, random_teacher(c) if stage.method.uses_teacher else None,
      train_labels=batch["label"])
  step = train_step.make_train_step(stage, mesh)
  hp = stage.hparams(30)  # DKD fully warmed up
  batch = parallel.host_local_to_global(
      {**batch, "index": np.arange(16, dtype=np.int32)}, mesh)
  fresh = jax.device_get(state)
  history = []
  for _ in range(6):
    state, metrics = step(state, batch, hp)
    history.append(jax.device_get(metrics))
  loss_values = [float(m["loss"]) for m in history]
  assert np.isfinite(loss_values).all()
  assert loss_values[-1] < loss_values[0], loss_values
  if stage.method.feature_term is not None:
    _check_feature_method(method, stage, fresh, jax.device_get(state), history)


def _check_feature_method(method, stage, fresh, state, history):
  """A feature-based method trains with CE weight 1 and its reference's
  feature weight, reports a finite term every step, and trains its
  connector (if it has one) with the student."""
  assert stage.settings.ce_weight == 1.0
  assert stage.settings.feat_weight == methods.get(
      method).defaults["feat_weight"]
  assert all(np.isfinite(m[f"student/{method}"]) for m in history)
  has_connector = stage.method.make_modules is not None
  assert (state.modules is not None) == has_connector
  if has_connector:
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                         state.modules, fresh.modules)
    assert max(jax.tree.leaves(moved)) > 0


def test_eval_step_counts_real_examples_only():
  c = tiny_config()
  mesh = parallel.make_mesh()
  stage = stage_lib.resolve(c)
  state = state_lib.create_state(stage, mesh, random_teacher(c))
  evaluate = train_step.make_eval_step(stage, mesh)
  batch = make_batch(11, 16)
  global_batch = parallel.host_local_to_global(batch, mesh)
  hp = stage.hparams(1)
  sums = jax.device_get(evaluate(state, global_batch, hp))
  assert float(sums["count"]) == 11
  # The fusion follows the step's hyper-parameters (not the config).
  first_only = jax.device_get(evaluate(
      state, global_batch, hp.replace(fusion_weights=jnp.asarray([1.0, 0.0]))))
  assert float(first_only["slt_fused/ce"]) == pytest.approx(
      float(first_only["slt/ce"][0]), rel=1e-6)
  assert float(sums["slt_fused/ce"]) != pytest.approx(
      float(sums["slt/ce"][0]), rel=1e-6)
  for name in ("student", "teacher", "slt_fused"):
    assert 0 <= float(sums[f"{name}/top1"]) <= float(sums[f"{name}/top5"]) <= 11
  assert sums["slt/top1"].shape == (2,)
  # Top-1 equals a direct eval-mode forward on the real examples.
  logits = stage.nets.student.apply(state.student.variables,
                                    batch["image"][:11],
                              train=False)
  expected = np.sum(np.argmax(logits, -1) == batch["label"][:11])
  assert float(sums["student/top1"]) == expected


def test_hparams_change_without_recompiling():
  c = tiny_config("kd")
  mesh = parallel.make_mesh()
  step_fn = train_step.build_train_step(stage_lib.resolve(c))
  traces = []

  def counting(*args):
    traces.append(1)
    return step_fn(*args)

  replicated = parallel.replicated(mesh)
  jitted = jax.jit(counting, in_shardings=(replicated, replicated,
                                           parallel.batch_sharding(mesh),
                                           replicated))
  state = state_lib.create_state(stage_lib.resolve(c), mesh, random_teacher(c))
  batch = parallel.host_local_to_global(make_batch(16, 16), mesh)
  for epoch in (1, 151, 200):
    c.loss.temperature = float(epoch)
    _, metrics = jitted(state.replace(teacher=None), state.teacher, batch,
                        stage_lib.resolve(c).hparams(epoch))
  assert len(traces) == 1
  assert float(metrics["learning_rate"]) == pytest.approx(0.001)


# bfloat16 keeps 8 significant bits: unit roundoff u = 2^-8 ≈ 3.9e-3.
BF16_UNIT_ROUNDOFF = 2.0**-8
# The loss is a float32 mean over the batch of terms computed from float32
# logits; the bf16 forward perturbs those logits by a few roundings of
# relative size u, which the mean does not amplify: one u bounds it (measured:
# ~1e-5 relative). A step that skipped an update changes it by far more.
BF16_LOSS_RTOL = BF16_UNIT_ROUNDOFF
# A leaf's update is a small residual of large contributions that cancel
# (BatchNorm's backward subtracts the batch means of the incoming gradient),
# so its relative error is u times that cancellation ratio: measured up to
# ~45 u (early BN layers, batch 16 of 8×8 images). 64 u = 0.25 leaves
# headroom, yet an update that is dropped, halved or doubled (relative error
# >= 0.5) fails.
BF16_UPDATE_RTOL = 64 * BF16_UNIT_ROUNDOFF


def update_errors(initial, reference, candidate):
  """``{leaf path: ‖w_cand − w_ref‖ / ‖w_ref − w_0‖}``: the error of a
  path's parameter update relative to the reference update (both start at
  ``initial``, so this compares the updates Δ = w − w_0 themselves)."""
  def one(w_0, w_ref, w):
    w_0, w_ref, w = (np.asarray(x, np.float64) for x in (w_0, w_ref, w))
    reference_update = np.linalg.norm(w_ref - w_0)
    assert reference_update > 0  # every leaf moves (weight decay at least)
    return np.linalg.norm(w - w_ref) / reference_update
  errors = jax.tree.map(one, initial, reference, candidate)
  return {jax.tree_util.keystr(path): float(e)
          for path, e in jax.tree_util.tree_leaves_with_path(errors)}


def test_bfloat16_step_matches_float32_within_bfloat16_precision():
  """bf16 compute keeps float32 state, and two steps give the float32
  steps' loss and every parameter update up to bf16 rounding."""
  mesh = parallel.make_mesh()
  runs = {}
  for dtype in ("float32", "bfloat16"):
    c = tiny_config()
    c.dtype = dtype
    state, initial = fresh_state(c, mesh, random_teacher(c))
    runs[dtype] = (initial, *run_steps(c, mesh, [make_batch(16, 16)],
                                       num_steps=2, state=state))
  initial, reference, reference_metrics = runs["float32"]
  initial_bf16, final, metrics = runs["bfloat16"]
  # Same initial parameters: the comparison below is of the updates.
  assert_trees_close(initial_bf16, initial, rtol=0, atol=0)
  assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(
      (final.student.params, final.student.batch_stats, final.slts.params,
       final.slts.opt_state)))
  assert metrics["loss"].dtype == np.float32
  np.testing.assert_allclose(metrics["loss"], reference_metrics["loss"],
                             rtol=BF16_LOSS_RTOL)
  for net in ("student", "slts"):
    errors = update_errors(getattr(initial, net).params,
                           getattr(reference, net).params,
                           getattr(final, net).params)
    worst = max(errors, key=errors.get)
    assert errors[worst] < BF16_UPDATE_RTOL, (net, worst, errors[worst])


# ---------------------------------------------------------------------------
# Objectives of single methods, checked against updates computed here.


def fresh_state(c, mesh, teacher):
  """A new state and its host copy: the step donates (consumes) the device
  buffers, and the hand computations need the values from before the step."""
  state = state_lib.create_state(stage_lib.resolve(c), mesh, teacher)
  return state, jax.device_get(state)


def member(stacked, k):
  """Network ``k`` of a stacked (SL-T) tree."""
  return jax.tree.map(lambda x: x[k], stacked)


def train_logits(model, params, batch_stats, batch):
  """Train-mode logits (batch statistics of the real examples)."""
  logits, _ = model.apply({"params": params, "batch_stats": batch_stats},
                          batch["image"], train=True, mask=batch["mask"],
                          mutable=["batch_stats"])
  return logits


def sgd_step_by_hand(c, model, net, loss_of_logits, batch, lr):
  """The parameters after one reference SGD step of ``net`` (a host
  TrainState) on ``loss_of_logits(train-mode logits)``, computed without the
  step under test: plain ``jax.grad`` and the reference optimiser."""
  grads = jax.grad(lambda p: loss_of_logits(
      train_logits(model, p, net.batch_stats, batch)))(net.params)
  buffer, _ = stage_lib.resolve(c).tx.update(grads, net.opt_state,
                                                 net.params)
  return optim.apply_sgd(net.params, buffer, lr)


def max_abs_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("warmup, epoch, factor", [
    (20.0, 1, 0.05), (20.0, 10, 0.5), (20.0, 19, 0.95), (20.0, 20, 1.0),
    (20.0, 21, 1.0), (20.0, 240, 1.0), (1.0, 1, 1.0), (1.0, 2, 1.0)])
def test_dkd_warmup_factor_is_epoch_over_warmup_capped_at_one(warmup, epoch,
                                                             factor):
  """min(epoch / warmup, 1) with 1-indexed epochs: the first epoch already
  trains with 1/warmup of DKD (mdistiller), ImageNet's warm-up 1 never
  scales it."""
  c = tiny_config("dkd")
  c.loss.dkd_warmup = warmup
  hp = stage_lib.resolve(c).hparams(epoch)
  assert float(hp.dkd_warmup_factor) == pytest.approx(factor, abs=1e-7)


def test_dkd_step_scales_the_dkd_term_by_the_warmup_factor():
  """Epoch 1 of a 20-epoch warm-up: loss = w_ce·CE + 0.05·DKD, and the
  student's update is the gradient of exactly that loss."""
  c = tiny_config("dkd")
  c.loss.dkd_warmup = 20.0
  mesh = parallel.make_mesh()
  nets = stage_lib.resolve(c).nets
  teacher = random_teacher(c)
  state, before = fresh_state(c, mesh, teacher)
  batch = make_batch(16, 16)
  hp = stage_lib.resolve(c).hparams(1)
  assert float(hp.dkd_warmup_factor) == pytest.approx(0.05)
  after, metrics = run_steps(c, mesh, [batch], state=state, hp=hp)

  ce, dkd = float(metrics["student/ce"]), float(metrics["student/dkd"])
  assert dkd > 0.05 * ce  # large enough for a wrong factor to show
  assert float(metrics["loss"]) == pytest.approx(
      float(hp.ce_weight) * ce + 0.05 * dkd, rel=1e-6)

  z_t = nets.teacher.apply(teacher.variables, batch["image"], train=False)
  labels, mask = batch["label"], batch["mask"]

  def student_params(factor):
    def loss(z_s):
      return (hp.ce_weight * losses.cross_entropy(z_s, labels, mask) +
              factor * losses.dkd_loss(z_s, z_t, labels, hp.dkd_alpha,
                                       hp.dkd_beta, hp.temperature, mask))
    return sgd_step_by_hand(c, nets.student, before.student, loss, batch,
                            hp.learning_rate)

  assert_trees_close(after.student.params, student_params(0.05), atol=1e-6)
  # The comparison can tell the factor apart: unscaled DKD is far off.
  assert max_abs_diff(after.student.params, student_params(1.0)) > 1e-4


def test_slt_only_student_ignores_the_teacher():
  """``slkd_slt_only``: the student's loss is the CE terms plus the fused
  SL-T term only, so another teacher leaves the student's update unchanged
  (while the SL-Ts, which learn from it, change); under ``slkd`` the same
  change of teacher changes the student's update."""
  mesh = parallel.make_mesh()
  batch = make_batch(16, 16)

  def one_step_per_teacher(method):
    c = tiny_config(method)
    step = train_step.make_train_step(stage_lib.resolve(c), mesh)  # compiled once per method
    return [run_steps(c, mesh, [batch], step=step,
                      state=state_lib.create_state(stage_lib.resolve(c), mesh,
                                                   random_teacher(c, seed)))
            for seed in (42, 7)]

  (a, metrics_a), (b, metrics_b) = one_step_per_teacher("slkd_slt_only")
  hp = stage_lib.resolve(tiny_config("slkd_slt_only")).hparams(1)
  for m in (metrics_a, metrics_b):
    expected = ((hp.ce_weight + hp.fused_weight * hp.fused_ce_weight) *
                m["student/ce"] +
                hp.fused_weight * hp.fused_kd_weight * m["student/kd_fused"])
    assert float(m["student/loss"]) == pytest.approx(float(expected),
                                                     rel=1e-6)
  # The teacher term exists but is left out of the loss ...
  assert min(float(metrics_a["student/kd_teacher"]),
             float(metrics_b["student/kd_teacher"])) > 1e-2
  # ... the SL-Ts learn from the teacher, so the other one changes them ...
  assert max_abs_diff(a.slts.params, b.slts.params) > 1e-4
  # ... yet the student's update is the same, bit for bit (0·∇KD adds 0).
  assert_trees_close(a.student, b.student, rtol=0, atol=0)

  (c_a, _), (c_b, _) = one_step_per_teacher("slkd")
  assert max_abs_diff(c_a.student.params, c_b.student.params) > 1e-4


def test_slkd_seq_student_learns_from_the_updated_slts():
  """SLKD*: each SL-T first steps on its own loss (labels and teacher only);
  the student then learns from the teacher and from the fusion of the
  *updated* SL-Ts' train-mode logits on the same batch."""
  c = tiny_config("slkd_seq")
  mesh = parallel.make_mesh()
  nets = stage_lib.resolve(c).nets
  teacher = random_teacher(c)
  state, before = fresh_state(c, mesh, teacher)
  batch = make_batch(16, 16)
  hp = stage_lib.resolve(c).hparams(1)
  after, _ = run_steps(c, mesh, [batch], state=state, hp=hp)

  z_t = nets.teacher.apply(teacher.variables, batch["image"], train=False)
  labels, mask = batch["label"], batch["mask"]

  def kd(z, target):
    return losses.kd_loss(z, target, hp.temperature, mask)

  def ce(z):
    return losses.cross_entropy(z, labels, mask)

  def slt_loss(z_j):
    return hp.slt_ce_weight * ce(z_j) + hp.slt_kd_weight * kd(z_j, z_t)

  olds = [member(before.slts, k) for k in range(c.slkd.num_slts)]
  news = [sgd_step_by_hand(c, nets.slt, old, slt_loss, batch,
                           hp.learning_rate) for old in olds]
  for k, new in enumerate(news):  # no gradient from the student's term
    assert_trees_close(member(after.slts.params, k), new, atol=1e-6)

  def student_params(slt_params):
    fused = losses.fuse_logits(jnp.stack([
        train_logits(nets.slt, p, old.batch_stats, batch)
        for p, old in zip(slt_params, olds)]), hp.fusion_weights)

    def loss(z_s):
      return (hp.ce_weight * ce(z_s) + hp.kd_weight * kd(z_s, z_t) +
              hp.fused_weight * (hp.fused_ce_weight * ce(z_s) +
                                 hp.fused_kd_weight * kd(z_s, fused)))
    return sgd_step_by_hand(c, nets.student, before.student, loss, batch,
                            hp.learning_rate)

  assert_trees_close(after.student.params, student_params(news), atol=1e-6)
  # Learning from the SL-Ts before their update would be measurably different.
  stale = student_params([old.params for old in olds])
  assert max_abs_diff(after.student.params, stale) > 1e-4
