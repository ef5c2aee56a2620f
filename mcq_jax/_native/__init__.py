"""Native CPU kernels, built on first use.

The XLA program of :mod:`mcq_jax._sampling` computes the counts of a group in
about a dozen passes over its values (a transposing copy, reductions, a scan
of 32 rows); ``counts.cc`` computes the same integers in two passes, as XLA
FFI handlers. ``matmul.cc`` and ``conv.cc`` multiply int8 matrices and
convolve int8 images exactly with AVX512-VNNI, where XLA:CPU's own int8
product is barely faster than its float32 one and its small convolutions are
slow in either (:mod:`mcq_jax._int8_matmul`, :mod:`mcq_jax._int8_conv`);
``checks.cc`` fails a running program whose value checks fail, without a
host callback (:mod:`mcq_jax._runtime_checks`). They are compiled once per
machine with the system's C++ compiler against the headers that ship with
jaxlib, cached on disk, and registered with XLA for the CPU platform. Where no
compiler is found (or the build fails), or on other platforms, the XLA
programs run instead: the integers are the same either way (the tests compare
them bit for bit).

Environment:
  ``MCQ_JAX_NATIVE``: ``"auto"`` (default: use the kernels where they
  build), ``"0"`` (never), ``"1"`` (always: a failed build raises).
  ``MCQ_JAX_CACHE_DIR``: where the built library is kept (default
  ``$XDG_CACHE_HOME/mcq_jax`` or ``~/.cache/mcq_jax``).
  ``CXX``: the C++ compiler (default ``c++``).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

import jax

_HERE = Path(__file__).parent
# Compiled into one library; the header is part of what the cache key reads.
SOURCES = tuple(
  _HERE / name for name in ("counts.cc", "matmul.cc", "conv.cc", "checks.cc")
)
HEADERS = (_HERE / "common.h", _HERE / "gemm.h")

# -ffp-contract=off: no fused multiply-add, so that every float operation
# rounds as XLA's does (see counts.cc). -fno-trapping-math lets gcc vectorize
# floor (it changes no value, only what may raise floating-point flags).
# -march=native is safe: the library is built on, and cached for, the
# machine that runs it (the cache key holds the CPU's flags).
FLAGS = (
  "-O3",
  "-march=native",
  "-ffp-contract=off",
  "-fno-math-errno",
  "-fno-trapping-math",
  "-std=c++17",
  "-shared",
  "-fPIC",
  "-w",
)

# A build takes a few seconds; one that hangs is abandoned.
_BUILD_TIMEOUT_S = 300

# The targets counts.cc defines, as registered with XLA.
MASS_TARGET = "mcq_jax_mass"
COUNTS_TARGET = "mcq_jax_counts"
INT8_MATMUL_TARGET = "mcq_jax_int8_matmul"
INT8_CONV_TARGET = "mcq_jax_int8_conv"
RAISE_IF_TARGET = "mcq_jax_raise_if"


class NativeStatus(NamedTuple):
  """Whether the native kernels are in use, and why not.

  Attributes:
    available: the kernels are built and registered for the CPU.
    library: the path of the built library ("" when unavailable).
    reason: why they are unavailable ("" when available).
    int8_matmul: the native int8 matrix product is in use too (the CPU has
      AVX512-VNNI); without it integer layers use XLA's int8 product.
  """

  available: bool
  library: str
  reason: str
  int8_matmul: bool = False


class NativeBuildError(RuntimeError):
  """``MCQ_JAX_NATIVE=1`` asked for the native kernels and they failed to
  build or load."""


def _mode() -> str:
  mode = os.environ.get("MCQ_JAX_NATIVE", "auto").strip().lower()
  if mode not in ("auto", "0", "1"):
    raise ValueError(f"MCQ_JAX_NATIVE={mode!r}: expected 'auto', '0' or '1'")
  return mode


def _cache_dir() -> Path:
  explicit = os.environ.get("MCQ_JAX_CACHE_DIR")
  if explicit:
    return Path(explicit)
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base) / "mcq_jax"


def _cpu_identity() -> str:
  """The CPU's model and flags (what -march=native compiles for)."""
  try:
    text = Path("/proc/cpuinfo").read_text()
  except OSError:
    return platform.processor()
  keep = [
    line
    for line in text.splitlines()
    if line.startswith(("model name", "flags", "Features", "CPU part"))
  ]
  return "\n".join(sorted(set(keep)))


