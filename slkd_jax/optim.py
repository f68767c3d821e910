"""The reference optimiser: PyTorch SGD with momentum and coupled weight decay,
and the step-decay learning-rate schedule by epoch (docs/method.md §4).

PyTorch's ``SGD(momentum=m, dampening=0, nesterov=False, weight_decay=wd)``:
``g ← g + wd·w``; ``buf ← m·buf + g`` (``buf = g`` at the first step);
``w ← w − lr·buf`` — on *all* parameters (BN γ/β and biases too). In optax:
``add_decayed_weights(wd) → trace(m)`` gives ``buf``; the step scales it by
``−lr``. With ``nesterov=True`` (TESKD's recipe) PyTorch steps along
``d = g + m·buf`` (``g`` after weight decay, ``buf`` the updated buffer);
``optax.trace(nesterov=True)`` returns exactly that (its buffer starts at 0,
so ``buf = g`` at the first step, as PyTorch's). The learning rate is applied in the step, as an array argument, so
that changing it (every epoch, or across vmapped runs) never recompiles.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import optax


@functools.lru_cache(maxsize=None, typed=True)
def sgd_direction(weight_decay: float, momentum: float,
                  nesterov: bool = False) -> optax.GradientTransformation:
  """Gradient → PyTorch SGD's step direction (the update before ``−lr``):
  the momentum buffer, or with ``nesterov`` ``g + m·buf``. One object per
  setting, so stages with the same optimiser share their compiled steps
  (:mod:`slkd_jax.step_cache`)."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.trace(decay=momentum, nesterov=nesterov))


def apply_sgd(params, buffer, learning_rate: jax.Array):
  """``w ← w − lr·buf``."""
  return jax.tree.map(
      lambda w, b: (w - jnp.asarray(learning_rate, w.dtype) * b).astype(w.dtype),
      params, buffer)


def learning_rate(base_lr: float, epoch: int, decay_epochs: Sequence[int],
                  decay_rate: float = 0.1) -> float:
  """Step decay by epoch: ``lr · rate^#{s ∈ decay_epochs : epoch > s}``.

  ``epoch`` is 1-indexed as in the reference (epoch 151 is the first at
  0.1× with decay_epochs (150, 180, 210)).
  """
  return base_lr * decay_rate ** sum(epoch > s for s in decay_epochs)
