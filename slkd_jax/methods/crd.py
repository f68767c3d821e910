"""CRD — contrastive representation distillation (Tian et al., ICLR 2020),
exact to mdistiller (``mdistiller/distillers/CRD.py``, ``dataset/cifar100.py``'s
``CIFAR100InstanceSample``, ``engine/cfg.py``); see ``docs/crd.md``.

Pieces (pure and jit-able; :data:`METHOD` wires them into the shared step):

* :class:`Embed` — the two trainable embeddings (``embed_s``, ``embed_t``):
  flatten, ``Linear(dim_in → feat_dim)`` with PyTorch's default init, l2
  normalisation (mdistiller's ``Embed`` + ``Normalize``).
* :func:`init_memory` — the non-trainable state: two memory banks ``[N, D]``
  (one embedding per training example) and two normalisation constants Z.
* :func:`build_class_table` (host, once) and :func:`sample_contrast_indices`
  (device, per step, from a key) — the positive and K negatives per example.
* :func:`crd_loss` — embeddings, ContrastMemory scores, the two NCE losses
  summed, and the momentum update of the banks, returned as new state.

Memory bank naming (mdistiller → ours): ``memory_v1`` (the student's
embeddings) → ``memory["memory_s"]``; ``memory_v2`` (the teacher's) →
``memory["memory_t"]``; ``Z_v1`` (normaliser of the student's scores, i.e.
the student embedding against the *teacher* bank) → ``memory["z_s"]``;
``Z_v2`` → ``memory["z_t"]``.

Sharding: the memory is replicated on every device (like the parameters);
``index``, ``contrast_idx``, the features and ``mask`` may be sharded along
the batch. Under ``jit`` the gather ``bank[contrast_idx]`` reads the local
rows of a replicated array, and the scatter of the global batch's updated
rows into the replicated bank makes XLA all-gather those ``B × D`` updates
so that every replica writes the same rows: the banks stay replicated and
identical, and the result does not depend on the number of devices.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from slkd_jax import losses, models
from slkd_jax.errors import ConfigError
from slkd_jax.methods.base import (FRACTION, POSITIVE, Context, HParams,
                                   Logits, Loss, Method, check, int_at_least,
                                   one_of)
from slkd_jax.models.layers import Linear

# Scores in full float32 on accelerators (no TF32/bf16 passes), as PyTorch's
# default bmm precision.
_HIGHEST = jax.lax.Precision.HIGHEST
# ContrastLoss's epsilon (mdistiller's ``eps = 1e-7``).
_NCE_EPS = 1e-7

#: mdistiller's CRD settings (``engine/cfg.py`` CFG.CRD; ``configs/cifar100/
#: crd.yaml`` overrides only SOLVER: batch 64, lr 0.05, 240 epochs, decay
#: x0.1 at 150/180/210, weight decay 5e-4, and the teacher/student pair
#: resnet32x4 → resnet8x4). ``feat_weight`` multiplies :func:`crd_loss`'s
#: value. CFG.CRD.FEAT.STUDENT_DIM / TEACHER_DIM (256, 256: the pooled
#: features of resnet8x4 / resnet32x4) are not settings here: :class:`Embed`
#: reads its input width off the features.
CRD_DEFAULTS: dict[str, Any] = dict(
    ce_weight=1.0,        # CFG.CRD.LOSS.CE_WEIGHT
    feat_weight=0.8,      # CFG.CRD.LOSS.FEAT_WEIGHT
    feat_dim=128,         # CFG.CRD.FEAT.DIM
    nce_k=16384,          # CFG.CRD.NCE.K
    nce_t=0.07,           # CFG.CRD.NCE.TEMPERATURE
    nce_momentum=0.5,     # CFG.CRD.NCE.MOMENTUM
    mode="exact",         # CFG.CRD.MODE ("exact" | "relax")
)

CONTRAST_MODES = ("exact", "relax")


# ---------------------------------------------------------------------------
# Embedding.


def l2_normalize_rows(x: jax.Array) -> jax.Array:
  """``x / ||x||_2`` per row, without epsilon (mdistiller's ``Normalize``)."""
  return x / jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True))


