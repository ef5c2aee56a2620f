"""``_validation``: option checks name the option, the leaf and the problem."""

import numpy as np
import pytest

from mcq_jax import _sampling, _validation


@pytest.mark.parametrize("good", [1, 0.5, np.float32(2.0), np.int64(3), 1e-9])
def test_sampling_amount_accepts_positive_finite_reals(good):
  _validation.check_sampling_amount("samples_per_weight", good)


@pytest.mark.parametrize(
  "bad", [0, -1.0, float("nan"), float("inf"), True, False, "2", None, [1.0]]
)
def test_sampling_amount_rejects_the_rest(bad):
  with pytest.raises(
    ValueError, match="^activation_samples must be a finite number > 0"
  ):
    _validation.check_sampling_amount("activation_samples", bad)


def test_choice_lists_the_options():
  _validation.check_choice("sampler", "iid", _sampling.SAMPLERS)
  with pytest.raises(
    ValueError,
    match=r"unknown granularity 'per_row'; expected one of"
    r" \('per_tensor', 'per_channel'\)",
  ):
    _validation.check_choice(
      "granularity", "per_row", _validation.GRANULARITIES
    )


@pytest.mark.parametrize("bits", [2, 8, 16, 32])
def test_bits_in_range(bits):
  _validation.check_bits(bits)


@pytest.mark.parametrize("bits", [1, 33, 4.0, True, "8", None])
def test_bits_out_of_range(bits):
  with pytest.raises(ValueError, match=r"bits must be an int in \[2, 32\]"):
    _validation.check_bits(bits)


def test_channel_axes_are_normalised_sorted_and_checked():
  assert _validation.channel_axes(-1, 4, "k") == (3,)
  assert _validation.channel_axes((3, 0), 4, "k") == (0, 3)
  assert _validation.channel_axes([-4, 1], 4, "k") == (0, 1)
  with pytest.raises(
    ValueError,
    match="leaf 'Dense_0/kernel': channel_axis 2 is out of range for a leaf"
    " of rank 2",
  ):
    _validation.channel_axes(2, 2, "Dense_0/kernel")
  with pytest.raises(
    ValueError, match=r"leaf 'k': repeated axes in channel_axis \(1, -1\)"
  ):
    _validation.channel_axes((1, -1), 2, "k")


def test_group_samples_bound_names_the_group_and_the_fix():
  limit = _sampling.MAX_SAMPLES
  _validation.check_group_samples(limit - 10, 10, "leaf 'k'", "lower it")
  with pytest.raises(
    ValueError,
    match=f"leaf 'k': {limit - 9} samples for a group of 10 values exceeds"
    f" the supported {limit}.*; lower it",
  ):
    _validation.check_group_samples(limit - 9, 10, "leaf 'k'", "lower it")
