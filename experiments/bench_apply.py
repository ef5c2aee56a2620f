"""Latency of ``mcq_apply`` against plain ``model.apply``, in one process.

    python -m experiments.bench_apply [--repeats 20]

Both calls are jitted (the activation key is an argument); times are medians
after a compile/warm-up call. Models: an MLP 784-512-256-10 and a LeNet-style
CNN on 28x28x1 inputs, at batch 1 and 256. ``mcq_apply`` runs with quantized
weights (K=1) and activations (K_a=2, stratified), integer layers throughout;
``weights only`` is ``activation_samples=None`` (dequantized float weights);
``no finite check`` is ``mcq_apply`` with ``check_finite=False`` (no host
callback per layer).
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax

import mcq_jax
from experiments._timing import median_seconds


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(512)(x))
    x = nn.relu(nn.Dense(256)(x))
    return nn.Dense(10)(x)


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.max_pool(nn.relu(nn.Conv(6, (5, 5))(x)), (2, 2), (2, 2))
    x = nn.max_pool(nn.relu(nn.Conv(16, (5, 5))(x)), (2, 2), (2, 2))
    x = nn.relu(nn.Dense(120)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(nn.relu(nn.Dense(84)(x)))


def _row(name: str, model: nn.Module, batch: int, repeats: int) -> str:
  """One table row: the model at this batch size, every variant timed."""
  x = jax.random.normal(jax.random.key(0), (batch, 28, 28, 1))
  params = model.init(jax.random.key(1), x)["params"]
  # the setting of the README's table (measured before the defaults changed)
  params_q = mcq_jax.quantize(
    params,
    jax.random.key(2),
    samples_per_weight=1.0,
    sampler="stratified",
    granularity="per_tensor",
  )
  plain = jax.jit(lambda p, x: model.apply({"params": p}, x))
  weights_only = jax.jit(
    lambda p, x, k: mcq_jax.mcq_apply(
      model, {"params": p}, x, key=k, activation_samples=None
    )
  )
  sampled = jax.jit(
    lambda p, x, k: mcq_jax.mcq_apply(
      model,
      {"params": p},
      x,
      key=k,
      activation_samples=2.0,
      sampler="stratified",
    )
  )
  unchecked = jax.jit(
    lambda p, x, k: mcq_jax.mcq_apply(
      model,
      {"params": p},
      x,
      key=k,
      activation_samples=2.0,
      sampler="stratified",
      check_finite=False,
    )
  )
  key = jax.random.key(3)
  t_plain = median_seconds(plain, params, x, repeats=repeats)
  t_w = median_seconds(weights_only, params_q, x, key, repeats=repeats)
  t_s = median_seconds(sampled, params_q, x, key, repeats=repeats)
  t_u = median_seconds(unchecked, params_q, x, key, repeats=repeats)
  return (
    f"| {name} | {batch} | {1e3 * t_plain:.3f} | {1e3 * t_w:.3f} |"
    f" {1e3 * t_s:.3f} | {t_s / t_plain:.1f} | {1e3 * t_u:.3f} |"
    f" {t_u / t_plain:.1f} |"
  )


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args(argv)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
  print(
    "| model | batch | model.apply ms | weights only ms | mcq_apply ms"
    " | x apply | no finite check ms | x apply |"
  )
  print("|---|---|---|---|---|---|---|---|")
  for name, model in (("MLP", MLP()), ("CNN", CNN())):
    for batch in (1, 256):
      print(_row(name, model, batch, args.repeats), flush=True)


if __name__ == "__main__":
  main()
