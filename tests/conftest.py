"""Shared test helpers."""

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

# One on-disk cache of compiled XLA programs for the whole test run, read and
# written by every process in it: the xdist workers, and the interpreters and
# notebook kernels that tests start (all inherit these variables; set here,
# before any of them imports JAX). The suite compiles the same programs in
# many modules, and the fixture below drops each module's programs from
# memory; reading them back from disk instead of compiling them again took
# the whole suite from 21.6 to 19.7 minutes on 2 workers (41.7 -> 37.4
# CPU-minutes; one run each, same machine and hour).
# The cache is bounded so that JAX guards its reads and writes with a file
# lock: two processes may compile the same program at once. A cache that the
# caller set up is used as it is and left in place.
_OWN_COMPILATION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_COMPILATION_CACHE = tempfile.mkdtemp(prefix="mcq_jax_tests_xla_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_COMPILATION_CACHE
  os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(2**32)
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.3"


def pytest_unconfigure(config: pytest.Config) -> None:
  """Removes the run's program cache once the process that made it ends
  (with xdist, the controller: after every worker)."""
  if _OWN_COMPILATION_CACHE is not None:
    shutil.rmtree(_OWN_COMPILATION_CACHE, ignore_errors=True)


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


@pytest.fixture(params=["native", "callback"])
def check_kind(request, monkeypatch):
  """Runs a test with the CPU's native check, then with a host callback
  (what other platforms get)."""
  from mcq_jax import _runtime_checks  # after the variables above are set

  if request.param == "callback":
    monkeypatch.setattr(_runtime_checks, "_natively_checked", lambda e: False)
  else:
    assert _runtime_checks._natively_checked(((ValueError, "m"),))
  return request.param
