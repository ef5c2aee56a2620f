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


def interleaved_median_seconds(
  calls: dict[str, tuple[Callable, tuple]], repeats: int
) -> dict[str, float]:
  """Median wall time of each ``fn(*args)`` in ``calls``, the calls taken in
  turn within each of ``repeats`` rounds (after one warm-up run each), so
  that a change in the machine's load reaches every call alike and their
  ratios stay meaningful on a shared machine."""
  for fn, args in calls.values():
    jax.block_until_ready(fn(*args))
  runs: dict[str, list[float]] = {name: [] for name in calls}
  for _ in range(repeats):
    for name, (fn, args) in calls.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      runs[name].append(time.perf_counter() - t0)
  return {name: statistics.median(times) for name, times in runs.items()}
