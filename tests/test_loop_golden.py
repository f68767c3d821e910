"""A single run computes, bit for bit, what it computed before the outer
loop was reshaped (one loop for runs and studies).

Each file of ``tests/goldens/loop_baseline/`` was recorded by
``tests/goldens/gen_loop_baseline.py`` on the last commit with two outer
loops (7d14e89), on one kind of CPU: every stage's metrics (every number of
every ``metrics.jsonl`` record) and the SHA-256 of every array of its final
model and last checkpoint (student, SL-Ts, extra modules, buffers).
XLA:CPU picks its kernels by the CPU's instruction set, so float32 results
differ in the last bits between CPU models; the run must equal, in every
stage, the baseline of the machine kind it runs on. The run is that
script, in its own process: it sets the JAX flags the baselines were
recorded under, which the suite's own (tests/conftest.py) may not match.
"""

import glob
import json
import os
import subprocess
import sys

import pytest

from loop_golden import STAGES, machine

BASELINES = sorted(glob.glob(os.path.join(
    os.path.dirname(__file__), "goldens", "loop_baseline", "*.json")))


def differences(old, new) -> list[str]:
  """Where a stage's fingerprint ``new`` differs from the recorded ``old``."""
  out = []
  if len(new["metrics"]) != len(old["metrics"]):
    out.append(f"{len(new['metrics'])} metrics records, recorded "
               f"{len(old['metrics'])}")
  for i, (o, n) in enumerate(zip(old["metrics"], new["metrics"])):
    out += [f"record {i} {k}: {n.get(k)!r}, recorded {v!r}"
            for k, v in o.items() if n.get(k) != v]
  for part in ("final_model", "checkpoint"):
    out += [f"{part} {k}" for k in sorted(set(old[part]) | set(new[part]))
            if old[part].get(k) != new[part].get(k)]
  return out


@pytest.fixture(scope="module")
def recorded_and_now(tmp_path_factory):
  assert BASELINES, "tests/goldens/loop_baseline/ holds no baseline"
  baselines = []
  for path in BASELINES:
    with open(path) as f:
      baselines.append(json.load(f))
  out = str(tmp_path_factory.mktemp("loop_golden") / "now.json")
  script = os.path.join(os.path.dirname(__file__), "goldens",
                        "gen_loop_baseline.py")
  proc = subprocess.run([sys.executable, script, out], capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out) as f:
    now = json.load(f)
  # The baseline this machine reproduces in the most stages: all of them,
  # unless the numbers changed (or no baseline comes from this CPU kind).
  recorded = max(baselines, key=lambda b: sum(
      not differences(b[s], now[s]) for s in STAGES))
  return recorded, now


@pytest.mark.parametrize("stage", STAGES)
def test_single_run_is_bit_identical_to_the_recorded_baseline(
    recorded_and_now, stage):
  recorded, now = recorded_and_now
  diff = differences(recorded[stage], now[stage])
  assert not diff, (
      f"{len(diff)} differences, first {diff[:5]}; baseline recorded on "
      f"{recorded['_machine']}, this machine: {machine()}. On a CPU kind "
      "with no baseline, record one with tests/goldens/gen_loop_baseline.py "
      "on commit 7d14e89.")


def test_the_baselines_differ_only_in_float_bits():
  """The machine kinds ran the same steps and saved the same arrays: the
  baselines agree in every record's keys, integer fields and array shapes."""
  def shape(fp):
    return {s: ([{k: v for k, v in r.items() if not isinstance(v, float)}
                 for r in fp[s]["metrics"]],
                {k: v.split(":")[0] for k, v in fp[s]["final_model"].items()},
                {k: str(v).split(":")[0] for k, v in fp[s]["checkpoint"].items()})
            for s in STAGES}
  shapes = []
  for path in BASELINES:
    with open(path) as f:
      shapes.append(shape(json.load(f)))
  assert all(s == shapes[0] for s in shapes)
