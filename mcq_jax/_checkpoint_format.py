"""The quantized checkpoint format: a pytree as named tensors plus JSON.

A tree is stored as

* one tensor per array leaf, named by its ``/``-joined path
  (``"params/Dense_0/bias"``);
* two tensors per :class:`~mcq_jax.QArray` leaf ``NAME``: its integer values
  and its float32 scale (``NAME.values`` / ``NAME.scale`` in a safetensors
  file; ``NAME/values`` / ``NAME/scale`` in an orbax checkpoint);
* one JSON document (:data:`METADATA_KEY`) holding the tree's structure (so no
  target is needed to restore it) and every ``QArray``'s static metadata.

This module knows nothing of files: it turns a tree into ``(structure,
tensors)`` and back, and validates what it is given on the way back, so that a
truncated, edited or mismatched file raises an error naming the tensor rather
than loading as a different tree.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax.core import frozen_dict

from mcq_jax import _blocks
from mcq_jax._qarray import QArray
from mcq_jax._typing import PyTree

# The key of our JSON document: in a safetensors header's ``__metadata__`` and
# in an orbax checkpoint's custom metadata.
METADATA_KEY = "mcq_jax"
FORMAT_VERSION = 1
# The two tensors of a quantized leaf.
PARTS = ("values", "scale")

_METHODS = ("mcq", "round_to_nearest", "stochastic_rounding")
_SAMPLERS = ("systematic", "stratified", "iid", "deterministic")


class CheckpointFormatError(ValueError):
  """A checkpoint that is not a valid quantized checkpoint of this format."""


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One stored tensor of a flattened tree.

  Attributes:
    leaf: the ``/``-joined path of the pytree leaf it belongs to.
    part: ``"values"`` or ``"scale"`` for a ``QArray``; ``None`` for a plain
      array leaf.
    array: the data (a numpy or jax array, or anything with ``shape`` and
      ``dtype`` when only the layout is needed).
  """

  leaf: str
  part: str | None
  array: Any


