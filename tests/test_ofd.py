"""OFD (Heo et al. 2019) against mdistiller's own code: margins, partial L2
loss, connectors, gradients, masking, and the teacher BatchNorms the margins
come from in every zoo family."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slkd_jax import errors, feature_losses as fl
from slkd_jax import methods, models
from slkd_jax.methods import ofd
from slkd_jax.convert_torch import torch_module_path
from slkd_jax.models.bn_before_relu import (bn_before_relu,
                                            bn_before_relu_paths)
from golden_checks import assert_close, check_tensor, nchw, nhwc

B = 3
SHAPES = [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8)]
POOLED = 256


# ---- input generators (verbatim from
# tests/goldens/gen_ofd_reviewkd_goldens.py)
def make_outputs(rng, batch=B):
  """feats (>= 0), preact_feats (signed) and pooled_feat of one network."""
  preact = [rng.standard_normal((batch,) + s) for s in SHAPES]
  feats = [np.abs(rng.standard_normal((batch,) + s)) for s in SHAPES]
  pooled = np.abs(rng.standard_normal((batch, POOLED)))
  return dict(feats=feats, preact_feats=preact, pooled_feat=pooled)


def make_ofd_case(seed=0, batch=B):
  """Student/teacher outputs, connector params (OIHW) and the teacher's BN
  (weight, bias) before each stage's last ReLU."""
  rng = np.random.default_rng(seed)
  student, teacher = make_outputs(rng, batch), make_outputs(rng, batch)
  chans = [s[0] for s in SHAPES[1:]]
  conv = [rng.uniform(-1, 1, (c, c, 1, 1)) / np.sqrt(c) for c in chans]
  bn = [(rng.uniform(0.5, 1.5, c), rng.uniform(-0.2, 0.2, c)) for c in chans]
  t_bn = [(rng.uniform(-1.5, 1.5, c), rng.uniform(-1.0, 3.0, c))
          for c in chans]
  return student, teacher, conv, bn, t_bn
# ---------------------------------------------------------------------------


def _connector_params(conv, bn):
  return {f"connectors_{i}_0": {"kernel": jnp.asarray(
              np.transpose(w, (2, 3, 1, 0)))}
          for i, w in enumerate(conv)} | {
          f"connectors_{i}_1": {"scale": jnp.asarray(g),
                                "bias": jnp.asarray(b)}
          for i, (g, b) in enumerate(bn)}


def _ofd_weighted_loss(params, s_feats, t_feats, margins, stats, mask=None):
  """FEAT_WEIGHT · ofd_loss of the connector's output (train-mode BN)."""
  connector = ofd.OFDConnector(tuple(f.shape[-1] for f in t_feats),
                               jnp.float64)
  out, updates = connector.apply({"params": params, "batch_stats": stats},
                                 s_feats, train=True, mask=mask,
                                 mutable=["batch_stats"])
  loss = fl.ofd_loss(out, t_feats, margins, mask)
  return ofd.DEFAULTS["feat_weight"] * loss, updates


def _case(batch=B):
  student, teacher, conv, bn, t_bn = make_ofd_case(batch=batch)
  s_feats = [nhwc(x) for x in student["preact_feats"][1:]]
  t_feats = [nhwc(x) for x in teacher["preact_feats"][1:]]
  margins = [fl.ofd_margin(jnp.asarray(g), jnp.asarray(b)) for g, b in t_bn]
  stats = {f"connectors_{i}_1": {"mean": jnp.zeros(c), "var": jnp.ones(c)}
           for i, c in enumerate(f.shape[-1] for f in t_feats)}
  return s_feats, t_feats, margins, _connector_params(conv, bn), stats


