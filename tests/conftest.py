"""Shared test helpers."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# The checkout's root: tests find configs/, notebooks/ and pyproject.toml from
# here, never from the working directory.
REPO_ROOT = Path(__file__).resolve().parent.parent
DIGITS_MLP_CONFIG = str(REPO_ROOT / "configs" / "digits_mlp.py")

# Many tests were written for K=1, stratified, per tensor, before the library's
# defaults were measured; they pin those settings (the defaults themselves are
# tested in test_quantize.py::test_defaults_are_the_measured_ones).
STRATIFIED_PER_TENSOR = dict(sampler="stratified", granularity="per_tensor")
PINNED = dict(samples_per_weight=1.0, **STRATIFIED_PER_TENSOR)


@pytest.fixture
def fresh_python():
  """Runs code in a fresh interpreter and returns (returncode, stderr).

  Errors raised at run time under ``jit`` travel through an XLA host callback;
  we check those in a separate process so that the runtime state an aborted
  computation leaves behind cannot affect the rest of the suite.
  """

  def run(code: str) -> tuple[int, str]:
    proc = subprocess.run(
      [sys.executable, "-c", textwrap.dedent(code)],
      capture_output=True,
      text=True,
      timeout=300,
    )
    return proc.returncode, proc.stderr

  return run


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_executables():
  """Drops JAX's compiled executables after each test module.

  Every XLA:CPU executable holds a few memory mappings; the whole suite
  compiles tens of thousands of them (every parametrization and every eager
  primitive shape), which exceeds Linux's default vm.max_map_count (65530) and
  makes a later compilation crash. Clearing the caches per module keeps the
  process far below it.
  """
  yield
  import gc

  import jax

  jax.clear_caches()
  gc.collect()
