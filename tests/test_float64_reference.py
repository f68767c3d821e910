"""float64 end to end: the jitted SLKD step against a PyTorch reference step.

In float64 the rounding of either side is ~1e-16, so the library's sharded,
jitted SLKD step and an independent PyTorch implementation of the reference
(mdistiller-style losses, ``torch.optim.SGD``) must follow the same trajectory
to ~1e-10 over several steps: every loss term, every step, and the networks'
eval-mode logits at the end. Any float32 leaking into the float64 path (a
hyper-parameter, a BatchNorm statistic, the logits) shows up as a ~1e-8
error, and any semantic difference (a detached target, the running-variance
update, the SGD variant) as far more.

Networks: the PyTorch twins of ``benchmarks/torch_models.py`` (reference
topology), converted to flax with ``convert_torch.convert_state_dict(...,
dtype=np.float64)``, so both sides start from the same weights.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch reference needs torch")
import torch.nn.functional as F  # noqa: E402

from benchmarks import torch_models  # noqa: E402
from slkd_jax import config as config_lib  # noqa: E402
from slkd_jax import config_checks  # noqa: E402
from slkd_jax import convert_torch, parallel, studies  # noqa: E402
from slkd_jax import stage as stage_lib  # noqa: E402
from slkd_jax import state as state_lib  # noqa: E402
from slkd_jax import train_step  # noqa: E402
from slkd_jax.models import layers  # noqa: E402

TEACHER, STUDENT = "resnet20", "resnet8"
# 100 classes (CIFAR-100): with 10 random-label classes these 10 SGD steps
# are chaotic (rounding differences grow ~10x per step, to ~6e-11 at step 10);
# with 100 they stay at ~1e-14, far inside RTOL.
NUM_CLASSES = 100
IMAGE_SIZE = 16  # CIFAR nets pool globally; 16 px: a quarter of 32's work
BATCH = 16
STEPS = 10
# The same 10 steps for vmap (its batched-kernel convolutions run ~6x slower
# than the unrolled ones on XLA:CPU, on one device: see jax_trajectory).
VMAP_STEPS = 10
NUM_SLTS = 2
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4
T = 4.0
CE_W, KD_W = 0.1, 0.9
FUSION = (0.5, 0.5)
RTOL = 1e-10
# Loss terms logged by the JAX step and recomputed by the reference.
TERMS = ("loss", "student/loss", "slt/loss", "student/ce",
         "student/kd_teacher", "student/kd_fused", "slt/ce", "slt/kd_teacher")


# ---------------------------------------------------------------------------
# The PyTorch reference.


def _twin(arch, seed):
  torch.manual_seed(seed)
  return torch_models.create(arch, NUM_CLASSES).double()


def _randomise_bn(net, seed):
  """Random affine parameters and running statistics, so that eval-mode BN
  is not (nearly) the identity."""
  gen = torch.Generator().manual_seed(seed)

  def uniform(c, lo, hi):
    return lo + (hi - lo) * torch.rand(c, generator=gen, dtype=torch.float64)

  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(uniform(c, 0.8, 1.2))
        m.bias.copy_(uniform(c, -0.1, 0.1))
        m.running_mean.copy_(uniform(c, -0.2, 0.2))
        m.running_var.copy_(uniform(c, 0.5, 1.5))
  return net


def _kd(z_in, z_target):
  """mdistiller's KD: T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)), batch mean."""
  kl = F.kl_div(F.log_softmax(z_in / T, 1), F.softmax(z_target / T, 1),
                reduction="none")
  return T * T * kl.sum(1).mean()


def _reference_losses(z_s, z_t, z_k, y, detach):
  """The student's and the SL-Ts' SLKD losses (fused target not detached by
  default, as the reference code)."""
  z_c = FUSION[0] * z_k[0] + FUSION[1] * z_k[1]
  if detach:
    z_c = z_c.detach()
  ce = F.cross_entropy(z_s, y)
  kd_t, kd_c = _kd(z_s, z_t.detach()), _kd(z_s, z_c)
  student = CE_W * ce + KD_W * kd_t + 1.0 * (1.0 * ce + 1.0 * kd_c)
  slt_ce = [F.cross_entropy(z, y) for z in z_k]
  slt_kd = [_kd(z, z_t.detach()) for z in z_k]
  slt = sum(CE_W * c + KD_W * k for c, k in zip(slt_ce, slt_kd))
  terms = {"loss": student + slt, "student/loss": student, "slt/loss": slt,
           "student/ce": ce, "student/kd_teacher": kd_t,
           "student/kd_fused": kd_c, "slt/ce": torch.stack(slt_ce),
           "slt/kd_teacher": torch.stack(slt_kd)}
  return student + slt, terms


