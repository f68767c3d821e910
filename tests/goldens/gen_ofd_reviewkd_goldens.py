"""Golden values for tests/test_ofd.py and tests/test_reviewkd.py from
mdistiller's own code.

Runs mdistiller's ``OFD.forward_train`` and ``ReviewKD.forward_train``
(mdistiller/distillers/{OFD,ReviewKD}.py at commit a08d46f) with torch in
float64. The networks are stand-ins that return fixed feature tensors of
resnet32x4 (teacher) and resnet8x4 (student) at 32x32 (and, for OFD, the
teacher's BatchNorms before ReLU); every input and parameter is drawn with
numpy ``default_rng`` by the generators below (duplicated verbatim in the
tests) and copied into mdistiller's modules. Prints the weighted
distillation loss (``losses_dict["loss_kd"]``), gradient summaries w.r.t. the
student features and every connector / ABF parameter, OFD's margins, and
the BN running statistics, as a Python literal; also PyTorch's nearest
interpolation indices on odd sizes.

Usage:
  MDISTILLER_DIR=/tmp/mdref python tests/goldens/gen_ofd_reviewkd_goldens.py
"""
import os
import sys
import types

import numpy as np
import torch
import torch.nn as tnn
import torch.nn.functional as F

# A checkout of mdistiller at a08d46f (its mdistiller/ package).
sys.path.insert(0, os.environ.get("MDISTILLER_DIR", "/tmp/mdref"))
from mdistiller.distillers.OFD import OFD  # noqa: E402
from mdistiller.distillers.ReviewKD import ReviewKD  # noqa: E402

torch.set_default_dtype(torch.float64)

B = 3
# NCHW feats / preact_feats shapes (no batch) of resnet8x4 and resnet32x4.
SHAPES = [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8)]
POOLED = 256


# ---- input generators (duplicated verbatim in the tests, numpy only) ------
def make_outputs(rng, batch=B):
  """feats (>= 0), preact_feats (signed) and pooled_feat of one network."""
  preact = [rng.standard_normal((batch,) + s) for s in SHAPES]
  feats = [np.abs(rng.standard_normal((batch,) + s)) for s in SHAPES]
  pooled = np.abs(rng.standard_normal((batch, POOLED)))
  return dict(feats=feats, preact_feats=preact, pooled_feat=pooled)


def make_ofd_case(seed=0, batch=B):
  """Student/teacher outputs, connector params (OIHW) and the teacher's BN
  (weight, bias) before each stage's last ReLU."""
  rng = np.random.default_rng(seed)
  student, teacher = make_outputs(rng, batch), make_outputs(rng, batch)
  chans = [s[0] for s in SHAPES[1:]]
  conv = [rng.uniform(-1, 1, (c, c, 1, 1)) / np.sqrt(c) for c in chans]
  bn = [(rng.uniform(0.5, 1.5, c), rng.uniform(-0.2, 0.2, c)) for c in chans]
  t_bn = [(rng.uniform(-1.5, 1.5, c), rng.uniform(-1.0, 3.0, c))
          for c in chans]
  return student, teacher, conv, bn, t_bn


def make_abf_params(rng, in_c, mid, out_c, fuse):
  p = dict(conv1=rng.uniform(-1, 1, (mid, in_c, 1, 1)) / np.sqrt(in_c),
           bn1=(rng.uniform(0.5, 1.5, mid), rng.uniform(-0.2, 0.2, mid)),
           conv2=rng.uniform(-1, 1, (out_c, mid, 3, 3)) / np.sqrt(9 * mid),
           bn2=(rng.uniform(0.5, 1.5, out_c), rng.uniform(-0.2, 0.2, out_c)))
  if fuse:
    p["att_w"] = rng.uniform(-1, 1, (2, 2 * mid, 1, 1)) / np.sqrt(2 * mid)
    p["att_b"] = rng.uniform(-0.1, 0.1, 2)
  return p


def make_reviewkd_case(seed=1, batch=B):
  """Student/teacher outputs and ABF params in mdistiller's build order
  (IN_CHANNELS order, shallow -> deep; the last one does not fuse)."""
  rng = np.random.default_rng(seed)
  student, teacher = make_outputs(rng, batch), make_outputs(rng, batch)
  in_c, out_c = [64, 128, 256, 256], [64, 128, 256, 256]
  abfs = [make_abf_params(rng, i, 256, o, k < 3)
          for k, (i, o) in enumerate(zip(in_c, out_c))]
  return student, teacher, abfs
# ---------------------------------------------------------------------------


