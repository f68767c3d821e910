"""What the five commands share (slkd_jax/cli.py): ``--help`` exits 0, a user
error is one ``error:`` line and status 2, a full disk too (naming the path,
whichever thread or library hit it first), a preemption 75, a bug keeps its
traceback; and evaluate's advice for a wrong --model or a missing best
checkpoint."""

import errno
import logging
import os
import subprocess
import sys
import threading

import pytest
from absl import flags

from slkd_jax import cli, errors, evaluate, preemption
from conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = {"main": ["--config", "--workdir", "--coordinator_address"],
            "evaluate": ["--workdir", "--model", "--checkpoint", "--stage"],
            "report": ["--ignore"],
            "table": ["--config", "--workdir", "--dry_run", "--measure"],
            "convert_torch": ["--arch", "--checkpoint", "--out", "--force"]}
TINY_RUN = [
    "--config=configs/cifar100.py", "--config.data.name=synthetic",
    "--config.data.image_size=8", "--config.data.num_classes=5",
    "--config.data.num_train=40", "--config.data.num_test=20",
    "--config.batch_size=16", "--config.eval_batch_size=16",
    "--config.teacher.arch=resnet8", "--config.teacher.num_epochs=1",
    "--config.student.arch=resnet8", "--config.num_epochs=1"]


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
              XLA_FLAGS=xla_flags(xla_force_host_platform_device_count=1))


