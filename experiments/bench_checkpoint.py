"""Streaming checkpoint quantization: throughput and peak memory.

    python -m experiments.bench_checkpoint [--tensor-mb 64] [--tensors 32,64]

Builds synthetic float32 checkpoints of T tensors of one shape (default
4096 x 4096, 64 MiB each; T = 32 and 64, i.e. 2 GiB and 4 GiB), written tensor
by tensor so that the benchmark itself never holds a checkpoint in memory,
and runs ``mcq-jax quantize`` on each in a fresh process. Each process's own
peak resident memory comes from ``os.wait4``. Rows:

- ``stream``: ``mcq-jax quantize SRC DST`` (safetensors -> safetensors for
  every T; orbax -> orbax and orbax -> safetensors for the first T).
- ``load all``: the non-streaming way in one process, ``save(DST,
  quantize(load(SRC), key))``, for the first T: what streaming saves.
- ``one tensor``: ``quantize`` of one tensor of the same shape in memory:
  the floor that streaming should stay near.

Peak RSS that does not grow with T (compare the ``vs first`` column) is what
"bounded by the largest tensor" means; throughput is source bytes per second
of wall time, process start and XLA compilation included.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import jax
import numpy as np

from mcq_jax import _orbax_io, _safetensors_io


def _shape(tensor_mb: float) -> tuple[int, int]:
  """A square-ish float32 shape of about ``tensor_mb`` MiB."""
  n = int(tensor_mb * 2**20 / 4)
  rows = max(1, int(np.sqrt(n)))
  return rows, max(1, n // rows)


def _tensor(i: int, shape: tuple[int, int]) -> np.ndarray:
  return np.random.default_rng(i).standard_normal(shape, np.float32)


def write_safetensors(path: str, count: int, shape: tuple[int, int]) -> None:
  """``count`` float32 tensors ``layer_i.weight``, one in memory at a time."""
  names = [f"layer_{i}.weight" for i in range(count)]
  with open(path, "wb") as f:
    writer = _safetensors_io.SafetensorsWriter(
      f, [(n, shape, np.float32) for n in names], {}
    )
    for i, name in enumerate(names):
      writer.write(name, _tensor(i, shape))
    writer.close()


def write_orbax(path: str, count: int, shape: tuple[int, int]) -> None:
  """The same tensors as a Flax-style tree, ``params/layer_i/kernel``."""
  writer = _orbax_io.OrbaxWriter(os.path.abspath(path), {}, batch_bytes=1)
  for i in range(count):
    writer.write(("params", f"layer_{i}", "kernel"), _tensor(i, shape))
  writer.commit()


def _measure(argv: list[str]) -> tuple[float, float, int]:
  """Runs ``argv``; returns (wall seconds, peak RSS MiB, exit status)."""
  start = time.perf_counter()
  proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
  # wait4 reaps the child and gives its own rusage (getrusage(CHILDREN)
  # would give the largest of all children so far).
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
  code = f"""
    import jax, mcq_jax
    tree = mcq_jax.load({src!r})
    mcq_jax.save({dst!r}, mcq_jax.quantize(tree, jax.random.key(0)))
  """
  return [sys.executable, "-c", textwrap.dedent(code)]


def _one_tensor(shape: tuple[int, int]) -> list[str]:
  code = f"""
    import jax, numpy as np, mcq_jax
    w = np.random.default_rng(0).standard_normal({shape!r}, np.float32)
    q = mcq_jax.quantize({{"w": w}}, jax.random.key(0))
    jax.block_until_ready(q)
  """
  return [sys.executable, "-c", textwrap.dedent(code)]


def _remove(path: str) -> None:
  if os.path.isdir(path):
    shutil.rmtree(path)
  elif os.path.exists(path):
    os.remove(path)


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
  """Runs the benchmark, prints the table and returns its rows."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tensor-mb", type=float, default=64.0)
  parser.add_argument("--tensors", default="32,64")
  parser.add_argument("--workdir", default=tempfile.gettempdir())
  parser.add_argument("--keep", action="store_true")
  args = parser.parse_args(argv)
  counts = [int(t) for t in args.tensors.split(",")]
  shape = _shape(args.tensor_mb)
  tensor_mib = shape[0] * shape[1] * 4 / 2**20
  work = tempfile.mkdtemp(prefix="bench_checkpoint_", dir=args.workdir)
  print(
    f"command: {' '.join([sys.executable, '-m', __spec__.name, *sys.argv[1:]])}"
  )
  print(
    f"jax {jax.__version__}, {os.cpu_count()} CPUs; tensors {shape[0]}x"
    f"{shape[1]} float32 ({tensor_mib:.0f} MiB each)"
  )
  rows: list[dict[str, object]] = []

  def run(what: str, src_kind: str, dst_kind: str, count: int, cmd: list[str]):
    wall, rss, code = _measure(cmd)
    gib = count * tensor_mib / 1024
    rows.append(
      dict(
        what=what,
        src=src_kind,
        dst=dst_kind,
        tensors=count,
        gib=gib,
        wall=wall,
        mbps=count * tensor_mib * 2**20 / 1e6 / wall,
        rss=rss,
        code=code,
      )
    )

  try:
    for i, count in enumerate(counts):
      src = os.path.join(work, f"src_{count}.safetensors")
      write_safetensors(src, count, shape)
      dst = os.path.join(work, "dst.safetensors")
      run("stream", "safetensors", "safetensors", count, _cli(src, dst))
      _remove(dst)
      if i == 0:
        run(
          "load all", "safetensors", "safetensors", count, _load_all(src, dst)
        )
        _remove(dst)
        orbax_src = os.path.join(work, f"src_{count}_orbax")
        write_orbax(orbax_src, count, shape)
        run("stream", "orbax", "orbax", count, _cli(orbax_src, dst[:-12]))
        _remove(dst[:-12])
        run("stream", "orbax", "safetensors", count, _cli(orbax_src, dst))
        _remove(dst)
        _remove(orbax_src)
      _remove(src)
    run("one tensor", "memory", "memory", 1, _one_tensor(shape))
  finally:
    if not args.keep:
      shutil.rmtree(work, ignore_errors=True)

  first = next(r["rss"] for r in rows if r["what"] == "stream")
  print()
  print(
    "| what | source | destination | tensors | GiB | wall s | MB/s |"
    " peak RSS MiB | RSS / tensor | RSS vs first stream | exit |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['what']} | {r['src']} | {r['dst']} | {r['tensors']} |"
      f" {r['gib']:.2f} | {r['wall']:.1f} | {r['mbps']:.0f} |"
      f" {r['rss']:.0f} | {r['rss'] / tensor_mib:.1f}x |"
      f" {r['rss'] / first:.2f} | {r['code']} |"
    )
  return rows


if __name__ == "__main__":
  rows = main()
  sys.exit(max(int(r["code"]) for r in rows))
