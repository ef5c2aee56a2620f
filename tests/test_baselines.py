"""Round-to-nearest baseline."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mcq_jax


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("granularity", mcq_jax.GRANULARITIES)
def test_error_is_at_most_half_a_step(bits, granularity):
  w = jax.random.normal(jax.random.key(0), (32, 12)) * jnp.linspace(0.1, 3.0, 12)
  q = mcq_jax.round_to_nearest({"k": w}, bits=bits, granularity=granularity)["k"]
  levels = 2 ** (bits - 1) - 1
  values = np.asarray(q.values, np.int64)
  assert np.abs(values).max() == levels  # the largest value maps to the top level
  err = np.abs(np.asarray(q.dequantize()) - np.asarray(w))
  assert (err <= np.asarray(q.scale) / 2 + 1e-6).all()
  assert mcq_jax.summary({"k": q}).leaves[0].bits == bits
  assert q.scale.shape == ((1, 12) if granularity == "per_channel" else (1, 1))


def test_selection_and_errors():
  params = {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3), "n": jnp.arange(3)}
  q = mcq_jax.round_to_nearest(params, bits=4)
  assert isinstance(q["kernel"], mcq_jax.QArray)
  assert q["bias"] is params["bias"] and q["n"] is params["n"]
  assert not np.asarray(mcq_jax.round_to_nearest({"z": jnp.zeros((2, 2))})["z"].values).any()
  for bad in (1, 33, 4.0, True):
    with pytest.raises(ValueError, match="bits must be an int"):
      mcq_jax.round_to_nearest(params, bits=bad)
  with pytest.raises(ValueError, match="unknown granularity"):
    mcq_jax.round_to_nearest(params, granularity="rows")
