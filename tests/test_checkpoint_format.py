"""The quantized checkpoint format (mcq_jax/_checkpoint_format.py)."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

import mcq_jax
from mcq_jax import _checkpoint_format as fmt


def test_flatten_names_leaves_by_path_and_splits_qarrays():
  q = mcq_jax.quantize({"w": np.ones((4, 2), np.float32)}, jax.random.key(0))
  structure, tensors = fmt.flatten({"a": [q, None], "b": 3})
  assert [(t.leaf, t.part) for t in tensors] == [
    ("a/0/w", "values"),
    ("a/0/w", "scale"),
    ("b", None),
  ]
  node = structure["dict"]["a"]["list"][0]["dict"]["w"]
  assert node["qarray"] == "a/0/w" and node["samples"] == 8
  assert node["channel_axes"] == [1] and node["dtype"] == "float32"
  assert structure["dict"]["a"]["list"][1] == {"none": None}
  assert fmt.expected_tensors(structure) == [(t.leaf, t.part) for t in tensors]
  # The document is JSON and parses back to the same structure.
  text = fmt.metadata_document(structure)
  assert fmt.parse_metadata_document(text, "f") == json.loads(
    json.dumps(structure)
  )


def test_flatten_refuses_what_it_cannot_rebuild():
  with pytest.raises(TypeError, match=r"'layer' is a State.*to_pure_dict"):
    fmt.flatten({"layer": nnx.State({"w": np.ones(2)})})
  with pytest.raises(TypeError, match="keys must be strings, got int"):
    fmt.flatten({"a": {1: np.ones(2)}})
  with pytest.raises(ValueError, match=r"\('x/y',\) and \('x', 'y'\)"):
    fmt.flatten({"x/y": np.ones(1), "x": {"y": np.ones(1)}})


@pytest.mark.parametrize(
  "text, message",
  [
    ("{", "not valid JSON"),
    ('{"format": "other"}', "does not describe"),
    ('{"format": "mcq_jax", "format_version": 2, "tree": {}}', "version 2"),
    ('{"format": "mcq_jax", "format_version": 1}', "no tree structure"),
  ],
)
def test_parse_metadata_document_refuses_other_documents(text, message):
  with pytest.raises(fmt.CheckpointFormatError, match=message):
    fmt.parse_metadata_document(text, "model.safetensors")


def test_unflatten_refuses_unknown_nodes():
  with pytest.raises(fmt.CheckpointFormatError, match="unknown tree node"):
    fmt.unflatten({"set": [1]}, lambda node: None, "f")


def test_check_qarray_values_accepts_exact_totals_only():
  node = {"qarray": "w", "method": "mcq", "samples": 4, "channel_axes": [1]}
  values = np.array([[2, -1], [-2, 3]], np.int8)
  scale = np.ones((1, 2), np.float32)
  fmt.check_qarray_values(node, values, scale)
  short = np.array([[2, -1], [-2, 2]], np.int8)  # channel 1 sums to 3
  with pytest.raises(
    fmt.CheckpointFormatError, match=r"group \(1,\) sum to 3.*records 4"
  ):
    fmt.check_qarray_values(node, short, scale)
  with pytest.raises(fmt.CheckpointFormatError, match="negative or non-finite"):
    fmt.check_qarray_values(node, values, -scale)


def test_check_qarray_values_accepts_groups_without_mass():
  # A pruned output channel (all zeros) draws nothing and has scale 0.
  node = {"qarray": "w", "method": "mcq", "samples": 4, "channel_axes": [1]}
  values = np.array([[2, 0], [-2, 0]], np.int8)
  fmt.check_qarray_values(node, values, np.array([[1.0, 0.0]], np.float32))
  with pytest.raises(fmt.CheckpointFormatError, match=r"group \(1,\) sum to 0"):
    fmt.check_qarray_values(node, values, np.ones((1, 2), np.float32))


def test_check_qarray_values_of_a_bit_budget():
  node = {
    "qarray": "w",
    "method": "mcq",
    "samples": 5,
    "channel_axes": [1],
    "bits": 3,
  }
  scale = np.ones((1, 2), np.float32)
  # Each group draws its own N (here 5 and 2), at most the recorded bound.
  fmt.check_qarray_values(node, np.array([[3, -1], [-2, 1]], np.int8), scale)
  with pytest.raises(fmt.CheckpointFormatError, match="bounds them by 5"):
    fmt.check_qarray_values(node, np.array([[3, 3], [-3, 1]], np.int8), scale)
  with pytest.raises(fmt.CheckpointFormatError, match="beyond its 3-bit"):
    fmt.check_qarray_values(node, np.array([[4, -1], [-1, 1]], np.int8), scale)


def test_a_bit_budget_round_trips_through_a_file(tmp_path):
  w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
  w[:, 1] = 0.0
  q = mcq_jax.quantize({"w": w}, jax.random.key(0), bits=4)
  mcq_jax.save(tmp_path / "q.safetensors", q)
  loaded = mcq_jax.load(tmp_path / "q.safetensors")["w"]
  assert loaded.bits == 4 and loaded.samples == q["w"].samples
  np.testing.assert_array_equal(loaded.values, q["w"].values)
  np.testing.assert_array_equal(loaded.scale, q["w"].scale)


@pytest.mark.parametrize("bits", [1, 33, True, "4"])
def test_check_qarray_node_refuses_bad_bit_budgets(bits):
  node = {
    "shape": [2, 2],
    "method": "mcq",
    "samples": 4,
    "channel_axes": [1],
    "dtype": "float32",
    "sampler": "systematic",
    "bits": bits,
  }
  with pytest.raises(fmt.CheckpointFormatError, match="is not a bit width"):
    fmt.check_qarray_node(node, "w")
  fmt.check_qarray_node({**node, "bits": 4}, "w")
