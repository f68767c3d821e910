"""The "kuangliu" CIFAR ResNet-18/34 and their TESKD form (Li et al.,
"Student Helping Teacher: Teacher Evolution via Self-Knowledge
Distillation", arXiv 2110.00329; official code ``models/resnet_our.py``).

Backbone (``cifar_resnet18`` / ``cifar_resnet34``): 3×3/1 stem conv 3→64 +
BN + ReLU (no max-pool), four stages of post-activation BasicBlocks, widths
64/128/256/512, strides 1/2/2/2, blocks [2,2,2,2] or [3,4,6,3]; shortcut
``downsample`` (1×1 conv + BN) when the stride or width changes; global
average pool, ``fc``. This is *not* the zoo's ``resnet8…110`` (three stages,
widths 16/32/64) nor ``ResNet50``. Every layer keeps PyTorch's default
initialisation (the reference has no init loop): convs and Linears uniform
±1/√fan_in (biases too), BN γ = 1, β = 0.

TESKD form (``teskd_cifar_resnet18`` / ``teskd_cifar_resnet34``): the same
backbone, same parameter names, plus a top-down path and three branch heads
(all at the top level, named after the PyTorch attributes so the official
checkpoints convert, see :mod:`slkd_jax.convert_torch`), with D = 512:

* laterals ``laterals_i`` (i = 0..3): 1×1 conv C_i→D, BN, ReLU;
* upsamples ``upsample_k`` (k = 0..2): bilinear ×2 with
  ``align_corners=True`` (:func:`upsample_bilinear_2x`), 1×1 conv, BN, ReLU
  (PyTorch index 0 is the parameter-free ``Upsample``: conv ``_1``, BN ``_2``);
* fusions ``fuse_k`` (k = 1..3): 1×1 conv 2D→D, BN, ReLU on the channel
  concatenation ``[u + L(s), u]``;
* ``t4 = L3(s4)``; ``t3 = fuse_3([u + L2(s3), u])`` with ``u = upsample_2(t4)``;
  ``t2`` from ``upsample_1(t3)`` and ``L1(s2)``; ``t1`` from
  ``upsample_0(t2)`` and ``L0(s1)``;
* heads ``downsample3`` / ``2`` / ``1`` on t3 / t2 / t1: k×k conv stride k
  (k = 2 / 4 / 8, with bias), BN, ReLU, 1×1 conv (with bias), BN, ReLU, global
  average pool, Linear ``fc_b3`` / ``fc_b2`` / ``fc_b1``.

Branch order everywhere (``branch_logits``, ``branch_pooled``): the
official training loop's ``(b1, b2, b3)``, i.e. index 0 is the *deepest*
head (t3, ``downsample3`` / ``fc_b3``), index 2 the shallowest (t1,
``fc_b1``). The heads run only with ``features=True`` (and at init, so their
parameters exist): ``features=False`` is the plain backbone, which is what
the TESKD paper deploys.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from slkd_jax.models.layers import (BatchNorm, Linear, TorchConv, apply_stage,
                                    global_avg_pool, param_dtype)
from slkd_jax.models.outputs import Outputs
from slkd_jax.models.registry import register

#: Branch head kernel (= stride) per branch, in branch order (deepest first):
#: all three heads pool a 4×4 map for 32×32 inputs.
BRANCH_KERNELS = (2, 4, 8)

#: TESKD model → its backbone alone (what
#: :func:`slkd_jax.methods.teskd.export_backbone` writes).
BACKBONE_OF = {"teskd_cifar_resnet18": "cifar_resnet18",
               "teskd_cifar_resnet34": "cifar_resnet34"}


@flax.struct.dataclass
class TeskdOutputs(Outputs):
  """:class:`Outputs` of the backbone plus the three branches.

  ``logits``, ``feats`` (stem, s1..s4), ``preact_feats`` and ``pooled_feat``
  (f̄, ``[B, 512]``) are the backbone's; ``branch_logits`` ``[3, B, C]`` and
  ``branch_pooled`` ``[3, B, D]`` are the branches', deepest first.
  """
  branch_logits: jax.Array | None = None
  branch_pooled: jax.Array | None = None


def align_corners_matrix(n: int) -> np.ndarray:
  """``[2n, n]`` float64 weights of 1-D bilinear ×2, ``align_corners=True``.

  Output ``i`` reads source coordinate ``x = i·(n−1)/(2n−1)``:
  ``(1−w)·in[⌊x⌋] + w·in[min(⌊x⌋+1, n−1)]`` with ``w = x − ⌊x⌋``
  (``n = 1`` replicates). Not ``jax.image.resize``, whose half-pixel
  centres are ``align_corners=False``.
  """
  out = 2 * n
  m = np.zeros((out, n), np.float64)
  scale = (n - 1) / (out - 1)
  for i in range(out):
    x = i * scale
    lo = min(int(np.floor(x)), n - 1)
    w = x - lo
    m[i, lo] += 1.0 - w
    m[i, min(lo + 1, n - 1)] += w
  return m


def upsample_bilinear_2x(x: jax.Array) -> jax.Array:
  """``F.interpolate(x, scale_factor=2, mode='bilinear',
  align_corners=True)`` for NHWC ``x`` (separable: two small matmuls)."""
  mh = jnp.asarray(align_corners_matrix(x.shape[1]), x.dtype)
  mw = jnp.asarray(align_corners_matrix(x.shape[2]), x.dtype)
  y = jnp.einsum("oh,nhwc->nowc", mh, x)
  return jnp.einsum("pw,nowc->nopc", mw, y)


class KuangliuBlock(nn.Module):
  """conv3×3(stride)-BN-ReLU-conv3×3-BN + shortcut, ReLU; PyTorch default
  init. The shortcut ``downsample_0`` (1×1 conv) / ``downsample_1`` (BN)
  exists when the stride or the width changes. ``return_preact``: also the
  sum before the final ReLU."""
  planes: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool, mask=None, return_preact: bool = False):
    out = TorchConv(self.planes, 3, self.strides, 1, dtype=self.dtype,
                    name="conv1")(x)
    out = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(out, train, mask))
    out = TorchConv(self.planes, 3, 1, 1, dtype=self.dtype, name="conv2")(out)
    out = BatchNorm(dtype=self.dtype, name="bn2")(out, train, mask)
    if self.strides != 1 or x.shape[-1] != self.planes:
      x = TorchConv(self.planes, 1, self.strides, 0, dtype=self.dtype,
                    name="downsample_0")(x)
      x = BatchNorm(dtype=self.dtype, name="downsample_1")(x, train, mask)
    preact = out + x
    out = nn.relu(preact)
    return (out, preact) if return_preact else out


class KuangliuResNet(nn.Module):
  """The kuangliu CIFAR ResNet, optionally with TESKD's heads.

  Attributes:
    stage_sizes: blocks per stage, ``(2, 2, 2, 2)`` or ``(3, 4, 6, 3)``.
    num_classes: classifier width (backbone and branches).
    width: stem / first-stage width (64 in the reference; stages are
      width·(1, 2, 4, 8) and the top-down width D = 8·width). Smaller only
      for fast tests.
    teskd: build the top-down path and the branch heads.
    dtype: compute dtype.

  ``features=True`` returns :class:`Outputs` (backbone: ``feats`` = [stem,
  s1..s4], ``preact_feats`` = [stem, each stage's last sum before its ReLU],
  ``pooled_feat``) or, with ``teskd``, :class:`TeskdOutputs`; otherwise the
  backbone logits.
  """
  stage_sizes: Sequence[int]
  num_classes: int = 100
  width: int = 64
  teskd: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               features: bool = False, mask=None):
    x = TorchConv(self.width, 3, 1, 1, dtype=self.dtype, name="conv1")(x)
    x = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, train, mask))
    feats, preacts = [x], [x]
    for stage, num_blocks in enumerate(self.stage_sizes):
      planes = self.width * 2**stage
      blocks = [KuangliuBlock(planes, 2 if (stage > 0 and i == 0) else 1,
                              self.dtype, name=f"layer{stage + 1}_{i}")
                for i in range(num_blocks)]
      x, preact = apply_stage(blocks, x, train, mask, features)
      feats.append(x)
      preacts.append(preact)
    pooled = global_avg_pool(x)
    logits = Linear(self.num_classes, "torch", self.dtype, name="fc")(pooled)
    pooled = pooled.astype(param_dtype(self.dtype))
    if self.teskd and (features or self.is_initializing()):
      branch_logits, branch_pooled = self._branches(feats[1:], train, mask)
      if features:
        return TeskdOutputs(logits, tuple(feats), tuple(preacts), pooled,
                            branch_logits, branch_pooled)
    if not features:
      return logits
    return Outputs(logits, tuple(feats), tuple(preacts), pooled)

  def _cbr(self, name: str, x, features: int, kernel: int, *, conv_index=0,
           bias=False, train: bool, mask) -> jax.Array:
    """Conv ``{name}_{conv_index}`` (k×k, stride k, no padding) → BN
    ``{name}_{conv_index + 1}`` → ReLU: one PyTorch ``Sequential`` block."""
    y = TorchConv(features, kernel, kernel, 0, use_bias=bias,
                  dtype=self.dtype, name=f"{name}_{conv_index}")(x)
    y = BatchNorm(dtype=self.dtype, name=f"{name}_{conv_index + 1}")(
        y, train, mask)
    return nn.relu(y)

  def _branches(self, stages, train: bool, mask):
    """The top-down path and the three heads: ``(logits [3,B,C],
    pooled [3,B,D])``, deepest branch first."""
    d = 8 * self.width
    cbr = lambda name, x, k=1, **kw: self._cbr(  # noqa: E731
        name, x, d, k, train=train, mask=mask, **kw)
    laterals = [cbr(f"laterals_{i}", s, conv_index=0)
                for i, s in enumerate(stages)]
    fused, t = [], laterals[3]
    for k in (3, 2, 1):  # t3, t2, t1
      u = cbr(f"upsample_{k - 1}", upsample_bilinear_2x(t), conv_index=1)
      t = cbr(f"fuse_{k}", jnp.concatenate([u + laterals[k - 1], u], -1))
      fused.append(t)
    logits, pooled = [], []
    for t, k, j in zip(fused, BRANCH_KERNELS, (3, 2, 1)):
      h = cbr(f"downsample{j}", t, k, bias=True)
      h = cbr(f"downsample{j}", h, conv_index=3, bias=True)
      f = global_avg_pool(h)
      logits.append(Linear(self.num_classes, "torch", self.dtype,
                           name=f"fc_b{j}")(f))
      pooled.append(f.astype(param_dtype(self.dtype)))
    return jnp.stack(logits), jnp.stack(pooled)


_STAGES = {"18": (2, 2, 2, 2), "34": (3, 4, 6, 3)}

for _depth, _sizes in _STAGES.items():
  register(f"cifar_resnet{_depth}")(
      lambda num_classes, dtype, _s=_sizes: KuangliuResNet(
          _s, num_classes, dtype=dtype))
  register(f"teskd_cifar_resnet{_depth}")(
      lambda num_classes, dtype, _s=_sizes: KuangliuResNet(
          _s, num_classes, teskd=True, dtype=dtype))
