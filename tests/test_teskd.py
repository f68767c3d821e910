"""TESKD: the kuangliu CIFAR ResNet and its heads, the loss, the method row,
Nesterov SGD, the presets, best-after-epoch reporting and the backbone export.

Golden values come from TESKD's official code (github zhengli427/TESKD at
10817c7), never from ours: tests/goldens/gen_teskd_goldens.py (run by hand,
not by pytest) imported its models/resnet_our.py and distill_loss/KD.py and
ran them with torch 2.13 in float64 (parameter counts, state_dict layout
hash, an eval- and a train-mode forward of cifarresnet18 with deterministic
weights, and utils.train's loss on the TESKD specification's worked example).
"""

import dataclasses
import hashlib
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slkd_jax import artifact, methods, metrics, models, parallel, train
from slkd_jax import config as config_lib
from slkd_jax import config_checks
from slkd_jax import convert_torch as ct
from slkd_jax import stage as stage_lib
from slkd_jax import state as state_lib
from slkd_jax import torch_keys, train_step
from slkd_jax.methods import teskd
from slkd_jax.models import resnet_kuangliu as rk
from slkd_jax.models.layers import count_params


# ---- deterministic weights (verbatim from the golden script) --------------
def weights_for(key, shape):
  """A value for state_dict entry ``key``: seeded by the key with ``_`` read
  as ``.`` (so the official ``fuse_3.0`` and ``fuse.3.0`` agree)."""
  rng = np.random.RandomState(zlib.crc32(key.replace("_", ".").encode()))
  leaf = key.rsplit(".", 1)[-1]
  if len(shape) >= 2:
    bound = 1.0 / np.sqrt(np.prod(shape[1:]))
    return rng.uniform(-bound, bound, shape)
  if leaf in ("weight", "running_var"):
    return rng.uniform(0.5, 1.5, shape)
  return rng.uniform(-0.1, 0.1, shape)  # biases, running means


def images(batch, seed):
  return np.random.RandomState(seed).standard_normal((batch, 3, 32, 32))
# ---------------------------------------------------------------------------


# Official cifarresnet18 / 34 (100 classes): (parameters, BN buffers without
# num_batches_tracked) and sha256 of the sorted "key:shape" lines.
OFFICIAL = {
    "teskd_cifar_resnet18": ((37050832, 25984), "db8e63a288d24fe6ac3516165c7d536f9346d8967b00eb28295d7f763ab9a84a"),
    "teskd_cifar_resnet34": ((47158992, 33408), "9996840dd1c99bc22deacd78ecd74b9cf32ed2b6c51ec1f56dd7543fbfe02ee1"),
}

