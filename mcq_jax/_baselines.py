"""Round-to-nearest: the deterministic baseline MCQ is measured against."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mcq_jax import _paths
from mcq_jax._qarray import QArray
from mcq_jax._quantize import GRANULARITIES, _channel_axes, check_choice


@functools.partial(jax.jit, static_argnums=(1, 2))
def _round_leaf(leaf: jax.Array, axes: tuple[int, ...], bits: int):
  levels = 2 ** (bits - 1) - 1
  reduce_axes = tuple(a for a in range(leaf.ndim) if a not in axes)
  w = leaf.astype(jnp.float32)
  scale = jnp.max(jnp.abs(w), axis=reduce_axes, keepdims=True) / levels
  safe = jnp.where(scale > 0, scale, 1.0)
  dtype = jnp.int8 if bits <= 8 else jnp.int16 if bits <= 16 else jnp.int32
  values = jnp.clip(jnp.round(w / safe), -levels, levels).astype(dtype)
  return values, scale


def round_to_nearest(
    params: Any,
    *,
    bits: int = 8,
    granularity: str = "per_tensor",
    where: _paths.Where = None,
    channel_axis: int | Sequence[int] = -1,
) -> Any:
  """Symmetric round-to-nearest quantization to ``bits`` bits (sign included).

  ``values = round(w / scale)`` with ``scale = max|w| / (2**(bits-1) - 1)`` per
  tensor or per channel. Deterministic and biased; the usual post-training
  baseline. Returns :class:`QArray` leaves (``samples = 0``,
  ``sampler = "round_to_nearest"``) so :func:`mcq_jax.dequantize` and
  :func:`mcq_jax.summary` apply unchanged.

  Args:
    params: a pytree of arrays.
    bits: total bits per value, 2 to 32.
    granularity: ``"per_tensor"`` or ``"per_channel"``.
    where: leaf selection, as in :func:`mcq_jax.quantize`.
    channel_axis: output-channel axis (or axes) for ``per_channel``.

  Returns:
    A pytree like ``params`` with :class:`QArray` selected leaves.

  Examples:
    >>> import jax.numpy as jnp, mcq_jax
    >>> q = mcq_jax.round_to_nearest({"k": jnp.array([[1.0, -0.5], [0.26, 0.0]])}, bits=3)
    >>> q["k"].values.tolist()
    [[3, -2], [1, 0]]
  """
  if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 32:
    raise ValueError(f"bits must be an int in [2, 32], got {bits!r}")
  check_choice("granularity", granularity, GRANULARITIES)

  def quantize_leaf(leaf: jax.Array, name: str) -> QArray:
    axes = (
        _channel_axes(channel_axis, leaf.ndim, name)
        if granularity == "per_channel" else ()
    )
    values, scale = _round_leaf(leaf, axes, bits)
    return QArray(
        values=values,
        scale=scale,
        samples=0,
        samples_per_weight=0.0,
        sampler="round_to_nearest",
        channel_axes=axes,
        sort=False,
        dtype=jnp.dtype(leaf.dtype),
    )

  return _paths.map_selected(quantize_leaf, params, where)
