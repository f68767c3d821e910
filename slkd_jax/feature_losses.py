"""Feature-based distillation losses of mdistiller's CIFAR-100 baselines.

FitNet, AT, SP, RKD, PKT, NST, KDSVD, VID, OFD and ReviewKD, each as
mdistiller computes it (``mdistiller/distillers/*.py``): same tensors,
reductions, epsilons and detaches; the methods, their settings and their
trainable connectors (FitNet's ConvReg, VID's regressors, OFD's conv-BN
connectors, ReviewKD's ABFs) are in :mod:`slkd_jax.methods` (``feature``,
``ofd``, ``reviewkd``). Pure functions of features (never of models).

Layout: feature maps are NHWC (mdistiller's are NCHW), pooled features
``[B, D]``: the ``feats`` / ``pooled_feat`` of :class:`slkd_jax.models.Outputs`
(:func:`slkd_jax.methods.feature.select_features` says which ones each
method reads).

Every loss returns the *unweighted* feature loss, i.e. the value mdistiller
multiplies by ``cfg.<METHOD>.LOSS.FEAT_WEIGHT`` (our ``feat_weight``; RKD's
distance/angle weights are inside its loss, as in mdistiller). Teacher features are always detached
(mdistiller computes them under ``torch.no_grad()``). Computation is at least
float32 (float64 stays float64).

``mask`` ``[B]`` (bool/0-1) excludes the padded examples of a final partial
batch exactly: the loss and the gradients w.r.t. the real examples equal those
of the smaller real batch, and padded examples get zero gradient. Per-example
reductions become masked means; the batch-coupled losses (SP, RKD, PKT) drop
the padded rows *and* columns of their batch × batch matrices.

None of these methods but ReviewKD has a warm-up in mdistiller: the feature
loss is on from the first iteration. ReviewKD's ``min(epoch / WARMUP_EPOCHS,
1)`` factor is applied by its term (:mod:`slkd_jax.methods.reviewkd`).
"""

from __future__ import annotations

import math
from typing import Sequence

import chex
import jax
import jax.scipy.special
import jax.numpy as jnp
import numpy as np

from slkd_jax.losses import masked_mean

# Gram matrices and pooling in full float32 on accelerators (no TF32/bf16
# passes), as PyTorch's default matmul precision.
_HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------
# Shared pieces.


def _promote(x: jax.Array) -> jax.Array:
  """float32 for bf16/f16/f32 inputs; float64 stays float64 (exact tests)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _teacher(x: jax.Array) -> jax.Array:
  return jax.lax.stop_gradient(_promote(x))


def _as_list(feats) -> list[jax.Array]:
  return [feats] if hasattr(feats, "ndim") else list(feats)


def _batch_weights(mask: jax.Array | None, batch: int, dtype
                   ) -> tuple[jax.Array, jax.Array]:
  """Per-example weights ``[B]`` and the number of real examples."""
  if mask is None:
    return jnp.ones((batch,), dtype), jnp.asarray(batch, dtype)
  chex.assert_shape(mask, (batch,))
  w = mask.astype(dtype)
  return w, jnp.maximum(jnp.sum(w), 1.0)


def _safe_sqrt(x: jax.Array) -> jax.Array:
  """sqrt with gradient 0 (not NaN) at 0, as torch's norm backward."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def l2_normalize(x: jax.Array, axis: int, eps: float = 1e-12) -> jax.Array:
  """``F.normalize(x, p=2, dim=axis, eps)``: x / max(‖x‖₂, eps)."""
  norm = _safe_sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def _pool_matrix(n_in: int, n_out: int) -> np.ndarray:
  """Row i averages PyTorch's adaptive window [⌊i·n/m⌋, ⌈(i+1)·n/m⌉)."""
  m = np.zeros((n_out, n_in))
  for i in range(n_out):
    start, end = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """``F.adaptive_avg_pool2d`` on an NHWC tensor (any input/output sizes)."""
  (h, w), (oh, ow) = x.shape[1:3], out_hw
  if (h, w) == (oh, ow):
    return x
  ph = jnp.asarray(_pool_matrix(h, oh), x.dtype)
  pw = jnp.asarray(_pool_matrix(w, ow), x.dtype)
  return jnp.einsum("oh,bhwc,pw->bopc", ph, x, pw, precision=_HIGHEST)