# cifarresnet18's 8 outputs (z_bb, z_b1, z_b2, z_b3, f̄, f_b3.., i.e. in the
# order t3, t2, t1 for the branches) on images(2, 0) in eval mode and
# images(4, 1) in train mode: (first 4 columns of each row, row sums, row
# L2 norms).
FORWARD = {
    'eval': [
        ([-0.14658954111704373, 0.0355621543478275, 0.10580751796919981, -0.21185079783152008, -0.15134202439249814, 0.03340216011727695, 0.09953178287598304, -0.21452695696349613],
         [-1.4721887263216533, -1.505332539240928],
         [0.9714048686585929, 0.9690590778828492]),
        ([-0.07454405297079059, 0.13135027754385484, -0.036987665171557, 0.045078555519945065, -0.07423814329997586, 0.1315977834528451, -0.037799813565864634, 0.04496632492374357],
         [0.012487248504585213, 0.01165686435683802],
         [0.694036736391428, 0.6940400389206697]),
        ([-0.09108771385444445, -0.031037817938829204, 0.10212381438672323, 0.088291071964806, -0.09061703639892649, -0.03141743030673955, 0.10183196708786008, 0.08989433932553745],
         [0.44281873120957993, 0.4485132864954664],
         [0.742133242401488, 0.7437291128129262]),
        ([-0.021651151069737223, 0.030609694825155163, 0.03984276504221359, -0.017158710795977333, -0.024978020397466758, 0.03255876077202785, 0.0384391146312273, -0.01631496018785024],
         [-0.18528879402293214, -0.19203961775046127],
         [0.7412317837409256, 0.7402075030977158]),
        ([0.16151902650523148, 0.042291678342232415, 0.1282156177616009, 0.24727883311864135, 0.16790366792674172, 0.03574389337046675, 0.13813524923877443, 0.2247595610037508],
         [45.36042612132951, 45.000749761501694],
         [3.0137938764544874, 2.9981361574269605]),
        ([0.061691690250427235, 0.0, 0.05950557679953246, 0.1197289166828592, 0.059993631203884915, 0.0, 0.059621454270029725, 0.11941450974582374],
         [24.716142556358943, 24.7222484406645],
         [2.0021035306799235, 2.002409512933904]),
        ([0.0013328268814584029, 0.11534988908551774, 0.0, 0.0652315219052036, 0.0017788037507692751, 0.11778741163842998, 0.0, 0.06509619767018053],
         [26.603894198980655, 26.622499896084353],
         [1.9958434888859484, 1.9977010706203906]),
        ([0.055348667994824435, 0.10969747364990809, 0.0, 0.03895463259420939, 0.0584515844146589, 0.11235261797850514, 0.0, 0.04598662582148981],
         [24.8392816598313, 24.911987604578165],
         [1.9479276729187336, 1.950278540518086]),
    ],
    'train': [
        ([-0.36034108431528206, 0.23080734766339434, 0.5987682145626987, -0.5346567062165123, -0.390200548913952, 0.4824384048241942, 0.5456282858200725, -0.5363016637954405, -0.4963298007746523, 0.28815402035186405, 0.6257020699002501, -0.546910765902734, -0.5195554293281129, 0.41026776403303783, 0.49448094746337545, -0.5198270977319442],
         [5.717267290157562, 5.004317670214646, 5.596963740525267, 4.335189396212547],
         [5.147055192451329, 5.001996729687263, 4.628170713685041, 5.335568789023453]),
        ([-0.4036511786566975, 0.14599759852706362, -0.08754829169915776, -0.09392343290426451, -0.12458620660214736, 0.22084178946381994, 0.05729024159830958, -0.1317718909174427, -0.3564290631746405, 0.18517127277746298, 0.07004208099999208, 0.006258913619297566, -0.25994633816911655, 0.15393460602282527, 0.09253604115234375, -0.08211279026689226],
         [-2.5273396737519285, -2.8803499552837457, -1.622538943351591, -2.9993457625294746],
         [2.780538547978981, 2.5877914120638605, 2.551226390482112, 2.6811001894088093]),
        ([-0.2082889228764798, 0.27480506555702905, 0.33162856165830934, -0.1521439810703335, 0.024066053806197096, 0.007000070663216366, 0.15486583902453097, -0.22865138525746403, -0.1527069091117118, 0.18145829936022453, 0.4635543230135171, -0.055805770430062324, 0.007087011993291813, 0.1398394754764353, 0.20623622730130142, 0.02753386359033045],
         [0.6936919698475454, -1.0866441447512227, 0.9196469479708422, 1.395760385492333],
         [2.6004460652392187, 2.7115903944631454, 2.548316320338447, 2.7375019536654746]),
        ([-0.04965406015014768, 0.13090477888520544, -0.17823217698636534, 0.1862678830443957, 0.2557109430265942, 0.03901304440582129, -0.10472680611484995, 0.1606734296646591, 0.3697652423461592, 0.24321353353006986, -0.10897798275035951, 0.1773060920830937, 0.2074846568515886, 0.06326820784457951, -0.011738268974118091, 0.2660160070703215],
         [-3.4536768142326184, -3.1360274100249095, -3.348545708290272, -2.5433931668538],
         [2.54063408623572, 2.2694720887389024, 2.706371446584728, 2.6015988610529743]),
        ([0.7317253570700248, 1.1523501183335743, 1.154588845098778, 0.6248425995333327, 1.0556627094208773, 1.1387312937696459, 1.8647402386346845, 0.7359798583401035, 0.8904778551048128, 0.8872704396623798, 0.8757850715731269, 0.6941255082555932, 1.0399622064900669, 1.1996183481650198, 1.3988479141399826, 0.5956404635509781],
         [426.18181503889514, 425.27785374070993, 411.5922624954023, 438.7225197735777],
         [19.6971384506123, 19.732494201920037, 19.039435136500686, 20.408759657728318]),
        ([0.5700400178631175, 0.554083802808975, 0.40734927865240117, 0.28776614572788084, 0.3146922980944531, 0.4709288479724969, 0.15826129805780687, 0.5178584147904254, 0.7672581363734713, 0.35599333841495207, 0.6028866112644107, 0.4354142907088049, 0.4435849535878331, 0.5338244392056165, 0.5038056100231963, 0.3827337375312115],
         [217.2147530990331, 215.9895064930576, 201.58298849851286, 209.1245574036258],
         [10.547293203814949, 10.424344303045345, 9.820121078064842, 10.189405827939485]),
        ([0.13178256890934728, 0.5404328223915249, 0.15553951986319992, 0.5039958661766208, 0.39152917155152606, 0.6214563171117888, 0.24386627566496544, 0.6080168808412874, 0.3693201693618463, 0.4161988525346867, 0.23433395249092603, 0.7772589981891732, 0.20312211314761552, 0.5215822947392601, 0.4147561818368309, 0.3421078219400617],
         [198.88412284807308, 210.0792735566477, 200.6164684342629, 210.03460109289466],
         [9.597186147455462, 10.177514035922632, 9.807348792133988, 10.166498254908566]),
        ([0.5652681636144021, 0.43396240649864526, 0.3648782529361535, 0.2566981358643696, 0.9179171808631779, 0.5792761509523976, 0.22391978448971867, 0.4685496100465422, 0.579694238331977, 0.7377567952870413, 0.476649437381642, 0.35322319392306883, 0.5347480967383511, 0.5098035253886533, 0.35946055384331715, 0.2587137981458875],
         [209.0750534448042, 194.30893710380553, 208.91023975068413, 208.59983450126492],
         [10.113185934526314, 9.451751940056901, 10.168243403779659, 10.125171607833117]),
    ],
}

