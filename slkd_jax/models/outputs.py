"""The structured output of a zoo network called with ``features=True``.

Feature-based KD methods need more than logits: mdistiller's networks return
``(logits, feats)`` with ``feats = {"feats": [...], "preact_feats": [...],
"pooled_feat": ...}``. :class:`Outputs` carries the same three entries, NHWC
instead of NCHW, as a pytree, so it crosses ``jit``/``shard_map`` boundaries
and ``jax.tree`` utilities unchanged.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Outputs:
  """What a network returns when asked for its features.

  Attributes:
    logits: ``[B, num_classes]``, in ``layers.param_dtype`` of the compute
      dtype (float32 under bfloat16), identical to the ``features=False``
      logits.
    feats: mdistiller's ``feats["feats"]``: the feature maps the feature
      distillers use (for most families the stem output and each stage
      output, post-ReLU), NHWC, in the compute dtype.
    preact_feats: mdistiller's ``feats["preact_feats"]``: the same maps taken
      before the last ReLU of each stage, as each reference family defines it
      (same shapes and dtype as ``feats``).
    pooled_feat: ``[B, C]``, the pooled embedding the classifier reads, in
      the logits' dtype.
  """
  logits: jax.Array
  feats: tuple[jax.Array, ...] | None = None
  preact_feats: tuple[jax.Array, ...] | None = None
  pooled_feat: jax.Array | None = None


def output_shapes(model: Any, input_size: tuple[int, int] = (32, 32)
                  ) -> Outputs:
  """``model``'s :class:`Outputs` for one image as ``jax.ShapeDtypeStruct``
  leaves, without running or compiling it (``jax.eval_shape``)."""
  x = jnp.zeros((1, *input_size, 3), jnp.float32)

  def run():
    return model.init_with_output(jax.random.key(0), x, features=True)

  outputs, _ = jax.eval_shape(run)
  return outputs


def feature_shapes(model: Any, input_size: tuple[int, int] = (32, 32)
                   ) -> list[tuple[int, ...]]:
  """NHWC shapes of ``model``'s ``feats`` for one image (mdistiller's
  ``get_feat_shapes``), without running it (``jax.eval_shape``)."""
  return [tuple(f.shape) for f in output_shapes(model, input_size).feats]
