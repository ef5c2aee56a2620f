"""``save``, ``load`` and ``quantize_checkpoint``: quantized trees on disk.

Two containers hold the same format (:mod:`mcq_jax._checkpoint_format`): a
``.safetensors`` file, readable by any safetensors reader, and an orbax
checkpoint directory. Every write goes to a temporary sibling of the
destination and is renamed into place when complete, so an interrupted write
never leaves a half-written checkpoint under the destination's name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import jax
import numpy as np

from mcq_jax import _checkpoint_format as fmt
from mcq_jax import (
  _orbax_io,
  _paths,
  _safetensors_io,
  _sampling,
  _summary,
  _validation,
)
from mcq_jax._qarray import QArray, is_qarray
from mcq_jax._quantize import DEFAULT_SAMPLES_PER_WEIGHT, quantize
from mcq_jax._typing import AxisLike, Granularity, PRNGKey, PyTree, Sampler
from mcq_jax._typing import Where as WhereType

Format = Literal["safetensors", "orbax"]
FORMATS: tuple[Format, ...] = ("safetensors", "orbax")
Source = fmt.TensorSource


def infer_format(path: str | os.PathLike[str], format: str | None) -> Format:
  """The container to write at ``path``: ``format``, else from the name.

  A name ending in ``.safetensors`` is a safetensors file; any other name is
  an orbax checkpoint directory.
  """
  if format is not None:
    _validation.check_choice("format", format, FORMATS)
    return format  # type: ignore[return-value]
  return "safetensors" if os.fspath(path).endswith(".safetensors") else "orbax"


def open_source(path: str | os.PathLike[str]) -> Source:
  """The tensors of a checkpoint, opened lazily (nothing read yet).

  Args:
    path: an orbax checkpoint directory, a ``.safetensors`` file or a
      directory of ``.safetensors`` shards (with or without an index).

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    ValueError: if it is none of the above, or cannot be read.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file or directory")
  if _orbax_io.is_checkpoint(path):
    return _orbax_io.OrbaxSource(path)
  if os.path.isdir(path):
    if any(f.endswith(".safetensors") for f in os.listdir(path)):
      return _safetensors_io.SafetensorsSource(path)
    raise ValueError(
      f"{path}: a directory that is neither an orbax checkpoint nor holds"
      " .safetensors files"
    )
  with open(path, "rb") as f:
    head = f.read(9)
  # A safetensors file starts with its header's length, then '{'.
  if len(head) == 9 and head[8:9] == b"{":
    return _safetensors_io.SafetensorsSource(path)
  raise ValueError(
    f"{path}: unknown format (expected a .safetensors file, a directory of"
    " them, or an orbax checkpoint directory)"
  )


def _metadata_text(source: Source) -> str | None:
  """Our JSON document in a checkpoint, if it has one."""
  value = source.metadata.get(fmt.METADATA_KEY)
  if value is None or isinstance(value, str):
    return value
  return json.dumps(value)  # orbax keeps custom metadata as JSON objects


def _orbax_keys(leaf: str, part: str | None) -> tuple[str, ...]:
  """The nested keys of a tensor in an orbax checkpoint."""
  keys = tuple(leaf.split("/"))
  return keys if part is None else (*keys, part)


def _stored_name(source_kind: Format, leaf: str, part: str | None) -> str:
  """The name under which a source of ``source_kind`` stores a tensor."""
  if source_kind == "safetensors":
    return leaf if part is None else f"{leaf}.{part}"
  return "/".join(_orbax_io.escape_key(k) for k in _orbax_keys(leaf, part))


def _tree_keys(source_kind: Format, name: str) -> list[str]:
  """The path of a source's tensor in the tree it loads as: its name split
  at ``/`` for orbax, the whole name for safetensors
  (``model.layers.0.weight`` is one key)."""
  return name.split("/") if source_kind == "orbax" else [name]


def _nested(items: Iterable[tuple[Sequence[str], Any]]) -> dict[str, Any]:
  """Nested dicts holding each value at its path of keys."""
  tree: dict[str, Any] = {}
  for keys, value in items:
    node = tree
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = value
  return tree


# -- atomic destinations -----------------------------------------------------


