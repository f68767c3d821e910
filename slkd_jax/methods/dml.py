"""Deep mutual learning (Zhang et al., CVPR 2018): K peers teach each other.

K ≥ 2 networks train together from scratch, without a teacher. Peer k
minimises

  L_k = w_ce·CE(z_k, y) + w_kd · 1/(K−1) · Σ_{j≠k} KD_T(z_k, sg(z_j))

with KD_T of :func:`slkd_jax.losses.kd_loss` (T²·KL(p_j^T ‖ p_k^T); the
paper's KL(p_j ‖ p_k) at T = 1, w_ce = w_kd = 1). The other peers' logits
are targets: gradient stopped.

Where the peers live in :class:`~slkd_jax.state.DistillState`: peer 0 is
``student`` (``config.student.arch``), peers 1..K−1 are the stacked ``slts``
(``config.teacher.arch``). Two update orders (``config.dml.update_order``):

* ``'sequential'`` (the paper's Algorithm 1): the peers update in turn;
  peer k's targets are the already updated peers j < k, recomputed with
  their new parameters on the same batch (train mode: batch statistics),
  and the not yet updated peers j > k.
* ``'simultaneous'``: every peer's targets are the other peers' predictions
  before the step; one joint gradient.

BatchNorm running statistics move once per peer per step, from the forward
whose gradient updates that peer (in a PyTorch loop: the forward before
``optimizer_k.step()``); the recomputed predictions of updated peers only
serve as targets and leave the running statistics alone. docs/dml.md has the
details and the recipe.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from slkd_jax import losses
from slkd_jax.methods.base import HParams, Method, check, is_int
from slkd_jax.methods.logit import ce_objective
from slkd_jax.state import DistillState, ModelState, TrainState
from slkd_jax.step_parts import (ENSEMBLES, apply_ensemble, apply_train,
                                 sgd_update)


def peer_loss(logits: jax.Array, targets: jax.Array, labels: jax.Array,
              hp: HParams, mask: jax.Array | None = None
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """One peer's DML objective.

  Args:
    logits: the peer's ``[B, C]``.
    targets: the other K−1 peers' ``[K−1, B, C]`` (gradient stopped here).
    labels: ``[B]``.
    hp: ``ce_weight``, ``kd_weight`` and ``temperature`` are used.
    mask: ``[B]`` real examples.

  Returns:
    ``(w_ce·CE + w_kd·mean_j KD_T(z, sg(z_j)), {'ce', 'kl_peers'})`` with
    ``kl_peers`` the unweighted mean over the K−1 targets.
  """
  targets = jax.lax.stop_gradient(targets)
  ce = losses.cross_entropy(logits, labels, mask)
  kl = jnp.mean(jax.vmap(losses.kd_loss, (None, 0, None, None))(
      logits, targets, hp.temperature, mask))
  return hp.ce_weight * ce + hp.kd_weight * kl, {"ce": ce, "kl_peers": kl}


def _others(peer_logits: list[jax.Array], k: int) -> jax.Array:
  return jnp.stack([z for j, z in enumerate(peer_logits) if j != k])


def _peer_metrics(k: int, terms: dict[str, jax.Array], logits, labels,
                  mask) -> dict[str, jax.Array]:
  """Peer 0 logs as ``student/*``, peer k ≥ 1 as ``peer_k/*``."""
  acc = losses.accuracy(logits, labels, mask)
  if k == 0:
    return {"student/ce": terms["ce"], "student/kl_peers": terms["kl_peers"],
            "student/acc": acc}
  return {f"peer_{k}/ce": terms["ce"], f"peer_{k}/kl_peers": terms["kl_peers"],
          f"peer_{k}/acc": acc}


def _slice(tree: Any, i: int) -> Any:
  return jax.tree.map(lambda leaf: leaf[i], tree)


def _stack(trees: list[Any]) -> Any:
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def build_step(stage) -> Callable:
  """The DML train step ``step(state, teacher, batch, hp) -> (state,
  metrics)`` of ``config.dml.update_order`` (``Method.build_step``;
  ``teacher`` is None and unused; the loss settings arrive through
  ``hp``)."""
  if stage.options["update_order"] == "sequential":
    return _sequential_step(stage.nets, stage.tx)
  return _simultaneous_step(stage.nets, stage.tx, stage.ensemble)


def _simultaneous_step(nets, tx, impl: str) -> Callable:
  """All peers learn from the others' predictions before the step: one
  gradient of Σ_k L_k (each L_k reaches θ_k only through z_k, the targets
  being stopped, so this is every peer's own gradient)."""

  def step(state: DistillState, teacher, batch, hp: HParams):
    del teacher
    images, labels, mask = batch["image"], batch["label"], batch["mask"]
    peers = state.slts

    def loss_fn(params):
      z0, stats0 = apply_train(nets.student, params[0],
                               state.student.batch_stats, images, mask)
      zs, stats = apply_ensemble(nets.slt, ModelState(params[1],
                                                      peers.batch_stats),
                                 images, train=True, mask=mask, impl=impl)
      z = [z0, *zs]
      total, metrics = 0.0, {}
      for k in range(len(z)):
        loss, terms = peer_loss(z[k], _others(z, k), labels, hp, mask)
        total = total + loss
        metrics.update(_peer_metrics(k, terms, z[k], labels, mask))
      return total, (metrics, stats0, stats)

    (total, (metrics, stats0, stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)((state.student.params, peers.params))
    student = sgd_update(state.student, grads[0], stats0, tx,
                         hp.learning_rate)
    peers = sgd_update(peers, grads[1], stats, tx, hp.learning_rate)
    metrics.update(loss=total, learning_rate=hp.learning_rate)
    return state.replace(step=state.step + 1, student=student,
                         slts=peers), metrics

  return step


def _sequential_step(nets, tx) -> Callable:
  """Algorithm 1: peer k updates after peers 0..k−1 and learns from their
  updated predictions (recomputed on the same batch) and from the old
  predictions of peers k+1..K−1.

  Every peer's forward runs once with its pre-step parameters, keeping its
  VJP: that forward is both peer k's target for the peers before it and the
  forward of its own gradient (θ_k does not change before its turn), and it
  gives the once-per-step running statistics. The stacked peers are applied
  one by one here (the order is inherently sequential).
  """

  def forward(model, batch_stats, images, mask):
    return lambda params: apply_train(model, params, batch_stats, images,
                                      mask)

  def step(state: DistillState, teacher, batch, hp: HParams):
    del teacher
    images, labels, mask = batch["image"], batch["label"], batch["mask"]
    num_stacked = jax.tree.leaves(state.slts.params)[0].shape[0]
    peers: list[TrainState] = [state.student] + [
        _slice(state.slts, i) for i in range(num_stacked)]
    models = [nets.student] + [nets.slt] * num_stacked
    old, pullbacks, new_stats = [], [], []
    for model, peer in zip(models, peers):
      z, pullback, stats = jax.vjp(
          forward(model, peer.batch_stats, images, mask), peer.params,
          has_aux=True)
      old.append(z)
      pullbacks.append(pullback)
      new_stats.append(stats)
    current = list(old)  # peers 0..k−1 replaced by their updated predictions
    total, metrics, updated = 0.0, {}, []
    for k, peer in enumerate(peers):
      (loss, terms), dz = jax.value_and_grad(
          lambda z, k=k: peer_loss(z, _others(current, k), labels, hp, mask),
          has_aux=True)(old[k])
      (grads,) = pullbacks[k](dz)
      peer = sgd_update(peer, grads, new_stats[k], tx, hp.learning_rate)
      updated.append(peer)
      if k + 1 < len(peers):  # later peers learn from its new prediction
        current[k], _ = forward(models[k], peer.batch_stats, images,
                                mask)(peer.params)
      total = total + loss
      metrics.update(_peer_metrics(k, terms, old[k], labels, mask))
    metrics.update(loss=total, learning_rate=hp.learning_rate)
    return state.replace(step=state.step + 1, student=updated[0],
                         slts=_stack(updated[1:])), metrics

  return step


def eval_logits(state: DistillState, stage, images: jax.Array, hp
                ) -> dict[str, jax.Array]:
  """Eval-mode logits of every peer: ``student`` (peer 0), ``peer_1``, ...
  (``Method.eval_logits``; the stacked peers applied one by one)."""
  del hp
  nets = stage.nets
  out = {"student": nets.student.apply(state.student.variables, images,
                                       train=False)}
  zs, _ = apply_ensemble(nets.slt, state.slts, images, train=False,
                         mask=None, impl="unrolled")
  out.update({f"peer_{i + 1}": z for i, z in enumerate(zs)})
  return out


# ---------------------------------------------------------------------------
# Configuration (config.dml).


def num_peers_stacked(config: Any) -> int:
  """Peers 1..K−1, stacked (peer 0 is the student)."""
  return config.dml.num_peers - 1


def check_config(config: Any) -> None:
  """``config.dml`` and how the stacked peers are applied."""
  check(is_int(config.dml.num_peers, 2), "dml.num_peers",
        config.dml.num_peers, "an int >= 2 (peer 0 is the student)")
  order = config.dml.update_order
  check(order in ("sequential", "simultaneous"), "dml.update_order", order,
        "'sequential' (the paper's Algorithm 1) or 'simultaneous'")
  check(config.slkd.ensemble in ENSEMBLES, "slkd.ensemble",
        config.slkd.ensemble, f"one of {', '.join(ENSEMBLES)}")


METHOD = Method(
    "dml", "deep mutual learning (Zhang 2018): K peers teach each other",
    # Not used by its own step (every peer's peer_loss): CE, for tools that
    # ask any method for its objective.
    ce_objective, peers=True,
    # The DML paper: CE + mean KL at T = 1, every dataset.
    defaults={"temperature": 1.0, "ce_weight": 1.0, "kd_weight": 1.0},
    check_config=check_config, num_stacked=num_peers_stacked,
    build_step=build_step, eval_logits=eval_logits)
