"""Safetensors files: lazy reads through the ``safetensors`` library, streamed
writes of our own.

Reads open the file once per tensor: the library memory-maps the whole file
and a mapping kept open keeps every page it touched resident, so reading a
large file through one handle would grow the process to the file's size.

Writes are streamed: the header (names, dtypes, shapes, offsets) is written
first from the tensors' layouts, then each tensor's bytes as it is produced,
so only one tensor is ever in memory. The ``safetensors`` library writes from
a dict of every tensor at once, which is what this avoids. The layout follows
the format's specification: an 8-byte little-endian header length, a JSON
header padded with spaces to a multiple of 8 bytes, then the data, tensors
back to back in header order.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from typing import Any, BinaryIO

import jax.numpy as jnp
import numpy as np

from mcq_jax._checkpoint_format import TensorSource

# numpy dtype name -> safetensors dtype code.
_CODES = {
  "float64": "F64",
  "float32": "F32",
  "float16": "F16",
  "bfloat16": "BF16",
  "float8_e4m3fn": "F8_E4M3",
  "float8_e5m2": "F8_E5M2",
  "int64": "I64",
  "int32": "I32",
  "int16": "I16",
  "int8": "I8",
  "uint64": "U64",
  "uint32": "U32",
  "uint16": "U16",
  "uint8": "U8",
  "bool": "BOOL",
}
_DTYPES = {code: name for name, code in _CODES.items()}
INDEX_SUFFIX = ".safetensors.index.json"


def dtype_code(dtype: Any, name: str) -> str:
  """The safetensors code of a dtype (``"F32"``, ``"I8"``, ...)."""
  key = jnp.dtype(dtype).name
  if key not in _CODES:
    raise TypeError(f"tensor {name!r}: safetensors cannot store dtype {key}")
  return _CODES[key]


class SafetensorsWriter:
  """Writes one safetensors file tensor by tensor, in a fixed order.

  Args:
    file: an open binary file, positioned at its start.
    layouts: ``(name, shape, dtype)`` of every tensor, in writing order.
    metadata: the header's ``__metadata__`` (string to string).
  """

  def __init__(
    self,
    file: BinaryIO,
    layouts: Sequence[tuple[str, tuple[int, ...], Any]],
    metadata: dict[str, str],
  ) -> None:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    self._expected: list[tuple[str, tuple[int, ...], np.dtype, int]] = []
    for name, shape, dtype in layouts:
      if name in header:
        raise ValueError(f"two tensors are named {name!r}")
      dtype = jnp.dtype(dtype)
      nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
      header[name] = {
        "dtype": dtype_code(dtype, name),
        "shape": [int(d) for d in shape],
        "data_offsets": [offset, offset + nbytes],
      }
      self._expected.append((name, tuple(shape), dtype, nbytes))
      offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    file.write(struct.pack("<Q", len(text)))
    file.write(text)
    self._file = file
    self._next = 0

  def write(self, name: str, array: Any) -> None:
    """Appends the next tensor's bytes; it must match its declared layout."""
    if self._next >= len(self._expected):
      raise ValueError(f"tensor {name!r} was not declared")
    want, shape, dtype, nbytes = self._expected[self._next]
    data = np.asarray(array, order="C")
    if (name, data.shape, data.dtype) != (want, shape, dtype):
      raise ValueError(
        f"expected tensor {want!r} {shape} {dtype.name}, got {name!r}"
        f" {data.shape} {data.dtype.name}"
      )
    # Little-endian on disk whatever the host's order.
    data = data.astype(data.dtype.newbyteorder("<"), copy=False)
    self._file.write(data.reshape(-1).view(np.uint8).data)
    assert data.nbytes == nbytes
    self._next += 1

  def close(self) -> None:
    """Checks that every declared tensor was written."""
    if self._next != len(self._expected):
      missing = self._expected[self._next][0]
      raise ValueError(f"tensor {missing!r} was declared but not written")


class SafetensorsSource(TensorSource):
  """The tensors of one safetensors file or of a directory of shards.

  A directory holds shards and, usually, an index (``*.safetensors.index.json``
  with a ``weight_map`` from tensor name to shard file); without an index
  every ``*.safetensors`` file in it is read.

  Args:
    path: the file or directory.
  """

  def __init__(self, path: str | os.PathLike[str]) -> None:
    from safetensors import safe_open

    self._safe_open = safe_open
    self.path = os.fspath(path)
    self._file_of: dict[str, str] = {}
    self._layout: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    self.metadata: dict[str, str] = {}
    if os.path.isdir(self.path):
      files = self._shards()
    else:
      files = [self.path]
    for file in files:
      for name, layout in self._read_header(file).items():
        if name in self._file_of:
          raise ValueError(
            f"{self.path}: tensor {name!r} is in both"
            f" {self._file_of[name]} and {file}"
          )
        self._file_of[name] = file
        self._layout[name] = layout

  def _shards(self) -> list[str]:
    indexes = sorted(
      f for f in os.listdir(self.path) if f.endswith(INDEX_SUFFIX)
    )
    if len(indexes) > 1:
      raise ValueError(f"{self.path}: several index files: {indexes}")
    if indexes:
      index_path = os.path.join(self.path, indexes[0])
      try:
        with open(index_path) as f:
          weight_map = json.load(f)["weight_map"]
      except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
          f"{index_path}: not a safetensors index with a weight_map ({e})"
        ) from e
      files = list(dict.fromkeys(weight_map.values()))
    else:
      files = sorted(
        f for f in os.listdir(self.path) if f.endswith(".safetensors")
      )
    if not files:
      raise ValueError(f"{self.path}: no .safetensors file in this directory")
    return [os.path.join(self.path, f) for f in files]

  def _read_header(
    self, file: str
  ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Names and layouts of one file's tensors; its metadata is kept."""
    try:
      with self._safe_open(file, framework="numpy") as f:
        names = list(f.keys())
        metadata = f.metadata() or {}
        layouts = {}
        for name in names:
          piece = f.get_slice(name)
          code = piece.get_dtype()
          layouts[name] = (
            tuple(int(d) for d in piece.get_shape()),
            jnp.dtype(_DTYPES.get(code, code)),
          )
    except FileNotFoundError:
      raise
    except Exception as e:  # the library raises its own SafetensorError
      raise ValueError(
        f"{file}: not a readable safetensors file ({_truncation(file) or e})"
      ) from e
    self.metadata.update(metadata)
    return layouts

  def read(self, name: str) -> np.ndarray:
    """The tensor's data, read from its file with a fresh handle."""
    file = self._file_of[name]
    try:
      with self._safe_open(file, framework="numpy") as f:
        return f.get_tensor(name)  # a copy: the mapping closes with f
    except Exception as e:  # the file changed since its header was read
      raise ValueError(
        f"{file}: cannot read tensor {name!r} ({_truncation(file) or e})"
      ) from e


def _truncation(file: str) -> str | None:
  """Names the first tensor whose bytes lie past the end of ``file``."""
  try:
    size = os.path.getsize(file)
    with open(file, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(n))
  except (OSError, ValueError, struct.error):
    return None
  for name, info in header.items():
    if name == "__metadata__" or not isinstance(info, dict):
      continue
    end = 8 + n + int(info.get("data_offsets", [0, 0])[1])
    if end > size:
      return (
        f"tensor {name!r} ends at byte {end} but the file has {size} bytes:"
        " the file is truncated"
      )
  return None
