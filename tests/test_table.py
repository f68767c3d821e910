"""``python -m slkd_jax.table``: a tiny table runs, skips what is done,
resumes after a stop, and its cells are the runs' own numbers; the SLKD
Table 1 config plans every cell with the paper's number."""

import json
import os
import signal
import threading
import time

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
        # teacher, the ce cell, 2 steps of kd
        if len(batches) == 3 + 3 + 2:
          os.kill(os.getpid(), signal.SIGTERM)
        yield batch

    train_data.epoch = epoch
    return train_data, eval_data

  monkeypatch.setattr(train.data_lib, "create_datasets",
                      sigterm_in_the_third_run)
  with pytest.raises(train.Preempted):
    table.run_table(tiny_spec(), str(tmp_path), out=lambda _: None)
  assert len(batches) == 3 + 3 + 2  # stopped in the kd cell
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


def _paper_table(name):
  return table.load_presets(os.path.join(REPO, "configs", "tables",
                                         name)).get_config()


def test_dry_run_of_table1_lists_every_cell_with_the_paper_number():
  lines = []
  cells = table.dry_run(_paper_table("slkd_table1.py"), "/nonexistent",
                        measure=False, out=lines.append)
  assert len(cells) == 11 * 6  # 10 rows and SLKD* (slkd_seq)
  paper = {(c["row"], c["pair"]): c["paper"] for c in cells}
  slkd = next(c for c in cells if (c["row"], c["pair"]) == (
      "slkd", "resnet32x4-resnet8x4"))
  assert slkd["paper"] == 76.85 and slkd["runs"] == 3
  assert slkd["images_per_run"] == 50_000 * 240
  assert "66 cells, 198 runs" in lines[-1]
  # SLKD* and the comparison rows' published numbers (cifar100.py names
  # each one's source); the cells no source reports stay "-".
  assert paper["slkd_seq", "resnet32x4-resnet8x4"] == 75.61
  assert paper["slkd_seq", "vgg13-vgg11"] == 74.96
  assert paper["at", "resnet32x4-resnet8x4"] == 73.44
  assert paper["crd", "vgg13-vgg8"] == 73.94
  assert paper["ofd", "wrn_40_2-wrn_40_1"] == 74.33
  assert paper["reviewkd", "vgg13-vgg8"] == 74.84
  assert sum(p is not None for p in paper.values()) == 51
  assert sorted(k for k, p in paper.items() if p is None) == sorted(
      [(row, pair) for row in ("at", "sp", "rkd", "ofd", "crd", "reviewkd")
       for pair in ("resnet56-resnet8", "vgg13-vgg11")]
      + [("ofd", "wrn_40_2-wrn_16_2"), ("ofd", "vgg13-vgg8"),
         ("reviewkd", "wrn_40_2-wrn_16_2")])


def test_dry_run_of_table2_has_the_paper_number_of_51_of_55_cells():
  cells = table.dry_run(_paper_table("slkd_table2.py"), "/nonexistent",
                        measure=False, out=lambda _: None)
  paper = {(c["row"], c["pair"]): c["paper"] for c in cells}
  assert len(cells) == 11 * 5
  assert paper["slkd_seq", "ResNet50-MobileNetV2"] == 68.29
  assert paper["sp", "ResNet50-MobileNetV2"] == 68.08
  assert paper["reviewkd", "resnet32x4-ShuffleV2"] == 77.78
  assert sorted(k for k, p in paper.items() if p is None) == sorted(
      (row, pair) for row in ("ofd", "reviewkd")
      for pair in ("vgg13-MobileNetV2", "wrn_40_2-ShuffleV1"))


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


# ---------------------------------------------------------------------------
# --shard=I/N: several jobs share one table.


@pytest.mark.parametrize("text,shard", [("0/1", (0, 1)), ("3/4", (3, 4)),
                                        (None, None)])
def test_shard_parses_job_i_of_n_counted_from_0(text, shard):
  parsed = table.parse_shard(text)
  assert (parsed if parsed is None else (parsed.index, parsed.count)) == shard


@pytest.mark.parametrize("text", ["4/4", "-1/2", "1", "a/b", "1/0", ""])
def test_a_bad_shard_fails_in_one_line(text):
  with pytest.raises(errors.ConfigError, match="counted from 0"):
    table.parse_shard(text)


def test_the_command_reports_a_bad_shard_in_one_line(capsys):
  status = table.main(["--config=configs/tables/slkd_table1.py",
                       "--workdir=/nonexistent", "--dry_run", "--nomeasure",
                       "--shard=2/2"])
  assert status == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "--shard=2/2" in err