def _check_destination(path: str, overwrite: bool) -> None:
  if os.path.lexists(path) and not overwrite:
    raise FileExistsError(
      f"{path} exists; pass overwrite=True (--overwrite) to replace it"
    )
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    raise FileNotFoundError(f"{parent}: no such directory")


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.lexists(path):
    os.remove(path)


@contextlib.contextmanager
def _atomic_destination(path: str, overwrite: bool) -> Iterator[str]:
  """Yields a temporary sibling of ``path``; renames it to ``path`` on success.

  On any error the temporary file or directory (and orbax's staging
  directory) is removed and ``path`` is left as it was.
  """
  path = os.path.abspath(path)
  _check_destination(path, overwrite)
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
  try:
    yield tmp
    if os.path.isdir(tmp) or os.path.isdir(path):
      # A rename cannot replace a directory: move the old one aside first,
      # so that path names the old or the new, never neither for longer
      # than between two renames.
      old = None
      if os.path.lexists(path):
        old = f"{path}.old-{uuid.uuid4().hex[:12]}"
        os.rename(path, old)
      os.rename(tmp, path)
      if old is not None:
        _remove(old)
    else:
      os.replace(tmp, path)  # one atomic step, over an old file or none
  finally:
    for leftover in (tmp, f"{tmp}.partial_save"):
      _remove(leftover)


# -- save --------------------------------------------------------------------


def _produced(
  tensors: list[fmt.Tensor],
  produce: Callable[[fmt.Tensor], Any],
  on_leaf: Callable[[str], None] | None,
) -> Iterator[tuple[fmt.Tensor, Any]]:
  """Each tensor with its data, made by ``produce`` when its turn comes (so a
  caller can compute them one at a time); ``on_leaf(leaf)`` once the last
  tensor of a leaf has been written."""
  for t in tensors:
    yield t, produce(t)
    if on_leaf is not None and t.part != "values":
      on_leaf(t.leaf)


def _write_safetensors(
  path: str,
  structure: dict[str, Any],
  tensors: list[fmt.Tensor],
  produce: Callable[[fmt.Tensor], Any] = lambda t: t.array,
  on_leaf: Callable[[str], None] | None = None,
) -> None:
  """Writes a safetensors file, the header first (see :func:`_produced`)."""
  layouts = [
    (_stored_name("safetensors", t.leaf, t.part), t.array.shape, t.array.dtype)
    for t in tensors
  ]
  with open(path, "wb") as f:
    writer = _safetensors_io.SafetensorsWriter(
      f, layouts, {fmt.METADATA_KEY: fmt.metadata_document(structure)}
    )
    for t, data in _produced(tensors, produce, on_leaf):
      writer.write(_stored_name("safetensors", t.leaf, t.part), data)
    writer.close()
    f.flush()
    os.fsync(f.fileno())


def _write_orbax(
  path: str,
  structure: dict[str, Any],
  tensors: list[fmt.Tensor],
  produce: Callable[[fmt.Tensor], Any] = lambda t: t.array,
  on_leaf: Callable[[str], None] | None = None,
) -> None:
  """Writes an orbax checkpoint, in batches (see :func:`_produced`)."""
  document = json.loads(fmt.metadata_document(structure))
  writer = _orbax_io.OrbaxWriter(path, {fmt.METADATA_KEY: document})
  for t, data in _produced(tensors, produce, on_leaf):
    writer.write(_orbax_keys(t.leaf, t.part), data)
  writer.commit()


_WRITERS = {"safetensors": _write_safetensors, "orbax": _write_orbax}


