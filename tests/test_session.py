"""``_session``: options validated once, call numbering, keys and records."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mcq_jax
from mcq_jax import QArray
from mcq_jax._keys import path_key
from mcq_jax._session import ActivationOptions, CallLog, Session


def test_options_are_validated_on_construction():
  ActivationOptions(None, "iid", per_token=True, check_finite=False)
  with pytest.raises(
    ValueError, match="activation_samples must be a finite number > 0"
  ):
    ActivationOptions(-2.0, "systematic", per_token=False, check_finite=True)
  with pytest.raises(ValueError, match="unknown sampler 'sobol'"):
    ActivationOptions(2.0, "sobol", per_token=False, check_finite=True)


def test_call_log_numbers_repeated_calls():
  log = CallLog()
  assert [log.claim("a"), log.claim("b"), log.claim("a"), log.claim("a")] == [
    "a",
    "b",
    "a#1",
    "a#2",
  ]
  assert log.report().layers == ()


def test_sample_uses_the_layer_calls_key_and_options():
  session = Session(
    ActivationOptions(3.0, "stratified", False, True), jax.random.key(4)
  )
  x = jax.random.normal(jax.random.key(0), (2, 5, 6))
  a = session.sample(x, "block/Dense_0#1", group_ndim=2)
  expected = mcq_jax.quantize_activations(
    x,
    path_key(jax.random.key(4), "block/Dense_0#1"),
    3.0,
    group_ndim=2,
    sampler="stratified",
  )
  np.testing.assert_array_equal(a.values, expected.values)
  np.testing.assert_array_equal(a.scale, expected.scale)
  assert (
    a.samples == 18 and a.samples_per_value == 3.0 and a.sampler == "stratified"
  )


def test_sample_rejects_non_finite_inputs_naming_the_layer():
  session = Session(
    ActivationOptions(2.0, "systematic", False, True), jax.random.key(0)
  )
  with pytest.raises(
    FloatingPointError,
    match=r"layer 'L': its input has non-finite values \(NaN or inf\)"
    r" \(1 of 3 values\)",
  ):
    session.sample(jnp.array([1.0, jnp.inf, 0.0]), "L", 0)
  unchecked = Session(
    ActivationOptions(2.0, "systematic", False, False), jax.random.key(0)
  )
  unchecked.sample(jnp.array([1.0, 2.0, 0.0]), "L", 0)


def test_record_says_how_the_call_ran():
  session = Session(
    ActivationOptions(None, "systematic", False, True), jax.random.key(0)
  )
  assert not session.sampled
  kernel = mcq_jax.quantize({"k": jnp.ones((3, 2))}, jax.random.key(1))["k"]
  assert isinstance(kernel, QArray)
  session.record("Dense_0", "Dense", kernel)
  session.record("Dense_1", "Dense", jnp.ones((2, 2)), note="why not")
  first, second = session.log.report().layers
  assert (first.weights, first.activations, first.integer, first.note) == (
    "int",
    "float",
    True,
    "",
  )
  assert (second.weights, second.integer, second.note) == (
    "float",
    False,
    "why not",
  )
