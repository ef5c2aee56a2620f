"""Grouped sampling of a tensor sharded over a device mesh, shard by shard.

The counts of a group depend on its values only through exact integer sums in
the CDF's order (the group's own row-major order; see ``_sampling``). So a
group split over devices needs no gathering: each device lays out its own
part, and the devices exchange only what a part needs of its whole group,
per group and per contiguous run of its values (a *segment*):

- the group's largest magnitude (``pmax``), which fixes the power of two the
  sampler scales by;
- the group's exact mass as 16-bit limbs (``psum``), hence the rate ``N /
  mass``;
- each segment's total in sample space and whether it holds a non-zero value
  (``all_gather`` of one small array), from which each device takes where
  its segments start and which segment holds the group's last non-zero value.

Then each device counts its own values. Integer sums are exact in any order,
so every count and scale equals the single-device one, bit for bit.

A device's values of one group are contiguous in the group's order in runs:
along the group's other axes ``o_1 .. o_k`` in order, let ``o_t`` be the last
one that is sharded. A segment is one index of the device's block along
``o_1 .. o_(t-1)``, with the whole of the block along ``o_t .. o_k``. A
kernel sharded along its input axis has one segment per group and device; a
convolution kernel sharded along its input channels, one per kernel tap.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from mcq_jax import _sampling
from mcq_jax._typing import DTypeLike, PRNGKey, Sampler

# Mesh axis names per array axis (empty: not sharded along that axis).
AxisNames = tuple[str, ...]
MeshLike = Mesh | AbstractMesh


def _entry_names(entry: object) -> AxisNames:
  """The mesh axes of one ``PartitionSpec`` entry."""
  if entry is None:
    return ()
  if isinstance(entry, str):
    return (entry,)
  if isinstance(entry, tuple) and all(isinstance(e, str) for e in entry):
    return entry
  raise ValueError(f"unsupported PartitionSpec entry {entry!r}")


def mesh_axes(x: jax.Array) -> tuple[MeshLike, tuple[AxisNames, ...]] | None:
  """The mesh of ``x`` and, per axis of ``x``, the mesh axes sharding it.

  A concrete array tells its sharding; a traced one tells the mesh axes of
  explicit meshes (JAX's sharding in types). ``None`` when ``x`` is not
  split over devices (one device, replicated, or a sharding we cannot see).
  """
  if isinstance(x, jax.core.Tracer):
    try:
      sharding = jax.typeof(x).sharding
    except Exception:  # an abstract value with no sharding
      return None
  else:
    sharding = getattr(x, "sharding", None)
  if not isinstance(sharding, NamedSharding):
    return None
  spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
  names = tuple(_entry_names(e) for e in spec)
  mesh = sharding.mesh
  if not any(mesh.shape[a] > 1 for axis in names for a in axis):
    return None
  return mesh, names


def check_divisible(
  shape: Sequence[int],
  names: tuple[AxisNames, ...],
  mesh_shape: dict,
  what: str,
) -> None:
  """Raises ``ValueError`` naming ``what`` if a mesh axis does not divide
  the axis of the array it shards."""
  for axis, (size, axis_names) in enumerate(zip(shape, names)):
    ways = math.prod(mesh_shape[a] for a in axis_names)
    if size % ways:
      raise ValueError(
        f"{what} of shape {tuple(shape)} is sharded over mesh axes"
        f" {axis_names} ({ways} ways) along its axis {axis} of size {size},"
        " which they do not divide: pad the axis or shard it differently"
      )


def _coordinate(axis_names: AxisNames, mesh_shape: dict) -> jax.Array:
  """This device's index along an array axis sharded over ``axis_names``
  (row-major over them, as ``PartitionSpec`` orders them)."""
  index = jnp.int32(0)
  for a in axis_names:
    index = index * mesh_shape[a] + lax.axis_index(a)
  return index


def _global_group_index(
  local_shape: tuple[int, ...],
  axes: tuple[int, ...],
  names: tuple[AxisNames, ...],
  mesh_shape: dict,
) -> jax.Array:
  """The global index (row-major over ``axes``) of each local group."""
  index = jnp.zeros((), jnp.int32)
  for a in axes:
    ways = math.prod(mesh_shape[n] for n in names[a])
    local = local_shape[a]
    coordinate = _coordinate(names[a], mesh_shape) if names[a] else 0
    index = index[..., None] * (local * ways) + (
      coordinate * local + jnp.arange(local, dtype=jnp.int32)
    )
  return index.reshape(-1)


class _Split:
  """How one device's block of a group splits into segments, and the
  collectives that combine the segments' partial results (see the module
  docstring). ``B`` segments per local group, ``G`` local groups; the
  layout's groups are ``(B, G)`` flattened."""

  def __init__(
    self,
    other: tuple[int, ...],
    local_shape: tuple[int, ...],
    names: tuple[AxisNames, ...],
    mesh_shape: dict,
    num_groups: int,
  ) -> None:
    sharded = [i for i, a in enumerate(other) if names[a]]
    self.last = sharded[-1]
    # Segments: one per index of the block along o_1 .. o_(t-1).
    self.outer = tuple(local_shape[a] for a in other[: self.last])
    self.blocks = math.prod(self.outer)
    # Mesh axes that split the segments of a group, and their grid.
    self.axis_names = tuple(n for a in other[: self.last + 1] for n in names[a])
    self.ways = tuple(
      math.prod(mesh_shape[n] for n in names[a]) for a in other[: self.last + 1]
    )
    self.coordinates = tuple(
      _coordinate(names[a], mesh_shape) if names[a] else jnp.int32(0)
      for a in other[: self.last + 1]
    )
    self.num_groups = num_groups

  def _spread(self, per_group: jax.Array) -> jax.Array:
    """``(G, ...)`` -> every segment of each group, ``(B * G, ...)``."""
    return jnp.tile(per_group, (self.blocks,) + (1,) * (per_group.ndim - 1))

  def _by_block(self, v: jax.Array) -> jax.Array:
    return v.reshape(self.blocks, self.num_groups)

  def group_max(self, m: jax.Array) -> jax.Array:
    local = jnp.max(self._by_block(m), axis=0)
    return self._spread(lax.pmax(local, self.axis_names))

  def limb_total(self, limbs: list[jax.Array]) -> list[jax.Array]:
    # Normalized limbs are below 2**16: sum the blocks exactly, then the
    # devices (fewer than 2**15 of them), then carry.
    local = _sampling._limb_total([self._by_block(v) for v in limbs])
    total = lax.psum(jnp.stack(local), self.axis_names)
    return [self._spread(v) for v in _sampling._normalize(list(total))]

  def offsets(
    self, whole: jax.Array, frac: jax.Array, nonzero: jax.Array
  ) -> tuple[jax.Array, ...]:
    fields = jnp.stack(
      [
        lax.bitcast_convert_type(self._by_block(whole), jnp.uint32),
        self._by_block(frac),
        self._by_block(nonzero).astype(jnp.uint32),
      ]
    )
    # (devices along the axes, 3, B, G): devices row-major over axis_names,
    # that is over this block's coordinates c_1 .. c_t.
    gathered = lax.all_gather(fields, self.axis_names, axis=0, tiled=False)
    t = self.last
    grid = gathered.reshape(self.ways + (3,) + self.outer + (self.num_groups,))
    # The group's order of segments: (c_1, j_1, ..., c_(t-1), j_(t-1), c_t).
    order = []
    for i in range(t):
      order += [i, t + 2 + i]
    order += [t]
    ordered = jnp.transpose(grid, (t + 1, *order, grid.ndim - 1))
    shape = ordered.shape[1:]
    flat = ordered.reshape(3, -1, self.num_groups)
    seg_whole = lax.bitcast_convert_type(flat[0], jnp.int32)
    start_whole, start_frac, end_whole, end_frac = _sampling.exclusive_prefix(
      seg_whole, flat[1]
    )
    position = lax.broadcasted_iota(jnp.int32, flat[2].shape, 0)
    last = jnp.max(jnp.where(flat[2] > 0, position, -1), axis=0)
    holds_last = (position == last[None]) & (last[None] >= 0)

    def mine(v: jax.Array) -> jax.Array:
      """This device's segments, ``(B * G,)``, of a value per segment."""
      v = v.reshape(shape)
      index = []
      for i in range(t):
        index += [self.coordinates[i], slice(None)]
      index += [self.coordinates[t]]
      return v[tuple(index)].reshape(-1)

    return (
      mine(start_whole),
      mine(start_frac),
      self._spread(end_whole),
      self._spread(end_frac),
      mine(holds_last),
    )


