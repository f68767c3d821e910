"""DML (deep mutual learning): the objective against numpy and a hand-worked
value, the two update orders against independently computed SGD steps,
vmap == unrolled, 1 vs 8 devices, config/presets and one stage end to end.

No reference implementation is run: the expected numbers are derived here
(numpy / closed forms, float64), independently of slkd_jax.methods.dml."""

import importlib.util
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slkd_jax import config as config_lib
from slkd_jax import config_checks
from slkd_jax import errors, methods, parallel, train, train_step
from slkd_jax import stage as stage_lib
from slkd_jax import state as state_lib
from slkd_jax.methods import dml

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def tiny_config(order="sequential", num_peers=2, ensemble="unrolled",
                dtype="float64"):
  c = config_lib.base_config()
  c.method = "dml"
  c.dtype = dtype
  c.student.arch = c.teacher.arch = "resnet8"
  c.data.num_classes = 5
  c.data.image_size = 8
  c.dml.num_peers = num_peers
  c.dml.update_order = order
  c.slkd.ensemble = ensemble
  c.optim.learning_rate = 0.1
  config_checks.validate(c)
  return config_lib.stage_config(c, "dml")


def tiny_batch(n=12, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(n, 8, 8, 3)),
          "label": rng.integers(0, 5, n).astype(np.int32),
          "mask": np.ones(n, bool)}


def hparams(temperature=1.0, ce_weight=1.0, kd_weight=1.0):
  f = jnp.float64
  return methods.HParams(*[jnp.asarray(0.0, f)] * 16).replace(
      temperature=jnp.asarray(temperature, f),
      ce_weight=jnp.asarray(ce_weight, f), kd_weight=jnp.asarray(kd_weight, f))


# ---------------------------------------------------------------------------
# The objective.


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def numpy_peer_loss(z, others, labels, t, w_ce, w_kd):
  """L_k and dL_k/dz_k derived by hand: d CE/dz = (p − y)/B and
  d T²·KL(q_j ‖ q_k)/dz = T·(q_k − q_j)/B with q = softmax(z/T)."""
  b = z.shape[0]
  y = np.eye(z.shape[1])[labels]
  p = _softmax(z)
  ce = -np.mean(np.log(p[np.arange(b), labels]))
  q = _softmax(z / t)
  kls, grad_kl = [], np.zeros_like(z)
  for zj in others:
    qj = _softmax(zj / t)
    kls.append(t**2 * np.mean(np.sum(qj * (np.log(qj) - np.log(q)), -1)))
    grad_kl += t * (q - qj) / b
  kl = np.mean(kls)
  loss = w_ce * ce + w_kd * kl
  grad = w_ce * (p - y) / b + w_kd * grad_kl / len(others)
  return loss, ce, kl, grad


def test_hand_worked_value():
  # z_k = (0, 0), target z_j = (log 3, 0): p_j = (3/4, 1/4), p_k = (1/2, 1/2).
  # CE(label 0) = log 2; KL = 3/4 log(3/2) + 1/4 log(1/2) = 0.1308120...
  with jax.enable_x64(True):
    loss, terms = dml.peer_loss(jnp.zeros((1, 2), jnp.float64),
                                jnp.asarray([[[np.log(3.0), 0.0]]]),
                                jnp.asarray([0]), hparams())
  np.testing.assert_allclose(terms["ce"], np.log(2.0), rtol=1e-14)
  np.testing.assert_allclose(terms["kl_peers"], 0.130812035941137, rtol=1e-12)
  np.testing.assert_allclose(loss, np.log(2.0) + 0.130812035941137,
                             rtol=1e-12)


@pytest.mark.parametrize("t,w_ce,w_kd", [(1.0, 1.0, 1.0), (2.0, 0.5, 3.0)])
def test_objective_and_gradient_match_numpy(t, w_ce, w_kd):
  rng = np.random.default_rng(1)
  z = rng.normal(size=(4, 6)) * 2
  others = rng.normal(size=(2, 4, 6)) * 2  # K = 3: two targets
  labels = rng.integers(0, 6, 4)
  want_loss, want_ce, want_kl, want_grad = numpy_peer_loss(
      z, others, labels, t, w_ce, w_kd)
  with jax.enable_x64(True):
    hp = hparams(t, w_ce, w_kd)
    fn = lambda z, o: dml.peer_loss(z, o, jnp.asarray(labels), hp)  # noqa
    (loss, terms), (grad, grad_targets) = jax.value_and_grad(
        fn, argnums=(0, 1), has_aux=True)(jnp.asarray(z), jnp.asarray(others))
  np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
  np.testing.assert_allclose(terms["ce"], want_ce, rtol=1e-12)
  np.testing.assert_allclose(terms["kl_peers"], want_kl, rtol=1e-12)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-10, atol=1e-15)
  # The other peers are targets: no gradient reaches them.
  np.testing.assert_array_equal(grad_targets, 0.0)


