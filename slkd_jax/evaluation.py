"""Evaluation passes and the shape of their records (host side).

The jitted eval steps (:func:`slkd_jax.train_step.build_eval_step`, and its
study form in :mod:`slkd_jax.studies`) return per-network *sums* over a
batch's real examples; this module adds them over the eval split and turns
them into the ``<network>/<quantity>`` records written to ``metrics.jsonl``.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from slkd_jax import parallel


def evaluate(eval_fn, state, eval_data, hp) -> dict[str, float]:
  """One pass over the eval split: top-1/top-5 (%) and CE per network
  (``hp``: the hyper-parameters of the epoch evaluated, for the fusion)."""
  return eval_record(parallel.global_to_host(
      eval_sums(lambda batch: eval_fn(state, batch, hp), eval_data)))


def eval_sums(sums_of, eval_data):
  """The eval step's sums (``sums_of(batch)``) added over the split."""
  total = None
  for batch in eval_data:
    sums = sums_of(batch)
    total = sums if total is None else add(total, sums)
  return total


def eval_record(host: dict[str, Any]) -> dict[str, float]:
  """Host sums of one pass → top-1/top-5 (%) and mean CE per network, the
  stacked SL-Ts as ``slt_0``, ``slt_1``, ..."""
  host = dict(host)
  count = float(host.pop("count"))
  result = {}
  for key, value in host.items():
    net, name = key.split("/")
    scale = 100.0 / count if name in ("top1", "top5") else 1.0 / count
    if net == "slt":  # [K] -> slt_0, slt_1, ...
      for k, v in enumerate(np.asarray(value)):
        result[f"slt_{k}/{name}"] = float(v) * scale
    else:
      result[key] = float(value) * scale
  result["eval_examples"] = count
  return result


@jax.jit
def add(a, b):
  """Leaf-wise sum of two pytrees of equal structure (on device)."""
  return jax.tree.map(lambda x, y: x + y, a, b)


def flatten_metrics(values: dict[str, Any]) -> dict[str, float]:
  """``{'slt/acc': [a, b]}`` → ``{'slt_0/acc': a, 'slt_1/acc': b}``: one
  ``<network>/<quantity>`` key per stacked network."""
  flat = {}
  for key, value in values.items():
    value = np.asarray(value)
    if value.ndim == 0:
      flat[key] = float(value)
    else:
      network, _, quantity = key.partition("/")
      for k, v in enumerate(value):
        flat[f"{network}_{k}/{quantity}"] = float(v)
  return flat


def eval_line(record: dict[str, Any], names: dict[str, str] | None = None
              ) -> str:
  """``student 71.20%, teacher 79.42%, ...``: a record's top-1s
  (``names``: how to show a network, e.g. ``{'student': 'teacher'}``)."""
  names = names or {}
  keys = [k for k in record if k.endswith("/top1")]
  return ", ".join(f"{names.get(k.split('/')[0], k.split('/')[0])} "
                   f"{record[k]:.2f}%" for k in keys)