def test_ofd_loss_and_gradients_match_mdistiller():
  with jax.enable_x64(True):
    s_feats, t_feats, margins, params, stats = _case()
    for m, ref in zip(margins, GOLDEN["ofd"]["margins"]):
      check_tensor(m, ref)
    (loss, updates), (g_params, g_feats) = jax.value_and_grad(
        _ofd_weighted_loss, argnums=(0, 1), has_aux=True)(
            params, s_feats, t_feats, margins, stats)
  golden = GOLDEN["ofd"]
  assert_close(loss, golden["loss"])
  for g, ref in zip(g_feats, golden["grads"]):
    check_tensor(nchw(g), ref)
  pg = golden["param_grads"]
  for i in range(3):
    kernel = g_params[f"connectors_{i}_0"]["kernel"]
    check_tensor(np.transpose(kernel, (3, 2, 0, 1)), pg[f"{i}.0.weight"])
    check_tensor(g_params[f"connectors_{i}_1"]["scale"], pg[f"{i}.1.weight"])
    check_tensor(g_params[f"connectors_{i}_1"]["bias"], pg[f"{i}.1.bias"])
    var = np.asarray(updates["batch_stats"][f"connectors_{i}_1"]["var"])
    assert_close(var.sum(), golden["running_var_sums"][i])


def test_padded_examples_do_not_change_the_loss_or_gradients():
  with jax.enable_x64(True):
    s_feats, t_feats, margins, params, stats = _case(batch=B + 1)
    mask = jnp.asarray([1, 1, 1, 0], bool)
    (loss, _), g_feats = jax.value_and_grad(
        lambda f: _ofd_weighted_loss(params, f, t_feats, margins, stats,
                                     mask), has_aux=True)(s_feats)
    small = [f[:B] for f in s_feats]
    (ref, _), g_ref = jax.value_and_grad(
        lambda f: _ofd_weighted_loss(params, f, [t[:B] for t in t_feats],
                                     margins, stats), has_aux=True)(small)
  np.testing.assert_allclose(loss, ref, rtol=1e-12)
  for g, r in zip(g_feats, g_ref):
    np.testing.assert_allclose(g[:B], r, rtol=1e-9, atol=1e-15)
    assert not np.any(g[B:])


def test_margin_hand_checked_values():
  phi0 = 1.0 / math.sqrt(2.0 * math.pi)  # φ(0); Φ(0) = 1/2
  scale = jnp.asarray([1.0, -2.0, 1.0, 1.0, 0.5])
  bias = jnp.asarray([0.0, 0.0, -5.0, 4.0, 3.0])
  expected = np.float32([
      -2.0 * phi0,  # E[x | x < 0] of N(0, 1)
      -4.0 * phi0,  # |γ| is the std
      -5.0 - math.exp(-12.5) * phi0 / 0.9999997133484281,  # Φ(5)
      -3.0,  # Φ(−4) = 3.2e-5 <= 0.001: −3|γ|
      -1.5,  # Φ(−6) ~ 1e-9: −3|γ|
  ])
  with jax.enable_x64(True):  # float64 maths rounded to float32, as mdistiller
    exact = fl.ofd_margin(scale.astype(jnp.float64), bias.astype(jnp.float64))
  assert exact.dtype == jnp.float64
  np.testing.assert_array_equal(exact, expected)
  got = fl.ofd_margin(scale, bias)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_partial_l2_regions():
  # margin −1: s > m ≥ t → (s − m)²; s > t > m, t ≤ 0 → (s − t)²; t > 0 →
  # (s − t)² whatever s; otherwise 0 (s below the teacher's negative value).
  s = jnp.asarray([0.5, 0.5, -0.8, -0.4, -2.0, 1.0]).reshape(1, 1, 6, 1)
  t = jnp.asarray([-2.0, -0.5, -0.5, -0.5, -3.0, 2.0]).reshape(1, 1, 6, 1)
  got = fl.ofd_partial_l2(s, t, jnp.asarray([-1.0]))
  want = 1.5**2 + 1.0**2 + 0.0 + 0.1**2 + 0.0 + 1.0**2
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_connector_init_is_mdistillers():
  connector = ofd.OFDConnector((256,))
  x = jnp.zeros((1, 8, 8, 128))
  params = connector.init(jax.random.key(0), [x], train=False)["params"]
  kernel = np.asarray(params["connectors_0_0"]["kernel"])
  assert kernel.shape == (1, 1, 128, 256)
  # normal(0, sqrt(2 / n)), n = k·k·out_channels = 256
  np.testing.assert_allclose(kernel.std(), math.sqrt(2.0 / 256), rtol=0.03)
  assert abs(kernel.mean()) < 0.003
  np.testing.assert_array_equal(params["connectors_0_1"]["scale"], 1.0)
  np.testing.assert_array_equal(params["connectors_0_1"]["bias"], 0.0)