# The specification's worked example and utils.train's loss on it (official
# KL_Loss(T=4), Fea_Loss, CrossEntropyLoss; weights 0.2 / 0.8 / 1e-7).
Y = np.array([2, 0])
Z_BB = np.array([[1, 2, 3], [0.5, -1, 2]], np.float64)
Z = np.array([[[2, 1, 0], [1, 1, 3]], [[0, .5, 1], [2, 0, -1]],
              [[1, -1, 0], [0, 1, 1]]], np.float64)
F_BB = np.array([[.5, 0, 1, 2], [1, 1, 0, .3]])
F = np.array([[[.4, .1, 1.2, 1.5], [.9, 1.1, 0, 0]],
              [[0, 0, .8, 2.2], [1.5, .7, .2, .1]],
              [[.6, .2, .9, 1.9], [.8, 1.3, 0, .5]]])
WORKED = {"ce": 5.457892225234227, "kl": 2.7183044752545777, "fea": 1.41,
          "loss": 3.2662221662505075}
GRAD_Z_BB = [[-0.5147588831095253, 0.0702399057315704, 0.4445189773779552],
             [-0.2502642998460159, -0.4176234529930713, 0.6678877528390877]]
GRAD_Z_BB_DETACHED = [
    [0.009003057317038043, 0.024472847105479766, -0.03347590442251782],
    [-0.08247096078599633, 0.003911257327068745, 0.0785597034589276]]
GRAD_Z = [[[0.3304501192381502, 0.02447284382348081, -0.3549229630616314],
           [-0.16002384156025548, 0.0992035485910715, 0.060820292969183926]],
          [[0.08001518798907678, 0.03889261729343448, -0.11890780528251133],
           [0.24483406404214383, 0.12827213059578071, -0.37310619463792466]],
          [[0.3304501192381503, -0.10654997776585358, -0.2239001414722967],
           [-0.1452239820607648, 0.2680629289271673, -0.12283894686640302]]]
GRAD_F = 1e-8 * np.array([[[-2, 2, 4, -10], [-2, 2, 0, -6]],
                          [[-10, 0, -4, 4], [10, -6, 4, -4]],
                          [[2, 4, -2, -2], [-4, 6, 0, 4]]])


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