def _library_path(include: str) -> Path:
  """The cached library of this source, flags, jaxlib and CPU (built by
  whichever compiler first built it)."""
  key = hashlib.sha256()
  for part in (
    *(path.read_bytes() for path in SOURCES + HEADERS),
    " ".join(FLAGS).encode(),
    jax.__version__.encode(),
    include.encode(),
    platform.machine().encode(),
    _cpu_identity().encode(),
  ):
    key.update(part)
    key.update(b"\0")
  return _cache_dir() / f"mcq_jax_counts-{key.hexdigest()[:20]}.so"


def _run(command: list[str], compiler: str) -> None:
  """Runs one compiler command; a failure is a :class:`NativeBuildError`."""
  try:
    result = subprocess.run(
      command,
      capture_output=True,
      text=True,
      check=False,
      timeout=_BUILD_TIMEOUT_S,
    )
  except subprocess.TimeoutExpired as error:
    raise NativeBuildError(
      f"{compiler} took over {_BUILD_TIMEOUT_S} s to build the kernels"
    ) from error
  if result.returncode:
    raise NativeBuildError(
      f"{compiler} failed to build the kernels "
      f"(exit {result.returncode}):\n{result.stderr[-2000:]}"
    )


def _build(compiler: str, include: str, target: Path) -> None:
  """Compiles the kernels into ``target``: each source to an object, on as
  many processes as there are CPUs, then one link (atomically: concurrent
  builds in several processes each write files of their own, then rename
  the library)."""
  target.parent.mkdir(parents=True, exist_ok=True)
  work = tempfile.mkdtemp(prefix=target.stem + ".", dir=target.parent)
  partial = os.path.join(work, target.name)
  compile_flags = [f for f in FLAGS if f != "-shared"]
  objects = [os.path.join(work, path.stem + ".o") for path in SOURCES]
  try:
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
      builds = [
        pool.submit(
          _run,
          [compiler, *compile_flags, f"-I{include}", "-c", str(src), "-o", obj],
          compiler,
        )
        for src, obj in zip(SOURCES, objects)
      ]
      for build in builds:
        build.result()  # the first failure, raised
    _run([compiler, *FLAGS, *objects, "-o", partial], compiler)
    os.replace(partial, target)
  finally:
    shutil.rmtree(work, ignore_errors=True)


def _load() -> NativeStatus:
  if not hasattr(jax, "ffi") or not hasattr(jax.ffi, "include_dir"):
    raise NativeBuildError(f"jax {jax.__version__} has no jax.ffi")
  include = jax.ffi.include_dir()
  target = _library_path(include)
  if not target.exists():
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
      raise NativeBuildError(f"no C++ compiler: {compiler!r} is not on PATH")
    _build(compiler, include, target)
  global _registered
  if _registered is None:  # XLA keeps the first handler of a name
    try:
      library = ctypes.CDLL(str(target))
    except OSError as error:
      raise NativeBuildError(f"cannot load {target}: {error}") from error
    for name, symbol in (
      (MASS_TARGET, "McqMass"),
      (COUNTS_TARGET, "McqCounts"),
      (INT8_MATMUL_TARGET, "McqInt8Matmul"),
      (INT8_CONV_TARGET, "McqInt8Conv"),
      (RAISE_IF_TARGET, "McqRaiseIf"),
    ):
      jax.ffi.register_ffi_target(
        name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu"
      )
    _registered = str(target), bool(library.McqInt8MatmulAvailable())
  return NativeStatus(True, _registered[0], "", _registered[1])


# The library whose handlers are registered in this process, if any, and
# whether its int8 product is in use.
_registered: tuple[str, bool] | None = None


# quantize runs leaves on several threads: one of them builds and registers.
_LOCK = threading.Lock()


@functools.cache
def _status(mode: str) -> NativeStatus:
  if mode == "0":
    return NativeStatus(False, "", "disabled by MCQ_JAX_NATIVE=0")
  try:
    with _LOCK:
      return _load()
  except (NativeBuildError, OSError) as error:
    if mode == "1":
      raise NativeBuildError(str(error)) from error
    return NativeStatus(False, "", str(error))


def native_status() -> NativeStatus:
  """Builds (once per machine) and registers the native kernels, and says
  whether they are in use.

  Returns:
    a :class:`NativeStatus`.

  Raises:
    NativeBuildError: ``MCQ_JAX_NATIVE=1`` and the kernels failed to build.

  Examples:
    >>> import mcq_jax
    >>> status = mcq_jax.native_status()
    >>> status.available == (status.reason == "")
    True
  """
  return _status(_mode())
