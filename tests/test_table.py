"""``python -m slkd_jax.table``: a tiny table runs, skips what is done,
resumes after a stop, and its cells are the runs' own numbers; the SLKD
Table 1 config plans every cell with the paper's number."""

import json
import os
import signal

import numpy as np
import pytest

from slkd_jax import data as data_lib
from slkd_jax import errors, metrics, report, table, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Synthetic 8×8 data, 40 examples (3 steps of 16), resnet8 everywhere,
# one epoch: every run of the table takes seconds.
TINY = {"data": {"name": "synthetic", "image_size": 8, "num_classes": 5,
                 "num_train": 40, "num_test": 20},
        "batch_size": 16, "eval_batch_size": 16, "num_epochs": 1,
        "log_every_steps": 1, "checkpoint_every_epochs": 1,
        "teacher": {"arch": "resnet8", "num_epochs": 1},
        "student": {"arch": "resnet8"}}


def tiny_spec(rows=("ce", "kd"), seeds=(0, 1)):
  return table.table_config(
      title="tiny", presets=os.path.join(REPO, "configs", "quickstart.py"),
      pairs=("resnet14-resnet8",), rows=rows, seeds=seeds, overrides=TINY)


@pytest.fixture(scope="module")
def finished_table(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("table"))
  return workdir, table.run_table(tiny_spec(), workdir, out=lambda _: None)


def test_cells_are_mean_and_std_of_the_runs_own_best_top1(finished_table):
  """Each cell's two seeds trained as one study; its runs read as
  separate workdirs."""
  workdir, records = finished_table
  assert len(records) == 4 and all(r["finished"] for r in records)
  for row in ("ce", "kd"):
    cell = os.path.join(workdir, "runs", "resnet14-resnet8", row)
    study = json.load(open(os.path.join(cell, row, "study.json")))
    assert [r["seed"] for r in study["runs"]] == [0, 1]
    runs = report.load_runs([os.path.join(cell, "runs", str(i))
                             for i in (0, 1)])
    best = [metrics.best_and_last(r.result, "student/top1")[0] for r in runs
            if r.stage == row]
    assert len(best) == 2
    text = open(os.path.join(workdir, "table.md")).read()
    assert f"| {row} | {metrics.mean_std(best)} " in text
  assert json.load(open(os.path.join(workdir, "table.json"))) == records
  header = open(os.path.join(workdir, "table.csv")).readline().strip()
  assert header.split(",")[:4] == ["row", "method", "pair", "seed"]
  # The distilled runs share the one teacher the table trained.
  teacher = os.path.join(workdir, "teachers", "resnet8", "ce", "final_model")
  kd = json.load(open(os.path.join(workdir, "runs", "resnet14-resnet8", "kd",
                                   "runs", "1", "config.json")))
  assert kd["teacher"]["checkpoint"] == teacher and kd["seed"] == 1


def test_a_finished_table_reruns_without_training(finished_table,
                                                  monkeypatch):
  workdir, records = finished_table

  def no_training(*_):
    raise AssertionError("a finished run was trained again")

  monkeypatch.setattr(train, "run", no_training)
  lines = []
  assert table.run_table(tiny_spec(), workdir, out=lines.append) == records
  assert lines[-1].startswith("table: all 4 runs finished")


def test_a_stopped_table_resumes_to_the_same_numbers(finished_table, tmp_path,
                                                     monkeypatch):
  _, uninterrupted = finished_table
  create, batches = data_lib.create_datasets, []

  def sigterm_in_the_third_run(*args, **kwargs):
    train_data, eval_data = create(*args, **kwargs)
    epoch_fn = train_data.epoch

    def epoch(e, start_step=0):
      for batch in epoch_fn(e, start_step):
        batches.append(e)
        # teacher, the ce cell (its first batch compiles), 2 steps of kd
        if len(batches) == 3 + (1 + 3) + (1 + 2):
          os.kill(os.getpid(), signal.SIGTERM)
        yield batch

    train_data.epoch = epoch
    return train_data, eval_data

  monkeypatch.setattr(train.data_lib, "create_datasets",
                      sigterm_in_the_third_run)
  with pytest.raises(train.Preempted):
    table.run_table(tiny_spec(), str(tmp_path), out=lambda _: None)
  assert len(batches) == 3 + 4 + 3  # stopped in the kd cell
  monkeypatch.undo()
  resumed = table.run_table(tiny_spec(), str(tmp_path), out=lambda _: None)
  for a, b in zip(resumed, uninterrupted):
    assert (a["best_top1"], a["last_top1"]) == (b["best_top1"],
                                                b["last_top1"])


def test_runs_one_after_the_other_have_their_own_workdirs():
  spec = tiny_spec()
  spec.one_program = False
  runs = table.plan(spec, "/t")
  assert [r.workdir for r in runs[:2]] == [
      "/t/runs/resnet14-resnet8/ce/seed_0", "/t/runs/resnet14-resnet8/ce/seed_1"]
  assert [r.cell_dir for r in runs[:2]] == [r.workdir for r in runs[:2]]


def test_dry_run_of_table1_lists_every_cell_with_the_paper_number():
  lines = []
  cells = table.dry_run(
      table.load_presets(os.path.join(REPO, "configs", "tables",
                                      "slkd_table1.py")).get_config(),
      "/nonexistent", measure=False, out=lines.append)
  assert len(cells) == 10 * 6
  slkd = next(c for c in cells if (c["row"], c["pair"]) == (
      "slkd", "resnet32x4-resnet8x4"))
  assert slkd["paper"] == 76.85 and slkd["runs"] == 3
  assert slkd["images_per_run"] == 50_000 * 240
  assert "60 cells, 180 runs" in lines[-1]


def test_dry_run_measures_a_step():
  """Of the cell's study (its two seeds in one step)."""
  cells = table.dry_run(tiny_spec(rows=("kd",), seeds=(0, 1)), "/nonexistent",
                        measure=True, out=lambda _: None)
  assert np.isfinite(cells[0]["seconds_per_run"])
  assert cells[0]["seconds_per_run"] > 0


@pytest.mark.parametrize("spec_change,message", [
    ({"rows": ("kdd",)}, "did you mean 'kd'"),
    ({"overrides": {"optim": {"lr": 1}}}, "no key 'lr'"),
    ({"presets": "configs/nope.py"}, "no such file"),
])
def test_a_bad_table_config_fails_in_one_line(spec_change, message):
  spec = tiny_spec()
  for key, value in spec_change.items():
    spec[key] = value
  with pytest.raises(errors.ConfigError, match=message):
    table.plan(spec, "/nonexistent")


def test_the_command_reports_a_bad_config_in_one_line(capsys):
  status = table.main(["--config=configs/tables/nope.py",
                       "--workdir=/tmp/x"])
  assert status == 2
  assert capsys.readouterr().err.count("\n") == 1
