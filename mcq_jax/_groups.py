"""Grouped sampling: MCQ of every group of a tensor, one distribution each.

A group is one index of the ``axes`` (a channel of a kernel, an example or a
token of an activation tensor) and holds every value along the other axes;
with no axes the whole tensor is one group. Each group gets its own key,
``fold_in(key, g)``, and its own scale ``sum|x| / N``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mcq_jax import _dtypes, _keys, _sampling, _sharded
from mcq_jax._typing import DTypeLike, PRNGKey, Sampler


class Amount(NamedTuple):
  """How many samples the groups of a tensor draw.

  Attributes:
    draw: what the sampler is given: ``N``, or a bit budget.
    samples: ``N``, or with a bit budget a static bound on every group's
      ``N`` (``QArray.samples``).
    least: an ``N`` every group may draw, for the size check.
    largest_count: a bound on every ``|count|``.
  """

  draw: _sampling.SampleAmount
  samples: int
  least: int
  largest_count: int

  @property
  def dtype(self) -> np.dtype:
    """The smallest integer dtype that holds every count."""
    return _dtypes.smallest_int_dtype(self.largest_count)


def sample_amount(
  samples_per_value: float | None, bits: int | None, size: int, sampler: str
) -> Amount:
  """The :class:`Amount` of groups of ``size`` values: ``samples_per_value``
  (``N = max(1, round(K n))``) or, if it is ``None``, a ``bits`` budget.

  A count never exceeds its group's ``N``, so ``N = max_count`` fits every
  sampler: the iid one, whose counts have no tighter bound, draws exactly
  that; the others draw each group's own ``N``, at most ``max_count`` per
  value (:func:`~mcq_jax._sampling.budget_samples`).
  """
  if bits is None:
    assert samples_per_value is not None
    n = _sampling.num_samples(samples_per_value, size)
    return Amount(n, n, n, n)
  budget = _sampling.bit_budget(bits, size)
  top = budget.max_count
  if sampler == "iid" or not size:
    return Amount(top, top, top, top)
  return Amount(budget, min(top * size, budget.limit), top, top)


def _groups_last(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """``x`` as ``(L, G)``: each group's values in a column, row-major over the
  other axes; groups row-major over ``axes``."""
  other = tuple(a for a in range(x.ndim) if a not in axes)
  size = math.prod(x.shape[a] for a in other)
  return jnp.transpose(x, other + axes).reshape(size, -1)


def _ungroup(
  counts: jax.Array,
  scale: jax.Array,
  shape: tuple[int, ...],
  axes: tuple[int, ...],
) -> tuple[jax.Array, jax.Array]:
  """The inverse of :func:`_groups_last` for the counts (``(L, G)``), and the
  scales (``(G,)``) shaped to broadcast against ``shape``."""
  other = tuple(a for a in range(len(shape)) if a not in axes)
  counts = counts.reshape(
    tuple(shape[a] for a in other) + tuple(shape[a] for a in axes)
  )
  counts = jnp.transpose(
    counts, tuple(int(i) for i in np.argsort(other + axes))
  )
  scale_shape = tuple(shape[a] if a in axes else 1 for a in range(len(shape)))
  return counts, scale.reshape(scale_shape)


def _sample_grouped(
  x: jax.Array,
  key: PRNGKey,
  num_samples: int | jax.Array | _sampling.BitBudget,
  axes: tuple[int, ...],
  sampler: Sampler,
  sort: bool,
  dtype: DTypeLike,
) -> tuple[jax.Array, jax.Array]:
  group_shape = tuple(x.shape[a] for a in axes)
  other = tuple(a for a in range(x.ndim) if a not in axes)
  scale_shape = tuple(x.shape[a] if a in axes else 1 for a in range(x.ndim))
  if not x.size:  # no values, or no groups: nothing to sample
    scale_dtype = x.dtype if jnp.finfo(x.dtype).bits > 32 else jnp.float32
    return jnp.zeros(x.shape, dtype), jnp.zeros(scale_shape, scale_dtype)
  # Groups last, (L, G): for Flax kernels (output channels last) this is a
  # reshape. Groups that lead (activations: examples first) stay first,
  # (G, L), also a reshape, so the counts come out in the layout the layer's
  # contraction reads.
  groups_first = axes == tuple(range(len(axes))) and bool(axes)
  size = math.prod(x.shape[a] for a in other)
  if groups_first:
    grouped = x.reshape(math.prod(group_shape), size)
  else:
    grouped = _groups_last(x, axes)
  group_axis = 0 if groups_first else 1
  wide = jnp.finfo(x.dtype).bits > 32
  if wide:
    # float64 (x64): bring each group's largest magnitude into [0.5, 1) by an
    # exact power of two before sampling in float32, so that magnitudes
    # beyond float32's range (1e300, 1e-300) keep their distribution; the
    # scale gets the power of two back in float64. Values more than 2**-126
    # below their group's largest become 0 in float32: their expected counts
    # are below N * 2**-126, so no hit is lost in practice.
    group_max = jnp.max(jnp.abs(grouped), axis=1 - group_axis, initial=0.0)
    _, exponent = jnp.frexp(jnp.where(group_max > 0, group_max, 1.0))
    grouped = jnp.ldexp(
      grouped, jnp.expand_dims(-exponent, 1 - group_axis)
    ).astype(jnp.float32)
  else:
    grouped = grouped.astype(jnp.float32)
  counts, scale = _sampling.grouped_counts(
    grouped,
    _keys.group_keys(key, grouped.shape[group_axis]),
    num_samples,
    sampler,
    sort,
    jnp.dtype(dtype),
    groups_first,
  )
  if wide:
    scale = jnp.ldexp(scale.astype(x.dtype), exponent)
  if groups_first:
    return counts.reshape(x.shape), scale.reshape(scale_shape)
  return _ungroup(counts, scale, x.shape, axes)


# Jitted so that eager calls are one dispatch, not one per primitive. With a
# traced N (stratified and systematic) one compilation per shape serves every
# N, so a sweep over K compiles once; iid draws an N-sized array and needs N
# static, and so do callers inside a trace that know N statically.
_sample_any_n = jax.jit(_sample_grouped, static_argnums=(3, 4, 5, 6))
_sample_static_n = jax.jit(_sample_grouped, static_argnums=(2, 3, 4, 5, 6))


def _bucket(size: int) -> int:
  """The smallest ``2**k`` or ``3 * 2**k`` that holds ``size``: less than
  1.5 times ``size``."""
  power = 1
  while power < size:
    power *= 2
  three_quarters = 3 * power // 4
  return three_quarters if power >= 4 and three_quarters >= size else power


# Groups of up to 32 * 16 = 512 values share one column bucket: their leaves
# are small, so padding them costs microseconds, while each bucket they would
# otherwise add costs a sampler compilation (~1 s).
_MIN_COLUMNS = 16


def _column_bucket(cols: int) -> int:
  """The padded column count of a group of ``cols`` columns."""
  return max(_MIN_COLUMNS, _bucket(cols))


def _to_layout(
  x: jax.Array, axes: tuple[int, ...], cols: int, groups: int
) -> jax.Array:
  """``x`` as float32 groups in the ``(cols, R, groups)`` layout, padded."""
  packed = _sampling.pack(_groups_last(x, axes).astype(jnp.float32))
  m, rows, g = packed.shape
  return jnp.pad(packed, ((0, cols - m), (0, 0), (0, groups - g)))


def _bucket_counts(
  packed: jax.Array,
  words: jax.Array,
  num_samples: jax.Array | _sampling.BitBudget,
  sampler: Sampler,
  dtype: DTypeLike,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Counts and scales of the layout, and the largest ``|count|``;
  ``words`` holds (at least) the groups' key words."""
  counts, scale = _sampling.counts_of_layout(
    packed, words[: packed.shape[2]], num_samples, sampler, jnp.dtype(dtype)
  )
  return counts, scale, _dtypes.max_abs(counts)