def torch_trajectory(init, batches, eval_images, detach=False):
  """One reference step per batch from ``init`` (left untouched); per-step
  terms and the final eval-mode logits of the student and each SL-T."""
  teacher, student, slts = copy.deepcopy(init)
  teacher.eval()
  trained = [student, *slts]
  opts = [torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM,
                          weight_decay=WEIGHT_DECAY) for net in trained]
  history = []
  for images, labels in batches:
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    y = torch.from_numpy(labels.astype(np.int64))
    for net in trained:
      net.train()
    with torch.no_grad():
      z_t = teacher(x)
    loss, terms = _reference_losses(student(x), z_t, [s(x) for s in slts], y,
                                    detach)
    for opt in opts:
      opt.zero_grad()
    loss.backward()
    for opt in opts:
      opt.step()
    history.append({k: v.detach().numpy().copy() for k, v in terms.items()})
  x = torch.from_numpy(eval_images.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    logits = {"student": student.eval()(x).numpy()}
    for k, slt in enumerate(slts):
      logits[f"slt_{k}"] = slt.eval()(x).numpy()
  return history, logits


# ---------------------------------------------------------------------------
# The JAX side.


def _zoo_state_dict(net, arch):
  """``net``'s state_dict under the reference zoo's names.

  The twins name the CIFAR ResNet blocks ``blocks.i``; the reference zoo (and
  so the converter) names them ``layer{stage}.{j}``.
  """
  per_stage = (int(arch.removeprefix("resnet")) - 2) // 6
  state_dict = {}
  for key, value in net.state_dict().items():
    if key.startswith("blocks."):
      _, i, rest = key.split(".", 2)
      stage, j = divmod(int(i), per_stage)
      key = f"layer{stage + 1}.{j}.{rest}"
    state_dict[key] = value
  return state_dict


def _flax_variables(net, arch):
  """``net``'s weights as float64 flax variables, through the converter."""
  return convert_torch.convert_state_dict(arch, _zoo_state_dict(net, arch),
                                          dtype=np.float64)


def _config(ensemble, detach=False):
  c = config_lib.base_config()
  c.dtype = "float64"
  c.teacher.arch, c.student.arch = TEACHER, STUDENT
  c.data.num_classes, c.data.image_size = NUM_CLASSES, IMAGE_SIZE
  c.batch_size = BATCH
  c.slkd.num_slts = NUM_SLTS
  c.slkd.ensemble = ensemble
  c.slkd.detach_fused_target = detach
  c.slkd.fusion_weights = FUSION
  c.loss.temperature, c.loss.ce_weight, c.loss.kd_weight = T, CE_W, KD_W
  c.optim.learning_rate, c.optim.momentum = LR, MOMENTUM
  c.optim.weight_decay = WEIGHT_DECAY
  config_checks.validate(c)
  return c


def _initial_state(c, mesh, init):
  """The PyTorch nets' weights as a replicated :class:`DistillState`."""
  teacher, student, slts = init
  tx = stage_lib.resolve(c).tx

  def train_state(variables, shape=()):
    params = variables["params"]
    return state_lib.TrainState(
        params=params, batch_stats=variables["batch_stats"],
        step=jnp.zeros(shape, jnp.int32), opt_state=tx.init(params))

  stacked = jax.tree.map(lambda *xs: np.stack(xs),
                         *[_flax_variables(s, TEACHER) for s in slts])
  state = state_lib.DistillState(
      step=jnp.zeros((), jnp.int32),
      student=train_state(_flax_variables(student, STUDENT)),
      slts=train_state(stacked, (NUM_SLTS,)),
      teacher=state_lib.ModelState(**_flax_variables(teacher, TEACHER)))
  return jax.device_put(state, parallel.replicated(mesh))


def _assert_float64(tree, what):
  """Every floating leaf of ``tree`` is float64."""
  bad = {jax.tree_util.keystr(path): leaf.dtype for path, leaf in
         jax.tree_util.tree_leaves_with_path(tree)
         if jnp.issubdtype(leaf.dtype, jnp.floating)
         and leaf.dtype != jnp.float64}
  assert not bad, f"{what} is not float64 end to end: {bad}"


def jax_trajectory(c, init, batches, eval_images):
  """One library step per batch (jitted, batch sharded over all devices;
  vmapped SL-Ts on one: XLA:CPU's float64 grouped convolutions cost about
  the same per device whatever its share of the batch, 8x the time on 8
  fake devices); per-step terms and the final eval-mode logits, checked
  float64."""
  mesh = parallel.make_mesh(
      jax.devices()[:1] if c.slkd.ensemble == "vmap" else None)
  state = _initial_state(c, mesh, init)
  hp = stage_lib.resolve(c).hparams(1)
  _assert_float64(hp, "HParams")
  step = train_step.make_train_step(stage_lib.resolve(c), mesh)
  history = []
  for images, labels in batches:
    batch = {"image": images, "label": labels.astype(np.int32),
             "mask": np.ones(len(labels), bool)}
    state, metrics = step(state, parallel.host_local_to_global(batch, mesh),
                          hp)
    _assert_float64({k: metrics[k] for k in TERMS}, "the step's losses")
    history.append({k: np.asarray(metrics[k]) for k in TERMS})
  state = jax.device_get(state)
  _assert_float64((state.student, state.slts), "the trained state")
  logits = jax.device_get(_eval_logits(c, state, eval_images))
  _assert_float64(logits, "the eval logits")
  return history, logits


def _eval_logits(c, state, images):
  """Eval-mode logits of the student and of each SL-T (one compile)."""
  nets = stage_lib.resolve(c).nets

  def logits(state):
    out = {"student": nets.student.apply(state.student.variables, images,
                                         train=False)}
    for k in range(NUM_SLTS):
      slt = jax.tree.map(lambda leaf, k=k: leaf[k], state.slts)
      out[f"slt_{k}"] = nets.slt.apply(slt.variables, images, train=False)
    return out

  return jax.jit(logits)(state)


# ---------------------------------------------------------------------------
# Comparison.


def _rel_err(a, b):
  """max |a − b| / max |b|: relative to the quantity's scale (logits and
  per-SL-T vectors have entries near 0)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def trajectory_errors(jax_run, torch_run):
  """``{quantity: max relative error over the steps}``."""
  (jax_hist, jax_logits), (torch_hist, torch_logits) = jax_run, torch_run
  errors = {k: max(_rel_err(j[k], t[k]) for j, t in zip(jax_hist, torch_hist))
            for k in TERMS}
  errors.update({f"eval_logits/{k}": _rel_err(jax_logits[k], torch_logits[k])
                 for k in torch_logits})
  return errors


@pytest.fixture(autouse=True)
def float64():
  with jax.enable_x64(True):
    yield


@pytest.fixture(scope="module", autouse=True)
def fast_cpu():
  """Optimised XLA code and one torch thread for this module only.

  conftest disables most XLA optimisations (compiles dominate elsewhere);
  here the float64 convolutions would then run ~10x slower than the compile
  saves. Several torch threads on a shared 2-core machine mostly spin.
  """
  optimisations = jax.config.read("jax_disable_most_optimizations")
  threads = torch.get_num_threads()
  jax.config.update("jax_disable_most_optimizations", False)
  torch.set_num_threads(1)
  yield
  jax.config.update("jax_disable_most_optimizations", optimisations)
  torch.set_num_threads(threads)


class _Runs:
  """Trajectories computed once per module and shared by the tests."""

  def __init__(self, init, data):
    self._init, (self._batches, self._eval_images) = init, data
    self._cache = {}

  def torch(self, steps, detach=False):
    """The PyTorch reference over the first ``steps`` batches."""
    return self._get(("torch", steps, detach), lambda: torch_trajectory(
        self._init, self._batches[:steps], self._eval_images, detach))

  def jax(self, ensemble, steps):
    """The library's float64 step over the first ``steps`` batches."""
    return self._get(("jax", ensemble, steps), lambda: jax_trajectory(
        _config(ensemble), self._init, self._batches[:steps],
        self._eval_images))

  def _get(self, key, compute):
    if key not in self._cache:
      self._cache[key] = compute()
    return self._cache[key]


@pytest.fixture(scope="module")
def runs():
  """Teacher (random BN statistics), student and K SL-Ts as float64 twins;
  random CIFAR-size batches."""
  teacher = _randomise_bn(_twin(TEACHER, 0), seed=100)
  slts = [_twin(TEACHER, 1 + k) for k in range(NUM_SLTS)]
  rng = np.random.default_rng(0)
  shape = (BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)
  batches = [(rng.normal(size=shape), rng.integers(0, NUM_CLASSES, BATCH))
             for _ in range(STEPS)]
  return _Runs((teacher, _twin(STUDENT, 10), slts),
               (batches, rng.normal(size=shape)))


def _summary(errors):
  return (f"max relative error {max(errors.values()):.2e} ("
          + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()) + ")")


