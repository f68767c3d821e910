"""The training driver: stages, exact resume, SIGTERM, NaN guard, CLI,
checkpoint fallback and multi-process runs."""

import glob
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from slkd_jax import checkpoint, metrics, parallel, train
from slkd_jax import config as config_lib
from slkd_jax import data as data_lib
from conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  """Synthetic 8×8 data, 5 classes, 3 steps per epoch, resnet8 everywhere."""
  c = config_lib.base_config()
  c.data.name = "synthetic"
  c.data.image_size = 8
  c.data.num_classes = 5
  c.data.num_train = 40  # 3 steps of 16, the last one padded (masked)
  c.data.num_test = 20
  c.batch_size = 16
  c.eval_batch_size = 16
  c.teacher.arch = "resnet8"
  c.teacher.num_epochs = 1
  c.student.arch = "resnet8"
  c.num_epochs = 2
  c.log_every_steps = 1
  c.checkpoint_every_epochs = 1
  for key, value in overrides.items():
    target = c
    *path, leaf = key.split(".")
    for part in path:
      target = target[part]
    target[leaf] = value
  return c


def restore_final(stage_dir):
  """The latest checkpoint's state of a stage as numpy (no target needed)."""
  steps = sorted(int(os.path.basename(p)) for p in
                 glob.glob(os.path.join(stage_dir, "checkpoints", "[0-9]*")))
  path = os.path.join(stage_dir, "checkpoints", str(steps[-1]), "state")
  # Saved on another device count: restore into this process's devices.
  replicated = parallel.replicated(parallel.make_mesh())
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(path).item_metadata
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated),
        meta)
    return jax.device_get(ckptr.restore(path, target))


def assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """Teacher stage (1 epoch) + SLKD stage (2 epochs), in one go."""
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  results = train.run(tiny_config(), workdir)
  return workdir, results


def test_run_writes_stages_checkpoints_metrics_and_plots(uninterrupted):
  workdir, results = uninterrupted
  assert list(results) == ["teacher", "slkd"]
  for stage in ("teacher", "slkd"):
    stage_dir = os.path.join(workdir, stage)
    assert glob.glob(os.path.join(stage_dir, "checkpoints", "[0-9]*"))
    assert glob.glob(os.path.join(stage_dir, "tensorboard", "events.out.*"))
    assert os.path.exists(os.path.join(stage_dir, "summary.md"))
  records = metrics.read_jsonl(os.path.join(workdir, "slkd", "metrics.jsonl"))
  train_records = [r for r in records if "train/loss" in r]
  eval_records = [r for r in records if "eval/student/top1" in r]
  assert [r["step"] for r in train_records] == list(range(1, 7))
  assert len(eval_records) == 2
  last = eval_records[-1]
  for key in ("student", "teacher", "slt_0", "slt_1", "slt_fused"):
    assert 0 <= last[f"eval/{key}/top1"] <= last[f"eval/{key}/top5"] <= 100
  assert last["eval/eval_examples"] == 20  # every test example, once
  plots = sorted(os.listdir(os.path.join(workdir, "slkd", "plots")))
  assert plots == ["accuracy.png", "trajectory.png"]
  summary = open(os.path.join(workdir, "summary.md")).read()
  assert "| teacher" in summary and "| slkd" in summary
  # The teacher the SLKD stage used is the teacher stage's result.
  assert_trees_equal(results["slkd"].teacher.params,
                     results["teacher"].state.student.params)


def test_summaries_name_each_network_by_its_role(uninterrupted):
  """The teacher stage's trained network is the teacher (it fills the
  metrics' ``student`` slot); the frozen teacher has no best epoch."""
  workdir, _ = uninterrupted
  teacher = open(os.path.join(workdir, "teacher", "summary.md")).read()
  assert "| teacher " in teacher and "student" not in teacher
  slkd = open(os.path.join(workdir, "slkd", "summary.md")).read()
  (frozen,) = [line for line in slkd.splitlines() if "teacher" in line]
  cells = [c.strip() for c in frozen.strip("|").split("|")]
  assert cells[0] == "teacher (frozen)" and cells[2] == "-"
  assert any(line.startswith("| student ") for line in slkd.splitlines())


def test_resume_equals_uninterrupted_run(uninterrupted, tmp_path):
  workdir, _ = uninterrupted
  resumed = str(tmp_path)
  train.run(tiny_config(num_epochs=1), resumed)  # stop after epoch 1...
  results = train.run(tiny_config(), resumed)    # ...and resume to epoch 2
  assert_trees_equal(restore_final(os.path.join(resumed, "slkd")),
                     restore_final(os.path.join(workdir, "slkd")))
  assert [h["epoch"] for h in results["slkd"].history] == [1, 2]