class Embed(nn.Module):
  """mdistiller's ``Embed``: flatten, ``nn.Linear(dim_in, feat_dim)``, l2
  normalisation.

  The linear is :class:`slkd_jax.models.layers.Linear` with PyTorch's
  default init (kernel ``kaiming_uniform(a=√5)`` = uniform ±1/√fan_in, bias
  uniform ±1/√fan_in), parameters ``linear/kernel`` ``[dim_in, feat_dim]``
  (PyTorch's weight transposed) and ``linear/bias``. ``dim_in`` is read off
  the input. Output ``[B, feat_dim]`` in float32 at least.
  """
  feat_dim: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    y = Linear(self.feat_dim, "torch", self.dtype, name="linear")(x)
    return l2_normalize_rows(y)


def make_embeds(feat_dim: int, dtype=jnp.float32) -> dict[str, nn.Module]:
  """CRD's trainable modules by name: ``embed_s`` (student pooled feature)
  and ``embed_t`` (teacher pooled feature), both to ``feat_dim``."""
  return {"embed_s": Embed(feat_dim, dtype), "embed_t": Embed(feat_dim, dtype)}


def pooled_feature_dim(model: nn.Module, image_size: int) -> int:
  """Width of ``model``'s ``pooled_feat`` (the input of its Embed), without
  running it (``jax.eval_shape``)."""
  outputs = models.output_shapes(model, (image_size, image_size))
  return int(np.prod(outputs.pooled_feat.shape[1:]))


# ---------------------------------------------------------------------------
# Memory.


def init_memory(key: jax.Array, num_examples: int, feat_dim: int,
                dtype=jnp.float32) -> dict[str, jax.Array]:
  """CRD's non-trainable state (mdistiller's ``ContrastMemory`` buffers).

  Returns ``{"memory_s", "memory_t"}`` ``[N, feat_dim]``, each uniform in
  ±stdv with stdv = 1/√(feat_dim/3) (``torch.rand·2stdv − stdv``), and
  ``{"z_s", "z_t"}`` = −1 (scalars): "not estimated yet"; the first batch
  sets them (see :func:`contrast_loss`). Keep the banks in float32 even for
  bfloat16 compute. Size: :func:`memory_bytes`.
  """
  stdv = 1.0 / math.sqrt(feat_dim / 3)
  key_s, key_t = jax.random.split(key)
  shape = (num_examples, feat_dim)
  return {
      "memory_s": jax.random.uniform(key_s, shape, dtype, -stdv, stdv),
      "memory_t": jax.random.uniform(key_t, shape, dtype, -stdv, stdv),
      "z_s": jnp.full((), -1.0, dtype),
      "z_t": jnp.full((), -1.0, dtype),
  }


def memory_bytes(num_examples: int, feat_dim: int, dtype=jnp.float32) -> int:
  """Bytes of :func:`init_memory`'s state, on *every* device (replicated).

  CIFAR-100: N = 50 000, 128-d float32 → 2 × 25.6 MB. ImageNet: N =
  1 281 167 → 2 × 656 MB (1.31 GB) per device. The per-step activations add
  the two gathered ``[B, K+1, D]`` blocks (B = 64, K = 16384, float32:
  2 × 537 MB), as in mdistiller's ``bmm``.
  """
  itemsize = np.dtype(dtype).itemsize
  return 2 * num_examples * feat_dim * itemsize + 2 * itemsize


# ---------------------------------------------------------------------------
# Contrast indices.


