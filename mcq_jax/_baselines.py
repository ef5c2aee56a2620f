"""Uniform-grid baselines for MCQ: round-to-nearest and stochastic rounding."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mcq_jax import _dtypes, _keys, _paths, _validation
from mcq_jax._qarray import QArray
from mcq_jax._typing import (
  AxisLike,
  Granularity,
  Method,
  PRNGKey,
  PyTree,
  Where,
)

# Rounds one leaf onto its grid: (leaf, path, channel axes) -> (values, scale).
_RoundLeaf = Callable[
  [jax.Array, str, tuple[int, ...]], tuple[jax.Array, jax.Array]
]


def _grid(
  w: jax.Array, axes: tuple[int, ...], bits: int
) -> tuple[jax.Array, jax.Array, int, np.dtype]:
  """Symmetric grid: ``w / scale`` lies in ``[-levels, levels]``."""
  levels = 2 ** (bits - 1) - 1
  reduce_axes = tuple(a for a in range(w.ndim) if a not in axes)
  scale = jnp.max(jnp.abs(w), axis=reduce_axes, keepdims=True) / levels
  safe = jnp.where(scale > 0, scale, 1.0)
  return w / safe, scale, levels, _dtypes.smallest_int_dtype(levels)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _round_leaf(
  leaf: jax.Array, axes: tuple[int, ...], bits: int
) -> tuple[jax.Array, jax.Array]:
  x, scale, levels, dtype = _grid(leaf.astype(jnp.float32), axes, bits)
  return jnp.clip(jnp.round(x), -levels, levels).astype(dtype), scale


@functools.partial(jax.jit, static_argnums=(2, 3))
def _stochastic_round_leaf(
  leaf: jax.Array, key: PRNGKey, axes: tuple[int, ...], bits: int
) -> tuple[jax.Array, jax.Array]:
  x, scale, levels, dtype = _grid(leaf.astype(jnp.float32), axes, bits)
  # floor(x + u), u ~ U[0, 1): rounds up with probability frac(x), so
  # E[values] = x. |x| <= levels already; the clip only guards rounding at the
  # ends of the grid and never moves an in-range value.
  u = jax.random.uniform(key, x.shape, jnp.float32)
  values = jnp.clip(jnp.floor(x + u), -levels, levels).astype(dtype)
  return values, scale


def _map_grid(
  params: PyTree,
  round_leaf: _RoundLeaf,
  method: Method,
  bits: int,
  granularity: Granularity,
  where: Where,
  channel_axis: AxisLike,
) -> PyTree:
  """Validates the options and maps ``round_leaf(leaf, name, axes)`` over the
  selected leaves, wrapping each result in a :class:`QArray`."""
  _validation.check_bits(bits)
  _validation.check_choice(
    "granularity", granularity, _validation.GRANULARITIES
  )

  def quantize_leaf(leaf: jax.Array, name: str) -> QArray:
    axes = (
      _validation.channel_axes(channel_axis, leaf.ndim, name)
      if granularity == "per_channel"
      else ()
    )
    values, scale = round_leaf(leaf, name, axes)
    return QArray(
      values=values,
      scale=scale,
      method=method,
      samples=0,
      samples_per_value=None,
      sampler=None,
      channel_axes=axes,
      sort=False,
      dtype=jnp.dtype(leaf.dtype),
    )

  return _paths.map_selected(quantize_leaf, params, where)


def round_to_nearest(
  params: PyTree,
  *,
  bits: int = 8,
  granularity: Granularity = "per_tensor",
  where: Where = None,
  channel_axis: AxisLike = -1,
) -> PyTree:
  """Symmetric round-to-nearest quantization to ``bits`` bits (sign included).

  ``values = round(w / scale)`` with ``scale = max|w| / (2**(bits-1) - 1)`` per
  tensor or per channel. Deterministic and biased; the usual post-training
  baseline. Returns :class:`QArray` leaves (``method = "round_to_nearest"``,
  ``samples = 0``) so :func:`mcq_jax.dequantize` and
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
    >>> w = {"k": jnp.array([[1.0, -0.5], [0.26, 0.0]])}
    >>> q = mcq_jax.round_to_nearest(w, bits=3)
    >>> q["k"].values.tolist()
    [[3, -2], [1, 0]]
  """
  return _map_grid(
    params,
    lambda leaf, name, axes: _round_leaf(leaf, axes, bits),
    "round_to_nearest",
    bits,
    granularity,
    where,
    channel_axis,
  )


def stochastic_rounding(
  params: PyTree,
  key: PRNGKey,
  *,
  bits: int = 8,
  granularity: Granularity = "per_tensor",
  where: Where = None,
  channel_axis: AxisLike = -1,
) -> PyTree:
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
    (``method = "stochastic_rounding"``).

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
      leaf, _keys.path_key(key, name), axes, bits
    ),
    "stochastic_rounding",
    bits,
    granularity,
    where,
    channel_axis,
  )