def _local_counts(
  x: jax.Array,
  key: PRNGKey,
  num_samples: _sampling.SampleAmount,
  axes: tuple[int, ...],
  sampler: Sampler,
  dtype: np.dtype,
  names: tuple[AxisNames, ...],
  mesh_shape: dict,
) -> tuple[jax.Array, jax.Array]:
  """One device's counts and scales of its block ``x`` of the tensor."""
  other = tuple(a for a in range(x.ndim) if a not in axes)
  local_groups = math.prod(x.shape[a] for a in axes)
  split = (
    _Split(other, x.shape, names, mesh_shape, local_groups)
    if any(names[a] for a in other)
    else None
  )
  blocks = split.blocks if split else 1
  group_names = tuple(n for a in other for n in names[a])
  # (B, L_seg, G) -> the layout's (L_seg, B * G): a segment is a group.
  grouped = jnp.transpose(x, other + axes).reshape(blocks, -1, local_groups)
  grouped = jnp.swapaxes(grouped, 0, 1).reshape(grouped.shape[1], -1)
  wide = jnp.finfo(x.dtype).bits > 32
  if wide:  # as _groups does for float64, with the whole group's largest
    group_max = jnp.max(
      jnp.abs(grouped).reshape(-1, blocks, local_groups), axis=(0, 1)
    )
    if group_names:
      group_max = lax.pmax(group_max, group_names)
    _, exponent = jnp.frexp(jnp.where(group_max > 0, group_max, 1.0))
    grouped = jnp.ldexp(grouped, jnp.tile(-exponent, blocks)[None])
  grouped = grouped.astype(jnp.float32)
  index = _global_group_index(x.shape, axes, names, mesh_shape)
  keys = jax.vmap(jax.random.fold_in, (None, 0))(key, index.astype(jnp.uint32))
  draws = _sampling.group_draws(keys, sampler)
  draws = jnp.tile(draws, (blocks,) + (1,) * (draws.ndim - 1))
  segments = (
    _sampling.Segments(split.group_max, split.limb_total, split.offsets)
    if split
    else None
  )
  counts, scale = _sampling.counts_of_layout(
    _sampling.pack(grouped),
    draws,
    num_samples,
    sampler,
    dtype,
    segments=segments,
  )
  counts = _sampling.unpack(counts, grouped.shape[0])
  counts = jnp.swapaxes(counts.reshape(-1, blocks, local_groups), 0, 1)
  counts = counts.reshape(
    tuple(x.shape[a] for a in other) + tuple(x.shape[a] for a in axes)
  )
  counts = jnp.transpose(counts, tuple(np.argsort(other + axes)))
  scale = scale[:local_groups]
  if wide:
    scale = jnp.ldexp(scale.astype(x.dtype), exponent)
  scale_shape = tuple(x.shape[a] if a in axes else 1 for a in range(x.ndim))
  return counts, scale.reshape(scale_shape)