@pytest.mark.parametrize("jobs", [1, 2, 3, 7])
def test_shards_split_the_cells_into_disjoint_shares(jobs):
  runs = table.plan(_paper_table("slkd_table1.py"), "/t")
  shares = [table.shard_cells(runs, table.Shard(i, jobs))
            for i in range(jobs)]
  every = [i for share in shares for members in share.values()
           for i in members]
  assert sorted(every) == list(range(len(runs)))  # each run exactly once
  assert {len(share) for share in shares} <= {66 // jobs, -(-66 // jobs)}


def test_the_dry_run_of_a_shard_lists_its_share():
  lines = []
  cells = table.dry_run(_paper_table("slkd_table1.py"), "/nonexistent",
                        measure=False, out=lines.append,
                        shard=table.Shard(1, 4))
  assert len(cells) == 17 and all(c["runs"] == 3 for c in cells)
  assert lines[-1].startswith("shard 1/4: 17 cells, 51 runs")


def test_two_shards_train_every_run_once_and_gather_the_one_job_table(
    finished_table, tmp_path, monkeypatch):
  one_job_dir, one_job = finished_table
  workdir, trained = str(tmp_path), []
  run = train.run

  def recording(config, where):
    trained.append(os.path.relpath(where, workdir))
    return run(config, where)

  monkeypatch.setattr(train, "run", recording)
  lines = []
  for i in range(2):
    table.run_table(tiny_spec(), workdir, out=lines.append,
                    shard=table.Shard(i, 2))
  assert sorted(trained) == sorted([
      os.path.join("runs", "resnet14-resnet8", "ce"),
      os.path.join("teachers", "resnet8"),
      os.path.join("runs", "resnet14-resnet8", "kd")])
  assert "shard 0/2: its 2 runs finished; 2/4 runs" in lines[1]
  assert not os.path.exists(os.path.join(workdir, "teachers",
                                         "resnet8.claim"))  # released

  def no_training(*_):
    raise AssertionError("a finished run was trained again")

  monkeypatch.setattr(train, "run", no_training)
  gathered = table.run_table(tiny_spec(), workdir, out=lines.append)
  assert lines[-1].startswith("table: all 4 runs finished")
  key = lambda r: {k: v for k, v in r.items() if k != "workdir"}  # noqa: E731
  assert [key(r) for r in gathered] == [key(r) for r in one_job]
  # The links are relative to the workdir: the same text.
  assert (open(os.path.join(workdir, "table.md")).read()
          == open(os.path.join(one_job_dir, "table.md")).read())
  # A dry run gathers too (here: the same, rewritten).
  os.remove(os.path.join(workdir, "table.md"))
  table.dry_run(tiny_spec(), workdir, measure=False, out=lines.append)
  assert lines[-1].startswith("table: 4/4 runs finished")
  assert os.path.exists(os.path.join(workdir, "table.md"))


def test_a_teacher_claimed_by_another_job_is_waited_for_then_taken_over(
    tmp_path, monkeypatch):
  """The other job never finishes it: once its claim is stale, this job
  trains the teacher itself."""
  monkeypatch.setattr(table, "STALE_SECONDS", 3.0)
  monkeypatch.setattr(table, "POLL_SECONDS", 0.2)
  claim = tmp_path / "teachers" / "resnet8.claim"
  claim.parent.mkdir()
  claim.write_text("1/2\n")
  lines = []
  records = table.run_table(tiny_spec(rows=("kd",), seeds=(0,)),
                            str(tmp_path), out=lines.append,
                            shard=table.Shard(0, 1))
  assert all(r["finished"] for r in records)
  waits = [line for line in lines if "wait for teachers" in line]
  assert len(waits) == 1 and "resnet8 (claimed by job 1/2)" in waits[0]
  assert not claim.exists()


def test_teacher_claims(tmp_path, monkeypatch):
  teacher = str(tmp_path / "teachers" / "resnet8")
  a, b = table.TeacherClaims("0/2"), table.TeacherClaims("1/2")
  assert a.acquire(teacher) and a.holder(teacher) == "0/2"
  assert not b.acquire(teacher)  # live: b waits
  assert table.TeacherClaims("0/2").acquire(teacher)  # a requeued job
  b.release(teacher)  # not b's: stays
  assert a.holder(teacher) == "0/2"
  old = time.time() - table.STALE_SECONDS - 1
  os.utime(teacher + ".claim", (old, old))  # a's job died
  assert b.acquire(teacher) and b.holder(teacher) == "1/2"
  b.release(teacher)
  assert a.holder(teacher) is None
  monkeypatch.setattr(table, "HEARTBEAT_SECONDS", 0.05)
  assert a.acquire(teacher)
  os.utime(teacher + ".claim", (old, old))
  with a.heartbeat(teacher):
    time.sleep(0.5)
  assert time.time() - os.stat(teacher + ".claim").st_mtime < 5


def test_sigterm_while_waiting_stops_with_preempted():
  timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
  timer.start()
  with pytest.raises(train.Preempted):
    table._sleep_unless_stopped(30)
  timer.join()
