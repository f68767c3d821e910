"""Exit handling of the launch scripts, with fake python, srun and scontrol.

No JAX process is started: the fakes are shell scripts, so these tests check
only what the scripts do with their children's exit statuses.
"""

import os
import signal
import stat
import subprocess
import time

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
LOCAL = os.path.abspath(os.path.join(ROOT, "launch", "local.sh"))
SLURM = os.path.abspath(os.path.join(ROOT, "launch", "slurm.sh"))


def _script(path, body):
  """Writes an executable bash script and returns its path as a string."""
  path.write_text("#!/usr/bin/env bash\n" + body)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return str(path)


def _pids_with_marker(marker):
  """PIDs of live processes whose command line or environment names marker."""
  found = []
  for pid in os.listdir("/proc"):
    if not pid.isdigit():
      continue
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmdline = f.read()
      with open(f"/proc/{pid}/environ", "rb") as f:
        environ = f.read()
      with open(f"/proc/{pid}/stat") as f:
        state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:  # exited meanwhile, or not ours to read
      continue
    if state != "Z" and (marker.encode() in cmdline or
                         marker.encode() in environ):
      found.append(int(pid))
  return found


@pytest.fixture
def marker(tmp_path):
  """A unique string in every fake process's environment; processes still
  carrying it after a test are leftovers, and are killed so none leaks."""
  value = f"SLKD_TEST_MARKER_{os.getpid()}_{tmp_path.name}"
  yield value
  for pid in _pids_with_marker(value):
    os.kill(pid, signal.SIGKILL)


def _run_local(tmp_path, marker, fake_body, num_processes=2, timeout=30):
  env = dict(os.environ, PYTHON=_script(tmp_path / "python", fake_body),
             SLKD_KILL_GRACE="2", SLKD_TEST_MARKER=marker)
  start = time.monotonic()
  proc = subprocess.run(["bash", LOCAL, str(num_processes), "--flag"],
                        env=env, capture_output=True, text=True,
                        timeout=timeout)
  return proc, time.monotonic() - start


def test_local_stops_everyone_when_one_process_dies(tmp_path, marker):
  # Process 1 crashes at once; process 0 would wait 60 s in a "collective".
  proc, elapsed = _run_local(tmp_path, marker, (
      '[[ "$SLKD_PROCESS_ID" == 1 ]] && exit 1\n'
      "sleep 60\n"))
  assert proc.returncode == 1, proc.stderr
  assert elapsed < 10, f"local.sh took {elapsed:.1f}s: it waited for process 0"
  time.sleep(0.5)  # let the killed group disappear from /proc
  assert _pids_with_marker(marker) == [], "a fake process (or its sleep) leaked"


def test_local_kills_a_process_that_ignores_sigterm(tmp_path, marker):
  # A process stuck where SIGTERM is not acted on still goes, by SIGKILL.
  proc, elapsed = _run_local(tmp_path, marker, (
      '[[ "$SLKD_PROCESS_ID" == 1 ]] && exit 3\n'
      "trap '' TERM\n"
      "sleep 60\n"))
  assert proc.returncode == 3, proc.stderr
  assert elapsed < 15
  time.sleep(0.5)
  assert _pids_with_marker(marker) == []


def test_local_exits_75_when_every_process_is_preempted(tmp_path, marker):
  proc, _ = _run_local(tmp_path, marker, "sleep 0.$SLKD_PROCESS_ID\nexit 75\n",
                       num_processes=3)
  assert proc.returncode == 75, proc.stderr
  assert "stopping the others" not in proc.stderr  # 75 is not a crash


def test_local_passes_arguments_and_succeeds(tmp_path, marker):
  log = tmp_path / "calls"
  proc, _ = _run_local(tmp_path, marker, (
      f'echo "$SLKD_PROCESS_ID/$SLKD_NUM_PROCESSES $*" >> {log}\n'))
  assert proc.returncode == 0, proc.stderr
  assert sorted(log.read_text().splitlines()) == [
      "0/2 -m slkd_jax.main --flag", "1/2 -m slkd_jax.main --flag"]


def test_local_forwards_sigterm(tmp_path, marker):
  # Each fake exits 75 on SIGTERM, like a run that saved its checkpoint.
  ready = tmp_path / "ready"
  fake = _script(tmp_path / "python", (
      "trap 'exit 75' TERM\n"
      f"touch {ready}.$SLKD_PROCESS_ID\n"
      "while true; do sleep 0.1; done\n"))
  env = dict(os.environ, PYTHON=fake, SLKD_TEST_MARKER=marker)
  proc = subprocess.Popen(["bash", LOCAL, "2"], env=env,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 10
  while not all(os.path.exists(f"{ready}.{i}") for i in range(2)):
    assert time.monotonic() < deadline, "fake processes did not start"
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=10) == 75, proc.stderr.read()


def _run_slurm(tmp_path, srun_status):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  calls = tmp_path / "scontrol_calls"
  _script(bin_dir / "srun", f'echo "$*" > {tmp_path}/srun_args\n'
                            f"exit {srun_status}\n")
  _script(bin_dir / "scontrol", f'echo "$*" >> {calls}\n')
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}",
             SLURM_JOB_ID="4242", HOME=str(tmp_path))
  proc = subprocess.run(["bash", SLURM, "--workdir=/w"], env=env,
                        capture_output=True, text=True, timeout=30)
  requeues = calls.read_text().splitlines() if calls.exists() else []
  return proc, requeues


def test_slurm_requeues_a_preempted_job(tmp_path):
  proc, requeues = _run_slurm(tmp_path, 75)
  assert requeues == ["requeue 4242"]
  assert proc.returncode == 75
  assert "slkd_jax.main --workdir=/w" in (tmp_path / "srun_args").read_text()


def test_slurm_does_not_requeue_a_finished_job(tmp_path):
  proc, requeues = _run_slurm(tmp_path, 0)
  assert (proc.returncode, requeues) == (0, [])


def test_slurm_does_not_requeue_a_crash(tmp_path):
  proc, requeues = _run_slurm(tmp_path, 1)
  assert (proc.returncode, requeues) == (1, [])


def test_slurm_keeps_the_early_signal():
  with open(SLURM) as f:
    assert "#SBATCH --signal=TERM@120\n" in f.read()
