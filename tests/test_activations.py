"""``quantize_activations``: groups, totals, metadata, unbiasedness, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mcq_jax


@pytest.mark.parametrize("group_ndim", [0, 1, 2])
def test_every_group_gets_exactly_its_samples(group_ndim):
  x = jax.random.normal(jax.random.key(0), (3, 4, 5)).at[0, 0, :2].set(0.0)
  q = mcq_jax.quantize_activations(
    x, jax.random.key(1), 1.5, group_ndim=group_ndim
  )
  group = x.shape[group_ndim:]
  n = round(1.5 * int(np.prod(group)))
  assert q.samples == n
  assert q.values.dtype == mcq_jax._dtypes.smallest_int_dtype(n)
  assert q.scale.shape == x.shape[:group_ndim] + (1,) * (3 - group_ndim)
  assert q.channel_axes == tuple(range(group_ndim))
  totals = (
    np.abs(np.asarray(q.values)).reshape(x.shape[:group_ndim] + (-1,)).sum(-1)
  )
  np.testing.assert_array_equal(totals, np.full(x.shape[:group_ndim], n))
  values = np.asarray(q.values)
  assert np.all(values[np.asarray(x) == 0] == 0)  # zeros are never hit
  assert np.all(values * np.asarray(x) >= 0)  # signs are kept
  assert (q.method, q.samples_per_value, q.sampler) == (
    "mcq",
    1.5,
    "systematic",
  )


@pytest.mark.parametrize("sampler", ["systematic", "stratified"])
def test_unbiased_over_keys(sampler):
  x = jax.random.normal(jax.random.key(2), (2, 12))
  keys = jax.random.split(jax.random.key(3), 4096)
  q = jax.vmap(
    lambda k: mcq_jax.quantize_activations(x, k, 1.0, sampler=sampler)
  )(keys)
  estimates = np.asarray(q.values * q.scale)
  # Each estimate lies within 2 scale units of x (counts within 2 of N p_i):
  # a Hoeffding bound over the 24 values at 1e-9.
  scale = np.abs(np.asarray(x)).sum(1, keepdims=True) / 12
  bound = 4 * scale * np.sqrt(np.log(2 * 24 / 1e-9) / (2 * len(keys)))
  assert np.all(np.abs(estimates.mean(0) - np.asarray(x)) < bound)
  # the statistic can fail: rounding x to its nearest multiple of the scale
  biased = np.round(np.asarray(x) / scale) * scale
  assert np.any(np.abs(biased - np.asarray(x)) > bound)


def test_errors_name_the_option():
  x = jnp.ones((2, 3))
  with pytest.raises(
    ValueError, match=r"group_ndim must be in \[0, 2\], got 3"
  ):
    mcq_jax.quantize_activations(x, jax.random.key(0), 2.0, group_ndim=3)
  with pytest.raises(
    ValueError, match="activation_samples must be a finite number > 0"
  ):
    mcq_jax.quantize_activations(x, jax.random.key(0), 0.0)
  with pytest.raises(ValueError, match="unknown sampler 'halton'"):
    mcq_jax.quantize_activations(x, jax.random.key(0), 2.0, sampler="halton")
  with pytest.raises(
    ValueError,
    match="activations: .* samples for a group of 3 values exceeds .*;"
    " lower activation_samples",
  ):
    mcq_jax.quantize_activations(x, jax.random.key(0), 1e9)


@pytest.mark.parametrize("sampler", ["systematic", "stratified", "iid"])
def test_a_bit_budget_fits_every_group(sampler):
  x = jax.random.normal(jax.random.key(0), (8, 50)) ** 3
  q = mcq_jax.quantize_activations(
    x, jax.random.key(1), bits=4, sampler=sampler
  )
  assert q.bits == 4 and q.samples_per_value is None
  assert q.values.dtype == jnp.int8 and int(jnp.abs(q.values).max()) <= 7
  totals = np.abs(np.asarray(q.values, np.int64)).sum(axis=1)
  assert (totals <= q.samples).all() and (totals >= 7).all()
  if sampler == "iid":
    assert (totals == 7).all()  # the only N its counts are sure to fit
  np.testing.assert_allclose(
    np.asarray(q.scale, np.float64)[:, 0] * totals,
    np.abs(np.asarray(x, np.float64)).sum(axis=1),
    rtol=1e-6,
  )


def test_a_bit_budget_and_samples_are_exclusive():
  x = jnp.ones((2, 3))
  with pytest.raises(ValueError, match="pass activation_samples or bits$"):
    mcq_jax.quantize_activations(x, jax.random.key(0))
  with pytest.raises(ValueError, match="not both"):
    mcq_jax.quantize_activations(x, jax.random.key(0), 2.0, bits=4)