class TensorSource:
  """The named tensors of a checkpoint on disk, read one at a time.

  Subclasses (one per container) fill ``path``, ``metadata`` (the container's
  string metadata: a safetensors header's ``__metadata__``, an orbax
  checkpoint's custom metadata) and ``_layout`` (each tensor's shape and
  dtype, in storage order, known without reading data), and implement
  :meth:`read`.
  """

  path: str
  metadata: dict[str, Any]
  _layout: dict[str, tuple[tuple[int, ...], np.dtype]]

  @property
  def names(self) -> list[str]:
    """Every tensor name, in storage order."""
    return list(self._layout)

  def layout(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """``(shape, dtype)`` of a tensor (no data read)."""
    return self._layout[name]

  def read(self, name: str) -> np.ndarray:
    """One tensor's data; no other tensor is read."""
    raise NotImplementedError


def _leaf_array(leaf: Any, name: str) -> Any:
  """A leaf as an array; Python and numpy scalars become 0-d arrays."""
  if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
    return leaf
  if isinstance(leaf, (bool, int, float, np.generic)):
    return np.asarray(leaf)
  raise TypeError(
    f"leaf {name!r}: cannot store a {type(leaf).__name__}; a checkpoint holds"
    " arrays, numbers and QArrays"
  )


def qarray_metadata(q: QArray) -> dict[str, Any]:
  """The static fields of ``q`` as JSON-ready values."""
  return {
    "shape": list(q.shape),
    "method": q.method,
    "samples": int(q.samples),
    "samples_per_value": (
      None if q.samples_per_value is None else float(q.samples_per_value)
    ),
    "sampler": q.sampler,
    "channel_axes": list(q.channel_axes),
    "sort": bool(q.sort),
    "dtype": jnp.dtype(q.dtype).name,
    "bits": q.bits,
    "refit_scale": bool(q.refit_scale),
    "group_size": q.group_size,
  }


def flatten(tree: PyTree) -> tuple[dict[str, Any], list[Tensor]]:
  """Splits ``tree`` into its JSON structure and its tensors, in order.

  Containers may be dicts (string keys), ``FrozenDict`` s, lists, tuples and
  ``None``; leaves may be arrays, numbers and :class:`~mcq_jax.QArray` s.

  Args:
    tree: the tree to store.

  Returns:
    The structure (a JSON-ready dict) and the list of tensors.

  Raises:
    TypeError: for another container type or leaf type, naming its path.
    ValueError: if two leaves would be stored under the same name.
  """
  tensors: list[Tensor] = []
  names: dict[str, tuple[str, ...]] = {}

  def leaf_name(path: tuple[str, ...]) -> str:
    name = "/".join(path) or "<root>"
    if name in names:
      raise ValueError(
        f"leaves {names[name]} and {path} would both be stored as {name!r}:"
        " rename a key so that the '/'-joined paths differ"
      )
    names[name] = path
    return name

  def visit(node: Any, path: tuple[str, ...]) -> dict[str, Any]:
    if node is None:
      return {"none": None}
    if isinstance(node, QArray):
      name = leaf_name(path)
      tensors.append(Tensor(name, "values", node.values))
      tensors.append(Tensor(name, "scale", node.scale))
      return {"qarray": name, **qarray_metadata(node)}
    if isinstance(node, (dict, frozen_dict.FrozenDict)):
      for key in node:
        if not isinstance(key, str):
          raise TypeError(
            f"key {key!r} at {'/'.join(path) or '<root>'!r}: checkpoint keys"
            f" must be strings, got {type(key).__name__}"
          )
      kind = "dict" if isinstance(node, dict) else "frozen_dict"
      return {kind: {k: visit(v, (*path, k)) for k, v in node.items()}}
    if isinstance(node, (list, tuple)) and not hasattr(node, "_fields"):
      kind = "list" if isinstance(node, list) else "tuple"
      return {kind: [visit(v, (*path, str(i))) for i, v in enumerate(node)]}
    if isinstance(node, Mapping) or hasattr(node, "tree_flatten"):
      raise TypeError(
        f"{'/'.join(path) or '<root>'!r} is a {type(node).__name__}: a"
        " checkpoint stores dicts, lists, tuples and FrozenDicts of arrays"
        " (convert an nnx.State with .to_pure_dict(), a struct with"
        " flax.serialization.to_state_dict)"
      )
    name = leaf_name(path)
    tensors.append(Tensor(name, None, _leaf_array(node, name)))
    return {"array": name}

  structure = visit(tree, ())
  return structure, tensors


def metadata_document(structure: dict[str, Any]) -> str:
  """The JSON document stored under :data:`METADATA_KEY`."""
  from mcq_jax import __version__

  return json.dumps(
    {
      "format": METADATA_KEY,
      "format_version": FORMAT_VERSION,
      "library_version": __version__,
      "tree": structure,
    },
    separators=(",", ":"),
  )


def parse_metadata_document(text: str, where: str) -> dict[str, Any]:
  """The tree structure of a metadata document, checked for our format.

  Args:
    text: the JSON document.
    where: the file, for error messages.

  Returns:
    The ``tree`` structure.

  Raises:
    CheckpointFormatError: if the document is not JSON of a format version
      this library reads.
  """
  try:
    doc = json.loads(text)
  except json.JSONDecodeError as e:
    raise CheckpointFormatError(
      f"{where}: the {METADATA_KEY!r} metadata is not valid JSON ({e})"
    ) from e
  if not isinstance(doc, dict) or doc.get("format") != METADATA_KEY:
    raise CheckpointFormatError(
      f"{where}: the {METADATA_KEY!r} metadata does not describe an"
      f" {METADATA_KEY} checkpoint"
    )
  version = doc.get("format_version")
  if version != FORMAT_VERSION:
    raise CheckpointFormatError(
      f"{where}: format version {version!r}; this mcq_jax reads version"
      f" {FORMAT_VERSION} (a newer mcq_jax may have written it)"
    )
  tree = doc.get("tree")
  if not isinstance(tree, dict):
    raise CheckpointFormatError(f"{where}: the metadata has no tree structure")
  return tree


def iter_leaves(structure: dict[str, Any]) -> Iterator[dict[str, Any]]:
  """The leaf nodes (``array`` / ``qarray``) of a structure, in order."""
  if "array" in structure or "qarray" in structure:
    yield structure
    return
  for kind in ("dict", "frozen_dict"):
    if kind in structure:
      for child in structure[kind].values():
        yield from iter_leaves(child)
      return
  for kind in ("list", "tuple"):
    if kind in structure:
      for child in structure[kind]:
        yield from iter_leaves(child)
      return


def expected_tensors(structure: dict[str, Any]) -> list[tuple[str, str | None]]:
  """The ``(leaf, part)`` pairs a structure says the file holds."""
  out: list[tuple[str, str | None]] = []
  for node in iter_leaves(structure):
    if "qarray" in node:
      out += [(node["qarray"], part) for part in PARTS]
    else:
      out.append((node["array"], None))
  return out


def _int_list(value: Any) -> bool:
  return isinstance(value, list) and all(
    isinstance(v, int) and not isinstance(v, bool) for v in value
  )


def check_qarray_node(node: dict[str, Any], name: str) -> None:
  """The static metadata of one quantized leaf is present and consistent."""

  def bad(problem: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"tensor {name!r}: {problem}")

  for field in ("shape", "method", "samples", "channel_axes", "dtype"):
    if field not in node:
      raise bad(f"metadata field {field!r} is missing")
  if not _int_list(node["shape"]) or min(node["shape"], default=0) < 0:
    raise bad(f"shape {node['shape']!r} is not a list of sizes")
  if node["method"] not in _METHODS:
    raise bad(f"unknown method {node['method']!r}")
  samples = node["samples"]
  if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
    raise bad(f"samples {samples!r} is not a count")
  blocks = node.get("group_size")
  if blocks is not None and (
    not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 1
  ):
    raise bad(f"group_size {blocks!r} is not a block length >= 1")
  bits = node.get("bits")
  if bits is not None and (
    not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 32
  ):
    raise bad(f"bits {bits!r} is not a bit width in [2, 32]")
  if node["method"] == "mcq":
    if node.get("sampler") not in _SAMPLERS:
      raise bad(f"unknown sampler {node.get('sampler')!r}")
    if samples < 1:
      raise bad("an MCQ leaf must record at least one sample")
  ndim = len(node["shape"])
  axes = node["channel_axes"]
  if (
    not _int_list(axes)
    or len(set(axes)) != len(axes)
    or any(not 0 <= a < ndim for a in axes)
  ):
    raise bad(f"channel_axes {axes!r} are not distinct axes of rank {ndim}")
  try:
    dtype = jnp.dtype(node["dtype"])
  except TypeError as e:
    raise bad(f"unknown dtype {node['dtype']!r}") from e
  if not jnp.issubdtype(dtype, jnp.floating):
    raise bad(f"dtype {node['dtype']!r} is not a floating dtype")


def check_tensor_layout(
  node: dict[str, Any], part: str | None, shape: tuple[int, ...], dtype: Any
) -> None:
  """A stored tensor's shape and dtype agree with its leaf's metadata
  (which :func:`check_qarray_node` has checked).

  Args:
    node: the leaf's node in the structure.
    part: ``"values"``, ``"scale"`` or ``None``.
    shape: the stored tensor's shape.
    dtype: the stored tensor's dtype.

  Raises:
    CheckpointFormatError: naming the tensor and what disagrees.
  """
  if part is None:
    return
  name = node["qarray"]
  full = f"{name}.{part}"
  expected = tuple(node["shape"])
  dtype = np.dtype(dtype)
  if part == "values":
    if shape != expected:
      raise CheckpointFormatError(
        f"tensor {full!r} has shape {shape}, its metadata says {expected}"
      )
    if dtype.kind != "i":
      raise CheckpointFormatError(
        f"tensor {full!r} has dtype {dtype.name}; values are signed integers"
      )
    # No width is required: quantize stores concrete values in the narrowest
    # dtype that holds their largest count (int8 for N far beyond 127).
    return
  axes = tuple(node["channel_axes"])
  blocks = node.get("group_size")
  want = (
    tuple(d if a in axes else 1 for a, d in enumerate(expected))
    if blocks is None
    else _blocks.scale_shape(expected, axes, blocks)
  )
  if shape != want:
    raise CheckpointFormatError(
      f"tensor {full!r} has shape {shape}; channel axes {axes}"
      + ("" if blocks is None else f" in blocks of {blocks}")
      + f" of a {expected} leaf need {want}"
    )
  # Scales are float32, or float64 for a float64 leaf (see QArray.scale).
  allowed = {"float32"} | ({"float64"} if node["dtype"] == "float64" else set())
  if dtype.name not in allowed:
    raise CheckpointFormatError(
      f"tensor {full!r} has dtype {dtype.name}; scales are float32 (float64"
      " for a float64 leaf)"
    )


def check_qarray_values(
  node: dict[str, Any], values: np.ndarray, scale: np.ndarray
) -> None:
  """The data of a quantized leaf is what its metadata promises.

  Scales are finite and non-negative; an MCQ leaf's hit counts sum to its
  recorded number of samples in every group; a grid baseline's values fit
  their dtype's symmetric range.

  Raises:
    CheckpointFormatError: naming the tensor and the first group that fails.
  """
  name = node["qarray"]
  if not np.all(np.isfinite(scale)) or np.any(scale < 0):
    raise CheckpointFormatError(
      f"tensor {name + '.scale'!r} holds negative or non-finite scales"
    )
  if node["method"] != "mcq" or not values.size:
    return
  axes = tuple(node["channel_axes"])
  magnitudes = np.abs(values.astype(np.int64))
  blocks = node.get("group_size")
  totals = _blocks.group_totals(magnitudes, axes, blocks)
  if blocks is None:  # groups indexed by their channel axes in messages
    totals = totals.reshape(tuple(values.shape[a] for a in axes))
    scale = np.reshape(scale, totals.shape)
  else:  # one total per block, in the order of the scales' columns
    scale = np.asarray(_blocks.column_scales(jnp.asarray(scale), axes))
  # A group draws its N: the recorded one, or with a bit budget its own, at
  # most the recorded bound. A group with no mass (scale 0) draws nothing.
  samples = node["samples"]
  bits = node.get("bits")
  if bits is None:
    wrong = totals != samples
    recorded = f"the metadata records {samples} samples"
  else:
    wrong = (totals < 1) | (totals > samples)
    recorded = f"the metadata bounds them by {samples} samples"
  empty = scale == 0
  bad = np.argwhere(wrong & ~(empty & (totals == 0)))
  if bad.size:
    group = tuple(int(i) for i in bad[0])
    raise CheckpointFormatError(
      f"tensor {name + '.values'!r}: the hit counts of group {group} sum to"
      f" {int(totals[tuple(bad[0])])}, {recorded} ({len(bad)} of"
      f" {math.prod(totals.shape) or 1} groups disagree): the file was"
      " edited or is corrupt"
    )
  if bits is not None and magnitudes.max() > 2 ** (bits - 1) - 1:
    raise CheckpointFormatError(
      f"tensor {name + '.values'!r} holds {int(magnitudes.max())}, beyond"
      f" its {bits}-bit budget: the file was edited or is corrupt"
    )


def qarray_from_node(node: dict[str, Any], values: Any, scale: Any) -> QArray:
  """The ``QArray`` a validated node and its two tensors describe."""
  spv = node.get("samples_per_value")
  return QArray(
    values=values,
    scale=scale,
    method=node["method"],
    samples=node["samples"],
    samples_per_value=None if spv is None else float(spv),
    sampler=node.get("sampler"),
    channel_axes=tuple(node["channel_axes"]),
    sort=bool(node.get("sort", False)),
    dtype=jnp.dtype(node["dtype"]),
    bits=node.get("bits"),
    refit_scale=bool(node.get("refit_scale", False)),
    group_size=node.get("group_size"),
  )


def unflatten(
  structure: dict[str, Any],
  leaf: Callable[[dict[str, Any]], Any],
  where: str,
) -> PyTree:
  """Rebuilds a tree from its structure; ``leaf(node)`` makes each leaf.

  Raises:
    CheckpointFormatError: for a node of no known kind.
  """

  def build(node: Any) -> Any:
    if not isinstance(node, dict) or len(node) < 1:
      raise CheckpointFormatError(f"{where}: malformed tree node {node!r}")
    if "array" in node or "qarray" in node:
      return leaf(node)
    if "none" in node:
      return None
    if "dict" in node:
      return {k: build(v) for k, v in node["dict"].items()}
    if "frozen_dict" in node:
      return frozen_dict.FrozenDict(
        {k: build(v) for k, v in node["frozen_dict"].items()}
      )
    if "list" in node:
      return [build(v) for v in node["list"]]
    if "tuple" in node:
      return tuple(build(v) for v in node["tuple"])
    raise CheckpointFormatError(f"{where}: unknown tree node {node!r}")

  return build(structure)