# ---------------------------------------------------------------------------
# The two update orders against SGD steps computed here.


def _forward(model, params, stats, images):
  out, upd = model.apply({"params": params, "batch_stats": stats}, images,
                         train=True, mask=jnp.ones(images.shape[0], bool),
                         mutable=["batch_stats"])
  return out, upd["batch_stats"]


def _ce_kl(logits, target, labels):
  """CE + KL(softmax(target) ‖ softmax(logits)), written out here."""
  log_p = jax.nn.log_softmax(logits)
  ce = -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], -1))
  log_q = jax.nn.log_softmax(target)
  kl = jnp.mean(jnp.sum(jnp.exp(log_q) * (log_q - log_p), -1))
  return ce + kl, kl


def _first_sgd_step(params, grads, c):
  # PyTorch SGD, first step: buf = g + wd·w; w ← w − lr·buf.
  lr, wd = c.optim.learning_rate, c.optim.weight_decay
  return jax.tree.map(lambda w, g: w - lr * (g + wd * w), params, grads)


def _one_step(c, batch):
  mesh = parallel.make_mesh(jax.devices()[:1])
  state = state_lib.create_state(stage_lib.resolve(c), mesh)
  old = jax.device_get(state)
  step = train_step.make_train_step(stage_lib.resolve(c), mesh)
  new, m = step(state, parallel.host_local_to_global(batch, mesh),
                stage_lib.resolve(c).hparams(1))
  return old, jax.device_get(new), jax.device_get(m)


def test_sequential_peer_learns_from_updated_predecessor():
  batch = tiny_batch()
  with jax.enable_x64(True):
    c = tiny_config("sequential")
    nets = stage_lib.resolve(c).nets
    old, seq, m_seq = _one_step(c, batch)
    _, sim, m_sim = _one_step(tiny_config("simultaneous"), batch)
    images, labels = jnp.asarray(batch["image"]), jnp.asarray(batch["label"])
    p0, s0 = old.student.params, old.student.batch_stats
    p1 = jax.tree.map(lambda x: x[0], old.slts.params)
    s1 = jax.tree.map(lambda x: x[0], old.slts.batch_stats)
    z0_old, stats0 = _forward(nets.student, p0, s0, images)
    z1_old, stats1 = _forward(nets.slt, p1, s1, images)

    def grad(model, params, stats, target):
      return jax.grad(lambda p: _ce_kl(_forward(model, p, stats, images)[0],
                                       target, labels)[0])(params)

    new0 = _first_sgd_step(p0, grad(nets.student, p0, s0, z1_old), c)
    z0_new, _ = _forward(nets.student, new0, s0, images)
    new1_seq = _first_sgd_step(p1, grad(nets.slt, p1, s1, z0_new), c)
    new1_sim = _first_sgd_step(p1, grad(nets.slt, p1, s1, z0_old), c)
    kl_seq = _ce_kl(z1_old, z0_new, labels)[1]
    kl_sim = _ce_kl(z1_old, z0_old, labels)[1]

  close = lambda a, b: jax.tree.map(  # noqa: E731
      lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12),
      a, b)
  # Peer 0 learns from peer 1's old prediction in both orders.
  close(seq.student.params, new0)
  close(sim.student.params, new0)
  # Peer 1: from peer 0's updated prediction (sequential) or its old one.
  close(jax.tree.map(lambda x: x[0], seq.slts.params), new1_seq)
  close(jax.tree.map(lambda x: x[0], sim.slts.params), new1_sim)
  np.testing.assert_allclose(m_seq["peer_1/kl_peers"], kl_seq, rtol=1e-10)
  np.testing.assert_allclose(m_sim["peer_1/kl_peers"], kl_sim, rtol=1e-10)
  assert abs(float(kl_seq) - float(kl_sim)) > 1e-4  # the orders do differ
  # Running statistics moved once per peer: one train-mode forward of the
  # pre-step parameters (the recomputed prediction leaves them alone).
  for got in (seq, sim):
    close(got.student.batch_stats, stats0)
    close(jax.tree.map(lambda x: x[0], got.slts.batch_stats), stats1)
  assert int(seq.student.step) == 1 and list(seq.slts.step) == [1]


# ---------------------------------------------------------------------------
# Implementations and devices.


def test_vmap_equals_unrolled_with_three_peers():
  # The simultaneous step applies the stacked peers with apply_ensemble;
  # the sequential one applies them one by one whatever slkd.ensemble says.
  batch = tiny_batch(seed=3)
  with jax.enable_x64(True):
    _, a, ma = _one_step(tiny_config("simultaneous", 3, "vmap"), batch)
    _, b, mb = _one_step(tiny_config("simultaneous", 3, "unrolled"), batch)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-10,
                                                       atol=1e-13), a, b)
  assert set(ma) == set(mb) >= {"peer_2/ce", "peer_2/kl_peers", "peer_2/acc",
                                "student/ce", "student/kl_peers", "loss"}
  assert a.slts.step.shape == (2,)


