"""Building blocks shared by every model family, faithful to PyTorch.

The reference zoos (RepDistiller / mdistiller, torchvision) are PyTorch. To load
their checkpoints 1:1 and reproduce their training dynamics we match PyTorch
where flax's defaults differ:

* convolutions take explicit, symmetric padding (``'SAME'`` pads stride-2
  convolutions asymmetrically);
* BatchNorm uses eps 1e-5, momentum 0.1 in PyTorch's sense, and updates the
  running variance with the *unbiased* batch variance;
* initialisers are PyTorch's (He normal with fan_out, or PyTorch's default
  uniform ``±1/sqrt(fan_in)`` for weights and biases).

Every module takes a compute ``dtype``. Parameters, BatchNorm statistics and
logits are *at least* float32 (:func:`param_dtype`): float32 under bfloat16 or
float32 compute, float64 under float64 compute (the exact reference tests).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from slkd_jax.models.outputs import Outputs

Dtype = Any
Initializer = Callable[..., jax.Array]



def param_dtype(dtype: Dtype) -> jnp.dtype:
  """The storage dtype of parameters, statistics and logits for ``dtype``.

  At least float32: bfloat16 compute keeps float32 master weights (its
  rounding would stall SGD), while float64 compute keeps float64 everywhere
  so that a float64 run is float64 end to end (promote, never demote).
  """
  return jnp.promote_types(dtype, jnp.float32)


# ---------------------------------------------------------------------------
# Initialisers.

#: ``torch.nn.init.kaiming_normal_(w, mode='fan_out', nonlinearity='relu')``:
#: an untruncated normal with std sqrt(2 / (k*k*out_channels)).
he_normal_fan_out: Initializer = nn.initializers.variance_scaling(
    2.0, "fan_out", "normal")

#: PyTorch's default weight init for Conv/Linear
#: (``kaiming_uniform_(a=sqrt(5))``): uniform in ±1/sqrt(fan_in).
torch_default_kernel: Initializer = nn.initializers.variance_scaling(
    1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias(fan_in: int) -> Initializer:
  """PyTorch's default Conv/Linear bias init: uniform in ±1/sqrt(fan_in)."""
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def normal(std: float) -> Initializer:
  """``torch.nn.init.normal_(w, 0, std)``."""
  return nn.initializers.normal(stddev=std)


# ---------------------------------------------------------------------------
# Layers.