def match_spatial(f_s: jax.Array, f_t: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """Pool the spatially larger of two NHWC maps to the other's height.

  As mdistiller's AT/NST/VID: only the heights are compared and the output is
  square ``(H, H)``.
  """
  s_h, t_h = f_s.shape[1], f_t.shape[1]
  if s_h > t_h:
    f_s = adaptive_avg_pool(f_s, (t_h, t_h))
  elif s_h < t_h:
    f_t = adaptive_avg_pool(f_t, (s_h, s_h))
  return f_s, f_t


def _per_example_mean(x: jax.Array) -> jax.Array:
  return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


# ---------------------------------------------------------------------------
# Per-example losses: FitNet, AT, NST, VID.


def fitnet_loss(regressed_s: jax.Array, f_t: jax.Array,
                mask: jax.Array | None = None) -> jax.Array:
  """FitNet hint loss ``F.mse_loss(conv_reg(f_s), f_t)`` (unweighted).

  Args:
    regressed_s: the student's hint feature after :class:`ConvReg`, NHWC,
      the teacher's shape.
    f_t: the teacher's hint feature ``feats[hint_layer]`` (NHWC).
    mask: optional ``[B]``; the ConvReg's BatchNorm must get it too.
  """
  chex.assert_equal_shape([regressed_s, f_t])
  diff = _promote(regressed_s) - _teacher(f_t)
  return masked_mean(_per_example_mean(jnp.square(diff)), mask)


def _attention(f: jax.Array, p) -> jax.Array:
  """``F.normalize(f.pow(p).mean(channels).flatten())`` → ``[B, H·W]``."""
  if float(p).is_integer():  # torch's pow of negatives with p = 2.0 too.
    p = int(p)
  a = jnp.mean(f**p, axis=-1)
  return l2_normalize(a.reshape(a.shape[0], -1), axis=1)


def at_loss(feats_s: Sequence[jax.Array], feats_t: Sequence[jax.Array],
            p=2, mask: jax.Array | None = None) -> jax.Array:
  """Attention transfer (mdistiller ``at_loss``), unweighted.

  Σ_layers mean_{b, hw} (a(f_s) − a(f_t))² with a(f) the l2-normalised,
  flattened channel mean of f^p, after pooling the larger map to the smaller.
  mdistiller feeds ``feats[1:]``.
  """
  total = 0.0
  for f_s, f_t in zip(_as_list(feats_s), _as_list(feats_t), strict=True):
    f_s, f_t = match_spatial(_promote(f_s), _teacher(f_t))
    diff = _attention(f_s, p) - _attention(f_t, p)
    total = total + masked_mean(jnp.mean(jnp.square(diff), axis=1), mask)
  return total


def _poly_kernel_mean(a: jax.Array, b: jax.Array) -> jax.Array:
  """Per-example mean over channel pairs of (a_i · b_j)², a/b ``[B, HW, C]``."""
  gram = jnp.einsum("bpi,bpj->bij", a, b, precision=_HIGHEST)
  return jnp.mean(jnp.square(gram), axis=(1, 2))


def nst_loss(feats_s: Sequence[jax.Array], feats_t: Sequence[jax.Array],
             mask: jax.Array | None = None) -> jax.Array:
  """Neuron selectivity transfer (mdistiller ``nst_loss``), unweighted.

  Per layer, with each channel's spatial map l2-normalised, the squared MMD
  with the polynomial kernel k(x, y) = (x·y)²:
  mean k(t, t) + mean k(s, s) − 2 mean k(s, t), the larger map pooled first.
  mdistiller feeds ``feats[1:]``.
  """
  total = 0.0
  for f_s, f_t in zip(_as_list(feats_s), _as_list(feats_t), strict=True):
    f_s, f_t = match_spatial(_promote(f_s), _teacher(f_t))
    f_s = l2_normalize(f_s.reshape(f_s.shape[0], -1, f_s.shape[-1]), axis=1)
    f_t = l2_normalize(f_t.reshape(f_t.shape[0], -1, f_t.shape[-1]), axis=1)
    per_example = (_poly_kernel_mean(f_t, f_t) + _poly_kernel_mean(f_s, f_s)
                   - 2.0 * _poly_kernel_mean(f_s, f_t))
    total = total + masked_mean(per_example, mask)
  return total


def vid_pred_var(log_scale: jax.Array, eps: float = 1e-5) -> jax.Array:
  """VID's predicted variance ``log(1 + exp(log_scale)) + eps`` per channel."""
  return jnp.log(1.0 + jnp.exp(log_scale)) + eps


def vid_loss(pred_means: Sequence[jax.Array], log_scales: Sequence[jax.Array],
             feats_t: Sequence[jax.Array], eps: float = 1e-5,
             mask: jax.Array | None = None) -> jax.Array:
  """Variational information distillation (mdistiller ``vid_loss``), summed
  over layers, unweighted.

  Per layer: mean over (b, h, w, c) of
  ½((μ − f_t)² / σ² + log σ²), σ² = :func:`vid_pred_var` (per channel).

  Args:
    pred_means: the regressors' outputs μ (:class:`VIDRegressor`, which pools
      the student to the teacher's height first, as mdistiller does).
    log_scales: per-layer ``[C_t]`` log-scales.
    feats_t: teacher features (mdistiller: ``feats[1:]``); pooled here when
      larger than μ, as mdistiller pools the teacher.
  """
  total = 0.0
  for mu, log_scale, f_t in zip(_as_list(pred_means), _as_list(log_scales),
                                _as_list(feats_t), strict=True):
    if mu.shape[1] > f_t.shape[1]:
      raise ValueError("the student must be pooled before the VID regressor "
                       f"(prediction height {mu.shape[1]} > teacher "
                       f"{f_t.shape[1]}); VIDRegressor does it")
    mu, f_t = match_spatial(_promote(mu), _teacher(f_t))
    var = vid_pred_var(_promote(log_scale), eps).astype(mu.dtype)
    nlp = 0.5 * (jnp.square(mu - f_t) / var + jnp.log(var))
    total = total + masked_mean(_per_example_mean(nlp), mask)
  return total


# ---------------------------------------------------------------------------
# Batch-coupled losses: SP, RKD, PKT.


def _similarity_loss(f_s, f_t, w, n):
  """One layer of mdistiller's SP with padded rows/columns zeroed."""
  def gram(f):
    f = f.reshape(f.shape[0], -1) * w[:, None]
    g = jnp.matmul(f, f.T, precision=_HIGHEST)
    return l2_normalize(g, axis=1)

  diff = gram(f_t) - gram(f_s)
  return jnp.sum(jnp.square(diff)) / (n * n)


def sp_loss(feats_s, feats_t, mask: jax.Array | None = None) -> jax.Array:
  """Similarity-preserving KD (mdistiller ``sp_loss``), unweighted.

  Σ_layers ‖rownorm(G_t) − rownorm(G_s)‖²_F / B², G = F Fᵀ over the batch
  (F the flattened features). mdistiller feeds ``[feats[-1]]``; a single
  array is taken as one layer.
  """
  total = 0.0
  for f_s, f_t in zip(_as_list(feats_s), _as_list(feats_t), strict=True):
    f_s, f_t = _promote(f_s), _teacher(f_t)
    w, n = _batch_weights(mask, f_s.shape[0], f_s.dtype)
    total = total + _similarity_loss(f_s, f_t, w, n)
  return total


def _pdist(e: jax.Array, squared: bool, eps: float) -> jax.Array:
  """Pairwise distances clamped below at eps, zero diagonal (mdistiller)."""
  sq = jnp.sum(jnp.square(e), axis=1)
  prod = jnp.matmul(e, e.T, precision=_HIGHEST)
  res = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * prod, eps)
  if not squared:
    res = jnp.sqrt(res)
  return jnp.where(jnp.eye(e.shape[0], dtype=bool), 0.0, res)


