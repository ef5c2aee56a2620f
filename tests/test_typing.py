"""``_typing``: the Literal aliases agree with the options that are checked."""

import typing

import jax
import jax.numpy as jnp

import mcq_jax
from mcq_jax import _typing


def test_literal_aliases_match_the_runtime_options():
  assert set(typing.get_args(_typing.Sampler)) == set(mcq_jax.ALL_SAMPLERS)
  assert set(mcq_jax.SAMPLERS) < set(mcq_jax.ALL_SAMPLERS)
  assert set(typing.get_args(_typing.Granularity)) == set(mcq_jax.GRANULARITIES)


def test_every_producer_records_a_declared_method():
  params = {"k": jnp.array([[1.0, -0.5], [0.25, 2.0]])}
  key = jax.random.key(0)
  produced = {
    mcq_jax.quantize(params, key)["k"].method,
    mcq_jax.round_to_nearest(params, bits=4)["k"].method,
    mcq_jax.stochastic_rounding(params, key, bits=4)["k"].method,
    mcq_jax.quantize_activations(params["k"], key, 2.0).method,
  }
  assert produced == set(typing.get_args(_typing.Method))
