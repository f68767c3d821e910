"""R runs in one compiled step vs R separate runs one after another.

  python benchmarks/runs_throughput.py --pair resnet32x4-resnet8x4 \\
      --runs 1,2,4,8,16 --runs-impl both --dtype bfloat16

For each R this builds the study step of ``slkd_jax.studies`` (R stacked
runs of one stage with different seeds, the teacher's forward and the batch
shared, vmapped or unrolled over the runs) and, as the baseline, the
single-run step of ``slkd_jax.train_step`` called R times per iteration (what
R separate jobs on one device do, without their process overhead). Both see
**one** random batch, placed once; the first call (compile) and ``--warmup``
steps are untimed, then ``--steps`` iterations run back to back.

Reported per (R, mode): images/s *per run* (global batch × iterations /
seconds: every run trains on every image) and ms per iteration, as JSON
lines and a markdown table. On CPU vmapped convolutions are grouped ones
(slow); the GPU numbers belong in RESULTS_GPU.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from benchmarks import step_throughput  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_common_flags(parser, ensemble=True)
  parser.add_argument("--runs", default="1,2,4,8,16",
                      help="comma-separated numbers of runs R")
  parser.add_argument("--runs-impl", default="both",
                      choices=("vmap", "unrolled", "both"),
                      help="how the study step maps over the runs")
  parser.add_argument("--xla-fast-compile", action="store_true",
                      help="jax_disable_most_optimizations (CI smoke runs "
                           "only: timings are then meaningless)")
  return parser.parse_args(argv)


def _timed(fn, steps: int, warmup: int) -> float:
  import jax
  out = None
  for _ in range(warmup):
    out = fn()
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return time.perf_counter() - start


def measure(pair: common.Pair, args, runs: int, mode: str) -> dict:
  """Seconds of ``args.steps`` iterations of R runs in ``mode``: 'vmap' /
  'unrolled' (one program) or 'sequential' (R single-run steps)."""
  import jax
  import numpy as np
  from slkd_jax import parallel, studies, train_step
  from slkd_jax import stage as stage_lib
  from slkd_jax import state as state_lib
  ensemble = args.ensemble if args.ensemble not in (None, "both", "default") \
      else common.recommended_ensemble(jax.devices()[0].platform)
  mesh = parallel.make_mesh(jax.devices()[:args.devices or None])
  config = step_throughput.build_config(pair, args, ensemble, mesh.size)
  stage = stage_lib.resolve(config)
  params, stats = state_lib.init_variables(stage.nets.teacher,
                                           jax.random.key(1), stage.image_shape)
  teacher = jax.device_put(state_lib.ModelState(params, stats),
                           parallel.replicated(mesh))
  rng = np.random.default_rng(0)
  b = config.batch_size
  batch = jax.device_put(
      {"image": rng.standard_normal((b, *stage.image_shape), np.float32),
       "label": rng.integers(0, pair.num_classes, b).astype(np.int32),
       "mask": np.ones(b, bool)}, parallel.batch_sharding(mesh))
  hp = stage.hparams(1)
  if mode == "sequential":
    step = train_step.make_train_step(stage, mesh)
    states = []
    for seed in range(runs):
      config.seed = seed
      states.append(state_lib.create_state(stage_lib.resolve(config), mesh,
                                           teacher))

    def iteration():
      for r in range(runs):
        states[r], m = step(states[r], batch, hp)
      return m
  else:
    step = studies.make_runs_step(stage, mesh, mode)
    box = {"states": studies.create_runs_state(stage, mesh, range(runs)),
           "alive": studies.all_alive(runs, mesh)}
    hps = studies.stack([hp] * runs)

    def iteration():
      box["states"], box["alive"], m = step(box["states"], box["alive"],
                                            teacher, batch, hps)
      return m
  seconds = _timed(iteration, args.steps, args.warmup)
  return {"pair": pair.name, "runs": runs, "mode": mode,
          "batch_size": b, "steps": args.steps,
          "images_per_s_per_run": b * args.steps / seconds,
          "ms_per_iteration": 1000 * seconds / args.steps,
          "platform": jax.devices()[0].platform, "devices": mesh.size}


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.xla_fast_compile:
    import jax
    jax.config.update("jax_disable_most_optimizations", True)
  pair = common.get_pair(args.pair)
  impls = ("vmap", "unrolled") if args.runs_impl == "both" else (
      args.runs_impl,)
  results = []
  for runs in (int(r) for r in common.split_list(args.runs)):
    for mode in (*impls, "sequential"):
      result = measure(pair, args, runs, mode)
      common.emit(result, args.json_out)
      results.append(result)
  print(common.markdown_table(results, [
      ("pair", lambda r: r["pair"]), ("R", lambda r: r["runs"]),
      ("mode", lambda r: r["mode"]), ("batch", lambda r: r["batch_size"]),
      ("devices", lambda r: r["devices"]),
      ("images/s per run", lambda r: r["images_per_s_per_run"]),
      ("ms/iteration", lambda r: r["ms_per_iteration"])]))


if __name__ == "__main__":
  main()