def _wrap_datasets(monkeypatch, on_batch, dataset=None):
  """Make every training epoch call ``on_batch(epoch, step, batch)``: of
  every training set, or only of the ``dataset``-th one created (0: the
  run's own; then a study's per-run ones)."""
  create, created = data_lib.create_datasets, []

  def wrapped(*args, **kwargs):
    train_data, eval_data = create(*args, **kwargs)
    created.append(train_data)
    if dataset is not None and len(created) - 1 != dataset:
      return train_data, eval_data
    epoch_fn = train_data.epoch

    def epoch(e, start_step=0):
      for i, batch in enumerate(epoch_fn(e, start_step), start_step):
        yield on_batch(e, i, batch)

    train_data.epoch = epoch
    return train_data, eval_data

  monkeypatch.setattr(train.data_lib, "create_datasets", wrapped)


def test_sigterm_mid_epoch_saves_and_resume_matches(uninterrupted, tmp_path,
                                                    monkeypatch):
  workdir, _ = uninterrupted
  calls = []

  def sigterm_in_second_epoch(epoch, step, batch):
    calls.append((epoch, step))
    if len(calls) == 3 + 3 + 1:  # teacher epoch, SLKD epoch 1, 1 step more
      os.kill(os.getpid(), signal.SIGTERM)
    return batch

  _wrap_datasets(monkeypatch, sigterm_in_second_epoch)
  with pytest.raises(train.Preempted, match="rerun the same command"):
    train.run(tiny_config(), str(tmp_path))
  saved = checkpoint.Checkpointer(str(tmp_path / "slkd" / "checkpoints"))
  assert saved.all_steps()[-1] == 4  # 3 steps of epoch 1 + 1 of epoch 2
  saved.close()
  monkeypatch.undo()
  results = train.run(tiny_config(), str(tmp_path))
  assert_trees_equal(restore_final(str(tmp_path / "slkd")),
                     restore_final(os.path.join(workdir, "slkd")))
  assert len(results["slkd"].history) == 2


def test_non_finite_loss_stops_with_step_and_term(tmp_path, monkeypatch):
  def poison(epoch, step, batch):
    if epoch == 1 and step == 1:
      batch = dict(batch, image=batch["image"] * np.nan)
    return batch

  _wrap_datasets(monkeypatch, poison)
  config = tiny_config(method="kd", **{"teacher.num_epochs": 1})
  with pytest.raises(train.NonFiniteLossError,
                     match=r"non-finite .*loss.* at step 5\. The last good "
                           r"checkpoint is step 3"):
    train.run(config, str(tmp_path))
  saved = checkpoint.Checkpointer(str(tmp_path / "kd" / "checkpoints"))
  assert saved.all_steps() == [3]  # nothing written after the NaN
  saved.close()


def _target(mesh, seed=0):
  return {"w": jax.device_put(np.arange(16.0, dtype=np.float32) + seed,
                              parallel.replicated(mesh))}


def test_checkpoint_restores_onto_another_device_count(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(1, _target(parallel.make_mesh()), {"epoch": 1})
  ckpt.wait()
  one_device = parallel.make_mesh(jax.devices()[:1])
  state, meta = ckpt.restore_latest(
      checkpoint.abstract_like(_target(one_device), one_device))
  ckpt.close()
  assert meta == {"epoch": 1}
  assert state["w"].sharding.mesh.size == 1
  np.testing.assert_array_equal(state["w"], np.arange(16.0))


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, caplog):
  mesh = parallel.make_mesh()
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=3)
  for step in (1, 2):
    ckpt.save(step, _target(mesh, step), {"epoch": step})
  ckpt.wait()
  for path in glob.glob(str(tmp_path / "2" / "state" / "**" / "*"),
                        recursive=True):
    if os.path.isfile(path):
      with open(path, "wb") as f:
        f.write(b"garbage")
  target = checkpoint.abstract_like(_target(mesh), mesh)
  state, meta = ckpt.restore_latest(target)
  assert meta == {"epoch": 1}
  np.testing.assert_array_equal(state["w"], np.arange(16.0) + 1)
  # Nothing readable left: a clear error that says what to do.
  for path in glob.glob(str(tmp_path / "1" / "state" / "**" / "*"),
                        recursive=True):
    if os.path.isfile(path):
      with open(path, "wb") as f:
        f.write(b"garbage")
  with pytest.raises(checkpoint.CheckpointError, match="Move the directory"):
    ckpt.restore_latest(target)
  ckpt.close()


