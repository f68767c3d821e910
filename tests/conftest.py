"""Test-wide JAX setup: 8 fake CPU devices, fast compiles.

Runs before any test module imports JAX, so the flags take effect.
"""

import importlib.metadata
import os
import re

# XLA flags for every test process; the processes tests start inherit them.
# A flag already in $XLA_FLAGS (set by CI or by the test that starts a
# process) keeps its value.
SUITE_XLA_FLAGS = {
    # Eight CPU devices let every test exercise the sharded (multi-device)
    # path.
    "xla_force_host_platform_device_count": "8",
}
if importlib.metadata.version("jaxlib").startswith("0.10."):
  # XLA:CPU's older elemental-IR emitters compile the suite's many small
  # programs about 40 % faster than its MLIR fusion emitters (measured on
  # the 2-core CI machine, jaxlib 0.10.2); results differ from the default
  # emitters' only in float rounding, and no test compares against bits
  # recorded under other flags (test_loop_golden runs its own process with
  # the flags its baselines were recorded under). Only where measured: an
  # unknown flag aborts XLA.
  SUITE_XLA_FLAGS["xla_cpu_use_fusion_emitters"] = "false"


def xla_flags(flags: str = "", **overrides) -> str:
  """``flags`` (an $XLA_FLAGS value) with ``overrides`` set (replacing a
  value given there) and every suite flag it does not set added."""
  for name, value in {**SUITE_XLA_FLAGS, **overrides}.items():
    if name in overrides or f"--{name}=" not in flags:
      flags = re.sub(rf"\s*--{name}=\S*", "", flags)
      flags = f"{flags} --{name}={value}".strip()
  return flags


os.environ["XLA_FLAGS"] = xla_flags(os.environ.get("XLA_FLAGS", ""))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compile time dominates the suite on 2 CPU cores. Also for the processes
# tests start: with full optimisations, the elemental-IR emitters above
# compile some programs far slower (a resnet8's initialisation: 42 s
# against 5 s with the default emitters, 0.8 s without the optimisations).
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"

import jax  # noqa: E402
import pytest  # noqa: E402

# Many tests build the same small programs (in this process and in the
# subprocesses they start): a persistent compilation cache shared by all of
# them turns repeat compiles into disk reads.
_CACHE = os.path.join(os.path.dirname(__file__), "..", ".jax_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
jax.config.update("jax_compilation_cache_dir",
                  os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# The slowest test files (measured with --durations on the 2-core CI
# machine), slowest first. With `-n 2 --dist loadfile --no-loadscope-reorder`
# the workers take them first and finish together, rather than one worker
# running the heaviest file alone at the end.
SLOWEST_FILES = (
    "test_train_step.py", "test_train_study.py", "test_train.py",
    "test_studies.py", "test_models.py", "test_feature_methods.py",
    "test_float64_reference.py", "test_reproducible.py", "test_teskd.py",
    "test_benchmarks.py", "test_dml.py", "test_convert_torch.py",
    "test_table.py", "test_model_features.py", "test_reviewkd.py",
    "test_kdsvd_cpu.py", "test_crd_method.py", "test_loop_golden.py",
    "test_cli.py",
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
  """Drop each file's compiled programs when it ends: a worker runs many
  files and would otherwise hold every executable (GBs); repeats still hit
  the persistent cache."""
  yield
  jax.clear_caches()
