"""Studies through the driver: R runs trained as one program leave what R
separate runs would (per-run summaries, checkpoints, models), a diverging
run is frozen and reported while the others finish, and a stopped study
resumes exactly."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from slkd_jax import checkpoint, errors, evaluate, metrics, parallel, report
from slkd_jax import config_checks
from slkd_jax import train

from test_train import _wrap_datasets, assert_trees_equal, restore_final
from test_train import tiny_config as synthetic_config

SEEDS = (0, 1, 2, 3)
TEMPERATURES = (4.0, 4.0, 2.0, 1.0)


def small_config(**overrides):
  """test_train's tiny run with 10 classes, 64 train images (3 steps of 24,
  the last one padded) and 40 test images, and one SL-T."""
  return synthetic_config(**{
      "data.num_classes": 10, "data.num_train": 64, "data.num_test": 40,
      "batch_size": 24, "eval_batch_size": 40, "slkd.num_slts": 1,
      "log_every_steps": 2, **overrides})


def study_config(**overrides):
  c = small_config(**overrides)
  c.study.seeds = SEEDS
  c.study.vary.temperature = TEMPERATURES
  c.study.impl = "vmap"  # as kd_study's
  return c


def kd_study(seeds, **study):
  """A KD study of test_train's tiny run. vmap: one copy of the step to
  compile rather than one per run; the driver is the same for both impls
  (test_train.py's two-process study runs the CPU default, unrolled, and
  tests/test_studies.py checks both impls step by step)."""
  config = synthetic_config(method="kd")
  config.study.seeds = seeds
  config.study.impl = "vmap"
  config.study.update(study)
  return config


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("study"))
  return workdir, train.run(study_config(), workdir)


def test_a_study_of_4_seeds_equals_4_separate_runs(small_study, tmp_path):
  workdir, results = small_study
  assert sorted(results) == ["runs/0/slkd", "runs/1/slkd", "runs/2/slkd",
                             "runs/3/slkd", "teacher"]
  for r, (seed, t) in enumerate(zip(SEEDS, TEMPERATURES)):
    # The separate run the docs promise: its seed and temperature, the
    # study's data order (run 0's) and the study's teacher.
    alone = small_config(**{"seed": seed, "loss.temperature": t,
                            "data.order_seed": SEEDS[0],
                            "teacher.checkpoint": workdir})
    single = train.run(alone, str(tmp_path / str(r)))["slkd"]
    together = results[f"runs/{r}/slkd"]
    # float32: the two programs may round differently; none of the 40
    # test images has a prediction that close to a tie.
    for a, b in zip(together.history, single.history):
      for key in ("student/top1", "student/top5", "slt_0/top1",
                  "slt_fused/top1"):
        assert a[key] == b[key], (r, key)
      np.testing.assert_allclose(a["student/ce"], b["student/ce"], rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4,
                                                         atol=1e-6),
                 jax.device_get(together.state.student.params),
                 jax.device_get(single.state.student.params))
    run_summary = open(os.path.join(workdir, "runs", str(r), "slkd",
                                    "summary.md")).read()
    assert run_summary.split("\n", 1)[1] == open(
        tmp_path / str(r) / "slkd" / "summary.md").read().split("\n", 1)[1]


def test_each_run_reads_as_a_separate_workdir(small_study, capsys):
  """report and evaluate work on ``runs/<r>`` unchanged; the best
  checkpoint reproduces the run's reported best top-1 exactly."""
  workdir, results = small_study
  run_dirs = [os.path.join(workdir, "runs", str(r)) for r in range(4)]
  stage_runs = report.load_runs(run_dirs)
  assert [s.stage for s in stage_runs] == ["slkd"] * 4
  assert all(s.finished for s in stage_runs)
  mesh = parallel.make_mesh()
  rows = evaluate.evaluate_stage(run_dirs[2], "slkd", "best", mesh)
  best, best_epoch, _ = metrics.best_and_last(
      results["runs/2/slkd"].history, "student/top1")
  student = next(row for row in rows if row["network"] == "student")
  assert (student["epoch"], student["top-1"]) == (best_epoch, best)
  # The study's workdir: its teacher stage, then every run's stages.
  rows = evaluate.evaluate_workdir(workdir, None, "best", mesh)
  assert [row["stage"] for row in rows if row["network"] == "student"] == [
      "teacher", *(f"runs/{r}/slkd" for r in range(4))]
  assert next(row for row in rows if row["stage"] == "runs/2/slkd"
              and row["network"] == "student") == student | {
                  "stage": "runs/2/slkd"}
  saved = json.load(open(os.path.join(run_dirs[3], "slkd", "config.json")))
  assert (saved["seed"], saved["loss"]["temperature"]) == (3, 1.0)
  assert saved["data"]["order_seed"] == 0 and saved["study"]["seeds"] is None
  study = json.load(open(os.path.join(workdir, "slkd", "study.json")))
  assert [row["status"] for row in study["runs"]] == ["done"] * 4
  summary = open(os.path.join(workdir, "summary.md")).read()
  assert "mean ± std (4/4)" in summary
  # The study's workdir stands for its runs; they differ in temperature.
  assert report.main([workdir]) == 2
  assert "loss.temperature" in capsys.readouterr().err
  assert report.main([workdir, "--ignore", "loss.temperature"]) == 0
  slkd = next(line for line in capsys.readouterr().out.splitlines()
              if line.startswith("| slkd"))
  assert [c.strip() for c in slkd.split("|")][2:4] == ["4", "0,1,2,3"]