def _cli_env(devices):
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags(xla_force_host_platform_device_count=devices)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHON"] = sys.executable
  return env


def _cli_flags(workdir, *extra):
  return [
      "--config=configs/cifar100.py", f"--workdir={workdir}",
      "--config.data.name=synthetic", "--config.data.image_size=8",
      "--config.data.num_classes=5", "--config.data.num_train=40",
      "--config.data.num_test=20", "--config.batch_size=16",
      "--config.eval_batch_size=16", "--config.teacher.arch=resnet8",
      "--config.teacher.num_epochs=1", "--config.student.arch=resnet8",
      "--config.num_epochs=1", "--config.log_every_steps=1", *extra]


def test_cli_rejects_bad_config_values(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "slkd_jax.main",
       *_cli_flags(tmp_path, "--config.slkd.num_slts=0")],
      cwd=REPO, env=_cli_env(1), capture_output=True, text=True, timeout=300)
  assert out.returncode == 2
  assert "config.slkd.num_slts=0 is invalid: an int >= 1" in out.stderr
  assert "Traceback" not in out.stderr
  assert not os.path.exists(tmp_path / "slkd")


def test_two_processes_match_one_process(tmp_path):
  """2 processes × 2 CPU devices (jax.distributed on localhost) give the
  same runs as 1 process × 4 devices: the teacher stage (a single run) and
  a 2-seed SLKD study (``--config.study.seeds`` on the command line), and
  every run's files are complete. One launch covers both (each launch
  starts and compiles three processes)."""
  flags = ["--config.slkd.num_slts=1",  # the processes are tested, not K
           "--config.study.seeds=(3,4)"]
  single = subprocess.run(
      [sys.executable, "-m", "slkd_jax.main",
       *_cli_flags(tmp_path / "one", *flags)],
      cwd=REPO, env=_cli_env(4), capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  assert "2 runs in one program" in single.stderr
  env = _cli_env(2)
  env["SLKD_LOCAL_DEVICES"] = "2"
  multi = subprocess.run(
      ["bash", "launch/local.sh", "2", *_cli_flags(tmp_path / "two", *flags)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert multi.returncode == 0, multi.stderr[-3000:]
  assert "processes: 2" in multi.stderr
  runs = [("teacher",), *(("runs", str(r), "slkd") for r in (0, 1))]
  for run in runs:
    one, two = (metrics.read_jsonl(str(tmp_path.joinpath(w, *run,
                                                         "metrics.jsonl")))
                for w in ("one", "two"))
    assert [x["step"] for x in one] == [x["step"] for x in two], run
    final_eval = max(i for i, x in enumerate(one) if "eval/student/ce" in x)
    for i in (final_eval, -1):
      for key, value in one[i].items():
        if isinstance(value, float):
          assert two[i][key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
    for name in ("best", "checkpoints"):
      assert os.listdir(tmp_path.joinpath("two", *run, name)), run
  # Same parameters up to the float reassociation of a different
  # all-reduce topology.
  for stage in ("teacher", "slkd"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                         atol=1e-5),
                 restore_final(str(tmp_path / "one" / stage)),
                 restore_final(str(tmp_path / "two" / stage)))
  assert json.load(open(tmp_path / "two" / "config.json"))["method"] == "slkd"


def test_teacher_from_converted_checkpoint_and_previous_workdir(
    uninterrupted, tmp_path):
  from slkd_jax import convert_torch
  workdir, first = uninterrupted
  # A previous run's workdir: its finished teacher stage.
  from_workdir = train.run(
      tiny_config(method="kd", num_epochs=1,
                  **{"teacher.checkpoint": workdir}), str(tmp_path / "a"))
  assert "teacher" not in from_workdir  # no teacher stage this time
  assert_trees_equal(from_workdir["kd"].teacher.params,
                     first["teacher"].state.student.params)
  # A teacher written by the converter (e.g. from a PyTorch zoo checkpoint).
  teacher = jax.device_get(first["teacher"].state.student)
  saved = convert_torch.save_teacher(
      {"params": teacher.params, "batch_stats": teacher.batch_stats},
      str(tmp_path / "converted"), "resnet8", 5)
  from_converted = train.run(
      tiny_config(method="kd", num_epochs=1,
                  **{"teacher.checkpoint": saved}), str(tmp_path / "b"))
  assert_trees_equal(from_converted["kd"].teacher.batch_stats,
                     teacher.batch_stats)
  with pytest.raises(ValueError, match="holds a 'resnet8'.*'resnet14'"):
    train.run(tiny_config(method="kd", **{"teacher.checkpoint": saved,
                                          "teacher.arch": "resnet14"}),
              str(tmp_path / "c"))


# ---------------------------------------------------------------------------
# Runs never lose or misreport work.


def test_best_checkpoint_and_models_reproduce_the_reported_best(
    uninterrupted):
  from slkd_jax import artifact, evaluate
  workdir, results = uninterrupted
  mesh = parallel.make_mesh()
  for stage in ("teacher", "slkd"):
    history = results[stage].history
    best, best_epoch, _ = metrics.best_and_last(history, "student/top1")
    rows = evaluate.evaluate_stage(workdir, stage, "best", mesh)
    by_net = {r["network"]: r for r in rows}
    assert by_net["student"]["epoch"] == best_epoch
    assert by_net["student"]["top-1"] == best  # exactly the reported number
    record = history[best_epoch - 1]
    for net, row in by_net.items():
      assert row["top-5"] == record[f"{net}/top5"], (stage, net)
    for name in ("best_model", "final_model"):
      assert artifact.is_artifact(os.path.join(workdir, stage, name))
  # SLKD's networks: student, teacher, each SL-T and their fusion.
  assert {"student", "teacher", "slt_0", "slt_1", "slt_fused"} == set(by_net)
  # The standalone best student gives the same top-1 on the same data.
  model_rows = evaluate.evaluate_model(
      os.path.join(workdir, "slkd", "best_model"), tiny_config(), None, mesh)
  assert model_rows[0]["top-1"] == by_net["student"]["top-1"]
  # The frozen teacher is stored once, not in the checkpoints.
  assert artifact.is_artifact(os.path.join(workdir, "frozen_teacher"))
  assert not restore_final(os.path.join(workdir, "slkd")).get("teacher")


def _copy(workdir, tmp_path):
  import shutil
  target = str(tmp_path / "copy")
  shutil.copytree(workdir, target)
  return target


@pytest.mark.parametrize("key,value", [
    ("batch_size", 8), ("student.arch", "resnet14"), ("seed", 3),
    ("recipes.slkd.temperature", 2.0)])
def test_resume_with_a_changed_meaning_fails_in_one_line(
    uninterrupted, tmp_path, key, value):
  workdir = _copy(uninterrupted[0], tmp_path)
  with pytest.raises(config_lib.errors.ConfigError) as e:
    train.run(tiny_config(**{key: value}), workdir)
  message = str(e.value)
  assert "\n" not in message and "new --workdir" in message
  shown = "loss.temperature" if key.startswith("recipes") else key
  assert shown in message


def test_a_different_teacher_is_refused(uninterrupted, tmp_path):
  workdir = _copy(uninterrupted[0], tmp_path)
  # Extending the teacher after the distillation started: the stages would
  # silently mix teachers.
  with pytest.raises(config_lib.errors.ConfigError,
                     match=r"teacher.num_epochs=1.*teacher.num_epochs=2"):
    train.run(tiny_config(**{"teacher.num_epochs": 2}), workdir)
  # Cadence keys may change: the finished run is reused as it is.
  results = train.run(tiny_config(log_every_steps=2), workdir)
  assert [h["epoch"] for h in results["slkd"].history] == [1, 2]


def test_metrics_hold_each_epoch_once_after_a_crash(tmp_path, monkeypatch):
  def crash_in_epoch_two(epoch, step, batch):
    if epoch == 1 and step == 1:
      raise RuntimeError("simulated crash")
    return batch

  config = tiny_config(method="ce", num_epochs=2, checkpoint_every_epochs=2)
  _wrap_datasets(monkeypatch, crash_in_epoch_two)
  with pytest.raises(RuntimeError, match="simulated crash"):
    train.run(config, str(tmp_path))  # epoch 1 evaluated, never saved
  monkeypatch.undo()
  train.run(config, str(tmp_path))
  records = metrics.read_jsonl(str(tmp_path / "ce" / "metrics.jsonl"))
  assert [r["epoch"] for r in records if "eval/student/top1" in r] == [1, 2]
  steps = [r["step"] for r in records if "train/loss" in r]
  assert steps == sorted(set(steps)) == list(range(1, 7))


def test_sigint_saves_like_sigterm(tmp_path, monkeypatch):
  def ctrl_c(epoch, step, batch):
    if (epoch, step) == (0, 1):
      os.kill(os.getpid(), signal.SIGINT)
    return batch

  _wrap_datasets(monkeypatch, ctrl_c)
  with pytest.raises(train.Preempted):
    train.run(tiny_config(method="ce", num_epochs=1), str(tmp_path))
  saved = checkpoint.Checkpointer(str(tmp_path / "ce" / "checkpoints"))
  assert saved.all_steps() == [2]
  saved.close()


def test_a_non_finite_loss_is_never_saved_on_preemption(tmp_path,
                                                        monkeypatch):
  def poison_and_stop(epoch, step, batch):
    if (epoch, step) == (0, 1):
      os.kill(os.getpid(), signal.SIGTERM)
      batch = dict(batch, image=batch["image"] * np.nan)
    return batch

  _wrap_datasets(monkeypatch, poison_and_stop)
  with pytest.raises(train.NonFiniteLossError, match="at step 2"):
    train.run(tiny_config(method="ce", num_epochs=1), str(tmp_path))
  saved = checkpoint.Checkpointer(str(tmp_path / "ce" / "checkpoints"))
  assert saved.all_steps() == []
  saved.close()


def test_damaged_checkpoints_are_one_line_each(tmp_path, caplog):
  mesh = parallel.make_mesh()
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=3)
  for step in (1, 2, 3):
    ckpt.save(step, _target(mesh, step), {"epoch": step})
  ckpt.wait()
  for step in (2, 3):  # truncate every file of the two newest
    for path in glob.glob(str(tmp_path / str(step) / "**" / "*"),
                          recursive=True):
      if os.path.isfile(path):
        open(path, "wb").close()
  caplog.clear()
  _, meta = ckpt.restore_latest(checkpoint.abstract_like(_target(mesh), mesh))
  assert meta == {"epoch": 1}
  damaged = [r for r in caplog.records if "is damaged" in r.getMessage()]
  assert [r.getMessage().split()[2] for r in damaged] == ["3", "2"]
  assert len(caplog.records) <= 4  # no flood of library errors
  # Saving over a damaged step replaces it.
  ckpt.save(3, _target(mesh, 30), {"epoch": 30})
  ckpt.wait()
  state, meta = ckpt.restore_latest(
      checkpoint.abstract_like(_target(mesh), mesh))
  assert meta == {"epoch": 30}
  ckpt.close()


def test_unwritable_checkpoint_directory_fails_at_once(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(checkpoint.CheckpointError, match=str(blocker)):
    checkpoint.Checkpointer(str(blocker / "checkpoints"))


@pytest.mark.parametrize("workdir,message", [
    ("", "--workdir is empty"), ("FILE", "is a file"),
    ("FILE/sub", "cannot create")])
def test_bad_workdirs_are_one_line_errors(tmp_path, workdir, message):
  (tmp_path / "FILE").write_text("x")
  path = str(tmp_path / workdir) if workdir else ""
  with pytest.raises(config_lib.errors.ConfigError, match=message):
    train.check_workdir(path)


def test_teacher_workdir_without_a_finished_teacher_is_refused(tmp_path):
  (tmp_path / "old" / "teacher" / "checkpoints").mkdir(parents=True)
  with pytest.raises(config_lib.errors.ConfigError, match="resume it first"):
    train.run(tiny_config(method="kd",
                          **{"teacher.checkpoint": str(tmp_path / "old")}),
              str(tmp_path / "new"))


def test_stop_agreement_spaces_checks_by_time(monkeypatch):
  from jax.experimental import multihost_utils
  from slkd_jax import preemption
  step = 0
  # Every step takes 0.5 s.
  monkeypatch.setattr(preemption.time, "monotonic", lambda: 0.5 * step)
  monkeypatch.setattr(preemption.jax, "process_count", lambda: 2)
  gathers = []

  def allgather(x):
    gathers.append(int(step))
    return np.stack([x, x])

  monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
  stop_signal = preemption.StopSignal()
  agreement = preemption.StopAgreement(stop_signal, check_seconds=5.0)
  for step in range(1, 40):
    if step == 25:
      stop_signal.requested = True
    if agreement.should_stop(step):
      break
  # First check after one measured step, then every 5 s / 0.5 s = 10 steps.
  assert gathers == [2, 12, 22, 32] and step == 32