@flax.struct.dataclass
class ClassTable:
  """The training set's indices grouped by class, for on-device sampling.

  ``sorted_indices[offsets[c] : offsets[c] + counts[c]]`` are the dataset
  indices of class c (ascending). The r-th example *not* of class c is
  ``sorted_indices[r + counts[c] · (r ≥ offsets[c])]``, so negatives need no
  ``N × N`` table. Static fields: N and the fewest / most negatives a class
  has (they choose the sampler's shapes).
  """
  sorted_indices: jax.Array  # [N] int32
  offsets: jax.Array  # [C] int32
  counts: jax.Array  # [C] int32
  num_examples: int = flax.struct.field(pytree_node=False)
  min_negatives: int = flax.struct.field(pytree_node=False)
  max_negatives: int = flax.struct.field(pytree_node=False)


def build_class_table(labels: np.ndarray, num_classes: int | None = None
                      ) -> ClassTable:
  """:class:`ClassTable` of the training labels ``[N]`` (host, once), in the
  order of the dataset's indices (the ``index`` the step receives)."""
  labels = np.asarray(labels).astype(np.int64).reshape(-1)
  if num_classes is None:
    num_classes = int(labels.max()) + 1
  counts = np.bincount(labels, minlength=num_classes)
  offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
  order = np.argsort(labels, kind="stable")
  present = counts[counts > 0]
  return ClassTable(
      sorted_indices=jnp.asarray(order, jnp.int32),
      offsets=jnp.asarray(offsets, jnp.int32),
      counts=jnp.asarray(counts, jnp.int32),
      num_examples=int(labels.size),
      min_negatives=int(labels.size - present.max()),
      max_negatives=int(labels.size - present.min()))


def _negatives_without_replacement(keys, num_neg, k, width):
  """Per row, k distinct ranks uniform in ``[0, num_neg)`` in uniformly
  random order (``np.random.choice(·, k, replace=False)``): the first k
  entries < num_neg of a random permutation of ``[0, width)``."""
  perms = jax.vmap(lambda key: jax.random.permutation(key, width))(keys)
  valid = perms < num_neg[:, None]
  slot = jnp.cumsum(valid, axis=1) - 1
  slot = jnp.where(valid & (slot < k), slot, k)  # k: dropped
  rows = jnp.arange(perms.shape[0])[:, None]
  out = jnp.zeros((perms.shape[0], k), perms.dtype)
  return out.at[rows, slot].set(perms, mode="drop")


def _negative_ranks(key, num_neg, k, table: ClassTable):
  """``[B, k]`` ranks in ``[0, num_neg)``: without replacement where
  ``k ≤ num_neg``, with replacement otherwise (mdistiller's ``replace``)."""
  batch = num_neg.shape[0]
  key_perm, key_draw = jax.random.split(key)
  with_repl = None
  if k > table.min_negatives:  # some class has fewer than k negatives
    with_repl = jax.random.randint(key_draw, (batch, k), 0, num_neg[:, None])
    if k > table.max_negatives:
      return with_repl
  keys = jax.random.split(key_perm, batch)
  if table.min_negatives == table.max_negatives:  # balanced: no compaction
    ranks = jax.vmap(lambda key: jax.random.choice(
        key, table.max_negatives, (k,), replace=False))(keys)
  else:
    ranks = _negatives_without_replacement(keys, num_neg, k,
                                           table.max_negatives)
  if with_repl is None:
    return ranks
  return jnp.where((k > num_neg)[:, None], with_repl, ranks)