def _sample(
  x: jax.Array,
  key: PRNGKey,
  num_samples: _sampling.SampleAmount,
  axes: tuple[int, ...],
  sampler: Sampler,
  dtype: np.dtype,
  mesh: MeshLike,
  names: tuple[AxisNames, ...],
) -> tuple[jax.Array, jax.Array]:
  mesh_shape = dict(mesh.shape)
  spec = PartitionSpec(*(n or None for n in names))
  scale_spec = PartitionSpec(
    *(names[a] or None if a in axes else None for a in range(x.ndim))
  )
  local = functools.partial(
    _local_counts,
    num_samples=num_samples,
    axes=axes,
    sampler=sampler,
    dtype=dtype,
    names=names,
    mesh_shape=mesh_shape,
  )
  return jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(spec, PartitionSpec()),
    out_specs=(spec, scale_spec),
  )(x, key)


_sample_jit = jax.jit(_sample, static_argnums=(2, 3, 4, 5, 6, 7))


def sample_grouped(
  x: jax.Array,
  key: PRNGKey,
  num_samples: _sampling.SampleAmount,
  axes: tuple[int, ...],
  sampler: Sampler,
  dtype: DTypeLike,
  mesh: MeshLike,
  names: tuple[AxisNames, ...],
) -> tuple[jax.Array, jax.Array]:
  """Counts and scales of ``x``, sharded over ``mesh`` as ``names`` say,
  computed shard by shard: the same integers and scales as on one device,
  with the values sharded like ``x`` and the scales along its group axes.

  Args:
    x: the tensor (concrete, or traced with an explicit-axes sharding).
    key: the tensor's key (replicated).
    num_samples: ``N`` per group.
    axes: the group axes, sorted.
    sampler: one of ``_sampling.SAMPLERS``.
    dtype: integer dtype of the values.
    mesh: the mesh ``x`` is sharded over.
    names: per axis of ``x``, the mesh axes sharding it.
  """
  args = (
    _sampling.static_amount(num_samples),
    axes,
    sampler,
    np.dtype(dtype),
    mesh,
    names,
  )
  if isinstance(x, jax.core.Tracer) or isinstance(key, jax.core.Tracer):
    return _sample(x, key, *args)
  return _sample_jit(x, key, *args)


def _key_is_split(key: PRNGKey) -> bool:
  """Whether ``key`` is split over devices (it must be whole on each)."""
  if isinstance(key, jax.core.Tracer):
    try:
      spec = jax.typeof(key).sharding.spec
    except Exception:
      return False
    return any(e is not None for e in spec)
  sharding = getattr(key, "sharding", None)
  return sharding is not None and not sharding.is_fully_replicated


