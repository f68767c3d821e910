"""CRD inside the general step: the memory banks live in the state, change
only at the batch's dataset indices, agree on 1 and 8 devices, and resume
bit-identically in the middle of an epoch."""

import os
import signal

import jax
import numpy as np
import pytest

from slkd_jax import config as config_lib
from slkd_jax import config_checks
from slkd_jax import data as data_lib
from slkd_jax import errors, parallel, train
from slkd_jax import stage as stage_lib
from slkd_jax import state as state_lib
from slkd_jax import train_step


def tiny_crd_config(**overrides):
  """Synthetic 8×8 data, 40 examples (3 steps of 16, the last padded),
  resnet8 teacher and student, 16 negatives, 32-d embeddings."""
  c = config_lib.base_config()
  c.method = "crd"
  c.data.name = "synthetic"
  c.data.image_size = 8
  c.data.num_classes = 5
  c.data.num_train = 40
  c.data.num_test = 20
  c.batch_size = c.eval_batch_size = 16
  c.teacher.arch = c.student.arch = "resnet8"
  c.teacher.num_epochs = 1
  c.num_epochs = 2
  c.log_every_steps = 1
  c.checkpoint_every_epochs = 1
  c.recipes.crd.nce_k = 16
  c.recipes.crd.feat_dim = 32
  for key, value in overrides.items():
    target = c
    *path, leaf = key.split(".")
    for part in path:
      target = target[part]
    target[leaf] = value
  return c


def run_steps(c, mesh, n):
  """``n`` steps of epoch 0 from a fixed random teacher: (states, batches)."""
  c = config_lib.stage_config(c, "crd")
  stage = stage_lib.resolve(c)
  train_data, _ = data_lib.create_datasets(
      c.data, batch_size=c.batch_size, eval_batch_size=c.eval_batch_size,
      seed=c.seed, mesh=mesh)
  params, stats = state_lib.init_variables(stage.nets.teacher,
                                           jax.random.key(7), stage.image_shape)
  state = state_lib.create_state(stage, mesh,
                                 state_lib.ModelState(params, stats),
                                 train_data.labels)
  step = train_step.make_train_step(stage, mesh)
  hp = stage.hparams(1)
  states, batches, metrics = [jax.device_get(state)], [], []
  for _, batch in zip(range(n), train_data.epoch(0)):
    state, m = step(state, batch, hp)
    states.append(jax.device_get(state))
    batches.append(jax.device_get(batch))
    metrics.append(jax.device_get(m))
  return states, batches, metrics


def test_memory_changes_only_at_the_batch_indices_and_z_is_set_once():
  states, batches, metrics = run_steps(tiny_crd_config(), parallel.make_mesh(),
                                       3)
  before = states[0].buffers["memory"]
  assert float(before["z_s"]) == float(before["z_t"]) == -1.0
  first = states[1].buffers["memory"]
  z = float(first["z_s"]), float(first["z_t"])
  assert min(z) > 0  # estimated on the first batch
  for bank in ("memory_s", "memory_t"):
    changed = np.any(first[bank] != before[bank], axis=1)
    written = batches[0]["index"][batches[0]["mask"]]
    assert set(np.flatnonzero(changed)) == set(written)
    np.testing.assert_allclose(np.linalg.norm(first[bank][written], axis=1),
                               1.0, rtol=1e-5)
  # The third batch is padded: its masked rows write nothing.
  third, second = states[3].buffers["memory"], states[2].buffers["memory"]
  real = batches[2]["index"][batches[2]["mask"]]
  changed = np.any(third["memory_s"] != second["memory_s"], axis=1)
  assert set(np.flatnonzero(changed)) == set(real)
  assert (float(third["z_s"]), float(third["z_t"])) == z  # set once
  assert all(np.isfinite(m["student/crd"]) for m in metrics)
  # The embeddings train with the student.
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                       states[-1].modules, states[0].modules)
  assert min(jax.tree.leaves(moved)) > 0


def test_one_and_eight_devices_agree_including_the_memory():
  with jax.enable_x64(True):
    c = tiny_crd_config(dtype="float64")
    one = run_steps(c, parallel.make_mesh(jax.devices()[:1]), 2)[0][-1]
    eight = run_steps(c, parallel.make_mesh(), 2)[0][-1]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9,
                                                       atol=1e-12), one, eight)


def test_sigterm_mid_epoch_resumes_bit_identically_with_the_memory(
    tmp_path, monkeypatch):
  whole = train.run(tiny_crd_config(), str(tmp_path / "whole"))["crd"].state
  create, calls = data_lib.create_datasets, []

  def stop_in_second_epoch(*args, **kwargs):
    train_data, eval_data = create(*args, **kwargs)
    epoch_fn = train_data.epoch

    def epoch(e, start_step=0):
      for batch in epoch_fn(e, start_step):
        calls.append(e)
        if len(calls) == 3 + 3 + 1:  # teacher epoch, CRD epoch 1, 1 step
          os.kill(os.getpid(), signal.SIGTERM)
        yield batch

    train_data.epoch = epoch
    return train_data, eval_data

  monkeypatch.setattr(train.data_lib, "create_datasets", stop_in_second_epoch)
  with pytest.raises(train.Preempted):
    train.run(tiny_crd_config(), str(tmp_path / "parts"))
  monkeypatch.undo()
  resumed = train.run(tiny_crd_config(), str(tmp_path / "parts"))["crd"].state
  for part in ("buffers", "modules", "student"):
    jax.tree.map(np.testing.assert_array_equal,
                 jax.device_get(getattr(whole, part)),
                 jax.device_get(getattr(resumed, part)))


def test_crd_on_imagenet_is_refused_in_one_line():
  c = tiny_crd_config(**{"data.name": "imagenet2012"})
  with pytest.raises(errors.ConfigError, match="dataset index"):
    config_checks.validate(c)
