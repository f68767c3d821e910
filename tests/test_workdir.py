"""The workdir lock: one run per workdir; a killed run's lock is taken over."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from slkd_jax import errors, workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A child that takes the lock, says so, and holds it until killed.
_HOLDER = """
import sys, time
from slkd_jax.workdir import workdir_lock
with workdir_lock(sys.argv[1], enabled=True):
  print("locked", flush=True)
  time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
  """A live child process holding the lock of ``tmp_path``."""
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  child = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)],
                           env=env, stdout=subprocess.PIPE, text=True)
  try:
    assert child.stdout.readline().strip() == "locked"
    yield child
  finally:
    if child.poll() is None:
      child.kill()
    child.wait()


def test_a_workdir_held_by_a_live_run_is_refused_naming_the_holder(
    tmp_path, holder):
  with pytest.raises(errors.ConfigError) as refused:
    with workdir.workdir_lock(str(tmp_path), enabled=True):
      pytest.fail("a second run entered a held workdir")
  message = str(refused.value)
  assert "\n" not in message
  assert f"pid {holder.pid} on {socket.gethostname()}, since " in message
  assert "in use by another run" in message and "another --workdir" in message


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path, holder):
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  lock_file = tmp_path / workdir.LOCK_FILE
  assert json.loads(lock_file.read_text())["pid"] == holder.pid  # stale
  with workdir.workdir_lock(str(tmp_path), enabled=True):
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
  assert lock_file.read_text() == ""  # released: no holder recorded


def test_the_lock_is_released_when_the_run_ends(tmp_path):
  with pytest.raises(RuntimeError):
    with workdir.workdir_lock(str(tmp_path), enabled=True):
      raise RuntimeError("the run failed")
  with workdir.workdir_lock(str(tmp_path), enabled=True):
    pass  # not refused: the failed run let go


def test_other_processes_of_a_run_take_no_lock(tmp_path, holder):
  with workdir.workdir_lock(str(tmp_path), enabled=False):
    pass


@pytest.mark.parametrize("path,message", [
    ("", "--workdir is empty"), ("FILE", "is a file"),
    ("FILE/sub", "cannot create")])
def test_bad_workdirs_are_one_line_errors(tmp_path, path, message):
  (tmp_path / "FILE").write_text("x")
  with pytest.raises(errors.ConfigError, match=message):
    workdir.check_workdir(str(tmp_path / path) if path else "")
