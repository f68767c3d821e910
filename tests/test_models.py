"""Model zoo: registry, exact parameter counts, forward passes, features."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slkd_jax import models

# (params, BN running mean+var) of the reference PyTorch zoo, 100 classes for
# CIFAR models and 1000 for ImageNet ones (docs/method.md §7).
REFERENCE_COUNTS = {
    "resnet8": (83_892, 672),
    "resnet14": (181_108, 1_120),
    "resnet20": (278_324, 1_568),
    "resnet32": (472_756, 2_464),
    "resnet44": (667_188, 3_360),
    "resnet56": (861_620, 4_256),
    "resnet110": (1_736_564, 8_288),
    "resnet8x4": (1_233_540, 2_752),
    "resnet32x4": (7_433_860, 9_920),
    "wrn_16_1": (180_916, 928),
    "wrn_16_2": (703_284, 1_824),
    "wrn_40_1": (569_780, 2_720),
    "wrn_40_2": (2_255_156, 5_408),
    "vgg8": (3_965_028, 2_944),
    "vgg11": (9_277_284, 5_504),
    "vgg13": (9_462_180, 5_888),
    "vgg16": (14_774_436, 8_448),
    "vgg19": (20_086_692, 11_008),
    "MobileNetV2": (812_836, 18_368),
    "ShuffleV1": (949_258, 23_736),
    "ShuffleV2": (1_355_528, 16_180),
    "ResNet50": (23_705_252, 53_120),
    "imagenet_resnet18": (11_689_512, 9_600),
    "imagenet_resnet34": (21_797_672, 17_024),
    "imagenet_resnet50": (25_557_032, 53_120),
    "imagenet_mobilenetv1": (4_231_976, 21_888),
    # TESKD's models/resnet_our.py (official counts; tests/test_teskd.py).
    "cifar_resnet18": (11_220_132, 9_600),
    "cifar_resnet34": (21_328_292, 17_024),
    "teskd_cifar_resnet18": (37_050_832, 25_984),
    "teskd_cifar_resnet34": (47_158_992, 33_408),
}


def _abstract_variables(name):
  model = models.create(name)
  size = models.info(name).image_size
  return model, jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((2, size, size, 3)),
                         train=False))


def test_registry_lists_every_reference_model():
  assert sorted(REFERENCE_COUNTS) == models.available()


def test_unknown_model_error_lists_choices():
  with pytest.raises(ValueError, match="unknown model 'resnet9'.*resnet8"):
    models.create("resnet9")


@pytest.mark.parametrize("name", sorted(REFERENCE_COUNTS))
def test_parameter_counts_match_reference(name):
  _, variables = _abstract_variables(name)
  assert set(variables) == {"params", "batch_stats"}
  params, stats = REFERENCE_COUNTS[name]
  assert models.count_params(variables["params"]) == params
  assert models.count_params(variables["batch_stats"]) == stats


def _host_variables(model, x):
  """Variables of the shapes ``model.init`` gives, made on the host: normal
  kernels scaled by fan-in (He), zero biases and means, unit scales and
  variances. The forward tests need plausible values, not the initialisers,
  whose random programs would be most of each network's compile time."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x,
                                             train=False))
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)
              ).astype(leaf.dtype)
    assert name in ("bias", "scale", "mean", "var"), path
    return np.full(leaf.shape, name in ("scale", "var"), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _forward_size(name):
  # ImageNet models pool globally, so a 64-pixel input exercises every layer
  # at a fraction of the cost of 224.
  return 64 if name.startswith("imagenet_") else 32


# TESKD models' heads run only with features=True (tests/test_teskd.py), so
# a logits-only train step leaves their statistics alone.
@pytest.mark.parametrize("name", [n for n in sorted(REFERENCE_COUNTS)
                                  if not n.startswith("teskd_")])
def test_forward_train_and_eval(name):
  model = models.create(name, num_classes=10)
  size = _forward_size(name)
  x = jax.random.normal(jax.random.key(1), (2, size, size, 3))
  variables = _host_variables(model, x)

  def run(variables, x):
    train_logits, updates = model.apply(variables, x, train=True,
                                        mutable=["batch_stats"])
    eval_logits = model.apply(variables, x, train=False)
    return train_logits, eval_logits, updates

  # Both modes trace (as in the jitted train and eval steps) ...
  traced = jax.eval_shape(run, variables, x)
  # ... and run op by op: the op programs are shared by the 28 networks,
  # where a jit of each network's forward would compile 28 programs.
  train_logits, eval_logits, updates = run(variables, x)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), traced) == jax.tree.map(
      lambda a: (a.shape, a.dtype), (train_logits, eval_logits, updates))
  for logits in (train_logits, eval_logits):
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
  # Train mode moves the running statistics; eval mode leaves them alone.
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                       variables["batch_stats"], updates["batch_stats"])
  assert all(jax.tree.leaves(moved))