# ---------------------------------------------------------------------------
# Align-corners bilinear ×2.

CLOSED_FORM = {
    1: [[1], [1]],
    2: [[1, 0], [2 / 3, 1 / 3], [1 / 3, 2 / 3], [0, 1]],
    3: [[1, 0, 0], [.6, .4, 0], [.2, .8, 0], [0, .8, .2], [0, .4, .6],
        [0, 0, 1]],
}


@pytest.mark.parametrize("n", sorted(CLOSED_FORM))
def test_align_corners_matrix_closed_form(n):
  np.testing.assert_allclose(rk.align_corners_matrix(n), CLOSED_FORM[n],
                             rtol=0, atol=1e-15)


@pytest.mark.parametrize("h,w", [(1, 1), (2, 3), (4, 4), (5, 2), (7, 8)])
def test_upsample_matches_torch_align_corners(h, w, x64):
  torch = pytest.importorskip("torch")
  x = np.random.RandomState(h * 10 + w).standard_normal((2, 3, h, w))
  want = torch.nn.functional.interpolate(
      torch.tensor(x), scale_factor=2, mode="bilinear",
      align_corners=True).numpy()
  got = rk.upsample_bilinear_2x(jnp.asarray(x.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want,
                             rtol=1e-13, atol=1e-14)
  # Not half-pixel centres (jax.image.resize), which differ here.
  if h > 1:
    half = jax.image.resize(jnp.asarray(x.transpose(0, 2, 3, 1)),
                            (2, 2 * h, 2 * w, 3), "bilinear")
    assert np.max(np.abs(np.asarray(half) - np.asarray(got))) > 1e-3


# ---------------------------------------------------------------------------
# Models and the converter.


def _abstract(arch):
  return ct.abstract_variables(arch, 100)


@pytest.mark.parametrize("arch", sorted(OFFICIAL))
def test_parameter_counts_match_the_official_model(arch):
  v = _abstract(arch)
  assert (count_params(v["params"]),
          count_params(v["batch_stats"])) == OFFICIAL[arch][0]
  backbone = _abstract(rk.BACKBONE_OF[arch])
  # The specification's table: backbones 11,220,132 / 21,328,292; heads
  # 25,830,700 either way.
  assert count_params(backbone["params"]) == {
      "teskd_cifar_resnet18": 11_220_132,
      "teskd_cifar_resnet34": 21_328_292}[arch]
  assert count_params(v["params"]) - count_params(backbone["params"]) == (
      25_830_700)


def official_state_dict(arch):
  """Our converter's PyTorch keys for ``arch`` renamed to the official
  attribute names (``fuse.k.`` → ``fuse_k.``), with deterministic weights
  and num_batches_tracked counters, as the official model's state_dict."""
  sd = {}
  for slot in torch_keys._slots(  # pylint: disable=protected-access
      _abstract(arch)):
    key = slot.torch_key
    for k in (1, 2, 3):
      key = key.replace(f"fuse.{k}.", f"fuse_{k}.")
    sd[key] = weights_for(key, slot.torch_shape)
    if key.endswith(".running_var"):
      sd[key.rsplit(".", 1)[0] + ".num_batches_tracked"] = np.array(7)
  return sd


def _layout_hash(sd):
  lines = sorted(f"{k}:{tuple(np.shape(v))}" for k, v in sd.items()
                 if "num_batches_tracked" not in k)
  return hashlib.sha256("\n".join(lines).encode()).hexdigest()


@pytest.mark.parametrize("arch", sorted(OFFICIAL))
def test_state_dict_layout_is_the_official_one(arch):
  assert _layout_hash(official_state_dict(arch)) == OFFICIAL[arch][1]


@pytest.fixture(scope="module")
def r18_variables():
  """teskd_cifar_resnet18 with the golden weights, converted (float64)."""
  return ct.convert_state_dict("teskd_cifar_resnet18",
                               official_state_dict("teskd_cifar_resnet18"),
                               dtype=np.float64)


def _outputs(out):
  return [out.logits, *out.branch_logits, out.pooled_feat,
          *out.branch_pooled]


def _check_fingerprint(outputs, golden):
  for got, (head, sums, norms) in zip(outputs, golden, strict=True):
    got = np.asarray(got)
    np.testing.assert_allclose(got[:, :4].ravel(), head, rtol=1e-9,
                               atol=1e-12)
    np.testing.assert_allclose(got.sum(1), sums, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), norms,
                               rtol=1e-9)


