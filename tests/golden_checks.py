"""Helpers the golden-value tests share: NCHW ↔ NHWC, and comparing an array
with the summary (norm, sum, a few entries) a generator script in
``tests/goldens/`` recorded from the reference implementation."""

import jax.numpy as jnp
import numpy as np

RTOL = 1e-9


def nhwc(x):
  """A PyTorch NCHW array as a JAX NHWC array."""
  return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


def nchw(g):
  """A JAX NHWC array (a gradient) in PyTorch's NCHW layout."""
  return np.transpose(np.asarray(g), (0, 3, 1, 2))


def assert_close(value, ref, scale=0.0):
  """``|value − ref| ≤ RTOL · max(|ref|, scale)``."""
  tol = RTOL * max(abs(ref), scale)
  assert abs(float(value) - ref) <= tol, (float(value), ref, tol)


def check_tensor(g, ref):
  """``g`` (in PyTorch's layout) against a golden summary: its norm, its
  sum and the recorded entries, relative to the norm."""
  g = np.asarray(g)
  assert np.all(np.isfinite(g))
  assert_close(np.sqrt(np.sum(g * g)), ref["norm"])
  assert_close(np.sum(g), ref["sum"], ref["norm"])
  for idx, value in ref["entries"]:
    assert_close(g[tuple(idx)], value, ref["norm"])
