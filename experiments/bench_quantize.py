"""Quantize time per value against round-to-nearest int8, in one process.

    python -m experiments.bench_quantize [--min-exp 5] [--max-exp 8] \
        [--repeats 3] [--iid-max 2e7]

For each n = 10**min_exp .. 10**max_exp, one (n/1000, 1000) float32 leaf of
Cauchy (heavy-tailed) values is quantized by jitted ``mcq_jax.quantize`` (per
tensor, and per channel: 1000 groups of n/1000 values; K = 1 and K = 16) and by
jitted ``mcq_jax.round_to_nearest`` (int8, same granularity) on the same leaf.
Times are the median of ``--repeats`` runs after a compile/warm-up run; the
``x int8 RTN`` column is MCQ time over RTN time of the same granularity, in the
same process; neither checks its input for NaN/inf (``check_finite=False``),
so both do only their own work. ``iid`` sorts its N samples (O(N log N)) and
runs only while N <= ``--iid-max``. On the CPU the bounded samplers run as
native kernels (``mcq_jax.native_status()``); the row ``MCQ systematic (XLA
program)`` times the XLA program they replace (``MCQ_JAX_NATIVE=0``), in the
same process. The summary gives, per sampler and granularity, the log-log
slope of time against n (K = 1) and, at the largest n, stratified over
systematic and K = 16 over K = 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator

import jax
import numpy as np

import mcq_jax
from experiments._timing import median_seconds

_GRANULARITIES = ("per_tensor", "per_channel")


@contextlib.contextmanager
def xla_program() -> Iterator[None]:
  """Traces the samplers as the XLA program, not the native kernels (the
  setting is read when a sampler is traced: traced programs are dropped on
  the way in and out)."""
  before = os.environ.get("MCQ_JAX_NATIVE")
  os.environ["MCQ_JAX_NATIVE"] = "0"
  jax.clear_caches()
  try:
    yield
  finally:
    if before is None:
      del os.environ["MCQ_JAX_NATIVE"]
    else:
      os.environ["MCQ_JAX_NATIVE"] = before
    jax.clear_caches()


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--min-exp", type=int, default=5)
  parser.add_argument("--max-exp", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--iid-max", type=float, default=2e7)
  args = parser.parse_args(argv)
  status = mcq_jax.native_status()
  print(
    f"jax {jax.__version__} on {jax.devices()[0].platform}, "
    f"{jax.device_count()} device(s); native kernels: "
    + ("yes" if status.available else f"no ({status.reason})")
  )
  print("| n | granularity | method | K | ns/value | x int8 RTN |")
  print("|---|---|---|---|---|---|")
  key = jax.random.key(0)
  times: dict[tuple[str, str, float], dict[int, float]] = {}
  exps = range(args.min_exp, args.max_exp + 1)
  for exp in exps:
    n = 10**exp
    w = {
      "kernel": jax.numpy.asarray(
        np.random.default_rng(exp).standard_cauchy((n // 1000, 1000)),
        np.float32,
      )
    }
    for granularity in _GRANULARITIES:
      rtn = jax.jit(
        lambda p, g=granularity: mcq_jax.round_to_nearest(
          p, bits=8, granularity=g, check_finite=False
        )
      )
      base = median_seconds(rtn, w, repeats=args.repeats)
      print(
        f"| {n:.0e} | {granularity} | round-to-nearest int8 | - |"
        f" {1e9 * base / n:.2f} | 1.00 |",
        flush=True,
      )
      runs = [
        (sampler, k, "")
        for sampler in ("systematic", "stratified", "iid")
        for k in (1.0, 16.0)
        if sampler != "iid" or k * n <= args.iid_max
      ]
      if status.available:
        runs.insert(1, ("systematic", 1.0, " (XLA program)"))
      for sampler, k, variant in runs:
        fn = jax.jit(
          lambda p, key, s=sampler, k=k, g=granularity: mcq_jax.quantize(
            p,
            key,
            samples_per_weight=k,
            sampler=s,
            granularity=g,
            check_finite=False,
          )
        )
        with xla_program() if variant else contextlib.nullcontext():
          t = median_seconds(fn, w, key, repeats=args.repeats)
        if not variant:
          times.setdefault((granularity, sampler, k), {})[n] = t
        print(
          f"| {n:.0e} | {granularity} | MCQ {sampler}{variant} | {k:g} |"
          f" {1e9 * t / n:.2f} | {t / base:.1f} |",
          flush=True,
        )
    del w
  largest = 10**args.max_exp
  print()
  print(
    "| granularity | sampler | log-log slope (K=1) |"
    f" x systematic at {largest:.0e} | K=16 / K=1 at {largest:.0e} |"
  )
  print("|---|---|---|---|---|")
  for granularity in _GRANULARITIES:
    for sampler in ("systematic", "stratified"):
      by_n = times[(granularity, sampler, 1.0)]
      sizes = sorted(by_n)
      slope = (
        np.polyfit(np.log(sizes), np.log([by_n[s] for s in sizes]), 1)[0]
        if len(sizes) > 1
        else float("nan")
      )
      ratio = by_n[largest] / times[(granularity, "systematic", 1.0)][largest]
      k_ratio = times[(granularity, sampler, 16.0)][largest] / by_n[largest]
      print(
        f"| {granularity} | {sampler} | {slope:.3f} | {ratio:.2f} |"
        f" {k_ratio:.2f} |"
      )


if __name__ == "__main__":
  main()
