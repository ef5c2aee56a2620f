"""``summary``: what a quantized pytree costs and how sparse it is."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from mcq_jax import _blocks, _paths
from mcq_jax._qarray import is_qarray


def bit_width(max_count: int) -> int:
  """Bits of a sign + magnitude integer of magnitude up to ``max_count``."""
  return 1 + math.ceil(math.log2(max_count + 1))


@dataclasses.dataclass(frozen=True)
class LeafSummary:
  """One leaf of a (partly) quantized pytree.

  Attributes:
    path: ``/``-joined path of the leaf.
    shape: shape of the leaf.
    dtype: dtype of the stored values (an integer dtype for quantized leaves).
    quantized: whether the leaf is a :class:`QArray`.
    groups: number of independent distributions (0 for float leaves).
    samples: total number of samples over all groups (0 for float leaves).
    samples_per_group: each group's ``N`` (the sum of its ``|values|``), in
      the row-major order of the channel axes, for MCQ leaves; ``()``
      otherwise. With a bit budget the groups draw different ``N``.
    bits: bits per value: ``1 + ceil(log2(max|value| + 1))`` for quantized
      leaves, the dtype's width otherwise.
    entropy_bits: empirical entropy of the leaf's integer values in bits per
      value (what an entropy coder with one code table per leaf would need);
      the dtype's width for float leaves.
    sparsity: fraction of values equal to zero.
    bytes: storage at ``bits`` per value, plus float32 scales.
    float32_bytes: storage of the same leaf in float32 (as-is for non-floats).
  """

  path: str
  shape: tuple[int, ...]
  dtype: str
  quantized: bool
  groups: int
  samples: int
  bits: int
  entropy_bits: float
  sparsity: float
  bytes: int
  float32_bytes: int
  samples_per_group: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Summary:
  """Per-leaf report and totals; ``str()`` gives a table."""

  leaves: tuple[LeafSummary, ...]

  @property
  def quantized(self) -> tuple[LeafSummary, ...]:
    """The summaries of the quantized leaves."""
    return tuple(leaf for leaf in self.leaves if leaf.quantized)

  @property
  def total_bytes(self) -> int:
    """Storage of the whole tree, quantized leaves at their bit-width."""
    return sum(leaf.bytes for leaf in self.leaves)

  @property
  def float32_bytes(self) -> int:
    """Storage of the same tree with every float leaf in float32."""
    return sum(leaf.float32_bytes for leaf in self.leaves)

  @property
  def compression(self) -> float:
    """``float32_bytes / total_bytes``."""
    return self.float32_bytes / self.total_bytes if self.total_bytes else 1.0

  def _per_quantized_value(self, field: str) -> float:
    """``field`` averaged over all quantized values (0 if there are none)."""
    q = self.quantized
    size = sum(math.prod(leaf.shape) for leaf in q)
    total = sum(getattr(leaf, field) * math.prod(leaf.shape) for leaf in q)
    return total / size if size else 0.0

  @property
  def mean_bits(self) -> float:
    """Bits per quantized value, averaged over all quantized values."""
    return self._per_quantized_value("bits")

  @property
  def mean_entropy_bits(self) -> float:
    """Entropy bits per quantized value, averaged over all quantized values."""
    return self._per_quantized_value("entropy_bits")

  @property
  def sparsity(self) -> float:
    """Fraction of zeros over all quantized values."""
    return self._per_quantized_value("sparsity")

  def __str__(self) -> str:
    header = (
      "path",
      "shape",
      "dtype",
      "groups",
      "samples",
      "bits",
      "H bits",
      "zeros",
      "bytes",
    )
    rows = [header]
    for leaf in self.leaves:
      rows.append(
        (
          leaf.path,
          "x".join(map(str, leaf.shape)) or "()",
          leaf.dtype,
          str(leaf.groups) if leaf.quantized else "-",
          _samples_cell(leaf),
          str(leaf.bits),
          f"{leaf.entropy_bits:.2f}" if leaf.quantized else "-",
          f"{leaf.sparsity:.1%}" if leaf.quantized else "-",
          str(leaf.bytes),
        )
      )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
      "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(self.totals)
    return "\n".join(lines)

  @property
  def totals(self) -> str:
    """The table's last line (bytes against float32, bits, entropy, zeros)."""
    return (
      f"total: {self.total_bytes} bytes vs {self.float32_bytes} in float32"
      f" ({self.compression:.2f}x smaller); quantized values: "
      f"{self.mean_bits:.2f} bits on average ({self.mean_entropy_bits:.2f} bits"
      f" of entropy), {self.sparsity:.1%} zeros"
    )


