"""Losses against hand-computed values and the worked example of
docs/method.md §2 (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slkd_jax import losses, methods

# docs/method.md §2, worked example.
Z_S = [[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]]
Z_T = [[2.0, 1.0, 0.0], [1.0, 1.0, 3.0]]
Z_1 = [[0.0, 0.5, 1.0], [2.0, 0.0, -1.0]]
Z_2 = [[1.0, -1.0, 0.0], [0.0, 1.0, 1.0]]
Y = [2, 0]
WEIGHTS = dict(temperature=4.0, ce_weight=0.1, kd_weight=0.9, fused_weight=1.0,
               fused_ce_weight=1.0, fused_kd_weight=1.0)


@pytest.fixture(autouse=True)
def float64():
  with jax.enable_x64(True):
    yield


def f64(x):
  return jnp.asarray(x, jnp.float64)


def labels():
  return jnp.asarray(Y, jnp.int32)


def test_cross_entropy_by_hand():
  z = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
  expected = np.mean([np.log(np.exp(z[0]).sum()) - z[0, 2],
                      np.log(np.exp(z[1]).sum()) - z[1, 0]])
  assert float(losses.cross_entropy(f64(z), labels())) == pytest.approx(
      expected, abs=1e-12)


def test_kd_loss_by_hand():
  t = 2.0
  zs, zt = np.array(Z_S), np.array(Z_T)
  softmax = lambda z: np.exp(z) / np.exp(z).sum(-1, keepdims=True)  # noqa
  ps, pt = softmax(zs / t), softmax(zt / t)
  expected = t**2 * np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), -1))
  assert float(losses.kd_loss(f64(zs), f64(zt), t)) == pytest.approx(
      expected, abs=1e-12)


def test_kd_loss_zero_target_probability_contributes_zero():
  # A -inf teacher logit has probability exactly 0: 0·log 0 must be 0, not NaN.
  zt = f64([[0.0, -jnp.inf, 1.0]])
  zs = f64([[0.3, 0.2, 0.1]])
  value = losses.kd_loss(zs, zt, 1.0)
  pt = np.array([1.0, 0.0, np.e]) / (1 + np.e)
  ps = np.exp([0.3, 0.2, 0.1]) / np.exp([0.3, 0.2, 0.1]).sum()
  expected = pt[0] * np.log(pt[0] / ps[0]) + pt[2] * np.log(pt[2] / ps[2])
  assert float(value) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("fn, args, expected", [
    ("cross_entropy", (Z_S,), 1.0744586306),
    ("cross_entropy", (Z_1,), 0.4250578451),
    ("cross_entropy", (Z_2,), 1.6348003843),
    ("kd", (Z_S, Z_T, 4.0), 0.7384603938),
    ("kd", (Z_1, Z_T, 4.0), 1.4852558605),
    ("kd", (Z_2, Z_T, 4.0), 0.3211710698),
    ("kd", (Z_S, Z_T, 1.0), 0.6027203926),
])
def test_worked_example_terms(fn, args, expected):
  if fn == "cross_entropy":
    value = losses.cross_entropy(f64(args[0]), labels())
  else:
    value = losses.kd_loss(f64(args[0]), f64(args[1]), args[2])
  assert float(value) == pytest.approx(expected, abs=1e-9)


def test_fusion_and_kd_to_fused_target():
  fused = losses.fuse_logits(f64([Z_1, Z_2]), f64([0.5, 0.5]))
  np.testing.assert_allclose(fused, 0.5 * (np.array(Z_1) + np.array(Z_2)))
  assert float(losses.kd_loss(f64(Z_S), fused, 4.0)) == pytest.approx(
      0.7247611323, abs=1e-9)


def _total_loss(z_s, z_1, z_2, detach):
  slt_logits = jnp.stack([z_1, z_2])
  fused = losses.fuse_logits(slt_logits, f64([0.5, 0.5]))
  student, _ = losses.slkd_student_loss(z_s, f64(Z_T), fused, labels(),
                                        detach_fused_target=detach, **WEIGHTS)
  slts, _ = losses.slt_loss(slt_logits, f64(Z_T), labels(), temperature=4.0,
                            ce_weight=0.1, kd_weight=0.9)
  return student + slts


def test_worked_example_total_loss():
  for detach in (False, True):  # detaching changes gradients, not the value
    total = _total_loss(f64(Z_S), f64(Z_1), f64(Z_2), detach)
    assert float(total) == pytest.approx(4.403050041, abs=1e-8)


@pytest.mark.parametrize("detach, expected_dz1", [
    (False, [[-0.110753, -0.014290, 0.125043],
             [0.402285, 0.153608, -0.555893]]),
    (True, [[-0.218545, 0.024554, 0.193990],
            [0.364710, 0.037547, -0.402257]]),
])
def test_worked_example_gradients(detach, expected_dz1):
  grads = jax.grad(_total_loss, argnums=(0, 1))(f64(Z_S), f64(Z_1), f64(Z_2),
                                                 detach)
  np.testing.assert_allclose(grads[1], expected_dz1, atol=1e-6)
  np.testing.assert_allclose(
      grads[0], [[-0.445806, 0.201505, 0.244301],
                 [-0.489114, -0.303872, 0.792986]], atol=1e-6)


def test_teacher_receives_no_gradient():
  def loss_of_teacher(z_t):
    student, _ = losses.slkd_student_loss(
        f64(Z_S), z_t, f64(Z_1), labels(), **WEIGHTS)
    slts, _ = losses.slt_loss(f64([Z_1, Z_2]), z_t, labels(), temperature=4.0,
                              ce_weight=0.1, kd_weight=0.9)
    return student + slts
  np.testing.assert_array_equal(jax.grad(loss_of_teacher)(f64(Z_T)), 0.0)


def test_slt_gradient_coupling_through_the_fused_target():
  """Reference: SL-T 1's gradient depends on SL-T 2's logits (through z_c);
  detached (paper): it does not."""
  def grad_z1(z_2, detach):
    return jax.grad(_total_loss, argnums=1)(f64(Z_S), f64(Z_1), z_2, detach)
  z_2_moved = f64(Z_2) + f64([[3.0, -2.0, 1.0], [0.0, 2.0, -1.0]])
  np.testing.assert_array_equal(grad_z1(f64(Z_2), True),
                                grad_z1(z_2_moved, True))
  assert np.max(np.abs(grad_z1(f64(Z_2), False) -
                       grad_z1(z_2_moved, False))) > 1e-2


def test_dkd_worked_example():
  zs, zt = f64(Z_S), f64(Z_T)
  assert float(losses.dkd_loss(zs, zt, labels(), 1.0, 8.0, 4.0)) == (
      pytest.approx(2.9604175056, abs=1e-9))
  assert float(losses.dkd_loss(zs, zt, labels(), 1.0, 1.0, 1.0)) == (
      pytest.approx(0.6256987869, abs=1e-9))


def test_mask_gives_the_loss_of_the_real_examples():
  zs, zt = f64(Z_S), f64(Z_T)
  padded_s = jnp.concatenate([zs, f64([[9.0, -9.0, 0.0]])])
  padded_t = jnp.concatenate([zt, f64([[-5.0, 5.0, 0.0]])])
  padded_y = jnp.asarray([2, 0, 1], jnp.int32)
  mask = jnp.asarray([True, True, False])
  assert float(losses.cross_entropy(padded_s, padded_y, mask)) == (
      pytest.approx(float(losses.cross_entropy(zs, labels())), abs=1e-12))
  assert float(losses.kd_loss(padded_s, padded_t, 4.0, mask)) == (
      pytest.approx(float(losses.kd_loss(zs, zt, 4.0)), abs=1e-12))
  assert float(losses.dkd_loss(padded_s, padded_t, padded_y, 1.0, 8.0, 4.0,
                               mask)) == pytest.approx(2.9604175056, abs=1e-9)


def test_shape_checks_reject_bad_inputs():
  with pytest.raises(AssertionError):
    losses.cross_entropy(f64(Z_S), jnp.asarray([0, 1, 2]))
  with pytest.raises(AssertionError):
    losses.fuse_logits(f64([Z_1, Z_2]), f64([1.0]))


# ---------------------------------------------------------------------------
# The method table's student objectives on the worked example.


def hparams(**overrides):
  """float64 :class:`methods.HParams`: the CIFAR SLKD weights (K = 2) and
  DKD's defaults unless overridden."""
  values = dict(learning_rate=0.05, ce_weight=0.1, kd_weight=0.9,
                temperature=4.0, fused_weight=1.0, fused_ce_weight=1.0,
                fused_kd_weight=1.0, slt_ce_weight=0.1, slt_kd_weight=0.9,
                fusion_weights=[0.5, 0.5], dkd_alpha=1.0, dkd_beta=8.0,
                dkd_warmup_factor=1.0, feat_weight=0.0, epoch=1.0, seed=0.0)
  values.update(overrides)
  return methods.HParams(**{k: f64(v) for k, v in values.items()})


