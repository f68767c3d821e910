"""The methods: one module per method or family, and their registry.

=================  ===============  ==========================================
module             methods          student objective
=================  ===============  ==========================================
:mod:`.logit`      ``ce``, ``kd``,  CE; Hinton's KD; decoupled KD (Zhao 2022)
                   ``dkd``
:mod:`.slkd`       ``slkd``,        SLKD: teacher + K fused self-learning
                   ``slkd_t_only``, teachers, its ablations and SLKD*
                   ``slkd_slt_only``,
                   ``slkd_seq``
:mod:`.feature`    ``fitnet``,      w_ce·CE + w_feat·term(features) (mdistiller)
                   ``at``, ``sp``,
                   ``rkd``, ``pkt``,
                   ``nst``,
                   ``kdsvd``,
                   ``vid``
:mod:`.ofd`        ``ofd``          the same family, margins and connectors
:mod:`.crd`        ``crd``          CE + contrastive loss with memory banks
:mod:`.reviewkd`   ``reviewkd``     the feature family, ABFs + HCL
:mod:`.teskd`      ``teskd``        backbone + 3 branches, one network
:mod:`.dml`        ``dml``          K peers, each CE + mean KD to the others
=================  ===============  ==========================================

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