def _samples_cell(leaf: LeafSummary) -> str:
  """The table's samples column: the leaf's total, and the range of the
  groups' ``N`` when they differ (a bit budget)."""
  if not leaf.quantized:
    return "-"
  per_group = leaf.samples_per_group
  if per_group and min(per_group) != max(per_group):
    return f"{leaf.samples} ({min(per_group)}-{max(per_group)}/group)"
  return str(leaf.samples)


def entropy_bits(values: Any) -> float:
  """Empirical entropy, in bits per value, of an array of integers.

  Examples:
    >>> import numpy as np, mcq_jax
    >>> mcq_jax.entropy_bits(np.array([0, 0, 1, -1]))
    1.5
  """
  values = np.asarray(values)
  if not values.size:
    return 0.0
  _, counts = np.unique(values, return_counts=True)
  p = counts / values.size
  return float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0: no "-0.0"


def leaf_summary(name: str, leaf: Any) -> LeafSummary:
  """The :class:`LeafSummary` of one leaf (a ``QArray`` or an array)."""
  if is_qarray(leaf):
    values = np.asarray(leaf.values)
    # max and min rather than abs of a widened copy: no temporary arrays.
    max_count = max(int(values.max()), -int(values.min())) if values.size else 0
    bits = bit_width(max_count)
    per_group: tuple[int, ...] = ()
    if leaf.method == "mcq" and values.size:
      per_group = tuple(
        int(t)
        for t in _blocks.group_totals(
          values, leaf.channel_axes, leaf.group_size
        )
      )
    return LeafSummary(
      path=name,
      shape=leaf.shape,
      dtype=str(values.dtype),
      quantized=True,
      groups=leaf.num_groups,
      samples=(
        sum(per_group)
        if leaf.bits is not None and leaf.method == "mcq"
        else leaf.samples * leaf.num_groups
      ),
      samples_per_group=per_group,
      bits=bits,
      entropy_bits=entropy_bits(values),
      sparsity=float(np.mean(values == 0)) if values.size else 0.0,
      bytes=math.ceil(values.size * bits / 8) + 4 * int(np.size(leaf.scale)),
      float32_bytes=4 * values.size,
    )
  arr = np.asarray(leaf)
  is_float = (
    np.issubdtype(arr.dtype, np.floating) or str(arr.dtype) == "bfloat16"
  )
  return LeafSummary(
    path=name,
    shape=tuple(arr.shape),
    dtype=str(arr.dtype),
    quantized=False,
    groups=0,
    samples=0,
    bits=8 * arr.dtype.itemsize,
    entropy_bits=float(8 * arr.dtype.itemsize),
    sparsity=float(np.mean(arr == 0)) if arr.size else 0.0,
    bytes=arr.nbytes,
    float32_bytes=4 * arr.size if is_float else arr.nbytes,
  )


def summary(tree: Any) -> Summary:
  """Reports each leaf's bit-width, sparsity, samples and storage, with totals.

  Reads concrete values, so call it outside ``jit``. The bytes of a quantized
  leaf assume its values are packed at the leaf's bit-width (the storage a
  bit-packed file would need), plus one float32 scale per group; the values
  are held in memory in a wider integer dtype.

  Args:
    tree: a pytree, typically the output of :func:`mcq_jax.quantize`.

  Returns:
    A :class:`Summary`; ``print`` it for a table.

  Examples:
    >>> import jax, jax.numpy as jnp, mcq_jax
    >>> params = {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros((4,))}
    >>> q = mcq_jax.quantize(params, jax.random.key(0), samples_per_weight=1.0)
    >>> report = mcq_jax.summary(q)
    >>> report.leaves[1].path, report.leaves[1].bits, report.leaves[1].sparsity
    ('kernel', 2, 0.0)
    >>> report.float32_bytes
    144
  """
  return Summary(
    leaves=tuple(
      leaf_summary(name, leaf) for name, leaf in _paths.named_leaves(tree)
    )
  )
