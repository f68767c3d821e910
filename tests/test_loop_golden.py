"""A single run computes, bit for bit, what it computed before the outer
loop was reshaped (one loop for runs and studies).

``tests/goldens/loop_baseline.json`` was recorded by
``tests/goldens/gen_loop_baseline.py`` on the last commit with two outer
loops: every stage's metrics (every number of every ``metrics.jsonl``
record) and the SHA-256 of every array of its final model and last
checkpoint (student, SL-Ts, extra modules, buffers).
"""

import json
import os

import pytest

from loop_golden import config, fingerprint
from slkd_jax import train

BASELINE = os.path.join(os.path.dirname(__file__), "goldens",
                        "loop_baseline.json")


@pytest.fixture(scope="module")
def recorded_and_now(tmp_path_factory):
  with open(BASELINE) as f:
    recorded = json.load(f)
  workdir = str(tmp_path_factory.mktemp("loop_golden"))
  train.run(config(), workdir)
  return recorded, fingerprint(workdir)


@pytest.mark.parametrize("stage", ["teacher", "slkd", "fitnet", "crd", "dml"])
def test_single_run_is_bit_identical_to_the_recorded_baseline(
    recorded_and_now, stage):
  recorded, now = (x[stage] for x in recorded_and_now)
  assert len(now["metrics"]) == len(recorded["metrics"])
  for old, new in zip(recorded["metrics"], now["metrics"]):
    assert {k: new.get(k) for k in old} == old
  assert now["final_model"] == recorded["final_model"]
  assert now["checkpoint"] == recorded["checkpoint"]
