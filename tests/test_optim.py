"""The reference optimiser: PyTorch SGD semantics and the step schedule."""

import jax.numpy as jnp
import numpy as np
import pytest

from slkd_jax import optim


def test_sgd_matches_pytorch_on_a_quadratic():
  """f(w) = ½·a·w²: PyTorch SGD(lr, momentum=m, weight_decay=wd), by hand:
  g = a·w + wd·w; buf = g (first step) else m·buf + g; w -= lr·buf."""
  a, lr, m, wd = 3.0, 0.1, 0.9, 0.01
  tx = optim.sgd_direction(weight_decay=wd, momentum=m)
  params = {"w": jnp.asarray([2.0, -1.0])}
  state = tx.init(params)
  w, buf = np.array([2.0, -1.0]), None
  for _ in range(5):
    grads = {"w": a * params["w"]}
    direction, state = tx.update(grads, state, params)
    params = optim.apply_sgd(params, direction, jnp.asarray(lr))
    g = a * w + wd * w
    buf = g if buf is None else m * buf + g
    w = w - lr * buf
    np.testing.assert_allclose(params["w"], w, rtol=1e-6)


@pytest.mark.parametrize("epoch, expected", [
    (1, 0.05), (150, 0.05), (151, 0.005), (180, 0.005), (181, 0.0005),
    (211, 0.00005), (240, 0.00005)])
def test_step_schedule_cifar(epoch, expected):
  assert optim.learning_rate(0.05, epoch, (150, 180, 210), 0.1) == (
      pytest.approx(expected))


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_torch_optim_sgd(nesterov):
  """A few steps against ``torch.optim.SGD(momentum, weight_decay,
  nesterov)`` itself on f(w) = Σ a·w² + b·w (torch in float64)."""
  torch = pytest.importorskip("torch")
  a = np.array([[3.0, 0.5, -1.0], [2.0, 1.5, 0.25]])
  b = np.array([[0.1, -0.2, 0.3], [-0.4, 0.5, -0.6]])
  w0 = np.array([[2.0, -1.0, 0.5], [0.3, -0.7, 1.1]])
  lr, m, wd = 0.1, 0.9, 5e-4
  w_t = torch.tensor(w0, dtype=torch.float64, requires_grad=True)
  opt = torch.optim.SGD([w_t], lr=lr, momentum=m, weight_decay=wd,
                        nesterov=nesterov)
  tx = optim.sgd_direction(wd, m, nesterov=nesterov)
  params = {"w": np.asarray(w0)}
  state = tx.init(params)
  for _ in range(4):
    opt.zero_grad()
    loss = (torch.tensor(a) * w_t**2 + torch.tensor(b) * w_t).sum()
    loss.backward()
    opt.step()
    grads = {"w": 2 * a * params["w"] + b}
    direction, state = tx.update(grads, state, params)
    params = optim.apply_sgd(params, direction, np.float64(lr))
    np.testing.assert_allclose(np.asarray(params["w"]),
                               w_t.detach().numpy(), rtol=1e-6, atol=1e-7)


def test_nesterov_differs_from_heavy_ball():
  """The switch changes the update (a test of the wiring, not the rule)."""
  grads, params = {"w": jnp.asarray([1.0])}, {"w": jnp.asarray([0.0])}
  plain, nest = optim.sgd_direction(0.0, 0.9), optim.sgd_direction(
      0.0, 0.9, nesterov=True)
  d_plain, _ = plain.update(grads, plain.init(params), params)
  d_nest, _ = nest.update(grads, nest.init(params), params)
  assert float(d_plain["w"][0]) == 1.0
  assert float(d_nest["w"][0]) == pytest.approx(1.9)
