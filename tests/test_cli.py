"""The command line: every user mistake is one line and exit status 2,
preemption exits 75, and internal errors keep their traceback."""

import os
import subprocess
import sys

import pytest

from conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, env_extra=None, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=xla_flags(xla_force_host_platform_device_count=1))
  env.update(env_extra or {})
  return subprocess.run([sys.executable, "-m", "slkd_jax.main", *args],
                        cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


def assert_one_line_error(out, *fragments):
  assert out.returncode == 2, out.stderr[-2000:]
  assert "Traceback" not in out.stderr, out.stderr[-2000:]
  errors = [line for line in out.stderr.splitlines()
            if line.startswith("error: ")]
  assert len(errors) == 1, out.stderr[-2000:]
  for fragment in fragments:
    assert fragment in errors[0], errors[0]


@pytest.mark.parametrize("args,fragments", [
    (["--config=configs/quickstart.py", "--config.nokey=1"],
     ["--config.nokey", "no key 'nokey'"]),
    (["--config=configs/quickstart.py", "--config.optim.lr=1"],
     ["--config.optim.lr", "no key 'lr'"]),
    (["--config=configs/nofile.py"], ["--config", "configs/nofile.py"]),
    (["--config=configs/cifar100.py:resnet8"],
     ["unknown CIFAR-100 preset 'resnet8'", "did you mean", "'resnet56-resnet8'"]),
    (["--config=configs/cifar100.py:vgg13-vgg8,dkdd"],
     ["unknown method 'dkdd'", "did you mean 'dkd'"]),
    (["--config=configs/quickstart.py", "--config.seed=abc"],
     ["--config.seed=abc"]),
    (["--config=configs/quickstart.py", f"--config.seed={2**64 + 1}"],
     ["config.seed=", "[0, 2**32)"]),
    (["--config=configs/quickstart.py", "--config.checkpoint_every_epochs=0"],
     ["config.checkpoint_every_epochs=0"]),
    (["--config=configs/quickstart.py", "--config.slkd.fusion_weights=(0.7,0.7)"],
     ["config.slkd.fusion_weights", "summing to 1"]),
])
def test_config_mistakes_are_one_line(tmp_path, args, fragments):
  out = run_cli(*args, f"--workdir={tmp_path}")
  assert_one_line_error(out, *fragments)


def test_bad_workdir_is_one_line(tmp_path):
  target = tmp_path / "a_file"
  target.write_text("x")
  out = run_cli("--config=configs/quickstart.py", f"--workdir={target}")
  assert_one_line_error(out, "is a file")


def test_pth_teacher_without_torch_names_the_extra(tmp_path):
  # A torch that cannot be imported, as on a machine without the extra.
  fake = tmp_path / "site" / "torch"
  fake.mkdir(parents=True)
  (fake / "__init__.py").write_text("raise ImportError('no torch here')\n")
  pth = tmp_path / "teacher.pth"
  pth.write_bytes(b"not really")
  out = run_cli("--config=configs/quickstart.py", f"--workdir={tmp_path}/w",
                f"--config.teacher.checkpoint={pth}",
                env_extra={"PYTHONPATH": str(tmp_path / "site")})
  assert_one_line_error(out, "needs torch", ".[torch]")


def _run_main_with(tmp_path, raising: str):
  """The CLI with ``train.run`` replaced by one that raises ``raising``."""
  script = (
      "import sys\n"
      "from slkd_jax import cli, main, train, preemption\n"
      "def fake(config, workdir):\n"
      f"  raise {raising}\n"
      "train.run = fake\n"
      f"sys.argv = ['main', '--config=configs/quickstart.py', "
      f"'--workdir={tmp_path}']\n"
      "cli.start(main.main)\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_preemption_exits_75(tmp_path):
  out = _run_main_with(tmp_path, "preemption.Preempted('stopped at step 4')")
  assert out.returncode == 75, out.stderr[-2000:]
  assert "stopped at step 4" in out.stderr


def test_internal_errors_keep_their_traceback(tmp_path):
  out = _run_main_with(tmp_path, "ValueError('a bug')")
  assert out.returncode not in (0, 2, 75)
  assert "Traceback" in out.stderr and "ValueError: a bug" in out.stderr
