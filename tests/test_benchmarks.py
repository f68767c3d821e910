"""Smoke tests of the step benchmarks (benchmarks/): they run, print the JSON
lines scripts rely on, and the PyTorch side computes what docs/method.md says.

No timing assertions: each script runs 2 steps on the smallest (smoke) pair
with --xla-fast-compile, so CI keeps them working in about a minute. The
step and runs benchmarks run in the test's process on one device; the
comparison starts its processes as a user's shell would.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# benchmarks/ is not part of the installed package: import it from the
# checkout (plain `pytest` does not put the repository root on sys.path).
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from benchmarks import common  # noqa: E402
HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
SMOKE = ["--pair", common.SMOKE_PAIR, "--batch-size", "8", "--num-slts", "1",
         "--steps", "2", "--warmup", "1"]


def bench_env() -> dict:
  """The environment a user's shell would give the scripts: conftest's 8
  fake devices removed (the scripts pick their own device counts)."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if "xla_force_host_platform_device_count" not in f]
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = "cpu"
  return env


def run_bench(script, *argv, timeout=240):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", script), *argv],
      cwd=ROOT, env=bench_env(), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-4000:]
  lines = [json.loads(l) for l in proc.stdout.splitlines()
           if l.startswith("{")]
  return lines, proc.stdout


def check_result(r, framework):
  assert set(common.RESULT_KEYS) <= set(r), set(common.RESULT_KEYS) - set(r)
  assert r["framework"] == framework
  assert r["pair"] == common.SMOKE_PAIR and r["steps"] == 2
  assert r["images_per_s"] > 0 and r["ms_per_step"] > 0
  assert np.isfinite(r["final_loss"])
  assert r["peak_memory_bytes"] is None  # CPU keeps no memory statistics


def run_in_process(main, argv, capsys):
  """``main(argv)`` of a benchmark script in this process (its programs
  compile on one of the suite's fake devices, with no process to start);
  its JSON lines and printed output."""
  capsys.readouterr()
  main([*argv, "--devices", "1"])
  stdout = capsys.readouterr().out
  lines = [json.loads(line) for line in stdout.splitlines()
           if line.startswith("{")]
  return lines, stdout


@pytest.mark.slow
def test_step_throughput_smoke(tmp_path, capsys):
  from benchmarks import step_throughput
  out = tmp_path / "jax.jsonl"
  lines, stdout = run_in_process(
      step_throughput.main, [*SMOKE, "--xla-fast-compile", "--json-out",
                             str(out)], capsys)
  assert len(lines) == 1
  r = lines[0]
  check_result(r, "jax")
  assert r["ensemble"] == common.recommended_ensemble("cpu")
  assert r["num_slts"] == 1 and r["batch_size"] == 8 and r["devices"] == 1
  assert common.read_json_lines(str(out)) == lines
  assert "| jax | resnet8-resnet8 |" in stdout  # the table for people


@pytest.mark.slow
@needs_torch
def test_runs_throughput_smoke(capsys):
  from benchmarks import runs_throughput
  lines, out = run_in_process(
      runs_throughput.main, [*SMOKE, "--runs", "1,2", "--runs-impl", "vmap",
                             "--xla-fast-compile"], capsys)
  assert [(r["runs"], r["mode"]) for r in lines] == [
      (1, "vmap"), (1, "sequential"), (2, "vmap"), (2, "sequential")]
  assert all(r["images_per_s_per_run"] > 0 for r in lines)
  assert "| images/s per run |" in out


def test_torch_reference_smoke():
  lines, _ = run_bench("torch_reference.py", *SMOKE)
  assert len(lines) == 1
  check_result(lines[0], "torch")
  assert lines[0]["num_slts"] == 1 and not lines[0]["amp"]


@pytest.mark.slow
def test_compare_smoke(tmp_path):
  """Comparison and the 1 vs 8 fake-device check in one invocation."""
  out, md = tmp_path / "all.jsonl", tmp_path / "report.md"
  lines, stdout = run_bench(
      "compare.py", "--pairs", common.SMOKE_PAIR, "--batch-size", "8",
      "--num-slts", "1", "--steps", "2", "--warmup", "1",
      "--xla-fast-compile", "--device-scaling", "--device-scaling-pair",
      common.SMOKE_PAIR, "--json-out", str(out), "--markdown-out", str(md),
      *([] if HAS_TORCH else ["--no-torch"]))
  by_section = {}
  for r in common.read_json_lines(str(out)):
    by_section.setdefault(r["section"], []).append(r)
  assert {r["framework"] for r in by_section["comparison"]} == (
      {"jax", "torch"} if HAS_TORCH else {"jax"})
  assert [r["devices"] for r in by_section["device_scaling"]] == [1, 8]
  assert "final losses agree" in stdout
  assert "### JAX vs PyTorch" in md.read_text()
  if HAS_TORCH:
    assert "| resnet8-resnet8 | 1 | 8 | float32 | unrolled | fp32 |" in stdout


