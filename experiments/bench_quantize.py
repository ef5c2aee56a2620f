"""Quantize time per value against round-to-nearest int8, in one process.

    python -m experiments.bench_quantize [--min-exp 4] [--max-exp 8] \
        [--repeats 3]

For each n = 1e4 .. 10**max_exp, one (n/1000, 1000) float32 leaf of Cauchy
(heavy-tailed) values is quantized by jitted ``mcq_jax.quantize`` (per tensor,
K = 1 and K = 16) and by jitted ``mcq_jax.round_to_nearest`` (int8, per
tensor). Times are the median of ``--repeats`` runs after a compile/warm-up
run; the ratio column is MCQ time over int8 time. ``iid`` sorts its N samples
(O(N log N)) and is only run while N <= 2e7.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

import mcq_jax
from experiments._timing import median_seconds


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--min-exp", type=int, default=4)
  parser.add_argument("--max-exp", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  print(
    f"jax {jax.__version__} on {jax.devices()[0].platform}, "
    f"{jax.device_count()} device(s)"
  )
  print("| n | method | K | ns/value | x int8 RTN |")
  print("|---|---|---|---|---|")
  key = jax.random.key(0)
  for exp in range(args.min_exp, args.max_exp + 1):
    n = 10**exp
    w = {
      "kernel": jax.numpy.asarray(
        np.random.default_rng(exp).standard_cauchy((n // 1000, 1000)),
        np.float32,
      )
    }
    rtn = jax.jit(lambda p: mcq_jax.round_to_nearest(p, bits=8))
    base = median_seconds(rtn, w, repeats=args.repeats)
    print(
      f"| {n:.0e} | round-to-nearest int8 | - | {1e9 * base / n:.2f} | 1.00 |",
      flush=True,
    )
    for sampler in ("stratified", "systematic", "iid"):
      for k in (1.0, 16.0):
        if sampler == "iid" and k * n > 2e7:
          continue
        fn = jax.jit(
          lambda p, key, s=sampler, k=k: mcq_jax.quantize(
            p,
            key,
            samples_per_weight=k,
            sampler=s,
            granularity="per_tensor",
            check_finite=False,
          )
        )
        t = median_seconds(fn, w, key, repeats=args.repeats)
        print(
          f"| {n:.0e} | MCQ {sampler} | {k:g} | {1e9 * t / n:.2f} |"
          f" {t / base:.1f} |",
          flush=True,
        )
    del w


if __name__ == "__main__":
  main()