def sample_contrast_indices(key: jax.Array, index: jax.Array,
                            labels: jax.Array, table: ClassTable, k: int,
                            mode: str = "exact") -> jax.Array:
  """The contrast indices ``[B, k+1]`` int32 of one batch, on device.

  Column 0 is the positive, columns 1..k the negatives, as mdistiller's
  ``CIFAR100InstanceSample.__getitem__``:

  * negatives: k dataset indices of examples of *other* classes than
    ``labels[b]``, uniformly without replacement (in uniformly random order)
    when the class has at least k of them, with replacement otherwise
    (``np.random.choice(cls_negative[target], k, replace=k > len(...))``);
  * positive: ``mode="exact"`` → the example itself (``index[b]``);
    ``mode="relax"`` → a uniformly random example of the same class
    (mdistiller's "relax" changes the positive only; its negatives are
    still of other classes).

  Deterministic for ``key``; rows are independent. Cost: a random
  permutation of ~N per row (CIFAR-100, B = 64: 64 sorts of 49 500).

  Args:
    key: a PRNG key for this step (e.g. ``fold_in(base, step)``).
    index: ``[B]`` the examples' dataset indices.
    labels: ``[B]`` their classes.
    table: :func:`build_class_table` of the training labels.
    k: the number of negatives (CRD's ``nce_k``).
    mode: ``"exact"`` or ``"relax"``.
  """
  if mode not in CONTRAST_MODES:
    raise ConfigError(f"CRD mode must be one of {CONTRAST_MODES}, got "
                      f"{mode!r}")
  chex.assert_rank([index, labels], 1)
  chex.assert_equal_shape([index, labels])
  key_neg, key_pos = jax.random.split(key)
  counts = table.counts[labels]
  offsets = table.offsets[labels]
  ranks = _negative_ranks(key_neg, table.num_examples - counts, k, table)
  # Skip the class's own block of the class-sorted indices.
  position = ranks + jnp.where(ranks >= offsets[:, None], counts[:, None], 0)
  negatives = table.sorted_indices[position]
  if mode == "exact":
    positive = index.astype(jnp.int32)
  else:
    draw = jax.random.randint(key_pos, labels.shape, 0, counts)
    positive = table.sorted_indices[offsets + draw]
  return jnp.concatenate([positive[:, None], negatives], axis=1
                         ).astype(jnp.int32)


# ---------------------------------------------------------------------------
# Loss and memory update.


def _scores(bank: jax.Array, contrast_idx: jax.Array, v: jax.Array,
            temperature: float) -> jax.Array:
  """``exp(bank[contrast_idx] · v / T)`` ``[B, K+1]``; the bank is detached."""
  rows = jax.lax.stop_gradient(bank)[contrast_idx].astype(v.dtype)
  dots = jnp.einsum("bkd,bd->bk", rows, v, precision=_HIGHEST)
  return jnp.exp(dots / temperature)


def _normaliser(z: jax.Array, scores: jax.Array, weights: jax.Array,
                num_real: jax.Array, num_examples: int) -> jax.Array:
  """Z, set on first use (Z < 0) to mean(scores)·N over the real rows, as
  ContrastMemory; a constant of the loss (mdistiller reads it by
  ``.item()``)."""
  mean = jnp.sum(scores * weights[:, None]) / (num_real * scores.shape[1])
  estimate = (mean * num_examples).astype(z.dtype)
  unset = (z < 0) & (num_real > 0)
  return jax.lax.stop_gradient(jnp.where(unset, estimate, z))


def _nce_per_example(probs: jax.Array, num_examples: int) -> jax.Array:
  """mdistiller's ContrastLoss before its batch mean: ``-(log D1 + Σ log
  D0)`` per row of ``probs`` ``[B, K+1]`` (column 0 positive); noise
  probability m·Pn with m = K, Pn = 1/N."""
  noise = (probs.shape[1] - 1) * (1.0 / float(num_examples))
  log_d1 = jnp.log(probs[:, 0] / (probs[:, 0] + (noise + _NCE_EPS)))
  log_d0 = jnp.log(noise / (probs[:, 1:] + (noise + _NCE_EPS)))
  return -(log_d1 + jnp.sum(log_d0, axis=1))


