"""``_keys``: the documented key derivation, and that its users agree."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np

import mcq_jax
from mcq_jax import _keys


def _data(key):
  return np.asarray(jax.random.key_data(key))


def test_path_key_is_fold_in_of_the_crc32_of_the_path():
  key = jax.random.key(7)
  for path in ("Dense_0/kernel", "<root>", "a/b#2", "ünïcode"):
    expected = jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
    np.testing.assert_array_equal(
      _data(_keys.path_key(key, path)), _data(expected)
    )


def test_path_keys_differ_between_paths_and_between_keys():
  key = jax.random.key(0)
  seen = {
    tuple(_data(_keys.path_key(key, f"layer_{i}/kernel"))) for i in range(64)
  }
  seen.add(tuple(_data(_keys.path_key(jax.random.key(1), "layer_0/kernel"))))
  assert len(seen) == 65


def test_group_keys_fold_in_the_group_index():
  key = jax.random.key(3)
  keys = _keys.group_keys(key, 5)
  for g in range(5):
    np.testing.assert_array_equal(
      _data(keys[g]), _data(jax.random.fold_in(key, g))
    )


def test_quantize_and_stochastic_rounding_use_the_path_key():
  w = jax.random.normal(jax.random.key(0), (6, 3))
  key = jax.random.key(1)
  leaf_key = _keys.path_key(key, "layer/kernel")
  q = mcq_jax.quantize(
    {"layer": {"kernel": w}},
    key,
    sampler="stratified",
    granularity="per_tensor",
  )["layer"]["kernel"]
  # per tensor: one group, whose key is fold_in(leaf_key, 0)
  counts, _ = mcq_jax.sample_counts(
    jnp.abs(w).ravel(), jax.random.fold_in(leaf_key, 0), q.samples, "stratified"
  )
  np.testing.assert_array_equal(np.abs(np.asarray(q.values)).ravel(), counts)

  sr = mcq_jax.stochastic_rounding({"layer": {"kernel": w}}, key, bits=3)
  again = mcq_jax.stochastic_rounding(
    {"layer": {"kernel": w}, "other": w}, key, bits=3
  )
  np.testing.assert_array_equal(
    sr["layer"]["kernel"].values, again["layer"]["kernel"].values
  )