def test_forward_matches_the_official_model(r18_variables, x64):
  model = models.create("teskd_cifar_resnet18", 100, jnp.float64)
  x = jnp.asarray(images(2, 0).transpose(0, 2, 3, 1))
  out = model.apply(r18_variables, x, train=False, features=True)
  assert isinstance(out, rk.TeskdOutputs)
  _check_fingerprint(_outputs(out), FORWARD["eval"])
  # features=False is the plain backbone.
  np.testing.assert_array_equal(
      model.apply(r18_variables, x, train=False), out.logits)
  x = jnp.asarray(images(4, 1).transpose(0, 2, 3, 1))
  out, _ = model.apply(r18_variables, x, train=True, features=True,
                       mutable=["batch_stats"])
  _check_fingerprint(_outputs(out), FORWARD["train"])


def test_deployed_backbone_gives_the_backbone_logits(r18_variables, x64):
  variables, arch = methods.get("teskd").deployed_model(
      r18_variables, "teskd_cifar_resnet18")
  assert arch == "cifar_resnet18"
  assert count_params(variables["params"]) == 11_220_132
  x = jnp.asarray(images(2, 0).transpose(0, 2, 3, 1))
  full = models.create("teskd_cifar_resnet18", 100, jnp.float64).apply(
      r18_variables, x, train=False)
  alone = models.create("cifar_resnet18", 100, jnp.float64).apply(
      variables, x, train=False)
  np.testing.assert_array_equal(np.asarray(alone), np.asarray(full))


def test_converter_reads_official_names_and_infers_classes():
  assert ct.canonical_torch_key("fuse_3.0.weight") == "fuse.3.0.weight"
  assert ct.canonical_torch_key("fc_b1.bias") == "fc_b1.bias"
  assert ct.canonical_torch_key("layer1.0.bn1.running_mean") == (
      "layer1.0.bn1.running_mean")
  sd = {k: np.zeros(np.shape(v)) for k, v in
        official_state_dict("teskd_cifar_resnet18").items()}
  for name in ("fc", "fc_b1", "fc_b2", "fc_b3"):  # a 10-class checkpoint
    sd[f"{name}.weight"], sd[f"{name}.bias"] = np.zeros((10, 512)), np.zeros(10)
  variables = ct.convert_state_dict("teskd_cifar_resnet18", sd)
  assert variables["params"]["fc_b2"]["kernel"].shape == (512, 10)
  assert variables["params"]["fuse_3_0"]["kernel"].shape == (1, 1, 1024, 512)
  assert torch_keys.num_classes_of(variables) == 10
  sd["fuse.3.0.weight"] = sd["fuse_3.0.weight"]
  with pytest.raises(ct.ConversionError, match="fuse_3.0.weight"):
    ct.convert_state_dict("teskd_cifar_resnet18", sd)


# ---------------------------------------------------------------------------
# The loss.


def _worked(detach):
  def loss_fn(z_bb, z, f):
    return teskd.teskd_loss(z_bb, z, jnp.asarray(F_BB), f, jnp.asarray(Y),
                            temperature=4.0, ce_weight=0.2, kd_weight=0.8,
                            feat_weight=1e-7, detach_kd_target=detach)
  return jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True)(
      jnp.asarray(Z_BB), jnp.asarray(Z), jnp.asarray(F))


def test_worked_example_matches_the_official_loss(x64):
  (loss, terms), (g_bb, g_z, g_f) = _worked(detach=False)
  assert float(loss) == pytest.approx(WORKED["loss"], rel=1e-13)
  assert float(terms["student/teskd_ce"]) == pytest.approx(WORKED["ce"], rel=1e-13)
  assert float(terms["student/teskd_kl"]) == pytest.approx(WORKED["kl"], rel=1e-13)
  assert float(terms["student/teskd_fea"]) == pytest.approx(WORKED["fea"], rel=1e-13)
  np.testing.assert_allclose(g_bb, GRAD_Z_BB, rtol=1e-11)
  np.testing.assert_allclose(g_z, GRAD_Z, rtol=1e-11)
  np.testing.assert_allclose(g_f, GRAD_F, rtol=1e-9, atol=1e-20)


