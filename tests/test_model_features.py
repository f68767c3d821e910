"""``features=True``: mdistiller's feature lists for every zoo network, and a
logits-only forward that stays the program it was before features existed.

Values against mdistiller-style PyTorch twins are checked in
test_convert_torch.py (``test_features_match_pytorch_twin``); this file needs
no torch.
"""

import jax
import jax.numpy as jnp
import pytest

from slkd_jax import models

# Feature maps (H = W, C) of mdistiller's ``feats["feats"]`` at the reference
# input size (CIFAR 32, ImageNet 224), and the ``pooled_feat`` width. Read off
# each family's ``forward`` (mdistiller/models/...): ``preact_feats`` has the
# same shapes everywhere.
_RESNET = (((32, 16), (32, 16), (16, 32), (8, 64)), 64)  # cifar/resnet.py
_RESNET_X4 = (((32, 32), (32, 64), (16, 128), (8, 256)), 256)
_VGG = (((32, 64), (16, 128), (8, 256), (4, 512), (4, 512)), 512)  # vgg.py
_IMAGENET_RESNET = (((112, 64), (56, 64), (28, 128), (14, 256), (7, 512)),
                    512)  # imagenet/resnet.py: the stem before the max-pool


_KUANGLIU = (((32, 64), (32, 64), (16, 128), (8, 256), (4, 512)), 512)


def _wrn(k):  # cifar/wrn.py: conv1, block1..3 (before the final BN).
  return ((32, 16), (32, 16 * k), (16, 32 * k), (8, 64 * k)), 64 * k


EXPECTED = {
    **{f"resnet{d}": _RESNET for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": _RESNET_X4,
    "resnet32x4": _RESNET_X4,
    **{f"wrn_{d}_{k}": _wrn(k) for d, k in ((16, 1), (16, 2), (40, 1),
                                             (40, 2))},
    **{f"vgg{d}": _VGG for d in (8, 11, 13, 16, 19)},
    # cifar/mobilenetv2.py: f0 and block groups 1, 2, 4, 6; no 1280 head.
    "MobileNetV2": (((16, 16), (16, 12), (8, 16), (4, 48), (2, 160)), 1280),
    "ShuffleV1": (((32, 24), (16, 240), (8, 480), (4, 960)), 960),
    # cifar/ShuffleNetv2.py: no 1024 head map among the feats.
    "ShuffleV2": (((32, 24), (16, 116), (8, 232), (4, 464)), 1024),
    "ResNet50": (((32, 64), (32, 256), (16, 512), (8, 1024), (4, 2048)),
                 2048),  # cifar/resnetv2.py
    "imagenet_resnet18": _IMAGENET_RESNET,
    "imagenet_resnet34": _IMAGENET_RESNET,
    "imagenet_resnet50": (((112, 64), (56, 256), (28, 512), (14, 1024),
                           (7, 2048)), 2048),
    # imagenet/mobilenetv1.py: layers 3, 5, 11, 13; no stem entry.
    "imagenet_mobilenetv1": (((56, 128), (28, 256), (14, 512), (7, 1024)),
                             1024),
    # TESKD's kuangliu ResNets: stem, s1..s4 (the TESKD form adds branches).
    **{f"{p}cifar_resnet{d}": _KUANGLIU for p in ("", "teskd_")
       for d in (18, 34)},
}
BATCH, NUM_CLASSES = 2, 10


def test_every_network_has_expected_features():
  assert sorted(EXPECTED) == models.available()


def _abstract(name, dtype=jnp.float32, size=None):
  """The model, abstract variables and an input at ``size`` (default: the
  reference size)."""
  model = models.create(name, NUM_CLASSES, dtype)
  size = size or models.info(name).image_size
  x = jax.ShapeDtypeStruct((BATCH, size, size, 3), jnp.float32)
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), x)
  return model, variables, x


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_feature_shapes_and_dtypes_match_mdistiller(name):
  # bfloat16 compute: feature maps in the compute dtype, the pooled embedding
  # and logits in float32 (layers.param_dtype), as the classifier head.
  model, variables, x = _abstract(name, jnp.bfloat16)
  plain = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False), variables, x)
  out = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False, features=True),
      variables, x)
  assert isinstance(plain, jax.ShapeDtypeStruct)  # bare logits, as before
  assert isinstance(out, models.Outputs)
  maps, pooled = EXPECTED[name]
  expected = [(BATCH, h, h, c) for h, c in maps]
  assert [f.shape for f in out.feats] == expected
  assert [f.shape for f in out.preact_feats] == expected
  assert all(f.dtype == jnp.bfloat16 for f in out.feats + out.preact_feats)
  assert out.pooled_feat.shape == (BATCH, pooled)
  assert out.pooled_feat.dtype == jnp.float32
  assert out.logits.shape == plain.shape == (BATCH, NUM_CLASSES)
  assert out.logits.dtype == plain.dtype == jnp.float32


def _dce():
  # JAX has no public dead-code elimination of a jaxpr; this one has been in
  # place for years (jit, remat and scan rely on it).
  try:
    from jax._src.interpreters.partial_eval import dce_jaxpr
  except ImportError:  # pragma: no cover - a JAX refactoring
    pytest.skip("jax._src.interpreters.partial_eval.dce_jaxpr moved")
  return dce_jaxpr


def _program(fn, args, keep):
  """The jaxpr of ``fn(*args)``, as traced and after dead-code elimination
  of the outputs that ``keep`` (output -> pytree of bools) does not mark."""
  closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
  used = jax.tree.leaves(keep(shape))
  return str(closed.jaxpr), str(_dce()(closed.jaxpr, used,
                                       instantiate=True)[0])


def _all(tree):
  return jax.tree.map(lambda _: True, tree)


def _logits_only(out):
  return jax.tree.map(lambda _: False, out).replace(logits=True)


# TESKD models compute (and train) their branches only with features=True.
@pytest.mark.parametrize("name", [n for n in sorted(EXPECTED)
                                  if not n.startswith("teskd_")])
def test_logits_only_program_is_the_features_program_minus_dead_code(name):
  """``features=False`` traces exactly the ops the logits (and, in train
  mode, the BatchNorm statistics) need: those of ``features=True`` after
  dead-code elimination of the feature outputs, with no dead code of its own.
  So the feature plumbing costs a logits-only method nothing, and the
  logits of both modes are computed by the same program."""
  model, variables, x = _abstract(
      name, size=64 if name.startswith("imagenet_") else None)
  mask = jax.ShapeDtypeStruct((BATCH,), jnp.bool_)

  def train(features):
    return lambda v, x, m: model.apply(v, x, train=True, mask=m,
                                       features=features,
                                       mutable=["batch_stats"])

  def evaluate(features):
    return lambda v, x, m: model.apply(v, x, train=False, features=features)

  for mode, keep in ((train, lambda o: (_logits_only(o[0]), _all(o[1]))),
                     (evaluate, _logits_only)):
    args = (variables, x, mask)
    plain, plain_dce = _program(mode(False), args, _all)
    assert plain.count("conv_general_dilated") > 4  # a real network
    assert plain == plain_dce, f"{name} {mode.__name__}: dead code"
    _, featured = _program(mode(True), args, keep)
    assert featured == plain, f"{name} {mode.__name__}"
