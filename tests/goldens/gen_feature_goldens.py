"""Golden values for tests/test_feature_losses.py from mdistiller's own code.

Runs mdistiller's loss functions / modules (a copy of
mdistiller/distillers/{_common,AT,SP,RKD,PKT,NST,KDSVD,VID}.py at commit
a08d46f extracted to /tmp/mdref; KDSVD's `.float()` cast patched to float64)
with torch in float64 on inputs drawn with numpy default_rng, and prints the
loss, gradient summaries and BN running stats as a Python literal.

Usage: python /tmp/gen_feature_goldens.py > /tmp/goldens.py
"""
import os
import sys

import numpy as np
import torch
import torch.nn as tnn
import torch.nn.functional as F

# A checkout of mdistiller at a08d46f (its mdistiller/ package), e.g.
# `git clone https://github.com/megvii-research/mdistiller /tmp/mdref`.
sys.path.insert(0, os.environ.get("MDISTILLER_DIR", "/tmp/mdref"))
from mdistiller.distillers import AT, KDSVD, NST, PKT, RKD, SP, VID  # noqa
from mdistiller.distillers._common import ConvReg  # noqa

torch.set_default_dtype(torch.float64)

B = 4
# NCHW feature shapes (no batch) of resnet8x4 and resnet32x4 on CIFAR:
# feats = [f0, f1, f2, f3]; pooled_feat [B, 256].
FEAT_SHAPES = [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8)]
POOLED = 256
KDSVD_SHAPES = [(6, 8, 8), (10, 6, 6), (12, 5, 5)]


# ---- input generators (duplicated verbatim in the test, numpy only) -------
def make_features(seed, shapes_s, shapes_t, pooled=None, batch=B):
  rng = np.random.default_rng(seed)
  fs = [np.abs(rng.standard_normal((batch,) + tuple(s))) for s in shapes_s]
  ft = [np.abs(rng.standard_normal((batch,) + tuple(s))) for s in shapes_t]
  ps = pt = None
  if pooled:
    ps = rng.standard_normal((batch, pooled))
    pt = rng.standard_normal((batch, pooled))
  return fs, ft, ps, pt


def make_convreg_params(seed, s_c, t_c, k, transpose):
  rng = np.random.default_rng(seed)
  shape = (s_c, t_c, k, k) if transpose else (t_c, s_c, k, k)
  return dict(weight=rng.uniform(-0.3, 0.3, shape),
              bias=rng.uniform(-0.1, 0.1, t_c),
              bn_weight=rng.uniform(0.5, 1.5, t_c),
              bn_bias=rng.uniform(-0.2, 0.2, t_c))


def make_vid_params(seed, s_channels, t_channels):
  rng = np.random.default_rng(seed)
  layers = []
  for s, t in zip(s_channels, t_channels):
    layers.append(dict(
        w0=rng.uniform(-1, 1, (t, s, 1, 1)) / np.sqrt(s),
        w2=rng.uniform(-1, 1, (t, t, 1, 1)) / np.sqrt(t),
        w4=rng.uniform(-1, 1, (t, t, 1, 1)) / np.sqrt(t),
        log_scale=rng.standard_normal(t) + 1.0))
  return layers
# ---------------------------------------------------------------------------


