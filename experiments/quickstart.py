"""Train an MLP on the real scikit-learn digits, quantize it with MCQ, compare.

Runs offline in well under a minute on a 2-core CPU:

    python -m experiments.quickstart

Prints one Markdown table: test accuracy of the float model, of MCQ at several
samples-per-weight K (mean and standard deviation over seeds, each seed an
independent quantization drawn with ``jax.vmap`` over keys), of MCQ weights and
activations (``mcq_apply``: integer layers, K samples per weight and per
activation, spread over activation keys), and of round-to-nearest at several
bit-widths, with the weights' bit-width (fixed, from the largest count), their
entropy (what an entropy coder would store) and sparsity.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import mcq_jax


class MLP(nn.Module):
  hidden: tuple[int, ...] = (128, 128)
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.classes)(x)


def load_split(seed: int = 0, test_fraction: float = 0.25):
  """The 1,797 real 8x8 digits, scaled to [0, 1], split per class."""
  data = load_digits()
  x = (data.data / 16.0).astype(np.float32)
  y = data.target.astype(np.int32)
  rng = np.random.default_rng(seed)
  test = np.zeros(len(y), bool)
  for c in np.unique(y):
    idx = rng.permutation(np.flatnonzero(y == c))
    test[idx[: round(test_fraction * len(idx))]] = True
  return (x[~test], y[~test]), (x[test], y[test])


def train(model, x, y, key, steps: int = 400, lr: float = 3e-3):
  params = model.init(key, x[:1])["params"]
  tx = optax.adamw(lr, weight_decay=1e-4)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(p):
      logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  for _ in range(steps):
    params, opt_state, loss = step(params, opt_state)
  return params, float(loss)


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=8)
  parser.add_argument("--sampler", default="stratified", choices=mcq_jax.SAMPLERS)
  parser.add_argument("--granularity", default="per_tensor", choices=mcq_jax.GRANULARITIES)
  args = parser.parse_args(argv)

  (x_tr, y_tr), (x_te, y_te) = load_split()
  model = MLP()
  t0 = time.perf_counter()
  params, loss = train(model, jnp.asarray(x_tr), jnp.asarray(y_tr), jax.random.key(0))
  train_s = time.perf_counter() - t0

  @jax.jit
  def accuracy(p):
    logits = model.apply({"params": p}, x_te)
    return jnp.mean(jnp.argmax(logits, -1) == y_te)

  rows = [("float32", "-", 32.0, 32.0, 0.0, float(accuracy(params)), 0.0)]
  keys = jax.random.split(jax.random.key(1), args.seeds)
  for k in (0.25, 0.5, 1.0, 2.0, 4.0, 8.0):
    quantize = lambda key: mcq_jax.quantize(
        params, key, samples_per_weight=k, sampler=args.sampler,
        granularity=args.granularity)
    q_all = jax.jit(jax.vmap(quantize))(keys)
    accs = np.asarray(jax.jit(jax.vmap(lambda q: accuracy(mcq_jax.dequantize(q))))(q_all))
    reports = [mcq_jax.summary(jax.tree_util.tree_map(lambda a: a[i], q_all))
               for i in range(args.seeds)]
    rows.append((
        f"MCQ {args.sampler}", f"{k:g}",
        float(np.mean([r.mean_bits for r in reports])),
        float(np.mean([r.mean_entropy_bits for r in reports])),
        float(np.mean([r.sparsity for r in reports])),
        float(accs.mean()), float(accs.std()),
    ))
  for k in (2.0, 8.0):
    # Weights and activations: integer layers through mcq_apply.
    params_q = mcq_jax.quantize(params, jax.random.key(2), samples_per_weight=k,
                                sampler=args.sampler, granularity=args.granularity)
    run = jax.jit(jax.vmap(lambda key: jnp.mean(jnp.argmax(mcq_jax.mcq_apply(
        model, {"params": params_q}, x_te, key=key, activation_samples=k,
        sampler=args.sampler), -1) == y_te)))
    accs = np.asarray(run(keys))
    report = mcq_jax.summary(params_q)
    rows.append((f"MCQ {args.sampler}, weights + activations", f"{k:g}",
                 report.mean_bits, report.mean_entropy_bits, report.sparsity,
                 float(accs.mean()), float(accs.std())))
  for bits in (8, 4, 3, 2):
    q = mcq_jax.round_to_nearest(params, bits=bits, granularity=args.granularity)
    report = mcq_jax.summary(q)
    rows.append((f"round-to-nearest {bits}-bit", "-", report.mean_bits,
                 report.mean_entropy_bits, report.sparsity,
                 float(accuracy(mcq_jax.dequantize(q))), 0.0))

  lines = [
      f"digits ({len(y_tr)} train / {len(y_te)} test), MLP 64-128-128-10,"
      f" trained {train_s:.1f} s (final loss {loss:.2e}); weights quantized"
      f" {args.granularity}, biases float; MCQ over {args.seeds} keys",
      "",
      "| method | K | bits (max count) | bits (entropy) | zeros | test accuracy |",
      "|---|---|---|---|---|---|",
  ]
  for name, k, bits, entropy, zeros, acc, sd in rows:
    spread = f" ± {sd:.2%}" if name.startswith("MCQ") else ""
    lines.append(f"| {name} | {k} | {bits:.2f} | {entropy:.2f} | {zeros:.1%} |"
                 f" {acc:.2%}{spread} |")
  table = "\n".join(lines)
  print(table)
  return table


if __name__ == "__main__":
  main()
