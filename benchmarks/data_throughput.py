"""Throughput of the on-device CIFAR pipeline (gather + pad-crop + flip +
normalise inside jit), on synthetic data of CIFAR-100's size.

  python benchmarks/data_throughput.py --steps 200 --batch-size 64

Prints one JSON line (for scripts) and one line for people. Runs on all
local devices of whatever backend JAX picks (set JAX_PLATFORMS=cpu to force
the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from slkd_jax import parallel  # noqa: E402
from slkd_jax.data import cifar, synthetic  # noqa: E402
from slkd_jax.data.arrays import ArrayTrainData  # noqa: E402


def main(argv=None) -> dict:
  """Run the benchmark and return its results."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=100,
                      help="timed steps (after the warm-up)")
  parser.add_argument("--warmup", type=int, default=2,
                      help="untimed steps first (compilation)")
  parser.add_argument("--batch-size", type=int, default=64,
                      help="global batch size (multiple of the device count)")
  parser.add_argument("--num-train", type=int, default=50_000,
                      help="examples held on device (CIFAR-100: 50,000)")
  parser.add_argument("--image-size", type=int, default=32)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  mesh = parallel.make_mesh(jax.local_devices())
  images, labels = synthetic.make_arrays(args.num_train, args.image_size, 100,
                                         args.seed)
  train = ArrayTrainData(images, labels, batch_size=args.batch_size,
                         seed=args.seed, mesh=mesh, mean=cifar.MEAN,
                         std=cifar.STD, augment=cifar.AUGMENT,
                         num_classes=100)

  def batches():
    """Endless batches, epoch after epoch, as a training loop sees them."""
    epoch = 0
    while True:
      yield from train.epoch(epoch)
      epoch += 1

  it = batches()
  start = time.perf_counter()
  for _ in range(args.warmup):
    jax.block_until_ready(next(it))
  warmup_s = time.perf_counter() - start
  start = time.perf_counter()
  batch = None
  for _ in range(args.steps):
    batch = next(it)
  jax.block_until_ready(batch)
  elapsed = time.perf_counter() - start
  result = {
      "benchmark": "data_throughput", "pipeline": "cifar_on_device",
      "backend": jax.default_backend(), "devices": mesh.size,
      "batch_size": args.batch_size, "num_train": args.num_train,
      "image_size": args.image_size, "steps": args.steps,
      "seconds": round(elapsed, 4), "warmup_seconds": round(warmup_s, 3),
      "batches_per_s": round(args.steps / elapsed, 2) if elapsed else None,
      "images_per_s": (round(args.steps * args.batch_size / elapsed, 1)
                       if elapsed else None),
  }
  print(json.dumps(result))
  print(f"CIFAR on-device pipeline, {result['devices']} {result['backend']} "
        f"device(s), batch {args.batch_size}: {result['batches_per_s']} "
        f"batches/s, {result['images_per_s']} images/s "
        f"(warm-up incl. compile {warmup_s:.2f} s)")
  return result


if __name__ == "__main__":
  main()