def _group_words(key: PRNGKey, groups: int) -> jax.Array:
  """The key words of groups ``0 .. groups - 1`` (each depends on its
  index only), computed apart from the sampler, whose compilation they would
  lengthen by a third."""
  return _sampling.group_words(_keys.group_keys(key, groups))


# Words are drawn for at least this many groups, so that one small program
# serves every leaf of up to this many groups (their sampler reads a prefix).
_MIN_WORDS = 4096


def _words_for(key: PRNGKey, groups: int) -> jax.Array:
  """The key words of at least ``groups`` groups (a prefix is theirs), from
  a program shared by every leaf of up to ``_MIN_WORDS`` groups."""
  return _group_words_jit(key, max(_MIN_WORDS, groups))


def _from_layout(
  counts: jax.Array,
  scale: jax.Array,
  shape: tuple[int, ...],
  axes: tuple[int, ...],
  dtype: DTypeLike,
) -> tuple[jax.Array, jax.Array]:
  """Values of ``shape`` and scales from the padded layout."""
  size = math.prod(d for a, d in enumerate(shape) if a not in axes)
  groups = math.prod(shape[a] for a in axes)
  _, cols = _sampling.layout(size)
  counts = _sampling.unpack(counts[:cols, :, :groups], size)
  counts, scale = _ungroup(counts, scale[:groups], shape, axes)
  return counts.astype(dtype), scale


# Eager calls on concrete float32/bfloat16/float16 leaves run in four
# programs: a small one per leaf shape that lays the groups out, padded to a
# bucket of (columns, groups) sizes; one for the groups' key words (shared by
# every leaf of up to 4096 groups); the sampler for the bucket; and a small
# one per shape that puts the counts back. The sampler is by far the
# costliest program to compile, and a model's leaves share a few buckets, so
# a whole model compiles a bounded number of samplers. Zeros are never hit
# and the CDF order of a group depends on its size only, so the padding
# changes no count.
_to_layout_jit = jax.jit(_to_layout, static_argnums=(1, 2, 3))
_bucket_counts_jit = jax.jit(_bucket_counts, static_argnums=(3, 4))
_group_words_jit = jax.jit(_group_words, static_argnums=1)
_from_layout_jit = jax.jit(_from_layout, static_argnums=(2, 3, 4))


