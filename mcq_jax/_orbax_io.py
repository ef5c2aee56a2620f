"""Orbax checkpoint directories: partial reads, one leaf at a time, and
incremental writes.

Reads go through orbax's stable PyTree API: the checkpoint's metadata gives
every leaf's path, shape and dtype without reading data, and a restore whose
target holds ``orbax.checkpoint.PLACEHOLDER`` everywhere but one leaf reads
that leaf only (lists included, which a ``partial_restore`` cannot skip).

Writes go through orbax's partial saving (``orbax.checkpoint.experimental.v1
.partial``): each call adds a batch of tensors to a staging directory, and
``finalize`` commits it, so a checkpoint larger than memory is written a batch
at a time and an interrupted write leaves only the staging directory behind.

Orbax names a leaf by its keys joined with ``"."``, so a key that holds a
``"."`` (``"model.layers.0.weight"``, as PyTorch names tensors) would collide
with the nested keys it spells. Keys are written with ``"%"`` and ``"."``
escaped as ``"%25"`` and ``"%2E"`` (:func:`escape_key`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mcq_jax import _paths
from mcq_jax._checkpoint_format import TensorSource

# Orbax's own files: a directory holding one of these is a checkpoint.
_PYTREE_MARKER = "_METADATA"
_CHECKPOINT_MARKER = "_CHECKPOINT_METADATA"


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
  """Hides orbax's informational absl log lines (e.g. about optional metadata
  files a plain PyTree checkpoint does not have); errors still show."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def escape_key(key: str) -> str:
  """A dict key as written to orbax: ``"%"`` and ``"."`` escaped.

  Examples:
    >>> escape_key("model.layers.0.weight")
    'model%2Elayers%2E0%2Eweight'
  """
  return key.replace("%", "%25").replace(".", "%2E")


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
  """Whether ``path`` is an orbax checkpoint directory (of any layout)."""
  path = os.fspath(path)
  return os.path.isdir(path) and (
    os.path.exists(os.path.join(path, _PYTREE_MARKER))
    or os.path.exists(os.path.join(path, _CHECKPOINT_MARKER))
  )


def _pytree_dir(path: str) -> str:
  """The directory that holds the PyTree of the checkpoint at ``path``.

  A ``StandardCheckpointer`` / ``PyTreeCheckpointer`` save is itself the
  PyTree directory; a ``CheckpointManager`` step or a partial save holds it
  in one named item subdirectory (``default``, ``state``, ...).
  """
  if os.path.exists(os.path.join(path, _PYTREE_MARKER)):
    return path
  items = sorted(
    d
    for d in os.listdir(path)
    if os.path.exists(os.path.join(path, d, _PYTREE_MARKER))
  )
  if len(items) == 1:
    return os.path.join(path, items[0])
  if not items:
    raise ValueError(f"{path}: an orbax checkpoint with no PyTree item in it")
  raise ValueError(
    f"{path}: an orbax checkpoint with several items {items}; pass the"
    f" directory of the one that holds the parameters, e.g."
    f" {os.path.join(path, items[0])}"
  )


class OrbaxSource(TensorSource):
  """The leaves of an orbax checkpoint, named by their ``/``-joined paths.

  Args:
    path: the checkpoint directory (a PyTree save, a ``CheckpointManager``
      step with one item, or a directory written by :func:`mcq_jax.save`).
  """

  def __init__(self, path: str | os.PathLike[str]) -> None:
    import orbax.checkpoint as ocp

    self._ocp = ocp
    self.path = os.fspath(path)
    if not is_checkpoint(self.path):
      raise ValueError(f"{self.path}: not an orbax checkpoint directory")
    # Absolute: orbax reads no item metadata through a relative path.
    root = os.path.abspath(self.path)
    self._tree_path = _pytree_dir(root)
    checkpointer = ocp.PyTreeCheckpointer()
    with _quiet_orbax():
      try:
        tree = checkpointer.metadata(self._tree_path).item_metadata.tree
        custom = checkpointer.metadata(root).custom_metadata
      except Exception as e:  # orbax raises many types for a damaged file
        raise ValueError(
          f"{self.path}: not a readable orbax checkpoint ({e})"
        ) from e
    self.metadata: dict[str, Any] = dict(custom or {})
    flat, self._treedef = jax.tree_util.tree_flatten_with_path(tree)
    self._index: dict[str, int] = {}
    self._layout: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    for i, (key_path, leaf) in enumerate(flat):
      name = "/".join(_paths.path_names(key_path))
      self._index[name] = i
      self._layout[name] = (tuple(leaf.shape), jnp.dtype(leaf.dtype))

  def read(self, name: str) -> np.ndarray:
    """One leaf's data; the other leaves are not read."""
    ocp = self._ocp
    index = self._index[name]
    count = len(self._index)
    pick = lambda value: [
      value if i == index else ocp.PLACEHOLDER for i in range(count)
    ]
    item = jax.tree_util.tree_unflatten(self._treedef, pick(0))
    restore_args = jax.tree_util.tree_unflatten(
      self._treedef, pick(ocp.RestoreArgs(restore_type=np.ndarray))
    )
    with _quiet_orbax():
      try:
        restored = ocp.PyTreeCheckpointer().restore(
          self._tree_path,
          args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args),
        )
      except Exception as e:  # tensorstore reports damage in many types
        raise ValueError(
          f"{self.path}: cannot read tensor {name!r}; the checkpoint is"
          f" damaged or incomplete ({e})"
        ) from e
    leaves = jax.tree_util.tree_leaves(
      restored, is_leaf=lambda x: x is ocp.PLACEHOLDER
    )
    return np.asarray(leaves[index])


class OrbaxWriter:
  """Writes an orbax checkpoint in batches of tensors, then commits it.

  Args:
    path: the directory to create (it must not exist).
    custom_metadata: JSON-ready metadata stored with the checkpoint.
    batch_bytes: tensors are buffered until they hold this many bytes, then
      written in one partial save (fewer, larger saves are faster; the buffer
      bounds the memory held).
  """

  def __init__(
    self,
    path: str,
    custom_metadata: dict[str, Any],
    batch_bytes: int = 256 * 2**20,
  ) -> None:
    from orbax.checkpoint.experimental.v1 import partial

    self._partial = partial
    self.path = os.path.abspath(path)
    self._metadata = custom_metadata
    self._batch_bytes = batch_bytes
    self._batch: dict[str, Any] = {}
    self._buffered = 0
    self._written = False

  def write(self, keys: tuple[str, ...], array: Any) -> None:
    """Buffers one tensor at the nested ``keys`` (escaped on write)."""
    node = self._batch
    for key in keys[:-1]:
      node = node.setdefault(escape_key(key), {})
      if not isinstance(node, dict):
        raise ValueError(f"{'/'.join(keys)!r}: a prefix is also a tensor")
    last = escape_key(keys[-1])
    if last in node:
      raise ValueError(f"{'/'.join(keys)!r} is written twice")
    data = np.asarray(array)
    node[last] = data
    self._buffered += data.nbytes
    if self._buffered >= self._batch_bytes:
      self.flush()

  def flush(self) -> None:
    """Writes the buffered tensors."""
    if not self._batch and self._written:
      return
    with _quiet_orbax():
      self._partial.save(self.path, self._batch, custom_metadata=self._metadata)
    self._batch, self._buffered, self._written = {}, 0, True

  def commit(self) -> None:
    """Writes what is buffered and moves the checkpoint into place."""
    self.flush()
    with _quiet_orbax():
      self._partial.finalize(self.path)
