"""Trainable connectors of feature distillation, as mdistiller builds them.

* :class:`ConvReg` — FitNet's regressor (``mdistiller/distillers/_common.py``):
  a conv chosen from the student/teacher shapes, BatchNorm, ReLU.
* :class:`VIDRegressor` — one layer of VID's regressor (1×1 conv – ReLU –
  1×1 conv – ReLU – 1×1 conv, no biases) and its log-scale;
  :class:`VIDConnector` holds one per distilled layer.
* :class:`OFDConnector` — OFD's conv1×1 + BN per distilled stage.
* :class:`ABF` / :class:`ReviewKDConnector` — ReviewKD's attention-based
  fusion modules, and :func:`reviewkd_spec`, its per-pair shape lists.

Layers are :mod:`slkd_jax.models.layers`' PyTorch-faithful Conv/BatchNorm with
PyTorch's *default* initialisation where mdistiller re-initialises nothing
(ConvReg, VID), and mdistiller's own initialisation for OFD and ReviewKD.
Parameter paths follow the PyTorch module paths with the naming rule
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

from slkd_jax import errors
from slkd_jax.feature_losses import adaptive_avg_pool, nearest_resize
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


def output_shapes(model: nn.Module, input_size: tuple[int, int] = (32, 32)):
  """``model``'s :class:`~slkd_jax.models.Outputs` for one image as
  ``jax.ShapeDtypeStruct`` leaves, without running it (``jax.eval_shape``)."""
  x = jnp.zeros((1, *input_size, 3), jnp.float32)

  def run():
    return model.init_with_output(jax.random.key(0), x, features=True)

  outputs, _ = jax.eval_shape(run)
  return outputs


def feature_shapes(model: nn.Module, input_size: tuple[int, int] = (32, 32)
                   ) -> list[tuple[int, ...]]:
  """NHWC shapes of ``model``'s ``feats`` for one image (mdistiller's
  ``get_feat_shapes``), without running it (``jax.eval_shape``)."""
  return [tuple(f.shape) for f in output_shapes(model, input_size).feats]


# ---------------------------------------------------------------------------
# OFD: one conv1×1-BN connector per distilled stage.


def align_last(*lists: Sequence[Any]) -> list[list[Any]]:
  """mdistiller's ``_align_list``: each list cut to its last ``min`` length
  entries (the deepest stages)."""
  n = min(len(x) for x in lists)
  return [list(x)[len(x) - n:] for x in lists]


class OFDConnector(nn.Module):
  """OFD's connectors (mdistiller ``ConnectorConvBN``, kernel size 1):
  per stage a bias-free 1×1 conv from the student's to the teacher's
  channels, initialised N(0, sqrt(2/n)) with n = k·k·out_channels (He
  normal, fan-out), then BatchNorm (γ 1, β 0). Submodules
  ``connectors_<i>/0`` (conv) and ``connectors_<i>/1`` (BN), as
  ``connectors.connectors.<i>.{0,1}``.

  ``__call__(feats_s, train, mask)``: the student's ``preact_feats[1:]``,
  NHWC; the deepest ``len(t_channels)`` of them are regressed (mdistiller's
  ``_align_list``) and returned. BatchNorm uses batch statistics in
  training (mdistiller trains the distiller's children in train mode).
  """
  t_channels: tuple[int, ...]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats_s: Sequence[jax.Array], train: bool,
               mask: jax.Array | None = None) -> list[jax.Array]:
    n = len(self.t_channels)
    if len(feats_s) < n:
      raise ValueError(f"OFDConnector: {len(feats_s)} student features for "
                       f"{n} connectors")
    feats_s = list(feats_s)[len(feats_s) - n:]
    out = []
    for i, (f, c) in enumerate(zip(feats_s, self.t_channels)):
      y = Conv(c, 1, 1, 0, use_bias=False, init_scheme="he_fan_out",
               dtype=self.dtype, name=f"connectors_{i}_0")(f)
      out.append(BatchNorm(dtype=self.dtype, name=f"connectors_{i}_1")(
          y, train, mask))
    return out


def ofd_channels(s_shapes: Sequence[Shape], t_shapes: Sequence[Shape]
                 ) -> tuple[list[int], list[int]]:
  """Student and teacher channels of OFD's connectors: ``[1:]`` of each
  network's stage channels, aligned to the deepest common stages."""
  s_c, t_c = align_last([s[-1] for s in s_shapes[1:]],
                        [t[-1] for t in t_shapes[1:]])
  return s_c, t_c


# ---------------------------------------------------------------------------
# ReviewKD: attention-based fusion (ABF) modules, applied top-down.

#: ``nn.init.kaiming_uniform_(w, a=1)``: uniform ±sqrt(3 / fan_in).
_kaiming_uniform_a1 = nn.initializers.variance_scaling(1.0, "fan_in",
                                                       "uniform")


class ABF(nn.Module):
  """One attention-based fusion module (mdistiller ``ABF``).

  conv1 (1×1, no bias, kaiming_uniform a=1) + BN maps the student level to
  ``mid_channels``; with ``fuse``, the residual from the deeper level is
  nearest-resized to ``shape`` and the two are blended with a 2-channel
  sigmoid attention (``att_conv``: 1×1 conv with bias, PyTorch default
  init); the result is nearest-resized to ``out_shape`` if its width
  differs, and conv2 (3×3, no bias, kaiming_uniform a=1) + BN maps it to
  ``out_channels``. Returns ``(output, residual)`` (the residual is the map
  before conv2, after resizing). Parameter paths follow PyTorch:
  ``conv1_0``, ``conv1_1``, ``conv2_0``, ``conv2_1``, ``att_conv_0``.
  """
  mid_channels: int
  out_channels: int
  fuse: bool
  dtype: Any = jnp.float32

  def _conv(self, x, features, k, name):
    pdtype = param_dtype(self.dtype)
    return nn.Conv(features, (k, k), padding=((k // 2, k // 2),) * 2,
                   use_bias=False, kernel_init=_kaiming_uniform_a1,
                   dtype=self.dtype, param_dtype=pdtype, name=name)(
                       x.astype(self.dtype))

  @nn.compact
  def __call__(self, x: jax.Array, residual: jax.Array | None, shape: int,
               out_shape: int, train: bool, mask: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    x = BatchNorm(dtype=self.dtype, name="conv1_1")(
        self._conv(x, self.mid_channels, 1, "conv1_0"), train, mask)
    if self.fuse:
      y = nearest_resize(residual, (shape, shape))
      z = Conv(2, 1, 1, 0, use_bias=True, init_scheme="torch",
               dtype=self.dtype, name="att_conv_0")(
                   jnp.concatenate([x, y], axis=-1))
      z = nn.sigmoid(z)
      x = x * z[..., 0:1] + y * z[..., 1:2]
    if x.shape[2] != out_shape:  # mdistiller compares the width
      x = nearest_resize(x, (out_shape, out_shape))
    out = BatchNorm(dtype=self.dtype, name="conv2_1")(
        self._conv(x, self.out_channels, 3, "conv2_0"), train, mask)
    return out, x


class ReviewKDConnector(nn.Module):
  """ReviewKD's ABFs (mdistiller ``ReviewKD.abfs``), knowledge review from
  the deepest level (the pooled feature as a 1×1 map) to the shallowest.

  Attributes are mdistiller's config lists (:func:`reviewkd_spec`):
  ``in_channels`` / ``out_channels`` shallow → deep (pooled last),
  ``shapes`` / ``out_shapes`` deep → shallow (pooled first). The middle
  width is ``min(512, in_channels[-1])`` (mdistiller's MAX_MID_CHANNEL is
  read but never used). ``abfs_0`` is the pooled level's module (no fusion),
  as the reversed ModuleList.

  ``__call__(levels, train, mask)``: the student's levels shallow → deep
  (:func:`reviewkd_levels`); the deepest ``len(in_channels)`` are used
  (mdistiller's ``zip`` drops the shallower ones). Returns the outputs
  shallow → deep (the teacher's ``preact_feats[1:] + [pooled]`` shapes).
  """
  in_channels: tuple[int, ...]
  out_channels: tuple[int, ...]
  shapes: tuple[int, ...]
  out_shapes: tuple[int, ...]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, levels: Sequence[jax.Array], train: bool,
               mask: jax.Array | None = None) -> list[jax.Array]:
    n = len(self.in_channels)
    if len(levels) < n:
      raise ValueError(f"ReviewKDConnector: {len(levels)} student levels "
                       f"for {n} ABFs")
    levels = list(levels)[len(levels) - n:]
    mid = min(512, self.in_channels[-1])
    abfs = [ABF(mid, self.out_channels[n - 1 - j], fuse=j > 0,
                dtype=self.dtype, name=f"abfs_{j}") for j in range(n)]
    x = list(levels)[::-1]
    out, residual = abfs[0](x[0], None, self.shapes[0], self.out_shapes[0],
                            train, mask)
    results = [out]
    for f, abf, shape, out_shape in zip(x[1:], abfs[1:], self.shapes[1:],
                                        self.out_shapes[1:]):
      out, residual = abf(f, residual, shape, out_shape, train, mask)
      results.insert(0, out)
    return results


def reviewkd_levels(outputs, preact: bool, teacher: bool = False
                    ) -> list[jax.Array]:
  """The maps ReviewKD reads from one network's outputs, shallow → deep.

  Student: ``feats`` (``preact_feats`` if ``preact``: mdistiller's
  STU_PREACT) + the pooled feature as a 1×1 map. Teacher:
  ``preact_feats[1:]`` + the pooled feature.
  """
  pooled = outputs.pooled_feat[:, None, None, :]
  if teacher:
    return list(outputs.preact_feats)[1:] + [pooled]
  return list(outputs.preact_feats if preact else outputs.feats) + [pooled]


def reviewkd_spec(student: nn.Module, teacher: nn.Module,
                  input_size: tuple[int, int] = (32, 32)) -> dict[str, list]:
  """mdistiller's per-pair ReviewKD lists, derived from the two networks.

  Returns ``dict(in_channels, out_channels, shapes, out_shapes)`` as
  mdistiller's REVIEWKD.IN_CHANNELS, OUT_CHANNELS, SHAPES and OUT_SHAPES
  (which its yaml files hard-code per pair): one level per teacher level
  (``preact_feats[1:]`` + pooled); the student's deepest levels of
  ``feats + [pooled]``; heights of the square maps.

  Raises:
    ConfigError: the student has fewer levels than the teacher, or a map
      is not square.
  """
  s_out = output_shapes(student, input_size)
  t_out = output_shapes(teacher, input_size)
  as_map = lambda p: (1, 1, 1, p.shape[-1])  # noqa: E731
  t_levels = [f.shape for f in t_out.feats[1:]] + [as_map(t_out.pooled_feat)]
  s_levels = [f.shape for f in s_out.feats] + [as_map(s_out.pooled_feat)]
  n = len(t_levels)
  if len(s_levels) < n:
    raise errors.ConfigError(
        f"ReviewKD: the student has {len(s_levels)} levels (feats + pooled), "
        f"fewer than the teacher's {n}")
  s_levels = s_levels[len(s_levels) - n:]
  if any(shape[1] != shape[2] for shape in s_levels + t_levels):
    raise errors.ConfigError("ReviewKD: feature maps must be square "
                             f"(student {s_levels}, teacher {t_levels})")
  return dict(in_channels=[s[-1] for s in s_levels],
              out_channels=[t[-1] for t in t_levels],
              shapes=[s[1] for s in s_levels][::-1],
              out_shapes=[t[1] for t in t_levels][::-1])
