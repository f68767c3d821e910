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


def _run_slurm(tmp_path, srun_status, args=("--workdir=/w",), env=None):
  """slurm.sh with fake srun/scontrol, run in tmp_path (its own
  submission directory, so no .venv of the checkout is activated)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  calls = tmp_path / "scontrol_calls"
  _script(bin_dir / "srun",
          f'echo "$*" > {tmp_path}/srun_args\n'
          f'echo "${{SLKD_TEST_VENV:-none}}" > {tmp_path}/srun_venv\n'
          f"exit {srun_status}\n")
  _script(bin_dir / "scontrol", f'echo "$*" >> {calls}\n')
  inherited = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLKD_", "SLURM_ARRAY_"))}
  env = dict(inherited, PATH=f"{bin_dir}:{os.environ['PATH']}",
             SLURM_JOB_ID="4242", HOME=str(tmp_path), **(env or {}))
  proc = subprocess.run(["bash", SLURM, *args], env=env, cwd=tmp_path,
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


def _slurm_text():
  with open(SLURM) as f:
    return f.read()


def test_slurm_appends_to_the_log_of_a_requeued_job():
  assert "\n#SBATCH --open-mode=append\n" in _slurm_text()


@pytest.mark.parametrize("option", ["partition", "time", "output"])
def test_slurm_shows_site_options_as_inactive_examples(option):
  text = _slurm_text()
  assert f"\n##SBATCH --{option}=" in text  # ignored by sbatch until edited
  assert f"\n#SBATCH --{option}" not in text  # no placeholder is live


def test_slurm_header_has_a_single_gpu_cifar_example():
  header = _slurm_text().split("\nset -euo pipefail")[0]
  assert "sbatch --gpus=1 launch/slurm.sh --config=configs/cifar100.py" in (
      header)


def test_slurm_activates_the_virtualenv(tmp_path):
  venv = tmp_path / "myvenv"
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "activate").write_text(
      "export SLKD_TEST_VENV=activated\n"
      'echo "$UNSET_IN_ACTIVATE" >/dev/null\n')  # set -u must not trip
  proc, _ = _run_slurm(tmp_path, 0, env={"SLKD_VENV": str(venv)})
  assert proc.returncode == 0, proc.stderr
  assert (tmp_path / "srun_venv").read_text().strip() == "activated"


def test_slurm_runs_without_a_virtualenv(tmp_path):
  proc, _ = _run_slurm(tmp_path, 0, env={"SLKD_VENV": str(tmp_path / "no")})
  assert proc.returncode == 0, proc.stderr
  assert (tmp_path / "srun_venv").read_text().strip() == "none"


def test_slurm_gives_each_array_job_its_table_shard(tmp_path):
  proc, _ = _run_slurm(tmp_path, 0, args=("--config=t.py", "--workdir=/w"),
                       env={"SLKD_MODULE": "slkd_jax.table",
                            "SLURM_ARRAY_TASK_ID": "3",
                            "SLURM_ARRAY_TASK_MIN": "1",
                            "SLURM_ARRAY_TASK_COUNT": "4"})
  assert proc.returncode == 0, proc.stderr
  assert (tmp_path / "srun_args").read_text().split() == [
      "--kill-on-bad-exit=1", "python", "-m", "slkd_jax.table",
      "--config=t.py", "--workdir=/w", "--shard=2/4"]


def test_slurm_keeps_a_shard_the_arguments_give(tmp_path):
  proc, _ = _run_slurm(tmp_path, 0, args=("--workdir=/w", "--shard=0/2"),
                       env={"SLKD_MODULE": "slkd_jax.table",
                            "SLURM_ARRAY_TASK_ID": "1",
                            "SLURM_ARRAY_TASK_COUNT": "2"})
  assert proc.returncode == 0, proc.stderr
  args = (tmp_path / "srun_args").read_text().split()
  assert args[3:] == ["slkd_jax.table", "--workdir=/w", "--shard=0/2"]