def test_kl_target_gradient_reaches_the_backbone_unless_detached(x64):
  (loss, _), (g_bb, g_z, _) = _worked(detach=False)
  (loss_d, _), (g_bb_d, g_z_d, _) = _worked(detach=True)
  assert float(loss_d) == float(loss)
  np.testing.assert_allclose(g_bb_d, GRAD_Z_BB_DETACHED, rtol=1e-11)
  np.testing.assert_allclose(g_z_d, g_z, rtol=1e-13)
  # "Student helping teacher": the KL terms' gradient into z_bb.
  assert np.max(np.abs(np.asarray(g_bb) - np.asarray(g_bb_d))) > 0.3


def test_masked_examples_do_not_count(x64):
  pad = lambda a, axis: np.concatenate(  # noqa: E731
      [a, np.take(a, [0], axis=axis) * 3 + 1], axis=axis)
  mask = jnp.asarray([True, True, False])
  loss, _ = teskd.teskd_loss(
      jnp.asarray(pad(Z_BB, 0)), jnp.asarray(pad(Z, 1)),
      jnp.asarray(pad(F_BB, 0)), jnp.asarray(pad(F, 1)),
      jnp.asarray(np.append(Y, 1)), mask, temperature=4.0, ce_weight=0.2,
      kd_weight=0.8, feat_weight=1.0)
  assert float(loss) == pytest.approx(4.6762220253, rel=1e-10)


def test_branch_ce_weights_follow_the_logit_names(x64):
  # b1_weight weights the first branch logits (the deepest head).
  base = dict(temperature=4.0, ce_weight=1.0, kd_weight=0.0, feat_weight=0.0)
  args = (jnp.asarray(Z_BB), jnp.asarray(Z), jnp.asarray(F_BB),
          jnp.asarray(F), jnp.asarray(Y))
  one, terms = teskd.teskd_loss(*args, **base)
  two, _ = teskd.teskd_loss(*args, branch_ce_weights=(2.0, 1.0, 1.0), **base)
  assert float(two - one) == pytest.approx(float(terms["branch_1/ce"]))


# ---------------------------------------------------------------------------
# The method in the general step (a tiny TESKD model: width 4, D = 32).

TINY = "teskd_test_tiny"


@pytest.fixture(autouse=True)
def tiny_model(monkeypatch):
  """A TESKD model of width 4 in the registry, for this module's tests only
  (other modules iterate over the registered models)."""
  monkeypatch.setitem(
      models.registry._REGISTRY, TINY,  # pylint: disable=protected-access
      models.ModelInfo(TINY, lambda num_classes, dtype: rk.KuangliuResNet(
          (1, 1, 1, 1), num_classes, width=4, teskd=True, dtype=dtype),
          32, 100))


def tiny_config(dtype="float32"):
  c = config_lib.base_config()
  c.method = "teskd"
  c.student.arch = TINY  # not a preset arch: validation would refuse it
  c.data.num_classes = 10
  c.batch_size = 16
  c.dtype = dtype
  c.optim.learning_rate = 0.1
  c.optim.nesterov = True
  c.recipes = config_lib.recipes(temperature=4.0, ce_weight=0.1,
                                 kd_weight=0.9, dkd_beta=8.0, dkd_warmup=20.0)
  c.recipes.teskd.feat_weight = 1e-3  # visible in a 2-step float64 test
  return config_lib.stage_config(c, "teskd")


def fake_batch(mesh, n=16, real=13):
  rng = np.random.RandomState(0)
  batch = {"image": rng.standard_normal((n, 32, 32, 3)).astype(np.float32),
           "label": rng.randint(0, 10, n).astype(np.int32),
           "mask": np.arange(n) < real}
  return jax.device_put(batch, parallel.batch_sharding(mesh))


def run_steps(c, mesh, n=2):
  state = state_lib.create_state(stage_lib.resolve(c), mesh)
  step = train_step.make_train_step(stage_lib.resolve(c), mesh)
  hp = stage_lib.resolve(c).hparams(1)
  history = []
  for _ in range(n):
    state, metrics = step(state, fake_batch(mesh), hp)
    history.append(jax.device_get(metrics))
  return state, history


