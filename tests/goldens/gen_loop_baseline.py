"""Record what a single run computes, bit for bit, for tests/test_loop_golden.py.

Run once from the repository root on the commit *before* a change to the
outer loop (it sets the JAX settings the baselines were recorded under: 8
fake CPU devices, ``jax_disable_most_optimizations``, XLA's default CPU
emitters):

    python tests/goldens/gen_loop_baseline.py \
        tests/goldens/loop_baseline/<cpu kind>.json

It trains the config of ``tests/test_loop_golden.py`` (a teacher stage,
then SLKD with K = 2, FitNet, CRD and DML stages from that teacher) and
writes every stage's ``metrics.jsonl`` records (every number) and the
SHA-256 of every array of its final model and its last checkpoint's
student, SL-Ts, extra modules and buffers. The recorded files were made on
commit 7d14e89 (the last commit with two outer loops) on the 2-core CPU
machine with jax 0.10.2. XLA:CPU's float32 bits depend on the CPU's
instruction set, so each CPU kind the suite runs on has its own file, made
the same way on 7d14e89 (copy this script and ``tests/loop_golden.py`` into
a checkout of it); ``_machine`` names the CPU.
"""

import json
import os
import sys
import tempfile

# The JAX settings every baseline was recorded under (the suite's on commit
# 7d14e89): 8 fake CPU devices, XLA's default CPU emitters, and
# jax_disable_most_optimizations. Set here, not taken from the suite's
# conftest, whose flags may change for speed: the bits depend on them.
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                ".."))
import jax  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)

from loop_golden import config, fingerprint, machine  # noqa: E402

from slkd_jax import train  # noqa: E402


def main(out: str) -> None:
  with tempfile.TemporaryDirectory() as workdir:
    train.run(config(), workdir)
    record = fingerprint(workdir)
  record["_machine"] = machine()
  with open(out, "w") as f:
    json.dump(record, f, indent=1, sort_keys=True)
  print(f"wrote {out}: {sorted(record)}")


if __name__ == "__main__":
  main(sys.argv[1])
