"""``_groups``: grouped sampling, one distribution, key and scale per group."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mcq_jax
from mcq_jax import _groups


@pytest.mark.parametrize("axes", [(), (0,), (2,), (0, 2)])
def test_each_group_is_sampled_on_its_own(axes):
  x = jax.random.normal(jax.random.key(0), (3, 5, 4))
  key = jax.random.key(1)
  group_size = int(np.prod([d for a, d in enumerate(x.shape) if a not in axes]))
  n = 2 * group_size
  values, scale = _groups.sample_grouped(
    x, key, n, axes, "stratified", dtype=jnp.int16
  )
  assert values.dtype == jnp.int16
  assert scale.shape == tuple(x.shape[a] if a in axes else 1 for a in range(3))
  other = tuple(a for a in range(3) if a not in axes)
  # group g (row-major over the group axes) is sample_counts of its values
  moved = np.transpose(np.asarray(x), axes + other).reshape(-1, group_size)
  got = np.transpose(np.asarray(values), axes + other).reshape(-1, group_size)
  for g in range(moved.shape[0]):
    counts, s = mcq_jax.sample_counts(
      jnp.abs(moved[g]), jax.random.fold_in(key, g), n, "stratified"
    )
    np.testing.assert_array_equal(np.abs(got[g]), counts)
    np.testing.assert_array_equal(
      np.sign(got[g]), np.sign(moved[g]) * (counts > 0)
    )
    assert np.asarray(scale).ravel()[g] == s


@pytest.mark.parametrize("sampler", ["stratified", "systematic"])
def test_static_and_traced_sample_counts_agree(sampler):
  x = jax.random.cauchy(jax.random.key(2), (7, 9))
  key = jax.random.key(3)
  for n in (1, 63, 10_000):
    traced = _groups.sample_grouped(x, key, n, (1,), sampler)
    static = _groups.sample_grouped(
      x, key, n, (1,), sampler, static_num_samples=True
    )
    for a, b in zip(traced, static):
      np.testing.assert_array_equal(a, b)


def test_sorted_cdf_keeps_the_totals():
  x = jax.random.normal(jax.random.key(4), (10, 3))
  values, _ = _groups.sample_grouped(
    x, jax.random.key(5), 25, (1,), "systematic", sort=True
  )
  np.testing.assert_array_equal(
    np.abs(np.asarray(values)).sum(axis=0), [25, 25, 25]
  )


def test_buckets_hold_their_size_with_less_than_half_padding():
  for size in range(1, 5000):
    bucket = _groups._bucket(size)
    assert size <= bucket < 1.5 * size or bucket == size == 1
    columns = _groups._column_bucket(size)  # small groups share one bucket
    assert columns == (16 if size <= 16 else bucket)


@pytest.mark.parametrize("sampler", ["stratified", "systematic"])
@pytest.mark.parametrize(
  "shape,axes", [((37, 5), (1,)), ((3, 70, 2), (0, 2)), ((1000,), ())]
)
def test_eager_padded_layout_equals_the_traced_one(shape, axes, sampler):
  # Eager calls sample in a layout padded to a bucket of sizes (one compiled
  # sampler per bucket); under jit no padding is added. Same counts.
  x = jax.random.cauchy(jax.random.key(6), shape)
  key = jax.random.key(7)
  eager = _groups.sample_grouped(x, key, 333, axes, sampler, dtype=jnp.int16)
  traced = jax.jit(
    lambda x, k: _groups.sample_grouped(
      x, k, 333, axes, sampler, dtype=jnp.int16
    )
  )(x, key)
  for a, b in zip(eager, traced):
    np.testing.assert_array_equal(a, b)
    assert a.dtype == b.dtype
