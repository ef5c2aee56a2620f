"""Streaming checkpoint quantization: throughput and peak memory.

    python -m experiments.bench_checkpoint [--tensor-mb 64] [--tensors 32,64] \
        [--workdir DIR] [--keep]

Builds synthetic float32 checkpoints of T tensors of one shape (default
4096 x 4096, 64 MiB each; T = 32 and 64, i.e. 2 GiB and 4 GiB) in a temporary
directory under ``--workdir`` (default: the system's temporary directory,
removed at the end unless ``--keep``), written tensor by tensor (standard
normal, seeded per tensor) so that no process ever holds a whole checkpoint,
then runs each case in a fresh process and reads that process's own peak
resident memory (``ru_maxrss``) from ``os.wait4``. Rows:

- ``stream``: ``mcq-jax quantize SRC DST --no-progress`` (default options):
  safetensors -> safetensors for every T; orbax -> orbax and
  orbax -> safetensors for the first T (Flax-style ``params/layer_i/kernel``).
- ``load all``: the non-streaming way, ``save(DST, quantize(load(SRC),
  key))``, for the first T: what streaming saves.
- ``one tensor``: ``quantize`` of one tensor of the same shape, made in
  memory, and its values and scale copied to the host: the floor that
  streaming should stay near.
- ``imports``: ``import jax, mcq_jax`` and nothing else: the part of every
  other row that is not data.

Flat peak RSS as T doubles (the ``RSS vs first`` column, relative to the
first safetensors ``stream`` row) is what "bounded by the largest tensor"
means. Throughput is source bytes per second of wall time, process start,
imports and XLA compilation included; the sources were just written, so they
are read from the page cache. Each DST is deleted once measured.

A child's ``ru_maxrss`` starts at its parent's peak (Linux records the
spawning process's high-water mark when the child calls ``exec``), so this
process imports neither jax nor numpy and builds the sources in child
processes of their own; its peak is printed with the environment.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

# The repository root: child processes import experiments/ from here.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MIB = 2**20


def _shape(tensor_mb: float) -> tuple[int, int]:
  """A square-ish float32 shape of about ``tensor_mb`` MiB."""
  n = max(1, int(tensor_mb * _MIB / 4))
  rows = max(1, math.isqrt(n))
  return rows, max(1, n // rows)


def _tensor(i: int, shape: tuple[int, int]):
  """Tensor ``i``: standard normal float32, seeded by ``i``."""
  import numpy as np

  return np.random.default_rng(i).standard_normal(shape, np.float32)


def write_safetensors(path: str, count: int, shape: tuple[int, int]) -> None:
  """Writes ``count`` tensors ``layer_i.weight``, one in memory at a time.

  Args:
    path: the ``.safetensors`` file to create.
    count: the number of tensors.
    shape: every tensor's shape.
  """
  import numpy as np

  from mcq_jax import _safetensors_io

  names = [f"layer_{i}.weight" for i in range(count)]
  with open(path, "wb") as f:
    writer = _safetensors_io.SafetensorsWriter(
      f, [(name, shape, np.float32) for name in names], {}
    )
    for i, name in enumerate(names):
      writer.write(name, _tensor(i, shape))
    writer.close()


def write_orbax(path: str, count: int, shape: tuple[int, int]) -> None:
  """Writes the same tensors as a Flax-style tree, ``params/layer_i/kernel``.

  Each tensor is its own partial save (``batch_bytes=1``), so one tensor is
  in memory at a time; orbax stages the checkpoint in
  ``<path>.partial_save`` until the commit.

  Args:
    path: the checkpoint directory to create (made absolute).
    count: the number of tensors.
    shape: every tensor's shape.
  """
  from mcq_jax import _orbax_io

  writer = _orbax_io.OrbaxWriter(os.path.abspath(path), {}, batch_bytes=1)
  for i in range(count):
    writer.write(("params", f"layer_{i}", "kernel"), _tensor(i, shape))
  writer.commit()


def _python(code: str) -> list[str]:
  return [sys.executable, "-c", textwrap.dedent(code)]


def _build(kind: str, path: str, count: int, shape: tuple[int, int]) -> float:
  """Writes a source checkpoint in a child process; returns its seconds."""
  start = time.perf_counter()
  subprocess.run(
    _python(f"""
      from experiments.bench_checkpoint import write_{kind}
      write_{kind}({path!r}, {count}, {shape!r})
    """),
    cwd=_ROOT,
    check=True,
  )
  return time.perf_counter() - start


def _measure(argv: list[str], log: str) -> tuple[float, float, int]:
  """Runs ``argv`` (stdout discarded, stderr to ``log``).

  Returns:
    Wall seconds, the process's own peak RSS in MiB, and its exit status.
  """
  with open(log, "wb") as err:
    start = time.perf_counter()
    proc = subprocess.Popen(
      argv, stdout=subprocess.DEVNULL, stderr=err, cwd=_ROOT
    )
    # wait4 reaps this child and returns its own rusage; getrusage(CHILDREN)
    # would be the largest of every child so far. ru_maxrss is in KiB.
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
  proc.returncode = os.waitstatus_to_exitcode(status)  # reaped: tell Popen
  return wall, usage.ru_maxrss / 1024, proc.returncode


def _cli(src: str, dst: str) -> list[str]:
  return [
    sys.executable,
    "-m",
    "mcq_jax._cli",
    "quantize",
    src,
    dst,
    "--no-progress",
  ]


def _load_all(src: str, dst: str) -> list[str]:
  return _python(f"""
    import jax, mcq_jax
    tree = mcq_jax.load({src!r})
    q = mcq_jax.quantize(tree, jax.random.key(0), channel_axis=0)
    mcq_jax.save({dst!r}, q)
  """)


def _one_tensor(shape: tuple[int, int]) -> list[str]:
  return _python(f"""
    import jax, numpy as np, mcq_jax
    w = np.random.default_rng(0).standard_normal({shape!r}, np.float32)
    q = mcq_jax.quantize({{"w": w}}, jax.random.key(0), channel_axis=0)["w"]
    values, scale = np.asarray(q.values), np.asarray(q.scale)
  """)


def _imports() -> list[str]:
  return _python("import jax, mcq_jax")


def _remove(path: str) -> None:
  if os.path.isdir(path):
    shutil.rmtree(path)
  elif os.path.exists(path):
    os.remove(path)


def _table(rows: list[dict[str, object]], tensor_mib: float) -> list[str]:
  """The markdown table of the runs.

  ``RSS / tensor`` is peak RSS over one tensor's size; ``above imports /
  tensor`` subtracts the ``imports`` row first (the data's share);
  ``RSS vs first`` is relative to the first ``stream`` row.
  """
  first = next(
    (r["rss"] for r in rows if r["what"] == "stream"), rows[0]["rss"]
  )
  base = next((r["rss"] for r in rows if r["what"] == "imports"), 0.0)
  lines = [
    "| what | source | destination | tensors | source GiB | wall s | MB/s |"
    " peak RSS MiB | RSS / tensor | above imports / tensor | RSS vs first |"
    " exit |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['what']} | {r['src']} | {r['dst']} | {r['tensors']} |"
      f" {r['gib']:.3g} | {r['wall']:.1f} | {r['mbps']:.1f} |"
      f" {r['rss']:.0f} | {r['rss'] / tensor_mib:.1f} |"
      f" {(r['rss'] - base) / tensor_mib:.1f} |"
      f" {r['rss'] / first:.2f} | {r['code']} |"
    )
  return lines


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
  """Runs the benchmark and prints its table.

  Args:
    argv: command-line arguments (default: ``sys.argv[1:]``).

  Returns:
    One dict per run: ``what``, ``src``, ``dst``, ``tensors``, ``gib``
    (source size), ``wall`` (s), ``mbps``, ``rss`` (peak, MiB) and ``code``
    (exit status).
  """
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--tensor-mb", type=float, default=64.0, help="MiB per tensor"
  )
  parser.add_argument(
    "--tensors",
    default="32,64",
    help="comma-separated tensor counts, one checkpoint each",
  )
  parser.add_argument(
    "--workdir",
    default=tempfile.gettempdir(),
    help="where the temporary directory is made",
  )
  parser.add_argument(
    "--keep", action="store_true", help="keep the sources at the end"
  )
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  counts = [int(t) for t in args.tensors.split(",")]
  shape = _shape(args.tensor_mb)
  tensor_mib = shape[0] * shape[1] * 4 / _MIB
  command = [sys.executable, "-m", "experiments.bench_checkpoint"]
  print("command:", shlex.join(command + list(argv or sys.argv[1:])))
  print(
    f"jax {importlib.metadata.version('jax')}, jaxlib"
    f" {importlib.metadata.version('jaxlib')}, orbax-checkpoint"
    f" {importlib.metadata.version('orbax-checkpoint')}, safetensors"
    f" {importlib.metadata.version('safetensors')}; {os.cpu_count()} CPUs,"
    f" JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS', '')!r}"
  )
  print(
    f"tensors {shape[0]}x{shape[1]} float32 ({tensor_mib:.2f} MiB each);"
    f" counts {counts}"
  )
  work = tempfile.mkdtemp(prefix="bench_checkpoint_", dir=args.workdir)
  print(f"work directory {work}{' (kept)' if args.keep else ''}", flush=True)
  log = os.path.join(work, "stderr.txt")
  rows: list[dict[str, object]] = []

  def run(what: str, src: str, dst: str, count: int, cmd: list[str]) -> None:
    wall, rss, code = _measure(cmd, log)
    mib = count * tensor_mib
    row = dict(
      what=what,
      src=src,
      dst=dst,
      tensors=count,
      gib=mib / 1024,
      wall=wall,
      mbps=mib * _MIB / 1e6 / wall,
      rss=rss,
      code=code,
    )
    rows.append(row)
    print(
      f"  {what} {src} -> {dst}, {count} tensors: {wall:.1f} s,"
      f" peak RSS {rss:.0f} MiB, exit {code}",
      flush=True,
    )
    with open(log, errors="replace") as f:
      errors = f.read().strip()
    if code != 0 or errors:
      print(textwrap.indent(errors[-4000:], "    | "), flush=True)

  dst = os.path.join(work, "dst.safetensors")
  dst_orbax = os.path.join(work, "dst_orbax")
  try:
    for i, count in enumerate(counts):
      src = os.path.join(work, f"src_{count}.safetensors")
      seconds = _build("safetensors", src, count, shape)
      print(f"built {src} in {seconds:.1f} s", flush=True)
      run("stream", "safetensors", "safetensors", count, _cli(src, dst))
      _remove(dst)
      if i == 0:
        run(
          "load all", "safetensors", "safetensors", count, _load_all(src, dst)
        )
        _remove(dst)
        orbax = os.path.join(work, f"src_{count}_orbax")
        seconds = _build("orbax", orbax, count, shape)
        print(f"built {orbax} in {seconds:.1f} s", flush=True)
        run("stream", "orbax", "orbax", count, _cli(orbax, dst_orbax))
        _remove(dst_orbax)
        run("stream", "orbax", "safetensors", count, _cli(orbax, dst))
        _remove(dst)
        if not args.keep:
          _remove(orbax)
      if not args.keep:
        _remove(src)
    run("one tensor", "memory", "memory", 1, _one_tensor(shape))
    rows[-1]["gib"] = rows[-1]["mbps"] = 0.0  # nothing read from disk
    run("imports", "-", "-", 0, _imports())
  finally:
    _remove(log)
    if not args.keep:
      shutil.rmtree(work, ignore_errors=True)
  own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f"\nthis process's peak RSS (every child's floor): {own:.0f} MiB\n")
  print("\n".join(_table(rows, tensor_mib)), flush=True)
  return rows


if __name__ == "__main__":
  sys.exit(max(int(r["code"]) for r in main()))
