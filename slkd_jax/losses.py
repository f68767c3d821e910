"""Distillation losses: CE, KD, DKD, logit fusion and the SLKD objective.

Pure functions of logits (never of models). Every batch reduction takes an
optional ``mask`` ``[B]`` so a padded final batch gives exactly the loss of the
real examples (the reference keeps the last partial batch). Formulas follow
the reference code (SLKD on mdistiller); see docs/method.md §2.

Shapes: logits ``[B, C]`` float32, labels ``[B]`` int, SL-T logits
``[K, B, C]``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def masked_mean(values: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean of per-example ``values`` ``[B]`` over the examples where ``mask``."""
  if mask is None:
    return jnp.mean(values)
  chex.assert_equal_shape([values, mask])
  weights = mask.astype(values.dtype)
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _at_least_f32(x: jax.Array) -> jax.Array:
  """float32 for bf16/f16/f32 inputs; float64 stays float64 (exact tests)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_logits(logits, labels=None):
  chex.assert_rank(logits, 2)
  if labels is not None:
    chex.assert_shape(labels, (logits.shape[0],))
    chex.assert_type(labels, int)


def per_example_cross_entropy(logits: jax.Array, labels: jax.Array
                              ) -> jax.Array:
  """``[B]``: −log softmax(z_b)[y_b]."""
  _check_logits(logits, labels)
  log_probs = jax.nn.log_softmax(_at_least_f32(logits))
  return -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  mask: jax.Array | None = None) -> jax.Array:
  """CE(z, y) = (1/B) Σ_b −log softmax(z_b)[y_b]; no label smoothing."""
  return masked_mean(per_example_cross_entropy(logits, labels), mask)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """``[B]`` float32: 1 where the label is among the ``k`` highest logits
  (ties broken towards the lower class index, as ``argmax``)."""
  _check_logits(logits, labels)
  if k == 1:
    hit = jnp.argmax(logits, -1) == labels
  else:
    top = jax.lax.top_k(logits, min(k, logits.shape[-1]))[1]
    hit = jnp.any(top == labels[:, None], -1)
  return hit.astype(jnp.float32)


def accuracy(logits: jax.Array, labels: jax.Array,
             mask: jax.Array | None = None) -> jax.Array:
  """Top-1 accuracy in [0, 1] over the real examples."""
  return masked_mean(topk_correct(logits, labels, 1), mask)


def _kl_per_example(log_p_target: jax.Array, log_p_input: jax.Array
                    ) -> jax.Array:
  """Σ_c p_tgt (log p_tgt − log p_in), with 0·log 0 = 0 (``F.kl_div``)."""
  p_target = jnp.exp(log_p_target)
  terms = jnp.where(p_target > 0, p_target * (log_p_target - log_p_input), 0.0)
  return jnp.sum(terms, axis=-1)


def kl_divergence(input_logits: jax.Array, target_logits: jax.Array,
                  temperature: float | jax.Array = 1.0,
                  mask: jax.Array | None = None) -> jax.Array:
  """(1/B) Σ_b KL(softmax(z_tgt/T) ‖ softmax(z_in/T)), without the T² factor.

  Used as a diagnostic (the paper's Figure 2 trajectories at T = 1).
  """
  _check_logits(input_logits)
  chex.assert_equal_shape([input_logits, target_logits])
  log_p_in = jax.nn.log_softmax(_at_least_f32(input_logits) / temperature)
  log_p_tgt = jax.nn.log_softmax(_at_least_f32(target_logits) /
                                 temperature)
  return masked_mean(_kl_per_example(log_p_tgt, log_p_in), mask)


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array,
            temperature: float | jax.Array,
            mask: jax.Array | None = None) -> jax.Array:
  """Hinton et al. 2015, as mdistiller computes it.

  KD_T(z_s, z_t) = T² · (1/B) · Σ_b Σ_c p_t,c (log p_t,c − log p_s,c) with
  p = softmax(z/T): KL(p_t ‖ p_s) summed over classes, averaged over the
  batch, scaled by T². No gradient is stopped here: callers detach the target
  where the reference does.
  """
  return temperature**2 * kl_divergence(student_logits, teacher_logits,
                                        temperature, mask)


def dkd_loss(student_logits: jax.Array, teacher_logits: jax.Array,
             labels: jax.Array, alpha: float | jax.Array,
             beta: float | jax.Array, temperature: float | jax.Array,
             mask: jax.Array | None = None) -> jax.Array:
  """Decoupled KD (Zhao et al., CVPR 2022), as mdistiller computes it.

  With g = one-hot(y), p = softmax(z/T) and the binary split
  b = [Σ p·g, Σ p·(1−g)]:
    TCKD = T²/B · Σ_b KL(b_t ‖ b_s)
    NCKD = T²/B · Σ_b KL(softmax(z_t/T − 1000 g) ‖ softmax(z_s/T − 1000 g))
  returns α·TCKD + β·NCKD (the CE term and warm-up are the method's).
  """
  _check_logits(student_logits, labels)
  chex.assert_equal_shape([student_logits, teacher_logits])
  z_s = _at_least_f32(student_logits) / temperature
  z_t = _at_least_f32(teacher_logits) / temperature
  gt = jax.nn.one_hot(labels, z_s.shape[-1], dtype=z_s.dtype)

  def binary(z):
    p = jax.nn.softmax(z)
    return jnp.stack([jnp.sum(p * gt, -1), jnp.sum(p * (1.0 - gt), -1)], -1)

  b_s, b_t = binary(z_s), binary(z_t)
  tckd = _kl_per_example(jnp.log(b_t), jnp.log(b_s))
  # Subtracting 1000 from the target class removes it from the softmax.
  nckd = _kl_per_example(jax.nn.log_softmax(z_t - 1000.0 * gt),
                         jax.nn.log_softmax(z_s - 1000.0 * gt))
  return temperature**2 * masked_mean(alpha * tckd + beta * nckd, mask)


def fuse_logits(slt_logits: jax.Array, weights: jax.Array) -> jax.Array:
  """Logit-level fusion of the SL-Ts: z_c = Σ_j w_j z_j.

  Args:
    slt_logits: ``[K, B, C]``.
    weights: ``[K]`` (uniform 1/K reproduces the reference's (0.5, 0.5)).
  """
  chex.assert_rank(slt_logits, 3)
  chex.assert_shape(weights, (slt_logits.shape[0],))
  slt_logits = _at_least_f32(slt_logits)
  return jnp.einsum("k,kbc->bc", weights.astype(slt_logits.dtype), slt_logits)


def slkd_student_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                      fused_logits: jax.Array, labels: jax.Array, *,
                      temperature, ce_weight, kd_weight, fused_weight,
                      fused_ce_weight, fused_kd_weight,
                      detach_fused_target: bool = False,
                      mask: jax.Array | None = None
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The student's SLKD objective (docs/method.md §2).

  L_student = w_ce·CE(z_s,y) + w_kd·KD_T(z_s, sg(z_t))
              + w_p·(w_ce_cs·CE(z_s,y) + w_kd_cs·KD_T(z_s, z_c))

  The teacher's logits are always detached. The fused SL-T logits z_c are
  *not* detached by default (reference code): the last term then also trains
  every SL-T toward the student. ``detach_fused_target=True`` gives the
  paper's equations.

  Returns the loss and its terms (unweighted) for logging.
  """
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  if detach_fused_target:
    fused_logits = jax.lax.stop_gradient(fused_logits)
  ce = cross_entropy(student_logits, labels, mask)
  kd_teacher = kd_loss(student_logits, teacher_logits, temperature, mask)
  kd_fused = kd_loss(student_logits, fused_logits, temperature, mask)
  loss = (ce_weight * ce + kd_weight * kd_teacher +
          fused_weight * (fused_ce_weight * ce + fused_kd_weight * kd_fused))
  return loss, {"student/ce": ce, "student/kd_teacher": kd_teacher,
                "student/kd_fused": kd_fused}


def slt_loss(slt_logits: jax.Array, teacher_logits: jax.Array,
             labels: jax.Array, *, temperature, ce_weight, kd_weight,
             mask: jax.Array | None = None
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Σ_j L_SLT_j with L_SLT_j = w_ce·CE(z_j, y) + w_kd·KD_T(z_j, sg(z_t)).

  Args:
    slt_logits: ``[K, B, C]``; the SL-Ts learn from labels and the teacher.

  Returns the summed loss and per-SL-T terms ``[K]`` for logging.
  """
  chex.assert_rank(slt_logits, 3)
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  ce = jax.vmap(cross_entropy, in_axes=(0, None, None))(slt_logits, labels,
                                                        mask)
  kd = jax.vmap(kd_loss, in_axes=(0, None, None, None))(
      slt_logits, teacher_logits, temperature, mask)
  loss = jnp.sum(ce_weight * ce + kd_weight * kd)
  return loss, {"slt/ce": ce, "slt/kd_teacher": kd}
