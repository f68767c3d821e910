"""Aggregating seeds: mean ± std of best and last top-1 per finished stage.

The workdirs are hand-written: ``config.json`` files and ``metrics.jsonl``
lines in the format slkd_jax.train writes.
"""

import copy
import json
import os

import pytest

from slkd_jax import report


def _config(seed=0, num_epochs=3, **overrides):
  """A run config as ``to_json_best_effort`` writes it (a relevant subset);
  ``overrides`` are dotted keys, e.g. ``**{"loss.temperature": 2.0}``."""
  config = {
      "seed": seed, "method": "slkd", "num_epochs": num_epochs,
      "batch_size": 64, "eval_batch_size": 256, "compare_with": [],
      "log_every_steps": 50, "checkpoint_every_epochs": 10,
      "keep_checkpoints": 2,
      "data": {"name": "cifar100", "data_dir": None, "num_classes": 100},
      "student": {"arch": "resnet8x4"},
      "teacher": {"arch": "resnet32x4", "checkpoint": None, "num_epochs": 2,
                  "learning_rate": 0.05},
      "optim": {"learning_rate": 0.05, "decay_epochs": [150, 180, 210]},
      "loss": {"temperature": 4.0},
      "slkd": {"num_slts": 2, "ensemble": "unrolled"},
  }
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def _write_json(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def _write_metrics(workdir, stage, top1s, epochs=None, teacher=70.0,
                   fused=None):
  """metrics.jsonl with a train record and one eval record per epoch."""
  epochs = epochs or range(1, len(top1s) + 1)
  os.makedirs(os.path.join(workdir, stage), exist_ok=True)
  with open(os.path.join(workdir, stage, "metrics.jsonl"), "a") as f:
    for epoch, top1 in zip(epochs, top1s):
      f.write(json.dumps({"step": 10 * epoch, "epoch": epoch, "stage": stage,
                          "train/loss": 1.0}) + "\n")  # ignored
      record = {"step": 10 * epoch, "epoch": epoch, "stage": stage,
                "eval/student/top1": top1, "eval/teacher/top1": teacher}
      if fused is not None:
        record["eval/slt_fused/top1"] = fused
      f.write(json.dumps(record) + "\n")


def _write_run(workdir, stage, top1s, config=None, **metric_kw):
  """A workdir's run config, ``<stage>/config.json`` and metrics."""
  config = config or _config()
  _write_json(os.path.join(workdir, "config.json"), config)
  own = copy.deepcopy(config)
  own["method"] = stage
  _write_json(os.path.join(workdir, stage, "config.json"), own)
  _write_metrics(workdir, stage, top1s, **metric_kw)
  return str(workdir)


def _rows(*workdirs):
  return {r["stage"]: r for r in report.aggregate(report.load_runs(workdirs))}


def test_mean_and_std_over_seeds(tmp_path, capsys):
  a = _write_run(tmp_path / "seed0", "slkd", [60.0, 64.0, 62.0],
                 _config(seed=0))  # best 64, last 62
  b = _write_run(tmp_path / "seed1", "slkd", [61.0, 63.0, 66.0],
                 _config(seed=1), fused=67.0)  # best 66, last 66
  _write_run(tmp_path / "seed1", "kd", [48.0, 49.0, 50.0], _config(seed=1))
  rows = _rows(a, b)
  assert rows["slkd"]["runs"] == 2 and rows["slkd"]["seeds"] == "0,1"
  assert rows["slkd"]["best top-1"] == "65.00 ± 1.41"  # sample std of 64, 66
  assert rows["slkd"]["last top-1"] == "64.00 ± 2.83"
  assert rows["slkd"]["teacher top-1"] == "70.00 ± 0.00"
  assert rows["slkd"]["fused SL-T best"] == "67.00"
  assert rows["kd"]["runs"] == 1 and rows["kd"]["best top-1"] == "50.00"
  assert report.main([a, b]) == 0
  out = capsys.readouterr().out
  assert "65.00 ± 1.41" in out and "unfinished" not in out


def test_unfinished_stage_is_listed_but_not_averaged(tmp_path, capsys):
  a = _write_run(tmp_path / "s0", "slkd", [60.0, 64.0, 62.0], _config(seed=0))
  b = _write_run(tmp_path / "s1", "slkd", [61.0, 63.0, 66.0], _config(seed=1))
  # Killed after epoch 2 of 3, with a suspiciously good top-1.
  c = _write_run(tmp_path / "s2", "slkd", [90.0, 99.0], _config(seed=2))
  rows = _rows(a, b, c)
  assert rows["slkd"]["runs"] == 2
  assert rows["slkd"]["best top-1"] == "65.00 ± 1.41"
  assert report.main([a, b, c]) == 0
  out = capsys.readouterr().out
  table, _, listing = out.partition("Unfinished")
  assert "99" not in table and "65.00 ± 1.41" in table
  assert f"[unfinished] {c} slkd: epoch 2/3" in listing


def test_only_unfinished_stages_is_an_error_that_lists_them(tmp_path, capsys):
  a = _write_run(tmp_path / "s0", "slkd", [60.0], _config(num_epochs=240))
  assert report.main([a]) == 2
  captured = capsys.readouterr()
  assert "[unfinished]" in captured.out and "epoch 1/240" in captured.out
  assert "no finished stage" in captured.err
  assert "60.00" not in captured.out


def test_repeated_epoch_counts_its_last_record(tmp_path):
  # Epochs 1-3 logged, crash, resume from the epoch-1 checkpoint: epochs 2
  # and 3 are logged again and replace the lost run's records.
  a = _write_run(tmp_path / "s0", "slkd", [60.0, 70.0, 65.0])
  _write_metrics(a, "slkd", [61.0, 62.0], epochs=[2, 3])
  history = report.load_runs([a])[0].history
  assert [r["epoch"] for r in history] == [1, 2, 3]
  assert [r["student/top1"] for r in history] == [60.0, 61.0, 62.0]
  row = _rows(a)["slkd"]
  assert (row["best top-1"], row["last top-1"]) == ("62.00", "62.00")


def test_finished_is_decided_after_deduplication(tmp_path):
  # 3 records, but only epochs 1 and 2: not finished for num_epochs 3.
  a = _write_run(tmp_path / "s0", "slkd", [60.0, 61.0, 62.0], epochs=[1, 2, 2])
  assert not report.load_runs([a])[0].finished
  assert _rows(a) == {}


def test_epochs_past_num_epochs_are_not_part_of_the_result(tmp_path):
  a = _write_run(tmp_path / "s0", "slkd", [60.0, 61.0, 62.0, 90.0])
  row = _rows(a)["slkd"]
  assert (row["best top-1"], row["last top-1"]) == ("62.00", "62.00")


def test_differing_configs_are_refused(tmp_path, capsys):
  a = _write_run(tmp_path / "s0", "slkd", [60.0, 61.0, 62.0], _config(seed=0))
  b = _write_run(tmp_path / "s1", "slkd", [60.0, 61.0, 62.0], _config(
      seed=1, **{"loss.temperature": 2.0}))
  c = _write_run(tmp_path / "s2", "slkd", [60.0, 61.0, 62.0], _config(seed=2))
  assert report.main([a, b, c]) == 2
  captured = capsys.readouterr()
  assert captured.out == ""  # no table of mixed runs
  lines = captured.err.strip().splitlines()
  assert len(lines) == 1
  assert "loss.temperature" in lines[0] and "slkd" in lines[0]
  assert f"4.0: {a}, {c}" in lines[0] and f"2.0: {b}" in lines[0]
  assert "seed" not in lines[0].split("than the seed")[1]
  # The user says the key does not matter: averaged.
  assert report.main([a, b, c, "--ignore", "loss.temperature"]) == 0


def test_key_missing_in_one_config_is_a_difference(tmp_path):
  config = _config(seed=1)
  del config["loss"]["temperature"]
  runs = report.load_runs([
      _write_run(tmp_path / "s0", "slkd", [1.0, 2.0, 3.0], _config(seed=0)),
      _write_run(tmp_path / "s1", "slkd", [1.0, 2.0, 3.0], config)])
  with pytest.raises(report.ConfigMismatchError, match="<absent>"):
    report.check_configs(runs)


def test_meaning_free_keys_may_differ(tmp_path, capsys):
  a = _write_run(tmp_path / "s0", "slkd", [60.0, 61.0, 62.0], _config(seed=0))
  b = _write_run(tmp_path / "s1", "slkd", [60.0, 61.0, 64.0], _config(
      seed=1, log_every_steps=10, checkpoint_every_epochs=1,
      keep_checkpoints=5, eval_batch_size=1024, compare_with=["kd"],
      **{"data.data_dir": "/elsewhere", "slkd.ensemble": "vmap",
         "loss.temperature": 4}))  # int 4 is the same setting as 4.0
  b_config = json.load(open(os.path.join(b, "slkd", "config.json")))
  b_config["data"]["num_threads"] = 8  # a key the other run lacks
  _write_json(os.path.join(b, "slkd", "config.json"), b_config)
  assert report.main([a, b]) == 0
  assert "63.00 ± 1.41" in capsys.readouterr().out


def test_unfinished_runs_are_not_config_checked(tmp_path):
  # An unfinished run with another recipe is not averaged, so no conflict.
  a = _write_run(tmp_path / "s0", "slkd", [60.0, 61.0, 62.0], _config(seed=0))
  b = _write_run(tmp_path / "s1", "slkd", [60.0], _config(
      seed=1, **{"optim.learning_rate": 0.1}))
  assert report.main([a, b]) == 0


def test_slkd_keys_matter_only_for_slt_methods(tmp_path):
  def runs(stage):
    return report.load_runs([
        _write_run(tmp_path / stage / "s0", stage, [1.0, 2.0, 3.0],
                   _config(seed=0)),
        _write_run(tmp_path / stage / "s1", stage, [1.0, 2.0, 3.0],
                   _config(seed=1, **{"slkd.num_slts": 4}))])
  report.check_configs(runs("kd"))  # KD trains no SL-Ts: K is unused
  with pytest.raises(report.ConfigMismatchError, match="slkd.num_slts"):
    report.check_configs(runs("slkd"))


def test_no_config_at_all_is_unfinished(tmp_path, capsys):
  a = tmp_path / "s0"
  _write_metrics(str(a), "slkd", [60.0, 61.0])
  assert report.main([str(a)]) == 2
  assert "epoch 2/? (no config.json)" in capsys.readouterr().out


def test_same_directory_is_counted_once(tmp_path, capsys):
  a = _write_run(tmp_path / "s0", "slkd", [60.0, 61.0, 62.0], _config(seed=0))
  b = _write_run(tmp_path / "s1", "slkd", [60.0, 61.0, 64.0], _config(seed=1))
  os.symlink(a, tmp_path / "link")
  assert report.main([a, a + "/", str(tmp_path / "link"), b]) == 0
  captured = capsys.readouterr()
  assert "63.00 ± 1.41" in captured.out  # not pulled towards seed 0's 62
  assert "| slkd  |    2 |" in captured.out
  warnings = captured.err.strip().splitlines()
  assert len(warnings) == 2 and all("counted once" in w for w in warnings)


def test_same_seed_twice_is_warned(tmp_path, capsys):
  a = _write_run(tmp_path / "s0", "slkd", [60.0, 61.0, 62.0], _config(seed=0))
  b = _write_run(tmp_path / "copy", "slkd", [60.0, 61.0, 62.0],
                 _config(seed=0))
  assert report.main([a, b]) == 0
  assert "same seed 0" in capsys.readouterr().err


def test_missing_workdir_is_a_clear_error(tmp_path, capsys):
  assert report.main([str(tmp_path / "nope")]) == 2
  assert "not a directory" in capsys.readouterr().err


def test_no_eval_records_is_a_clear_error(tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  assert report.main([str(tmp_path / "empty")]) == 2
  assert "no evaluated stage" in capsys.readouterr().err


def test_unreadable_metric_lines_are_warned_per_file(tmp_path, capsys):
  good = _write_run(tmp_path / "a", "slkd", [60.0, 61.0, 62.0])
  bad = _write_run(tmp_path / "b", "slkd", [50.0, 51.0, 52.0])
  path = os.path.join(bad, "slkd", "metrics.jsonl")
  with open(path, "a") as f:
    f.write('{"step": 40, "epo\n{"step": 41, "epoch": 4}{"st\n')
  runs = report.load_runs([good, bad])
  assert [r.last_epoch for r in runs] == [3, 3]
  warnings = capsys.readouterr().err.splitlines()
  assert warnings == [f"warning: {path}: 2 unreadable lines skipped "
                      f"(lines 7, 8; not JSON: a write cut short by a crash?)"]