def summary(g):
  g = g.detach().numpy()
  idx = [(0,) * g.ndim, tuple(d // 2 for d in g.shape),
         tuple(d - 1 for d in g.shape)]
  return dict(sum=float(g.sum()), norm=float(np.sqrt((g * g).sum())),
              entries=[(i, float(g[i])) for i in idx])


def leaf(a, grad=True):
  return torch.tensor(a, dtype=torch.float64, requires_grad=grad)


class FixedNet(tnn.Module):
  """A network that returns fixed logits and feature tensors."""

  def __init__(self, outputs, grad, stage_channels=None, bns=None):
    super().__init__()
    self.outs = {k: ([leaf(a, grad) for a in v] if isinstance(v, list)
                     else leaf(v, grad)) for k, v in outputs.items()}
    self.stage_channels = stage_channels
    self.bns = bns

  def forward(self, image):
    logits = torch.zeros(image.shape[0], 100)
    return logits, self.outs

  def get_stage_channels(self):
    return self.stage_channels

  def get_bn_before_relu(self):
    return self.bns


def copy_(param, value):
  with torch.no_grad():
    param.copy_(torch.from_numpy(np.asarray(value)))


def bn_module(weight, bias):
  bn = tnn.BatchNorm2d(len(weight))
  copy_(bn.weight, weight)
  copy_(bn.bias, bias)
  return bn


def run_ofd():
  student, teacher, conv, bn, t_bn = make_ofd_case()
  chans = [s[0] for s in SHAPES]
  s_net = FixedNet(student, True, chans)
  t_net = FixedNet(teacher, False, chans, [bn_module(*p) for p in t_bn])
  cfg = types.SimpleNamespace(OFD=types.SimpleNamespace(
      LOSS=types.SimpleNamespace(CE_WEIGHT=1.0, FEAT_WEIGHT=0.001),
      CONNECTOR=types.SimpleNamespace(KERNEL_SIZE=1)))
  ofd = OFD(s_net, t_net, cfg).double()
  ofd.train()
  for seq, w, (g, b) in zip(ofd.connectors.connectors, conv, bn):
    copy_(seq[0].weight, w)
    copy_(seq[1].weight, g)
    copy_(seq[1].bias, b)
  image = torch.zeros(B, 3, 32, 32)
  _, losses = ofd.forward_train(image, torch.zeros(B, dtype=torch.long))
  loss = losses["loss_kd"]
  loss.backward()
  return dict(
      loss=loss.item(),
      margins=[summary(m.flatten().double()) for m in ofd.margins],
      grads=[summary(x.grad) for x in s_net.outs["preact_feats"][1:]],
      param_grads={f"{i}.{k}": summary(v.grad) for i, seq in
                   enumerate(ofd.connectors.connectors)
                   for k, v in seq.named_parameters()},
      running_var_sums=[float(seq[1].running_var.sum())
                        for seq in ofd.connectors.connectors])


def run_reviewkd(epoch):
  student, teacher, abfs = make_reviewkd_case()
  s_net = FixedNet(student, True)
  t_net = FixedNet(teacher, False)
  # cfg.py defaults (the resnet32x4 -> resnet8x4 yaml only sets the weight).
  cfg = types.SimpleNamespace(REVIEWKD=types.SimpleNamespace(
      CE_WEIGHT=1.0, REVIEWKD_WEIGHT=5.0, WARMUP_EPOCHS=20,
      SHAPES=[1, 8, 16, 32], OUT_SHAPES=[1, 8, 16, 32],
      IN_CHANNELS=[64, 128, 256, 256], OUT_CHANNELS=[64, 128, 256, 256],
      MAX_MID_CHANNEL=512, STU_PREACT=False))
  rkd = ReviewKD(s_net, t_net, cfg).double()
  rkd.train()
  # rkd.abfs is reversed: abfs[j] was built as IN_CHANNELS index 3 - j.
  for j, abf in enumerate(rkd.abfs):
    p = abfs[len(abfs) - 1 - j]
    copy_(abf.conv1[0].weight, p["conv1"])
    copy_(abf.conv1[1].weight, p["bn1"][0])
    copy_(abf.conv1[1].bias, p["bn1"][1])
    copy_(abf.conv2[0].weight, p["conv2"])
    copy_(abf.conv2[1].weight, p["bn2"][0])
    copy_(abf.conv2[1].bias, p["bn2"][1])
    if abf.att_conv is not None:
      copy_(abf.att_conv[0].weight, p["att_w"])
      copy_(abf.att_conv[0].bias, p["att_b"])
  image = torch.zeros(B, 3, 32, 32)
  _, losses = rkd.forward_train(image, torch.zeros(B, dtype=torch.long),
                                epoch=epoch)
  loss = losses["loss_kd"]
  loss.backward()
  return dict(
      loss=loss.item(),
      # feats[0] (the stem) gets no gradient: mdistiller's zip drops it.
      stem_unused=s_net.outs["feats"][0].grad is None,
      grads=[summary(x.grad) for x in s_net.outs["feats"][1:]]
      + [summary(s_net.outs["pooled_feat"].grad)],
      param_grads={f"{j}.{k}": summary(v.grad)
                   for j, abf in enumerate(rkd.abfs)
                   for k, v in abf.named_parameters()},
      running_var_sums=[float(abf.conv2[1].running_var.sum())
                        for abf in rkd.abfs])


def nearest_indices():
  """PyTorch's nearest source rows for odd (in, out) sizes."""
  out = {}
  for n_in, n_out in [(3, 7), (7, 3), (5, 9), (9, 5), (1, 5), (6, 11),
                      (11, 6), (13, 37), (37, 13), (4, 8), (8, 4)]:
    x = torch.arange(n_in, dtype=torch.float64).view(1, 1, n_in, 1)
    y = F.interpolate(x, (n_out, 1), mode="nearest")
    out[f"{n_in}->{n_out}"] = [int(v) for v in y.flatten().tolist()]
  return out


def main():
  out = dict(ofd=run_ofd(), reviewkd=run_reviewkd(epoch=5),
             reviewkd_epoch30=run_reviewkd(epoch=30)["loss"],
             nearest=nearest_indices())
  import pprint
  pprint.pprint(out, width=79, sort_dicts=True)


if __name__ == "__main__":
  main()
