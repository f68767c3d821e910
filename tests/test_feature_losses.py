"""Feature-KD losses and connectors against mdistiller's own code (float64).

The golden values at the end of this file come from the reference, never from
our code: tests/goldens/gen_feature_goldens.py (run by hand, not by pytest)
ran mdistiller's loss functions and
modules (mdistiller/distillers/{_common,AT,SP,RKD,PKT,NST,KDSVD,VID}.py at
a08d46f; KDSVD's ``.float()`` patched to float64) with torch 2.13 in float64
on the inputs below (numpy ``default_rng``, seeds 0-7, NCHW), B = 4 and the
feature shapes of resnet8x4 / resnet32x4 on CIFAR (plus small maps for
spatial pooling, ConvReg's kernels and KDSVD with k = 2). Losses, gradient
norms, sums and three entries per tensor must match to 1e-9 (relative;
entries and sums relative to the gradient's norm).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slkd_jax import feature_losses as fl
from slkd_jax import methods, models
from slkd_jax.methods import feature
from golden_checks import assert_close, check_tensor, nchw, nhwc

B = 4
# NCHW shapes (no batch) of resnet8x4's and resnet32x4's feats; pooled 256.
FEAT_SHAPES = [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8)]
POOLED = 256
# Spatial pooling cases (student larger / smaller / non-divisible).
POOL_S = [(8, 8, 8), (6, 4, 4), (5, 6, 6)]
POOL_T = [(8, 4, 4), (6, 8, 8), (7, 4, 4)]
KDSVD_SHAPES = [(6, 8, 8), (10, 6, 6), (12, 5, 5)]  # k = 2 case, seed 7
CONVREG_CASES = {"conv_s2": ((3, 8, 8), (5, 4, 4), 3),
                 "transpose": ((3, 4, 4), (5, 8, 8), 4),
                 "valid": ((3, 6, 6), (5, 4, 4), 3)}


@pytest.fixture(autouse=True)
def float64():
  with jax.enable_x64(True):
    yield


# ---- input generators (verbatim from the generation script) ---------------
def make_features(seed, shapes_s, shapes_t, pooled=None, batch=B):
  rng = np.random.default_rng(seed)
  fs = [np.abs(rng.standard_normal((batch,) + tuple(s))) for s in shapes_s]
  ft = [np.abs(rng.standard_normal((batch,) + tuple(s))) for s in shapes_t]
  ps = pt = None
  if pooled:
    ps = rng.standard_normal((batch, pooled))
    pt = rng.standard_normal((batch, pooled))
  return fs, ft, ps, pt


def make_convreg_params(seed, s_c, t_c, k, transpose):
  rng = np.random.default_rng(seed)
  shape = (s_c, t_c, k, k) if transpose else (t_c, s_c, k, k)
  return dict(weight=rng.uniform(-0.3, 0.3, shape),
              bias=rng.uniform(-0.1, 0.1, t_c),
              bn_weight=rng.uniform(0.5, 1.5, t_c),
              bn_bias=rng.uniform(-0.2, 0.2, t_c))


def make_vid_params(seed, s_channels, t_channels):
  rng = np.random.default_rng(seed)
  layers = []
  for s, t in zip(s_channels, t_channels):
    layers.append(dict(
        w0=rng.uniform(-1, 1, (t, s, 1, 1)) / np.sqrt(s),
        w2=rng.uniform(-1, 1, (t, t, 1, 1)) / np.sqrt(t),
        w4=rng.uniform(-1, 1, (t, t, 1, 1)) / np.sqrt(t),
        log_scale=rng.standard_normal(t) + 1.0))
  return layers
# ---------------------------------------------------------------------------


def _conv_kernel(w):  # OIHW -> HWIO
  return jnp.asarray(np.transpose(w, (2, 3, 1, 0)))


def _check_loss_and_grads(loss, grads, golden):
  assert_close(loss, golden["loss"])
  assert len(grads) == len(golden["grads"])
  for g, ref in zip(grads, golden["grads"]):
    check_tensor(nchw(g) if g.ndim == 4 else g, ref)


# ---------------------------------------------------------------------------
# Goldens: losses over feature lists / pooled features.

LIST_LOSSES = {
    "at": (lambda s, t: fl.at_loss(s, t, p=2), slice(1, None)),
    "nst": (fl.nst_loss, slice(1, None)),
    "sp": (fl.sp_loss, slice(-1, None)),
    "kdsvd": (lambda s, t: fl.kdsvd_loss(s, t, k=1), slice(1, None)),
}


@pytest.mark.parametrize("name", sorted(LIST_LOSSES))
def test_feature_list_loss_matches_mdistiller(name):
  fn, layers = LIST_LOSSES[name]
  fs, ft, _, _ = make_features(0, FEAT_SHAPES, FEAT_SHAPES, POOLED)
  s = [nhwc(a) for a in fs[layers]]
  t = [nhwc(a) for a in ft[layers]]
  loss, grads = jax.jit(jax.value_and_grad(fn))(s, t)
  _check_loss_and_grads(loss, grads, GOLDEN[name])


def test_kdsvd_k2_matches_mdistiller():
  fs, ft, _, _ = make_features(7, KDSVD_SHAPES, KDSVD_SHAPES)
  s, t = [nhwc(a) for a in fs], [nhwc(a) for a in ft]
  loss, grads = jax.jit(jax.value_and_grad(
      lambda s, t: fl.kdsvd_loss(s, t, k=2)))(s, t)
  _check_loss_and_grads(loss, grads, GOLDEN["kdsvd_k2"])


@pytest.mark.parametrize("name", ["at", "nst"])
def test_spatial_pooling_matches_mdistiller(name):
  fn = LIST_LOSSES[name][0]
  fs, ft, _, _ = make_features(3, POOL_S, POOL_T)
  s, t = [nhwc(a) for a in fs], [nhwc(a) for a in ft]
  loss, grads = jax.jit(jax.value_and_grad(fn))(s, t)
  _check_loss_and_grads(loss, grads, GOLDEN[f"{name}_pool"])


POOLED_LOSSES = {
    "rkd": fl.rkd_loss,
    "rkd_squared": lambda s, t: fl.rkd_loss(s, t, squared=True),
    "pkt": fl.pkt_loss,
}


@pytest.mark.parametrize("name", sorted(POOLED_LOSSES))
def test_pooled_loss_matches_mdistiller(name):
  _, _, ps, pt = make_features(0, FEAT_SHAPES, FEAT_SHAPES, POOLED)
  loss, grad = jax.jit(jax.value_and_grad(POOLED_LOSSES[name]))(
      jnp.asarray(ps), jnp.asarray(pt))
  _check_loss_and_grads(loss, [grad], GOLDEN[name])


# ---------------------------------------------------------------------------
# Goldens: FitNet (ConvReg) and VID (regressors).


def _convreg_variables(p, transpose):
  kernel = (np.transpose(p["weight"], (2, 3, 0, 1)) if transpose
            else np.transpose(p["weight"], (2, 3, 1, 0)))
  c = p["bias"].shape[0]
  return ({"conv": {"kernel": jnp.asarray(kernel),
                    "bias": jnp.asarray(p["bias"])},
           "bn": {"scale": jnp.asarray(p["bn_weight"]),
                  "bias": jnp.asarray(p["bn_bias"])}},
          {"bn": {"mean": jnp.zeros(c), "var": jnp.ones(c)}})


def _run_fitnet(reg, params, stats, f_s, f_t, mask=None):
  def loss_fn(params, x):
    y, upd = reg.apply({"params": params, "batch_stats": stats}, x,
                       train=True, mask=mask, mutable=["batch_stats"])
    return fl.fitnet_loss(y, f_t, mask), upd

  return jax.jit(jax.value_and_grad(loss_fn, (0, 1), has_aux=True))(
      params, f_s)


def _check_convreg(f_s, f_t, p, golden, transpose):
  reg = feature.ConvReg(f_s.shape, f_t.shape, dtype=jnp.float64)
  params, stats = _convreg_variables(p, transpose)
  shapes = jax.eval_shape(lambda k, x: reg.init(k, x, train=True),
                          jax.random.key(0), f_s)
  assert (jax.tree.map(jnp.shape, shapes) ==
          jax.tree.map(jnp.shape, {"params": params, "batch_stats": stats}))
  (loss, upd), (gp, gx) = _run_fitnet(reg, params, stats, f_s, f_t)
  _check_loss_and_grads(loss, [gx], golden)
  to_torch = (2, 3, 0, 1) if transpose else (3, 2, 0, 1)
  pg = golden["param_grads"]
  check_tensor(np.transpose(gp["conv"]["kernel"], to_torch),
                pg["conv.weight"])
  # A conv bias before train-mode BatchNorm has zero gradient; both sides are
  # rounding noise, so only check that ours is too.
  assert pg["conv.bias"]["norm"] < 1e-12 * pg["conv.weight"]["norm"]
  assert (np.linalg.norm(gp["conv"]["bias"]) <
          1e-12 * pg["conv.weight"]["norm"])
  check_tensor(gp["bn"]["scale"], pg["bn.weight"])
  check_tensor(gp["bn"]["bias"], pg["bn.bias"])
  assert_close(jnp.sum(upd["batch_stats"]["bn"]["mean"]),
                golden["running_mean_sum"])
  assert_close(jnp.sum(upd["batch_stats"]["bn"]["var"]),
                golden["running_var_sum"])


def test_fitnet_convreg_matches_mdistiller():
  fs, ft, _, _ = make_features(0, FEAT_SHAPES, FEAT_SHAPES, POOLED)
  assert GOLDEN["fitnet"]["kind"] == "Conv2d"
  _check_convreg(nhwc(fs[2]), nhwc(ft[2]),
                 make_convreg_params(1, 128, 128, 1, False),
                 GOLDEN["fitnet"], transpose=False)


@pytest.mark.parametrize("name", sorted(CONVREG_CASES))
def test_convreg_kernels_match_mdistiller(name):
  s_shape, t_shape, k = CONVREG_CASES[name]
  fs, ft, _, _ = make_features(5, [s_shape], [t_shape])
  transpose = name == "transpose"
  golden = GOLDEN[f"convreg_{name}"]
  assert golden["kind"] == ("ConvTranspose2d" if transpose else "Conv2d")
  _check_convreg(nhwc(fs[0]), nhwc(ft[0]),
                 make_convreg_params(6, 3, 5, k, transpose), golden,
                 transpose)


def _vid_params(layers):
  return {f"regressors_{i}": {"0": {"kernel": _conv_kernel(p["w0"])},
                              "2": {"kernel": _conv_kernel(p["w2"])},
                              "4": {"kernel": _conv_kernel(p["w4"])},
                              "log_scale": jnp.asarray(p["log_scale"])}
          for i, p in enumerate(layers)}


def _vid_loss_fn(conn, feats_t, mask=None):
  def loss_fn(params, feats_s):
    means, log_scales = conn.apply({"params": params}, feats_s)
    return fl.vid_loss(means, log_scales, feats_t, eps=1e-5, mask=mask)
  return loss_fn


def _check_vid(fs, ft, layers, golden):
  s, t = [nhwc(a) for a in fs], [nhwc(a) for a in ft]
  conn = feature.VIDConnector(tuple(a.shape[-1] for a in t),
                              tuple(a.shape[1] for a in t),
                              learn_log_scale=True, dtype=jnp.float64)
  params = _vid_params(layers)
  shapes = jax.eval_shape(conn.init, jax.random.key(0), s)["params"]
  assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, params)
  loss, (gp, gs) = jax.jit(jax.value_and_grad(_vid_loss_fn(conn, t), (0, 1)))(
      params, s)
  _check_loss_and_grads(loss, gs, golden)
  for i, ref in enumerate(golden["weight_grads"]):
    for name, key in (("w0", "0"), ("w2", "2"), ("w4", "4")):
      kernel_grad = gp[f"regressors_{i}"][key]["kernel"]
      check_tensor(np.transpose(kernel_grad, (3, 2, 0, 1)), ref[name])
    check_tensor(gp[f"regressors_{i}"]["log_scale"],
                  golden["log_scale_grads"][i])


def test_vid_matches_mdistiller():
  fs, ft, _, _ = make_features(0, FEAT_SHAPES, FEAT_SHAPES, POOLED)
  chans = [s[0] for s in FEAT_SHAPES[1:]]
  _check_vid(fs[1:], ft[1:], make_vid_params(2, chans, chans), GOLDEN["vid"])


def test_vid_spatial_pooling_matches_mdistiller():
  fs, ft, _, _ = make_features(3, POOL_S, POOL_T)
  layers = make_vid_params(4, [s[0] for s in POOL_S], [t[0] for t in POOL_T])
  _check_vid(fs, ft, layers, GOLDEN["vid_pool"])


def test_vid_log_scale_init_matches_mdistiller():
  init = feature.vid_log_scale_init(3, 5.0, 1e-5, jnp.float64)
  np.testing.assert_allclose(init, GOLDEN["vid"]["init_log_scale"],
                             rtol=1e-14)
  np.testing.assert_allclose(fl.vid_pred_var(init, 1e-5), 5.0, rtol=1e-14)
  # mdistiller's default: a constant (never registered, never trained).
  reg = feature.VIDRegressor(8)
  x = jnp.ones((2, 4, 4, 6), jnp.float32)
  variables = reg.init(jax.random.key(0), x)
  assert "log_scale" not in variables["params"]
  _, log_scale = reg.apply(variables, x)
  assert log_scale.dtype == jnp.float32 and log_scale.shape == (8,)
  np.testing.assert_allclose(log_scale, np.float32(init[0]))


# ---------------------------------------------------------------------------
# Padded (masked) batches equal the smaller real batch.

N_REAL, N_PAD = 5, 3
SMALL_S = [(8, 8, 6), (8, 8, 12)]   # NHWC, no batch
SMALL_T = [(8, 8, 6), (4, 4, 10)]


def _small_batch(seed, pooled=False, same_shapes=False):
  rng = np.random.default_rng(seed)
  n = N_REAL + N_PAD
  if pooled:
    s, t = rng.standard_normal((n, 16)), rng.standard_normal((n, 16))
  else:
    s = [np.abs(rng.standard_normal((n,) + sh)) for sh in SMALL_S]
    t = [np.abs(rng.standard_normal((n,) + sh))
         for sh in (SMALL_S if same_shapes else SMALL_T)]
  # Student's padded rows all zero: the worst case for norms, Gram rows and
  # the SVD; teacher's copy example 0, as the input pipeline pads.
  zero = lambda x: jnp.asarray(x).at[N_REAL:].set(0.0)  # noqa: E731
  copy = lambda x: jnp.asarray(x).at[N_REAL:].set(x[0])  # noqa: E731
  return jax.tree.map(zero, s), jax.tree.map(copy, t)


MASKABLE = {
    "at": fl.at_loss,
    "nst": fl.nst_loss,
    "sp": fl.sp_loss,
    "kdsvd": fl.kdsvd_loss,
    "rkd": fl.rkd_loss,
    "pkt": fl.pkt_loss,
}


def _assert_masked_equals_real(fn, s, t, rtol=1e-12):
  """fn(s, t, mask) on the padded batch vs fn(s[:n], t[:n]) on the real."""
  mask = jnp.arange(N_REAL + N_PAD) < N_REAL
  real = lambda x: x[:N_REAL]  # noqa: E731
  loss_m, grad_m = jax.jit(jax.value_and_grad(lambda s: fn(s, t, mask)))(s)
  loss_r, grad_r = jax.jit(jax.value_and_grad(
      lambda s: fn(s, jax.tree.map(real, t), None)))(jax.tree.map(real, s))
  np.testing.assert_allclose(loss_m, loss_r, rtol=rtol)
  for gm, gr in zip(jax.tree.leaves(grad_m), jax.tree.leaves(grad_r)):
    assert np.all(np.isfinite(gm))
    np.testing.assert_allclose(gm[:N_REAL], gr, rtol=1e-9,
                               atol=1e-12 * np.abs(gr).max())
    assert np.all(gm[N_REAL:] == 0.0)


@pytest.mark.parametrize("name", sorted(MASKABLE))
def test_masked_batch_equals_real_batch(name):
  # KDSVD (no pooling in mdistiller) needs equal student/teacher widths.
  s, t = _small_batch(7, pooled=name in ("rkd", "pkt"),
                      same_shapes=name == "kdsvd")
  fn = MASKABLE[name]
  _assert_masked_equals_real(lambda s, t, m: fn(s, t, mask=m), s, t)


def test_masked_fitnet_equals_real_batch():
  s, t = _small_batch(8)
  reg = feature.ConvReg(s[1].shape, t[1].shape, dtype=jnp.float64)
  variables = reg.init(jax.random.key(1), s[1], train=True)
  params, stats = variables["params"], variables["batch_stats"]

  def fn(x, f_t, mask):
    (loss, upd), _ = _run_fitnet(reg, params, stats, x, f_t, mask)
    return loss + 0.0 * jnp.sum(upd["batch_stats"]["bn"]["var"])

  _assert_masked_equals_real(fn, s[1], t[1])
  # The BatchNorm statistics ignore the padded examples too.
  mask = jnp.arange(N_REAL + N_PAD) < N_REAL
  (_, upd_m), _ = _run_fitnet(reg, params, stats, s[1], t[1], mask)
  (_, upd_r), _ = _run_fitnet(reg, params, stats, s[1][:N_REAL],
                              t[1][:N_REAL])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12),
               upd_m, upd_r)


def test_masked_vid_equals_real_batch():
  s, t = _small_batch(9)
  conn = feature.VIDConnector(tuple(a.shape[-1] for a in t),
                              tuple(a.shape[1] for a in t),
                              dtype=jnp.float64)
  params = conn.init(jax.random.key(2), s)["params"]
  _assert_masked_equals_real(
      lambda s, t, m: _vid_loss_fn(conn, t, m)(params, s), s, t)


# ---------------------------------------------------------------------------
# Connector construction, shapes and init; defaults; dtypes.


def test_feature_shapes_and_connectors_for_resnet32x4_to_resnet8x4():
  s_shapes = models.feature_shapes(models.create("resnet8x4"))
  t_shapes = models.feature_shapes(models.create("resnet32x4"))
  expected = [(1, 32, 32, 32), (1, 32, 32, 64), (1, 16, 16, 128),
              (1, 8, 8, 256)]
  assert s_shapes == expected and t_shapes == expected
  assert feature.make_connector("at", s_shapes, t_shapes) is None
  reg = feature.make_connector("fitnet", s_shapes, t_shapes, hint_layer=2)
  x = jnp.zeros((2, 16, 16, 128))
  v = jax.eval_shape(lambda k, x: reg.init(k, x, train=True),
                     jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, v) == {
      "params": {"conv": {"kernel": (1, 1, 128, 128), "bias": (128,)},
                 "bn": {"scale": (128,), "bias": (128,)}},
      "batch_stats": {"bn": {"mean": (128,), "var": (128,)}}}
  vid = feature.make_connector("vid", s_shapes, t_shapes)
  feats = [jnp.zeros((2,) + s[1:]) for s in s_shapes[1:]]
  v = jax.eval_shape(vid.init, jax.random.key(0), feats)
  assert jax.tree.map(jnp.shape, v) == {"params": {
      f"regressors_{i}": {"0": {"kernel": (1, 1, c, c)},
                          "2": {"kernel": (1, 1, c, c)},
                          "4": {"kernel": (1, 1, c, c)}}
      for i, c in enumerate((64, 128, 256))}}


def test_conv_reg_spec_follows_mdistiller_order():
  spec = feature.conv_reg_spec
  assert spec((1, 8, 8, 3), (1, 4, 4, 5))["kind"] == "conv"
  assert spec((1, 8, 8, 3), (1, 4, 4, 5))["strides"] == 2
  assert spec((1, 2, 2, 3), (1, 1, 1, 5))["kernel_size"] == 3  # 2x first
  assert spec((1, 4, 4, 3), (1, 8, 8, 5))["kind"] == "transpose"
  assert spec((1, 7, 7, 3), (1, 4, 4, 5))["kernel_size"] == 4
  assert spec((1, 4, 4, 3), (1, 4, 4, 5))["kernel_size"] == 1
  with pytest.raises(ValueError):
    spec((1, 3, 3, 3), (1, 8, 8, 5))


def test_connector_init_is_pytorch_default():
  # kaiming_uniform(a=sqrt(5)): U(±1/sqrt(fan_in)); transposed convs take
  # their fan-in from the weight's dim 1 (out channels · k²).
  for (s, t, _), fan_in in zip(CONVREG_CASES.values(), (27, 80, 27)):
    reg = feature.ConvReg((1, s[1], s[2], s[0]), (1, t[1], t[2], t[0]))
    p = reg.init(jax.random.key(3), jnp.zeros((2, s[1], s[2], s[0])),
                 train=True)["params"]["conv"]
    for leaf in (p["kernel"], p["bias"]):
      bound = float(jnp.max(jnp.abs(leaf))) * np.sqrt(fan_in)
      assert 0.3 < bound <= 1.0
  reg = feature.VIDRegressor(64)
  p = reg.init(jax.random.key(4), jnp.zeros((1, 4, 4, 256)))["params"]
  assert set(p) == {"0", "2", "4"} and "bias" not in p["0"]
  assert 0.9 < float(jnp.max(jnp.abs(p["0"]["kernel"]))) * 16.0 <= 1.0


def test_feature_defaults_are_mdistillers():
  d = {m: methods.get(m).defaults for m in (
      *feature.DEFAULTS, "ofd", "reviewkd")}
  assert {k: v["feat_weight"] for k, v in d.items()} == {
      "fitnet": 100.0, "at": 1000.0, "sp": 3000.0, "rkd": 1.0,
      "pkt": 30000.0, "nst": 50.0, "kdsvd": 1.0, "vid": 1.0, "ofd": 0.001,
      "reviewkd": 1.0}
  assert all(v["ce_weight"] == 1.0 for v in d.values())
  assert (d["reviewkd"]["warmup_epochs"], d["reviewkd"]["stu_preact"]) == (
      20, 0)
  assert d["fitnet"]["hint_layer"] == 2 and d["at"]["p"] == 2
  assert (d["rkd"]["distance_weight"], d["rkd"]["angle_weight"],
          d["rkd"]["pdist_eps"], d["rkd"]["pdist_squared"]) == (
              25.0, 50.0, 1e-12, False)
  assert d["kdsvd"]["k"] == 1
  assert (d["vid"]["init_pred_var"], d["vid"]["eps"]) == (5.0, 1e-5)


def test_select_features():
  outputs = models.Outputs(jnp.zeros((2, 10)),
                           tuple(jnp.zeros((2, 8, 8, c)) for c in (1, 2, 3, 4)),
                           None, jnp.zeros((2, 4)))
  sel = lambda m: feature.select_features(m, outputs)  # noqa: E731
  assert sel("fitnet").shape[-1] == 3
  assert [f.shape[-1] for f in sel("at")] == [2, 3, 4]
  assert [f.shape[-1] for f in sel("sp")] == [4]
  assert sel("rkd").shape == (2, 4)
  with pytest.raises(ValueError):
    sel("kd")


def test_low_precision_inputs_compute_in_float32():
  s, t = _small_batch(10)
  s16 = [a.astype(jnp.bfloat16) for a in s]
  t32 = [a.astype(jnp.float32) for a in t]
  assert fl.at_loss(s16, t32).dtype == jnp.float32
  ps, pt = _small_batch(11, pooled=True)
  loss = jax.jit(fl.pkt_loss)(ps.astype(jnp.bfloat16), pt.astype(jnp.float32))
  assert loss.dtype == jnp.float32 and np.isfinite(loss)


# ---------------------------------------------------------------------------
# Golden values (see the module docstring for how they were produced).

GOLDEN = {
  'at': {
    'grads': [
      {'norm': 1.8165829349266609e-06, 'sum': -4.490450399767691e-05,
       'entries': [((0, 0, 0, 0), 1.0675544985160846e-10),
                   ((2, 32, 16, 16), -1.5782507092421632e-09),
                   ((3, 63, 31, 31), 6.788364371070628e-09)]},
      {'norm': 7.65827534735478e-06, 'sum': -9.45675439230643e-05,
       'entries': [((0, 0, 0, 0), 3.274379404572129e-11),
                   ((2, 64, 8, 8), -1.787747002351859e-08),
                   ((3, 127, 15, 15), -4.2888553311761426e-09)]},
      {'norm': 2.564137080564981e-05, 'sum': -0.0001278316416830014,
       'entries': [((0, 0, 0, 0), -6.6098303289089e-08),
                   ((2, 128, 4, 4), 2.1537374408763276e-07),
                   ((3, 255, 7, 7), -1.5087739760567228e-07)]},
    ],
    'loss': 0.000358442154053068,
  },
  'at_pool': {
    'grads': [
      {'norm': 0.0035080889953525572, 'sum': -0.01125532880497741,
       'entries': [((0, 0, 0, 0), 0.0004470934471008118),
                   ((2, 4, 4, 4), -3.689980200844502e-05),
                   ((3, 7, 7, 7), 8.18078235475895e-05)]},
      {'norm': 0.0055824857200616395, 'sum': -0.017312360621491003,
       'entries': [((0, 0, 0, 0), -2.620683910044992e-05),
                   ((2, 3, 2, 2), -0.00012196917654729826),
                   ((3, 5, 3, 3), -3.230189662833186e-05)]},
      {'norm': 0.003420832589106547, 'sum': -0.006143142543134785,
       'entries': [((0, 0, 0, 0), 1.6305616831457914e-05),
                   ((2, 2, 3, 3), 5.0507575983822896e-05),
                   ((3, 4, 5, 5), -4.346357116107919e-05)]},
    ],
    'loss': 0.05440569615761329,
  },
  'convreg_conv_s2': {
    'grads': [
      {'norm': 0.11892701850664991, 'sum': 0.007057670405606106,
       'entries': [((0, 0, 0, 0), -0.005773569333142642),
                   ((2, 1, 4, 4), 6.416167157624219e-05),
                   ((3, 2, 7, 7), 0.0014751047993303153)]},
    ],
    'kind': 'Conv2d',
    'loss': 0.9100273867575556,
    'param_grads': {
      'bn.bias':
        {'norm': 0.10160301150214175, 'sum': 0.08427253788416361,
         'entries': [((0,), -0.011913547442790828),
                     ((2,), 0.05767429641529428),
                     ((4,), 0.005100041564816825)]},
      'bn.weight':
        {'norm': 0.2510325642312395, 'sum': 0.4540199584944129,
         'entries': [((0,), 0.06562759194560999),
                     ((2,), 0.15689220407569118),
                     ((4,), 0.0827929833519241)]},
      'conv.bias':
        {'norm': 3.1627201344192954e-16, 'sum': 2.0816681711721685e-17,
         'entries': [((0,), 0.0),
                     ((2,), 2.498001805406602e-16),
                     ((4,), -3.469446951953614e-17)]},
      'conv.weight':
        {'norm': 0.45818528683577386, 'sum': 0.9027878024273479,
         'entries': [((0, 0, 0, 0), -0.019319122664998748),
                     ((2, 1, 1, 1), 0.05154372606688088),
                     ((4, 2, 2, 2), 0.026184278461056188)]},
    },
    'running_mean_sum': 0.20763054128287645,
    'running_var_sum': 4.641913733048595,
  },
  'convreg_transpose': {
    'grads': [
      {'norm': 0.054244248123506866, 'sum': -0.011673214195989701,
       'entries': [((0, 0, 0, 0), -0.005007240549509857),
                   ((2, 1, 2, 2), -0.0012130564390791623),
                   ((3, 2, 3, 3), 0.0032600873276095194)]},
    ],
    'kind': 'ConvTranspose2d',
    'loss': 0.9235531297091045,
    'param_grads': {
      'bn.bias':
        {'norm': 0.10507557651739992, 'sum': 0.152858713403611,
         'entries': [((0,), 0.0953544825153512),
                     ((2,), 0.02204364408607389),
                     ((4,), 0.020394174485134517)]},
      'bn.weight':
        {'norm': 0.2910911934063145, 'sum': 0.5921247660832389,
         'entries': [((0,), 0.22461080305426595),
                     ((2,), 0.09972701475839711),
                     ((4,), 0.08505078736952473)]},
      'conv.bias':
        {'norm': 2.960284137294211e-16, 'sum': -1.0234868508263162e-16,
         'entries': [((0,), 1.249000902703301e-16),
                     ((2,), 4.85722573273506e-17),
                     ((4,), 0.0)]},
      'conv.weight':
        {'norm': 0.5349812897324746, 'sum': 1.7752720384287022,
         'entries': [((0, 0, 0, 0), -0.0014472942067742115),
                     ((1, 2, 2, 2), 0.037896000834760246),
                     ((2, 4, 3, 3), -0.012447955353733296)]},
    },
    'running_mean_sum': 0.03640454999320763,
    'running_var_sum': 4.6074959601582695,
  },
  'convreg_valid': {
    'grads': [
      {'norm': 0.13160841941063786, 'sum': -2.7755575615628914e-17,
       'entries': [((0, 0, 0, 0), -0.0011037563506528952),
                   ((2, 1, 3, 3), 0.013945575070906916),
                   ((3, 2, 5, 5), 0.002069823808991469)]},
    ],
    'kind': 'Conv2d',
    'loss': 0.8296223567950729,
    'param_grads': {
      'bn.bias':
        {'norm': 0.0762160381488973, 'sum': 0.005242927095555738,
         'entries': [((0,), -0.04543324576787399),
                     ((2,), 0.027608646395045608),
                     ((4,), 0.026514227782041377)]},
      'bn.weight':
        {'norm': 0.17565810355574743, 'sum': 0.3258531916663596,
         'entries': [((0,), 0.007617247547242398),
                     ((2,), 0.08910995919416884),
                     ((4,), 0.1010103464637561)]},
      'conv.bias':
        {'norm': 1.8190831804342462e-16, 'sum': -8.586881206085195e-17,
         'entries': [((0,), -1.0408340855860843e-17),
                     ((2,), -1.6653345369377348e-16),
                     ((4,), 2.0816681711721685e-17)]},
      'conv.weight':
        {'norm': 0.41012559103317325, 'sum': 0.49525504851620045,
         'entries': [((0, 0, 0, 0), 0.03585407641692031),
                     ((2, 1, 1, 1), 0.007194102236684867),
                     ((4, 2, 2, 2), 0.02998351171543469)]},
    },
    'running_mean_sum': 0.24998024128429422,
    'running_var_sum': 4.6400219424894065,
  },
  'fitnet': {
    'grads': [
      {'norm': 0.0057980738336522826, 'sum': 8.760353553682876e-17,
       'entries': [((0, 0, 0, 0), 1.0769516561147115e-06),
                   ((2, 64, 8, 8), 3.329855223987759e-05),
                   ((3, 127, 15, 15), 9.03406356386383e-06)]},
    ],
    'kind': 'Conv2d',
    'loss': 0.9143342672304101,
    'param_grads': {
      'bn.bias':
        {'norm': 0.022011733426167582, 'sum': 0.010794094911061041,
         'entries': [((0,), 0.0007829165238792323),
                     ((64,), 0.002585075721645217),
                     ((127,), 0.0008126236316513702)]},
      'bn.weight':
        {'norm': 0.04350745662660841, 'sum': 0.36926518298101907,
         'entries': [((0,), 0.003945144574747864),
                     ((64,), 0.005941579441296658),
                     ((127,), 0.0035144363475987485)]},
      'conv.bias':
        {'norm': 4.8640591246799707e-17, 'sum': -4.7110278460389676e-17,
         'entries': [((0,), 2.3242584072658e-18),
                     ((64,), -2.520770051028798e-18),
                     ((127,), -2.0328790734103208e-19)]},
      'conv.weight':
        {'norm': 0.020144509776895674, 'sum': 0.24692421354100336,
         'entries': [((0, 0, 0, 0), 0.00012358009107923699),
                     ((64, 64, 0, 0), 0.00018501969024284267),
                     ((127, 127, 0, 0), 0.00017883708602554714)]},
    },
    'running_mean_sum': -1.196550394254252,
    'running_var_sum': 133.26556967634377,
  },
  'kdsvd': {
    'grads': [
      {'norm': 6.882989057504285e-07, 'sum': -4.327448292867573e-06,
       'entries': [((0, 0, 0, 0), 6.332408016168102e-10),
                   ((2, 32, 16, 16), -9.896934987072397e-10),
                   ((3, 63, 31, 31), 8.565491841570902e-11)]},
      {'norm': 2.9192146669131515e-06, 'sum': -1.3955856718183887e-05,
       'entries': [((0, 0, 0, 0), 3.695383022011315e-10),
                   ((2, 64, 8, 8), -7.818998089435687e-10),
                   ((3, 127, 15, 15), 7.179049902649522e-10)]},
      {'norm': 2.4781268364912088e-06, 'sum': -8.885014408267628e-06,
       'entries': [((0, 0, 0, 0), 7.597756608484852e-10),
                   ((2, 128, 4, 4), 3.115342729109548e-09),
                   ((3, 255, 7, 7), 2.160423233723376e-09)]},
    ],
    'loss': 1.8906583389574657e-05,
  },
  'kdsvd_k2': {
    'grads': [
      {'norm': 0.0004889206813751635, 'sum': -8.411569453656505e-05,
       'entries': [((0, 0, 0, 0), 1.2770410636706743e-05),
                   ((2, 3, 4, 4), -4.489654658700931e-06),
                   ((3, 5, 7, 7), 1.6746735999671497e-06)]},
      {'norm': 0.012997938029684564, 'sum': 0.00022997252341664992,
       'entries': [((0, 0, 0, 0), 0.0003502807492580077),
                   ((2, 5, 3, 3), 2.3249208949843897e-06),
                   ((3, 9, 5, 5), -7.240358923977457e-06)]},
      {'norm': 0.0007933767102303028, 'sum': -2.8843238588146013e-06,
       'entries': [((0, 0, 0, 0), 5.024206051139397e-06),
                   ((2, 6, 2, 2), 2.535722006500434e-05),
                   ((3, 11, 4, 4), 5.929955018546151e-05)]},
    ],
    'loss': 0.0023559322066386283,
  },
  'nst': {
    'grads': [
      {'norm': 0.0005289223608229717, 'sum': -0.009504074243661483,
       'entries': [((0, 0, 0, 0), 2.0435452617290913e-07),
                   ((2, 32, 16, 16), 3.9548055358609903e-07),
                   ((3, 63, 31, 31), 6.975513994805718e-07)]},
      {'norm': 0.0005283633644994484, 'sum': -0.0067982971869579596,
       'entries': [((0, 0, 0, 0), -1.571667823677743e-07),
                   ((2, 64, 8, 8), -6.906121817749454e-07),
                   ((3, 127, 15, 15), -1.436750042859908e-06)]},
      {'norm': 0.00046456498682520043, 'sum': -0.0012865377679808399,
       'entries': [((0, 0, 0, 0), -1.7227924968411543e-06),
                   ((2, 128, 4, 4), 3.628432431882365e-06),
                   ((3, 255, 7, 7), -3.7762156462036434e-06)]},
    ],
    'loss': 0.031451793926279836,
  },
  'nst_pool': {
    'grads': [
      {'norm': 0.022619749469097002, 'sum': 0.05525892036784169,
       'entries': [((0, 0, 0, 0), 0.00015453053146960785),
                   ((2, 4, 4, 4), -0.00020497497684514348),
                   ((3, 7, 7, 7), -7.069815855422824e-05)]},
      {'norm': 0.0470530963519586, 'sum': -0.3689200454434639,
       'entries': [((0, 0, 0, 0), -0.0015372771287661185),
                   ((2, 3, 2, 2), -0.0032987203993566144),
                   ((3, 5, 3, 3), -0.0006730670991937336)]},
      {'norm': 0.02261122005638674, 'sum': 0.05900283370156772,
       'entries': [((0, 0, 0, 0), 0.00036151223179031755),
                   ((2, 2, 3, 3), 0.000911543653487124),
                   ((3, 4, 5, 5), 2.0209150521494394e-05)]},
    ],
    'loss': 0.4936056796336785,
  },
  'pkt': {
    'grads': [
      {'norm': 0.000461107811844767, 'sum': -1.1160264640065038e-06,
       'entries': [((0, 0), -6.817267619664874e-06),
                   ((2, 128), 7.3995680912753304e-06),
                   ((3, 255), 4.253211369015475e-06)]},
    ],
    'loss': 0.0005457488693969192,
  },
  'rkd': {
    'grads': [
      {'norm': 0.06140076757138142, 'sum': -2.0816681711721685e-17,
       'entries': [((0, 0), -0.0006246418430171575),
                   ((2, 128), 0.0025167024750806562),
                   ((3, 255), 0.0008169699934712706)]},
    ],
    'loss': 0.06833172853058647,
  },
  'rkd_squared': {
    'grads': [
      {'norm': 0.1307430877814542, 'sum': 0.0,
       'entries': [((0, 0), -0.001369954450362733),
                   ((2, 128), 0.005666569247928446),
                   ((3, 255), 0.001485722316421057)]},
    ],
    'loss': 0.14228222838261328,
  },
  'sp': {
    'grads': [
      {'norm': 1.1355002439775255e-05, 'sum': 4.823664647756669e-05,
       'entries': [((0, 0, 0, 0), 7.842132009292745e-08),
                   ((2, 128, 4, 4), 4.213591256764285e-08),
                   ((3, 255, 7, 7), -4.3371086353996303e-08)]},
    ],
    'loss': 8.072373689898905e-06,
  },
  'vid': {
    'grads': [
      {'norm': 0.00031110481562910775, 'sum': -0.002395764351885433,
       'entries': [((0, 0, 0, 0), -1.704332707464925e-07),
                   ((2, 32, 16, 16), 9.527853489675476e-07),
                   ((3, 63, 31, 31), 4.012150107914875e-07)]},
      {'norm': 0.0003273206252719412, 'sum': 0.012667425419440537,
       'entries': [((0, 0, 0, 0), 4.643344901218616e-07),
                   ((2, 64, 8, 8), -4.920501714866688e-07),
                   ((3, 127, 15, 15), 1.2871636273942515e-06)]},
      {'norm': 0.0005679449355802282, 'sum': 0.001119141056809218,
       'entries': [((0, 0, 0, 0), -1.773507436966922e-06),
                   ((2, 128, 4, 4), 1.5027448644233923e-06),
                   ((3, 255, 7, 7), -3.788859676265721e-06)]},
    ],
    'init_log_scale': 4.9932291827136215,
    'log_scale_grads': [
      {'norm': 0.05629998025937846, 'sum': -0.05279012452894465,
       'entries': [((0,), -0.0016081907754884432),
                   ((32,), 0.001658494637307749),
                   ((63,), 0.0018201849737023556)]},
      {'norm': 0.019993422553610935, 'sum': -0.04251330785478391,
       'entries': [((0,), -0.00023874899539986163),
                   ((64,), -0.0002541988521786189),
                   ((127,), -0.0019797532548840413)]},
      {'norm': 0.02470162734592185, 'sum': -0.07570858382664275,
       'entries': [((0,), -0.00025849850532640856),
                   ((128,), 9.596709718109382e-05),
                   ((255,), -0.007751145830359594)]},
    ],
    'loss': 1.8047237484772396,
    'weight_grads': [
      {
        'w0':
          {'norm': 0.1513241890904321, 'sum': -0.8906214576845646,
           'entries': [((0, 0, 0, 0), -0.0004883388413232065),
                       ((32, 32, 0, 0), -0.000835241541862026),
                       ((63, 63, 0, 0), 2.3644765472844883e-05)]},
        'w2':
          {'norm': 0.15781497542807965, 'sum': 0.42843686215003257,
           'entries': [((0, 0, 0, 0), 4.6122790458398386e-05),
                       ((32, 32, 0, 0), 9.150445298088106e-08),
                       ((63, 63, 0, 0), 0.012407306215215918)]},
        'w4':
          {'norm': 0.180172732358851, 'sum': -5.353019294720756,
           'entries': [((0, 0, 0, 0), -1.905878075558484e-05),
                       ((32, 32, 0, 0), -3.2721866830840924e-08),
                       ((63, 63, 0, 0), -0.001090876530471569)]},
      },
      {
        'w0':
          {'norm': 0.09972479898273255, 'sum': 1.0464865246782293,
           'entries': [((0, 0, 0, 0), 0.000863034079561631),
                       ((64, 64, 0, 0), 3.382170366155808e-05),
                       ((127, 127, 0, 0), 5.385869119897646e-06)]},
        'w2':
          {'norm': 0.10357854821882542, 'sum': 1.3494553267945735,
           'entries': [((0, 0, 0, 0), -0.0005052489862261217),
                       ((64, 64, 0, 0), 6.676745066535277e-06),
                       ((127, 127, 0, 0), -1.0579658946062776e-07)]},
        'w4':
          {'norm': 0.12050831231270653, 'sum': -8.766440401365214,
           'entries': [((0, 0, 0, 0), -0.0004716018599615194),
                       ((64, 64, 0, 0), -8.995545398905077e-05),
                       ((127, 127, 0, 0), -0.003936349394461574)]},
      },
      {
        'w0':
          {'norm': 0.1180393317996186, 'sum': 0.4872194626666242,
           'entries': [((0, 0, 0, 0), -8.454682086171191e-05),
                       ((128, 128, 0, 0), -0.0014024102613826312),
                       ((255, 255, 0, 0), -3.721929627021341e-05)]},
        'w2':
          {'norm': 0.14611257131193753, 'sum': 0.626821021898572,
           'entries': [((0, 0, 0, 0), -6.984020878868791e-05),
                       ((128, 128, 0, 0), -7.448450363019508e-06),
                       ((255, 255, 0, 0), -0.00022978172111438877)]},
        'w4':
          {'norm': 0.16782554222783377, 'sum': -19.691250317318925,
           'entries': [((0, 0, 0, 0), -9.307922416872905e-05),
                       ((128, 128, 0, 0), -1.9326804600308466e-05),
                       ((255, 255, 0, 0), -0.0074809932265465845)]},
      },
    ],
  },
  'vid_pool': {
    'grads': [
      {'norm': 0.001771019182430288, 'sum': 0.01921847676981675,
       'entries': [((0, 0, 0, 0), 1.7116291090325272e-05),
                   ((2, 4, 4, 4), -5.469198591710973e-06),
                   ((3, 7, 7, 7), -6.102597835274646e-05)]},
      {'norm': 0.0027743252470033624, 'sum': -0.014423985545412198,
       'entries': [((0, 0, 0, 0), -0.00023386211068114295),
                   ((2, 3, 2, 2), 0.00021244009222456869),
                   ((3, 5, 3, 3), 1.7988404782832688e-05)]},
      {'norm': 0.0022984387097676816, 'sum': -0.012828256531560993,
       'entries': [((0, 0, 0, 0), -6.509461017283816e-05),
                   ((2, 2, 3, 3), 1.9519000748674904e-06),
                   ((3, 4, 5, 5), 3.648123584381834e-07)]},
    ],
    'init_log_scale': 4.9932291827136215,
    'log_scale_grads': [
      {'norm': 0.048226306396864184, 'sum': 0.01388347418774841,
       'entries': [((0,), 0.014745078886591203),
                   ((4,), -0.03918267380830733),
                   ((7,), -0.004928286088537937)]},
      {'norm': 0.05189967073819792, 'sum': 0.125595338066648,
       'entries': [((0,), 0.019253096583001405),
                   ((3,), 0.019061027717491692),
                   ((5,), 0.01592314201016613)]},
      {'norm': 0.027282759034491056, 'sum': -0.00790211215955374,
       'entries': [((0,), 0.01447945854959136),
                   ((3,), -0.01883005113425253),
                   ((6,), -0.007195536491583481)]},
    ],
    'loss': 1.4615641318497445,
    'weight_grads': [
      {
        'w0':
          {'norm': 0.04237749852994981, 'sum': 0.15828272808134913,
           'entries': [((0, 0, 0, 0), 0.004830970460550801),
                       ((4, 4, 0, 0), -0.0031819834223169446),
                       ((7, 7, 0, 0), 0.0014877566266366076)]},
        'w2':
          {'norm': 0.0614537000335911, 'sum': -0.004863870697509418,
           'entries': [((0, 0, 0, 0), 0.0),
                       ((4, 4, 0, 0), 0.004067165744212661),
                       ((7, 7, 0, 0), -0.001050205213865126)]},
        'w4':
          {'norm': 0.1513912242707268, 'sum': -0.6468127839720139,
           'entries': [((0, 0, 0, 0), -3.2314405324021575e-05),
                       ((4, 4, 0, 0), -0.029255196596295927),
                       ((7, 7, 0, 0), -0.028369653762999672)]},
      },
      {
        'w0':
          {'norm': 0.05715426583463596, 'sum': -0.17493092580610592,
           'entries': [((0, 0, 0, 0), -0.016761301511271035),
                       ((3, 3, 0, 0), -0.004359614558645421),
                       ((5, 5, 0, 0), -0.013747489429680014)]},
        'w2':
          {'norm': 0.09085809629427277, 'sum': -0.22372097056203505,
           'entries': [((0, 0, 0, 0), -0.005234655339347525),
                       ((3, 3, 0, 0), -0.00028139571230300644),
                       ((5, 5, 0, 0), 0.0011024180388805416)]},
        'w4':
          {'norm': 0.09510275814100667, 'sum': -0.31924387829588785,
           'entries': [((0, 0, 0, 0), -0.001144483370350544),
                       ((3, 3, 0, 0), -0.000178409687923097),
                       ((5, 5, 0, 0), -0.03240793796536172)]},
      },
      {
        'w0':
          {'norm': 0.06441616882690904, 'sum': -0.21404526335100818,
           'entries': [((0, 0, 0, 0), -0.004334467152257226),
                       ((3, 2, 0, 0), -0.0017448640381725585),
                       ((6, 4, 0, 0), 0.0)]},
        'w2':
          {'norm': 0.03465375565775609, 'sum': -0.0487682091167774,
           'entries': [((0, 0, 0, 0), 0.0),
                       ((3, 3, 0, 0), 0.00015419283886464435),
                       ((6, 6, 0, 0), 0.0)]},
        'w4':
          {'norm': 0.04778940713956686, 'sum': -0.1305049646520584,
           'entries': [((0, 0, 0, 0), 0.0),
                       ((3, 3, 0, 0), -1.590241308755422e-05),
                       ((6, 6, 0, 0), -0.00013101535123859578)]},
      },
    ],
  },
}