def summary(g):
  g = g.detach().numpy()
  idx = [(0,) * g.ndim, tuple(d // 2 for d in g.shape),
         tuple(d - 1 for d in g.shape)]
  return dict(sum=float(g.sum()), norm=float(np.sqrt((g * g).sum())),
              entries=[(i, float(g[i])) for i in idx])


def leaf(a, grad=True):
  return torch.tensor(a, dtype=torch.float64, requires_grad=grad)


def run_loss(fn, fs, ft, *args):
  s = [leaf(a) for a in fs]
  t = [leaf(a, False) for a in ft]
  loss = fn(s, t, *args)
  loss.backward()
  return dict(loss=loss.item(), grads=[summary(x.grad) for x in s])


def run_pooled(fn, ps, pt, **kw):
  s, t = leaf(ps), leaf(pt, False)
  loss = fn(s, t, **kw)
  loss.backward()
  return dict(loss=loss.item(), grads=[summary(s.grad)])


def run_convreg(f_s, f_t, p):
  s_shape, t_shape = f_s.shape, f_t.shape
  reg = ConvReg(s_shape, t_shape).double()
  reg.train()
  with torch.no_grad():
    reg.conv.weight.copy_(torch.from_numpy(p["weight"]))
    reg.conv.bias.copy_(torch.from_numpy(p["bias"]))
    reg.bn.weight.copy_(torch.from_numpy(p["bn_weight"]))
    reg.bn.bias.copy_(torch.from_numpy(p["bn_bias"]))
  s = leaf(f_s)
  loss = F.mse_loss(reg(s), leaf(f_t, False))  # FitNet.forward_train
  loss.backward()
  return dict(loss=loss.item(), kind=type(reg.conv).__name__,
              grads=[summary(s.grad)],
              param_grads={k: summary(v.grad)
                           for k, v in reg.named_parameters()},
              running_mean_sum=float(reg.bn.running_mean.sum()),
              running_var_sum=float(reg.bn.running_var.sum()))


def build_vid(s_channels, t_channels, layers):
  """mdistiller's own VID.init_vid_modules, weights then overwritten."""
  vid = VID.VID.__new__(VID.VID)
  tnn.Module.__init__(vid)
  vid.init_pred_var, vid.eps = 5.0, 1e-5
  vid.init_vid_modules(s_channels, t_channels)
  init_log_scale = float(vid.log_scales[0][0])
  log_scales = []
  for reg, p in zip(vid.regressors, layers):
    reg.double()
    with torch.no_grad():
      for i, k in ((0, "w0"), (2, "w2"), (4, "w4")):
        reg[i].weight.copy_(torch.from_numpy(p[k]))
    log_scales.append(leaf(p["log_scale"]))
  return vid, log_scales, init_log_scale


def run_vid(fs, ft, layers):
  vid, log_scales, init_ls = build_vid([f.shape[1] for f in fs],
                                       [f.shape[1] for f in ft], layers)
  s = [leaf(a) for a in fs]
  loss = 0
  for i in range(len(s)):  # VID.forward_train
    loss = loss + VID.vid_loss(vid.regressors[i], log_scales[i], s[i],
                               leaf(ft[i], False), 1e-5)
  loss.backward()
  return dict(loss=loss.item(), grads=[summary(x.grad) for x in s],
              log_scale_grads=[summary(x.grad) for x in log_scales],
              weight_grads=[{k: summary(reg[i].weight.grad)
                             for i, k in ((0, "w0"), (2, "w2"), (4, "w4"))}
                            for reg in vid.regressors],
              init_log_scale=init_ls)


def is_summary(obj):
  return isinstance(obj, dict) and set(obj) == {"entries", "norm", "sum"}


def fmt_summary(obj, col):
  """A gradient summary whose opening brace sits at column ``col``."""
  lead = " " * (col + 1 + len("'entries': ["))
  entries = f",\n{lead}".join(repr(e) for e in obj["entries"])
  return (f"{{'norm': {obj['norm']!r}, 'sum': {obj['sum']!r},\n"
          f"{' ' * (col + 1)}'entries': [{entries}]}}")


def fmt(obj, depth):
  """A Python literal, one item per line, 2-space indents (< 80 columns)."""
  pad = "  " * depth
  inner = len(pad) + 2
  if isinstance(obj, dict):
    items = []
    for k in sorted(obj):
      if is_summary(obj[k]):
        items.append(f"{pad}  {k!r}:\n{' ' * (inner + 2)}"
                     + fmt_summary(obj[k], inner + 2) + ",")
      else:
        items.append(f"{pad}  {k!r}: {fmt(obj[k], depth + 1)},")
    return "{\n" + "\n".join(items) + f"\n{pad}}}"
  if isinstance(obj, list):
    items = [f"{pad}  " + (fmt_summary(v, inner) if is_summary(v)
                           else fmt(v, depth + 1)) + "," for v in obj]
    return "[\n" + "\n".join(items) + f"\n{pad}]"
  return repr(obj)


def main():
  out = {}
  fs, ft, ps, pt = make_features(0, FEAT_SHAPES, FEAT_SHAPES, POOLED)
  out["fitnet"] = run_convreg(fs[2], ft[2],
                              make_convreg_params(1, 128, 128, 1, False))
  out["at"] = run_loss(lambda s, t: AT.at_loss(s, t, 2), fs[1:], ft[1:])
  out["sp"] = run_loss(SP.sp_loss, fs[-1:], ft[-1:])
  out["nst"] = run_loss(NST.nst_loss, fs[1:], ft[1:])
  out["kdsvd"] = run_loss(lambda s, t: KDSVD.kdsvd_loss(s, t, 1),
                          fs[1:], ft[1:])
  out["rkd"] = run_pooled(RKD.rkd_loss, ps, pt)
  out["rkd_squared"] = run_pooled(RKD.rkd_loss, ps, pt, squared=True)
  out["pkt"] = run_pooled(PKT.pkt_loss, ps, pt)
  chans = [f.shape[1] for f in fs[1:]]
  out["vid"] = run_vid(fs[1:], ft[1:], make_vid_params(2, chans, chans))

  # Spatial pooling (student larger / smaller / non-divisible) for AT, NST,
  # VID, and channel counts differing between student and teacher.
  pool_s, pool_t = [(8, 8, 8), (6, 4, 4), (5, 6, 6)], [(8, 4, 4), (6, 8, 8),
                                                       (7, 4, 4)]
  qs, qt, _, _ = make_features(3, pool_s, pool_t)
  out["at_pool"] = run_loss(lambda s, t: AT.at_loss(s, t, 2), qs, qt)
  out["nst_pool"] = run_loss(NST.nst_loss, qs, qt)
  out["vid_pool"] = run_vid(qs, qt, make_vid_params(
      4, [s[0] for s in pool_s], [t[0] for t in pool_t]))

  # KDSVD with k = 2 (non-trivial singular-value weights) on small maps.
  ks, kt, _, _ = make_features(7, KDSVD_SHAPES, KDSVD_SHAPES)
  out["kdsvd_k2"] = run_loss(lambda s, t: KDSVD.kdsvd_loss(s, t, 2), ks, kt)

  # ConvReg's three kernels: 3x3 stride 2, transposed 4x4 stride 2, valid.
  cases = {"conv_s2": ((3, 8, 8), (5, 4, 4)),
           "transpose": ((3, 4, 4), (5, 8, 8)),
           "valid": ((3, 6, 6), (5, 4, 4))}
  for name, (ss, ts) in cases.items():
    cs, ct, _, _ = make_features(5, [ss], [ts])
    k = {"conv_s2": 3, "transpose": 4, "valid": 3}[name]
    out[f"convreg_{name}"] = run_convreg(
        cs[0], ct[0], make_convreg_params(6, 3, 5, k, name == "transpose"))
  print("GOLDEN = " + fmt(out, 0))


if __name__ == "__main__":
  main()
