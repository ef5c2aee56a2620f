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
