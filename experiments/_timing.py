"""Wall-clock timing shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax


def median_seconds(fn: Callable, *args, repeats: int) -> float:
  """Median wall time of ``fn(*args)`` over ``repeats`` runs after one
  compile/warm-up run, waiting for the result each time."""
  jax.block_until_ready(fn(*args))
  runs = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    runs.append(time.perf_counter() - t0)
  return statistics.median(runs)
