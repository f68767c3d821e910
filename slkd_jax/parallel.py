"""Device mesh, shardings and multi-process helpers, all in one place.

One SPMD program: a 1-D ``Mesh`` over every device of every process with the
axis ``data``. Batches are sharded on ``data``; model and optimizer state are
replicated. Under ``jax.jit`` XLA inserts the collectives (gradient
all-reduce, BatchNorm statistics of the global batch), so results do not
depend on the device or process count.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh ``('data',)`` over ``devices`` (default: all global devices).

  Built with ``Mesh`` and an ``Auto`` axis rather than ``jax.make_mesh``,
  whose Explicit default and multi-slice check do not fit a pure
  data-parallel program on multi-node GPU jobs.
  """
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of a value held whole on every device (state, scalars)."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch: leading axis split over ``data``."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_global_batch(global_batch: int, mesh: Mesh, what: str = "batch_size"
                       ) -> None:
  """Raise a clear error unless the batch splits evenly over devices and
  processes."""
  n_dev, n_proc = mesh.size, jax.process_count()
  if global_batch % n_dev or global_batch % n_proc:
    from slkd_jax.errors import ConfigError
    raise ConfigError(
        f"config.{what}={global_batch} must be divisible by the number of devices "
        f"({n_dev}) and processes ({n_proc}); choose a multiple of {n_dev}.")


def host_local_to_global(tree: Any, mesh: Mesh) -> Any:
  """Assemble per-process batch slices into global arrays sharded on ``data``.

  Each process passes its own ``global_batch / process_count`` examples (numpy
  arrays with the leading batch axis); the result is one global ``jax.Array``
  per leaf. On a single process this is a sharded ``device_put``.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      tree)


def global_to_host(tree: Any) -> Any:
  """Fetch (replicated or fully addressable) arrays to numpy on this host.

  Sharded arrays spanning several processes are first made replicated with
  ``process_allgather``.
  """
  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(fetch, tree)


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
  """Start ``jax.distributed`` when this is one of several processes.

  Explicit arguments win; otherwise the ``SLKD_COORDINATOR``,
  ``SLKD_NUM_PROCESSES`` and ``SLKD_PROCESS_ID`` environment variables (set by
  ``launch/local.sh``); otherwise SLURM is auto-detected by JAX when
  ``SLURM_NTASKS`` > 1. Returns whether distributed mode was initialised.
  Must run before anything touches a device.
  """
  coordinator_address = coordinator_address or os.environ.get(
      "SLKD_COORDINATOR")
  if num_processes is None and "SLKD_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["SLKD_NUM_PROCESSES"])
  if process_id is None and "SLKD_PROCESS_ID" in os.environ:
    process_id = int(os.environ["SLKD_PROCESS_ID"])
  if coordinator_address:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()  # SLURM cluster auto-detection.
    return True
  return False


def sync_processes(name: str) -> None:
  """Barrier across processes (no-op on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


# XLA:CPU's YNNPACK reduce fusion splits reductions (BatchNorm statistics,
# loss means) one way on one thread and another on several, so a process
# that sees one CPU computed other numbers than one that sees two. XLA's own
# reduction loops give the same bits on any CPU count (CPU steps ~5-10%
# slower, measured on the quickstart; GPUs are unaffected). XLA:CPU also
# splits work by the size of its intra-op thread pool, which it sizes by the
# CPUs the process may use: on an AMD EPYC machine a process pinned to one
# CPU computed other numbers than one with two from the fourth step on.
# :func:`configure_jax` therefore sizes the pool by the machine's CPUs
# (``$PJRT_NPROC``), whatever the process's affinity.
CPU_DETERMINISM_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-reduce",)


def _add_xla_flag(flag: str) -> None:
  current = os.environ.get("XLA_FLAGS", "")
  if flag.split("=")[0] not in current:
    os.environ["XLA_FLAGS"] = f"{current} {flag}".strip()


# jaxlib's CPU LAPACK kernels (jaxlib/cpu/lapack_kernels.cc, ParallelBatchMap;
# KDSVD's SVD is one) split a batch into chunks, schedule them on XLA's
# intra-op thread pool and block that thread until the chunks are done. Each
# device's program runs on the same pool, sized max(CPUs, devices): when every
# pool thread waits in an SVD (or at a collective for a device that does),
# no thread is left to run the chunks, and the run hangs with every thread in
# futex wait (8 CPU devices on 2 cores, and a 2-thread pool on 2 cores). The
# pool's size is read from $PJRT_NPROC when the CPU backend starts; threads
# beyond the cores mostly wait, so a run with such a method gets a thread
# for each LAPACK call every device can have in flight (KDSVD: two per
# distilled feature map, at most 8) and the cores on top.
LAPACK_METHODS = ("kdsvd",)
LAPACK_POOL_THREADS_PER_DEVICE = 8


def _cpu_device_count() -> int:
  """The CPU devices XLA will create (``--xla_force_host_platform_device_
  count`` or ``jax_num_cpu_devices``; 1 by default)."""
  forced = re.search(r"--xla_force_host_platform_device_count=(\d+)",
                     os.environ.get("XLA_FLAGS", ""))
  configured = jax.config.jax_num_cpu_devices
  return max(int(forced.group(1)) if forced else 1,
             configured if configured and configured > 0 else 1)


def cpu_pool_size(config) -> int:
  """The size of XLA:CPU's intra-op pool for a run of ``config``: the
  machine's CPUs (not this process's affinity, so the numbers are the same
  however many CPUs it may use; at least one thread per device, as XLA's
  own default), plus threads for LAPACK's chunks while every device's
  program waits in a LAPACK call, in runs with such a method."""
  threads = max(os.cpu_count() or 1, _cpu_device_count())
  methods = (config.get("method"), *(config.get("compare_with") or ()))
  if any(m in LAPACK_METHODS for m in methods):
    threads = ((os.cpu_count() or 1)
               + LAPACK_POOL_THREADS_PER_DEVICE * _cpu_device_count())
  return threads


def _size_cpu_pool(config) -> None:
  """``$PJRT_NPROC`` (read when the CPU backend starts) to
  :func:`cpu_pool_size`, unless the launcher set it."""
  if "PJRT_NPROC" not in os.environ and "NPROC" not in os.environ:
    os.environ["PJRT_NPROC"] = str(cpu_pool_size(config))


def configure_jax(config) -> None:
  """Process-wide settings a run config asks for; call before anything is
  traced (float64) or any backend starts (XLA flags and the CPU thread
  pool's size are read once)."""
  for flag in CPU_DETERMINISM_FLAGS:
    _add_xla_flag(flag)
  _size_cpu_pool(config)
  if config.dtype == "float64":
    jax.config.update("jax_enable_x64", True)
  if config.get("deterministic", False):
    _add_xla_flag("--xla_gpu_deterministic_ops=true")
