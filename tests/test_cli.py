"""The ``mcq-jax`` command line (mcq_jax/_cli.py)."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

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
  assert fields["native kernels"] == f"yes ({mcq_jax.native_status().library})"
  assert fields["native int8 products"] == "yes (AVX512-VNNI)"


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
    assert "commands: quantize, inspect, info" in err


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


# -- quantize / inspect --------------------------------------------------------


@pytest.fixture
def torch_style(tmp_path):
  """A PyTorch-layout safetensors file: [out, in] weights, 1-D biases."""
  rng = np.random.default_rng(0)
  tensors = {
    "fc1.weight": rng.normal(size=(8, 12)).astype(np.float32),
    "fc1.bias": rng.normal(size=(8,)).astype(np.float32),
    "fc2.weight": rng.normal(size=(3, 8)).astype(np.float32),
  }
  path = str(tmp_path / "model.safetensors")
  save_file(tensors, path)
  return path, tensors


def test_quantize_writes_what_the_library_computes(
  tmp_path, torch_style, capsys
):
  src, tensors = torch_style
  dst = str(tmp_path / "q.safetensors")
  argv = ["quantize", src, dst, "--samples-per-weight", "3", "--seed", "7"]
  assert _cli.main([*argv, "--sampler", "stratified"]) == 0
  out, err = capsys.readouterr()
  assert out.splitlines()[0] == f"wrote {dst}: 2 of 3 tensors quantized"
  assert out.splitlines()[1].startswith("total: ")
  assert "3/3" in err  # the progress bar, on stderr
  expected = mcq_jax.quantize(
    tensors,
    jax.random.key(7),
    samples_per_weight=3.0,
    sampler="stratified",
    channel_axis=0,
  )
  loaded = mcq_jax.load(dst)
  for name in ("fc1.weight", "fc2.weight"):
    np.testing.assert_array_equal(loaded[name].values, expected[name].values)
    np.testing.assert_array_equal(loaded[name].scale, expected[name].scale)
  np.testing.assert_array_equal(loaded["fc1.bias"], tensors["fc1.bias"])

  assert _cli.main(["inspect", dst]) == 0
  table = capsys.readouterr().out.splitlines()
  assert table[0].split()[:3] == ["path", "shape", "dtype"]
  rows = {line.split()[0]: line.split() for line in table[2:-1]}
  assert rows["fc1.weight"][1:5] == ["8x12", "int8", "8", str(8 * 36)]
  assert rows["fc1.bias"][2] == "float32"
  assert table[-1] == str(mcq_jax.summary(loaded)).splitlines()[-1]


def test_quantize_options_reach_the_library(tmp_path, torch_style, capsys):
  src, tensors = torch_style
  dst = str(tmp_path / "q")
  argv = ["quantize", src, dst, "--no-progress", "--where", "fc2"]
  argv += ["--granularity", "per_tensor", "--channel-axis", "1", "--sort"]
  assert _cli.main([*argv, "--format", "orbax"]) == 0
  assert capsys.readouterr().err == ""
  assert os.path.isdir(dst)
  loaded = mcq_jax.load(dst)
  assert isinstance(loaded["fc1.weight"], np.ndarray)
  fc2 = loaded["fc2.weight"]
  assert fc2.granularity == "per_tensor" and fc2.sort
  assert _cli.main(["quantize", src, dst, "--channel-axis", "0,1"]) == 1
  assert "exists" in capsys.readouterr().err
  argv = ["quantize", src, dst, "--overwrite", "--channel-axis", "0,1"]
  assert _cli.main([*argv, "--no-progress"]) == 0
  assert mcq_jax.load(dst)["fc1.weight"].channel_axes == (0, 1)


@pytest.mark.parametrize(
  "extra, code, message",
  [
    (["--where", "nothing"], 1, "`where` selects no tensor"),
    (["--samples-per-weight", "0"], 2, "must be a finite number > 0"),
    (["--samples-per-weight", "1e309"], 2, "must be a finite number > 0"),
    (["--channel-axis", "x"], 2, "comma-separated"),
    (["--channel-axis", "5"], 1, "'fc1.weight'"),
    (["--format", "npz"], 2, "invalid choice"),
    (["--sampler", "magic"], 2, "invalid choice"),
    (["--bits", "1"], 2, "must be in [2, 32]"),
    (["--bits", "four"], 2, "not an integer"),
    (["--bits", "4", "--samples-per-weight", "2"], 2, "not allowed with"),
    (["--group-size", "0"], 2, "must be >= 1"),
    (
      ["--group-size", "4", "--granularity", "per_tensor"],
      1,
      "needs granularity='per_channel'",
    ),
  ],
)
def test_quantize_usage_errors(
  tmp_path, torch_style, capsys, extra, code, message
):
  src, _ = torch_style
  dst = str(tmp_path / "q.safetensors")
  assert _cli.main(["quantize", src, dst, "--no-progress", *extra]) == code
  assert message in capsys.readouterr().err
  assert not os.path.exists(dst)


def test_quantize_and_inspect_name_bad_inputs(tmp_path, torch_style, capsys):
  src, tensors = torch_style
  assert _cli.main(["quantize", str(tmp_path / "absent"), "x"]) == 1
  assert "absent: no such file or directory" in capsys.readouterr().err
  nan = dict(tensors, **{"fc2.weight": np.full((3, 8), np.nan, np.float32)})
  save_file(nan, str(tmp_path / "nan.safetensors"))
  dst = str(tmp_path / "q.safetensors")
  argv = ["quantize", str(tmp_path / "nan.safetensors"), dst, "--no-progress"]
  assert _cli.main(argv) == 1
  assert "'fc2.weight' has non-finite values" in capsys.readouterr().err
  assert not os.path.exists(dst)
  (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
  assert _cli.main(["inspect", str(tmp_path / "junk.safetensors")]) == 1
  assert "mcq-jax inspect: error: " in capsys.readouterr().err


def test_quantize_bits_groups_and_refit_reach_the_library(
  tmp_path, torch_style, capsys
):
  src, tensors = torch_style
  dst = str(tmp_path / "q.safetensors")
  argv = ["quantize", src, dst, "--no-progress", "--bits", "4"]
  assert _cli.main([*argv, "--group-size", "5", "--refit-scale"]) == 0
  expected = mcq_jax.quantize(
    tensors,
    jax.random.key(0),
    bits=4,
    group_size=5,
    refit_scale=True,
    channel_axis=0,
  )
  loaded = mcq_jax.load(dst)
  fc1 = loaded["fc1.weight"]
  # [out, in] = [8, 12]: blocks of 5, 5 and 2 inputs, each its own scale
  assert (fc1.bits, fc1.group_size, fc1.refit_scale) == (4, 5, True)
  assert fc1.scale.shape == (8, 3) and fc1.max_abs_value == 7
  for name in ("fc1.weight", "fc2.weight"):
    np.testing.assert_array_equal(loaded[name].values, expected[name].values)
    np.testing.assert_array_equal(loaded[name].scale, expected[name].scale)
  assert np.abs(np.asarray(fc1.values)).max() <= 7
  assert "4" in capsys.readouterr().out


def test_quantize_stack_axes(tmp_path, capsys):
  stacked = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32)
  save_file({"layers.weight": stacked}, str(tmp_path / "s.safetensors"))
  dst = str(tmp_path / "q.safetensors")
  argv = ["quantize", str(tmp_path / "s.safetensors"), dst, "--no-progress"]
  assert _cli.main([*argv, "--stack-axes", "0", "--channel-axis", "1"]) == 0
  weight = mcq_jax.load(dst)["layers.weight"]
  assert weight.channel_axes == (0, 1) and weight.scale.shape == (3, 4, 1)
  expected = mcq_jax.quantize(
    {"layers.weight": stacked}, jax.random.key(0), stack_axes=0, channel_axis=1
  )["layers.weight"]
  np.testing.assert_array_equal(weight.values, expected.values)
