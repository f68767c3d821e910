"""Throughput and memory of the real slkd_jax train step on synthetic data.

  python benchmarks/step_throughput.py --pair resnet32x4-resnet8x4 \\
      --num-slts 2 --batch-size 64 --dtype bfloat16 --ensemble both

For each (pair, ensemble implementation) this builds the library's own step
(what the training loop runs, ``slkd_jax.studies.make_runs_step`` for one run:
frozen teacher, K stacked SL-Ts and the student, one jit over the mesh) with a randomly initialised teacher, puts
**one** random batch on the mesh and reuses it, so the input pipeline is
excluded from the timing (``benchmarks/data_throughput.py`` measures it). The
first call (trace + XLA compile + one step) and the remaining warm-up steps
are untimed; then ``--steps`` steps run back to back and the clock stops when
``block_until_ready`` returns on the final state and metrics.

Reported, as one JSON line per measurement and a markdown table:
images/s (global batch × steps / seconds; every image goes through the
teacher, the K SL-Ts and the student), ms/step, compile seconds (first call
minus one steady step; a disk read instead when a persistent compilation
cache such as ``JAX_COMPILATION_CACHE_DIR`` holds the program — the JSON line
names the cache directory), and the peak device memory
(``memory_stats()['peak_bytes_in_use']``, max over the mesh; null on CPU,
where XLA keeps no such statistics).

Several measurements in one invocation each run in a fresh process (JAX's
peak-memory counter cannot be reset, and compile caches would leak);
``--in-process`` turns that off. Runs on whatever backend JAX picks; set
``JAX_PLATFORMS=cpu`` to force the CPU. Useful on GPUs:
``XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_common_flags(parser, ensemble=True)
  parser.add_argument("--xla-fast-compile", action="store_true",
                      help="jax_disable_most_optimizations (CI smoke runs "
                           "only: timings are then meaningless)")
  parser.add_argument("--in-process", action="store_true",
                      help="measure every configuration in this process")
  parser.add_argument("--no-table", action="store_true",
                      help="JSON lines only")
  args = parser.parse_args(argv)
  if args.warmup < 1:
    parser.error("--warmup must be >= 1: the first call compiles")
  if args.steps < 1:
    parser.error("--steps must be >= 1")
  return args


def build_config(pair: common.Pair, args, ensemble: str, num_devices: int):
  """The run config of one measurement: the library's defaults with the
  pair's architectures, data shape and recipe."""
  from slkd_jax import config as config_lib
  from slkd_jax import config_checks
  c = config_lib.base_config()
  c.method = args.method
  c.dtype = args.dtype
  c.seed = args.seed
  c.teacher.arch = pair.teacher
  c.student.arch = pair.student
  c.data.name = "synthetic"
  c.data.num_classes = pair.num_classes
  c.data.image_size = pair.image_size
  c.batch_size = pair.global_batch(args.batch_size, num_devices)
  c.slkd.num_slts = args.num_slts
  c.slkd.ensemble = ensemble
  c.loss.temperature = pair.temperature
  c.loss.ce_weight = pair.ce_weight
  c.loss.kd_weight = pair.kd_weight
  c.optim.learning_rate = pair.learning_rate
  c.optim.weight_decay = pair.weight_decay
  config_checks.validate(c)
  return c


def peak_memory(devices) -> tuple[int | None, str]:
  """Max ``peak_bytes_in_use`` over ``devices`` and a note on what it is."""
  peaks = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:  # some backends raise instead of returning None
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  if not peaks:
    return None, (f"{devices[0].platform}: the backend keeps no memory "
                  "statistics")
  return max(peaks), ("peak_bytes_in_use since process start, max over "
                      "devices (state, batch, step buffers)")


def versions() -> dict[str, str]:
  import flax
  import jax
  import jaxlib
  import optax
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "flax": flax.__version__, "optax": optax.__version__,
          "python": sys.version.split()[0]}