def _smooth_l1(x: jax.Array, y: jax.Array) -> jax.Array:
  """Elementwise ``F.smooth_l1_loss`` (beta 1), unreduced."""
  d = jnp.abs(x - y)
  return jnp.where(d < 1.0, 0.5 * d * d, d - 0.5)


def _normalized_distances(e, w2, squared, eps):
  """pdist / mean of its positive real-pair entries (``d[d > 0].mean()``)."""
  d = _pdist(e, squared, eps)
  pos = w2 * (d > 0)
  return d / (jnp.sum(d * pos) / jnp.sum(pos))


def _angles(e: jax.Array) -> jax.Array:
  """a[i, j, k] = cos∠(e_j − e_i, e_k − e_i) (0 where j or k equals i)."""
  diff = l2_normalize(e[None, :, :] - e[:, None, :], axis=2)
  return jnp.einsum("ijd,ikd->ijk", diff, diff, precision=_HIGHEST)


def rkd_loss(f_s: jax.Array, f_t: jax.Array, distance_weight: float = 25.0,
             angle_weight: float = 50.0, eps: float = 1e-12,
             squared: bool = False, mask: jax.Array | None = None
             ) -> jax.Array:
  """Relational KD (mdistiller ``rkd_loss``), before ``feat_weight``.

  distance_weight · smoothL1(ψ_D(s), ψ_D(t)) + angle_weight ·
  smoothL1(ψ_A(s), ψ_A(t)), means over the B² pairs / B³ triplets; ψ_D the
  pairwise distances (clamped at eps, not squared) over their mean on the
  off-diagonal. mdistiller feeds ``pooled_feat`` ``[B, D]``.
  """
  stu = _promote(f_s).reshape(f_s.shape[0], -1)
  tea = _teacher(f_t).reshape(f_t.shape[0], -1)
  w, n = _batch_weights(mask, stu.shape[0], stu.dtype)
  w2 = w[:, None] * w[None, :]
  d_s = _normalized_distances(stu, w2, squared, eps)
  d_t = _normalized_distances(tea, w2, squared, eps)
  loss_d = jnp.sum(_smooth_l1(d_s, d_t) * w2) / (n * n)
  w3 = w2[:, :, None] * w[None, None, :]
  loss_a = jnp.sum(_smooth_l1(_angles(stu), _angles(tea)) * w3) / (n**3)
  return distance_weight * loss_d + angle_weight * loss_a


