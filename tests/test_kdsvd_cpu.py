"""A KDSVD run finishes on a 2-core CPU.

jaxlib's CPU SVD splits its batch into chunks on XLA's intra-op thread pool
and blocks until they are done; with every pool thread blocked (in an SVD,
or at a collective waiting for a device that is) the run used to hang for
ever, all threads in futex wait. The command line sizes the pool for it
(``parallel.configure_jax``); these runs are pinned to 2 CPUs, as on a
2-core machine, and must end.
"""

import os
import subprocess
import sys

import pytest

from slkd_jax import parallel
from slkd_jax import config as config_lib

from test_train import REPO, _cli_env

pytestmark = pytest.mark.slow

# 2 steps of 64 examples: 8 per device on 8 devices, enough for the SVD to
# split its batch over the pool (a per-device batch of 2 runs inline).
_FLAGS = ("--config=configs/cifar100.py", "--config.method=kdsvd",
          "--config.data.name=synthetic", "--config.data.image_size=8",
          "--config.data.num_classes=5", "--config.data.num_train=128",
          "--config.data.num_test=64", "--config.batch_size=64",
          "--config.eval_batch_size=64", "--config.teacher.arch=resnet8",
          "--config.teacher.num_epochs=1", "--config.student.arch=resnet8",
          "--config.num_epochs=1", "--config.log_every_steps=1")


@pytest.mark.parametrize("devices", [1, 8])
def test_a_kdsvd_run_finishes_on_two_cpus(tmp_path, devices):
  available = sorted(os.sched_getaffinity(0))
  if len(available) < 2:
    pytest.skip("needs 2 CPUs")
  env = _cli_env(devices)
  for name in ("PJRT_NPROC", "NPROC"):  # the command line sizes the pool
    env.pop(name, None)
  try:
    out = subprocess.run(
        [sys.executable, "-m", "slkd_jax.main", *_FLAGS,
         f"--workdir={tmp_path}"], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=480,
        preexec_fn=lambda: os.sched_setaffinity(0, available[:2]))
  except subprocess.TimeoutExpired:  # the child is killed
    pytest.fail(f"a kdsvd run on {devices} device(s) and 2 CPUs hung")
  assert out.returncode == 0, out.stderr[-3000:]
  assert os.path.exists(tmp_path / "kdsvd" / "final_model")


def test_only_runs_with_a_lapack_method_get_a_larger_pool(monkeypatch):
  monkeypatch.setattr(os, "environ", {
      "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  config = config_lib.base_config()
  parallel.configure_jax(config)
  # The machine's CPUs (whatever the affinity), at least one per device.
  assert int(os.environ["PJRT_NPROC"]) == max(os.cpu_count(), 8)
  del os.environ["PJRT_NPROC"]
  config.compare_with = ("kdsvd",)
  parallel.configure_jax(config)
  assert int(os.environ["PJRT_NPROC"]) == os.cpu_count() + 64
  os.environ["PJRT_NPROC"] = "3"  # the launcher's choice stands
  parallel.configure_jax(config)
  assert os.environ["PJRT_NPROC"] == "3"