def measure(pair: common.Pair, args, ensemble: str) -> dict:
  """Build, compile and time the step of one configuration."""
  import jax
  import numpy as np

  from slkd_jax import parallel, studies
  from slkd_jax import stage as stage_lib
  from slkd_jax import state as state_lib

  devices = jax.devices()
  if args.devices is not None:
    if not 1 <= args.devices <= len(devices):
      raise SystemExit(f"--devices {args.devices}: this backend has "
                       f"{len(devices)} device(s)")
    devices = devices[:args.devices]
  mesh = parallel.make_mesh(devices)
  if ensemble == "default":
    ensemble = common.recommended_ensemble(devices[0].platform)
  config = build_config(pair, args, ensemble, mesh.size)
  parallel.check_global_batch(config.batch_size, mesh)

  # A random teacher: the step's cost does not depend on its weights.
  stage = stage_lib.resolve(config)
  nets, shape = stage.nets, stage.image_shape
  teacher = None
  if stage.method.uses_teacher:
    # Jitted: op-by-op initialisation is slower than compiling it.
    params, stats = jax.jit(
        lambda key: state_lib.init_variables(nets.teacher, key, shape),
        out_shardings=parallel.replicated(mesh))(
            jax.random.key(config.seed + 1))
    teacher = state_lib.ModelState(params, stats)
  # The loop's program: a single run is a study of one (R = 1).
  state = studies.create_runs_state(stage, mesh, [config.seed])
  hp = studies.stack([stage.hparams(1)])
  runs_step = studies.make_runs_step(stage, mesh, "unrolled", freeze=False)
  alive = studies.all_alive(1, mesh)

  def step(state, batch, hp):
    state, _, metrics = runs_step(state, alive, teacher, batch, hp)
    return state, metrics

  # One synthetic batch, placed on the mesh once (input pipeline excluded).
  rng = np.random.default_rng(config.seed)
  local = config.batch_size // jax.process_count()
  batch = parallel.host_local_to_global({
      "image": rng.standard_normal((local, *shape), np.float32),
      "label": rng.integers(0, config.data.num_classes, local).astype(
          np.int32),
      "mask": np.ones((local,), bool),
  }, mesh)
  jax.block_until_ready((state, batch))

  start = time.perf_counter()
  state, metrics = step(state, batch, hp)
  jax.block_until_ready((state, metrics))
  first_step_s = time.perf_counter() - start
  for _ in range(args.warmup - 1):
    state, metrics = step(state, batch, hp)
  jax.block_until_ready((state, metrics))

  start = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = step(state, batch, hp)
  jax.block_until_ready((state, metrics))
  elapsed = time.perf_counter() - start

  step_s = elapsed / args.steps
  peak, peak_note = peak_memory(devices)
  loss = float(jax.device_get(metrics["loss"])[0])
  if not np.isfinite(loss):
    raise RuntimeError(f"non-finite loss {loss}: the step is broken")
  return {
      "benchmark": "step_throughput", "framework": "jax",
      "pair": pair.name, "teacher": pair.teacher, "student": pair.student,
      "method": config.method,
      "num_slts": config.slkd.num_slts if nets.slt is not None else 0,
      "batch_size": config.batch_size,
      "per_device_batch": config.batch_size // mesh.size,
      "image_size": pair.image_size, "dtype": config.dtype,
      "ensemble": ensemble, "devices": mesh.size,
      "backend": jax.default_backend(), "device_name": devices[0].device_kind,
      "steps": args.steps, "warmup": args.warmup,
      "ms_per_step": round(step_s * 1e3, 2),
      "images_per_s": round(config.batch_size / step_s, 1),
      "compile_s": round(max(first_step_s - step_s, 0.0), 2),
      "first_step_s": round(first_step_s, 2),
      "peak_memory_bytes": peak, "peak_memory_note": peak_note,
      "final_loss": round(loss, 4),
      "xla_fast_compile": bool(args.xla_fast_compile),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      # With a persistent compilation cache, compile_s may be a disk read.
      "compilation_cache_dir": jax.config.jax_compilation_cache_dir,
      # Shared hosts: CPU timings are only comparable at similar load.
      "host_load_1m": round(os.getloadavg()[0], 2),
      "input_pipeline": "excluded: one synthetic batch resident on device",
      "versions": versions(),
  }


def _child_argv(args, pair: str, ensemble: str) -> list[str]:
  """Flags that make a child process measure exactly one configuration."""
  argv = ["--pair", pair, "--ensemble", ensemble, "--method", args.method,
          "--num-slts", str(args.num_slts), "--dtype", args.dtype,
          "--steps", str(args.steps), "--warmup", str(args.warmup),
          "--seed", str(args.seed), "--in-process", "--no-table"]
  if args.batch_size is not None:
    argv += ["--batch-size", str(args.batch_size)]
  if args.devices is not None:
    argv += ["--devices", str(args.devices)]
  if args.xla_fast_compile:
    argv.append("--xla-fast-compile")
  return argv


def main(argv=None) -> list[dict]:
  """Run the benchmark; return the measurements (also printed)."""
  args = parse_args(argv)
  pairs = [common.get_pair(p) for p in common.split_list(args.pair)]
  ensembles = (["unrolled", "vmap"] if args.ensemble == "both"
               else [args.ensemble])
  configs = [(p, e) for p in pairs for e in ensembles]
  results = []
  if len(configs) == 1 or args.in_process:
    import jax
    if args.xla_fast_compile:
      jax.config.update("jax_disable_most_optimizations", True)
    for pair, ensemble in configs:
      result = measure(pair, args, ensemble)
      common.emit(result, args.json_out)
      results.append(result)
  else:
    for pair, ensemble in configs:
      for result in common.run_script("step_throughput.py",
                                      _child_argv(args, pair.name, ensemble),
                                      echo=False):
        common.emit(result, args.json_out)
        results.append(result)
  if not args.no_table:
    print()
    print(common.markdown_table(results, common.STEP_COLUMNS))
    if len(ensembles) > 1:
      print("\nfaster ensemble implementation per backend/pair/K/dtype/batch:",
            common.pick_ensemble(results))
  return results


if __name__ == "__main__":
  main()
