"""Orbax reads one leaf at a time and batched writes (mcq_jax/_orbax_io.py)."""

import os

import numpy as np
import orbax.checkpoint as ocp
import pytest

from mcq_jax import _orbax_io


def _standard_save(path, tree):
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, tree)
  checkpointer.wait_until_finished()


def test_escape_key_keeps_dotted_names_apart():
  assert _orbax_io.escape_key("a.b") != _orbax_io.escape_key("a%2Eb")
  assert _orbax_io.escape_key("100%.x") == "100%25%2Ex"


def test_reads_each_leaf_alone_lists_included(tmp_path):
  tree = {
    "params": {"w": np.arange(6.0).reshape(2, 3)},
    "layers": [np.ones(2, np.int8), np.zeros(3)],
  }
  _standard_save(tmp_path / "c", tree)
  source = _orbax_io.OrbaxSource(tmp_path / "c")
  assert source.names == ["layers/0", "layers/1", "params/w"]
  assert source.layout("params/w") == ((2, 3), np.dtype(np.float64))
  np.testing.assert_array_equal(source.read("layers/0"), tree["layers"][0])
  np.testing.assert_array_equal(source.read("params/w"), tree["params"]["w"])


def test_checkpoint_layouts(tmp_path):
  # A manager step holds its PyTree in an item directory.
  step = tmp_path / "run" / "100"
  manager = ocp.CheckpointManager(tmp_path / "run")
  manager.save(100, args=ocp.args.StandardSave({"w": np.ones(2)}))
  manager.wait_until_finished()
  manager.close()
  assert _orbax_io.OrbaxSource(step).names == ["w"]
  # Several items: the user must say which.
  manager = ocp.CheckpointManager(tmp_path / "two")
  manager.save(
    1,
    args=ocp.args.Composite(
      a=ocp.args.StandardSave({"w": np.ones(2)}),
      b=ocp.args.StandardSave({"v": np.ones(2)}),
    ),
  )
  manager.wait_until_finished()
  manager.close()
  with pytest.raises(ValueError, match=r"several items \['a', 'b'\]"):
    _orbax_io.OrbaxSource(tmp_path / "two" / "1")
  assert not _orbax_io.is_checkpoint(tmp_path)
  with pytest.raises(ValueError, match="not an orbax checkpoint"):
    _orbax_io.OrbaxSource(tmp_path)


def test_the_writer_batches_and_commits_atomically(tmp_path):
  path = str(tmp_path / "out")
  writer = _orbax_io.OrbaxWriter(path, {"note": 1}, batch_bytes=64)
  arrays = {f"t{i}": np.full((4, 4), i, np.float32) for i in range(5)}
  for name, array in arrays.items():
    writer.write(("group", name), array)  # 64 bytes each: one save per tensor
  writer.write(("model.layers.0.weight",), np.ones(3))
  writer.write(("model", "layers", "0", "weight"), np.zeros(3))
  assert not os.path.exists(path)  # staged, not yet committed
  writer.commit()
  source = _orbax_io.OrbaxSource(path)
  assert source.metadata == {"note": 1}
  for name, array in arrays.items():
    np.testing.assert_array_equal(source.read(f"group/{name}"), array)
  np.testing.assert_array_equal(source.read("model%2Elayers%2E0%2Eweight"), 1)
  np.testing.assert_array_equal(source.read("model/layers/0/weight"), 0)
  with pytest.raises(ValueError, match="written twice"):
    writer.write(("group", "t0"), np.ones(1))
    writer.write(("group", "t0"), np.ones(1))
