"""``_dtypes``: the smallest signed dtype that holds a bound, at every edge."""

import numpy as np
import pytest

from mcq_jax._dtypes import smallest_int_dtype


@pytest.mark.parametrize(
  "bound, dtype",
  [
    (0, np.int8),
    (127, np.int8),
    (128, np.int16),
    (32767, np.int16),
    (32768, np.int32),
    (2**31 - 1, np.int32),
  ],
)
def test_edges(bound, dtype):
  assert smallest_int_dtype(bound) == np.dtype(dtype)
  # and the bound really fits, with its sign
  assert np.iinfo(smallest_int_dtype(bound)).min <= -bound


def test_beyond_int32_is_an_error():
  with pytest.raises(
    ValueError,
    match="no signed integer dtype of at most 32 bits holds 2147483648",
  ):
    smallest_int_dtype(2**31)
