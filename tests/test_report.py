"""Aggregating seeds: mean ± std of best and last top-1 per stage."""

import os

from slkd_jax import metrics, report


def _write_run(workdir, stage, top1s, teacher=70.0):
  writer = metrics.JsonlWriter(os.path.join(workdir, stage, "metrics.jsonl"))
  writer.write(1, {"train/loss": 1.0})  # train records are ignored
  for epoch, top1 in enumerate(top1s, 1):
    writer.write(epoch, {"eval/student/top1": top1,
                         "eval/teacher/top1": teacher}, epoch=epoch)
  writer.close()


def test_mean_and_std_over_seeds(tmp_path, capsys):
  _write_run(tmp_path / "seed0", "slkd", [60.0, 64.0, 62.0])  # best 64, last 62
  _write_run(tmp_path / "seed1", "slkd", [61.0, 63.0, 66.0])  # best 66, last 66
  _write_run(tmp_path / "seed1", "kd", [50.0])
  rows = {r["stage"]: r for r in report.aggregate(
      [str(tmp_path / "seed0"), str(tmp_path / "seed1")])}
  assert rows["slkd"]["runs"] == 2
  assert rows["slkd"]["best top-1"] == "65.00 ± 1.41"  # sample std of 64, 66
  assert rows["slkd"]["last top-1"] == "64.00 ± 2.83"
  assert rows["slkd"]["teacher top-1"] == "70.00 ± 0.00"
  assert rows["slkd"]["fused SL-T best"] == "-"
  assert rows["kd"]["runs"] == 1 and rows["kd"]["best top-1"] == "50.00"
  assert report.main([str(tmp_path / "seed0"), str(tmp_path / "seed1")]) == 0
  assert "65.00 ± 1.41" in capsys.readouterr().out


def test_missing_workdir_is_a_clear_error(tmp_path, capsys):
  assert report.main([str(tmp_path / "nope")]) == 2
  assert "not a directory" in capsys.readouterr().err