def _one_and_eight(c, batch, num_steps=1):
  """The state and metrics after ``num_steps`` on 1 and on 8 devices."""
  results = []
  for mesh in (parallel.make_mesh(jax.devices()[:1]), parallel.make_mesh()):
    state = state_lib.create_state(stage_lib.resolve(c), mesh)
    step = train_step.make_train_step(stage_lib.resolve(c), mesh)
    hp = stage_lib.resolve(c).hparams(1)
    for _ in range(num_steps):
      state, m = step(state, jax.device_put(
          batch, parallel.batch_sharding(mesh)), hp)
    results.append((jax.device_get(state), jax.device_get(m)))
  (one, m1), (eight, m8) = results
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9,
                                                       atol=1e-12), one, eight)
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-10)


# float64, so the all-reduce's other summation order cannot hide a real
# difference: BatchNorm and the losses must see the global batch.
@pytest.mark.parametrize("order", ["sequential", "simultaneous"])
def test_one_and_eight_devices_agree(order):
  with jax.enable_x64(True):
    _one_and_eight(tiny_config(order), tiny_batch(16, seed=5), num_steps=2)


# ---------------------------------------------------------------------------
# Config, presets and a stage end to end.


def test_networks_and_state_have_no_teacher():
  c = tiny_config(num_peers=3, dtype="float32")
  nets = stage_lib.resolve(c).nets
  assert nets.teacher is None and nets.num_slts == 2
  assert stage_lib.resolve(c).fusion_weights == ()
  state = state_lib.create_state(stage_lib.resolve(c), parallel.make_mesh())
  assert state.teacher is None
  kernels = [k for k in jax.tree.leaves(state.slts.params) if k.ndim == 5]
  assert kernels and all(k.shape[0] == 2 for k in kernels)
  assert np.max(np.abs(kernels[0][0] - kernels[0][1])) > 1e-3  # own inits
  settings = methods.loss_settings(c)
  assert (settings.temperature, settings.ce_weight, settings.kd_weight) == (
      1.0, 1.0, 1.0)


@pytest.mark.parametrize("key,value", [("dml.num_peers", 1),
                                       ("dml.update_order", "alternate"),
                                       ("slkd.ensemble", "x")])
def test_validation_names_the_bad_key(key, value):
  c = config_lib.base_config()
  c.method = "dml"
  section, leaf = key.split(".")
  c[section][leaf] = value
  with pytest.raises(errors.ConfigError, match=key.replace(".", r"\.")):
    config_checks.validate(c)


def _cifar():
  spec = importlib.util.spec_from_file_location("slkd_test_dml_cifar100",
                                                CONFIGS / "cifar100.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("arg,peer0,peer1,method", [
    ("resnet32-resnet32", "resnet32", "resnet32", "dml"),
    ("resnet32-resnet32,ce", "resnet32", "resnet32", "ce"),
    ("resnet32x4-ShuffleV2,dml", "ShuffleV2", "resnet32x4", "dml")])
def test_dml_presets(arg, peer0, peer1, method):
  c = _cifar().get_config(arg)
  config_checks.validate(c)
  assert (c.method, c.student.arch, c.teacher.arch) == (method, peer0, peer1)
  # The DML paper's CIFAR-100 recipe (docs/dml.md).
  assert (c.optim.learning_rate, c.optim.momentum, c.batch_size,
          c.num_epochs) == (0.1, 0.9, 64, 200)
  assert tuple(c.optim.decay_epochs) == (60, 120, 180)
  assert c.optim.decay_rate == 0.1
  assert (c.dml.num_peers, c.dml.update_order) == (2, "sequential")
  with pytest.raises(errors.ConfigError, match="dml or ce"):
    _cifar().get_config("resnet32-resnet32,kd")


def test_stage_runs_end_to_end_and_reports_every_peer(tmp_path):
  c = config_lib.base_config()
  c.method = "dml"
  c.data.name = "synthetic"
  c.data.image_size = 8
  c.data.num_classes = 5
  c.data.num_train = 40
  c.data.num_test = 20
  c.batch_size = c.eval_batch_size = 16
  c.student.arch = c.teacher.arch = "resnet8"
  c.num_epochs = 1
  results = train.run(c, str(tmp_path))
  assert list(results) == ["dml"]  # no teacher stage
  assert not os.path.exists(tmp_path / "frozen_teacher")
  last = results["dml"].history[-1]
  for net in ("student", "peer_1"):
    assert 0 <= last[f"{net}/top1"] <= last[f"{net}/top5"] <= 100
  assert not any(k.startswith(("teacher", "slt")) for k in last)
  summary = (tmp_path / "dml" / "summary.md").read_text()
  assert "| student" in summary and "| peer_1" in summary
