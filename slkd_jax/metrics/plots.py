"""PNG plots of a per-epoch eval history: accuracy curves and the paper's
Figure 2 learning trajectories. matplotlib is imported when a plot is
drawn."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from slkd_jax.metrics.tables import networks
from slkd_jax.metrics.values import to_python


def _series(history: Sequence[Mapping[str, Any]], key: str
            ) -> tuple[list[float], list[float]]:
  xs, ys = [], []
  for index, entry in enumerate(history):
    value = entry.get(key)
    if value is None:
      continue
    xs.append(float(entry.get("epoch", index + 1)))
    ys.append(float(to_python(value)))
  return xs, ys


# What the step computes (losses.kl_divergence(student, target) at T = 1):
# the target's distribution comes first inside the KL.
_TRAJECTORY_LABELS = {
    "student/kl_teacher": "KL(p_teacher ‖ p_student)",
    "student/kl_fused": "KL(p_fused ‖ p_student)",
}


def plot_history(history: Sequence[Mapping[str, Any]],
                 out_dir: str | os.PathLike,
                 names: Mapping[str, str] | None = None) -> list[str]:
  """Writes PNG plots of a per-epoch eval history; returns the written paths.

  * ``accuracy.png``: eval top-1 per epoch of every ``'<net>/top1'`` key.
  * ``trajectory.png``: the learning trajectories of the paper's Figure 2,
    per-epoch ``student/kl_teacher`` and ``student/kl_fused``.

  A plot whose keys appear in no entry is skipped (no file written).
  ``names`` relabels networks (the teacher stage's ``student`` is the
  teacher).
  """
  names = names or {}
  top1_keys = [f"{net}/top1" for net in networks(history)]
  kl_keys = [k for k in _TRAJECTORY_LABELS
             if any(entry.get(k) is not None for entry in history)]
  if not top1_keys and not kl_keys:
    return []

  # The Agg canvas directly, not pyplot: no global backend switch and no
  # figure registry to leak, whatever backend the caller's process uses.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.ticker import MaxNLocator

  os.makedirs(out_dir, exist_ok=True)
  written = []

  def save(keys, labels, ylabel, title, filename):
    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for key, label in zip(keys, labels):
      xs, ys = _series(history, key)
      ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # Whole epochs.
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    # Fixed margins for this figure size: tight_layout measured every text
    # box and took ~40 % of each plot's time, redrawn every epoch.
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.12, top=0.92)
    path = os.path.join(os.fspath(out_dir), filename)
    fig.savefig(path, format="png")
    written.append(path)

  if top1_keys:
    save(top1_keys, [names.get(k.rsplit("/", 1)[0], k.rsplit("/", 1)[0])
                     for k in top1_keys],
         "top-1 accuracy (%)", "Eval top-1 per epoch", "accuracy.png")
  if kl_keys:
    save(kl_keys, [_TRAJECTORY_LABELS[k] for k in kl_keys],
         "KL divergence (T = 1)", "Learning trajectories", "trajectory.png")
  return written
