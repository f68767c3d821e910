"""ReviewKD (Chen et al. 2021) against mdistiller's own code: ABFs, HCL,
the warm-up, nearest resizing, gradients, masking, and the per-pair shape
lists mdistiller's yaml files hard-code."""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slkd_jax import config as config_lib
from slkd_jax import feature_losses as fl, methods, models
from slkd_jax.methods import reviewkd
from slkd_jax.convert_torch import torch_module_path
from golden_checks import assert_close, check_tensor, nchw, nhwc

B = 3
SHAPES = [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8)]
POOLED = 256


def pair_recipe(teacher, student):
  """ReviewKD's recipe for a pair, as the presets build it."""
  return config_lib.method_recipe(
      "reviewkd", temperature=4.0, ce_weight=0.1, kd_weight=0.9,
      dkd_beta=8.0, dkd_warmup=20.0, pair=(teacher, student))


# ---- input generators (verbatim from
# tests/goldens/gen_ofd_reviewkd_goldens.py)
def make_outputs(rng, batch=B):
  """feats (>= 0), preact_feats (signed) and pooled_feat of one network."""
  preact = [rng.standard_normal((batch,) + s) for s in SHAPES]
  feats = [np.abs(rng.standard_normal((batch,) + s)) for s in SHAPES]
  pooled = np.abs(rng.standard_normal((batch, POOLED)))
  return dict(feats=feats, preact_feats=preact, pooled_feat=pooled)


def make_abf_params(rng, in_c, mid, out_c, fuse):
  p = dict(conv1=rng.uniform(-1, 1, (mid, in_c, 1, 1)) / np.sqrt(in_c),
           bn1=(rng.uniform(0.5, 1.5, mid), rng.uniform(-0.2, 0.2, mid)),
           conv2=rng.uniform(-1, 1, (out_c, mid, 3, 3)) / np.sqrt(9 * mid),
           bn2=(rng.uniform(0.5, 1.5, out_c), rng.uniform(-0.2, 0.2, out_c)))
  if fuse:
    p["att_w"] = rng.uniform(-1, 1, (2, 2 * mid, 1, 1)) / np.sqrt(2 * mid)
    p["att_b"] = rng.uniform(-0.1, 0.1, 2)
  return p


def make_reviewkd_case(seed=1, batch=B):
  """Student/teacher outputs and ABF params in mdistiller's build order
  (IN_CHANNELS order, shallow -> deep; the last one does not fuse)."""
  rng = np.random.default_rng(seed)
  student, teacher = make_outputs(rng, batch), make_outputs(rng, batch)
  in_c, out_c = [64, 128, 256, 256], [64, 128, 256, 256]
  abfs = [make_abf_params(rng, i, 256, o, k < 3)
          for k, (i, o) in enumerate(zip(in_c, out_c))]
  return student, teacher, abfs
# ---------------------------------------------------------------------------


def _hwio(w):
  return jnp.asarray(np.transpose(w, (2, 3, 1, 0)))


def _outputs(o):
  return models.Outputs(
      logits=None, feats=tuple(nhwc(x) for x in o["feats"]),
      preact_feats=tuple(nhwc(x) for x in o["preact_feats"]),
      pooled_feat=jnp.asarray(o["pooled_feat"]))


def _abf_variables(abfs):
  """Our ``abfs_<j>`` variables: abfs[j] is mdistiller's index n-1-j."""
  params, stats = {}, {}
  for j, p in enumerate(abfs[::-1]):
    params[f"abfs_{j}"] = {
        "conv1_0": {"kernel": _hwio(p["conv1"])},
        "conv1_1": {"scale": jnp.asarray(p["bn1"][0]),
                    "bias": jnp.asarray(p["bn1"][1])},
        "conv2_0": {"kernel": _hwio(p["conv2"])},
        "conv2_1": {"scale": jnp.asarray(p["bn2"][0]),
                    "bias": jnp.asarray(p["bn2"][1])}}
    if "att_w" in p:
      params[f"abfs_{j}"]["att_conv_0"] = {"kernel": _hwio(p["att_w"]),
                                           "bias": jnp.asarray(p["att_b"])}
    stats[f"abfs_{j}"] = {
        name: {"mean": jnp.zeros(len(p[bn][0])),
               "var": jnp.ones(len(p[bn][0]))}
        for name, bn in (("conv1_1", "bn1"), ("conv2_1", "bn2"))}
  return params, stats


