"""Integer dtypes of quantized values: the smallest that provably holds them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Candidates in increasing width; values never need more than int32 (the
# samplers cap N below 2**31).
_SIGNED = (np.dtype(np.int8), np.dtype(np.int16), np.dtype(np.int32))


def smallest_int_dtype(bound: int) -> np.dtype:
  """The smallest signed integer dtype that holds ``[-bound, bound]``.

  Args:
    bound: the largest magnitude a value can take (a static bound: ``N`` for
      hit counts, ``2**(bits-1) - 1`` for a grid).

  Returns:
    ``int8``, ``int16`` or ``int32``.

  Raises:
    ValueError: if ``bound`` does not fit int32.

  Examples:
    >>> from mcq_jax._dtypes import smallest_int_dtype
    >>> smallest_int_dtype(127), smallest_int_dtype(128)
    (dtype('int8'), dtype('int16'))
    >>> smallest_int_dtype(2**31 - 1)
    dtype('int32')
  """
  for dtype in _SIGNED:
    if bound <= np.iinfo(dtype).max:
      return dtype
  raise ValueError(f"no signed integer dtype of at most 32 bits holds {bound}")


def max_abs(values: jax.Array) -> jax.Array:
  """``max |values|`` of integer values, as int32 (0 when there are none)."""
  return jnp.max(jnp.abs(values).astype(jnp.int32), initial=0)
