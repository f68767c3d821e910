"""Shared parts of the step benchmarks: the teacher→student pairs, the output
format (one JSON line per measurement plus a table for people), running a
benchmark script in a fresh process, and the ensemble-implementation choice.

Imports neither JAX nor PyTorch: each benchmark process loads exactly one of
the two frameworks, so neither competes with the other's thread pools or
device allocator while it is timed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Callable, Iterable, Sequence

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)


@dataclasses.dataclass(frozen=True)
class Pair:
  """A teacher→student pair and the recipe its step runs with.

  Attributes:
    name: ``teacher-student`` (what ``--pair`` takes).
    teacher, student: registry names (same in slkd_jax and torch_models).
    image_size, num_classes: synthetic data shape (CIFAR-100 or ImageNet).
    batch_size: default batch: global for CIFAR pairs, per device when
      ``per_device_batch`` (ImageNet, the way large-batch runs are sized).
    learning_rate, weight_decay, temperature, ce_weight, kd_weight: the
      reference recipe (docs/method.md §2–4); they do not change the cost
      of a step but keep both sides' arithmetic identical.
    note: what the pair is for.
  """
  name: str
  teacher: str
  student: str
  image_size: int = 32
  num_classes: int = 100
  batch_size: int = 64
  per_device_batch: bool = False
  learning_rate: float = 0.05
  weight_decay: float = 5e-4
  temperature: float = 4.0
  ce_weight: float = 0.1
  kd_weight: float = 0.9
  note: str = ""

  def global_batch(self, batch_size: int | None, num_devices: int) -> int:
    """The global batch for ``--batch-size`` (None: the pair's default)."""
    b = self.batch_size if batch_size is None else batch_size
    return b * num_devices if self.per_device_batch else b


def _cifar(teacher: str, student: str, note: str = "", **kw) -> Pair:
  return Pair(f"{teacher}-{student}", teacher, student, note=note, **kw)


PAIRS: dict[str, Pair] = {p.name: p for p in [
    _cifar("resnet8", "resnet8", note="smoke pair: smallest nets, for CI "
           "(tests/test_benchmarks.py), not a paper pair"),
    _cifar("resnet20", "resnet8", note="small pair for CPU sweeps"),
    _cifar("resnet56", "resnet20", note="small paper-family pair"),
    _cifar("resnet32x4", "resnet8x4", note="headline pair (paper Table 1)"),
    _cifar("wrn_40_2", "wrn_16_2"),
    _cifar("vgg13", "vgg8"),
    # Mobile students use lr 0.01 in the reference (SL-Ts too).
    _cifar("ResNet50", "MobileNetV2", learning_rate=0.01),
    Pair("imagenet_resnet34-imagenet_resnet18", "imagenet_resnet34",
         "imagenet_resnet18", image_size=224, num_classes=1000,
         batch_size=256, per_device_batch=True, learning_rate=0.2,
         weight_decay=1e-4, temperature=1.0, ce_weight=0.5, kd_weight=0.5,
         note="ImageNet; --batch-size is per device"),
]}
# Short aliases people type.
ALIASES = {"resnet34-resnet18": "imagenet_resnet34-imagenet_resnet18"}

SMOKE_PAIR = "resnet8-resnet8"
DEFAULT_PAIRS = ("resnet32x4-resnet8x4", "wrn_40_2-wrn_16_2", "vgg13-vgg8",
                 "ResNet50-MobileNetV2", "imagenet_resnet34-imagenet_resnet18")
HEADLINE_PAIR = "resnet32x4-resnet8x4"


def get_pair(name: str) -> Pair:
  """The :class:`Pair` called ``name`` (or an alias); a clear error else."""
  name = ALIASES.get(name, name)
  try:
    return PAIRS[name]
  except KeyError:
    raise SystemExit(f"unknown pair {name!r}; choose from "
                     f"{', '.join(list(PAIRS) + list(ALIASES))}") from None


def split_list(text: str | None) -> list[str]:
  """``'a,b, c'`` → ``['a', 'b', 'c']`` (empty → [])."""
  return [t.strip() for t in (text or "").split(",") if t.strip()]


# ---------------------------------------------------------------------------
# The ensemble implementation (config.slkd.ensemble) per platform.
#
# Measured on the 2-core CPU machine (benchmarks/RESULTS_CPU.md): 'vmap' runs
# every SL-T conv as one grouped conv with batched kernels, which XLA:CPU
# executes several times slower than K dense convs, so 'unrolled' wins there
# by a wide margin at every K tried. GPUs are not measured yet: XLA:GPU also
# lowers the vmapped convs to grouped convs (feature_group_count = K), which
# cuDNN tends to run slower than K dense convs, so 'unrolled' is the
# defensible default there too until `compare.py --ensemble both` on a GPU
# says otherwise; update this table (and the library default) from that run.
ENSEMBLE_DEFAULTS = {"cpu": "unrolled", "gpu": "unrolled", "tpu": "unrolled"}
ENSEMBLE_MEASURED = {"cpu": True, "gpu": False, "tpu": False}


def recommended_ensemble(platform: str) -> str:
  """The ensemble implementation to use on ``platform`` ('cpu'|'gpu'|'tpu';
  'cuda'/'rocm' count as 'gpu'), from the measurements recorded above."""
  platform = "gpu" if platform in ("cuda", "rocm") else platform
  return ENSEMBLE_DEFAULTS.get(platform, "unrolled")


def pick_ensemble(results: Iterable[dict]) -> dict[str, str]:
  """From JAX results measured with both implementations, the faster one per
  (backend, pair, K, dtype, batch): the data for :data:`ENSEMBLE_DEFAULTS`."""
  best: dict[tuple, dict] = {}
  for r in results:
    if r.get("framework") != "jax" or r.get("images_per_s") is None:
      continue
    key = (r["backend"], r["pair"], r["num_slts"], r["dtype"], r["batch_size"])
    if key not in best or r["images_per_s"] > best[key]["images_per_s"]:
      best[key] = r
  return {"/".join(map(str, k)): r["ensemble"] for k, r in best.items()}


# ---------------------------------------------------------------------------
# Output.

# Keys every measurement line carries (both frameworks); the smoke test
# checks them.
RESULT_KEYS = ("benchmark", "framework", "pair", "teacher", "student",
               "method", "num_slts", "batch_size", "image_size", "dtype",
               "devices", "backend", "device_name", "steps", "warmup",
               "ms_per_step", "images_per_s", "compile_s", "first_step_s",
               "peak_memory_bytes", "final_loss", "versions")


def emit(result: dict, json_out: str | None) -> None:
  """Print ``result`` as one JSON line; append it to ``json_out`` too."""
  line = json.dumps(result, sort_keys=True)
  print(line, flush=True)
  if json_out:
    with open(json_out, "a") as f:
      f.write(line + "\n")


def read_json_lines(path: str) -> list[dict]:
  """The JSON objects in ``path`` (one per line; other lines ignored)."""
  out = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        line = line.strip()
        if line.startswith("{"):
          out.append(json.loads(line))
  return out


def fmt(value: Any, digits: int = 1) -> str:
  """Table cell: numbers rounded, None as '—'."""
  if value is None:
    return "—"
  if isinstance(value, float):
    return f"{value:,.{digits}f}"
  if isinstance(value, int) and not isinstance(value, bool):
    return f"{value:,}"
  return str(value)


def mib(nbytes: int | None) -> float | None:
  return None if nbytes is None else nbytes / 2**20


def markdown_table(rows: Sequence[dict],
                   columns: Sequence[tuple[str, Callable[[dict], Any]]]
                   ) -> str:
  """A markdown table: one row per dict, ``columns`` = (header, getter)."""
  lines = ["| " + " | ".join(h for h, _ in columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
  for r in rows:
    lines.append("| " + " | ".join(fmt(get(r)) for _, get in columns) + " |")
  return "\n".join(lines)


STEP_COLUMNS = [
    ("framework", lambda r: r["framework"]),
    ("pair", lambda r: r["pair"]),
    ("method", lambda r: r["method"]),
    ("K", lambda r: r["num_slts"]),
    ("batch", lambda r: r["batch_size"]),
    ("dtype", lambda r: r["dtype"]),
    ("impl", lambda r: r.get("ensemble") or r.get("impl")),
    ("devices", lambda r: r["devices"]),
    ("images/s", lambda r: r["images_per_s"]),
    ("ms/step", lambda r: r["ms_per_step"]),
    ("compile s", lambda r: r["compile_s"]),
    ("peak MiB", lambda r: mib(r["peak_memory_bytes"])),
]


# ---------------------------------------------------------------------------
# Subprocesses.


def run_script(script: str, argv: Sequence[str], env: dict | None = None,
               timeout: float | None = None, echo: bool = True) -> list[dict]:
  """Run ``benchmarks/<script>`` in a fresh Python process; return the JSON
  lines it appended to a private ``--json-out`` file.

  A fresh process per measurement keeps peak-memory readings (JAX cannot
  reset its peak counter), compile caches and framework thread pools from
  leaking between measurements, and is the only way to change the number of
  fake CPU devices (fixed when JAX starts). ``env`` entries override the
  inherited environment. The child's output is echoed to stderr when
  ``echo``; a failure raises with its tail.
  """
  fd, out_path = tempfile.mkstemp(suffix=".jsonl", prefix="slkd_bench_")
  os.close(fd)
  cmd = [sys.executable, os.path.join(BENCH_DIR, script), *argv,
         "--json-out", out_path]
  child_env = {**os.environ, **(env or {})}
  try:
    proc = subprocess.run(cmd, env=child_env, cwd=REPO_ROOT, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    if echo:
      sys.stderr.write(proc.stdout)
      sys.stderr.flush()
    if proc.returncode != 0:
      raise RuntimeError(f"{' '.join(cmd)} failed with exit code "
                         f"{proc.returncode}:\n{proc.stdout[-4000:]}")
    return read_json_lines(out_path)
  finally:
    os.unlink(out_path)


def add_common_flags(parser, *, ensemble: bool) -> None:
  """The flags both step benchmarks take (same names, same meaning)."""
  parser.add_argument("--pair", default=HEADLINE_PAIR,
                      help="teacher-student pair(s), comma-separated; "
                           f"known: {', '.join(PAIRS)}")
  parser.add_argument("--method", default="slkd",
                      help="distillation method (slkd_jax.methods)")
  parser.add_argument("--num-slts", type=int, default=2,
                      help="K, the number of SL-Ts")
  parser.add_argument("--batch-size", type=int, default=None,
                      help="global batch (ImageNet pairs: per device); "
                           "default: the pair's")
  parser.add_argument("--dtype", default="float32",
                      choices=("float32", "bfloat16"),
                      help="compute dtype (params and BN statistics stay "
                           "float32)")
  if ensemble:
    parser.add_argument("--ensemble", default="default",
                        choices=("default", "unrolled", "vmap", "both"),
                        help="how the K SL-Ts are applied; 'default' = "
                             "recommended_ensemble(backend)")
  parser.add_argument("--steps", type=int, default=20, help="timed steps")
  parser.add_argument("--warmup", type=int, default=2,
                      help="untimed steps first (>= 1: the first compiles)")
  parser.add_argument("--devices", type=int, default=None,
                      help="use only the first N devices (default: all)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json-out", default=None,
                      help="append the JSON lines to this file")