def _pkt_probabilities(f, w, eps):
  """Row-stochastic cosine kernel of mdistiller's PKT over the real columns."""
  f = f / (_safe_sqrt(jnp.sum(jnp.square(f), axis=1, keepdims=True)) + eps)
  f = jnp.where(jnp.isnan(f), 0.0, f)
  sim = (jnp.matmul(f, f.T, precision=_HIGHEST) + 1.0) / 2.0
  return sim / jnp.sum(sim * w[None, :], axis=1, keepdims=True)


def pkt_loss(f_s: jax.Array, f_t: jax.Array, eps: float = 1e-7,
             mask: jax.Array | None = None) -> jax.Array:
  """Probabilistic knowledge transfer (mdistiller ``pkt_loss``), unweighted.

  mean_{i,j} P_t log((P_t + eps) / (P_s + eps)), P the row-normalised
  (cos + 1)/2 kernels of the batch. mdistiller feeds ``pooled_feat``.
  The norm's gradient is 0 (the reference's NaN) for an all-zero row.
  """
  s = _promote(f_s).reshape(f_s.shape[0], -1)
  t = _teacher(f_t).reshape(f_t.shape[0], -1)
  w, n = _batch_weights(mask, s.shape[0], s.dtype)
  p_s, p_t = _pkt_probabilities(s, w, eps), _pkt_probabilities(t, w, eps)
  kl = p_t * jnp.log((p_t + eps) / (p_s + eps))
  return jnp.sum(kl * (w[:, None] * w[None, :])) / (n * n)