def save(
  path: str | os.PathLike[str],
  tree: PyTree,
  *,
  format: Format | None = None,
  overwrite: bool = False,
) -> None:
  """Saves a (partly) quantized tree, its structure and metadata included.

  Every :class:`QArray` is stored as its integer values and float32 scale,
  with its static metadata (samples, sampler, channel axes, original dtype)
  in the file, so :func:`load` needs no target. Writing is atomic: the data
  goes to a temporary sibling of ``path``, renamed into place when complete.

  In a ``.safetensors`` file a quantized leaf ``NAME`` (its ``/``-joined path)
  is the two tensors ``NAME.values`` (signed integers) and ``NAME.scale``
  (float32, broadcastable against the values: ``values * scale`` is the
  dequantized tensor); other leaves are stored as they are, under their
  names; the header's ``__metadata__["mcq_jax"]`` holds the JSON metadata.
  Any safetensors reader can use the file without this library.

  Args:
    path: a ``.safetensors`` file name, or a directory name for an orbax
      checkpoint.
    tree: dicts (string keys), lists, tuples, ``FrozenDict`` s and ``None``
      holding arrays, numbers and :class:`QArray` s.
    format: ``"safetensors"`` or ``"orbax"``; default: ``"safetensors"`` for a
      name ending in ``.safetensors``, else ``"orbax"``.
    overwrite: replace an existing ``path`` (otherwise it is an error).

  Raises:
    FileExistsError: if ``path`` exists and ``overwrite`` is false.
    TypeError: for a container or leaf the format cannot hold, naming it.
    ValueError: if two leaves' paths join to the same name.

  Examples:
    >>> import os, tempfile, jax, jax.numpy as jnp, mcq_jax
    >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
    >>> q = mcq_jax.quantize(params, jax.random.key(0))
    >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
    >>> mcq_jax.save(path, q)
    >>> kernel = mcq_jax.load(path)["dense"]["kernel"]
    >>> kernel.samples, kernel.dtype
    (8, dtype('float32'))
    >>> bool((kernel.values == q["dense"]["kernel"].values).all())
    True
  """
  kind = infer_format(path, format)
  structure, tensors = fmt.flatten(tree)
  with _atomic_destination(os.fspath(path), overwrite) as tmp:
    _WRITERS[kind](tmp, structure, tensors)


# -- load --------------------------------------------------------------------


def _source_kind(source: Source) -> Format:
  return (
    "safetensors"
    if isinstance(source, _safetensors_io.SafetensorsSource)
    else "orbax"
  )


def _reader(
  source: Source, text: str
) -> tuple[dict[str, Any], Callable[[dict[str, Any]], Any]]:
  """The structure of one of our checkpoints and a function that reads and
  validates one leaf of it."""
  kind = _source_kind(source)
  structure = fmt.parse_metadata_document(text, source.path)
  expected = fmt.expected_tensors(structure)
  stored = {_stored_name(kind, leaf, part) for leaf, part in expected}
  extra = [n for n in source.names if n not in stored]
  if extra:
    raise fmt.CheckpointFormatError(
      f"{source.path}: tensor {extra[0]!r} is not in the checkpoint's"
      f" metadata ({len(extra)} such tensors): the file was edited"
    )
  available = set(source.names)

  def read(leaf: str, part: str | None, node: dict[str, Any]) -> np.ndarray:
    name = _stored_name(kind, leaf, part)
    if name not in available:
      raise fmt.CheckpointFormatError(
        f"{source.path}: tensor {name!r} is missing"
      )
    shape, dtype = source.layout(name)
    fmt.check_tensor_layout(node, part, shape, dtype)
    array = source.read(name)
    if tuple(array.shape) != shape:  # the data disagrees with the header
      raise fmt.CheckpointFormatError(
        f"{source.path}: tensor {name!r} holds {array.shape}, not {shape}"
      )
    return array

  def leaf(node: dict[str, Any]) -> Any:
    if "array" in node:
      return read(node["array"], None, node)
    name = node["qarray"]
    fmt.check_qarray_node(node, name)
    values = read(name, "values", node)
    scale = read(name, "scale", node)
    fmt.check_qarray_values(node, values, scale)
    return fmt.qarray_from_node(node, values, scale)

  return structure, leaf


def checkpoint_summary(path: str | os.PathLike[str]) -> _summary.Summary:
  """The :func:`mcq_jax.summary` of a checkpoint, read one leaf at a time.

  Validates every leaf as :func:`load` does.

  Args:
    path: a checkpoint (see :func:`load`).

  Returns:
    The summary: bits, sparsity and storage of every leaf.
  """
  source = open_source(path)
  text = _metadata_text(source)
  if text is None:
    return _summary.Summary(
      leaves=tuple(
        _summary.leaf_summary(name, source.read(name)) for name in source.names
      )
    )
  structure, leaf = _reader(source, text)
  return _summary.Summary(
    leaves=tuple(
      _summary.leaf_summary(node.get("qarray") or node["array"], leaf(node))
      for node in fmt.iter_leaves(structure)
    )
  )


