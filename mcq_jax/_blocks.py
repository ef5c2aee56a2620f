"""Sub-channel groups: blocks of ``group_size`` consecutive values.

With ``group_size=g`` each group of a leaf (an output channel, and a layer
of a stack) is split into blocks of ``g`` consecutive values in the row-major
order of the axes within it (the input features of a ``Dense`` kernel; the
taps and input channels of a convolution), the last block holding the rest.
Each block is sampled as a group of its own, with its own scale: the
sub-channel scaling of LLM quantizers.

The scale keeps the leaf's rank: the group axes keep their size, the first
axis within the groups holds the blocks (``nb``) and the other ones are 1; a
``Dense`` kernel ``(in, out)`` has scales ``(ceil(in / g), out)``, a stack
``(layers, in, out)`` has ``(layers, ceil(in / g), out)``, so lifted
transforms slice values and scales along the same leading axis.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mcq_jax import _groups


def within_axes(ndim: int, axes: tuple[int, ...]) -> tuple[int, ...]:
  """The axes within the groups (those not in ``axes``), in order."""
  return tuple(a for a in range(ndim) if a not in axes)


def block_count(
  shape: tuple[int, ...], axes: tuple[int, ...], group_size: int
) -> int:
  """How many blocks each group of ``shape`` is split into (at least 1)."""
  size = math.prod(shape[a] for a in within_axes(len(shape), axes))
  return max(1, -(-size // group_size))


def _from_groups_last(
  y: jax.Array, shape: tuple[int, ...], axes: tuple[int, ...]
) -> jax.Array:
  """The inverse of :func:`mcq_jax._groups._groups_last`."""
  other = within_axes(len(shape), axes)
  y = y.reshape(tuple(shape[a] for a in other + axes))
  return jnp.transpose(y, tuple(int(i) for i in np.argsort(other + axes)))


def to_blocks(
  x: jax.Array, axes: tuple[int, ...], group_size: int
) -> jax.Array:
  """``x`` as ``(g, nb * G)``: each block's values in a column (zero-padded:
  zeros are never hit), block ``b`` of group ``j`` in column ``b * G + j``."""
  grouped = _groups._groups_last(x, axes)
  size, groups = grouped.shape
  blocks = max(1, -(-size // group_size))
  length = min(group_size, size)
  grouped = jnp.pad(grouped, ((0, blocks * length - size), (0, 0)))
  grouped = grouped.reshape(blocks, length, groups)
  return jnp.transpose(grouped, (1, 0, 2)).reshape(length, blocks * groups)


def from_blocks(
  y: jax.Array, shape: tuple[int, ...], axes: tuple[int, ...]
) -> jax.Array:
  """The inverse of :func:`to_blocks`: values of ``shape``."""
  size = math.prod(shape[a] for a in within_axes(len(shape), axes))
  groups = math.prod(shape[a] for a in axes)
  length, columns = y.shape
  blocks = columns // groups
  y = jnp.transpose(y.reshape(length, blocks, groups), (1, 0, 2))
  return _from_groups_last(
    y.reshape(blocks * length, groups)[:size], shape, axes
  )


def scale_shape(
  shape: tuple[int, ...], axes: tuple[int, ...], group_size: int
) -> tuple[int, ...]:
  """The shape of the scales (see the module docstring)."""
  other = within_axes(len(shape), axes)
  blocks = block_count(shape, axes, group_size)
  return tuple(
    shape[a] if a in axes else (blocks if other and a == other[0] else 1)
    for a in range(len(shape))
  )


def _scale_order(ndim: int, axes: tuple[int, ...]) -> tuple[int, ...]:
  """The axes of a scale array with the block axis first, then ``axes``."""
  other = within_axes(ndim, axes)
  return ((other[0],) if other else ()) + axes


def block_scales(
  scales: jax.Array,
  shape: tuple[int, ...],
  axes: tuple[int, ...],
  group_size: int,
) -> jax.Array:
  """The ``nb * G`` scales of :func:`to_blocks`' columns, shaped as
  :func:`scale_shape`."""
  target = scale_shape(shape, axes, group_size)
  order = _scale_order(len(shape), axes)
  moved = scales.reshape(tuple(target[a] for a in order))
  # The block axis and the group axes in increasing order, then the axes of
  # size 1 in between: a reshape.
  full = jnp.transpose(moved, tuple(int(i) for i in np.argsort(order)))
  return full.reshape(target)


def column_scales(scale: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """The inverse of :func:`block_scales`: ``(nb * G,)`` in column order."""
  order = _scale_order(scale.ndim, axes)
  return jnp.transpose(scale, order + within_axes(scale.ndim, order)).reshape(
    -1
  )


def group_totals(
  values: jax.Array | np.ndarray,
  axes: tuple[int, ...],
  group_size: int | None,
) -> np.ndarray:
  """Each group's ``sum |values|`` (an MCQ group's ``N``), int64: groups
  row-major over ``axes``, and with ``group_size`` one per block, in the
  order of :func:`column_scales`."""
  magnitudes = np.abs(np.asarray(values).astype(np.int64))
  if group_size is None:
    other = within_axes(magnitudes.ndim, axes)
    return np.ravel(magnitudes.sum(axis=other))
  blocked = to_blocks(jnp.asarray(magnitudes, jnp.int32), axes, group_size)
  return np.asarray(blocked).astype(np.int64).sum(axis=0)


def expand(
  scale: jax.Array,
  shape: tuple[int, ...],
  axes: tuple[int, ...],
  group_size: int,
) -> jax.Array:
  """Each value's scale, ``shape``-shaped: block ``l // g`` of its group."""
  size = math.prod(shape[a] for a in within_axes(len(shape), axes))
  groups = math.prod(shape[a] for a in axes)
  per_block = column_scales(scale, axes).reshape(-1, groups)
  length = min(group_size, size)
  rows = per_block[np.arange(size) // length]
  return _from_groups_last(rows, shape, axes)
