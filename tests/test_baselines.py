"""Round-to-nearest baseline."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mcq_jax


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("granularity", mcq_jax.GRANULARITIES)
def test_error_is_at_most_half_a_step(bits, granularity):
  w = jax.random.normal(jax.random.key(0), (32, 12)) * jnp.linspace(
    0.1, 3.0, 12
  )
  q = mcq_jax.round_to_nearest({"k": w}, bits=bits, granularity=granularity)[
    "k"
  ]
  levels = 2 ** (bits - 1) - 1
  values = np.asarray(q.values, np.int64)
  assert (
    np.abs(values).max() == levels
  )  # the largest value maps to the top level
  err = np.abs(np.asarray(q.dequantize()) - np.asarray(w))
  assert (err <= np.asarray(q.scale) / 2 + 1e-6).all()
  assert mcq_jax.summary({"k": q}).leaves[0].bits == bits
  assert q.scale.shape == ((1, 12) if granularity == "per_channel" else (1, 1))


def test_selection_and_errors():
  params = {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3), "n": jnp.arange(3)}
  q = mcq_jax.round_to_nearest(params, bits=4)
  assert isinstance(q["kernel"], mcq_jax.QArray)
  assert q["bias"] is params["bias"] and q["n"] is params["n"]
  assert not np.asarray(
    mcq_jax.round_to_nearest({"z": jnp.zeros((2, 2))})["z"].values
  ).any()
  for bad in (1, 33, 4.0, True):
    with pytest.raises(ValueError, match="bits must be an int"):
      mcq_jax.round_to_nearest(params, bits=bad)
  with pytest.raises(ValueError, match="unknown granularity"):
    mcq_jax.round_to_nearest(params, granularity="rows")


@pytest.mark.parametrize("granularity", mcq_jax.GRANULARITIES)
def test_stochastic_rounding_is_unbiased_and_on_the_grid(granularity):
  w = jax.random.normal(jax.random.key(3), (16, 6)) * jnp.linspace(0.2, 2.0, 6)
  keys = jax.random.split(jax.random.key(4), 4096)
  q = jax.vmap(
    lambda k: mcq_jax.stochastic_rounding(
      {"k": w}, k, bits=3, granularity=granularity
    )["k"]
  )(keys)
  x = np.asarray(w / q.scale[0], np.float64)  # position on the grid
  values = np.asarray(q.values, np.float64)
  # each value is the floor or the ceiling of its grid position
  assert np.all((values == np.floor(x)) | (values == np.ceil(x)))
  # E[values] = x: rounding up has probability frac(x), so the mean over keys
  # lies within a Hoeffding bound (values span one step; level 1e-9, union
  # over the 96 values)
  bound = np.sqrt(np.log(2 * 96 / 1e-9) / (2 * len(keys)))
  assert np.abs(values.mean(0) - x).max() < bound
  # round-to-nearest is biased: the same statistic rejects it
  rtn = np.asarray(
    mcq_jax.round_to_nearest({"k": w}, bits=3, granularity=granularity)[
      "k"
    ].values
  )
  assert np.abs(rtn - x).max() > bound
  assert q.method == "stochastic_rounding" and q.sampler is None
  assert q.samples == 0 and q.samples_per_value is None


def test_stochastic_rounding_keys_selection_and_errors():
  params = {
    "a": {"kernel": jnp.linspace(-1, 1, 64).reshape(8, 8)},
    "b": {"kernel": jnp.linspace(-1, 1, 64).reshape(8, 8)},
    "bias": jnp.ones(3),
    "n": jnp.arange(3),
  }
  q = mcq_jax.stochastic_rounding(params, jax.random.key(0), bits=2)
  assert q["bias"] is params["bias"] and q["n"] is params["n"]
  # the same key gives the same draw; leaves draw from different keys
  again = mcq_jax.stochastic_rounding(params, jax.random.key(0), bits=2)
  np.testing.assert_array_equal(
    q["a"]["kernel"].values, again["a"]["kernel"].values
  )
  assert (
    np.asarray(q["a"]["kernel"].values) != np.asarray(q["b"]["kernel"].values)
  ).any()
  jitted = jax.jit(lambda k: mcq_jax.stochastic_rounding(params, k, bits=2))(
    jax.random.key(0)
  )
  np.testing.assert_array_equal(
    q["a"]["kernel"].values, jitted["a"]["kernel"].values
  )
  with pytest.raises(ValueError, match="bits must be an int"):
    mcq_jax.stochastic_rounding(params, jax.random.key(0), bits=1)
  with pytest.raises(ValueError, match="unknown granularity"):
    mcq_jax.stochastic_rounding(params, jax.random.key(0), granularity="rows")


@pytest.mark.parametrize("bits", [25, 31, 32])
def test_wide_grids_never_wrap(bits):
  # float32 rounds 2**(bits-1) - 1 up; the clip bound must not follow it.
  w = {"w": jnp.array([[1.0, -1.0], [0.5, 0.25]])}
  values = np.asarray(mcq_jax.round_to_nearest(w, bits=bits)["w"].values)
  levels = 2 ** (bits - 1) - 1
  assert values[0, 0] > 0 and values[0, 1] < 0
  assert abs(int(values[0, 0])) <= levels and values[0, 0] == -values[0, 1]
  assert values[0, 0] >= levels - 2 ** (bits - 24)  # the top float32 level
  sr = mcq_jax.stochastic_rounding(w, jax.random.key(0), bits=bits)["w"]
  assert np.asarray(sr.values)[0, 0] > 0


@pytest.mark.parametrize(
  "baseline",
  [
    lambda p: mcq_jax.round_to_nearest(p, bits=4),
    lambda p: mcq_jax.stochastic_rounding(p, jax.random.key(0), bits=4),
  ],
)
def test_baselines_reject_non_finite_weights_by_name(baseline):
  bad = {"layer": {"kernel": jnp.array([[1.0, jnp.nan], [0.5, 2.0]])}}
  with pytest.raises(ValueError, match="'layer/kernel' has non-finite"):
    baseline(bad)
  ok = mcq_jax.round_to_nearest(bad, bits=4, check_finite=False)
  assert ok["layer"]["kernel"].values.shape == (2, 2)


def test_baselines_keep_float64_in_float64():
  w = np.array([[1e300, -3e299], [1e-300, 0.0]])
  with jax.enable_x64(True):
    q = mcq_jax.round_to_nearest({"w": jnp.asarray(w)}, bits=8)
    w_hat = np.asarray(mcq_jax.dequantize(q)["w"])
  assert w_hat.dtype == np.float64
  np.testing.assert_allclose(w_hat[0], [1e300, -3e299], rtol=1 / 127)