def load(path: str | os.PathLike[str]) -> PyTree:
  """Loads a checkpoint written by :func:`save` (or any plain one).

  The file is validated as it is read: every tensor the metadata lists is
  present, with the shape and dtype the metadata implies; no other tensor is;
  scales are finite; and the hit counts of every MCQ group sum to its recorded
  number of samples. A checkpoint without our metadata (a plain safetensors
  file or orbax checkpoint) loads as a dict from each tensor's name (nested
  by ``/`` for orbax) to its array.

  Args:
    path: a ``.safetensors`` file, a directory of them, or an orbax
      checkpoint directory.

  Returns:
    The tree, with numpy arrays (host memory, exactly as stored) as leaves and
    inside each :class:`QArray`; ``jax.device_put`` moves it to a device.

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    ValueError: (``CheckpointFormatError``) for an unreadable, truncated,
      edited or inconsistent checkpoint, naming the tensor.
  """
  source = open_source(path)
  text = _metadata_text(source)
  if text is not None:
    structure, leaf = _reader(source, text)
    return fmt.unflatten(structure, leaf, source.path)
  kind = _source_kind(source)
  return _nested(
    (_tree_keys(kind, name), source.read(name)) for name in source.names
  )


# -- quantize_checkpoint -------------------------------------------------------


def _only_leaf(tree: PyTree) -> Any:
  (leaf,) = jax.tree_util.tree_leaves(tree, is_leaf=is_qarray)
  return leaf


