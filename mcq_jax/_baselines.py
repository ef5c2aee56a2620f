"""Uniform-grid baselines MCQ is measured against: round-to-nearest and stochastic rounding."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mcq_jax import _paths
from mcq_jax._qarray import QArray
from mcq_jax._quantize import GRANULARITIES, _channel_axes, _leaf_key, check_choice


def _grid(w: jax.Array, axes: tuple[int, ...], bits: int):
  """Symmetric grid: ``w / scale`` lies in ``[-levels, levels]``."""
  levels = 2 ** (bits - 1) - 1
  reduce_axes = tuple(a for a in range(w.ndim) if a not in axes)
  scale = jnp.max(jnp.abs(w), axis=reduce_axes, keepdims=True) / levels
  safe = jnp.where(scale > 0, scale, 1.0)
  dtype = jnp.int8 if bits <= 8 else jnp.int16 if bits <= 16 else jnp.int32
  return w / safe, scale, levels, dtype


@functools.partial(jax.jit, static_argnums=(1, 2))
def _round_leaf(leaf: jax.Array, axes: tuple[int, ...], bits: int):
  x, scale, levels, dtype = _grid(leaf.astype(jnp.float32), axes, bits)
  return jnp.clip(jnp.round(x), -levels, levels).astype(dtype), scale


@functools.partial(jax.jit, static_argnums=(2, 3))
def _stochastic_round_leaf(
    leaf: jax.Array, key: jax.Array, axes: tuple[int, ...], bits: int
):
  x, scale, levels, dtype = _grid(leaf.astype(jnp.float32), axes, bits)
  # floor(x + u), u ~ U[0, 1): rounds up with probability frac(x), so
  # E[values] = x. |x| <= levels already; the clip only guards rounding at the
  # ends of the grid and never moves an in-range value.
  u = jax.random.uniform(key, x.shape, jnp.float32)
  values = jnp.clip(jnp.floor(x + u), -levels, levels).astype(dtype)
  return values, scale


def _map_grid(
    params: Any,
    round_leaf: Callable[[jax.Array, str, tuple[int, ...]], tuple[jax.Array, jax.Array]],
    sampler: str,
    bits: Any,
    granularity: str,
    where: _paths.Where,
    channel_axis: int | Sequence[int],
) -> Any:
  """Validates the options and maps ``round_leaf(leaf, name, axes)`` over the
  selected leaves, wrapping each result in a :class:`QArray`."""
  if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 32:
    raise ValueError(f"bits must be an int in [2, 32], got {bits!r}")
  check_choice("granularity", granularity, GRANULARITIES)

  def quantize_leaf(leaf: jax.Array, name: str) -> QArray:
    axes = (
        _channel_axes(channel_axis, leaf.ndim, name)
        if granularity == "per_channel" else ()
    )
    values, scale = round_leaf(leaf, name, axes)
    return QArray(
        values=values,
        scale=scale,
        samples=0,
        samples_per_weight=0.0,
        sampler=sampler,
        channel_axes=axes,
        sort=False,
        dtype=jnp.dtype(leaf.dtype),
    )

  return _paths.map_selected(quantize_leaf, params, where)


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
  return _map_grid(
      params, lambda leaf, name, axes: _round_leaf(leaf, axes, bits),
      "round_to_nearest", bits, granularity, where, channel_axis,
  )


def stochastic_rounding(
    params: Any,
    key: jax.Array,
    *,
    bits: int = 8,
    granularity: str = "per_tensor",
    where: _paths.Where = None,
    channel_axis: int | Sequence[int] = -1,
) -> Any:
  """Symmetric stochastic rounding to ``bits`` bits (sign included).

  The same grid as :func:`round_to_nearest` (``scale = max|w| / (2**(bits-1)
  - 1)``), but each value rounds up with probability equal to its fractional
  part: ``values = floor(w / scale + u)``, ``u ~ U[0, 1)``. Unbiased like MCQ,
  with a fixed bit-width instead of one set by the amount of sampling; the
  baseline that isolates what importance sampling adds. Each leaf draws from a
  key derived from ``key`` and its path, as in :func:`mcq_jax.quantize`.

  Args:
    params: a pytree of arrays.
    key: a ``jax.random`` key.
    bits: total bits per value, 2 to 32.
    granularity: ``"per_tensor"`` or ``"per_channel"``.
    where: leaf selection, as in :func:`mcq_jax.quantize`.
    channel_axis: output-channel axis (or axes) for ``per_channel``.

  Returns:
    A pytree like ``params`` with :class:`QArray` selected leaves
    (``sampler = "stochastic_rounding"``).

  Examples:
    >>> import jax, jax.numpy as jnp, mcq_jax
    >>> w = {"k": jnp.array([[1.0, -0.5], [0.25, 0.0]])}
    >>> q = mcq_jax.stochastic_rounding(w, jax.random.key(0), bits=2)
    >>> q["k"].values[0, 0].item(), q["k"].values[1, 1].item()   # on the grid
    (1, 0)
    >>> bool(jnp.isin(q["k"].values[0, 1], jnp.array([-1, 0])))  # -0.5: 0 or -1
    True
  """
  return _map_grid(
      params,
      lambda leaf, name, axes: _stochastic_round_leaf(
          leaf, _leaf_key(key, name), axes, bits),
      "stochastic_rounding", bits, granularity, where, channel_axis,
  )