def validate(x: jax.Array, key: PRNGKey, what: str, sort: bool = False) -> None:
  """Raises ``ValueError`` naming ``what`` (a leaf, a layer's input) for a
  sharding the sampler cannot follow: a mesh axis that does not divide the
  axis it shards, ``sort`` on a split tensor, or a key split over devices.
  """
  if _key_is_split(key):
    raise ValueError(
      f"the key used for {what} is split over devices"
      f" ({getattr(key, 'sharding', None)}); pass a replicated key (each"
      " device needs the whole key)"
    )
  found = mesh_axes(x)
  if found is None:
    return
  mesh, names = found
  check_divisible(x.shape, names, dict(mesh.shape), what)
  if sort:
    raise ValueError(
      f"{what} is sharded over devices ({names}); sort=True orders each"
      " group's values by magnitude, which needs the whole group on one"
      " device: pass sort=False, or gather the leaf first"
    )


# Factor names of the sharding rule: a leaf's axes, the key's data, and the
# scales' unit axes.
_LEAF_FACTORS = "abcdefghij"
_UNIT_FACTORS = "mnopqrstuv"


@functools.cache
def _partitioned(
  num_samples: _sampling.SampleAmount,
  axes: tuple[int, ...],
  sampler: Sampler,
  dtype: np.dtype,
  ndim: int,
  impl: object,
) -> Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
  """The sampler of a traced leaf whose sharding the trace does not show
  (auto-axes meshes under ``jit``), as an op that XLA's partitioner hands
  back to us with its operands' shardings: it then runs shard by shard like
  :func:`sample_grouped`. Under ``vmap`` it runs the one-device program."""
  from jax.experimental.custom_partitioning import custom_partitioning

  from mcq_jax import _groups  # imports this module

  def key_of(data: jax.Array) -> PRNGKey:
    return data if impl is None else jax.random.wrap_key_data(data, impl=impl)

  def one_device(x: jax.Array, data: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _groups._sample_grouped(
      x, key_of(data), num_samples, axes, sampler, False, dtype
    )

  def shardings(
    mesh: Mesh, spec: Sequence[object]
  ) -> tuple[NamedSharding, NamedSharding]:
    spec = tuple(spec) + (None,) * (ndim - len(spec))
    scale = tuple(e if a in axes else None for a, e in enumerate(spec))
    return NamedSharding(mesh, PartitionSpec(*spec)), NamedSharding(
      mesh, PartitionSpec(*scale)
    )

  def infer(mesh: Mesh, arg_shapes: Any, result_shape: Any) -> Any:
    del result_shape
    return shardings(mesh, arg_shapes[0].sharding.spec)

  def partition(mesh: Mesh, arg_shapes: Any, result_shape: Any) -> Any:
    del result_shape
    values, scale = shardings(mesh, arg_shapes[0].sharding.spec)
    names = tuple(_entry_names(e) for e in values.spec)
    check_divisible(arg_shapes[0].shape, names, dict(mesh.shape), "a leaf")

    def lower(x: jax.Array, data: jax.Array) -> tuple[jax.Array, jax.Array]:
      return _local_counts(
        x,
        key_of(data),
        num_samples,
        axes,
        sampler,
        dtype,
        names,
        dict(mesh.shape),
      )

    replicated = NamedSharding(mesh, PartitionSpec())
    return mesh, lower, (values, scale), (values, replicated)

  op = custom_partitioning(one_device)
  leaf = " ".join(_LEAF_FACTORS[:ndim])
  scale = " ".join(
    _LEAF_FACTORS[a] if a in axes else _UNIT_FACTORS[a] for a in range(ndim)
  )
  op.def_partition(
    partition,
    infer_sharding_from_operands=infer,
    sharding_rule=f"{leaf}, z -> {leaf}, {scale}",
  )

  @jax.custom_batching.custom_vmap
  def run(x: jax.Array, data: jax.Array) -> tuple[jax.Array, jax.Array]:
    return op(x, data)

  @run.def_vmap
  def _(axis_size: int, batched: Any, x: jax.Array, data: jax.Array) -> Any:
    del axis_size
    in_axes = tuple(0 if b else None for b in batched)
    out = jax.vmap(one_device, in_axes=in_axes)(x, data)
    return out, (True, True)

  return run


def sample_partitioned(
  x: jax.Array,
  key: PRNGKey,
  num_samples: _sampling.SampleAmount,
  axes: tuple[int, ...],
  sampler: Sampler,
  dtype: DTypeLike,
) -> tuple[jax.Array, jax.Array]:
  """:func:`sample_grouped` for a traced leaf whose sharding is not in its
  type (an auto-axes mesh under ``jit``): the partitioner tells it at
  compile time. The same integers and scales as on one device."""
  typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  impl = jax.random.key_impl(key) if typed else None
  data = jax.random.key_data(key) if typed else key
  run = _partitioned(
    _sampling.static_amount(num_samples),
    axes,
    sampler,
    np.dtype(dtype),
    x.ndim,
    impl,
  )
  return run(x, data)