def _classifier(params):
  """The classifier Linear's (kernel, bias): the only 2-D kernel."""
  (head,) = [p for p in params.values()
             if "kernel" in p and p["kernel"].ndim == 2]
  return head["kernel"], head["bias"]


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "MobileNetV2",
                                  "ShuffleV1", "ShuffleV2", "imagenet_resnet18",
                                  "imagenet_mobilenetv1"])
def test_features_returns_outputs_with_the_same_logits(name):
  model = models.create(name, num_classes=10)
  size = _forward_size(name)
  x = jax.random.normal(jax.random.key(1), (4, size, size, 3))
  mask = jnp.array([True, True, True, False])
  variables = _host_variables(model, x)

  def run(features):
    # Op by op, as test_forward_train_and_eval: the claim is that the same
    # ops run on the same values. A jitted forward per mode would leave XLA
    # free to fuse (and so round) differently where a feature map is also
    # an output.
    train = model.apply(variables, x, train=True, mask=mask,
                        features=features, mutable=["batch_stats"])
    return model.apply(variables, x, train=False, features=features), train

  logits, (train_logits, updates) = run(False)
  out, (train_out, train_updates) = run(True)
  assert isinstance(logits, jax.Array) and isinstance(train_logits, jax.Array)
  assert isinstance(out, models.Outputs)
  assert isinstance(train_out, models.Outputs)
  # Asking for features changes nothing the logits-only forward computes.
  np.testing.assert_array_equal(out.logits, logits)
  np.testing.assert_array_equal(train_out.logits, train_logits)
  jax.tree.map(np.testing.assert_array_equal, train_updates, updates)
  assert len(out.feats) == len(out.preact_feats) >= 4
  for fmap, preact in zip(out.feats, out.preact_feats):
    assert fmap.ndim == 4 and fmap.shape == preact.shape
  # The pooled embedding is the classifier's input.
  kernel, bias = _classifier(variables["params"])
  np.testing.assert_allclose(out.pooled_feat @ kernel + bias, logits,
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet8", "ShuffleV2"])
def test_bfloat16_compute_keeps_float32_params_and_logits(name):
  model32 = models.create(name, num_classes=10)
  model16 = models.create(name, num_classes=10, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  variables = model16.init(jax.random.key(0), x, train=False)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  logits16, updates = model16.apply(variables, x, train=True,
                                    mutable=["batch_stats"])
  assert logits16.dtype == jnp.float32
  assert all(leaf.dtype == jnp.float32
             for leaf in jax.tree.leaves(updates["batch_stats"]))
  logits32 = model32.apply(variables, x, train=False)
  logits16 = model16.apply(variables, x, train=False)
  np.testing.assert_allclose(logits16, logits32, atol=0.15, rtol=0.1)


def test_core_imports_without_tensorflow_or_ml_collections():
  """The GPU image has neither: models, losses and the step must not need
  them (a None entry in sys.modules makes any import of them fail)."""
  code = ("import sys\n"
          "for name in ('tensorflow', 'tensorflow_datasets', 'ml_collections'):"
          "\n  sys.modules[name] = None\n"
          "import slkd_jax, slkd_jax.models, slkd_jax.losses, slkd_jax.state\n"
          "import slkd_jax.train_step, slkd_jax.checkpoint, slkd_jax.metrics\n"
          "import slkd_jax.data\n")
  subprocess.run([sys.executable, "-c", code], check=True)