@pytest.mark.slow
@pytest.mark.parametrize("ensemble,steps", [("unrolled", STEPS),
                                            ("vmap", VMAP_STEPS)])
def test_float64_slkd_step_matches_pytorch_reference(ensemble, steps, runs):
  reference = runs.torch(steps)
  errors = trajectory_errors(runs.jax(ensemble, steps), reference)
  print(f"\n{ensemble}, {steps} steps: {_summary(errors)}")
  assert max(errors.values()) < RTOL, _summary(errors)
  # The trajectory is not trivial: the losses moved over the steps.
  assert abs(float(reference[0][-1]["loss"] - reference[0][0]["loss"])) > 0.1


@pytest.mark.slow
def test_a_detached_fused_target_is_far_outside_the_tolerance(runs):
  """The check can fail: the run that matches the reference to RTOL misses
  the reference with the fused target detached (the paper's equations, a
  one-word change) by orders of magnitude more than RTOL, in the SL-Ts'
  losses and logits, which the coupling through z_c trains."""
  run = runs.jax("unrolled", STEPS)
  assert max(trajectory_errors(run, runs.torch(STEPS)).values()) < RTOL
  errors = trajectory_errors(run, runs.torch(STEPS, detach=True))
  print(f"\nagainst the detached reference: {_summary(errors)}")
  assert errors["slt/ce"] > 1e4 * RTOL, _summary(errors)
  assert errors["eval_logits/slt_0"] > 1e4 * RTOL, _summary(errors)


