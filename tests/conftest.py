"""Test-wide JAX setup: 8 fake CPU devices, fast compiles.

Runs before any test module imports JAX, so the flags take effect.
"""

import os

# Eight CPU devices let every test exercise the sharded (multi-device) path.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Compile time dominates the suite on 2 CPU cores; numerics are unaffected.
jax.config.update("jax_disable_most_optimizations", True)