def test_method_row():
  m = methods.get("teskd")
  assert not m.uses_teacher and not m.uses_slts and m.feature_term is None
  assert m.features and m.eval_logits is teskd.eval_logits
  assert set(m.student_archs) == {"teskd_cifar_resnet18",
                                  "teskd_cifar_resnet34"}
  assert not methods.get("kd").features


def test_one_and_eight_devices_agree():
  # float64 so that the all-reduce's summation order cannot hide a real
  # difference (BN statistics and the summed feature term see the global,
  # masked batch).
  with jax.enable_x64(True):
    c = tiny_config("float64")
    one, h1 = run_steps(c, parallel.make_mesh(jax.devices()[:1]))
    eight, h8 = run_steps(c, parallel.make_mesh())
    one, eight = jax.device_get(one), jax.device_get(eight)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9,
                                                       atol=1e-12), one, eight)
  np.testing.assert_allclose(h1[-1]["loss"], h8[-1]["loss"], rtol=1e-10)
  for key in ("student/teskd_ce", "student/teskd_kl", "student/teskd_fea", "branch_3/ce",
              "student/acc"):
    assert np.isfinite(h8[-1][key]), key
  assert h8[-1]["student/teskd_fea"] > 0


def test_step_trains_heads_and_backbone_and_eval_reports_branches():
  c = tiny_config()
  mesh = parallel.make_mesh()
  fresh = jax.device_get(state_lib.create_state(stage_lib.resolve(c), mesh).student.params)
  state, _ = run_steps(c, mesh, n=1)
  moved = jax.device_get(state.student.params)
  for name in ("conv1", "layer4_0", "laterals_0_0", "upsample_2_1",
               "fuse_1_0", "downsample1_3", "fc", "fc_b3"):
    delta = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), moved[name],
                         fresh[name])
    assert max(jax.tree.leaves(delta)) > 0, name
  stage = stage_lib.resolve(c)
  sums = jax.device_get(train_step.make_eval_step(stage, mesh)(
      state, fake_batch(mesh), stage.hparams(1)))
  assert sums["count"] == 13
  assert {k.split("/")[0] for k in sums if "/" in k} == {
      "student", "branch_1", "branch_2", "branch_3"}


def test_make_optimizer_follows_config_nesterov():
  c = tiny_config()
  params = {"w": jnp.zeros(1)}
  grads = {"w": jnp.ones(1)}
  for nesterov, want in ((False, 1.0), (True, 1.9)):
    c.optim.nesterov = nesterov
    tx = stage_lib.resolve(c).tx
    direction, _ = tx.update(grads, tx.init(params), params)
    assert float(direction["w"][0]) == pytest.approx(want)


# ---------------------------------------------------------------------------
# Config: presets, recipe, validation, reporting.


