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


# The modules that take minutes, longest first. With ``-n 2 --dist loadscope``
# xdist hands whole modules to its workers in collection order, so a long
# module collected last leaves one worker busy after the other has finished
# (measured: the last 2% of the suite took 6 of its 19 minutes). They run
# first; the many short modules then fill in.
_LONG_MODULES = (
  "tests/test_sharded.py",
  "tests/test_notebooks.py",
  "tests/test_sampling.py",
  "tests/experiments/test_run.py",
  "tests/experiments/test_bench_checkpoint.py",
  "tests/experiments/test_models.py",
)


def pytest_collection_modifyitems(items: list) -> None:
  """Puts the long modules first (a stable sort: the rest keep their
  order)."""

  def rank(item: pytest.Item) -> int:
    path = Path(str(item.fspath)).resolve()
    for i, module in enumerate(_LONG_MODULES):
      if path == REPO_ROOT / module:
        return i
    return len(_LONG_MODULES)

  items.sort(key=rank)


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
