"""The ``QArray`` leaf type."""

import jax
import jax.numpy as jnp
import numpy as np

import mcq_jax
from mcq_jax import QArray
from tests.conftest import PINNED, STRATIFIED_PER_TENSOR


def _q():
  w = jnp.array([[0.5, -1.0, 0.0], [2.0, 0.25, -0.25]])
  return mcq_jax.quantize(
    {"k": w}, jax.random.key(0), samples_per_weight=4.0, **STRATIFIED_PER_TENSOR
  )["k"]


def test_is_a_pytree_with_static_metadata():
  q = _q()
  leaves, treedef = jax.tree_util.tree_flatten(q)
  assert len(leaves) == 2  # values and scale; the rest is static
  rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
  assert rebuilt.samples == 24 and rebuilt.sampler == "stratified"
  doubled = jax.tree_util.tree_map(lambda x: x * 2, q)
  np.testing.assert_array_equal(doubled.values, np.asarray(q.values) * 2)


def test_passes_through_jit_and_dequantizes_inside():
  q = _q()
  out = jax.jit(lambda q: q.dequantize())(q)
  np.testing.assert_array_equal(
    out, np.asarray(q.values, np.float32) * np.asarray(q.scale)
  )


def test_properties():
  q = _q()
  assert q.shape == (2, 3) and q.ndim == 2 and q.size == 6
  assert q.granularity == "per_tensor" and q.num_groups == 1
  assert q.scale.shape == (1, 1)
  assert isinstance(q, QArray)


def test_dequantize_keeps_l1_mass_and_zeros():
  q = _q()
  w_hat = mcq_jax.dequantize({"k": q, "b": jnp.ones(2)})
  assert float(jnp.abs(w_hat["k"]).sum()) == 4.0
  assert float(w_hat["k"][0, 2]) == 0.0
  assert w_hat["b"].shape == (2,)


def test_max_abs_value_is_a_static_bound_on_the_values():
  w = {"k": jnp.array([[1.0, -0.5], [0.25, 0.0]])}
  q = mcq_jax.quantize(w, jax.random.key(0), samples_per_weight=3.0)["k"]
  assert q.max_abs_value == q.samples == 6  # N, within int8's range
  assert int(jnp.abs(q.values).max()) <= q.max_abs_value
  # a concrete N = 40000 stored in int8: the dtype is the tighter bound
  ones = {"k": jnp.ones((200, 200))}
  q = mcq_jax.quantize(ones, jax.random.key(0), **PINNED)["k"]
  assert q.samples == 40000 and q.values.dtype == jnp.int8
  assert q.max_abs_value == 127
  # a grid of 12 bits in int16: the bit width is the tighter bound
  rtn = mcq_jax.round_to_nearest(w, bits=12)["k"]
  assert rtn.values.dtype == jnp.int16 and rtn.bits == 12
  assert rtn.max_abs_value == 2047
  # a bit budget bounds MCQ's values below its (much larger) bound on N
  q = mcq_jax.quantize(ones, jax.random.key(0), bits=5)["k"]
  assert q.samples > 15 and q.max_abs_value == 15
  assert int(jnp.abs(q.values).max()) <= 15
