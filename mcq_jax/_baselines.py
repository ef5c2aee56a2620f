"""Uniform-grid baselines for MCQ: round-to-nearest and stochastic rounding."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mcq_jax import (
  _blocks,
  _dtypes,
  _keys,
  _paths,
  _runtime_checks,
  _validation,
)
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
) -> tuple[jax.Array, jax.Array, float, np.dtype]:
  """Symmetric grid: ``w / scale`` lies in ``[-levels, levels]``.

  Computed in float32 (float64 for float64 leaves). Returns ``(w / scale,
  scale, bound, dtype)`` where ``bound`` is the largest float of that type not
  above ``levels = 2**(bits-1) - 1``: from 25 bits on, float32 rounds
  ``levels`` up (``2**31 - 1`` to ``2**31``), and a value clipped there would
  wrap to ``-2**31`` in int32.
  """
  w = w.astype(jnp.promote_types(w.dtype, jnp.float32))
  levels = 2 ** (bits - 1) - 1
  reduce_axes = tuple(a for a in range(w.ndim) if a not in axes)
  scale = jnp.max(jnp.abs(w), axis=reduce_axes, keepdims=True) / levels
  safe = jnp.where(scale > 0, scale, 1.0)
  bound = np.asarray(levels, w.dtype)
  if int(bound) > levels:
    bound = np.nextafter(bound, np.zeros((), w.dtype))
  return w / safe, scale, float(bound), _dtypes.smallest_int_dtype(levels)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _round_leaf(
  leaf: jax.Array, axes: tuple[int, ...], bits: int
) -> tuple[jax.Array, jax.Array]:
  x, scale, bound, dtype = _grid(leaf, axes, bits)
  return jnp.clip(jnp.round(x), -bound, bound).astype(dtype), scale


@functools.partial(jax.jit, static_argnums=(2, 3))
def _stochastic_round_leaf(
  leaf: jax.Array, key: PRNGKey, axes: tuple[int, ...], bits: int
) -> tuple[jax.Array, jax.Array]:
  x, scale, bound, dtype = _grid(leaf, axes, bits)
  # floor(x + u), u ~ U[0, 1): rounds up with probability frac(x), so
  # E[values] = x. |x| <= levels already; the clip only guards rounding at the
  # ends of the grid and never moves an in-range value.
  u = jax.random.uniform(key, x.shape, x.dtype)
  values = jnp.clip(jnp.floor(x + u), -bound, bound).astype(dtype)
  return values, scale


def _map_grid(
  params: PyTree,
  round_leaf: _RoundLeaf,
  method: Method,
  bits: int,
  granularity: Granularity,
  where: Where,
  channel_axis: AxisLike,
  stack_axes: AxisLike,
  group_size: int | None,
  check_finite: bool,
) -> PyTree:
  """Validates the options and maps ``round_leaf(leaf, name, axes)`` over the
  selected leaves (over their blocks, with ``group_size``), wrapping each
  result in a :class:`QArray`."""
  _validation.check_bits(bits)
  _validation.check_choice(
    "granularity", granularity, _validation.GRANULARITIES
  )
  _validation.check_group_size(group_size, granularity)

  def quantize_leaf(leaf: jax.Array, name: str) -> QArray:
    axes = _validation.group_axes(
      granularity, channel_axis, stack_axes, leaf.ndim, name
    )
    if check_finite and leaf.size:
      _runtime_checks.check_finite(
        leaf,
        ValueError,
        f"leaf {name!r} has non-finite values (NaN or inf); a grid needs"
        " finite weights to set its scale",
      )
    if group_size is None:
      values, scale = round_leaf(leaf, name, axes)
    else:  # the blocks are the columns of a (g, blocks * groups) array
      values, scale = round_leaf(
        _blocks.to_blocks(leaf, axes, group_size), name, (1,)
      )
      values = _blocks.from_blocks(values, leaf.shape, axes)
      scale = _blocks.block_scales(scale, leaf.shape, axes, group_size)
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
      bits=bits,
      group_size=group_size,
    )

  return _paths.map_selected(quantize_leaf, params, where)


def round_to_nearest(
  params: PyTree,
  *,
  bits: int = 8,
  granularity: Granularity = "per_tensor",
  where: Where = None,
  channel_axis: AxisLike = -1,
  stack_axes: AxisLike = (),
  group_size: int | None = None,
  check_finite: bool = True,
) -> PyTree:
  """Symmetric round-to-nearest quantization to ``bits`` bits (sign included).

  ``values = round(w / scale)`` with ``scale = max|w| / (2**(bits-1) - 1)`` per
  tensor or per channel. Deterministic and biased; the usual post-training
  baseline. Returns :class:`QArray` leaves (``method = "round_to_nearest"``,
  ``samples = 0``) so :func:`mcq_jax.dequantize` and
  :func:`mcq_jax.summary` apply unchanged.

  Args:
    params: a pytree of arrays.
    bits: total bits per value, 2 to 32. The grid is computed in float32
      (float64 for float64 leaves), so from 25 bits on its largest levels are
      the float32 values at or below ``2**(bits-1) - 1``.
    granularity: ``"per_tensor"`` or ``"per_channel"``.
    where: leaf selection, as in :func:`mcq_jax.quantize`.
    channel_axis: output-channel axis (or axes) for ``per_channel``.
    stack_axes: axes that stack independent tensors, as in
      :func:`mcq_jax.quantize`.
    group_size: blocks of this many consecutive values within each output
      channel, each with its own grid, as in :func:`mcq_jax.quantize`
      (``per_channel`` only).
    check_finite: reject NaN/inf weights, as :func:`mcq_jax.quantize` does.

  Returns:
    A pytree like ``params`` with :class:`QArray` selected leaves.

  Raises:
    ValueError: for ``bits`` outside ``[2, 32]``, an unknown granularity,
      non-finite values (naming the leaf), or an explicit ``where`` that
      selects no float or quantized leaf.

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
    stack_axes,
    group_size,
    check_finite,
  )


def stochastic_rounding(
  params: PyTree,
  key: PRNGKey,
  *,
  bits: int = 8,
  granularity: Granularity = "per_tensor",
  where: Where = None,
  channel_axis: AxisLike = -1,
  stack_axes: AxisLike = (),
  group_size: int | None = None,
  check_finite: bool = True,
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
    bits: total bits per value, 2 to 32. The grid is computed in float32
      (float64 for float64 leaves), so from 25 bits on its largest levels are
      the float32 values at or below ``2**(bits-1) - 1``.
    granularity: ``"per_tensor"`` or ``"per_channel"``.
    where: leaf selection, as in :func:`mcq_jax.quantize`.
    channel_axis: output-channel axis (or axes) for ``per_channel``.
    stack_axes: axes that stack independent tensors, as in
      :func:`mcq_jax.quantize`.
    group_size: blocks of this many consecutive values within each output
      channel, each with its own grid, as in :func:`mcq_jax.quantize`
      (``per_channel`` only).
    check_finite: reject NaN/inf weights, as :func:`mcq_jax.quantize` does.

  Returns:
    A pytree like ``params`` with :class:`QArray` selected leaves
    (``method = "stochastic_rounding"``).

  Raises:
    ValueError: as :func:`mcq_jax.round_to_nearest`, and for two selected
      leaves whose paths (and so keys) coincide.

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
    stack_axes,
    group_size,
    check_finite,
  )
