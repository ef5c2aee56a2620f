"""Latency of ``mcq_apply`` against plain ``model.apply``, in one process.

    python -m experiments.bench_apply [--repeats 20]

Both calls are jitted (the activation key is an argument); times are medians
after a compile/warm-up call, the calls timed in turn within each round (so
that a change in the machine's load reaches them alike), and each ratio is
against ``model.apply`` timed in the same rounds. Models: an MLP
784-512-256-10 and a LeNet-style CNN on 28x28x1 inputs, at batch 1 and 256.
``mcq_apply`` runs with quantized weights (K=1) and activations (K_a=2,
stratified), integer layers throughout.
``sampling`` is ``quantize_activations`` alone on the inputs of every covered
layer (the same shapes and options), jitted as one function; ``rest`` is
``mcq_apply`` minus that: the integer contractions, rescales, path choices
and checks. ``paths`` is the contraction each layer took on these inputs
(eagerly, where the choice is concrete).
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax

import mcq_jax
from experiments._timing import interleaved_median_seconds


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


def _layer_inputs(model: nn.Module, params, x) -> list[jax.ShapeDtypeStruct]:
  """The input shape of every covered layer call, in call order."""
  shapes = []

  def spy(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and isinstance(
      context.module, mcq_jax.COVERED_LAYERS
    ):
      shapes.append(jax.ShapeDtypeStruct(args[0].shape, args[0].dtype))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(spy):
    jax.eval_shape(lambda p, x: model.apply({"params": p}, x), params, x)
  return shapes


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
  options = dict(activation_samples=2.0, sampler="stratified")
  plain = jax.jit(lambda p, x: model.apply({"params": p}, x))
  sampled = jax.jit(
    lambda p, x, k: mcq_jax.mcq_apply(model, {"params": p}, x, key=k, **options)
  )
  inputs = [
    jax.random.normal(jax.random.key(i), s.shape, s.dtype)
    for i, s in enumerate(_layer_inputs(model, params, x))
  ]
  sampling = jax.jit(
    lambda xs, k: [
      mcq_jax.quantize_activations(
        x, jax.random.fold_in(k, i), 2.0, sampler="stratified"
      )
      for i, x in enumerate(xs)
    ]
  )
  key = jax.random.key(3)
  times = interleaved_median_seconds(
    {
      "plain": (plain, (params, x)),
      "mcq": (sampled, (params_q, x, key)),
      "sampling": (sampling, (inputs, key)),
    },
    repeats,
  )
  t_plain, t_mcq, t_sampling = times["plain"], times["mcq"], times["sampling"]
  _, report = mcq_jax.mcq_apply(
    model, {"params": params_q}, x, key=key, return_report=True, **options
  )
  paths = " ".join(r.contraction or "-" for r in report.layers)
  return (
    f"| {name} | {batch} | {1e3 * t_plain:.3f} | {1e3 * t_mcq:.3f} |"
    f" {t_mcq / t_plain:.2f} | {1e3 * t_sampling:.3f} |"
    f" {1e3 * (t_mcq - t_sampling):.3f} | {paths} |"
  )


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args(argv)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
  print(
    "| model | batch | model.apply ms | mcq_apply ms | x apply | sampling ms"
    " | rest ms | paths |"
  )
  print("|---|---|---|---|---|---|---|---|")
  for name, model in (("MLP", MLP()), ("CNN", CNN())):
    for batch in (1, 256):
      print(_row(name, model, batch, args.repeats), flush=True)


if __name__ == "__main__":
  main()
