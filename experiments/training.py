"""Full-precision training with optax, cached as orbax checkpoints by config.

The cache key is a hash of everything that determines the trained weights (the
``data``, ``model`` and ``train`` sections of a config), so a run reuses the
checkpoint of any earlier run that trained the same model on the same data,
and a change to any of those sections trains afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax

from experiments.datasets import Dataset


@dataclasses.dataclass(frozen=True)
class Trained:
  """A trained model: its variables and how they were obtained."""

  variables: dict[str, Any]
  key: str
  train_seconds: float
  final_loss: float
  cached: bool


def cache_key(config: Any) -> str:
  """Hash of the config sections that determine the trained weights."""
  blob = json.dumps(
    {s: config[s].to_dict() for s in ("data", "model", "train")},
    sort_keys=True,
    default=str,
  )
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _optimizer(config: Any, total_steps: int) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
    0.0,
    config.learning_rate,
    min(config.get("warmup_steps", 0), total_steps // 2),
    total_steps,
  )
  if config.optimizer == "adamw":
    return optax.adamw(schedule, weight_decay=config.weight_decay)
  if config.optimizer == "sgd":
    return optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(schedule, momentum=0.9, nesterov=True),
    )
  raise ValueError(
    f"unknown optimizer {config.optimizer!r}; expected 'adamw' or 'sgd'"
  )


def _augment(
  x: np.ndarray, rng: np.random.Generator, flip: bool, pad: int
) -> np.ndarray:
  """Random crops after ``pad`` pixels of zero padding, and horizontal flips."""
  if pad:
    n, h, w = x.shape[:3]
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy = rng.integers(0, 2 * pad + 1, n)
    dx = rng.integers(0, 2 * pad + 1, n)
    x = np.stack(
      [padded[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)]
    )
  if flip:
    mirror = rng.random(len(x)) < 0.5
    x = np.where(mirror[:, None, None, None], x[:, :, ::-1], x)
  return x


def train(model: nn.Module, data: Dataset, config: Any, progress: bool = True):
  """Trains ``model`` on ``data.x_train`` with the ``config.train`` recipe.

  A jitted step in a Python loop (convolutions in a rolled ``lax.scan`` are
  much slower on CPU). Returns ``(variables, final_loss)``.
  """
  from tqdm.auto import tqdm

  cfg = config.train
  rng = np.random.default_rng(cfg.seed)
  n = len(data.y_train)
  batch = min(cfg.batch_size, n)
  steps_per_epoch = n // batch
  total = cfg.epochs * steps_per_epoch
  sample = data.prepare(data.x_train[:1])
  variables = model.init(jax.random.key(cfg.seed), sample, train=False)
  params = variables["params"]
  state = {k: v for k, v in variables.items() if k != "params"}
  tx = _optimizer(cfg, total)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, state, opt_state, x, y):
    def loss_fn(p):
      logits, new_state = model.apply(
        {"params": p, **state}, x, train=True, mutable=list(state)
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, new_state

    (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_state, opt_state, loss

  losses = []
  with tqdm(
    total=total, desc="train", disable=not progress, leave=False
  ) as bar:
    for _ in range(cfg.epochs):
      order = rng.permutation(n)
      for s in range(steps_per_epoch):
        idx = order[s * batch : (s + 1) * batch]
        x = _augment(
          data.x_train[idx], rng, cfg.get("flip", False), cfg.get("crop_pad", 0)
        )
        params, state, opt_state, loss = step(
          params, state, opt_state, data.prepare(x), data.y_train[idx]
        )
        losses.append(loss)
        bar.update()
  final = float(np.mean(jax.device_get(losses[-steps_per_epoch:])))
  return {"params": params, **state}, final


def train_or_restore(
  model: nn.Module, data: Dataset, config: Any, progress: bool = True
) -> Trained:
  """Restores the checkpoint cached for this config, or trains and caches it."""
  import orbax.checkpoint as ocp

  key = cache_key(config)
  directory = os.path.abspath(os.path.join(config.cache_dir, key))
  meta_path = os.path.join(directory, "training.json")
  checkpointer = ocp.StandardCheckpointer()
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
    sample = data.prepare(data.x_train[:1])
    abstract = jax.eval_shape(
      lambda: model.init(jax.random.key(0), sample, train=False)
    )
    variables = checkpointer.restore(
      os.path.join(directory, "variables"), abstract
    )
    return Trained(
      variables, key, meta["train_seconds"], meta["final_loss"], True
    )
  start = time.perf_counter()
  variables, final_loss = train(model, data, config, progress)
  jax.block_until_ready(variables)
  seconds = time.perf_counter() - start
  checkpointer.save(os.path.join(directory, "variables"), variables)
  checkpointer.wait_until_finished()
  # Written last: its presence marks a complete checkpoint.
  with open(meta_path, "w") as f:
    json.dump(
      {
        "train_seconds": seconds,
        "final_loss": final_loss,
        "config": json.loads(config.to_json_best_effort()),
      },
      f,
      indent=1,
    )
  return Trained(variables, key, seconds, final_loss, False)
