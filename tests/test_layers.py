"""PyTorch-faithful layers: BatchNorm statistics, conv padding, initialisers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slkd_jax.models import layers


def _bn_apply(x, train, mask=None, variables=None):
  bn = layers.BatchNorm()
  if variables is None:
    variables = bn.init(jax.random.key(0), x, train=False)
  return bn.apply(variables, x, train, mask, mutable=["batch_stats"])


def test_batchnorm_train_matches_pytorch_semantics():
  rng = np.random.default_rng(0)
  x = rng.normal(2.0, 3.0, size=(4, 3, 3, 5)).astype(np.float32)
  y, updates = _bn_apply(jnp.asarray(x), train=True)
  flat = x.reshape(-1, 5).astype(np.float64)
  n = flat.shape[0]
  mean, biased = flat.mean(0), flat.var(0)
  # Normalised with the biased variance...
  np.testing.assert_allclose(
      np.asarray(y).reshape(-1, 5), (flat - mean) / np.sqrt(biased + 1e-5),
      rtol=1e-5, atol=1e-5)
  # ...running stats: momentum 0.1 and the *unbiased* variance (PyTorch).
  stats = updates["batch_stats"]
  np.testing.assert_allclose(stats["mean"], 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * biased * n / (n - 1),
                             rtol=1e-5)


def test_batchnorm_eval_uses_running_stats():
  x = jnp.arange(2 * 2 * 2 * 3, dtype=jnp.float32).reshape(2, 2, 2, 3)
  variables = {"params": {"scale": jnp.array([1.0, 2.0, 3.0]),
                          "bias": jnp.array([0.0, 1.0, -1.0])},
               "batch_stats": {"mean": jnp.array([1.0, 2.0, 3.0]),
                               "var": jnp.array([4.0, 1.0, 0.25])}}
  y, updates = _bn_apply(x, train=False, variables=variables)
  expected = ((x - variables["batch_stats"]["mean"]) /
              jnp.sqrt(variables["batch_stats"]["var"] + 1e-5) *
              variables["params"]["scale"] + variables["params"]["bias"])
  np.testing.assert_allclose(y, expected, rtol=1e-6)
  chex_equal = jax.tree.map(np.testing.assert_array_equal,
                            updates["batch_stats"], variables["batch_stats"])
  del chex_equal


def test_masked_batchnorm_equals_batchnorm_on_real_examples():
  rng = np.random.default_rng(1)
  real = jnp.asarray(rng.normal(size=(3, 4, 4, 6)), jnp.float32)
  padded = jnp.concatenate([real, 100.0 * jnp.ones((5, 4, 4, 6))])
  mask = jnp.arange(8) < 3
  y_real, s_real = _bn_apply(real, train=True)
  y_pad, s_pad = _bn_apply(padded, train=True, mask=mask)
  np.testing.assert_allclose(y_pad[:3], y_real, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5),
               s_pad, s_real)


def _numpy_conv(x, w, stride, pad):
  """Direct NHWC/HWIO convolution with symmetric zero padding (PyTorch)."""
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  k = w.shape[0]
  h_out = (x.shape[1] - k) // stride + 1
  w_out = (x.shape[2] - k) // stride + 1
  out = np.zeros((x.shape[0], h_out, w_out, w.shape[-1]))
  for i in range(h_out):
    for j in range(w_out):
      patch = x[:, i * stride:i * stride + k, j * stride:j * stride + k, :]
      out[:, i, j] = np.einsum("nhwc,hwco->no", patch, w)
  return out


@pytest.mark.parametrize("size", [6, 7])
def test_stride2_conv_pads_symmetrically_like_pytorch(size):
  rng = np.random.default_rng(2)
  x = rng.normal(size=(1, size, size, 2)).astype(np.float32)
  conv = layers.Conv(3, 3, strides=2, padding=1)
  variables = conv.init(jax.random.key(0), jnp.asarray(x))
  y = conv.apply(variables, jnp.asarray(x))
  expected = _numpy_conv(x, np.asarray(variables["params"]["kernel"]), 2, 1)
  assert y.shape == expected.shape
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_initialisers_match_pytorch_scales():
  key = jax.random.key(0)
  x = jnp.zeros((1, 8, 8, 64))
  he = layers.Conv(128, 3).init(key, x)["params"]["kernel"]
  assert float(jnp.std(he)) == pytest.approx(math.sqrt(2 / (9 * 128)), rel=0.03)
  torch_conv = layers.Conv(128, 3, use_bias=True, init_scheme="torch").init(key, x)
  bound = 1 / math.sqrt(9 * 64)
  for leaf in torch_conv["params"].values():
    assert float(jnp.max(jnp.abs(leaf))) <= bound
    assert float(jnp.max(jnp.abs(leaf))) > 0.9 * bound
  dense = layers.Linear(10, init_scheme="normal").init(key, jnp.zeros((1, 512)))
  assert float(jnp.std(dense["params"]["kernel"])) == pytest.approx(0.01,
                                                                   rel=0.05)
  np.testing.assert_array_equal(dense["params"]["bias"], 0.0)


def test_avg_pool_counts_padding_and_channel_shuffle():
  x = jnp.ones((1, 4, 4, 1))
  pooled = layers.avg_pool(x, 3, 2, 1)
  # Corner window covers 4 real pixels of 9: PyTorch's count_include_pad.
  assert float(pooled[0, 0, 0, 0]) == pytest.approx(4 / 9)
  channels = jnp.arange(6).reshape(1, 1, 1, 6)
  np.testing.assert_array_equal(layers.channel_shuffle(channels, 2)[0, 0, 0],
                                [0, 3, 1, 4, 2, 5])