CONNECTOR = reviewkd.ReviewKDConnector(
    in_channels=(64, 128, 256, 256), out_channels=(64, 128, 256, 256),
    shapes=(1, 8, 16, 32), out_shapes=(1, 8, 16, 32), dtype=jnp.float64)


def _weighted_term(params, stats, student, teacher, epoch, mask=None):
  """REVIEWKD_WEIGHT 5 · our ReviewKD term (the real one, warm-up included)."""
  updates = {}

  def connector(*args, **kwargs):
    out, new = CONNECTOR.apply({"params": params, "batch_stats": stats},
                               *args, mutable=["batch_stats"], **kwargs)
    updates.update(new["batch_stats"])
    return out

  settings = types.SimpleNamespace(**pair_recipe("resnet32x4", "resnet8x4"))
  hp = types.SimpleNamespace(epoch=jnp.asarray(epoch, jnp.float64))
  ctx = methods.Context(settings=settings, modules={"connector": connector})
  term = methods.get("reviewkd").feature_term(student, teacher, mask, hp,
                                              ctx)
  return settings.feat_weight * term, updates


def test_reviewkd_loss_and_gradients_match_mdistiller():
  golden = GOLDEN["reviewkd"]
  with jax.enable_x64(True):
    student, teacher, abfs = make_reviewkd_case()
    params, stats = _abf_variables(abfs)
    s_out, t_out = _outputs(student), _outputs(teacher)
    (loss, updates), (g_params, g_out) = jax.value_and_grad(
        lambda p, s: _weighted_term(p, stats, s, t_out, 5), argnums=(0, 1),
        has_aux=True)(params, s_out)
    loss30, _ = _weighted_term(params, stats, s_out, t_out, 30)
  assert_close(loss, golden["loss"])
  assert_close(loss30, GOLDEN["reviewkd_epoch30"])
  assert golden["stem_unused"] and not np.any(g_out.feats[0])
  assert not any(np.any(g) for g in g_out.preact_feats)  # STU_PREACT False
  grads = [nchw(g) for g in g_out.feats[1:]] + [np.asarray(g_out.pooled_feat)]
  for g, ref in zip(grads, golden["grads"], strict=True):
    check_tensor(g, ref)
  flat = jax.tree_util.tree_flatten_with_path(g_params)[0]
  assert len(flat) == len(golden["param_grads"])
  for path, g in flat:
    keys = [k.key for k in path]
    name = torch_module_path(tuple(keys[:-1]))[len("abfs."):]
    g = np.asarray(g)
    if keys[-1] == "kernel":
      name, g = name + ".weight", np.transpose(g, (3, 2, 0, 1))
    else:
      name += ".weight" if keys[-1] == "scale" else ".bias"
    check_tensor(g, golden["param_grads"][name])
  for j, ref in enumerate(golden["running_var_sums"]):
    assert_close(np.asarray(updates[f"abfs_{j}"]["conv2_1"]["var"]).sum(),
                  ref)


def test_padded_examples_do_not_change_the_loss_or_gradients():
  with jax.enable_x64(True):
    student, teacher, abfs = make_reviewkd_case(batch=B + 1)
    params, stats = _abf_variables(abfs)
    s_out, t_out = _outputs(student), _outputs(teacher)
    mask = jnp.asarray([1, 1, 1, 0], bool)
    cut = lambda o: jax.tree.map(lambda x: x[:B], o)  # noqa: E731
    fn = lambda s, t, m: _weighted_term(params, stats, s, t, 5, m)[0]  # noqa
    loss, g = jax.value_and_grad(fn)(s_out, t_out, mask)
    ref, g_ref = jax.value_and_grad(fn)(cut(s_out), cut(t_out), None)
  np.testing.assert_allclose(loss, ref, rtol=1e-12)
  for a, r in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a[:B], r, rtol=1e-9, atol=1e-15)
    assert not np.any(a[B:])


