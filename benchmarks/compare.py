"""slkd_jax vs the PyTorch reference step, side by side, in one invocation.

  python benchmarks/compare.py                      # the default pairs
  python benchmarks/compare.py --pairs resnet32x4-resnet8x4 --dtype bfloat16 \\
      --ensemble both --scaling --scaling-pair resnet32x4-resnet8x4

Runs ``step_throughput.py`` (JAX) and ``torch_reference.py`` (PyTorch) for
each pair with the same method, K, batch, dtype and device, each measurement
in a fresh process, and prints:

1. the comparison: images/s of both and the ratio JAX / PyTorch per pair;
2. with ``--scaling``: images/s for K = 1, 2, 4, 8 SL-Ts (how a step's cost
   grows with the ensemble), both frameworks;
3. with ``--device-scaling``: the JAX step on 1 vs 8 *fake* CPU devices
   (``--xla_force_host_platform_device_count=8``). On one CPU this is a check
   of the sharding plumbing, not a speed-up: the final losses must agree.

Everything is also written as JSON lines (``--json-out``) and, with
``--markdown-out``, as a markdown report with the machine, versions and date.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import sys

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

FAKE_DEVICES = 8


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--pairs", default=",".join(common.DEFAULT_PAIRS),
                      help="comma-separated pairs for the comparison ('' "
                           "skips it)")
  parser.add_argument("--method", default="slkd")
  parser.add_argument("--num-slts", type=int, default=2)
  parser.add_argument("--batch-size", type=int, default=None,
                      help="global batch (ImageNet pairs: per device); "
                           "default: each pair's")
  parser.add_argument("--dtype", default="float32",
                      choices=("float32", "bfloat16"))
  parser.add_argument("--ensemble", default="default",
                      choices=("default", "unrolled", "vmap", "both"),
                      help="JAX SL-T implementation(s) to measure")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--scaling", action="store_true",
                      help="also sweep K (--scaling-ks) on --scaling-pair")
  parser.add_argument("--scaling-ks", default="1,2,4,8")
  parser.add_argument("--scaling-pair", default=common.HEADLINE_PAIR)
  parser.add_argument("--scaling-ensemble", default=None,
                      choices=("default", "unrolled", "vmap", "both"),
                      help="JAX SL-T implementation(s) for the K sweep "
                           "(default: --ensemble)")
  parser.add_argument("--device-scaling", action="store_true",
                      help=f"also run JAX on 1 vs {FAKE_DEVICES} fake CPU "
                           "devices (plumbing check)")
  parser.add_argument("--device-scaling-pair", default="resnet20-resnet8")
  parser.add_argument("--no-torch", action="store_true",
                      help="JAX only (also automatic when torch is missing)")
  parser.add_argument("--xla-fast-compile", action="store_true",
                      help="pass --xla-fast-compile to the JAX runs (CI "
                           "smoke only)")
  parser.add_argument("--timeout", type=float, default=None,
                      help="seconds per measurement process")
  parser.add_argument("--json-out", default=None,
                      help="append every measurement as a JSON line")
  parser.add_argument("--markdown-out", default=None,
                      help="write the tables as a markdown report")
  return parser.parse_args(argv)


class Runner:
  """Runs one measurement per process and collects the JSON lines."""

  def __init__(self, args):
    self.args = args
    self.results: list[dict] = []
    self._torch_done: dict[tuple, list[dict]] = {}
    self.torch = (not args.no_torch
                  and importlib.util.find_spec("torch") is not None)

  def _common_argv(self, pair: str, k: int, batch: int | None) -> list[str]:
    a = self.args
    argv = ["--pair", pair, "--method", a.method, "--num-slts", str(k),
            "--dtype", a.dtype, "--steps", str(a.steps),
            "--warmup", str(a.warmup), "--no-table"]
    if batch is not None:
      argv += ["--batch-size", str(batch)]
    return argv

  def _keep(self, results: list[dict], section: str) -> list[dict]:
    for r in results:
      r["section"] = section
      common.emit(r, self.args.json_out)
    self.results += results
    return results

  def jax(self, pair: str, k: int, ensemble: str, section: str,
          batch: int | None = None, devices: int | None = None,
          env: dict | None = None) -> list[dict]:
    argv = self._common_argv(pair, k, batch) + ["--ensemble", ensemble,
                                                "--in-process"]
    if devices is not None:
      argv += ["--devices", str(devices)]
    if self.args.xla_fast_compile:
      argv.append("--xla-fast-compile")
    print(f"[compare] jax   {pair} K={k} {ensemble} devices={devices or 'all'}",
          file=sys.stderr, flush=True)
    return self._keep(common.run_script("step_throughput.py", argv, env=env,
                                        timeout=self.args.timeout), section)

  def torch_ref(self, pair: str, k: int, section: str,
                batch: int | None = None) -> list[dict]:
    if not self.torch:
      return []
    # PyTorch has no ensemble switch: measure each configuration once even
    # when several JAX implementations are compared against it.
    key = (pair, k, batch)
    if key not in self._torch_done:
      print(f"[compare] torch {pair} K={k}", file=sys.stderr, flush=True)
      self._torch_done[key] = self._keep(common.run_script(
          "torch_reference.py", self._common_argv(pair, k, batch),
          timeout=self.args.timeout), section)
    return self._torch_done[key]


def _ratio(a: float | None, b: float | None) -> float | None:
  return None if not a or not b else a / b


def comparison(runner: Runner, pairs: list[str], ensembles: list[str]) -> str:
  """Table 1: both frameworks per pair, ratio of images/s."""
  a = runner.args
  rows = []
  for pair in pairs:
    torch_r = runner.torch_ref(pair, a.num_slts, "comparison", a.batch_size)
    t = torch_r[0] if torch_r else {}
    for ensemble in ensembles:
      j = runner.jax(pair, a.num_slts, ensemble, "comparison", a.batch_size)[0]
      rows.append({"pair": pair, "K": j["num_slts"], "batch": j["batch_size"],
                   "dtype": j["dtype"], "jax_impl": j["ensemble"],
                   "torch_impl": t.get("impl"),
                   "jax_ips": j["images_per_s"],
                   "torch_ips": t.get("images_per_s"),
                   "ratio": _ratio(j["images_per_s"], t.get("images_per_s")),
                   "jax_ms": j["ms_per_step"], "torch_ms": t.get("ms_per_step"),
                   "jax_compile": j["compile_s"],
                   "jax_mem": common.mib(j["peak_memory_bytes"]),
                   "torch_mem": common.mib(t.get("peak_memory_bytes"))})
  cols = [("pair", lambda r: r["pair"]), ("K", lambda r: r["K"]),
          ("batch", lambda r: r["batch"]), ("dtype", lambda r: r["dtype"]),
          ("JAX impl", lambda r: r["jax_impl"]),
          ("PyTorch impl", lambda r: r["torch_impl"]),
          ("JAX img/s", lambda r: r["jax_ips"]),
          ("PyTorch img/s", lambda r: r["torch_ips"]),
          ("JAX / PyTorch", lambda r: _round(r["ratio"], 2)),
          ("JAX ms/step", lambda r: r["jax_ms"]),
          ("PyTorch ms/step", lambda r: r["torch_ms"]),
          ("JAX compile s", lambda r: r["jax_compile"]),
          ("JAX peak MiB", lambda r: r["jax_mem"]),
          ("PyTorch peak MiB", lambda r: r["torch_mem"])]
  return common.markdown_table(rows, cols)


def _round(x: float | None, digits: int) -> str | None:
  return None if x is None else f"{x:.{digits}f}"


def k_scaling(runner: Runner, pair: str, ks: list[int], ensemble: str) -> str:
  """Table 2: images/s against K, and the step cost relative to K = 1."""
  a = runner.args
  rows = []
  for k in ks:
    j = runner.jax(pair, k, ensemble, "k_scaling", a.batch_size)[0]
    t = (runner.torch_ref(pair, k, "k_scaling", a.batch_size) or [{}])[0]
    rows.append({"K": k, "jax": j, "torch": t})
  base_j = rows[0]["jax"]["ms_per_step"]
  base_t = rows[0]["torch"].get("ms_per_step")
  cols = [("K", lambda r: r["K"]),
          ("JAX img/s", lambda r: r["jax"]["images_per_s"]),
          (f"JAX cost vs K={ks[0]}",
           lambda r: _round(_ratio(r["jax"]["ms_per_step"], base_j), 2)),
          ("PyTorch img/s", lambda r: r["torch"].get("images_per_s")),
          (f"PyTorch cost vs K={ks[0]}",
           lambda r: _round(_ratio(r["torch"].get("ms_per_step"), base_t), 2)),
          ("JAX / PyTorch",
           lambda r: _round(_ratio(r["jax"]["images_per_s"],
                                   r["torch"].get("images_per_s")), 2)),
          ("JAX compile s", lambda r: r["jax"]["compile_s"])]
  j0 = rows[0]["jax"]
  return (f"pair {pair}, batch {j0['batch_size']}, {j0['dtype']}, JAX "
          f"ensemble {j0['ensemble']}\n\n" + common.markdown_table(rows, cols))


def device_scaling(runner: Runner, pair: str, ensemble: str) -> str:
  """Table 3: 1 vs 8 fake CPU devices, same global batch (plumbing check)."""
  a = runner.args
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    flags = (flags + f" --xla_force_host_platform_device_count={FAKE_DEVICES}"
             ).strip()
  env = {"XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
  batch = a.batch_size
  rows = [runner.jax(pair, a.num_slts, ensemble, "device_scaling", batch,
                     devices=n, env=env)[0] for n in (1, FAKE_DEVICES)]
  losses = [r["final_loss"] for r in rows]
  agree = abs(losses[0] - losses[1]) <= 1e-3 * max(1.0, abs(losses[0]))
  cols = [("devices", lambda r: r["devices"]),
          ("backend", lambda r: r["backend"]),
          ("global batch", lambda r: r["batch_size"]),
          ("per device", lambda r: r["per_device_batch"]),
          ("images/s", lambda r: r["images_per_s"]),
          ("ms/step", lambda r: r["ms_per_step"]),
          ("compile s", lambda r: r["compile_s"]),
          ("loss after the run", lambda r: f"{r['final_loss']:.4f}")]
  return (f"pair {pair}, K {a.num_slts}, fake CPU devices on one CPU (a "
          f"plumbing check, not a speed-up); final losses "
          f"{'agree' if agree else 'DIFFER'}\n\n"
          + common.markdown_table(rows, cols))


def machine_summary(results: list[dict]) -> str:
  """Where the numbers come from: device names, versions, date."""
  devices = sorted({f"{r['framework']}: {r['backend']} / {r['device_name']}"
                    for r in results})
  versions = {}
  for r in results:
    versions.update({k: v for k, v in r.get("versions", {}).items() if v})
  loads = [r["host_load_1m"] for r in results if "host_load_1m" in r]
  load = (f"{min(loads):.1f}–{max(loads):.1f}" if loads else "n/a")
  return "\n".join([
      f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
      f"- host load (1-min average) at the end of each measurement: {load} "
      "(CPU timings are only comparable at similar load)",
      f"- host: {platform.node()} ({platform.machine()}, "
      f"{os.cpu_count()} CPU cores visible)",
      *(f"- {d}" for d in devices),
      "- versions: " + ", ".join(f"{k} {v}" for k, v in sorted(
          versions.items())),
  ])


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  runner = Runner(args)
  ensembles = (["unrolled", "vmap"] if args.ensemble == "both"
               else [args.ensemble])
  sections = []
  pairs = [common.get_pair(p).name for p in common.split_list(args.pairs)]
  if pairs:
    sections.append(("JAX vs PyTorch", comparison(runner, pairs, ensembles)))
  if args.scaling:
    ks = [int(k) for k in common.split_list(args.scaling_ks)]
    choice = args.scaling_ensemble or args.ensemble
    for ensemble in (["unrolled", "vmap"] if choice == "both" else [choice]):
      sections.append((f"Cost against K ({ensemble})",
                       k_scaling(runner, common.get_pair(args.scaling_pair)
                                 .name, ks, ensemble)))
  if args.device_scaling:
    sections.append((f"1 vs {FAKE_DEVICES} fake CPU devices",
                     device_scaling(runner, common.get_pair(
                         args.device_scaling_pair).name, ensembles[0])))
  if not runner.torch:
    sections.append(("Note", "PyTorch side skipped (--no-torch or torch not "
                             "installed)."))
  if args.ensemble == "both":
    sections.append(("Faster ensemble implementation",
                     str(common.pick_ensemble(runner.results))))
  report = "\n\n".join(f"### {title}\n\n{body}" for title, body in sections)
  report = machine_summary(runner.results) + "\n\n" + report
  print("\n" + report)
  if args.markdown_out:
    with open(args.markdown_out, "w") as f:
      f.write(report + "\n")
  return runner.results


if __name__ == "__main__":
  main()
