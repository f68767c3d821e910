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
