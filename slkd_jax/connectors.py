"""Trainable connectors of feature distillation, as mdistiller builds them.

* :class:`ConvReg` — FitNet's regressor (``mdistiller/distillers/_common.py``):
  a conv chosen from the student/teacher shapes, BatchNorm, ReLU.
* :class:`VIDRegressor` — one layer of VID's regressor (1×1 conv – ReLU –
  1×1 conv – ReLU – 1×1 conv, no biases) and its log-scale;
  :class:`VIDConnector` holds one per distilled layer.

Layers are :mod:`slkd_jax.models.layers`' PyTorch-faithful Conv/BatchNorm with
PyTorch's *default* initialisation (mdistiller re-initialises none of these
modules). Parameter paths follow the PyTorch module paths with the naming rule
of :mod:`slkd_jax.models.registry` (``conv_reg.conv`` / ``conv_reg.bn``;
``regressors.0.2`` → ``regressors_0/2``).

Train/eval: mdistiller calls ``distiller.train()``, so ConvReg's BatchNorm
normalises with batch statistics (and updates its running statistics, which
nothing ever reads: the connector is not used at test time). Pass
``train=True`` and the batch ``mask``.

Shapes are NHWC: ``(N, H, W, C)``, where mdistiller's are NCHW.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from slkd_jax.feature_losses import adaptive_avg_pool
from slkd_jax.models.layers import BatchNorm, Conv, param_dtype

Shape = Sequence[int]


def _uniform(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class TorchConvTranspose(nn.Module):
  """``nn.ConvTranspose2d(in, features, k, stride, padding)`` (groups 1).

  The kernel is ``(k, k, in, out)``: PyTorch's ``(in, out, k, k)`` weight
  transposed by ``(2, 3, 0, 1)``. Init is PyTorch's default, whose fan-in is
  read off the weight's dim 1, i.e. ``out·k²`` (uniform ±1/sqrt(fan-in) for
  weight and bias).
  """
  features: int
  kernel_size: int
  strides: int = 1
  padding: int = 0
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, s, p = self.kernel_size, self.strides, self.padding
    bound = 1.0 / math.sqrt(self.features * k * k)
    pdtype = param_dtype(self.dtype)
    kernel = self.param("kernel", _uniform(bound),
                        (k, k, x.shape[-1], self.features), pdtype)
    # A transposed conv is the conv of the stride-dilated input with the
    # spatially flipped kernel, padded by k - 1 - p on each side.
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel[::-1, ::-1].astype(self.dtype),
        window_strides=(1, 1), padding=((k - 1 - p, k - 1 - p),) * 2,
        lhs_dilation=(s, s), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      bias = self.param("bias", _uniform(bound), (self.features,), pdtype)
      y = y + bias.astype(self.dtype)
    return y


def conv_reg_spec(s_shape: Shape, t_shape: Shape) -> dict[str, Any]:
  """mdistiller ConvReg's choice of conv for NHWC student/teacher shapes.

  Returns ``dict(kind, kernel_size, strides, padding)``: a 3×3 stride-2 conv
  when the student is twice the teacher's height, a 4×4 stride-2 transposed
  conv when half, else a ``(1 + s_H − t_H)``-sized valid conv (checked in
  this order; heights decide, as in mdistiller).
  """
  (_, s_h, s_w, _), (_, t_h, t_w, _) = s_shape, t_shape
  if s_h == 2 * t_h:
    return dict(kind="conv", kernel_size=3, strides=2, padding=1)
  if s_h * 2 == t_h:
    return dict(kind="transpose", kernel_size=4, strides=2, padding=1)
  if s_h >= t_h:
    if s_h - t_h != s_w - t_w:
      raise ValueError(f"ConvReg: non-square kernel ({1 + s_h - t_h}, "
                       f"{1 + s_w - t_w}) for student {tuple(s_shape)} and "
                       f"teacher {tuple(t_shape)} is not supported")
    return dict(kind="conv", kernel_size=1 + s_h - t_h, strides=1, padding=0)
  raise ValueError(f"ConvReg: student height {s_h} cannot be mapped to "
                   f"teacher height {t_h}")


class ConvReg(nn.Module):
  """FitNet's convolutional regressor: conv (see :func:`conv_reg_spec`,
  with bias) → BatchNorm → ReLU (if ``use_relu``), to the teacher's channels.

  Attributes:
    s_shape / t_shape: NHWC shapes of the student's / teacher's hint feature.
  """
  s_shape: tuple[int, ...]
  t_shape: tuple[int, ...]
  use_relu: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool,
               mask: jax.Array | None = None) -> jax.Array:
    spec = conv_reg_spec(self.s_shape, self.t_shape)
    t_c = self.t_shape[-1]
    if spec["kind"] == "transpose":
      conv = TorchConvTranspose(t_c, spec["kernel_size"], spec["strides"],
                                spec["padding"], dtype=self.dtype, name="conv")
    else:
      conv = Conv(t_c, spec["kernel_size"], spec["strides"], spec["padding"],
                  use_bias=True, init_scheme="torch", dtype=self.dtype,
                  name="conv")
    y = BatchNorm(dtype=self.dtype, name="bn")(conv(x), train, mask)
    return nn.relu(y) if self.use_relu else y


def vid_log_scale_init(channels: int, init_pred_var: float = 5.0,
                       eps: float = 1e-5, dtype=jnp.float32) -> jax.Array:
  """mdistiller's ``log(exp(init_pred_var − eps) − 1)`` for each channel.

  Computed in float64 and rounded to ``dtype`` (mdistiller: a float32
  tensor), so that ``log(1 + exp(·)) + eps`` is ``init_pred_var``.
  """
  value = np.log(np.exp(init_pred_var - eps) - 1.0)
  return jnp.full((channels,), value, dtype)


class VIDRegressor(nn.Module):
  """One layer of VID: μ = conv1×1–ReLU–conv1×1–ReLU–conv1×1 (no biases,
  PyTorch default init; submodules ``0``, ``2``, ``4`` as the Sequential).

  ``__call__(f_s, target_size)`` first average-pools the student to
  ``(target_size, target_size)`` when it is larger (the teacher's height),
  as mdistiller pools before regressing. Returns ``(μ, log_scale)``.

  The log-scale: mdistiller keeps it in a plain Python list, so it is neither
  registered nor given to the optimizer — it stays at its initial value
  (σ² = init_pred_var) forever. With ``learn_log_scale=False`` (default,
  mdistiller) it is that constant and no variable; ``True`` makes it a
  trainable ``params`` entry ``log_scale`` (the VID authors' intent).
  """
  features: int
  init_pred_var: float = 5.0
  eps: float = 1e-5
  learn_log_scale: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, target_size: int | None = None
               ) -> tuple[jax.Array, jax.Array]:
    if target_size is not None and x.shape[1] > target_size:
      x = adaptive_avg_pool(x, (target_size, target_size))
    for i in (0, 2, 4):
      if i:
        x = nn.relu(x)
      x = Conv(self.features, 1, 1, 0, use_bias=False, init_scheme="torch",
               dtype=self.dtype, name=str(i))(x)
    pdtype = param_dtype(self.dtype)
    init = vid_log_scale_init(self.features, self.init_pred_var, self.eps,
                              pdtype)
    if self.learn_log_scale:
      log_scale = self.param("log_scale", lambda key, s, d: init.astype(d),
                             (self.features,), pdtype)
    else:
      log_scale = init
    return x, log_scale


class VIDConnector(nn.Module):
  """VID's regressors for all distilled layers (``regressors_<i>``).

  Attributes:
    t_channels: teacher channels per layer (mdistiller: ``feats[1:]``).
    target_sizes: teacher heights per layer (the student is pooled to them).
  """
  t_channels: tuple[int, ...]
  target_sizes: tuple[int, ...]
  init_pred_var: float = 5.0
  eps: float = 1e-5
  learn_log_scale: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats_s: Sequence[jax.Array]
               ) -> tuple[list[jax.Array], list[jax.Array]]:
    if not len(feats_s) == len(self.t_channels) == len(self.target_sizes):
      raise ValueError(f"VIDConnector: {len(feats_s)} student features for "
                       f"{len(self.t_channels)} regressors")
    means, log_scales = [], []
    for i, (f, c, size) in enumerate(zip(feats_s, self.t_channels,
                                         self.target_sizes)):
      mu, log_scale = VIDRegressor(c, self.init_pred_var, self.eps,
                                   self.learn_log_scale, self.dtype,
                                   name=f"regressors_{i}")(f, size)
      means.append(mu)
      log_scales.append(log_scale)
    return means, log_scales


def make_connector(method: str, s_shapes: Sequence[Shape],
                   t_shapes: Sequence[Shape], *, hint_layer: int = 2,
                   init_pred_var: float = 5.0, eps: float = 1e-5,
                   learn_log_scale: bool = False, dtype=jnp.float32
                   ) -> nn.Module | None:
  """The connector mdistiller builds for ``method`` (None if it has none).

  ``s_shapes`` / ``t_shapes``: NHWC shapes of student's and teacher's
  ``feats``, as :func:`feature_shapes` returns them.
  fitnet → ``ConvReg(s[hint_layer], t[hint_layer])``; vid → a
  :class:`VIDConnector` over ``feats[1:]``.
  """
  s_shapes = [tuple(int(d) for d in s) for s in s_shapes]
  t_shapes = [tuple(int(d) for d in s) for s in t_shapes]
  if method == "fitnet":
    return ConvReg(s_shapes[hint_layer], t_shapes[hint_layer], dtype=dtype)
  if method == "vid":
    return VIDConnector(tuple(s[-1] for s in t_shapes[1:]),
                        tuple(s[1] for s in t_shapes[1:]), init_pred_var,
                        eps, learn_log_scale, dtype)
  return None


def feature_shapes(model: nn.Module, input_size: tuple[int, int] = (32, 32)
                   ) -> list[tuple[int, ...]]:
  """NHWC shapes of ``model``'s ``feats`` for one image (mdistiller's
  ``get_feat_shapes``), without running it (``jax.eval_shape``)."""
  x = jnp.zeros((1, *input_size, 3), jnp.float32)

  def run():
    return model.init_with_output(jax.random.key(0), x, features=True)

  outputs, _ = jax.eval_shape(run)
  return [tuple(f.shape) for f in outputs.feats]