def _poison(monkeypatch, dataset: int):
  """NaN images in step 1 of epoch 1 (global step 5) of the ``dataset``-th
  training set created (0: the run's own, 1, 2, ...: a study's per-run
  ones)."""
  def poison(epoch, step, batch):
    if epoch == 1 and step == 1:
      batch = dict(batch, image=batch["image"] * np.nan)
    return batch

  _wrap_datasets(monkeypatch, poison, dataset)


def test_a_diverging_run_is_frozen_reported_and_left_out(tmp_path,
                                                         monkeypatch):
  config = kd_study((5, 6, 7), shared_data=False)
  _poison(monkeypatch, dataset=2)  # run 1's
  results = train.run(config, str(tmp_path))
  study = json.load(open(tmp_path / "kd" / "study.json"))
  statuses = [row["status"] for row in study["runs"]]
  assert statuses[0] == statuses[2] == "done"
  assert statuses[1].startswith("diverged at step 5 (") and "loss" in (
      statuses[1])
  assert [len(results[f"runs/{r}/kd"].history) for r in range(3)] == [2, 1, 2]
  summary = open(tmp_path / "kd" / "summary.md").read()
  assert "mean ± std (2/3)" in summary
  # The frozen run reads as unfinished, the others as finished.
  runs = report.load_runs([str(tmp_path / "runs" / str(r)) for r in range(3)])
  assert [r.finished for r in runs] == [True, False, True]


def test_a_study_where_every_run_diverges_stops_in_one_line(tmp_path,
                                                           monkeypatch):
  config = kd_study((0, 1))
  # The study's shared order is run 0's, seed 0: the teacher's dataset,
  # reused (the teacher trains in its epoch 0 only).
  _poison(monkeypatch, dataset=0)
  with pytest.raises(errors.NonFiniteLossError,
                     match="every run diverged .*step 5"):
    train.run(config, str(tmp_path))


def test_a_stopped_study_resumes_exactly(tmp_path, monkeypatch):
  config = kd_study((0, 1), shared_data=False)  # each run its own order
  whole = str(tmp_path / "whole")
  train.run(config, whole)
  calls = []

  def sigterm_in_second_epoch(epoch, step, batch):
    calls.append((epoch, step))
    # teacher epoch (3), study epoch 1, then one step more: every study
    # step reads both runs' datasets
    if len(calls) == 3 + 2 * (3 + 1):
      os.kill(os.getpid(), signal.SIGTERM)
    return batch

  _wrap_datasets(monkeypatch, sigterm_in_second_epoch)
  stopped = str(tmp_path / "stopped")
  with pytest.raises(train.Preempted, match="rerun the same command"):
    train.run(config, stopped)
  saved = checkpoint.Checkpointer(os.path.join(stopped, "kd", "checkpoints"))
  assert saved.all_steps()[-1] == 4
  saved.close()
  monkeypatch.undo()
  results = train.run(config, stopped)
  assert_trees_equal(restore_final(os.path.join(stopped, "kd")),
                     restore_final(os.path.join(whole, "kd")))
  assert [h["epoch"] for h in results["runs/1/kd"].history] == [1, 2]
  records = metrics.read_jsonl(os.path.join(stopped, "runs", "1", "kd",
                                            "metrics.jsonl"))
  steps = [r["step"] for r in records if "train/loss" in r]
  assert steps == sorted(set(steps)) == list(range(1, 7))


@pytest.mark.parametrize("key,value,message", [
    ("study.seeds", (0, -1), "study.seeds"),
    ("study.vary.temperature", (2.0,), "study.vary.temperature"),
    ("study.impl", "pmap", "study.impl"),
    ("study.vary.learning_rate", (0.1, -1.0), "study run 1: .*learning_rate"),
])
def test_bad_study_configs_are_one_line_errors(key, value, message):
  config = synthetic_config(method="kd")
  config.study.seeds = (0, 1)
  section, _, name = key.rpartition(".")
  target = config
  for part in section.split("."):
    target = target[part]
  target[name] = value
  with pytest.raises(errors.ConfigError, match=message):
    config_checks.validate(config)