# mdistiller's get_bn_before_relu, as PyTorch module paths (models/*.py).
BN_BEFORE_RELU = {
    "resnet32x4": ["layer1.4.bn2", "layer2.4.bn2", "layer3.4.bn2"],
    "resnet8": ["layer1.0.bn2", "layer2.0.bn2", "layer3.0.bn2"],
    "wrn_40_2": ["block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"],
    "vgg13": ["block1.4", "block2.4", "block3.4", "block4.4"],
    "vgg8": ["block1.1", "block2.1", "block3.1", "block4.1"],
    "MobileNetV2": ["blocks.1.1.conv.7", "blocks.2.2.conv.7",
                    "blocks.4.2.conv.7", "blocks.6.0.conv.7"],
    "ResNet50": ["layer1.2.bn3", "layer2.3.bn3", "layer3.5.bn3",
                 "layer4.2.bn3"],
    "imagenet_resnet34": ["layer2.3.bn2", "layer3.5.bn2", "layer4.2.bn2"],
    "imagenet_resnet50": ["layer2.3.bn3", "layer3.5.bn3", "layer4.2.bn3"],
    "imagenet_mobilenetv1": ["model.3.4", "model.5.4", "model.11.4",
                             "model.13.4"],
}


@pytest.mark.parametrize("arch", sorted(BN_BEFORE_RELU))
def test_bn_before_relu_is_mdistillers(arch):
  model = models.create(arch)
  size = models.info(arch).image_size
  abstract = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, size, size, 3)))["params"]
  paths = bn_before_relu_paths(model)
  assert [torch_module_path(p) for p in paths] == BN_BEFORE_RELU[arch]
  pairs = bn_before_relu(model, abstract)
  # Each BN's width is that of the stage it precedes the ReLU of: the
  # deepest len(pairs) of preact_feats (ImageNet ResNets skip layer1).
  preacts = models.output_shapes(model, (size, size)).preact_feats
  stage_channels = [f.shape[-1] for f in preacts[len(preacts) - len(pairs):]]
  assert [s.shape[0] for s, _ in pairs] == stage_channels
  assert all(b.shape == s.shape for s, b in pairs)


def test_bn_before_relu_reads_the_values():
  model = models.create("resnet8")
  params = model.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))["params"]
  params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(2),
                                                        p.shape), params)
  (scale, bias), *_ = bn_before_relu(model, params)
  np.testing.assert_array_equal(scale, params["layer1_0"]["bn2"]["scale"])
  np.testing.assert_array_equal(bias, params["layer1_0"]["bn2"]["bias"])


@pytest.mark.parametrize("arch", ["ShuffleV1", "ShuffleV2"])
def test_shufflenet_teacher_is_refused(arch):
  with pytest.raises(errors.ConfigError, match="ShuffleNet"):
    bn_before_relu_paths(models.create(arch))


def test_make_modules_builds_the_aligned_connectors():
  student, teacher = models.create("resnet8x4"), models.create("resnet32x4")
  mods = methods.get("ofd").make_modules(student, teacher, None,
                                        jnp.float32, 32)
  assert mods["connector"].t_channels == (64, 128, 256)
  # vgg8 (4 stages after the stem) → resnet8 teacher (3): the deepest 3.
  mods = methods.get("ofd").make_modules(models.create("vgg8"),
                                        models.create("resnet14"), None,
                                        jnp.float32, 32)
  assert mods["connector"].t_channels == (16, 32, 64)
  assert methods.get("ofd").teacher_train_mode


def test_too_few_teacher_margins_is_a_config_error():
  # mdistiller's ImageNet ResNet lists 3 BNs for 4 stages: r34 → r18 fails
  # there (IndexError), a ConfigError here.
  with pytest.raises(errors.ConfigError, match="3 BatchNorms"):
    methods.get("ofd").make_modules(models.create("imagenet_resnet18"),
                                   models.create("imagenet_resnet34"), None,
                                   jnp.float32, 64)


