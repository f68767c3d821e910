"""Tests for slkd_jax.metrics: JSONL, TensorBoard files, progress, tables."""

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


def test_import_is_light():
  # A fresh interpreter: conftest has already imported jax in this one.
  # report.py imports metrics; tensorboardX (and the torch it pulls in) is
  # loaded only by an enabled MetricWriter.
  code = ("import sys, slkd_jax.metrics; "
          "bad = [m for m in ('jax', 'tensorflow', 'matplotlib', "
          "'tensorboardX', 'torch') if m in sys.modules]; assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True)


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


def _write_records(path, steps):
  with metrics.JsonlWriter(path) as w:
    for step in steps:
      w.write(step, {"train/loss": 1.0 / step}, epoch=1, stage="kd")


def test_resume_after_a_half_written_last_line_cuts_it(tmp_path, caplog):
  # A crash mid-write leaves part of a line; the resumed run must not
  # append onto it (that would lose its own first record too).
  path = tmp_path / "metrics.jsonl"
  _write_records(path, [1, 2, 3])
  complete = path.read_bytes()
  with open(path, "ab") as f:
    f.write(b'{"step": 4, "epoch": 1, "stage": "kd", "train/lo')
  with caplog.at_level("INFO"):
    assert metrics.truncate_jsonl(path, 3) == 0  # no record was dropped
  assert path.read_bytes() == complete
  (line,) = [r.getMessage() for r in caplog.records
             if "metrics.jsonl" in r.getMessage()]
  assert "cut 1 unreadable line (48 bytes; line 4 of 4)" in line and str(path) in line
  _write_records(path, [4])
  assert [r["step"] for r in metrics.read_jsonl(path)] == [1, 2, 3, 4]
  assert all(json.loads(x) for x in path.read_text().splitlines())


def test_truncate_keeps_every_complete_record_up_to_the_restored_step(
    tmp_path):
  path = tmp_path / "metrics.jsonl"
  _write_records(path, [1, 2, 3, 4, 5])
  lines = path.read_text().splitlines(keepends=True)
  with open(path, "a") as f:
    f.write('{"step": 6, "epo')
  assert metrics.truncate_jsonl(path, 3) == 2  # steps 4 and 5
  assert path.read_text() == "".join(lines[:3])
  # A complete last record whose newline was never written is a record.
  path.write_text("".join(lines[:2]) + lines[2].rstrip("\n"))
  assert metrics.truncate_jsonl(path, 3) == 0
  assert path.read_text() == "".join(lines[:3])
  # Nothing to cut: the file is left alone.
  before = os.stat(path).st_mtime_ns
  assert metrics.truncate_jsonl(path, 3) == 0
  assert os.stat(path).st_mtime_ns == before


def test_a_writer_never_appends_onto_a_partial_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1}\n{"step": 2, "ep')
  _write_records(path, [3])
  assert [r["step"] for r in metrics.read_jsonl(path)] == [1, 3]


def _crc32c(data):
  # CRC-32C (Castagnoli, reflected), bit by bit: the test's own, so the
  # writer's checksums are checked against an independent implementation.
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
  return crc ^ 0xFFFFFFFF


def _masked(crc):
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_crc32c_check_value():
  assert _crc32c(b"123456789") == 0xE3069283  # the standard check value


def _read_events(path):
  """The Events of a TFRecord event file, both CRCs of each record checked.

  (Neither TensorBoard nor a TFRecord reader is installed without
  TensorFlow; tensorboardX's protobuf classes parse the records.)
  """
  from tensorboardX.proto import event_pb2
  data = open(path, "rb").read()
  events, pos = [], 0
  while pos < len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (length_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    assert length_crc == _masked(_crc32c(header))
    body = data[pos + 12:pos + 12 + length]
    (body_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
    assert body_crc == _masked(_crc32c(body))
    events.append(event_pb2.Event.FromString(body))
    pos += 16 + length
  return events


def _scalars(events):
  """``{(tag, step): value}`` of the scalar summaries in ``events``."""
  return {(v.tag, e.step): v.simple_value
          for e in events for v in e.summary.value}


def test_metric_writer_tensorboard_read_back(tmp_path):
  values = {0: {"loss": 2.5, "lr": np.float32(0.05)},
            7: {"student/top1": 71.3, "ce": np.float64(1.1), "n": np.int64(3)},
            1 << 40: {"big": 1e-3, "neg": -4.0}}
  with metrics.MetricWriter(tmp_path) as w:
    for step, scalars in values.items():
      w.write(step, dict(scalars, note="text is skipped"), prefix="eval/",
              epoch=1, stage="kd")
  (name,) = os.listdir(tmp_path / "tensorboard")
  assert name.startswith("events.out.tfevents.")
  events = _read_events(tmp_path / "tensorboard" / name)
  assert events[0].file_version == "brain.Event:2"
  assert events[0].wall_time > 0
  # float32, as TensorBoard stores scalars; no epoch/stage/text tags.
  assert _scalars(events) == {
      (f"eval/{k}", s): float(np.float32(v))
      for s, d in values.items() for k, v in d.items()}
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert json.loads(lines[0]) == {
      "step": 0, "epoch": 1, "stage": "kd", "eval/loss": 2.5,
      "eval/lr": float(np.float32(0.05)), "eval/note": "text is skipped"}


def test_tensorboard_shows_percent_throughput_and_the_config_once(tmp_path):
  config = {"method": "kd", "batch_size": 64}
  (tmp_path / "config.json").write_text(json.dumps(config))
  seconds = iter([0.0, 10.0, 12.0, 20.0, 30.0])
  train = {"student/acc": np.float32(0.25), "loss": 1.0}
  with metrics.MetricWriter(tmp_path) as w:
    w._clock = lambda: next(seconds)
    w.write(2, train, prefix="train/", epoch=1)  # the first: no rate yet
    w.write(4, train, prefix="train/", epoch=1)  # 2 steps × 64 in 10 s
    w.write(4, {"epoch": 1, "student/top1": 40.0}, prefix="eval/", epoch=1)
    w.write(6, train, prefix="train/", epoch=2)  # after an eval: restarts
    w.write(8, train, prefix="train/", epoch=2)
  (name,) = os.listdir(tmp_path / "tensorboard")
  events = _read_events(tmp_path / "tensorboard" / name)
  values = [(v, e.step) for e in events for v in e.summary.value]
  scalars = {(v.tag, step): v.simple_value for v, step in values
             if v.WhichOneof("value") == "simple_value"}
  assert scalars == {
      **{(f"train/{k}", s): v for s in (2, 4, 6, 8)
         for k, v in (("student/acc", 25.0), ("loss", 1.0))},
      ("eval/student/top1", 4): 40.0,  # a percent already; no eval/epoch
      ("train/images_per_second", 4): float(np.float32(12.8)),
      ("train/images_per_second", 8): float(np.float32(12.8))}
  texts = [(v, step) for v, step in values
           if v.WhichOneof("value") == "tensor"]
  assert len(texts) == 1 and texts[0][1] == 2
  assert '"batch_size": 64' in texts[0][0].tensor.string_val[0].decode()
  # The log of record is what the loop passed.
  records = metrics.read_jsonl(tmp_path / "metrics.jsonl")
  assert records[0]["train/student/acc"] == 0.25
  assert records[2] == {"step": 4, "epoch": 1, "eval/epoch": 1,
                        "eval/student/top1": 40.0}


def test_each_writer_adds_its_own_event_file(tmp_path):
  # A resumed run opens a second writer on the same directory, possibly in
  # the same second: neither file may overwrite the other.
  for step in (1, 2):
    with metrics.MetricWriter(tmp_path) as w:
      w.write(step, {"loss": float(step)}, prefix="train/")
  names = sorted(os.listdir(tmp_path / "tensorboard"))
  assert len(names) == 2
  merged = {}
  for name in names:
    merged.update(_scalars(_read_events(tmp_path / "tensorboard" / name)))
  assert merged == {("train/loss", 1): 1.0, ("train/loss", 2): 2.0}
  assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


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
  # A plain line at the first update (the run is seen to move from its
  # first log window on), then one per 10%; no carriage returns in a log.
  assert len(lines) == 11
  assert "\r" not in stream.getvalue()
  assert lines[0].startswith("epoch 1: 1/100   1% [")
  assert lines[1].startswith("epoch 1: 10/100  10% [")
  last = lines[-1]
  assert last.startswith("epoch 1: 100/100 100% [")
  assert "<00:00" in last and "step/s" in last  # elapsed<ETA, rate
  assert "images/s=" in last and "loss=0.01" in last and "ce=0.5" in last


def test_progress_bar_resumed_counts_from_initial_step():
  stream = io.StringIO()
  bar = metrics.ProgressBar(100, desc="slkd", stream=stream, initial_step=50)
  for step in range(55, 101, 5):  # updates every 5 steps, as log_every does
    bar.update(step, images_per_step=8)
  bar.close()
  lines = stream.getvalue().splitlines()
  assert [line.split()[1] for line in lines] == [
      "55/100", "60/100", "70/100", "80/100", "90/100", "100/100"]


def test_progress_bar_tty_and_disabled():
  class Tty(io.StringIO):
    def isatty(self):
      return True

  stream = Tty()
  bar = metrics.ProgressBar(4, stream=stream, min_interval=0.0)
  for step in range(1, 5):
    bar.update(step, 8, loss=0.25)
  bar.close()
  out = stream.getvalue()
  # Redrawn in place, one final newline.
  assert out.startswith("\r") and out.endswith("\n") and out.count("\n") == 1
  assert "4/4" in out.rsplit("\r", 1)[1] and "loss=0.25" in out

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


# Every network a stage evaluates, in the canonical order.
_HISTORY = [
    {"epoch": 1, "teacher/top1": 75.0, "teacher/top5": 93.0,
     "slt_1/top1": 40.0, "slt_1/top5": 70.0, "slt_0/top1": 41.0,
     "slt_0/top5": 71.0, "slt_fused/top1": 45.0, "slt_fused/top5": 75.0,
     "student/top1": 50.0, "student/top5": 80.0, "eval_examples": 20},
    {"epoch": 2, "teacher/top1": 75.0, "teacher/top5": 93.0,
     "slt_1/top1": 42.0, "slt_1/top5": 72.0, "slt_0/top1": 39.0,
     "slt_0/top5": 69.0, "slt_fused/top1": 44.0, "slt_fused/top5": 76.0,
     "student/top1": 55.0, "student/top5": 85.0},
    {"epoch": 3, "teacher/top1": 75.0, "teacher/top5": 93.0,
     "slt_1/top1": 41.0, "slt_1/top5": 71.0, "slt_0/top1": 40.0,
     "slt_0/top5": 70.0, "slt_fused/top1": 46.0, "slt_fused/top5": 77.0,
     "student/top1": 54.0, "student/top5": 86.0},
]


def test_network_rows_best_and_last_per_network():
  rows = metrics.network_rows(_HISTORY)
  assert [tuple(r[c] for c in metrics.NETWORK_COLUMNS) for r in rows] == [
      ("student", 55.0, 2, 54.0, 86.0),
      ("slt_0", 41.0, 1, 40.0, 70.0),
      ("slt_1", 42.0, 2, 41.0, 71.0),
      ("slt_fused", 46.0, 3, 46.0, 77.0),
      ("teacher", 75.0, 1, 75.0, 93.0)]
  # SL-Ts by index (10 after 2), networks without a value left out.
  assert metrics.networks([{"slt_10/top1": 1.0, "teacher/top1": 2.0,
                            "slt_2/top1": 3.0, "other/top1": None}]) == [
                                "slt_2", "slt_10", "teacher"]
  # Chosen networks, in the given order; an absent one is all None.
  picked = metrics.network_rows(_HISTORY, ("teacher", "nope"))
  assert [r["network"] for r in picked] == ["teacher", "nope"]
  assert picked[1] == {"network": "nope", "best top-1": None,
                       "best epoch": None, "last top-1": None,
                       "last top-5": None}
  # One evaluation: its numbers are best and last alike.
  (single,) = metrics.network_rows([{"student/top1": 12.5,
                                     "student/top5": 30.0}])
  assert (single["best top-1"], single["last top-1"],
          single["last top-5"]) == (12.5, 12.5, 30.0)


def test_stage_row():
  assert metrics.stage_row(_HISTORY) == {
      "best top-1": 55.0, "best epoch": 2, "last top-1": 54.0,
      "fused SL-T best": 46.0, "teacher top-1": 75.0}
  # The teacher stage trains its network as 'student' and has no SL-Ts.
  ce = [{"epoch": 1, "student/top1": 60.0}, {"epoch": 2, "student/top1": 58.0}]
  assert metrics.stage_row(ce) == {
      "best top-1": 60.0, "best epoch": 1, "last top-1": 58.0,
      "fused SL-T best": None, "teacher top-1": None}
  table = metrics.summary_table([{"stage": "ce", **metrics.stage_row(ce)}],
                                ["stage", *metrics.STAGE_COLUMNS])
  assert table.splitlines()[2] == (
      "| ce    |      60.00 |          1 |      58.00 | -               "
      "| -             |")


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
              "student/kl_teacher": 1.0 / e, "student/kl_fused": 0.5 / e}
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
