"""The run behind tests/test_loop_golden.py and how it is fingerprinted."""

import glob
import hashlib
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization, traverse_util

from slkd_jax import config as config_lib

STAGES = ("teacher", "slkd", "fitnet", "crd", "dml")
# Fields of metrics.jsonl that are wall-clock facts, not computed numbers.
UNTIMED = ("time", "images_per_second", "elapsed", "wall")


def config():
  """Synthetic 8×8 data, 5 classes, 3 steps per epoch (the last padded)."""
  c = config_lib.base_config()
  c.data.name = "synthetic"
  c.data.image_size = 8
  c.data.num_classes = 5
  c.data.num_train = 40
  c.data.num_test = 20
  c.batch_size = 16
  c.eval_batch_size = 16
  c.teacher.arch = "resnet8"
  c.teacher.num_epochs = 1
  c.student.arch = "resnet8"
  c.num_epochs = 2
  c.log_every_steps = 2
  c.checkpoint_every_epochs = 1
  c.compare_with = ("fitnet", "crd", "dml")
  c.recipes.crd.nce_k = 16
  c.recipes.crd.feat_dim = 32
  return c


def _digest(array) -> str:
  array = np.ascontiguousarray(np.asarray(array))
  return f"{array.dtype}{list(array.shape)}:" + hashlib.sha256(
      array.tobytes()).hexdigest()[:32]


def _flat(tree, prefix):
  flat = traverse_util.flatten_dict(tree, sep="/") if isinstance(
      tree, dict) else {"": tree}
  return {f"{prefix}/{k}": _digest(v) for k, v in flat.items()
          if v is not None}


def _checkpoint(stage_dir):
  steps = sorted(int(os.path.basename(p)) for p in
                 glob.glob(os.path.join(stage_dir, "checkpoints", "[0-9]*")))
  path = os.path.join(stage_dir, "checkpoints", str(steps[-1]), "state")
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(path).item_metadata
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), meta)
    state = ckptr.restore(path, target)
  out = {"step": int(np.asarray(state["step"]))}
  for part in ("student", "slts", "modules", "buffers"):
    if state.get(part) is not None:
      out.update(_flat(serialization.to_state_dict(state[part]), part))
  return out


def _metrics(stage_dir):
  records = []
  with open(os.path.join(stage_dir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      records.append({k: v for k, v in record.items()
                      if not any(t in k for t in UNTIMED)})
  return records


def machine() -> dict:
  """The CPU a fingerprint was made on: XLA:CPU picks its kernels by the
  instruction set, so float32 results differ in the last bits between CPU
  models."""
  cpu, flags = "unknown", ""
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      info = dict(line.split(":", 1) for line in f if ":" in line)
    info = {k.strip(): v.strip() for k, v in info.items()}
    cpu, flags = info.get("model name", cpu), info.get("flags", "")
  isa = sorted(f for f in flags.split() if f.startswith(("avx", "amx")))
  return {"cpu": cpu, "isa": " ".join(isa)}


def fingerprint(workdir):
  """Every stage's metrics and array digests."""
  result = {}
  for stage in STAGES:
    stage_dir = os.path.join(workdir, stage)
    with open(os.path.join(stage_dir, "final_model", "model.msgpack"),
              "rb") as f:
      model = serialization.msgpack_restore(f.read())
    result[stage] = {"metrics": _metrics(stage_dir),
                     "final_model": _flat(model, "model"),
                     "checkpoint": _checkpoint(stage_dir)}
  return result
