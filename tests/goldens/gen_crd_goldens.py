"""Golden values for tests/test_crd.py from mdistiller's own CRD code.

Extracts mdistiller/distillers/{_base,CRD}.py at commit a08d46f from a git
clone of github.com/megvii-research/mdistiller (``git show``) into a temporary package, builds the distiller's CRD
modules with its own ``CRD.init_crd_modules`` (Embed ×2, ContrastMemory,
ContrastLoss ×2; AliasMethod's ``.cuda()`` is made a no-op since only the
given contrast indices are used), overwrites the embed weights, the memory
banks and (case "z_set") the normalisation constants with the numpy inputs
below, and runs ``CRD.crd_loss`` with torch in float64 on 4 examples of
resnet8x4 / resnet32x4 pooled features (256-d), N = 50, K = 8. Prints the
loss, gradient summaries (f_s and both embeds' parameters), Z after the step
and summaries of the updated memory rows as a Python literal.

Usage: MDISTILLER_REPO=/path/to/mdistiller \
  python tests/goldens/gen_crd_goldens.py > /tmp/crd_goldens.py
(MDISTILLER_REPO: a clone of mdistiller holding that commit.)
"""
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

REPO = os.environ.get("MDISTILLER_REPO", "mdistiller")
COMMIT = "a08d46f10d6102bd6e3f258ca5ac880b020ea259"


def import_mdistiller_crd():
  """mdistiller's CRD module, from the reference's own source files."""
  root = tempfile.mkdtemp()
  pkg = os.path.join(root, "mdref_distillers")
  os.makedirs(pkg)
  open(os.path.join(pkg, "__init__.py"), "w").close()
  for name in ("_base", "CRD"):
    src = subprocess.check_output(
        ["git", "-C", REPO, "show",
         f"{COMMIT}:mdistiller/distillers/{name}.py"], text=True)
    with open(os.path.join(pkg, f"{name}.py"), "w") as f:
      f.write(src)
  sys.path.insert(0, root)
  from mdref_distillers import CRD  # noqa: E402
  CRD.AliasMethod.cuda = lambda self: None  # CPU run; sampler unused
  return CRD


torch.set_default_dtype(torch.float64)

B, N, K, DIM_IN, FEAT_DIM = 4, 50, 8, 256, 128
T, MOMENTUM = 0.07, 0.5


# ---- input generator (duplicated verbatim in the test, numpy only) --------
def make_inputs(seed):
  rng = np.random.default_rng(seed)
  stdv = 1.0 / np.sqrt(FEAT_DIM / 3)
  bound = 1.0 / np.sqrt(DIM_IN)
  return dict(
      f_s=rng.standard_normal((B, DIM_IN)),
      f_t=rng.standard_normal((B, DIM_IN)),
      w_s=rng.uniform(-bound, bound, (FEAT_DIM, DIM_IN)),
      b_s=rng.uniform(-bound, bound, FEAT_DIM),
      w_t=rng.uniform(-bound, bound, (FEAT_DIM, DIM_IN)),
      b_t=rng.uniform(-bound, bound, FEAT_DIM),
      memory_v1=rng.uniform(-stdv, stdv, (N, FEAT_DIM)),
      memory_v2=rng.uniform(-stdv, stdv, (N, FEAT_DIM)),
      index=np.array([3, 17, 25, 41]),
      negatives=rng.integers(0, N, (B, K)))


Z_SET = (61.5, 48.25)  # (Z_v1, Z_v2) of the "z_set" case
# ---------------------------------------------------------------------------


def summary(g):
  g = np.asarray(g.detach().numpy() if torch.is_tensor(g) else g)
  idx = [(0,) * g.ndim, tuple(d // 2 for d in g.shape),
         tuple(d - 1 for d in g.shape)]
  ramp = np.linspace(-1.0, 1.0, g.size).reshape(g.shape)  # order-sensitive
  return dict(sum=float(g.sum()), norm=float(np.sqrt((g * g).sum())),
              ramp=float((g * ramp).sum()),
              entries=[(i, float(g[i])) for i in idx])


def run_case(CRD, seed, z):
  x = make_inputs(seed)
  crd = CRD.CRD.__new__(CRD.CRD)
  torch.nn.Module.__init__(crd)
  crd.init_crd_modules(DIM_IN, DIM_IN, FEAT_DIM, N, K, MOMENTUM, T)
  with torch.no_grad():  # parameters and buffers: the numpy inputs
    crd.embed_s.linear.weight.copy_(torch.from_numpy(x["w_s"]))
    crd.embed_s.linear.bias.copy_(torch.from_numpy(x["b_s"]))
    crd.embed_t.linear.weight.copy_(torch.from_numpy(x["w_t"]))
    crd.embed_t.linear.bias.copy_(torch.from_numpy(x["b_t"]))
    crd.contrast.memory_v1.copy_(torch.from_numpy(x["memory_v1"]))
    crd.contrast.memory_v2.copy_(torch.from_numpy(x["memory_v2"]))
    if z is not None:
      crd.contrast.params[2] = z[0]
      crd.contrast.params[3] = z[1]
  assert crd.contrast.params.dtype == torch.float64
  f_s = torch.tensor(x["f_s"], requires_grad=True)
  f_t = torch.tensor(x["f_t"])  # the teacher runs under no_grad
  index = torch.from_numpy(x["index"])
  contrast_idx = torch.from_numpy(
      np.concatenate([x["index"][:, None], x["negatives"]], axis=1))
  loss = crd.crd_loss(f_s, f_t, index, contrast_idx)
  loss = loss.sum()  # ContrastLoss returns shape [1]
  loss.backward()
  mem1 = crd.contrast.memory_v1.numpy()
  mem2 = crd.contrast.memory_v2.numpy()
  return dict(
      loss=loss.item(),
      grad_f_s=summary(f_s.grad),
      grad_w_s=summary(crd.embed_s.linear.weight.grad),
      grad_b_s=summary(crd.embed_s.linear.bias.grad),
      grad_w_t=summary(crd.embed_t.linear.weight.grad),
      grad_b_t=summary(crd.embed_t.linear.bias.grad),
      z_v1=crd.contrast.params[2].item(), z_v2=crd.contrast.params[3].item(),
      memory_v1_rows=summary(mem1[x["index"]]),
      memory_v2_rows=summary(mem2[x["index"]]),
      memory_v1_sum=float(mem1.sum()), memory_v2_sum=float(mem2.sum()))


def main():
  CRD = import_mdistiller_crd()
  goldens = {"z_unset": run_case(CRD, 0, None),
             "z_set": run_case(CRD, 1, Z_SET)}
  print("GOLDENS = {")
  for name, g in goldens.items():
    print(f"    {name!r}: {{")
    for k, v in g.items():
      print(f"        {k!r}: {v!r},")
    print("    },")
  print("}")


if __name__ == "__main__":
  main()
