"""CRD (slkd_jax.methods.crd) against mdistiller's own code, and its sampler.

The golden values at the end of this file come from the reference, never from
our code: tests/goldens/gen_crd_goldens.py (run by hand, not by pytest) built
mdistiller's CRD modules with its own ``CRD.init_crd_modules`` and ran
``CRD.crd_loss`` (mdistiller/distillers/CRD.py at a08d46f) with torch 2.13 in
float64 on the inputs below (numpy ``default_rng``, seeds 0 and 1): B = 4
pooled features of resnet8x4 / resnet32x4 (256-d), feat_dim 128, N = 50,
K = 8, T = 0.07, momentum 0.5; Z unset (first batch) and Z set. Loss, Z,
gradient norms, sums, ramp-weighted sums and three entries per tensor, and the
updated memory must match to 1e-9 (relative; entries and sums relative to the
tensor's norm).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from slkd_jax import models
from slkd_jax.methods import crd
from slkd_jax.errors import ConfigError

RTOL = 1e-9
B, N, K, DIM_IN, FEAT_DIM = 4, 50, 8, 256, 128
T, MOMENTUM = 0.07, 0.5


# ---- input generator (verbatim from the generation script) ----------------
def make_inputs(seed):
  rng = np.random.default_rng(seed)
  stdv = 1.0 / np.sqrt(FEAT_DIM / 3)
  bound = 1.0 / np.sqrt(DIM_IN)
  return dict(
      f_s=rng.standard_normal((B, DIM_IN)),
      f_t=rng.standard_normal((B, DIM_IN)),
      w_s=rng.uniform(-bound, bound, (FEAT_DIM, DIM_IN)),
      b_s=rng.uniform(-bound, bound, FEAT_DIM),
      w_t=rng.uniform(-bound, bound, (FEAT_DIM, DIM_IN)),
      b_t=rng.uniform(-bound, bound, FEAT_DIM),
      memory_v1=rng.uniform(-stdv, stdv, (N, FEAT_DIM)),
      memory_v2=rng.uniform(-stdv, stdv, (N, FEAT_DIM)),
      index=np.array([3, 17, 25, 41]),
      negatives=rng.integers(0, N, (B, K)))


Z_SET = (61.5, 48.25)  # (Z_v1, Z_v2) of the "z_set" case
# ---------------------------------------------------------------------------

CASES = {"z_unset": (0, None), "z_set": (1, Z_SET)}


def embed_params(w, b):
  """Our Embed's parameters from PyTorch's Linear weight [out, in] / bias."""
  return {"params": {"linear": {"kernel": jnp.asarray(w.T),
                                "bias": jnp.asarray(b)}}}


def case_setup(name, dtype=jnp.float64):
  seed, z = CASES[name]
  x = make_inputs(seed)
  z = (-1.0, -1.0) if z is None else z
  memory = {"memory_s": jnp.asarray(x["memory_v1"], dtype),
            "memory_t": jnp.asarray(x["memory_v2"], dtype),
            "z_s": jnp.asarray(z[0], dtype), "z_t": jnp.asarray(z[1], dtype)}
  index = jnp.asarray(x["index"], jnp.int32)
  contrast_idx = jnp.concatenate(
      [index[:, None], jnp.asarray(x["negatives"], jnp.int32)], axis=1)
  params = (embed_params(x["w_s"], x["b_s"]), embed_params(x["w_t"], x["b_t"]))
  return x, memory, index, contrast_idx, params


def loss_fn(embed, f_t, memory, index, contrast_idx, mask=None):
  def f(f_s, p_s, p_t):
    return crd.crd_loss(
        f_s, f_t, memory, index, contrast_idx,
        embed_s=lambda a: embed.apply(p_s, a),
        embed_t=lambda a: embed.apply(p_t, a),
        temperature=T, momentum=MOMENTUM, mask=mask)
  return f


def assert_summary(g, want):
  g = np.asarray(g)
  scale = want["norm"]
  np.testing.assert_allclose(np.sqrt((g * g).sum()), want["norm"], rtol=RTOL)
  assert abs(g.sum() - want["sum"]) <= RTOL * scale
  ramp = np.linspace(-1.0, 1.0, g.size).reshape(g.shape)
  assert abs((g * ramp).sum() - want["ramp"]) <= RTOL * scale
  for i, v in want["entries"]:
    assert abs(g[tuple(i)] - v) <= RTOL * scale, (i, g[tuple(i)], v)


@pytest.fixture
def float64():
  with jax.enable_x64(True):
    yield


# ---------------------------------------------------------------------------
# Settings, Embed, memory.


def test_defaults_are_mdistillers():
  assert crd.CRD_DEFAULTS == dict(ce_weight=1.0, feat_weight=0.8,
                                  feat_dim=128, nce_k=16384, nce_t=0.07,
                                  nce_momentum=0.5, mode="exact")


def test_embed_init_is_torch_default_and_output_unit_norm():
  embed = crd.Embed(FEAT_DIM)
  x = jax.random.normal(jax.random.key(1), (3, 4, 4, 16))  # flattens to 256
  params = embed.init(jax.random.key(0), x)["params"]["linear"]
  bound = 1.0 / np.sqrt(256)
  kernel, bias = np.asarray(params["kernel"]), np.asarray(params["bias"])
  assert kernel.shape == (256, FEAT_DIM) and bias.shape == (FEAT_DIM,)
  assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
  # uniform(±bound): std bound/√3 (32 768 draws: within 2%).
  np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3), rtol=0.02)
  assert np.abs(bias).max() > 0.8 * bound
  y = embed.apply({"params": {"linear": params}}, x)
  assert y.shape == (3, FEAT_DIM)
  np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(
      y, embed.apply({"params": {"linear": params}}, x.reshape(3, -1)))


def test_make_embeds_names():
  modules = crd.make_embeds(64)
  assert set(modules) == {"embed_s", "embed_t"}
  assert modules["embed_t"].feat_dim == 64


def test_pooled_feature_dim_of_the_crd_pair():
  # CFG.CRD.FEAT.STUDENT_DIM / TEACHER_DIM = 256: resnet8x4 / resnet32x4.
  assert crd.pooled_feature_dim(models.create("resnet8x4"), 32) == 256
  assert crd.pooled_feature_dim(models.create("resnet32x4"), 32) == 256


def test_init_memory_distribution():
  memory = crd.init_memory(jax.random.key(0), 400, FEAT_DIM)
  stdv = 1.0 / np.sqrt(FEAT_DIM / 3)
  for name in ("memory_s", "memory_t"):
    bank = np.asarray(memory[name])
    assert bank.shape == (400, FEAT_DIM) and bank.dtype == np.float32
    assert np.abs(bank).max() <= stdv and np.abs(bank).max() > 0.99 * stdv
    np.testing.assert_allclose(bank.std(), stdv / np.sqrt(3), rtol=0.02)
  assert not np.allclose(memory["memory_s"], memory["memory_t"])
  assert float(memory["z_s"]) == float(memory["z_t"]) == -1.0


def test_memory_bytes():
  assert crd.memory_bytes(50_000, 128) == 2 * 50_000 * 128 * 4 + 8
  # ImageNet: 2 × 656 MB per device.
  assert crd.memory_bytes(1_281_167, 128) == 2 * 655_957_504 + 8
  memory = crd.init_memory(jax.random.key(0), 30, 16)
  assert crd.memory_bytes(30, 16) == sum(a.nbytes for a in memory.values())


# ---------------------------------------------------------------------------
# Contrast indices.


def test_build_class_table():
  labels = np.array([2, 0, 2, 1, 0, 2, 2])
  table = crd.build_class_table(labels)
  np.testing.assert_array_equal(table.sorted_indices, [1, 4, 3, 0, 2, 5, 6])
  np.testing.assert_array_equal(table.offsets, [0, 2, 3])
  np.testing.assert_array_equal(table.counts, [2, 1, 4])
  assert (table.num_examples, table.min_negatives,
          table.max_negatives) == (7, 3, 6)


def _check_exact(ci, index, labels_all, k, distinct):
  ci, labels_all = np.asarray(ci), np.asarray(labels_all)
  assert ci.shape == (len(index), k + 1) and ci.dtype == np.int32
  np.testing.assert_array_equal(ci[:, 0], index)
  own = labels_all[np.asarray(index)][:, None]
  assert (labels_all[ci[:, 1:]] != own).all()  # no same-class negative
  assert ((ci >= 0) & (ci < len(labels_all))).all()
  for row, d in zip(ci[:, 1:], distinct):
    if d:
      assert len(set(row.tolist())) == k


def test_exact_sampling_balanced_uniform_and_deterministic():
  labels = np.repeat(np.arange(6), 10)  # N = 60, 50 negatives per class
  table = crd.build_class_table(labels)
  rng = np.random.default_rng(0)
  index = jnp.asarray(rng.permutation(60)[:12], jnp.int32)
  sample = jax.jit(crd.sample_contrast_indices, static_argnums=(4, 5))
  ci = sample(jax.random.key(0), index, jnp.asarray(labels)[index], table,
              20, "exact")
  _check_exact(ci, index, labels, 20, [True] * 12)
  again = sample(jax.random.key(0), index, jnp.asarray(labels)[index], table,
                 20, "exact")
  np.testing.assert_array_equal(ci, again)
  other = sample(jax.random.key(1), index, jnp.asarray(labels)[index], table,
                 20, "exact")
  assert (np.asarray(other) != np.asarray(ci)).any()
  # Coverage: 600 rows of class 0 draw 20 of its 50 negatives each, so every
  # negative appears 240 ± 12 times; and column 1 (the order) is uniform too.
  index = jnp.zeros((600,), jnp.int32)
  ci = np.asarray(sample(jax.random.key(2), index, jnp.zeros((600,), jnp.int32),
                         table, 20, "exact"))
  counts = np.bincount(ci[:, 1:].ravel(), minlength=60)
  assert counts[:10].sum() == 0
  assert counts[10:].min() > 180 and counts[10:].max() < 300
  first = np.bincount(ci[:, 1], minlength=60)[10:]  # 12 ± 3.4 each
  assert first.max() < 30 and (first > 0).sum() > 45


def test_exact_sampling_unbalanced_with_and_without_replacement():
  labels = np.array([0] * 5 + [1] * 20 + [2] * 3)  # negatives 23 / 8 / 25
  table = crd.build_class_table(labels)
  index = jnp.arange(28, dtype=jnp.int32)
  lab = jnp.asarray(labels)
  for k in (6, 8):  # every class has ≥ k negatives: all distinct
    ci = crd.sample_contrast_indices(jax.random.key(k), index, lab, table, k)
    _check_exact(ci, index, labels, k, [True] * 28)
  # k = 10: class 1 has only 8 negatives → with replacement there (all 8
  # seen across its 20 rows), distinct elsewhere.
  ci = crd.sample_contrast_indices(jax.random.key(3), index, lab, table, 10)
  _check_exact(ci, index, labels, 10, labels != 1)
  class1 = np.asarray(ci)[5:25, 1:]
  assert set(class1.ravel().tolist()) == set(range(5)) | {25, 26, 27}
  assert any(len(set(r.tolist())) < 10 for r in class1)
  # k = 30 > every class's negatives: all with replacement.
  ci = crd.sample_contrast_indices(jax.random.key(4), index, lab, table, 30)
  _check_exact(ci, index, labels, 30, [False] * 28)


def test_relax_sampling_positive_of_same_class():
  labels = np.repeat(np.arange(4), 8)
  table = crd.build_class_table(labels)
  index = jnp.asarray(np.tile(np.arange(0, 32, 8), 25), jnp.int32)  # 100
  lab = jnp.asarray(labels)[index]
  ci = np.asarray(crd.sample_contrast_indices(jax.random.key(0), index, lab,
                                              table, 5, "relax"))
  np.testing.assert_array_equal(labels[ci[:, 0]], np.asarray(lab))
  assert (ci[:, 0] != np.asarray(index)).any()  # a random same-class one
  assert len(set(ci[:, 0].tolist())) == 32  # 25 draws per class of 8
  assert (labels[ci[:, 1:]] != np.asarray(lab)[:, None]).all()


def test_bad_mode_is_a_config_error():
  table = crd.build_class_table(np.arange(4) % 2)
  with pytest.raises(ConfigError, match="mode"):
    crd.sample_contrast_indices(jax.random.key(0), jnp.zeros(2, jnp.int32),
                                jnp.zeros(2, jnp.int32), table, 1, "approx")


# ---------------------------------------------------------------------------
# Loss and memory update against mdistiller.


@pytest.mark.parametrize("name", sorted(CASES))
def test_crd_loss_matches_mdistiller(float64, name):
  x, memory, index, contrast_idx, (p_s, p_t) = case_setup(name)
  g = GOLDENS[name]
  embed = crd.Embed(FEAT_DIM, jnp.float64)
  f_t = jnp.asarray(x["f_t"])
  f = loss_fn(embed, f_t, memory, index, contrast_idx)
  (loss, new), grads = jax.jit(jax.value_and_grad(
      f, argnums=(0, 1, 2), has_aux=True))(jnp.asarray(x["f_s"]), p_s, p_t)
  np.testing.assert_allclose(float(loss), g["loss"], rtol=RTOL)
  np.testing.assert_allclose(float(new["z_s"]), g["z_v1"], rtol=RTOL)
  np.testing.assert_allclose(float(new["z_t"]), g["z_v2"], rtol=RTOL)
  assert_summary(grads[0], g["grad_f_s"])
  assert_summary(grads[1]["params"]["linear"]["kernel"].T, g["grad_w_s"])
  assert_summary(grads[1]["params"]["linear"]["bias"], g["grad_b_s"])
  assert_summary(grads[2]["params"]["linear"]["kernel"].T, g["grad_w_t"])
  assert_summary(grads[2]["params"]["linear"]["bias"], g["grad_b_t"])
  for ours, theirs, old in (("memory_s", "memory_v1", x["memory_v1"]),
                            ("memory_t", "memory_v2", x["memory_v2"])):
    bank = np.asarray(new[ours])
    assert_summary(bank[x["index"]], g[f"{theirs}_rows"])
    np.testing.assert_allclose(bank.sum(), g[f"{theirs}_sum"], rtol=RTOL)
    others = np.setdiff1d(np.arange(N), x["index"])
    np.testing.assert_array_equal(bank[others], old[others])
  # The teacher's features get no gradient (mdistiller: no_grad).
  g_t = jax.grad(lambda ft: loss_fn(embed, ft, memory, index, contrast_idx)(
      jnp.asarray(x["f_s"]), p_s, p_t)[0])(f_t)
  assert not np.asarray(g_t).any()


def test_no_gradient_through_memory(float64):
  x, memory, index, contrast_idx, (p_s, p_t) = case_setup("z_set")
  embed = crd.Embed(FEAT_DIM, jnp.float64)

  def loss_of_memory(mem):
    return loss_fn(embed, jnp.asarray(x["f_t"]), mem, index, contrast_idx)(
        jnp.asarray(x["f_s"]), p_s, p_t)[0]

  grads = jax.grad(loss_of_memory)(memory)
  assert not any(np.asarray(v).any() for v in grads.values())


@pytest.mark.parametrize("name", sorted(CASES))
def test_mask_equals_the_smaller_batch(float64, name):
  x, memory, index, contrast_idx, (p_s, p_t) = case_setup(name)
  embed = crd.Embed(FEAT_DIM, jnp.float64)
  f_s, f_t = jnp.asarray(x["f_s"]), jnp.asarray(x["f_t"])
  mask = jnp.array([True, True, False, True])
  keep = np.array([0, 1, 3])
  grad = jax.value_and_grad(lambda *a: a[0](*a[1:]), argnums=(1, 2),
                            has_aux=True)
  (loss, new), (g_fs, g_ps) = grad(
      loss_fn(embed, f_t, memory, index, contrast_idx, mask), f_s, p_s, p_t)
  (loss_r, new_r), (g_fs_r, g_ps_r) = grad(
      loss_fn(embed, f_t[keep], memory, index[keep], contrast_idx[keep]),
      f_s[keep], p_s, p_t)
  np.testing.assert_allclose(loss, loss_r, rtol=1e-12)
  np.testing.assert_allclose(g_fs[keep], g_fs_r, rtol=1e-10, atol=1e-14)
  assert not np.asarray(g_fs[2]).any()
  np.testing.assert_allclose(g_ps["params"]["linear"]["kernel"],
                             g_ps_r["params"]["linear"]["kernel"],
                             rtol=1e-10, atol=1e-14)
  for key in new:  # Z from the real rows; the masked row writes nothing
    np.testing.assert_allclose(new[key], new_r[key], rtol=1e-12)
  np.testing.assert_array_equal(new["memory_s"][x["index"][2]],
                                memory["memory_s"][x["index"][2]])


def test_sharded_batch_equals_one_device():
  if jax.device_count() < 4:
    pytest.skip("needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_"
                "count=8)")
  mesh = Mesh(np.asarray(jax.devices()[:4]), ("data",))
  rng = np.random.default_rng(5)
  batch, n, k, dim = 8, 40, 6, 32
  labels = rng.integers(0, 5, n)
  table = crd.build_class_table(labels, 5)
  index = jnp.asarray(rng.permutation(n)[:batch], jnp.int32)
  embed = crd.Embed(16)
  params = embed.init(jax.random.key(0), jnp.zeros((1, dim)))
  memory = crd.init_memory(jax.random.key(1), n, 16)
  f_s = jnp.asarray(rng.standard_normal((batch, dim)), jnp.float32)
  f_t = jnp.asarray(rng.standard_normal((batch, dim)), jnp.float32)
  mask = jnp.arange(batch) < 7

  def step(key, f_s, f_t, index, labels, mask, memory):
    ci = crd.sample_contrast_indices(key, index, labels, table, k)
    bound = lambda a: embed.apply(params, a)
    return crd.crd_loss(f_s, f_t, memory, index, ci, embed_s=bound,
                        embed_t=bound, mask=mask)

  args = (jax.random.key(2), f_s, f_t, index, jnp.asarray(labels)[index],
          mask, memory)
  want = jax.jit(step)(*args)
  shard = NamedSharding(mesh, P("data"))
  rep = NamedSharding(mesh, P())
  placed = [jax.device_put(a, rep) for a in args[:1]] + [
      jax.device_put(a, shard) for a in args[1:6]] + [
      jax.device_put(args[6], rep)]
  got = jax.jit(step, out_shardings=rep)(*placed)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for key in want[1]:
    np.testing.assert_allclose(got[1][key], want[1][key], rtol=1e-6,
                               atol=1e-7)
  assert got[1]["memory_s"].sharding.is_fully_replicated


# Produced by tests/goldens/gen_crd_goldens.py (mdistiller a08d46f, torch
# 2.13, float64); see the module docstring.
GOLDENS = {
    'z_unset': {
        'loss': 8.133887668015662,
        'grad_f_s': {'sum': 0.11124611078386248, 'norm': 0.748863387181945, 'ramp': 0.09383187435835819, 'entries': [((0, 0), 0.004211114251096292), ((2, 128), 0.023168554205802994), ((3, 255), 0.026723079243233534)]},
        'grad_w_s': {'sum': 28.2130443704983, 'norm': 19.74928782156538, 'ramp': -8.941538569835961, 'entries': [((0, 0), -0.012594092100315665), ((64, 128), -0.15913242552860707), ((127, 255), 0.0025731675212752915)]},
        'grad_b_s': {'sum': -1.1736310528291725, 'norm': 1.2389668139302268, 'ramp': 1.0913928097585708, 'entries': [((0,), 0.03505046927029212), ((64,), 0.09842293099285951), ((127,), -0.056275319044350056)]},
        'grad_w_t': {'sum': 9.828836458789365, 'norm': 16.52053256180604, 'ramp': 0.333881430536187, 'entries': [((0, 0), 0.007844858983011105), ((64, 128), 0.025542836197577367), ((127, 255), 0.04636350040633534)]},
        'grad_b_t': {'sum': -1.3577354627070743, 'norm': 0.9552730711861187, 'ramp': -0.8531387976577143, 'entries': [((0,), -0.0018930634299574988), ((64,), -0.10101475745628546), ((127,), -0.06026101616476197)]},
        'z_v1': 201.75528980810475,
        'z_v2': 89.78622313125477,
        'memory_v1_rows': {'sum': 2.4189002058836264, 'norm': 2.0, 'ramp': 1.124444562863962, 'entries': [((0, 0), 0.06176882221355749), ((2, 64), 0.07463219099169077), ((3, 127), 0.0905356001342849)]},
        'memory_v2_rows': {'sum': -0.37961200107892124, 'norm': 2.0, 'ramp': -0.31596031683375414, 'entries': [((0, 0), -0.009851654486666922), ((2, 64), -0.11103092479376564), ((3, 127), -0.015399806725726866)]},
        'memory_v1_sum': 9.6300744324657,
        'memory_v2_sum': -18.05132078862499,
    },
    'z_set': {
        'loss': 6.6459050701713265,
        'grad_f_s': {'sum': -0.8263084033986761, 'norm': 0.5840433380430397, 'ramp': 0.18351344585779117, 'entries': [((0, 0), -0.00632431504014916), ((2, 128), 0.011851410810065244), ((3, 255), 0.003578434512296673)]},
        'grad_w_s': {'sum': 5.342551285930469, 'norm': 16.402361227172438, 'ramp': -1.7880667461764093, 'entries': [((0, 0), -0.037370816871177354), ((64, 128), 0.014308082483730226), ((127, 255), -0.09368654135423006)]},
        'grad_b_s': {'sum': -0.0512365360550997, 'norm': 1.0177479343172204, 'ramp': 0.042850190424822465, 'entries': [((0,), 0.045013792185748996), ((64,), 0.07589995694363727), ((127,), 0.036758580633521394)]},
        'grad_w_t': {'sum': -6.062291712173855, 'norm': 17.899610295751824, 'ramp': 5.414766505385681, 'entries': [((0, 0), 0.08230674419391251), ((64, 128), 0.31513249645817), ((127, 255), -0.015134084981006532)]},
        'grad_b_t': {'sum': -1.962852440343862, 'norm': 1.0906866491323282, 'ramp': -0.00923598821215868, 'entries': [((0,), 0.024745469958655418), ((64,), -0.07878463978014943), ((127,), 0.05470806357894732)]},
        'z_v1': 61.5,
        'z_v2': 48.25,
        'memory_v1_rows': {'sum': 2.1306200967347086, 'norm': 2.0, 'ramp': -0.31142782148628767, 'entries': [((0, 0), -0.04597137088384317), ((2, 64), -0.03790976289905692), ((3, 127), -0.010408862234472384)]},
        'memory_v2_rows': {'sum': 1.3917042625460267, 'norm': 2.0, 'ramp': 0.9391477958821899, 'entries': [((0, 0), -0.015108642965555799), ((2, 64), -0.04147088401411225), ((3, 127), 0.09934252936281893)]},
        'memory_v1_sum': 4.028699883438641,
        'memory_v2_sum': 4.195411181725977,
    },
}