def test_warmup_is_epoch_over_warmup_epochs():
  assert float(reviewkd.reviewkd_warmup(1, 20)) == np.float32(0.05)
  assert float(reviewkd.reviewkd_warmup(20, 20)) == 1.0
  assert float(reviewkd.reviewkd_warmup(35, 20)) == 1.0
  assert float(reviewkd.reviewkd_warmup(1, 0)) == 1.0


def test_hcl_hand_checked():
  # 2x2 map: only the 1x1 pyramid level (weight 1/2) is used.
  fs = jnp.asarray([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 2, 1)
  ft = jnp.zeros_like(fs)
  np.testing.assert_allclose(fl.hcl_loss([fs], [ft]),
                             (7.5 + 0.5 * 2.5**2) / 1.5, rtol=1e-6)
  # 8x8 checkerboard ±1: every pooled level is 0, so only the full-size MSE
  # (1) remains, divided by 1 + 1/2 + 1/4 + 1/8.
  board = jnp.asarray((np.indices((8, 8)).sum(0) % 2) * 2.0 - 1.0)
  fs = board.reshape(1, 8, 8, 1)
  np.testing.assert_allclose(fl.hcl_loss([fs], [jnp.zeros_like(fs)]),
                             1.0 / 1.875, rtol=1e-6)
  # Levels add up; a 1x1 level is a plain MSE.
  one = jnp.full((2, 1, 1, 3), 2.0)
  np.testing.assert_allclose(
      fl.hcl_loss([fs, one], [jnp.zeros_like(fs), jnp.zeros_like(one)]),
      1.0 / 1.875 + 4.0, rtol=1e-6)


def test_abf_hand_checked():
  # conv1 ×2, BN identity (eval, mean 0, var 1 − eps), attention weights 0
  # (sigmoid(0) = 1/2 for both), conv2 the identity (centre tap 1):
  # out = residual map = 0.5·(2x) + 0.5·nearest(y).
  with jax.enable_x64(True):
    abf = reviewkd.ABF(1, 1, fuse=True, dtype=jnp.float64)
    ident = {"mean": jnp.zeros(1), "var": jnp.full(1, 1.0 - 1e-5)}
    kernel = np.zeros((3, 3, 1, 1))
    kernel[1, 1] = 1.0
    variables = {
        "params": {"conv1_0": {"kernel": jnp.full((1, 1, 1, 1), 2.0)},
                   "conv1_1": {"scale": jnp.ones(1), "bias": jnp.zeros(1)},
                   "att_conv_0": {"kernel": jnp.zeros((1, 1, 2, 2)),
                                  "bias": jnp.zeros(2)},
                   "conv2_0": {"kernel": jnp.asarray(kernel)},
                   "conv2_1": {"scale": jnp.ones(1), "bias": jnp.zeros(1)}},
        "batch_stats": {"conv1_1": ident, "conv2_1": ident}}
    x = jnp.asarray([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 2, 1)
    y = jnp.full((1, 1, 1, 1), 10.0)
    out, res = abf.apply(variables, x, y, 2, 2, train=False)
    want = np.asarray([[6.0, 7.0], [8.0, 9.0]]).reshape(1, 2, 2, 1)
    np.testing.assert_allclose(out, want, rtol=1e-12)
    np.testing.assert_allclose(res, want, rtol=1e-12)
    out, res = abf.apply(variables, x, y, 2, 4, train=False)  # upsampled
    np.testing.assert_allclose(res[0, :, :, 0], np.kron(want[0, :, :, 0],
                                                        np.ones((2, 2))),
                               rtol=1e-12)


def test_abf_init_is_mdistillers():
  abf = reviewkd.ABF(16, 8, fuse=True)
  x, y = jnp.zeros((1, 4, 4, 64)), jnp.zeros((1, 2, 2, 16))
  params = abf.init(jax.random.key(0), x, y, 4, 4, train=False)["params"]
  for name, fan_in in (("conv1_0", 64), ("conv2_0", 16 * 9)):
    w = np.asarray(params[name]["kernel"])
    bound = math.sqrt(3.0 / fan_in)  # kaiming_uniform(a=1)
    assert np.max(np.abs(w)) <= bound
    np.testing.assert_allclose(w.std(), bound / math.sqrt(3), rtol=0.15)
    assert "bias" not in params[name]
  att = params["att_conv_0"]  # PyTorch's default: ±1/sqrt(fan_in)
  assert np.max(np.abs(att["kernel"])) <= 1 / math.sqrt(32)
  assert np.max(np.abs(att["bias"])) <= 1 / math.sqrt(32)


@pytest.mark.parametrize("sizes", sorted(
    [tuple(int(v) for v in k.split("->")) for k in [
        "1->5", "11->6", "13->37", "3->7", "37->13", "4->8", "5->9", "6->11",
        "7->3", "8->4", "9->5"]]))
def test_nearest_indices_are_pytorchs(sizes):
  n_in, n_out = sizes
  np.testing.assert_array_equal(fl.nearest_indices(n_in, n_out),
                                GOLDEN["nearest"][f"{n_in}->{n_out}"])


def test_nearest_resize_matches_torch_on_odd_sizes():
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).standard_normal((2, 3, 5, 7))
  for out in [(9, 4), (3, 13), (5, 7), (11, 2)]:
    ref = torch.nn.functional.interpolate(torch.from_numpy(x), out,
                                          mode="nearest").numpy()
    got = fl.nearest_resize(jnp.asarray(np.transpose(x, (0, 2, 3, 1))), out)
    np.testing.assert_array_equal(np.transpose(np.asarray(got), (0, 3, 1, 2)),
                                  ref.astype(np.float32))


# mdistiller's REVIEWKD lists per pair: cfg.py defaults (which
# configs/cifar100/reviewkd.yaml, resnet32x4 -> resnet8x4, keeps) and
# configs/imagenet/{r34_r18,r50_mv1}/reviewkd.yaml.
MDISTILLER_PAIRS = {
    ("resnet32x4", "resnet8x4", 32): dict(
        shapes=[1, 8, 16, 32], out_shapes=[1, 8, 16, 32],
        in_channels=[64, 128, 256, 256], out_channels=[64, 128, 256, 256],
        feat_weight=5.0, warmup_epochs=20, stu_preact=0),
    ("imagenet_resnet34", "imagenet_resnet18", 224): dict(
        shapes=[1, 7, 14, 28, 56], out_shapes=[1, 7, 14, 28, 56],
        in_channels=[64, 128, 256, 512, 512],
        out_channels=[64, 128, 256, 512, 512],
        feat_weight=1.0, warmup_epochs=1, stu_preact=1),
    ("imagenet_resnet50", "imagenet_mobilenetv1", 224): dict(
        shapes=[1, 7, 14, 28, 56], out_shapes=[1, 7, 14, 28, 56],
        in_channels=[128, 256, 512, 1024, 1024],
        out_channels=[256, 512, 1024, 2048, 2048],
        feat_weight=8.0, warmup_epochs=1, stu_preact=1),
}


@pytest.mark.parametrize("pair", sorted(MDISTILLER_PAIRS))
def test_derived_pair_settings_equal_mdistillers_yaml(pair):
  teacher, student, size = pair
  want = MDISTILLER_PAIRS[pair]
  spec = reviewkd.reviewkd_spec(models.create(student),
                                models.create(teacher), (size, size))
  assert spec == {k: want[k] for k in spec}
  settings = pair_recipe(teacher, student)
  for key in ("feat_weight", "warmup_epochs", "stu_preact"):
    assert settings[key] == want[key]
  assert settings["ce_weight"] == 1.0


def test_default_pair_settings_are_cfg_py():
  settings = pair_recipe("wrn_40_2", "wrn_16_2")
  assert {k: settings[k] for k in ("ce_weight", "feat_weight",
                                   "warmup_epochs", "stu_preact")} == dict(
      ce_weight=1.0, feat_weight=1.0, warmup_epochs=20.0, stu_preact=0)


def test_make_modules_for_a_pair_without_yaml():
  # vgg13 -> MobileNetV2: five teacher levels (4 stages + pooled); the
  # student's deepest five of feats + pooled (1280-wide head).
  mods = methods.get("reviewkd").make_modules(
      models.create("MobileNetV2"), models.create("vgg13"), None,
      jnp.float32, 32)
  c = mods["connector"]
  assert c.in_channels == (12, 16, 48, 160, 1280)
  assert c.out_channels == (128, 256, 512, 512, 512)
  assert c.shapes == (1, 2, 4, 8, 16)
  assert c.out_shapes == (1, 4, 4, 8, 16)


# Produced by tests/goldens/gen_ofd_reviewkd_goldens.py (mdistiller a08d46f,
# ReviewKD.forward_train with REVIEWKD_WEIGHT 5 at epoch 5 and 30, torch
# float64; F.interpolate nearest indices): loss_kd, gradient summaries
# (PyTorch layouts), running variances of each ABF's conv2 BN.
GOLDEN = {
  'nearest': {
    '1->5': [0, 0, 0, 0, 0],
    '11->6': [0, 1, 3, 5, 7, 9],
    '13->37': [
        0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5, 6, 6, 7, 7, 7,
        8, 8, 8, 9, 9, 9, 10, 10, 10, 11, 11, 11, 12, 12,
    ],
    '3->7': [0, 0, 0, 1, 1, 2, 2],
    '37->13': [0, 2, 5, 8, 11, 14, 17, 19, 22, 25, 28, 31, 34],
    '4->8': [0, 0, 1, 1, 2, 2, 3, 3],
    '5->9': [0, 0, 1, 1, 2, 2, 3, 3, 4],
    '6->11': [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5],
    '7->3': [0, 2, 4],
    '8->4': [0, 2, 4, 6],
    '9->5': [0, 1, 3, 5, 7],
  },
  'reviewkd': {
    'grads': [
      {'norm': 0.004672023923893813, 'sum': 1.734723475976807e-17,
       'entries': [((0, 0, 0, 0), 6.549508724764083e-06),
                   ((1, 32, 16, 16), -1.7180604607009354e-05),
                   ((2, 63, 31, 31), -1.9741928770342498e-05)]},
      {'norm': 0.007070261973437366, 'sum': 6.938893903907228e-18,
       'entries': [((0, 0, 0, 0), -6.064165787793624e-05),
                   ((1, 64, 8, 8), -8.831196879509771e-06),
                   ((2, 127, 15, 15), 1.5171747246541069e-06)]},
      {'norm': 0.012070154693359583, 'sum': -1.3877787807814457e-17,
       'entries': [((0, 0, 0, 0), -9.909481881937398e-06),
                   ((1, 128, 4, 4), 3.57206070024347e-05),
                   ((2, 255, 7, 7), -1.0762620425703398e-05)]},
      {'norm': 0.3596791187173689, 'sum': -7.216449660063518e-16,
       'entries': [((0, 0), -0.010668836013642973),
                   ((1, 128), -0.009003349147831607),
                   ((2, 255), -0.021469238697659408)]},
    ],
    'loss': 7.447953066869248,
    'param_grads': {
      '0.conv1.0.weight':
        {'norm': 6.118776354166156, 'sum': 0.18889451969197713,
         'entries': [((0, 0, 0, 0), -0.0012996612508383593),
                     ((128, 128, 0, 0), -0.0067952528302471045),
                     ((255, 255, 0, 0), -0.007120468848288962)]},
      '0.conv1.1.bias':
        {'norm': 0.07070030491509675, 'sum': 0.0673060322486859,
         'entries': [((0,), -0.003262912103852705),
                     ((128,), 0.0024662414367951063),
                     ((255,), 0.006640267866045652)]},
      '0.conv1.1.weight':
        {'norm': 0.18458992824205656, 'sum': 0.3665669393360762,
         'entries': [((0,), 0.005221092411210747),
                     ((128,), 0.012731224356424287),
                     ((255,), -0.011945971361582838)]},
      '0.conv2.0.weight':
        {'norm': 15.2941384220215, 'sum': -4.512640524654691,
         'entries': [((0, 0, 0, 0), 0.0),
                     ((128, 128, 1, 1), 0.03740356595538354),
                     ((255, 255, 2, 2), 0.0)]},
      '0.conv2.1.bias':
        {'norm': 0.14192091831918677, 'sum': -2.03734181030075,
         'entries': [((0,), -0.0038131960820392326),
                     ((128,), -0.005843258285737154),
                     ((255,), -0.01084243442085526)]},
      '0.conv2.1.weight':
        {'norm': 0.17622036702937863, 'sum': 2.563366287705628,
         'entries': [((0,), 0.005446056551372294),
                     ((128,), 0.014715590816670952),
                     ((255,), 0.009863414927316076)]},
      '1.att_conv.0.bias':
        {'norm': 0.16890709714129726, 'sum': 0.07460872588962172,
         'entries': [((0,), -0.0761557103745363),
                     ((1,), 0.15076443626415803),
                     ((1,), 0.15076443626415803)]},
      '1.att_conv.0.weight':
        {'norm': 0.5235410563705541, 'sum': 0.35953113131975833,
         'entries': [((0, 0, 0, 0), 0.004523373234341433),
                     ((1, 256, 0, 0), 0.03289214101705606),
                     ((1, 511, 0, 0), 0.039786247161045035)]},
      '1.conv1.0.weight':
        {'norm': 0.20074591573652734, 'sum': 0.0006673358792845807,
         'entries': [((0, 0, 0, 0), 0.0005903941208462172),
                     ((128, 128, 0, 0), 6.308114570725727e-05),
                     ((255, 255, 0, 0), -0.0008614892369091416)]},
      '1.conv1.1.bias':
        {'norm': 0.06860155102523156, 'sum': -0.04176002017794195,
         'entries': [((0,), -0.004548649363314209),
                     ((128,), -0.0051135267256646535),
                     ((255,), 0.0021474843952216357)]},
      '1.conv1.1.weight':
        {'norm': 0.014333955745404805, 'sum': -0.18224027765724854,
         'entries': [((0,), -0.0004757780041922072),
                     ((128,), 2.0228882493457593e-05),
                     ((255,), -0.00047807243192044577)]},
      '1.conv2.0.weight':
        {'norm': 1.2572306051342574, 'sum': -1.1597181988460152,
         'entries': [((0, 0, 0, 0), 0.00012204529575916705),
                     ((128, 128, 1, 1), 0.00010252479892966678),
                     ((255, 255, 2, 2), 0.00061722322673859)]},
      '1.conv2.1.bias':
        {'norm': 0.021729716189455857, 'sum': -0.011807611925781317,
         'entries': [((0,), -0.0021457623412124115),
                     ((128,), -0.0024605963067094675),
                     ((255,), 0.0013925218830998973)]},
      '1.conv2.1.weight':
        {'norm': 0.11853352976776463, 'sum': 1.8029853019827498,
         'entries': [((0,), 0.0076970841326670265),
                     ((128,), 0.0056965035000273445),
                     ((255,), 0.009539005273496071)]},
      '2.att_conv.0.bias':
        {'norm': 0.0913094765948715, 'sum': 0.024517502685670794,
         'entries': [((0,), -0.051132362178929025),
                     ((1,), 0.07564986486459982),
                     ((1,), 0.07564986486459982)]},
      '2.att_conv.0.weight':
        {'norm': 0.38499770307248693, 'sum': 0.26863097543314035,
         'entries': [((0, 0, 0, 0), 0.011283550892358638),
                     ((1, 256, 0, 0), 0.021976594942880432),
                     ((1, 511, 0, 0), 0.03772966590820847)]},
      '2.conv1.0.weight':
        {'norm': 0.08457090003553677, 'sum': 0.08575083682096582,
         'entries': [((0, 0, 0, 0), -0.0006178152045904017),
                     ((128, 64, 0, 0), 6.518893171825597e-05),
                     ((255, 127, 0, 0), -0.00029829474264810116)]},
      '2.conv1.1.bias':
        {'norm': 0.03859462891486128, 'sum': 0.008983877011509711,
         'entries': [((0,), 0.0013044125043909205),
                     ((128,), -0.0022566326972312265),
                     ((255,), 3.98368833284499e-05)]},
      '2.conv1.1.weight':
        {'norm': 0.0087396635144543, 'sum': -0.11775855202585657,
         'entries': [((0,), -0.0005593114051867188),
                     ((128,), -0.0002690089909238771),
                     ((255,), -2.280544640392151e-05)]},
      '2.conv2.0.weight':
        {'norm': 0.9960587035809104, 'sum': 0.17222825199320718,
         'entries': [((0, 0, 0, 0), -0.0027708136696567996),
                     ((64, 128, 1, 1), -0.000773014689526675),
                     ((127, 255, 2, 2), 0.0010171293765775667)]},
      '2.conv2.1.bias':
        {'norm': 0.02669521478511056, 'sum': -0.004127535931541509,
         'entries': [((0,), 0.004581145812178819),
                     ((64,), 0.0037312832475952682),
                     ((127,), 0.0021321394044159503)]},
      '2.conv2.1.weight':
        {'norm': 0.1429870023355198, 'sum': 1.5527568370175406,
         'entries': [((0,), 0.013928446013112687),
                     ((64,), 0.00914267854594861),
                     ((127,), 0.009481635155810492)]},
      '3.att_conv.0.bias':
        {'norm': 0.026139105190820307, 'sum': 0.0024653381635783983,
         'entries': [((0,), -0.01720931934200029),
                     ((1,), 0.019674657505578688),
                     ((1,), 0.019674657505578688)]},
      '3.att_conv.0.weight':
        {'norm': 0.08582567393413347, 'sum': 0.047672389263551634,
         'entries': [((0, 0, 0, 0), 0.0009865083053409093),
                     ((1, 256, 0, 0), 0.0032886448794041704),
                     ((1, 511, 0, 0), 0.005330891864938498)]},
      '3.conv1.0.weight':
        {'norm': 0.03908336516021127, 'sum': -0.025225906747226405,
         'entries': [((0, 0, 0, 0), 0.00015338104889308258),
                     ((128, 32, 0, 0), 6.277808963872868e-05),
                     ((255, 63, 0, 0), -1.2035212142165843e-06)]},
      '3.conv1.1.bias':
        {'norm': 0.011204421065008047, 'sum': -0.0011139820167189696,
         'entries': [((0,), 0.0010439133608560517),
                     ((128,), -0.0003601253089312538),
                     ((255,), 0.0001568510308893523)]},
      '3.conv1.1.weight':
        {'norm': 0.0038887558771599933, 'sum': -0.03809108206286234,
         'entries': [((0,), -0.00015929172935572297),
                     ((128,), -0.00018090543282349764),
                     ((255,), -0.00018039090284125613)]},
      '3.conv2.0.weight':
        {'norm': 0.4759113325816624, 'sum': 1.8139269065133208,
         'entries': [((0, 0, 0, 0), 6.214960816113463e-06),
                     ((32, 128, 1, 1), 0.00038197023315693644),
                     ((63, 255, 2, 2), -0.0005606156013047622)]},
      '3.conv2.1.bias':
        {'norm': 0.03796636289711703, 'sum': 0.005507899176693877,
         'entries': [((0,), -0.007946097277237066),
                     ((32,), -0.005466360173669509),
                     ((63,), -0.0020001495407272786)]},
      '3.conv2.1.weight':
        {'norm': 0.17657446501547786, 'sum': 1.35576486960613,
         'entries': [((0,), 0.02821684033079865),
                     ((32,), 0.018857862636932708),
                     ((63,), 0.017195089507452223)]},
    },
    'running_var_sums': [
      231.8624455820235,
      234.9860032253985,
      116.90513728447127,
      58.48326643551024,
    ],
    'stem_unused': True,
  },
  'reviewkd_epoch30': 29.791812267476992,
}
