"""The feature-based methods inside the general step: they give the same
state on 1 and 8 devices, size their connectors from the networks, and
resume bit-identically. (Every one lowering its loss in the sharded step,
its connector trained with the student, is in tests/test_train_step.py's
test of every method, on the same small programs as the other methods.)"""

import jax
import numpy as np
import pytest

from slkd_jax import config as config_lib
from slkd_jax import config_checks
from slkd_jax import parallel, train
from slkd_jax import data as data_lib
from slkd_jax import stage as stage_lib
from slkd_jax import state as state_lib
from slkd_jax import train_step


def digits_config(method, image_size=32):
  """``method`` from a resnet14 to a resnet8 on the digits; a smaller
  ``image_size`` describes batches subsampled from them (synthetic data of
  that size, for the networks' shapes)."""
  c = config_lib.base_config()
  c.method = method
  c.data.name = "digits" if image_size == 32 else "synthetic"
  c.data.num_classes = 10
  c.data.image_size = image_size
  c.teacher.arch = "resnet14"
  c.student.arch = "resnet8"
  c.batch_size = 32
  c.eval_batch_size = 360
  c.optim.learning_rate = 0.02
  config_checks.validate(c)
  return config_lib.stage_config(c, method)


@pytest.fixture(scope="module")
def digits_batch():
  mesh = parallel.make_mesh()
  train_data, _ = data_lib.create_datasets(
      digits_config("fitnet").data, batch_size=32, eval_batch_size=360,
      seed=0, mesh=mesh)
  return next(iter(train_data.epoch(0)))


def teacher_of(c, mesh):
  nets = stage_lib.resolve(c).nets
  params, stats = state_lib.init_variables(nets.teacher, jax.random.key(7),
                                           stage_lib.resolve(c).image_shape)
  return state_lib.ModelState(params, jax.tree.map(lambda s: s + 0.1, stats))


def steps(c, mesh, batch, n):
  state = state_lib.create_state(stage_lib.resolve(c), mesh, teacher_of(c, mesh))
  step = train_step.make_train_step(stage_lib.resolve(c), mesh)
  hp = stage_lib.resolve(c).hparams(1)
  batch = jax.device_put(jax.device_get(batch), parallel.batch_sharding(mesh))
  history = []
  for _ in range(n):
    state, metrics = step(state, batch, hp)
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history


@pytest.fixture(scope="module")
def small_digits_batch(digits_batch):
  """The digits batch at 8×8 (every fourth pixel): a sixteenth of the
  float64 convolutions of the device-count test, which checks agreement,
  not learning."""
  return dict(digits_batch, image=digits_batch["image"][:, ::4, ::4])


@pytest.mark.parametrize("method", ["fitnet", "rkd", "vid", "sp", "ofd"])
def test_one_and_eight_devices_agree(method, small_digits_batch):
  # float64, so that the all-reduce's other summation order (~1e-5 in
  # float32 after two steps with feat weight 100) cannot hide a real
  # difference: connectors' BatchNorm statistics and batch-coupled losses
  # (RKD, SP) must see the global batch.
  with jax.enable_x64(True):
    c = digits_config(method, image_size=8)
    c.dtype = "float64"
    one, h1 = steps(c, parallel.make_mesh(jax.devices()[:1]),
                    small_digits_batch, 2)
    eight, h8 = steps(c, parallel.make_mesh(), small_digits_batch, 2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9,
                                                       atol=1e-12), one, eight)
  np.testing.assert_allclose(h1[-1]["loss"], h8[-1]["loss"], rtol=1e-10)


def test_connector_parameters_are_counted_as_extra():
  c = digits_config("fitnet")
  state = state_lib.create_state(stage_lib.resolve(c), parallel.make_mesh(),
                                 teacher_of(c, parallel.make_mesh()))
  # Hint layer 2 of resnet8 and resnet14: 16x16x32 both, so mdistiller's
  # ConvReg is a 1x1 conv (kernel 1 + 16 - 16) to 32 channels, then BN.
  connector = state.modules["connector"].params
  shapes = jax.tree.map(np.shape, connector)
  assert shapes["conv"]["kernel"] == (1, 1, 32, 32)
  assert shapes["bn"]["scale"] == (32,)


@pytest.mark.parametrize("method", ["fitnet", "reviewkd"])
def test_resume_with_a_connector_is_bit_identical(tmp_path, method):
  # ReviewKD also checks that its warm-up (hp.epoch) resumes with the run.
  def config(num_epochs):
    c = config_lib.base_config()
    c.method = method
    c.data.name = "synthetic"
    c.data.image_size = 8
    c.data.num_classes = 5
    c.data.num_train = 40
    c.data.num_test = 20
    c.batch_size = c.eval_batch_size = 16
    c.teacher.arch = c.student.arch = "resnet8"
    c.teacher.num_epochs = 1
    c.num_epochs = num_epochs
    c.checkpoint_every_epochs = 1
    return c

  whole = train.run(config(2), str(tmp_path / "whole"))
  train.run(config(1), str(tmp_path / "parts"))
  resumed = train.run(config(2), str(tmp_path / "parts"))
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(whole[method].state.modules),
               jax.device_get(resumed[method].state.modules))
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(whole[method].state.student),
               jax.device_get(resumed[method].state.student))