def _one_error_line(stderr: str) -> str:
  lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, stderr[-3000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  return lines[0]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_works_for_every_command(command):
  out = subprocess.run([sys.executable, "-m", f"slkd_jax.{command}", "--help"],
                       cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert f"flags of python -m slkd_jax.{command}" in out.stdout
  for flag in COMMANDS[command]:
    assert f"  {flag}:" in out.stdout, out.stdout
  assert "error" not in out.stderr


def _define(fv: flags.FlagValues, argv) -> None:
  del argv
  flags.DEFINE_bool("dry_run", False, "a bool", flag_values=fv)
  flags.DEFINE_integer("num_classes", None, "an int", flag_values=fv)


def _run(body, *argv, output=lambda fv: None):
  return cli.run(_define, body, list(argv), prog="prog", doc="usage: prog",
                 output=output)


def test_flags_are_fresh_each_call_and_take_dashes():
  seen = []
  assert _run(lambda fv, rest: seen.append((fv.dry_run, fv.num_classes,
                                            rest)),
              "--dry-run", "--num-classes", "3", "pos") == 0
  assert _run(lambda fv, rest: seen.append((fv.dry_run, fv.num_classes,
                                            rest))) == 0
  assert seen == [(True, 3, ["pos"]), (False, None, [])]


def test_a_bad_flag_is_one_line(capsys):
  assert _run(lambda fv, rest: None, "--num_classes=x") == 2
  assert _one_error_line(capsys.readouterr().err).startswith(
      "error: flag --num_classes=x")


def test_user_errors_preemption_and_bugs(capsys):
  def raising(error):
    def body(fv, rest):
      raise error
    return body

  assert _run(raising(errors.ConfigError("fix the config"))) == 2
  assert _one_error_line(capsys.readouterr().err) == "error: fix the config"
  assert _run(raising(preemption.Preempted("stopped at step 4"))) == 75
  assert "stopped at step 4" in capsys.readouterr().err
  with pytest.raises(ValueError, match="a bug"):
    _run(raising(ValueError("a bug")))


def _raise_disk_full(path="/runs/w/slkd/metrics.jsonl", code=errno.ENOSPC):
  raise OSError(code, os.strerror(code), path)


def test_disk_full_names_the_path(capsys):
  assert cli.guard(_raise_disk_full) == 2
  line = _one_error_line(capsys.readouterr().err)
  assert "no space left on device while writing /runs/w/slkd/metrics.jsonl" \
      in line and "free space" in line and "rerun" in line
  assert cli.guard(lambda: _raise_disk_full(code=errno.EDQUOT)) == 2
  assert "disk quota exceeded" in capsys.readouterr().err


def test_disk_full_under_a_secondary_error_is_the_cause(capsys):
  def cleanup_fails():
    try:
      _raise_disk_full("/runs/w/slkd/checkpoints/3.orbax-checkpoint-tmp/meta")
    finally:
      raise RuntimeError("Event loop is closed")  # what cleanup raised next

  assert cli.guard(cleanup_fails) == 2
  line = _one_error_line(capsys.readouterr().err)
  assert "while writing /runs/w/slkd/checkpoints/3:" in line, line


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_a_real_full_write_names_the_open_file(tmp_path, capsys):
  """/dev/full fails every write with ENOSPC; the OSError has no filename,
  the open file in the failing frame names it."""
  target = tmp_path / "config.json"
  target.symlink_to("/dev/full")

  def write():
    with open(target, "w") as f:
      f.write("{}")

  assert cli.guard(write, output=lambda: "/the/workdir") == 2
  assert f"while writing {target}:" in _one_error_line(capsys.readouterr().err)


def test_disk_full_logged_by_a_library_thread_is_reported_once(capsys):
  """orbax logs a failed background save with its traceback, then the main
  thread fails with something else (or nothing)."""
  def background_save_fails():
    try:
      _raise_disk_full("/runs/w/teacher/best/7")
    except OSError:
      logging.getLogger("absl").exception("background save failed")
    thread = threading.Thread(target=_raise_disk_full)
    thread.start()
    thread.join()

  def then_a_secondary_error():
    background_save_fails()
    raise RuntimeError("cannot schedule new futures after shutdown")

  assert cli.guard(then_a_secondary_error) == 2
  err = capsys.readouterr().err
  assert "while writing /runs/w/teacher/best/7:" in _one_error_line(err)
  assert "background save failed" not in err
  assert cli.guard(background_save_fails) == 2
  assert "/runs/w/teacher/best/7" in _one_error_line(capsys.readouterr().err)


def _tiny_run(tmp_path, *python_args):
  return subprocess.run(
      [sys.executable, *python_args, f"--workdir={tmp_path / 'w'}", *TINY_RUN],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_the_command_on_a_full_disk(tmp_path):
  """A real ENOSPC: the teacher stage's config.json is /dev/full."""
  (tmp_path / "w" / "teacher").mkdir(parents=True)
  (tmp_path / "w" / "teacher" / "config.json").symlink_to("/dev/full")
  out = _tiny_run(tmp_path, "-m", "slkd_jax.main")
  assert out.returncode == 2, out.stderr[-3000:]
  line = _one_error_line(out.stderr)
  assert f"while writing {tmp_path / 'w' / 'teacher' / 'config.json'}:" in line


def test_the_command_when_a_background_checkpoint_save_fails(tmp_path):
  """orbax's save thread hits ENOSPC: one line naming the checkpoint, none
  of orbax's logged tracebacks or the errors of its threads at exit."""
  script = tmp_path / "full_disk_main.py"
  script.write_text(
      "import errno, os, sys\n"
      "from orbax.checkpoint._src.handlers import json_checkpoint_handler\n"
      "from slkd_jax import cli, main\n"
      "async def full(self, x, directory):\n"
      "  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC),\n"
      "                os.path.join(str(directory), 'meta'))\n"
      "json_checkpoint_handler.JsonCheckpointHandler._save_fn = full\n"
      "cli.start(main.main)\n")
  out = _tiny_run(tmp_path, str(script))
  assert out.returncode == 2, out.stderr[-3000:]
  line = _one_error_line(out.stderr)
  assert f"while writing {tmp_path / 'w' / 'teacher' / 'checkpoints'}" in line
  assert "no space left on device" in line
  assert "Event loop is closed" not in out.stderr


# ---------------------------------------------------------------------------
# evaluate's advice.


def _fake_workdir(root):
  stage = root / "w" / "slkd"
  stage.mkdir(parents=True)
  (root / "w" / "config.json").write_text('{"method": "slkd"}')
  (stage / "config.json").write_text("{}")
  (stage / "best_model").mkdir()
  return root / "w"


@pytest.mark.parametrize("which,fragments", [
    ("workdir", ["is a training workdir", "--workdir=", "best_model"]),
    ("stage", ["is a stage of a training workdir", "--stage=slkd",
               "slkd/best_model"]),
])
def test_evaluate_model_given_a_workdir_says_what_to_pass(tmp_path, capsys,
                                                          which, fragments):
  workdir = _fake_workdir(tmp_path)
  path = workdir if which == "workdir" else workdir / "slkd"
  assert evaluate.main([f"--model={path}",
                        "--config=configs/quickstart.py"]) == 2
  line = _one_error_line(capsys.readouterr().err)
  for fragment in fragments:
    assert fragment in line, line


def test_evaluate_without_a_best_checkpoint_suggests_latest(tmp_path, capsys):
  workdir = _fake_workdir(tmp_path)
  assert evaluate.main([f"--workdir={workdir}"]) == 2
  line = _one_error_line(capsys.readouterr().err)
  assert "best does not exist" in line and "--checkpoint=latest" in line


def test_evaluate_with_a_damaged_best_checkpoint_suggests_latest(tmp_path):
  from slkd_jax import parallel
  best = tmp_path / "best"
  (best / "3" / "state").mkdir(parents=True)
  (best / "3" / "_CHECKPOINT_METADATA").write_text("{not json")
  with pytest.raises(errors.CheckpointError,
                     match="none of the checkpoints.*--checkpoint=latest"):
    evaluate._restore(str(best), "best", {"w": __import__("numpy").zeros(2)},
                      parallel.make_mesh())


def test_evaluate_shows_progress_over_the_stages(tmp_path, monkeypatch,
                                                 capsys):
  workdir = _fake_workdir(tmp_path)
  (workdir / "kd").mkdir()
  (workdir / "kd" / "config.json").write_text("{}")
  monkeypatch.setattr(evaluate, "evaluate_stage", lambda d, s, w, m: [
      {"stage": s, "checkpoint": w, "epoch": 1, "network": "student",
       "top-1": 1.0, "top-5": 2.0}])
  assert evaluate.main([f"--workdir={workdir}"]) == 0
  captured = capsys.readouterr()
  assert "evaluate: 2/2 100%" in captured.err
  assert "| kd " in captured.out and "| slkd " in captured.out
