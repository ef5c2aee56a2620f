"""Quantize time and bytes exchanged for a leaf sharded 8 ways, in one process.

    python -m experiments.bench_sharded [--values 1e8] [--repeats 3]

Runs on 8 devices (on a CPU machine, 8 simulated ones: ``JAX_NUM_CPU_DEVICES``
is set before JAX is imported). One ``(values / 4096, 4096)`` float32 leaf of
Cauchy values is quantized by jitted ``mcq_jax.quantize`` (K = 2, systematic,
no finite check):

- ``1 device``: the leaf on one device, the baseline;
- ``8 ways, rows`` / ``8 ways, columns``: sharded along its input (row) or
  output (column) axis over an explicit-axes mesh, counted shard by shard.

``bytes exchanged`` sums, over the collectives of the compiled program, the
bytes of each one's result on every device (an all-gather's whole result, an
all-reduce's): an upper bound on what crosses between devices, against the
leaf's own size (``x leaf``). ``x 1 device`` is the time over the one-device
time of the same granularity, in the same process. On a CPU machine the 8
simulated devices share its cores, so the time says what sharding costs in
work (not what 8 real devices would gain); the bytes are what a multi-device
machine would move.
"""

from __future__ import annotations

import argparse
import os
import re

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import mcq_jax  # noqa: E402
from experiments._timing import median_seconds  # noqa: E402

_COLLECTIVE = re.compile(
  r"= (\w+)\[([\d,]*)\][^ ]* (all-gather|all-reduce|all-to-all|"
  r"collective-permute|reduce-scatter)\("
)
_BYTES = {"f32": 4, "u32": 4, "s32": 4, "f64": 8, "u8": 1, "s8": 1, "pred": 1}


def exchanged_bytes(hlo: str, devices: int) -> int:
  """What the collectives of a compiled program deliver: each one's result
  bytes, on every device (an upper bound on what crosses between them)."""
  total = 0
  for dtype, dims, _ in _COLLECTIVE.findall(hlo):
    size = int(np.prod([int(d) for d in dims.split(",") if d]))
    total += size * _BYTES.get(dtype, 4) * devices
  return total


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--values", type=float, default=1e8)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  devices = jax.device_count()
  print(
    f"jax {jax.__version__} on {jax.devices()[0].platform}, {devices} device(s)"
  )
  if devices < 8:
    raise SystemExit("needs 8 devices: set JAX_NUM_CPU_DEVICES=8 before JAX")
  cols = 4096
  rows = int(args.values) // cols // 8 * 8  # divisible by the 8 shards
  w = np.random.default_rng(0).standard_cauchy((rows, cols)).astype(np.float32)
  leaf_bytes = w.nbytes
  mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))
  layouts = {
    "1 device": None,
    "8 ways, rows": P("x", None),
    "8 ways, columns": P(None, "x"),
  }
  print(f"leaf: ({rows}, {cols}) float32, {leaf_bytes / 1e6:.0f} MB")
  print("| granularity | layout | s | x 1 device | bytes exchanged | x leaf |")
  print("|---|---|---|---|---|---|")
  for granularity in ("per_channel", "per_tensor"):
    fn = jax.jit(
      lambda p, g=granularity: mcq_jax.quantize(
        p, jax.random.key(0), granularity=g, check_finite=False
      )
    )
    base = None
    for name, spec in layouts.items():
      if spec is None:
        leaf = jax.device_put(w, jax.devices()[0])
        seconds = median_seconds(fn, {"w": leaf}, repeats=args.repeats)
        moved = 0
      else:
        leaf = jax.device_put(w, NamedSharding(mesh, spec))
        with jax.set_mesh(mesh):
          hlo = fn.lower({"w": leaf}).compile().as_text()
          moved = exchanged_bytes(hlo, devices)
          seconds = median_seconds(fn, {"w": leaf}, repeats=args.repeats)
      base = base or seconds
      del leaf
      print(
        f"| {granularity} | {name} | {seconds:.2f} | {seconds / base:.2f} |"
        f" {moved:,} | {moved / leaf_bytes:.2e} |"
      )


if __name__ == "__main__":
  main()