def quantize_checkpoint(
  src: str | os.PathLike[str],
  dst: str | os.PathLike[str],
  key: PRNGKey,
  *,
  samples_per_weight: float | None = None,
  bits: int | None = None,
  sampler: Sampler = "systematic",
  granularity: Granularity = "per_channel",
  where: WhereType = None,
  channel_axis: AxisLike | None = None,
  stack_axes: AxisLike = (),
  sort: bool = False,
  refit_scale: bool = False,
  group_size: int | None = None,
  format: Format | None = None,
  overwrite: bool = False,
  progress: bool = False,
) -> _summary.Summary:
  """Quantizes a checkpoint on disk, one tensor at a time.

  Reads each tensor of ``src``, quantizes it with :func:`mcq_jax.quantize`
  and writes it to ``dst`` before reading the next, so peak memory is set by
  the largest tensor, not by the checkpoint. The result is the checkpoint
  :func:`save` would write for ``quantize(load(src), key, ...)``: the same
  values, bit for bit.

  Args:
    src: an orbax checkpoint directory, a ``.safetensors`` file or a directory
      of ``.safetensors`` shards (with or without an index).
    dst: the quantized checkpoint to write (see :func:`save`).
    key: a ``jax.random`` key.
    samples_per_weight: see :func:`mcq_jax.quantize` (2 unless ``bits`` is
      given).
    bits: see :func:`mcq_jax.quantize`: signed integers of this width, each
      group drawing the largest number of samples that fits.
    sampler: see :func:`mcq_jax.quantize`.
    granularity: see :func:`mcq_jax.quantize`.
    where: see :func:`mcq_jax.quantize`; a tensor's path is its name split
      at ``/`` (safetensors names such as ``model.layers.0.weight`` are one
      key).
    channel_axis: the output-channel axis for ``per_channel``. Default:
      ``0`` for safetensors input (PyTorch stores a linear layer's weight as
      ``[out, in]`` and a convolution's as ``[out, in, kh, kw]``), ``-1`` for
      orbax input (Flax stores kernels as ``[..., in, out]``).
    stack_axes: see :func:`mcq_jax.quantize` (layer stacks of ``nn.scan``).
    sort: see :func:`mcq_jax.quantize`.
    refit_scale: see :func:`mcq_jax.quantize` (least-squares scales).
    group_size: see :func:`mcq_jax.quantize` (blocks of this many values
      along the axes within each output channel, ``per_channel`` only).
    format: ``"safetensors"`` or ``"orbax"`` for ``dst``; default: from its
      name (see :func:`save`).
    overwrite: replace an existing ``dst``.
    progress: show a progress bar over tensors (on stderr).

  Returns:
    The :func:`mcq_jax.summary` of the written checkpoint.

  Raises:
    FileNotFoundError: if ``src`` does not exist.
    FileExistsError: if ``dst`` exists and ``overwrite`` is false.
    ValueError: for an unreadable or already quantized ``src``, a ``where``
      that selects no tensor, or non-finite weights (naming the tensor);
      nothing is written then.
  """
  samples_per_weight = _validation.sampling_or_bits(
    "samples_per_weight",
    samples_per_weight,
    bits,
    DEFAULT_SAMPLES_PER_WEIGHT,
  )
  _validation.check_choice("sampler", sampler, _sampling.ALL_SAMPLERS)
  _validation.check_choice(
    "granularity", granularity, _validation.GRANULARITIES
  )
  _validation.check_group_size(group_size, granularity)
  kind = infer_format(dst, format)
  _check_destination(os.path.abspath(os.fspath(dst)), overwrite)
  source = open_source(src)
  if _metadata_text(source) is not None:
    raise ValueError(f"{source.path} is already a quantized mcq_jax checkpoint")
  source_kind = _source_kind(source)
  if channel_axis is None:
    channel_axis = 0 if source_kind == "safetensors" else -1
  options = dict(
    samples_per_weight=samples_per_weight,
    bits=bits,
    sampler=sampler,
    granularity=granularity,
    channel_axis=channel_axis,
    stack_axes=stack_axes,
    sort=sort,
    refit_scale=refit_scale,
    group_size=group_size,
  )
  # A leaf's key and its `where` path come from its path in the tree; the
  # flattened tree below names each leaf by that path joined again, which is
  # the source's name for it.
  keys_of = {name: _tree_keys(source_kind, name) for name in source.names}
  # `where` is applied here, across the whole checkpoint (each quantize call
  # below sees one tensor, so it cannot tell "selects nothing" or compare
  # keys across tensors).
  selector = _paths.make_selector(where)
  distinct = _paths.DistinctKeys()
  quantize_one = lambda name, leaf: _only_leaf(
    quantize(
      _nested([(keys_of[name], leaf)]),
      key,
      where=_paths.select_all,
      **options,  # type: ignore[arg-type]
    )
  )
  # The plan: every output tensor's layout, from shapes alone (jax.eval_shape
  # runs no sampling), so that the safetensors header can be written first and
  # option errors are raised before anything is written.
  plan: dict[str, Any] = {}
  for name in source.names:
    spec = jax.ShapeDtypeStruct(*source.layout(name))
    names = tuple(keys_of[name])
    if not (_paths.is_float_array(spec) and selector(names, spec)):
      plan[name] = spec
      continue
    distinct.add("/".join(names), names)
    plan[name] = jax.eval_shape(
      lambda x, name=name: quantize_one(name, x), spec
    )
  if not any(isinstance(p, QArray) for p in plan.values()):
    raise ValueError(
      f"{source.path}: `where` selects no tensor to quantize"
      f" ({len(plan)} tensors)"
    )
  structure, tensors = fmt.flatten(
    _nested((keys_of[name], spec) for name, spec in plan.items())
  )

  from tqdm.auto import tqdm

  bar = tqdm(
    total=len(plan), unit="tensor", disable=not progress, desc="quantize"
  )
  leaves: dict[str, Any] = {}
  summaries: list[_summary.LeafSummary] = []

  def produce(t: fmt.Tensor) -> Any:
    if t.leaf not in leaves:  # t.leaf is the source's name of the tensor
      leaves.clear()  # one leaf in memory at a time
      array = source.read(t.leaf)
      out = (
        quantize_one(t.leaf, array)
        if isinstance(plan[t.leaf], QArray)
        else array
      )
      leaves[t.leaf] = out
      summaries.append(_summary.leaf_summary(t.leaf, out))
    out = leaves[t.leaf]
    array = np.asarray(out if t.part is None else getattr(out, t.part))
    # The header was planned from shapes alone, before any sampling: values
    # keep the dtype that holds N (exact), not the narrower one that quantize
    # picks for the actual counts.
    return array.astype(t.array.dtype, copy=False)

  try:
    with _atomic_destination(os.fspath(dst), overwrite) as tmp:
      _WRITERS[kind](tmp, structure, tensors, produce, lambda _: bar.update())
  finally:
    bar.close()
  return _summary.Summary(leaves=tuple(summaries))