def _cifar_presets():
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parent.parent / "configs/cifar100.py"
  spec = importlib.util.spec_from_file_location("teskd_test_cifar100", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


cifar = _cifar_presets()


@pytest.mark.parametrize("arg,arch", [
    ("cifar_resnet18", "teskd_cifar_resnet18"),
    ("cifar_resnet18,teskd", "teskd_cifar_resnet18"),
    ("cifar_resnet34,teskd", "teskd_cifar_resnet34"),
    ("cifar_resnet18,ce", "cifar_resnet18")])
def test_teskd_presets_carry_the_official_recipe(arg, arch):
  c = cifar.get_config(arg)
  config_checks.validate(c)
  assert c.student.arch == arch
  assert c.method == (arg.partition(",")[2] or "teskd")
  # main.py: Nesterov SGD lr 0.1, momentum 0.9, wd 5e-4, batch 128, 200
  # epochs, MultiStepLR [100, 150] x0.1; dataset.py: CIFAR-10 constants.
  assert (c.optim.learning_rate, c.optim.momentum, c.optim.weight_decay,
          c.optim.nesterov) == (0.1, 0.9, 5e-4, True)
  assert (c.batch_size, c.num_epochs, tuple(c.optim.decay_epochs),
          c.optim.decay_rate) == (128, 200, (100, 150), 0.1)
  assert tuple(c.data.mean) == (0.4914, 0.4822, 0.4465)
  assert tuple(c.data.std) == (0.2023, 0.1994, 0.2010)
  assert c.report_best_after_epoch == 150 and not c.data.drop_last
  loss = methods.loss_settings(c)
  if c.method == "teskd":
    assert (loss.temperature, loss.ce_weight, loss.kd_weight,
            loss.feat_weight) == (4.0, 0.2, 0.8, 1e-7)
    assert (loss.backbone_ce_weight, loss.branch1_ce_weight,
            loss.branch2_ce_weight, loss.branch3_ce_weight) == (1, 1, 1, 1)
    assert loss.detach_kd_target is False
  else:
    assert loss.ce_weight == 1.0


def test_teskd_paper_numbers():
  assert cifar.paper_top1("cifar_resnet18", "teskd") == 79.15
  assert cifar.paper_top1("cifar_resnet18", "ce") == 74.41  # 79.15 - 4.74
  assert cifar.paper_top1("cifar_resnet34", "teskd") is None  # not stated


def test_teskd_validation_names_the_key():
  with pytest.raises(config_lib.errors.ConfigError, match="student.arch"):
    config_checks.validate(cifar.get_config("resnet32x4-resnet8x4,teskd"))
  with pytest.raises(config_lib.errors.ConfigError, match="kd"):
    cifar.get_config("cifar_resnet18,kd")
  for key, value in (("optim.nesterov", 1), ("report_best_after_epoch", -1),
                     ("data.mean", (0.5, 0.5)), ("data.std", (0.2, 0.0, 0.2))):
    c = cifar.get_config("cifar_resnet18")
    parent, _, leaf = key.rpartition(".")
    node = c[parent] if parent else c
    with pytest.raises((config_lib.errors.ConfigError, TypeError)):
      node[leaf] = value
      config_checks.validate(c)
  defaults = config_lib.base_config()
  assert defaults.optim.nesterov is False
  assert defaults.data.mean is None and defaults.report_best_after_epoch == 0


def test_reported_best_is_over_the_epochs_after_E():
  history = [{"epoch": e, "student/top1": t}
             for e, t in ((149, 80.0), (150, 79.0), (151, 78.5), (152, 78.9))]
  best = metrics.best_and_last(metrics.reported_history(history, 150),
                               "student/top1")
  assert best == (78.9, 152, 78.9)
  assert metrics.reported_history(history, 0) == history
  assert metrics.reported_history(history[:2], 150) == history[:2]  # short run


def test_a_teskd_stage_reports_branches_and_deploys_its_backbone(
    tmp_path, monkeypatch):
  backbone = "teskd_test_tiny_backbone"
  monkeypatch.setitem(
      models.registry._REGISTRY, backbone,  # pylint: disable=protected-access
      models.ModelInfo(backbone, lambda num_classes, dtype: rk.KuangliuResNet(
          (1, 1, 1, 1), num_classes, width=4, teskd=False, dtype=dtype),
          32, 100))
  monkeypatch.setitem(rk.BACKBONE_OF, TINY, backbone)
  monkeypatch.setitem(methods.METHODS, "teskd", dataclasses.replace(
      methods.get("teskd"), student_archs=(TINY,)))
  c = config_lib.base_config()
  c.method, c.student.arch = "teskd", TINY
  c.data.name, c.data.num_classes = "synthetic", 10
  c.data.num_train, c.data.num_test = 32, 16
  c.batch_size = c.eval_batch_size = 16
  c.num_epochs = 1
  result = train.run(c, str(tmp_path))["teskd"]
  record = result.history[-1]
  assert {"student/top1", "branch_1/top1", "branch_2/top1",
          "branch_3/top1"} <= set(record)
  variables, meta = artifact.load(str(tmp_path / "teskd" / "best_model"))
  assert meta["arch"] == backbone
  x = jnp.zeros((2, 32, 32, 3))
  np.testing.assert_allclose(
      models.create(backbone, 10).apply(variables, x, train=False),
      models.create(TINY, 10).apply(result.state.student.variables, x,
                                    train=False), rtol=1e-6)
