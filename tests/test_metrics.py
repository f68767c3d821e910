"""Tests for slkd_jax.metrics: JSONL, TensorBoard encoding, progress, report."""

import io
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from slkd_jax import metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_import_pulls_in_neither_jax_nor_tensorflow():
  # A fresh interpreter: conftest has already imported jax in this one.
  code = ("import sys, slkd_jax.metrics; "
          "bad = [m for m in ('jax', 'tensorflow', 'matplotlib') "
          "if m in sys.modules]; assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_crc32c_check_value():
  assert metrics.crc32c(b"123456789") == 0xE3069283
  assert metrics.crc32c(b"") == 0


def test_jsonl_round_trip_and_append_on_reopen(tmp_path):
  path = tmp_path / "sub" / "metrics.jsonl"
  with metrics.JsonlWriter(path) as w:
    w.write(1, {"loss": np.float32(0.5), "acc": np.float64(71.25),
                "n": np.int64(3)}, epoch=1, stage="slkd")
  # Reopening appends, as a resumed run does.
  with metrics.JsonlWriter(path) as w:
    w.write(np.int64(2), {"loss": 0.25}, epoch=2, stage="slkd")
  lines = path.read_text().splitlines()
  assert len(lines) == 2
  first = json.loads(lines[0])
  assert first == {"step": 1, "epoch": 1, "stage": "slkd", "loss": 0.5,
                   "acc": 71.25, "n": 3}
  assert type(first["n"]) is int
  assert metrics.read_jsonl(path)[1] == {"step": 2, "epoch": 2,
                                         "stage": "slkd", "loss": 0.25}


def _read_records(path):
  """Parses TFRecord framing in pure Python, checking both CRCs."""
  data = open(path, "rb").read()
  records, pos = [], 0
  while pos < len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (length_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    assert length_crc == metrics.masked_crc32c(header)
    body = data[pos + 12:pos + 12 + length]
    (body_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
    assert body_crc == metrics.masked_crc32c(body)
    records.append(body)
    pos += 16 + length
  return records


def test_tensorboard_framing_without_tensorflow(tmp_path):
  with metrics.TensorBoardWriter(tmp_path) as w:
    w.scalars(3, {"a": 1.0})
  (name,) = os.listdir(tmp_path)
  assert name.startswith("events.out.tfevents.")
  records = _read_records(tmp_path / name)
  assert len(records) == 2
  assert b"brain.Event:2" in records[0]


def test_tensorboard_read_back_with_tensorflow(tmp_path):
  tf = pytest.importorskip("tensorflow")
  values = {0: {"train/loss": 2.5, "train/lr": np.float32(0.05)},
            7: {"eval/student/top1": 71.3, "eval/ce": np.float64(1.1)},
            1 << 40: {"big": 1e-3, "neg": -4.0}}
  w = metrics.TensorBoardWriter(tmp_path)
  for step, scalars in values.items():
    w.scalars(step, dict(scalars, note="text is skipped"))
  w.close()
  (name,) = os.listdir(tmp_path)
  events = list(tf.compat.v1.train.summary_iterator(str(tmp_path / name)))
  assert events[0].file_version == "brain.Event:2"
  assert events[0].wall_time > 0
  got = {e.step: {v.tag: v.simple_value for v in e.summary.value}
         for e in events[1:]}
  want = {s: {k: float(np.float32(v)) for k, v in d.items()}
          for s, d in values.items()}
  assert got == want


def test_metric_writer(tmp_path):
  with metrics.MetricWriter(tmp_path) as w:
    w.write(10, {"top1": 50.0}, prefix="eval/", epoch=1, stage="kd")
  (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert json.loads(line) == {"step": 10, "epoch": 1, "stage": "kd",
                              "eval/top1": 50.0}
  (name,) = os.listdir(tmp_path / "tensorboard")
  records = _read_records(tmp_path / "tensorboard" / name)
  assert len(records) == 2 and b"eval/top1" in records[1]
  # TensorBoard gets no epoch/stage fields.
  assert b"stage" not in records[1]


def test_metric_writer_disabled_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  w = metrics.MetricWriter(workdir, enabled=False)
  w.write(1, {"loss": 1.0}, epoch=1)
  w.flush()
  w.close()
  assert not workdir.exists()


def test_progress_bar_non_tty():
  stream = io.StringIO()
  bar = metrics.ProgressBar(100, desc="epoch 1", stream=stream)
  for step in range(1, 101):
    bar.update(step, images_per_step=64, loss=1.0 / step, ce=np.float32(0.5))
  bar.close()
  lines = stream.getvalue().splitlines()
  # One plain line per 10%, no carriage returns in a log file.
  assert len(lines) == 10
  assert "\r" not in stream.getvalue()
  last = lines[-1]
  assert "epoch 1 100/100 100.0%" in last
  assert "images/s" in last and "ETA" in last and "elapsed" in last
  assert "loss=0.01" in last and "ce=0.5" in last


def test_progress_bar_tty_and_disabled():
  class Tty(io.StringIO):
    def isatty(self):
      return True

  stream = Tty()
  bar = metrics.ProgressBar(4, stream=stream, min_interval=0.0)
  for step in range(1, 5):
    bar.update(step, 8)
  bar.close()
  out = stream.getvalue()
  assert out.startswith("\r") and out.endswith("\n") and out.count("\n") == 1

  quiet = io.StringIO()
  bar = metrics.ProgressBar(4, stream=quiet, enabled=False)
  bar.update(4, 8, loss=1.0)
  bar.close()
  assert quiet.getvalue() == ""


def test_best_and_last():
  history = [{"epoch": 1, "top1": 10.0}, {"epoch": 2, "top1": 30.0},
             {"epoch": 3}, {"epoch": 4, "top1": np.float32(30.0)},
             {"epoch": 5, "top1": 25.0}]
  assert metrics.best_and_last(history, "top1") == (30.0, 2, 25.0)
  assert metrics.best_and_last(history, "top1", mode="min") == (10.0, 1, 25.0)
  assert metrics.best_and_last(history, "missing") == (None, None, None)


def test_mean_std():
  assert metrics.mean_std([1.0, 2.0, 3.0]) == "2.00 ± 1.00"  # ddof=1
  assert metrics.mean_std([70.0]) == "70.00"
  assert metrics.mean_std([]) == "-"


def test_summary_table_alignment():
  rows = [{"network": "student", "best top-1": 73.456, "epoch": 200},
          {"network": "slt_fused", "best top-1": 7.0, "epoch": None},
          {"network": "teacher", "best top-1": "75.61 ± 0.10"}]
  table = metrics.summary_table(rows, ["network", "best top-1", "epoch"])
  lines = table.splitlines()
  assert len(lines) == 5
  assert len({len(line) for line in lines}) == 1
  pipes = [[i for i, ch in enumerate(line) if ch == "|"] for line in lines]
  assert all(p == pipes[0] for p in pipes)
  assert "73.46" in lines[2] and " 7.00" in table
  # The numeric 'epoch' column is right-aligned; missing cells show '-'.
  assert lines[1].rstrip(" |").endswith(":")
  assert lines[3].endswith("   - |")


def test_plot_history(tmp_path):
  pytest.importorskip("matplotlib")
  history = [{"epoch": e, "student/top1": 10.0 * e, "teacher/top1": 70.0,
              "slt_0/top1": 5.0 * e, "slt_fused/top1": 6.0 * e,
              "kl_student_teacher": 1.0 / e, "kl_student_fused": 0.5 / e}
             for e in range(1, 4)]
  paths = metrics.plot_history(history, tmp_path / "plots")
  assert [os.path.basename(p) for p in paths] == ["accuracy.png",
                                                  "trajectory.png"]
  for path in paths:
    data = open(path, "rb").read()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_plot_history_skips_missing_keys(tmp_path):
  pytest.importorskip("matplotlib")
  only_acc = [{"epoch": 1, "student/top1": 1.0}, {"epoch": 2}]
  paths = metrics.plot_history(only_acc, tmp_path)
  assert [os.path.basename(p) for p in paths] == ["accuracy.png"]
  assert metrics.plot_history([{"epoch": 1, "loss": 2.0}], tmp_path / "x") == []
  assert metrics.plot_history([], tmp_path / "y") == []
  assert not (tmp_path / "x").exists()
