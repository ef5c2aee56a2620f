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


def _keys_to_try():
  """Keys from seeds, from fold_in chains and from split, 60 in all."""
  base = jax.random.key(2024)
  keys = [jax.random.key(s) for s in (0, 1, 2**31 - 1, 123456789)]
  keys += [jax.random.fold_in(base, d) for d in (0, 1, 7, 2**32 - 1)]
  keys += list(jax.random.split(base, 52))
  return keys


def test_unrolled_threefry_gives_jax_random_keys_and_words():
  # group keys, their words and path keys come from an unrolled threefry:
  # bit for bit jax.random's fold_in and bits, eagerly and under jit
  groups = jnp.arange(300, dtype=jnp.uint32)
  fold = jax.vmap(jax.random.fold_in, (None, 0))
  bits = jax.vmap(lambda k: jax.random.bits(k, (2,), jnp.uint32))
  for key in _keys_to_try():
    expected = fold(key, groups)
    for jitted in (False, True):
      group_keys = _keys.group_keys
      key_words = _keys.key_words
      if jitted:
        group_keys = jax.jit(group_keys, static_argnums=1)
        key_words = jax.jit(key_words)
      got = group_keys(key, 300)
      np.testing.assert_array_equal(_data(got), _data(expected))
      np.testing.assert_array_equal(key_words(got), bits(expected))
    path = _keys.path_key(key, "Conv_1/kernel")
    np.testing.assert_array_equal(
      _data(path),
      _data(jax.random.fold_in(key, _keys.path_hash("Conv_1/kernel"))),
    )


def test_other_generators_and_settings_go_through_jax_random():
  for impl in ("rbg", "unsafe_rbg"):
    key = jax.random.key(5, impl=impl)
    keys = _keys.group_keys(key, 4)
    expected = jax.vmap(jax.random.fold_in, (None, 0))(
      key, jnp.arange(4, dtype=jnp.uint32)
    )
    np.testing.assert_array_equal(_data(keys), _data(expected))
    np.testing.assert_array_equal(
      _keys.key_words(keys),
      jax.vmap(lambda k: jax.random.bits(k, (2,), jnp.uint32))(expected),
    )
  # with the older, non-partitionable threefry bits
  key = jax.random.key(6)
  with jax.threefry_partitionable(False):
    np.testing.assert_array_equal(
      _keys.key_words(key[None]),
      jax.random.bits(key, (2,), jnp.uint32)[None],
    )
