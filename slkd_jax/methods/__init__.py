"""The methods: one module per method or family, and their registry.

* :mod:`.logit` — ``ce`` (a network alone), ``kd`` (Hinton), ``dkd``
  (decoupled KD, Zhao 2022);
* :mod:`.slkd` — ``slkd`` (teacher + K fused self-learning teachers), its
  ablations ``slkd_t_only`` and ``slkd_slt_only``, and SLKD* ``slkd_seq``;
* :mod:`.feature` — mdistiller's ``w_ce·CE + w_feat·term`` methods:
  ``fitnet``, ``at``, ``sp``, ``rkd``, ``pkt``, ``nst``, ``kdsvd``, ``vid``;
* :mod:`.ofd`, :mod:`.reviewkd` — the same family with margins and
  connectors / attention-based fusion;
* :mod:`.crd` — contrastive representation distillation (memory banks);
* :mod:`.teskd` — a backbone taught by its own branches, one network;
* :mod:`.dml` — K peers teaching each other, no teacher.

:mod:`.base` defines the interface (:class:`Method`) and what an objective
reads (:class:`HParams`, :class:`Logits`, :class:`Context`); adding a method
is its own module and one line in :data:`METHODS` (docs/method.md §3).
Loss weights and the temperature arrive as :class:`HParams` arrays, so a
study can change them (or ``jax.vmap`` over runs) without recompiling.
"""

from __future__ import annotations

from slkd_jax.methods import (crd, dml, feature, logit, ofd, reviewkd, slkd,
                              teskd)
from slkd_jax.methods.base import (LOSS_KEYS, Context, HParams, Logits, Loss,
                                   Method, loss_overrides, loss_settings,
                                   setting_key)

#: Every method by name, in the order of ``--help`` and the docs.
METHODS: dict[str, Method] = {m.name: m for m in [
    *logit.METHODS,
    *slkd.METHODS,
    *feature.METHODS,
    ofd.METHOD,
    reviewkd.METHOD,
    crd.METHOD,
    teskd.METHOD,
    dml.METHOD,
]}


def get(name: str) -> Method:
  """The :class:`Method` called ``name``; a clear error otherwise."""
  try:
    return METHODS[name]
  except KeyError:
    raise ValueError(f"config.method={name!r} is not a method; choose one of "
                     f"{', '.join(METHODS)}") from None


__all__ = ["LOSS_KEYS", "METHODS", "Context", "HParams", "Logits", "Loss",
           "Method", "get", "loss_overrides", "loss_settings", "setting_key"]
