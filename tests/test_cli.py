"""The ``mcq-jax`` command line (mcq_jax/_cli.py)."""

import subprocess
import sys
import textwrap

import jax
import pytest

import mcq_jax
from mcq_jax import _cli

RUNNER = "python -m experiments.run configs/<name>.py"


def _fresh(code: str) -> subprocess.CompletedProcess:
  """Runs ``code`` in a fresh interpreter, so ``sys.modules`` starts empty."""
  return subprocess.run(
    [sys.executable, "-c", textwrap.dedent(code)],
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_help_lists_the_commands_and_where_the_runner_is(capsys):
  assert _cli.main(["--help"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("usage: mcq-jax")
  assert "info" in out and "bug report" in out
  assert RUNNER in out


def test_version_is_the_package_version(capsys):
  assert _cli.main(["--version"]) == 0
  assert capsys.readouterr().out.split() == ["mcq_jax", mcq_jax.__version__]


def test_info_reports_versions_platform_and_devices(capsys):
  assert _cli.main(["info"]) == 0
  out = capsys.readouterr().out
  fields = dict(line.split(":", 1) for line in out.splitlines())
  fields = {name: value.strip() for name, value in fields.items()}
  assert {
    "mcq_jax",
    "jax",
    "jaxlib",
    "flax",
    "numpy",
    "python",
    "platform",
    "backend",
    "devices",
  } <= set(fields)
  assert fields["mcq_jax"] == mcq_jax.__version__
  assert fields["jax"] == jax.__version__
  assert fields["python"].startswith(".".join(map(str, sys.version_info[:3])))
  assert fields["backend"] == jax.default_backend()
  assert jax.devices()[0].device_kind in fields["devices"]


def test_info_takes_its_own_help(capsys):
  assert _cli.main(["info", "--help"]) == 0
  assert capsys.readouterr().out.startswith("usage: mcq-jax info")


def test_run_points_to_the_experiment_runner_in_a_checkout(capsys):
  assert _cli.main(["run", "configs/digits_mlp.py"]) == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  assert "'run' is not a command of the installed library" in captured.err
  assert "checkout" in captured.err and RUNNER in captured.err


@pytest.mark.parametrize("argv", [["frobnicate"], ["--version-typo"], []])
def test_usage_errors_exit_with_2(argv, capsys):
  assert _cli.main(argv) == 2
  err = capsys.readouterr().err
  assert (
    err.startswith("usage: mcq-jax") or "unknown command 'frobnicate'" in err
  )
  if argv == ["frobnicate"]:
    assert "commands: info" in err


def test_main_reads_sys_argv_by_default(monkeypatch, capsys):
  monkeypatch.setattr(sys, "argv", ["mcq-jax", "--version"])
  assert _cli.main() == 0
  assert mcq_jax.__version__ in capsys.readouterr().out


def test_importing_the_cli_imports_nothing_optional():
  # flax.nnx, and so `import mcq_jax`, imports optax (a flax dependency); the
  # command line itself must add only the standard library.
  proc = _fresh("""
      import sys
      import mcq_jax
      before = set(sys.modules)
      from mcq_jax import _cli
      _cli.main(["--help"])
      added = {name.partition(".")[0] for name in set(sys.modules) - before}
      print(sorted(added - set(sys.stdlib_module_names)))
      optional = ("ml_collections", "tensorflow_datasets", "sklearn", "qwix",
                  "experiments")
      print(sorted(m for m in optional if m in sys.modules))
  """)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[-2:] == ["['mcq_jax']", "[]"], proc.stdout


def test_runs_as_a_module():
  proc = subprocess.run(
    [sys.executable, "-m", "mcq_jax._cli", "--version"],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split() == ["mcq_jax", mcq_jax.__version__]