class Conv(nn.Module):
  """2-D convolution with PyTorch semantics (NHWC, HWIO kernel).

  Attributes:
    features: output channels.
    kernel_size: square kernel size k.
    strides: stride.
    padding: symmetric zero padding on each side; default ``k // 2`` (PyTorch
      models in the zoo always pass it explicitly, so do we).
    groups: ``feature_group_count`` (``groups`` in PyTorch; depthwise when it
      equals the input channels).
    use_bias: add a bias.
    init_scheme: ``'he_fan_out'`` (kaiming_normal fan_out; bias 0) or
      ``'torch'`` (PyTorch's default uniform for weight and bias).
    dtype: compute dtype; parameters are :func:`param_dtype` of it.
  """
  features: int
  kernel_size: int
  strides: int = 1
  padding: int | None = None
  groups: int = 1
  use_bias: bool = False
  init_scheme: str = "he_fan_out"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    pad = k // 2 if self.padding is None else self.padding
    fan_in = (x.shape[-1] // self.groups) * k * k
    if self.init_scheme == "he_fan_out":
      kernel_init, bias_init = he_normal_fan_out, nn.initializers.zeros
    elif self.init_scheme == "torch":
      kernel_init, bias_init = torch_default_kernel, torch_default_bias(fan_in)
    else:
      raise ValueError(f"Conv.init_scheme must be 'he_fan_out' or 'torch', got "
                       f"{self.init_scheme!r}")
    kernel = self.param("kernel", kernel_init,
                        (k, k, x.shape[-1] // self.groups, self.features),
                        param_dtype(self.dtype))
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype),
        window_strides=(self.strides, self.strides),
        padding=((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=self.groups)
    if self.use_bias:
      bias = self.param("bias", bias_init, (self.features,),
                        param_dtype(self.dtype))
      y = y + bias.astype(self.dtype)
    return y


def TorchConv(*args, **kwargs) -> Conv:  # noqa: N802 - a Conv constructor
  """A :class:`Conv` with PyTorch's default init (weights and bias), the init
  of the ShuffleNet and ImageNet MobileNetV1 references."""
  return Conv(*args, init_scheme="torch", **kwargs)


class Linear(nn.Module):
  """Fully connected layer; ``init_scheme`` as for :class:`Conv`, plus
  ``'normal'``.

  ``'torch'``: PyTorch's default uniform (weight and bias);
  ``'torch_zero_bias'``: PyTorch's default weight, bias 0 (WRN);
  ``'normal'``: N(0, 0.01) weight, bias 0 (VGG, MobileNetV2).
  Parameters and the output are :func:`param_dtype` of the compute dtype
  (float32 under bfloat16): logits feed the losses.
  """
  features: int
  init_scheme: str = "torch"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = x.shape[-1]
    if self.init_scheme == "torch":
      kernel_init, bias_init = torch_default_kernel, torch_default_bias(fan_in)
    elif self.init_scheme == "torch_zero_bias":
      kernel_init, bias_init = torch_default_kernel, nn.initializers.zeros
    elif self.init_scheme == "normal":
      kernel_init, bias_init = normal(0.01), nn.initializers.zeros
    else:
      raise ValueError(f"Linear.init_scheme must be 'torch', "
                       f"'torch_zero_bias' or 'normal', got "
                       f"{self.init_scheme!r}")
    pdtype = param_dtype(self.dtype)
    kernel = self.param("kernel", kernel_init, (fan_in, self.features), pdtype)
    bias = self.param("bias", bias_init, (self.features,), pdtype)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    return y.astype(pdtype) + bias


class BatchNorm(nn.Module):
  """BatchNorm over all but the last axis, matching ``torch.nn.BatchNorm2d``.

  Train mode normalises with the biased batch variance and updates the running
  statistics as PyTorch does: ``running = 0.9 * running + 0.1 * batch`` with
  the *unbiased* variance ``var * n / (n - 1)``. Normalisation, parameters and
  statistics are in :func:`param_dtype` (float32 even under bfloat16 compute,
  float64 under float64). Eval mode uses the running statistics.

  ``mask`` (shape ``[B]``, bool/0-1) excludes padded examples from the batch
  statistics, so a padded final batch behaves exactly like the smaller real
  batch the reference trains on. Under ``jit`` with the batch sharded over
  devices, the reductions become all-reduces: the statistics are those of the
  global batch.
  """
  momentum: float = 0.9  # flax convention: PyTorch momentum 0.1.
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool,
               mask: jax.Array | None = None) -> jax.Array:
    c = x.shape[-1]
    sdtype = param_dtype(self.dtype)
    scale = self.param("scale", nn.initializers.ones, (c,), sdtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), sdtype)
    ra_mean = self.variable("batch_stats", "mean",
                            lambda: jnp.zeros((c,), sdtype))
    ra_var = self.variable("batch_stats", "var",
                           lambda: jnp.ones((c,), sdtype))
    xf = x.astype(sdtype)
    if train:
      axes = tuple(range(x.ndim - 1))
      per_example = math.prod(x.shape[1:-1])
      if mask is None:
        n = jnp.asarray(x.shape[0] * per_example, sdtype)
        mean = xf.mean(axes)
        var = jnp.square(xf - mean).mean(axes)
      else:
        w = mask.astype(sdtype).reshape((-1,) + (1,) * (x.ndim - 1))
        n = jnp.sum(w) * per_example
        safe_n = jnp.maximum(n, 1.0)
        mean = jnp.sum(xf * w, axes) / safe_n
        var = jnp.sum(jnp.square(xf - mean) * w, axes) / safe_n
      if not self.is_initializing():
        unbiased = var * n / jnp.maximum(n - 1.0, 1.0)
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1.0 - m) * mean
        ra_var.value = m * ra_var.value + (1.0 - m) * unbiased
    else:
      mean, var = ra_mean.value, ra_var.value
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    return ((xf - mean) * mul + bias).astype(self.dtype)


