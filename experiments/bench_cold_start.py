"""Quantizing a whole transformer from a fresh process: compile + run time.

    python -m experiments.bench_cold_start [--repeats 3]

The model is all-MiniLM-L6-v2-sized: a 30522 x 384 token embedding, 512 x 384
positions and 6 layers of four 384 x 384 attention projections and a
384 x 1536 / 1536 x 384 feed-forward pair (22.7M weights in 38 matrices of 5
shapes, plus biases and norms that stay in float). Each case runs in a fresh
Python process (``import jax, mcq_jax`` first, timed on its own), quantizes
the tree once (cold: every XLA compilation included) and again with another
key (warm), and reports how many XLA programs were compiled. Round-to-nearest
int8 on the same tree, in the same process, is the baseline.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import jax, jax.numpy as jnp, numpy as np
import mcq_jax
t_import = time.perf_counter() - t0
granularity, sampler = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
def dense(i, o):
  return {"kernel": jnp.asarray(rng.standard_normal((i, o)) / np.sqrt(i),
                                jnp.float32),
          "bias": jnp.zeros((o,), jnp.float32)}
params = {"embed": {"embedding": jnp.asarray(
            rng.standard_normal((30522, 384)), jnp.float32)},
          "pos": {"embedding": jnp.asarray(
            rng.standard_normal((512, 384)), jnp.float32)}}
for layer in range(6):
  params[f"layer_{layer}"] = {
    **{p: dense(384, 384) for p in ("query", "key", "value", "out")},
    "ffn_in": dense(384, 1536), "ffn_out": dense(1536, 384),
    "norm": {"scale": jnp.ones((384,), jnp.float32)}}
jax.block_until_ready(params)
compiled = []
jax.monitoring.register_event_duration_secs_listener(
  lambda name, secs, **kw: compiled.append(secs)
  if name == "/jax/core/compile/backend_compile_duration" else None)
def run(key):
  t = time.perf_counter()
  q = mcq_jax.quantize(params, key, sampler=sampler, granularity=granularity)
  jax.block_until_ready(q)
  return time.perf_counter() - t
cold = run(jax.random.key(0))
n_cold = len(compiled)
warm = min(run(jax.random.key(i)) for i in (1, 2, 3))
def rtn_run():
  t = time.perf_counter()
  jax.block_until_ready(mcq_jax.round_to_nearest(params, bits=8))
  return time.perf_counter() - t
rtn_cold = rtn_run()
rtn_warm = min(rtn_run() for _ in range(3))
weights = sum(v.size for p, v in jax.tree_util.tree_leaves_with_path(params)
              if v.ndim >= 2)
print(json.dumps(dict(import_s=t_import, cold_s=cold, warm_s=warm,
                      programs=n_cold, compile_s=sum(compiled[:n_cold]),
                      rtn_cold_s=rtn_cold, rtn_warm_s=rtn_warm,
                      weights=int(weights))))
"""


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.parse_args(argv)
  print(
    "| granularity | sampler | weights | import s | cold s | programs |"
    " compile s | warm s | RTN int8 cold s | RTN warm s | warm x RTN |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for granularity in ("per_channel", "per_tensor"):
    for sampler in ("systematic", "stratified"):
      out = subprocess.run(
        [sys.executable, "-c", _CHILD, granularity, sampler],
        check=True,
        capture_output=True,
        text=True,
      ).stdout
      r = json.loads(out.strip().splitlines()[-1])
      print(
        f"| {granularity} | {sampler} | {r['weights'] / 1e6:.1f}M |"
        f" {r['import_s']:.2f} | {r['cold_s']:.2f} | {r['programs']} |"
        f" {r['compile_s']:.2f} | {r['warm_s']:.3f} | {r['rtn_cold_s']:.2f} |"
        f" {r['rtn_warm_s']:.3f} | {r['warm_s'] / r['rtn_warm_s']:.1f} |",
        flush=True,
      )


if __name__ == "__main__":
  main()