_max_abs_jit = jax.jit(_dtypes.max_abs)


def _narrowest(largest: jax.Array, dtype: DTypeLike) -> np.dtype:
  """The narrowest of ``dtype`` and the dtype that holds ``largest``."""
  fit = _dtypes.smallest_int_dtype(int(largest))
  return min(fit, np.dtype(dtype), key=lambda d: d.itemsize)


def _bucketed(
  x: jax.Array,
  key: PRNGKey,
  num_samples: _sampling.SampleAmount,
  axes: tuple[int, ...],
  sampler: Sampler,
  dtype: DTypeLike,
  narrow: bool,
) -> tuple[jax.Array, jax.Array]:
  size = math.prod(d for a, d in enumerate(x.shape) if a not in axes)
  groups = math.prod(x.shape[a] for a in axes)
  _, cols = _sampling.layout(size)
  packed = _to_layout_jit(x, axes, _column_bucket(cols), _bucket(groups))
  words = _words_for(key, _bucket(groups))
  counts, scale, largest = _bucket_counts_jit(
    packed,
    words,
    _sampling.operand_amount(num_samples),
    sampler,
    jnp.dtype(dtype),
  )
  if narrow:  # waits for the counts: concrete leaves run on threads
    dtype = _narrowest(largest, dtype)
  return _from_layout_jit(counts, scale, tuple(x.shape), axes, jnp.dtype(dtype))


def sample_grouped(
  x: jax.Array,
  key: PRNGKey,
  num_samples: _sampling.SampleAmount,
  axes: tuple[int, ...],
  sampler: Sampler,
  *,
  sort: bool = False,
  dtype: DTypeLike = jnp.int32,
  static_num_samples: bool = False,
  narrow: bool = False,
  partition_traced: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Signed hit counts and per-group scales of ``x``.

  Args:
    x: a float array.
    key: the key of the whole tensor; group ``g`` uses ``fold_in(key, g)``.
    num_samples: ``N`` per group (validated by the caller), or a
      :class:`~mcq_jax._sampling.BitBudget` that sets each group's ``N``
      (stratified and systematic).
    axes: sorted, non-negative axes that index groups (``()``: one group).
    sampler: ``"systematic"``, ``"stratified"`` or ``"iid"``.
    sort: build each CDF over values sorted by decreasing magnitude.
    dtype: integer dtype of the values (it must hold ``N``).
    static_num_samples: compile for this ``N`` (always so for ``"iid"``).
    narrow: with concrete ``x`` and ``key``, store the values in the
      narrowest of ``dtype`` and the dtype that holds their actual largest
      magnitude (a traced result keeps ``dtype``: its values are unknown).
    partition_traced: under a trace with several devices, sample through an
      op that XLA's partitioner gives the leaf's sharding, so that a leaf
      sharded over an auto-axes mesh is counted shard by shard too (the
      weights of ``quantize``; ``N`` must be a Python int).

  Returns:
    ``(values, scale)``: ``sign(x) * counts`` of ``x``'s shape in ``dtype``,
    and scales of ``x``'s rank, with the group axes' sizes and 1 elsewhere:
    float32, or float64 for a float64 ``x`` (whose scales may lie outside
    float32's range).
  """
  sharded = _sharded.mesh_axes(x) if x.size else None
  if sharded is not None:
    mesh, names = sharded
    values, scale = _sharded.sample_grouped(
      x,
      key,
      _sampling.static_amount(num_samples),
      axes,
      sampler,
      dtype,
      mesh,
      names,
    )
    if narrow and not isinstance(values, jax.core.Tracer):
      values = values.astype(_narrowest(_max_abs_jit(values), dtype))
    return values, scale
  if (
    partition_traced
    and isinstance(x, jax.core.Tracer)
    and x.size
    and not sort
    and jax.device_count() > 1
  ):
    # Under jit with devices to shard over, the leaf's sharding may be known
    # only to the partitioner (auto-axes meshes): let it tell us.
    return _sharded.sample_partitioned(
      x, key, _sampling.static_amount(num_samples), axes, sampler, dtype
    )
  bucketable = (
    not sort
    and jnp.finfo(x.dtype).bits <= 32
    and x.size
    and not isinstance(x, jax.core.Tracer)
    and not isinstance(key, jax.core.Tracer)
  )
  if sampler != "iid" and not static_num_samples and bucketable:
    return _bucketed(x, key, num_samples, axes, sampler, dtype, narrow)
  if sampler == "iid" or static_num_samples:
    values, scale = _sample_static_n(
      x,
      key,
      _sampling.static_amount(num_samples),
      axes,
      sampler,
      bool(sort),
      jnp.dtype(dtype),
    )
  else:
    values, scale = _sample_any_n(
      x,
      key,
      _sampling.operand_amount(num_samples),
      axes,
      sampler,
      bool(sort),
      jnp.dtype(dtype),
    )
  if narrow and values.size and not isinstance(values, jax.core.Tracer):
    values = values.astype(_narrowest(_max_abs_jit(values), dtype))
  return values, scale