def conv_bn(conv: Conv, bn_name: str, x: jax.Array, train: bool, mask=None,
            relu: bool = True) -> jax.Array:
  """Apply ``conv``, then a BatchNorm named ``bn_name``, then ReLU if asked.

  Must be called inside a compact method: the BatchNorm becomes a direct
  submodule of the calling module, so parameter paths stay those of PyTorch
  (``conv_0`` / ``conv_1`` as siblings, no extra nesting level).
  """
  y = BatchNorm(dtype=conv.dtype, name=bn_name)(conv(x), train, mask)
  return nn.relu(y) if relu else y


def global_avg_pool(x: jax.Array) -> jax.Array:
  """Mean over the spatial axes of an NHWC tensor (``AdaptiveAvgPool2d(1)``)."""
  return jnp.mean(x, axis=(1, 2))


def classifier_head(x: jax.Array, num_classes: int, init_scheme: str,
                    dtype: Dtype, name: str, features: bool = False,
                    feats: Sequence[jax.Array] = (),
                    preact_feats: Sequence[jax.Array] = ()):
  """Global average pool + the classifier ``Linear`` named ``name``.

  Call inside a compact method (the Linear becomes the caller's submodule).

  Args:
    x: the final feature map, NHWC.
    num_classes: classifier width.
    init_scheme: the Linear's ``init_scheme``.
    dtype: compute dtype.
    name: the classifier's PyTorch attribute name.
    features: return :class:`Outputs` instead of the bare logits.
    feats: the network's ``Outputs.feats`` (ignored unless ``features``).
    preact_feats: its ``Outputs.preact_feats`` (ignored unless ``features``).

  Returns:
    Logits, or with ``features`` an :class:`Outputs` whose ``pooled_feat`` is
    the classifier's input in :func:`param_dtype` (as the logits).
  """
  pooled = global_avg_pool(x)
  logits = Linear(num_classes, init_scheme, dtype, name=name)(pooled)
  if not features:
    return logits
  return Outputs(logits, tuple(feats), tuple(preact_feats),
                 pooled.astype(param_dtype(dtype)))


def apply_stage(blocks: Sequence[nn.Module], x: jax.Array, train: bool,
                mask=None, preact: bool = False
                ) -> tuple[jax.Array, jax.Array | None]:
  """Apply ``blocks`` in order: a stage's output and, if asked, its preact.

  With ``preact``, the last block is called with ``return_preact=True`` and
  must return ``(out, preact)``, as mdistiller's ``is_last`` blocks do;
  otherwise every block is called exactly as without features (so a
  logits-only forward traces the same program) and the preact is ``None``.
  """
  for block in blocks[:-1]:
    x = block(x, train, mask)
  if preact:
    return blocks[-1](x, train, mask, return_preact=True)
  return blocks[-1](x, train, mask), None


def max_pool(x: jax.Array, window: int, stride: int, padding: int = 0
             ) -> jax.Array:
  """``nn.MaxPool2d(window, stride, padding)`` (padding never wins the max)."""
  return nn.max_pool(x, (window, window), (stride, stride),
                     ((padding, padding), (padding, padding)))


def avg_pool(x: jax.Array, window: int, stride: int, padding: int = 0
             ) -> jax.Array:
  """``nn.AvgPool2d(window, stride, padding)`` with ``count_include_pad=True``.

  Zero padding counts in the denominator (always ``window**2``), as PyTorch's
  default.
  """
  return nn.avg_pool(x, (window, window), (stride, stride),
                     ((padding, padding), (padding, padding)),
                     count_include_pad=True)


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
  """ShuffleNet channel shuffle: ``[N,H,W,g*c] -> [N,H,W,c*g]`` (transpose)."""
  n, h, w, c = x.shape
  x = x.reshape(n, h, w, groups, c // groups)
  return jnp.swapaxes(x, 3, 4).reshape(n, h, w, c)


def count_params(tree: Any) -> int:
  """Number of scalars in a pytree of arrays (or ``ShapeDtypeStruct``s)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))