def objective(method, z_s, z_t, hp):
  """``method``'s student loss on the worked example's SL-Ts and labels."""
  slts = f64([Z_1, Z_2])
  logits = methods.Logits(z_s, z_t, slts,
                          losses.fuse_logits(slts, hp.fusion_weights))
  return methods.get(method).objective(
      logits, {"label": labels(), "mask": None}, hp, methods.Context()).value


def test_dkd_objective_scales_dkd_by_the_warmup_factor():
  """Epoch 1 of a 20-epoch warm-up: CE + 0.05·DKD, not CE + DKD."""
  hp = hparams(ce_weight=1.0, dkd_warmup_factor=0.05)
  assert float(objective("dkd", f64(Z_S), f64(Z_T), hp)) == pytest.approx(
      1.0744586306 + 0.05 * 2.9604175056, abs=1e-9)


def test_slt_only_objective_has_no_teacher_term():
  """``slkd_slt_only``: (w_ce + w_p·w_ce_cs)·CE + w_p·w_kd_cs·KD_4(z_s, z_c),
  so its gradient does not depend on the teacher's logits; ``slkd``'s
  does."""
  hp = hparams()
  assert float(objective("slkd_slt_only", f64(Z_S), f64(Z_T), hp)) == (
      pytest.approx(1.1 * 1.0744586306 + 0.7247611323, abs=1e-9))
  assert float(objective("slkd", f64(Z_S), f64(Z_T), hp)) == pytest.approx(
      1.1 * 1.0744586306 + 0.9 * 0.7384603938 + 0.7247611323, abs=1e-9)
  z_t_moved = f64(Z_T) + f64([[3.0, -2.0, 1.0], [0.0, 2.0, -1.0]])

  def grad_z_s(method, z_t):
    return jax.grad(objective, argnums=1)(method, f64(Z_S), z_t, hp)

  np.testing.assert_array_equal(grad_z_s("slkd_slt_only", f64(Z_T)),
                                grad_z_s("slkd_slt_only", z_t_moved))
  assert np.max(np.abs(grad_z_s("slkd", f64(Z_T)) -
                       grad_z_s("slkd", z_t_moved))) > 1e-2