class FakeRunner:
  """Stands in for compare.Runner: no processes, step cost linear in K."""

  def __init__(self):
    import argparse
    self.args = argparse.Namespace(batch_size=8, num_slts=1)

  def _result(self, framework, k, ms):
    return {"framework": framework, "num_slts": k, "batch_size": 8,
            "dtype": "float32", "ensemble": "unrolled", "compile_s": 1.0,
            "ms_per_step": ms, "images_per_s": 8000 / ms}

  def jax(self, pair, k, ensemble, section, batch=None, **_):
    return [self._result("jax", k, 10.0 * (1 + k))]

  def torch_ref(self, pair, k, section, batch=None):
    return [self._result("torch", k, 20.0 * (1 + k))]


def test_k_scaling_table():
  from benchmarks import compare
  table = compare.k_scaling(FakeRunner(), common.SMOKE_PAIR, [1, 2, 4],
                            "unrolled")
  # Cost relative to K = 1 and the JAX / PyTorch ratio per row.
  assert "| 4 | 160.0 | 2.50 | 80.0 | 2.50 | 2.00 | 1.0 |" in table


def test_ensemble_choice():
  assert common.recommended_ensemble("cpu") == "unrolled"
  assert common.recommended_ensemble("cuda") == common.ENSEMBLE_DEFAULTS["gpu"]
  base = {"framework": "jax", "backend": "cpu", "pair": "p", "num_slts": 2,
          "dtype": "float32", "batch_size": 32}
  picked = common.pick_ensemble([
      {**base, "ensemble": "vmap", "images_per_s": 10.0},
      {**base, "ensemble": "unrolled", "images_per_s": 30.0}])
  assert picked == {"cpu/p/2/float32/32": "unrolled"}


def _jax_param_count(arch: str) -> int:
  """Parameter count of the slkd_jax model, from shapes only (no compute)."""
  from slkd_jax import models
  model = models.create(arch)
  size = models.info(arch).image_size
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0),
                         jax.numpy.zeros((1, size, size, 3)), train=False))
  return sum(int(np.prod(x.shape)) for x in
             jax.tree.leaves(shapes["params"]))


@needs_torch
@pytest.mark.parametrize("arch", sorted({a for p in common.PAIRS.values()
                                         for a in (p.teacher, p.student)}))
def test_torch_twins_have_the_spec_parameter_counts(arch):
  from benchmarks import torch_models
  expected = torch_models.REFERENCE_PARAM_COUNTS[arch]
  assert torch_models.num_params(torch_models.create(arch)) == expected
  assert _jax_param_count(arch) == expected  # both sides: the same networks


@needs_torch
def test_torch_step_loss_matches_the_spec_worked_example():
  """docs/method.md §2's example: total loss and the reference gradients
  (z_c not detached)."""
  import torch
  from benchmarks.torch_reference import step_loss
  f64 = dict(dtype=torch.float64)
  z_s = torch.tensor([[1, 2, 3], [0.5, -1, 2]], **f64, requires_grad=True)
  z_t = torch.tensor([[2, 1, 0], [1, 1, 3]], **f64)
  z_1 = torch.tensor([[0, 0.5, 1], [2, 0, -1]], **f64, requires_grad=True)
  z_2 = torch.tensor([[1, -1, 0], [0, 1, 1]], **f64, requires_grad=True)
  loss = step_loss("slkd", z_s, z_t, [z_1, z_2], torch.tensor([2, 0]),
                   temperature=4.0, ce_weight=0.1, kd_weight=0.9)
  loss.backward()
  assert loss.item() == pytest.approx(4.403050041, abs=1e-8)
  np.testing.assert_allclose(
      z_1.grad.numpy(), [[-0.110753, -0.014290, 0.125043],
                         [0.402285, 0.153608, -0.555893]], atol=1e-6)
  np.testing.assert_allclose(
      z_s.grad.numpy(), [[-0.445806, 0.201505, 0.244301],
                         [-0.489114, -0.303872, 0.792986]], atol=1e-6)