# ---------------------------------------------------------------------------
# KDSVD.


def _finite(x: jax.Array) -> jax.Array:
  return jnp.where(jnp.isfinite(x), x, 0.0)


def _svd_top(f: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
  """mdistiller's ``svd(feat, n)``: normalised top-n (s, v) of each example.

  The NCHW map is viewed as a ``[C·H, W]`` matrix (mdistiller's
  ``view(B, C*H, W)``). Returns s ``[B, n]`` and v ``[B, W, n]``, each
  l2-normalised along dim 1 (the unused u is not returned).
  """
  b, h, w, c = f.shape
  x = jnp.transpose(f, (0, 3, 1, 2)).reshape(b, c * h, w)
  _, s, vh = jnp.linalg.svd(x, full_matrices=False)
  v = jnp.swapaxes(vh, -1, -2)
  s, v = _finite(s)[:, :n], _finite(v)[:, :, :n]
  return l2_normalize(s, axis=1), l2_normalize(v, axis=1)


def _align_rsv(a: jax.Array, b: jax.Array) -> jax.Array:
  """Pick (with sign) the student vector of largest |cos| to each teacher's."""
  cos = jnp.einsum("bwi,bwj->bij", a, b, precision=_HIGHEST)
  max_abs = jnp.max(jnp.abs(cos), axis=1, keepdims=True)
  sel = jnp.where(max_abs == jnp.abs(cos), jnp.sign(cos), 0.0)
  return jnp.einsum("bwi,bij->bwj", a, jax.lax.stop_gradient(sel),
                    precision=_HIGHEST)


def _fill_padded(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Padded examples → a detached copy of the first real one.

  Keeps the SVD of padded rows well conditioned (a degenerate spectrum has an
  infinite derivative, and 0·inf would leak NaN into the gradient).
  """
  if mask is None:
    return x
  first = jax.lax.stop_gradient(x[jnp.argmax(mask)])
  keep = mask.astype(bool).reshape((-1,) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x, first[None])


def _rbf(v: jax.Array, v_prev: jax.Array) -> jax.Array:
  """exp(−(v_a − v'_b)² / 8) for every pair of entries, ``[B, W, W', k]``."""
  return jnp.exp(-jnp.square(v[:, :, None, :] - v_prev[:, None, :, :]) / 8.0)


def kdsvd_loss(feats_s: Sequence[jax.Array], feats_t: Sequence[jax.Array],
               k: int = 1, mask: jax.Array | None = None) -> jax.Array:
  """SVD-based self-supervised KD (mdistiller ``kdsvd_loss``), unweighted.

  Per layer: the teacher's top-k right singular vectors (scaled by its
  normalised singular values) and the student's best-aligned of its top k+3;
  between consecutive layers, the squared difference of their RBF
  (exp(−Δ²/8)) relation maps, summed, per example, then / B.
  mdistiller feeds ``feats[1:]``.

  Note: singular vectors are defined up to sign and the teacher's sign (which
  LAPACK/cuSOLVER picks) changes this loss; mdistiller does not fix it
  either. The student is aligned to the teacher's sign per layer.
  """
  feats_s, feats_t = _as_list(feats_s), _as_list(feats_t)
  per_example, prev = 0.0, None
  for f_s, f_t in zip(feats_s, feats_t, strict=True):
    if f_s.shape[2] != f_t.shape[2]:
      raise ValueError(f"kdsvd_loss: student width {f_s.shape[2]} != teacher "
                       f"width {f_t.shape[2]} (mdistiller does not pool)")
    s_t, v_t = _svd_top(_fill_padded(_teacher(f_t), mask), k)
    _, v_s = _svd_top(_fill_padded(_promote(f_s), mask), k + 3)
    v_s = _align_rsv(v_s, v_t)
    v_t, v_s = v_t * s_t[:, None, :], v_s * s_t[:, None, :]
    if prev is not None:
      l2 = jnp.square(_rbf(v_s, prev[0]) - _rbf(v_t, prev[1]))
      per_example = per_example + jnp.sum(_finite(l2), axis=(1, 2, 3))
    prev = (v_s, v_t)
  if isinstance(per_example, float):  # a single layer: no pair, loss 0.
    return jnp.zeros((), _promote(feats_s[0]).dtype)
  w, n = _batch_weights(mask, per_example.shape[0], per_example.dtype)
  return jnp.sum(per_example * w) / n


# ---------------------------------------------------------------------------
# OFD (Heo et al. 2019, "A Comprehensive Overhaul of Feature Distillation").


def ofd_margin(scale: jax.Array, bias: jax.Array) -> jax.Array:
  """OFD's margin per channel from the teacher's BatchNorm before the ReLU.

  The pre-ReLU response is taken as N(β, |γ|²); the margin is the expected
  value of its negative part, E[x | x < 0] = β − |γ|·φ(β/|γ|) / Φ(−β/|γ|),
  or −3|γ| when Φ(−β/|γ|) ≤ 0.001 (mdistiller ``init_ofd_modules``).
  mdistiller computes it in float64 and stores a float32 tensor, so the
  result is rounded to float32 (then returned in float32, or float64 under
  float64). A constant: no gradient flows to the teacher.
  """
  s = jnp.abs(_teacher(scale))
  m = _teacher(bias)
  ratio = m / s
  cdf = jax.scipy.special.ndtr(-ratio)
  safe_cdf = jnp.where(cdf > 0.001, cdf, 1.0)
  expected = (-s * jnp.exp(-jnp.square(ratio) / 2.0) / math.sqrt(2 * math.pi)
              / safe_cdf + m)
  margin = jnp.where(cdf > 0.001, expected, -3.0 * s)
  return margin.astype(jnp.float32).astype(s.dtype)


def ofd_partial_l2(source: jax.Array, target: jax.Array, margin: jax.Array,
                   mask: jax.Array | None = None) -> jax.Array:
  """OFD's partial L2 distance of one stage (mdistiller ``feat_loss``).

  Per element: (s − m)² where s > m ≥ t (the teacher's response is
  negative-saturated: only pull the student down to the margin), (s − t)²
  where s > t > m and t ≤ 0, and (s − t)² wherever t > 0; summed over
  (H, W, C) and averaged over the (real) examples.

  Args:
    source: the connector's output (NHWC).
    target: the teacher's feature, the same shape (already pooled).
    margin: ``[C]`` (:func:`ofd_margin`).
  """
  chex.assert_equal_shape([source, target])
  s, t = _promote(source), _teacher(target)
  m = jax.lax.stop_gradient(margin.astype(s.dtype))
  loss = (jnp.square(s - m) * ((s > m) & (t <= m))
          + jnp.square(s - t) * ((s > t) & (t > m) & (t <= 0))
          + jnp.square(s - t) * (t > 0))
  per_example = jnp.sum(jnp.abs(loss).reshape(loss.shape[0], -1), axis=1)
  return masked_mean(per_example, mask)


def ofd_loss(regressed_s: Sequence[jax.Array], feats_t: Sequence[jax.Array],
             margins: Sequence[jax.Array], mask: jax.Array | None = None
             ) -> jax.Array:
  """OFD's distillation loss (mdistiller ``OFD.ofd_loss``), unweighted.

  Σ_i partial_L2(connector_i(s_i), pool(t_i), margin_i) / 2^(n−i−1): the
  deepest stage has weight 1, each shallower one half the next. The teacher
  map is adaptive-average-pooled to the student's spatial size.
  mdistiller feeds ``preact_feats[1:]`` of both (aligned to the last
  ``min`` of their lengths) and multiplies by FEAT_WEIGHT 1e-3 (the
  reference code's ``/ 1000``).
  """
  regressed_s, feats_t = _as_list(regressed_s), _as_list(feats_t)
  n = len(regressed_s)
  if not n == len(feats_t) == len(margins):
    raise ValueError(f"ofd_loss: {n} student, {len(feats_t)} teacher features "
                     f"and {len(margins)} margins")
  total = 0.0
  for i, (f_s, f_t, margin) in enumerate(zip(regressed_s, feats_t, margins)):
    f_t = adaptive_avg_pool(_teacher(f_t), f_s.shape[1:3])
    total = total + ofd_partial_l2(f_s, f_t, margin, mask) / 2**(n - i - 1)
  return total


# ---------------------------------------------------------------------------
# ReviewKD (Chen et al. 2021, "Distilling Knowledge via Knowledge Review").


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
  """PyTorch's ``F.interpolate(mode="nearest")`` source index per output.

  ``min(floor(dst · scale), n_in − 1)`` with ``scale = n_in / n_out``
  computed in float32, as ATen's ``nearest_idx`` (identity when the sizes
  are equal, ``dst >> 1`` when doubling — the same numbers).
  """
  scale = np.float32(n_in) / np.float32(n_out)
  src = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(src, n_in - 1)


def nearest_resize(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """``F.interpolate(x, out_hw, mode="nearest")`` on an NHWC tensor."""
  (h, w), (oh, ow) = x.shape[1:3], out_hw
  if (h, w) == (oh, ow):
    return x
  x = jnp.take(x, jnp.asarray(nearest_indices(h, oh)), axis=1)
  return jnp.take(x, jnp.asarray(nearest_indices(w, ow)), axis=2)


def _mse(a: jax.Array, b: jax.Array, mask: jax.Array | None) -> jax.Array:
  """``F.mse_loss(a, b)`` over the real examples (same-shaped maps)."""
  return masked_mean(_per_example_mean(jnp.square(a - b)), mask)


def hcl_loss(feats_s: Sequence[jax.Array], feats_t: Sequence[jax.Array],
             mask: jax.Array | None = None) -> jax.Array:
  """ReviewKD's hierarchical context loss (mdistiller ``hcl_loss``).

  Per level: (MSE + Σ_l 2^−k · MSE(pool_l(s), pool_l(t))) / (1 + Σ_k 2^−k)
  over the pyramid sizes l = 4, 2, 1 smaller than the map's height (the
  k-th used size weighs 2^−k), adaptive average pooling; summed over levels.
  Unweighted: mdistiller multiplies by REVIEWKD_WEIGHT and the warm-up.
  """
  total = 0.0
  for f_s, f_t in zip(_as_list(feats_s), _as_list(feats_t), strict=True):
    chex.assert_equal_shape([f_s, f_t])
    f_s, f_t = _promote(f_s), _teacher(f_t)
    loss, weight, tot = _mse(f_s, f_t, mask), 1.0, 1.0
    for size in (4, 2, 1):
      if size >= f_s.shape[1]:
        continue
      weight /= 2.0
      loss = loss + weight * _mse(adaptive_avg_pool(f_s, (size, size)),
                                  adaptive_avg_pool(f_t, (size, size)), mask)
      tot += weight
    total = total + loss / tot
  return total
