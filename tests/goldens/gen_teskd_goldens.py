"""Golden values for tests/test_teskd.py from TESKD's official code.

Imports ``classification/models/resnet_our.py`` and
``classification/distill_loss/KD.py`` of github.com/zhengli427/TESKD at
commit 10817c7 (a checkout, ``TESKD_DIR``) and, with torch in float64:

1. counts the parameters / buffers of ``cifarresnet18`` and ``cifarresnet34``
   (100 classes) and hashes their state_dict layout (``key:shape`` lines,
   sorted);
2. fills ``cifarresnet18`` (100 classes) with deterministic weights
   (``weights_for``, duplicated verbatim in the test) and records its eight
   outputs on fixed images, in eval mode and in train mode (batch statistics);
3. evaluates the official training loss (``utils.train``'s formula with
   ``KL_Loss(T=4)``, ``Fea_Loss`` and ``nn.CrossEntropyLoss``) on the worked
   example of the TESKD specification, with its gradients, and the same with
   the KL target detached (``out.detach()`` passed to ``KL_Loss``).

Prints a Python literal to paste into the test.

Usage: TESKD_DIR=/path/to/TESKD python tests/goldens/gen_teskd_goldens.py
"""
import hashlib
import importlib.util
import os
import zlib

import numpy as np
import torch
import torch.nn as tnn

torch.set_default_dtype(torch.float64)
ROOT = os.path.join(os.environ.get("TESKD_DIR", "/tmp/TESKD"), "classification")


def _load(name, rel):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, rel))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


resnet_our = _load("resnet_our", "models/resnet_our.py")
kd = _load("teskd_kd", "distill_loss/KD.py")


# ---- deterministic weights (duplicated verbatim in the test) --------------
def weights_for(key, shape):
  """A value for state_dict entry ``key``: seeded by the key with ``_`` read
  as ``.`` (so the official ``fuse_3.0`` and ``fuse.3.0`` agree)."""
  rng = np.random.RandomState(zlib.crc32(key.replace("_", ".").encode()))
  leaf = key.rsplit(".", 1)[-1]
  if len(shape) >= 2:
    bound = 1.0 / np.sqrt(np.prod(shape[1:]))
    return rng.uniform(-bound, bound, shape)
  if leaf in ("weight", "running_var"):
    return rng.uniform(0.5, 1.5, shape)
  return rng.uniform(-0.1, 0.1, shape)  # biases, running means


def images(batch, seed):
  return np.random.RandomState(seed).standard_normal((batch, 3, 32, 32))
# ---------------------------------------------------------------------------


def layout(model):
  lines = sorted(f"{k}:{tuple(v.shape)}" for k, v in
                 model.state_dict().items() if "num_batches_tracked" not in k)
  return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def counts(model):
  params = sum(p.numel() for p in model.parameters())
  buffers = sum(b.numel() for n, b in model.named_buffers()
                if "num_batches_tracked" not in n)
  return params, buffers


def fingerprint(outputs):
  """Per output (flattened to [B, N]): its first 4 columns, row sums and
  row L2 norms."""
  return [{"head": o[:, :4], "sum": o.sum(1), "norm": np.linalg.norm(o, axis=1)}
          for o in (x.reshape(x.shape[0], -1).numpy() for x in outputs)]


def forward_goldens():
  model = resnet_our.cifarresnet18(num_classes=100)
  sd = {k: (torch.tensor(weights_for(k, tuple(v.shape)))
            if v.dtype.is_floating_point else v)
        for k, v in model.state_dict().items()}
  model.load_state_dict(sd)
  out = {}
  model.eval()
  with torch.no_grad():
    out["eval"] = fingerprint(model(torch.tensor(images(2, 0))))
  model.train()
  with torch.no_grad():
    out["train"] = fingerprint(model(torch.tensor(images(4, 1))))
  return out


WORKED = dict(
    y=[2, 0],
    z_bb=[[1, 2, 3], [0.5, -1, 2]],
    z=[[[2, 1, 0], [1, 1, 3]], [[0, .5, 1], [2, 0, -1]],
       [[1, -1, 0], [0, 1, 1]]],
    f_bb=[[.5, 0, 1, 2], [1, 1, 0, .3]],
    f=[[[.4, .1, 1.2, 1.5], [.9, 1.1, 0, 0]],
       [[0, 0, .8, 2.2], [1.5, .7, .2, .1]],
       [[.6, .2, .9, 1.9], [.8, 1.3, 0, .5]]])


def worked_example(detach_kd_target):
  """``utils.train``'s loss (all weights at main.py's defaults)."""
  t = lambda v: torch.tensor(v, dtype=torch.float64, requires_grad=True)  # noqa
  out, (b1, b2, b3) = t(WORKED["z_bb"]), [t(v) for v in WORKED["z"]]
  final_fea = t(WORKED["f_bb"])
  b1_fea, b2_fea, b3_fea = [t(v) for v in WORKED["f"]]
  targets = torch.tensor(WORKED["y"])
  ce, kl, fea = tnn.CrossEntropyLoss(), kd.KL_Loss(temperature=4.0), kd.Fea_Loss()
  target = out.detach() if detach_kd_target else out
  loss_model = (1.0 * ce(out, targets) + 1.0 * ce(b1, targets)
                + 1.0 * ce(b2, targets) + 1.0 * ce(b3, targets))
  loss_kd = kl(b1, target) + kl(b2, target) + kl(b3, target)
  loss_fea = (fea(b1_fea, final_fea.detach()) + fea(b2_fea, final_fea.detach())
              + fea(b3_fea, final_fea.detach()))
  loss = 0.2 * loss_model + 0.8 * loss_kd + 1e-7 * loss_fea
  loss.backward()
  return {"ce": loss_model.item(), "kl": loss_kd.item(),
          "fea": loss_fea.item(), "loss": loss.item(),
          "grad_z_bb": out.grad.numpy(),
          "grad_z": np.stack([b1.grad.numpy(), b2.grad.numpy(),
                              b3.grad.numpy()]),
          "grad_f": np.stack([b1_fea.grad.numpy(), b2_fea.grad.numpy(),
                              b3_fea.grad.numpy()]),
          "grad_f_bb_is_none": final_fea.grad is None}


def main():
  np.set_printoptions(precision=17, floatmode="unique", linewidth=100,
                      threshold=100000)
  result = {}
  for name in ("cifarresnet18", "cifarresnet34"):
    model = getattr(resnet_our, name)(num_classes=100)
    result[name] = {"counts": counts(model), "layout": layout(model)}
  result["forward"] = forward_goldens()
  result["worked"] = worked_example(False)
  result["worked_detached"] = worked_example(True)
  print(repr(result))


if __name__ == "__main__":
  main()
