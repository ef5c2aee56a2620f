"""The quantized leaf: signed integer hit counts and the scale that decodes
them."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from flax import struct
from flax.core import meta

from mcq_jax import _blocks
from mcq_jax._typing import DTypeLike, Method, PyTree, Sampler

# The QArrays read through ``__getitem__`` during one ``mcq_call`` (``None``
# outside it). Inside ``nnx.scan`` / ``nnx.vmap`` a layer reads the slice of
# its stacked kernel that belongs to the current iteration, which only this
# read can show: the contraction it calls next receives the dequantized float.
_READS: contextvars.ContextVar[list[QArray] | None] = contextvars.ContextVar(
  "mcq_jax_qarray_reads", default=None
)


@struct.dataclass
class QArray(meta.AxisMetadata):
  """A tensor quantized by MCQ: ``dequantized = values * scale``.

  One type for every granularity: ``scale`` has the rank of ``values`` and
  broadcasts against it (all ones for ``per_tensor``; the channel axes keep
  their size for ``per_channel``). Everything but ``values`` and ``scale`` is
  static metadata, so a ``QArray`` passes through ``jit``, ``vmap`` and
  ``tree_map`` like any Flax pytree node.

  It is also a Flax ``AxisMetadata`` box whose unboxed value is the
  dequantized float array: a linen module reading a quantized parameter with
  ``self.param`` sees ``values * scale``, so ``model.apply({"params":
  params_q}, x)`` runs any model on its quantized weights, in float.
  :func:`mcq_jax.mcq_apply` reads the box itself to compute in integers.

  Attributes:
    values: signed integer values ``sign(w) * hit_count``, in the smallest
      integer dtype that holds them: the one that holds ``samples`` (a
      static bound) when the values are computed under a trace, and the one
      that holds their actual largest magnitude when :func:`mcq_jax.quantize`
      runs on concrete arrays (typically int8: the same integers, in a
      quarter of int32's memory, and the fastest contraction in
      :func:`mcq_jax.mcq_apply`).
    scale: ``sum(|w|) / samples`` of each group, broadcastable against
      ``values``: float32 (float64 for float64 leaves, whose scales may lie
      beyond float32's range).
    method: what produced the values: ``"mcq"`` (:func:`mcq_jax.quantize`,
      :func:`mcq_jax.quantize_activations`), ``"round_to_nearest"``
      (:func:`mcq_jax.round_to_nearest`) or ``"stochastic_rounding"``
      (:func:`mcq_jax.stochastic_rounding`).
    samples: ``N``, the number of samples drawn per group (0 for the grid
      baselines, which draw none). With a bit budget (``bits``), each group
      draws its own ``N`` (the sum of its ``|values|``) and ``samples`` is a
      static bound on all of them.
    samples_per_value: ``K``, the sampling amount that gave
      ``N = max(1, round(K n))``: ``samples_per_weight`` for weights,
      ``activation_samples`` for activations; ``None`` for the baselines.
    sampler: ``"systematic"``, ``"stratified"`` or ``"iid"`` for MCQ;
      ``None`` for the baselines.
    channel_axes: axes of ``values`` that index groups (``()`` per tensor).
    sort: whether the CDF was built over values sorted by magnitude.
    dtype: the floating dtype of the original leaf, restored by
      :func:`mcq_jax.dequantize`.
    bits: the bit budget the values were drawn for: every value lies in
      ``[-(2**(bits - 1) - 1), 2**(bits - 1) - 1]`` (``quantize(...,
      bits=b)`` and the grid baselines); ``None`` when the values were drawn
      for a number of samples per value instead.
    refit_scale: whether ``scale`` is each group's least-squares fit
      ``<w, q> / <q, q>`` (biased) rather than ``sum(|w|) / N``.
    group_size: with sub-channel blocks, their length: each group of the
      channel axes is split into blocks of this many consecutive values (in
      the row-major order of the other axes), each with its own scale, and
      the first of the other axes of ``scale`` indexes the blocks (so
      ``scale`` no longer broadcasts against ``values``; :meth:`dequantize`
      expands it). ``None`` for whole groups.
  """

  values: jax.Array
  scale: jax.Array
  method: Method = struct.field(pytree_node=False)
  samples: int = struct.field(pytree_node=False)
  samples_per_value: float | None = struct.field(pytree_node=False)
  sampler: Sampler | None = struct.field(pytree_node=False)
  channel_axes: tuple[int, ...] = struct.field(pytree_node=False)
  sort: bool = struct.field(pytree_node=False)
  dtype: np.dtype = struct.field(pytree_node=False)
  bits: int | None = struct.field(pytree_node=False, default=None)
  refit_scale: bool = struct.field(pytree_node=False, default=False)
  group_size: int | None = struct.field(pytree_node=False, default=None)

  @property
  def shape(self) -> tuple[int, ...]:
    """The shape of ``values`` (and of the original leaf)."""
    return tuple(self.values.shape)

  @property
  def ndim(self) -> int:
    """The rank of ``values``."""
    return self.values.ndim

  @property
  def size(self) -> int:
    """The number of values."""
    return int(self.values.size)

  @property
  def granularity(self) -> str:
    """``"per_channel"`` if the leaf has channel axes, else ``"per_tensor"``."""
    return "per_channel" if self.channel_axes else "per_tensor"

  @property
  def max_abs_value(self) -> int:
    """A static bound on ``|values|``: a hit count never exceeds its group's
    ``samples`` nor the bit budget, and no value exceeds its dtype's
    range."""
    bound = int(np.iinfo(self.values.dtype).max)
    if self.bits is not None:
      bound = min(bound, 2 ** (self.bits - 1) - 1)
    if self.method == "mcq":
      bound = min(bound, self.samples)
    return bound

  @property
  def num_blocks(self) -> int:
    """How many blocks each group of the channel axes is split into (1
    without ``group_size``)."""
    if self.group_size is None:
      return 1
    return _blocks.block_count(self.shape, self.channel_axes, self.group_size)

  @property
  def num_groups(self) -> int:
    """How many independent distributions the leaf was sampled from."""
    groups = math.prod(self.values.shape[a] for a in self.channel_axes)
    return groups * self.num_blocks

  @property
  def value_scale(self) -> jax.Array:
    """Each value's scale, broadcastable against ``values`` (``scale`` itself
    but with ``group_size``, whose blocks it expands)."""
    if self.group_size is None:
      return self.scale
    return _blocks.expand(
      self.scale, self.shape, self.channel_axes, self.group_size
    )

  def dequantize(self, dtype: DTypeLike | None = None) -> jax.Array:
    """``values * scale`` in ``dtype`` (default: the original leaf's dtype)."""
    out = self.values.astype(self.scale.dtype) * self.value_scale
    return out.astype(self.dtype if dtype is None else dtype)

  def __getitem__(self, index: Any) -> jax.Array:
    """Indexing reads the dequantized values: NNX layers read their kernel as
    ``self.kernel[...]``, so a model holding ``QArray`` params runs in float on
    the dequantized weights."""
    reads = _READS.get()
    if reads is not None:
      reads.append(self)
    return self.dequantize()[index]

  # -- flax.core.meta.AxisMetadata: what linen sees through ``self.param`` --

  def unbox(self) -> jax.Array:
    """The dequantized values: what linen's ``self.param`` returns."""
    return self.dequantize()

  def replace_boxed(self, val: Any) -> Any:
    """Returns ``val`` itself: a float cannot be boxed back into counts."""
    # A float value cannot be put back into integer form without sampling
    # again; return it as is (the box is dropped, the value is kept).
    return val

  def add_axis(self, index: int, params: dict[str, Any]) -> QArray:
    """Shifts the channel axes past a new axis (linen's lifted transforms)."""
    del params
    axes = tuple(a + 1 if a >= index else a for a in self.channel_axes)
    return dataclasses.replace(self, channel_axes=axes)

  def remove_axis(self, index: int, params: dict[str, Any]) -> QArray:
    """Shifts the channel axes back over a removed axis."""
    del params
    axes = tuple(
      a - 1 if a > index else a for a in self.channel_axes if a != index
    )
    return dataclasses.replace(self, channel_axes=axes)


def is_qarray(x: object) -> bool:
  """Whether ``x`` is a :class:`QArray` (the ``is_leaf`` of tree maps)."""
  return isinstance(x, QArray)


def dequantize(tree: PyTree, dtype: DTypeLike | None = None) -> PyTree:
  """Replaces every :class:`QArray` in ``tree`` by its float reconstruction.

  Args:
    tree: a pytree, typically the output of :func:`mcq_jax.quantize`.
    dtype: output dtype of the reconstructed leaves; ``None`` restores each
      leaf's original dtype.

  Returns:
    A pytree of the same structure with float arrays in place of ``QArray``
    leaves; other leaves are returned as they are.

  Examples:
    >>> import jax, jax.numpy as jnp, mcq_jax
    >>> params = {"kernel": jnp.array([[0.5, -1.5], [0.0, 2.0]])}
    >>> q = mcq_jax.quantize(params, jax.random.key(0), samples_per_weight=2.0)
    >>> w_hat = mcq_jax.dequantize(q)
    >>> float(jnp.abs(w_hat["kernel"]).sum())  # the L1 mass is kept exactly
    4.0
  """
  return jax.tree_util.tree_map(
    lambda x: x.dequantize(dtype) if is_qarray(x) else x,
    tree,
    is_leaf=is_qarray,
  )


@contextlib.contextmanager
def recording_reads(reads: list[QArray]) -> Iterator[None]:
  """Appends to ``reads`` every ``QArray`` read through indexing inside the
  block (``mcq_call`` finds the slice of a stacked kernel this way)."""
  token = _READS.set(reads)
  try:
    yield
  finally:
    _READS.reset(token)
