"""Streamed safetensors writes and lazy reads (mcq_jax/_safetensors_io.py)."""

import io
import json

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from mcq_jax import _safetensors_io

DTYPES = [
  np.float64,
  np.float32,
  np.float16,
  ml_dtypes.bfloat16,
  np.int64,
  np.int32,
  np.int16,
  np.int8,
  np.uint8,
  np.bool_,
]


def _write(tensors, metadata=None):
  f = io.BytesIO()
  writer = _safetensors_io.SafetensorsWriter(
    f, [(n, a.shape, a.dtype) for n, a in tensors.items()], metadata or {}
  )
  for name, array in tensors.items():
    writer.write(name, array)
  writer.close()
  return f.getvalue()


def test_the_safetensors_library_reads_what_the_writer_streams(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {
    f"t{i}": (rng.normal(size=(3, i + 1)) * 50).astype(d)
    for i, d in enumerate(DTYPES)
  }
  tensors["scalar"] = np.array(2.5, np.float32)
  tensors["empty"] = np.zeros((0, 4), np.float32)
  data = _write(tensors, {"note": "hi"})
  (tmp_path / "m.safetensors").write_bytes(data)
  with safe_open(str(tmp_path / "m.safetensors"), framework="numpy") as f:
    loaded = {name: f.get_tensor(name) for name in f.keys()}
    assert f.metadata() == {"note": "hi"}
  assert set(loaded) == set(tensors)
  for name, array in tensors.items():
    assert loaded[name].dtype == array.dtype, name
    assert loaded[name].shape == array.shape, name
    assert loaded[name].tobytes() == array.tobytes(), name
  (n,) = np.frombuffer(data[:8], "<u8")
  assert n % 8 == 0 and json.loads(data[8 : 8 + n])["__metadata__"] == {
    "note": "hi"
  }


def test_the_writer_holds_to_the_declared_layout():
  f = io.BytesIO()
  layouts = [("a", (2,), np.float32), ("b", (3,), np.int8)]
  writer = _safetensors_io.SafetensorsWriter(f, layouts, {})
  with pytest.raises(ValueError, match=r"expected tensor 'a' \(2,\) float32"):
    writer.write("b", np.zeros(3, np.int8))
  writer.write("a", np.zeros(2, np.float32))
  with pytest.raises(ValueError, match="'b' was declared but not written"):
    writer.close()
  with pytest.raises(ValueError, match="two tensors are named 'a'"):
    _safetensors_io.SafetensorsWriter(io.BytesIO(), layouts * 2, {})
  with pytest.raises(TypeError, match="'c'.*complex64"):
    _safetensors_io.SafetensorsWriter(
      io.BytesIO(), [("c", (1,), np.complex64)], {}
    )


def test_source_reads_one_tensor_at_a_time_and_knows_layouts(tmp_path):
  path = str(tmp_path / "m.safetensors")
  save_file(
    {"w": np.ones((2, 3), np.float32), "b": np.arange(3)},
    path,
    metadata={"k": "v"},
  )
  source = _safetensors_io.SafetensorsSource(path)
  assert sorted(source.names) == ["b", "w"] and source.metadata == {"k": "v"}
  assert source.layout("w") == ((2, 3), np.dtype(np.float32))
  np.testing.assert_array_equal(source.read("b"), np.arange(3))


def test_a_directory_of_shards_without_an_index(tmp_path):
  save_file({"a": np.ones(2, np.float32)}, str(tmp_path / "1.safetensors"))
  save_file({"b": np.zeros(3, np.float32)}, str(tmp_path / "2.safetensors"))
  source = _safetensors_io.SafetensorsSource(tmp_path)
  assert source.names == ["a", "b"]
  np.testing.assert_array_equal(source.read("b"), np.zeros(3))
  save_file({"a": np.ones(1, np.float32)}, str(tmp_path / "3.safetensors"))
  with pytest.raises(ValueError, match="'a' is in both"):
    _safetensors_io.SafetensorsSource(tmp_path)


def test_a_bad_index_is_named(tmp_path):
  save_file({"a": np.ones(2, np.float32)}, str(tmp_path / "1.safetensors"))
  (tmp_path / "m.safetensors.index.json").write_text("{}")
  with pytest.raises(ValueError, match="weight_map"):
    _safetensors_io.SafetensorsSource(tmp_path)


def test_truncation_names_the_first_tensor_past_the_end(tmp_path):
  path = tmp_path / "t.safetensors"
  save_file(
    {"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)}, str(path)
  )
  data = path.read_bytes()
  path.write_bytes(data[:-4])
  with pytest.raises(ValueError, match="tensor 'b' ends at byte .* truncated"):
    _safetensors_io.SafetensorsSource(path)
