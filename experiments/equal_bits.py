"""MCQ at a bit budget against round-to-nearest at the same bits.

Trains (or restores from the cache) the model of an experiment config, then
quantizes its weights to ``b`` bits with the library's grid baselines and
with MCQ's ``bits=b`` budget and its variants, and prints test accuracy as a
Markdown table (weights only, float activations). Deterministic methods run
once; the others once per seed (mean and standard deviation).

    python -m experiments.equal_bits configs/mnist5k_lenet5.py
    python -m experiments.equal_bits configs/digits_mlp.py --bits 3,4 \\
      --granularities per_channel,32 --seeds 5

Run it from the root of a checkout, like ``experiments.run``; config
overrides (``--config.train.epochs=5``) work as there.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

import mcq_jax
from experiments import datasets, models, run, training

# (name, deterministic, quantize(params, key, bits, granularity, group_size))
Method = tuple[str, bool, Callable[[Any, Any, int, str, Any], Any]]

METHODS: tuple[Method, ...] = (
  (
    "round to nearest",
    True,
    lambda p, k, b, g, s: mcq_jax.round_to_nearest(
      p, bits=b, granularity=g, group_size=s
    ),
  ),
  (
    "stochastic rounding",
    False,
    lambda p, k, b, g, s: mcq_jax.stochastic_rounding(
      p, k, bits=b, granularity=g, group_size=s
    ),
  ),
  (
    "MCQ systematic",
    False,
    lambda p, k, b, g, s: mcq_jax.quantize(
      p, k, bits=b, granularity=g, group_size=s
    ),
  ),
  (
    "MCQ systematic, LS scale",
    False,
    lambda p, k, b, g, s: mcq_jax.quantize(
      p, k, bits=b, granularity=g, group_size=s, refit_scale=True
    ),
  ),
  (
    "MCQ deterministic",
    True,
    lambda p, k, b, g, s: mcq_jax.quantize(
      p, k, bits=b, granularity=g, group_size=s, sampler="deterministic"
    ),
  ),
  (
    "MCQ deterministic, LS scale",
    True,
    lambda p, k, b, g, s: mcq_jax.quantize(
      p,
      k,
      bits=b,
      granularity=g,
      group_size=s,
      sampler="deterministic",
      refit_scale=True,
    ),
  ),
)


def compare(
  config: Any,
  bits: Sequence[int],
  granularities: Sequence[str],
  seeds: int,
) -> list[dict[str, Any]]:
  """Test accuracy of every method at every bit width and granularity.

  Args:
    config: an experiment config.
    bits: the widths.
    granularities: ``"per_tensor"``, ``"per_channel"``, or a block length
      (``"32"``: ``per_channel`` with ``group_size=32``).
    seeds: keys per random method.

  Returns:
    One row per (granularity, bits, method): ``accuracy`` (mean over seeds)
    and ``std``, with the float model's accuracy in ``float``.
  """
  data = datasets.load(config.data, progress=False)
  model = models.build(config.model, data.num_classes)
  variables = training.train_or_restore(
    model, data, config, progress=False
  ).variables
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  x_test = data.prepare(data.x_test)

  def accuracy(params: Any) -> float:
    logits = apply({**variables, "params": params}, x_test)
    return float(np.mean(np.argmax(np.asarray(logits), -1) == data.y_test))

  params = variables["params"]
  reference = accuracy(params)
  rows = []
  for granularity in granularities:
    blocks = int(granularity) if granularity.isdigit() else None
    grid = "per_channel" if blocks else granularity
    for b in bits:
      for name, deterministic, quantize in METHODS:
        keys = [jax.random.key(s) for s in range(1 if deterministic else seeds)]
        scores = [
          accuracy(mcq_jax.dequantize(quantize(params, k, b, grid, blocks)))
          for k in keys
        ]
        rows.append(
          dict(
            granularity=granularity,
            bits=b,
            method=name,
            accuracy=float(np.mean(scores)),
            std=float(np.std(scores)),
            runs=len(scores),
            float=reference,
          )
        )
  return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
  """The rows as a Markdown table, accuracy in percent."""
  lines = [
    "| granularity | bits | method | accuracy | runs |",
    "|---|---|---|---|---|",
  ]
  for r in rows:
    spread = f" ± {100 * r['std']:.2f}" if r["runs"] > 1 else ""
    lines.append(
      f"| {r['granularity']} | {r['bits']} | {r['method']} |"
      f" {100 * r['accuracy']:.2f}{spread} | {r['runs']} |"
    )
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("config", help="an experiment config file")
  parser.add_argument("--bits", default="3,4", help="comma-separated widths")
  parser.add_argument(
    "--granularities",
    default="per_channel",
    help="comma-separated: per_tensor, per_channel, or a block length (32)",
  )
  parser.add_argument("--seeds", type=int, default=5)
  args, overrides = parser.parse_known_args(argv)
  config = run.load_config(args.config, overrides)
  rows = compare(
    config,
    [int(b) for b in args.bits.split(",")],
    args.granularities.split(","),
    args.seeds,
  )
  print(f"{args.config}: float {100 * rows[0]['float']:.2f}%")
  print(table(rows))
  return rows


if __name__ == "__main__":
  main()