def test_param_dtype_promotes_to_at_least_float32():
  assert layers.param_dtype(jnp.bfloat16) == jnp.float32
  assert layers.param_dtype(jnp.float32) == jnp.float32
  assert layers.param_dtype(jnp.float64) == jnp.float64


def test_float64_run_has_float64_variables_and_hparams():
  c = _config("unrolled")
  stage = stage_lib.resolve(c)
  # The library's own path to a fresh state: the student, the SL-Ts and
  # their optimiser states (shapes only, nothing computed).
  abstract = jax.eval_shape(lambda: studies.create_runs_state(
      stage, parallel.make_mesh(), [0]))
  _assert_float64(abstract.student, "a fresh student state")
  _assert_float64(abstract.slts, "a fresh SL-T state")
  hp = stage_lib.resolve(c).hparams(1)
  _assert_float64(hp, "HParams")
  assert float(hp.ce_weight) == 0.1 and float(hp.learning_rate) == 0.05
  c.dtype = "bfloat16"
  assert stage_lib.resolve(c).hparams(1).ce_weight.dtype == jnp.float32


def test_convert_state_dict_keeps_float64_when_asked():
  sd = _zoo_state_dict(_twin(STUDENT, 10), STUDENT)
  exact = convert_torch.convert_state_dict(STUDENT, sd, dtype=np.float64)
  rounded = convert_torch.convert_state_dict(STUDENT, sd)
  np.testing.assert_array_equal(exact["params"]["fc"]["bias"],
                                sd["fc.bias"].numpy())
  assert exact["params"]["fc"]["bias"].dtype == np.float64
  assert rounded["params"]["fc"]["bias"].dtype == np.float32
