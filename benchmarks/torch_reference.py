"""The same SLKD training step in plain PyTorch, timed like the JAX one.

  python benchmarks/torch_reference.py --pair resnet32x4-resnet8x4 \\
      --num-slts 2 --batch-size 64 --dtype bfloat16

This is the step researchers run today, written the way the reference
trainer (BrilliantCheng/SLKD on mdistiller) writes it: the teacher in eval
mode under ``torch.no_grad``; the K SL-Ts and the student in train mode on
the same batch; loss = student loss + Σ_j SL-T loss (docs/method.md §2, the
fused target *not* detached); one ``backward``; one SGD per network (momentum
0.9, coupled weight decay) steps; ``zero_grad(set_to_none=True)``. Networks
are the PyTorch twins in ``benchmarks/torch_models.py`` (same parameter
counts as slkd_jax's).

Fairness: one synthetic batch stays on the device (the input pipeline is
excluded, as on the JAX side); ``cudnn.benchmark`` is on (the reference sets
it); with ``--dtype bfloat16`` the forward passes run under
``torch.autocast(bfloat16)`` and, on GPU, in ``channels_last`` memory format
— what a performance-minded PyTorch user would do. Timing: warm-up steps
untimed, then ``--steps`` steps back to back, ``torch.cuda.synchronize()``
before the clock stops; no per-step host sync (the JAX side has none
either). ``--torch-compile`` additionally wraps each network in
``torch.compile`` (not what the reference does; off by default).

Runs on one device: CUDA if available, else the CPU (``--device`` forces).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import common, torch_models  # noqa: E402

METHODS = ("ce", "kd", "slkd")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_common_flags(parser, ensemble=False)
  parser.add_argument("--device", default=None,
                      help="torch device (default: cuda if available, else "
                           "cpu)")
  parser.add_argument("--channels-last", default="auto",
                      choices=("auto", "on", "off"),
                      help="auto: on when on GPU with --dtype bfloat16")
  parser.add_argument("--torch-compile", action="store_true",
                      help="wrap each network in torch.compile")
  parser.add_argument("--no-table", action="store_true",
                      help="JSON lines only")
  args = parser.parse_args(argv)
  if args.method not in METHODS:
    parser.error(f"--method {args.method!r}: the PyTorch reference step "
                 f"implements {', '.join(METHODS)}")
  if args.devices not in (None, 1):
    parser.error("the PyTorch reference runs on one device (--devices 1)")
  if args.warmup < 1 or args.steps < 1:
    parser.error("--warmup and --steps must be >= 1")
  return args


def kd_loss(z_in: torch.Tensor, z_tgt: torch.Tensor, t: float) -> torch.Tensor:
  """mdistiller's ``kd_loss``: T² · KL(p_tgt ‖ p_in), summed over classes,
  averaged over the batch."""
  log_p_in = F.log_softmax(z_in / t, dim=1)
  p_tgt = F.softmax(z_tgt / t, dim=1)
  return F.kl_div(log_p_in, p_tgt, reduction="none").sum(1).mean() * t * t


def step_loss(method: str, z_s, z_t, z_k, labels, *, temperature: float,
              ce_weight: float, kd_weight: float) -> torch.Tensor:
  """The summed loss of one step (float32 logits; docs/method.md §2).

  ``slkd``: L_student + Σ_j L_SLT_j with uniform fusion z_c = Σ_j z_j / K
  (the reference's (0.5, 0.5) at K = 2), z_c not detached, w_p = w_ce_cs =
  w_kd_cs = 1 and the SL-Ts' weights tied to the student's.
  """
  t = temperature
  ce_s = F.cross_entropy(z_s, labels)
  if method == "ce":
    return ce_s
  loss = ce_weight * ce_s + kd_weight * kd_loss(z_s, z_t, t)
  if method == "slkd":
    fused = sum(z_k) / len(z_k)
    loss = loss + 1.0 * (1.0 * ce_s + 1.0 * kd_loss(z_s, fused, t))
    for z in z_k:
      loss = loss + ce_weight * F.cross_entropy(z, labels) + (
          kd_weight * kd_loss(z, z_t, t))
  return loss


class ReferenceStep:
  """Networks, optimisers and the train step of one configuration."""

  def __init__(self, pair: common.Pair, args, device: torch.device):
    self.pair, self.method, self.device = pair, args.method, device
    self.k = args.num_slts if args.method == "slkd" else 0
    self.amp = args.dtype == "bfloat16"
    self.channels_last = (args.channels_last == "on" or (
        args.channels_last == "auto" and self.amp and device.type == "cuda"))
    fmt = (torch.channels_last if self.channels_last
           else torch.contiguous_format)

    def make(name):
      return torch_models.create(name, pair.num_classes).to(
          device=device, memory_format=fmt)

    self.student = make(pair.student).train()
    self.teacher = None
    if args.method != "ce":
      self.teacher = make(pair.teacher).eval().requires_grad_(False)
    # SL-Ts: the teacher's architecture, fresh independent inits.
    self.slts = [make(pair.teacher).train() for _ in range(self.k)]
    nets = [self.student, *self.slts]
    # One SGD per network, as the reference steps its optimisers.
    self.optimizers = [
        torch.optim.SGD(n.parameters(), lr=pair.learning_rate, momentum=0.9,
                        weight_decay=pair.weight_decay) for n in nets]
    # The callables the step runs (compiled wrappers share the modules).
    wrap = torch.compile if args.torch_compile else (lambda m: m)
    self.run_teacher = None if self.teacher is None else wrap(self.teacher)
    self.run_student = wrap(self.student)
    self.run_slts = [wrap(n) for n in self.slts]
    self.t = pair.temperature
    self.w_ce, self.w_kd = pair.ce_weight, pair.kd_weight

  def autocast(self):
    return torch.autocast(self.device.type, dtype=torch.bfloat16,
                          enabled=self.amp)

  def __call__(self, images: torch.Tensor, labels: torch.Tensor
               ) -> torch.Tensor:
    """One training step; returns the (device) loss."""
    z_t = None
    if self.teacher is not None:
      with torch.no_grad(), self.autocast():
        z_t = self.run_teacher(images).float()
    with self.autocast():
      z_s = self.run_student(images).float()
      z_k = [run(images).float() for run in self.run_slts]
    loss = step_loss(self.method, z_s, z_t, z_k, labels,
                     temperature=self.t, ce_weight=self.w_ce,
                     kd_weight=self.w_kd)
    for opt in self.optimizers:
      opt.zero_grad(set_to_none=True)
    loss.backward()
    for opt in self.optimizers:
      opt.step()
    return loss.detach()


def sync(device: torch.device) -> None:
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
  if device.type == "cuda":
    return torch.cuda.get_device_name(device)
  return f"cpu ({torch.get_num_threads()} threads)"


def measure(pair: common.Pair, args) -> dict:
  """Build and time the PyTorch step of one configuration."""
  device = torch.device(args.device or
                        ("cuda" if torch.cuda.is_available() else "cpu"))
  if device.type == "cuda":
    torch.backends.cudnn.benchmark = True  # as the reference trainer
    torch.cuda.reset_peak_memory_stats(device)
  torch.manual_seed(args.seed)
  step = ReferenceStep(pair, args, device)
  batch = pair.global_batch(args.batch_size, 1)
  gen = torch.Generator().manual_seed(args.seed)
  images = torch.randn(batch, 3, pair.image_size, pair.image_size,
                       generator=gen).to(device)
  if step.channels_last:
    images = images.contiguous(memory_format=torch.channels_last)
  labels = torch.randint(0, pair.num_classes, (batch,), generator=gen).to(
      device)

  sync(device)
  start = time.perf_counter()
  loss = step(images, labels)
  sync(device)
  first_step_s = time.perf_counter() - start
  for _ in range(args.warmup - 1):
    loss = step(images, labels)
  sync(device)

  start = time.perf_counter()
  for _ in range(args.steps):
    loss = step(images, labels)
  sync(device)
  elapsed = time.perf_counter() - start

  step_s = elapsed / args.steps
  final_loss = float(loss)
  if final_loss != final_loss or abs(final_loss) == float("inf"):
    raise RuntimeError(f"non-finite loss {final_loss}: the step is broken")
  if device.type == "cuda":
    peak = int(torch.cuda.max_memory_allocated(device))
    peak_note = "torch.cuda.max_memory_allocated (tensors only)"
  else:
    peak, peak_note = None, "cpu: not measured"
  return {
      "benchmark": "torch_reference", "framework": "torch",
      "pair": pair.name, "teacher": pair.teacher, "student": pair.student,
      "method": args.method, "num_slts": step.k, "batch_size": batch,
      "per_device_batch": batch, "image_size": pair.image_size,
      "dtype": args.dtype,
      "impl": ("amp" if step.amp else "fp32") + (
          "+channels_last" if step.channels_last else "") + (
          "+compile" if args.torch_compile else ""),
      "amp": step.amp, "channels_last": step.channels_last,
      "torch_compile": bool(args.torch_compile), "devices": 1,
      "backend": device.type, "device_name": device_name(device),
      "steps": args.steps, "warmup": args.warmup,
      "ms_per_step": round(step_s * 1e3, 2),
      "images_per_s": round(batch / step_s, 1),
      "compile_s": round(max(first_step_s - step_s, 0.0), 2),
      "first_step_s": round(first_step_s, 2),
      "peak_memory_bytes": peak, "peak_memory_note": peak_note,
      "final_loss": round(final_loss, 4),
      # Shared hosts: CPU timings are only comparable at similar load.
      "host_load_1m": round(os.getloadavg()[0], 2),
      "input_pipeline": "excluded: one synthetic batch resident on device",
      "versions": {"torch": torch.__version__,
                   "cuda": torch.version.cuda or "",
                   "python": sys.version.split()[0]},
  }


def main(argv=None) -> list[dict]:
  """Run the benchmark; return the measurements (also printed)."""
  args = parse_args(argv)
  results = []
  for name in common.split_list(args.pair):
    result = measure(common.get_pair(name), args)
    common.emit(result, args.json_out)
    results.append(result)
  if not args.no_table:
    print()
    print(common.markdown_table(results, common.STEP_COLUMNS))
  return results


if __name__ == "__main__":
  main()