# Produced by tests/goldens/gen_ofd_reviewkd_goldens.py (mdistiller a08d46f,
# OFD.forward_train, torch float64): loss_kd (FEAT_WEIGHT 1e-3 included),
# gradient summaries (PyTorch layouts), margins, running variances.
GOLDEN = {
  'ofd': {
    'grads': [
      {'norm': 0.07323198538468498, 'sum': 0.0,
       'entries': [((0, 0, 0, 0), 0.00014308801475553198),
                   ((1, 32, 16, 16), 0.00026731860097758275),
                   ((2, 63, 31, 31), -0.00011563091065865099)]},
      {'norm': 0.10854582821997681, 'sum': 1.734723475976807e-16,
       'entries': [((0, 0, 0, 0), 0.0006739353605077018),
                   ((1, 64, 8, 8), -0.0005627255960166042),
                   ((2, 127, 15, 15), -5.1240793893757846e-05)]},
      {'norm': 0.14159552726733574, 'sum': 8.326672684688674e-17,
       'entries': [((0, 0, 0, 0), -0.0009354137163239193),
                   ((1, 128, 4, 4), -3.474853261111199e-05),
                   ((2, 255, 7, 7), 0.0004439099102409638)]},
    ],
    'loss': 79.23563817347745,
    'margins': [
      {'norm': 6.70084342974831, 'sum': -45.592752888798714,
       'entries': [((0,), -0.35924580693244934),
                   ((32,), -0.5353921055793762),
                   ((63,), -0.43063613772392273)]},
      {'norm': 9.597644149141841, 'sum': -94.0803490569815,
       'entries': [((0,), -0.4166833162307739),
                   ((64,), -0.17928411066532135),
                   ((127,), -0.5450395345687866)]},
      {'norm': 13.841648981298462, 'sum': -183.31147233769298,
       'entries': [((0,), -0.900484561920166),
                   ((128,), -0.13353951275348663),
                   ((255,), -1.3349400758743286)]},
    ],
    'param_grads': {
      '0.0.weight':
        {'norm': 1.0117390271772524, 'sum': -1.4142415901350185,
         'entries': [((0, 0, 0, 0), -0.020091721243680482),
                     ((32, 32, 0, 0), -0.0020241397583071682),
                     ((63, 63, 0, 0), -0.010797660322538948)]},
      '0.1.bias':
        {'norm': 0.6039059608091641, 'sum': -1.490436676480148,
         'entries': [((0,), -0.07187880973024906),
                     ((32,), -0.02936354121973653),
                     ((63,), -0.08555604631453279)]},
      '0.1.weight':
        {'norm': 3.5403641303843725, 'sum': 27.32968038823671,
         'entries': [((0,), 0.5711269655135908),
                     ((32,), 0.510000826693605),
                     ((63,), 0.31463916270277387)]},
      '1.0.weight':
        {'norm': 2.1405442899206455, 'sum': 2.7117175300941754,
         'entries': [((0, 0, 0, 0), -0.005513847898655752),
                     ((64, 64, 0, 0), -0.010846674440344843),
                     ((127, 127, 0, 0), -0.02078070866793117)]},
      '1.1.bias':
        {'norm': 0.390011047795627, 'sum': -1.4090512963804906,
         'entries': [((0,), 0.001896210315951251),
                     ((64,), -0.03697975311981777),
                     ((127,), -0.04022961184542398)]},
      '1.1.weight':
        {'norm': 2.558101002907111, 'sum': 28.005771206069383,
         'entries': [((0,), 0.3037246807791044),
                     ((64,), 0.1638708243874744),
                     ((127,), 0.24270866319594425)]},
      '2.0.weight':
        {'norm': 3.965112160385593, 'sum': 2.9596605965972325,
         'entries': [((0, 0, 0, 0), 0.001765052175432362),
                     ((128, 128, 0, 0), -0.03179433789871296),
                     ((255, 255, 0, 0), -0.042084055447823523)]},
      '2.1.bias':
        {'norm': 0.3065637969853025, 'sum': -1.336356850157506,
         'entries': [((0,), 0.004665483165491568),
                     ((128,), -0.03048850415561291),
                     ((255,), -0.023850708349064553)]},
      '2.1.weight':
        {'norm': 1.740841720709557, 'sum': 26.89372719088329,
         'entries': [((0,), 0.07112869952780436),
                     ((128,), 0.11789838307485036),
                     ((255,), 0.1243172167806337)]},
    },
    'running_var_sums': [
      59.757190934454286,
      119.5142226740399,
      239.05782003589178,
    ],
  },
}