def _updated_bank(bank: jax.Array, index: jax.Array, v: jax.Array,
                  momentum: float, mask: jax.Array) -> jax.Array:
  """Rows ``index`` ← l2-normalised ``momentum·bank[index] + (1−momentum)·v``;
  masked rows write nowhere (scatter out of range, dropped)."""
  v = jax.lax.stop_gradient(v)
  rows = bank[index].astype(v.dtype) * momentum + v * (1 - momentum)
  rows = l2_normalize_rows(rows)
  target = jnp.where(mask, index, bank.shape[0])
  return bank.at[target].set(rows.astype(bank.dtype), mode="drop")


def contrast_loss(v_s: jax.Array, v_t: jax.Array,
                  memory: dict[str, jax.Array], index: jax.Array,
                  contrast_idx: jax.Array, *, temperature: float,
                  momentum: float, mask: jax.Array | None = None
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ContrastMemory + the two ContrastLoss terms on the embeddings.

  ``v_s`` / ``v_t`` ``[B, D]`` (l2-normalised) are scored against the
  *other* side's bank at ``contrast_idx`` ``[B, K+1]``: P = exp(v·m/T)/Z.
  Returns ``(loss_s + loss_t, new_memory)``: each NCE term summed over the
  batch and divided by the number of real examples (mdistiller: by B), and
  the memory with Z set if it was unset and rows ``index`` updated by
  momentum from the current embeddings. No gradient reaches the memory, Z
  or the update. Masked rows (``mask`` False) add nothing and write nothing.
  """
  chex.assert_rank([v_s, v_t, contrast_idx], 2)
  chex.assert_equal_shape([v_s, v_t])
  chex.assert_shape(index, (v_s.shape[0],))
  chex.assert_shape(contrast_idx, (v_s.shape[0], None))
  n = memory["memory_s"].shape[0]
  mask = (jnp.ones(index.shape, bool) if mask is None
          else jnp.asarray(mask).astype(bool))
  chex.assert_equal_shape([mask, index])
  weights = mask.astype(v_s.dtype)
  num_real = jnp.sum(weights)
  # mdistiller: out_v1 (student) against memory_v2, out_v2 against memory_v1.
  scores_s = _scores(memory["memory_t"], contrast_idx, v_s, temperature)
  scores_t = _scores(memory["memory_s"], contrast_idx, v_t, temperature)
  z_s = _normaliser(memory["z_s"], scores_s, weights, num_real, n)
  z_t = _normaliser(memory["z_t"], scores_t, weights, num_real, n)
  per_example = (_nce_per_example(scores_s / z_s.astype(v_s.dtype), n)
                 + _nce_per_example(scores_t / z_t.astype(v_t.dtype), n))
  loss = (jnp.sum(jnp.where(mask, per_example, 0.0))
          / jnp.maximum(num_real, 1.0))
  new_memory = {
      "memory_s": _updated_bank(memory["memory_s"], index, v_s, momentum,
                                mask),
      "memory_t": _updated_bank(memory["memory_t"], index, v_t, momentum,
                                mask),
      "z_s": z_s, "z_t": z_t}
  return loss, new_memory


def crd_loss(f_s: jax.Array, f_t: jax.Array, memory: dict[str, jax.Array],
             index: jax.Array, contrast_idx: jax.Array, *,
             embed_s: Callable[[jax.Array], jax.Array],
             embed_t: Callable[[jax.Array], jax.Array],
             temperature: float = CRD_DEFAULTS["nce_t"],
             momentum: float = CRD_DEFAULTS["nce_momentum"],
             mask: jax.Array | None = None
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """mdistiller's ``CRD.crd_loss`` (unweighted) and the memory update.

  Args:
    f_s / f_t: ``[B, ...]`` the student's / teacher's ``pooled_feat``; the
      teacher's is detached (mdistiller runs it under ``no_grad``).
    memory: :func:`init_memory`'s state (current).
    index: ``[B]`` the examples' dataset indices (rows to update).
    contrast_idx: ``[B, K+1]`` from :func:`sample_contrast_indices`.
    embed_s / embed_t: the two :class:`Embed` modules bound to their
      parameters (e.g. ``modules["embed_s"]``), trained with the student.
    temperature / momentum: ``nce_t`` / ``nce_momentum``.
    mask: ``[B]`` real examples (None: all).

  Returns:
    ``(loss, new_memory)``; the step's objective adds
    ``feat_weight · loss`` and stores ``new_memory`` in the state.
  """
  v_s = _as_float(embed_s(_as_float(f_s)))
  v_t = _as_float(embed_t(jax.lax.stop_gradient(_as_float(f_t))))
  return contrast_loss(v_s, v_t, memory, index, contrast_idx,
                       temperature=temperature, momentum=momentum, mask=mask)


def _as_float(x: jax.Array) -> jax.Array:
  """float32 for bf16/f16/f32; float64 stays float64 (exact tests)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# ---------------------------------------------------------------------------
# CRD as a method (slkd_jax.methods).


def make_modules(student: nn.Module, teacher: nn.Module, settings: Any,
                 dtype, image_size: int) -> dict[str, nn.Module]:
  """The method's trainable modules: ``embed_s`` and ``embed_t``."""
  del student, teacher, image_size
  return make_embeds(int(settings.feat_dim), dtype)


def module_inputs(name: str, student: nn.Module, teacher: nn.Module,
                  settings: Any, image_size: int):
  """``(args, kwargs)`` initialising ``embed_s`` / ``embed_t``: zeros of the
  student's / teacher's pooled-feature width."""
  del settings
  model = student if name == "embed_s" else teacher
  return (jnp.zeros((1, pooled_feature_dim(model, image_size))),), {}


def init_buffers(key: jax.Array, settings: Any, train_labels: np.ndarray,
                 dtype) -> dict[str, Any]:
  """The non-trainable state: the memory banks and the class table of the
  training labels (for the negatives)."""
  labels = np.asarray(train_labels)
  return {"memory": init_memory(key, labels.shape[0], int(settings.feat_dim),
                                dtype),
          "classes": build_class_table(labels)}


def objective(logits: Logits, batch, hp: HParams, ctx: Context) -> Loss:
  """``w_ce·CE + w_feat·CRD`` (mdistiller's CRD has no KD term) and the
  updated memory; the negatives are drawn from this step's key."""
  labels, mask, settings = batch["label"], batch["mask"], ctx.settings
  buffers, modules = ctx.buffers, ctx.modules
  contrast_idx = sample_contrast_indices(
      ctx.rng, batch["index"], labels, buffers["classes"],
      int(settings.nce_k), settings.mode)
  ce = losses.cross_entropy(logits.student, labels, mask)
  crd, memory = crd_loss(
      logits.student_features.pooled_feat,
      logits.teacher_features.pooled_feat, buffers["memory"], batch["index"],
      contrast_idx, embed_s=modules["embed_s"], embed_t=modules["embed_t"],
      temperature=settings.nce_t, momentum=settings.nce_momentum, mask=mask)
  return Loss(hp.ce_weight * ce + hp.feat_weight * crd,
              {"student/ce": ce, "student/crd": crd},
              {**buffers, "memory": memory})


def check_config(config: Any) -> None:
  """Per-example memory needs each example's dataset index, which only the
  device-resident pipelines carry."""
  check(config.data.name != "imagenet2012", "data.name", config.data.name,
        "cifar100, digits or synthetic for method 'crd' (the ImageNet "
        "pipeline carries no dataset index yet)")


METHOD = Method(
    "crd", "contrastive representation distillation (Tian 2020)", objective,
    uses_teacher=True, features=True, defaults=CRD_DEFAULTS,
    setting_rules={"nce_k": int_at_least(1), "feat_dim": int_at_least(1),
                   "nce_t": POSITIVE, "nce_momentum": FRACTION,
                   "mode": one_of(CONTRAST_MODES)},
    check_config=check_config, make_modules=make_modules,
    module_inputs=module_inputs, init_buffers=init_buffers)
