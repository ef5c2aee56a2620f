"""save / load / quantize_checkpoint (mcq_jax/_checkpoint.py)."""

import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax.core import frozen_dict
from safetensors import safe_open
from safetensors.numpy import save_file

import mcq_jax
from mcq_jax import _checkpoint

FORMATS = ("safetensors", "orbax")


def _path(tmp_path, kind, name="ckpt"):
  return str(
    tmp_path / (f"{name}.safetensors" if kind == "safetensors" else name)
  )


def _is_q(x):
  return isinstance(x, mcq_jax.QArray)


def _assert_identical(a, b):
  """Same structure, same QArray metadata, same bytes and dtypes."""
  assert jax.tree_util.tree_structure(
    a, is_leaf=_is_q
  ) == jax.tree_util.tree_structure(b, is_leaf=_is_q)
  for x, y in zip(
    jax.tree_util.tree_leaves(a, is_leaf=_is_q),
    jax.tree_util.tree_leaves(b, is_leaf=_is_q),
  ):
    assert type(x) is type(y) or not _is_q(x)
    if _is_q(x):
      assert (
        x.method,
        x.samples,
        x.samples_per_value,
        x.sampler,
        x.channel_axes,
        x.sort,
        x.dtype,
      ) == (
        y.method,
        y.samples,
        y.samples_per_value,
        y.sampler,
        y.channel_axes,
        y.sort,
        y.dtype,
      )
      pairs = [(x.values, y.values), (x.scale, y.scale)]
    else:
      pairs = [(x, y)]
    for u, v in pairs:
      u, v = np.asarray(u), np.asarray(v)
      assert u.dtype == v.dtype and u.shape == v.shape
      assert u.tobytes() == v.tobytes()


@pytest.fixture(scope="module")
def tree():
  """Every kind of leaf and container the format holds."""
  k = jax.random.key(0)
  w = jax.random.normal(k, (12, 6))
  params = {
    "dense": {"kernel": w, "bias": jnp.linspace(-1, 1, 6)},
    "conv": {"kernel": jax.random.normal(k, (3, 3, 2, 4), jnp.bfloat16)},
    "emb": jax.random.normal(k, (7, 5), jnp.float16),
  }
  q = mcq_jax.quantize(params, k, samples_per_weight=3.0)
  return {
    "mcq": q,
    "per_tensor": mcq_jax.quantize(
      {"w": w}, k, granularity="per_tensor", sampler="iid", sort=True
    ),
    "rtn": mcq_jax.round_to_nearest({"w": w}, bits=4),
    "sr": mcq_jax.stochastic_rounding({"w": w}, k, bits=8),
    "list": [jnp.arange(3), (jnp.ones((2, 2), jnp.int8), None)],
    "frozen": frozen_dict.FrozenDict({"x": np.float64(2.5)}),
    "step": 7,
    "flag": np.array([True, False]),
  }


@pytest.mark.parametrize("kind", FORMATS)
def test_save_then_load_round_trips_bit_for_bit_without_a_target(
  tmp_path, tree, kind
):
  path = _path(tmp_path, kind)
  mcq_jax.save(path, tree)
  loaded = mcq_jax.load(path)
  expected = jax.tree_util.tree_map(np.asarray, tree, is_leaf=lambda x: False)
  _assert_identical(loaded, expected)
  assert isinstance(loaded["frozen"], frozen_dict.FrozenDict)
  assert isinstance(loaded["list"][1], tuple) and loaded["list"][1][1] is None
  # The loaded tree runs: dequantize gives back the same floats.
  np.testing.assert_array_equal(
    mcq_jax.dequantize(loaded["mcq"])["dense"]["kernel"],
    mcq_jax.dequantize(tree["mcq"])["dense"]["kernel"],
  )


def test_the_safetensors_layout_needs_no_mcq_jax(tmp_path, tree):
  path = _path(tmp_path, "safetensors")
  mcq_jax.save(path, tree)
  with safe_open(path, framework="numpy") as f:
    meta = json.loads(f.metadata()["mcq_jax"])
    values = f.get_tensor("mcq/dense/kernel.values")
    scale = f.get_tensor("mcq/dense/kernel.scale")
    bias = f.get_tensor("mcq/dense/bias")
  assert meta["format"] == "mcq_jax" and meta["format_version"] == 1
  assert values.dtype == np.int8 and scale.dtype == np.float32
  assert scale.shape == (1, 6)
  np.testing.assert_array_equal(
    values * scale, mcq_jax.dequantize(tree["mcq"])["dense"]["kernel"]
  )
  np.testing.assert_array_equal(bias, tree["mcq"]["dense"]["bias"])


@pytest.mark.parametrize("kind", FORMATS)
def test_an_existing_destination_is_refused_unless_overwrite(
  tmp_path, tree, kind
):
  path = _path(tmp_path, kind)
  mcq_jax.save(path, {"a": np.ones(2)})
  with pytest.raises(FileExistsError, match="overwrite"):
    mcq_jax.save(path, tree)
  mcq_jax.save(path, {"b": np.zeros(3)}, overwrite=True)
  assert list(mcq_jax.load(path)) == ["b"]
  assert sorted(os.listdir(tmp_path)) == [os.path.basename(path)]


@pytest.mark.parametrize("kind", FORMATS)
def test_an_interrupted_write_leaves_nothing_and_keeps_the_old_file(
  tmp_path, kind, monkeypatch
):
  path = _path(tmp_path, kind)
  mcq_jax.save(path, {"old": np.ones(2)})

  class Interrupted(Exception):
    pass

  def produce(t):
    if t.leaf == "b":
      raise Interrupted  # e.g. KeyboardInterrupt half-way through
    return t.array

  writer = _checkpoint._WRITERS[kind]
  monkeypatch.setitem(
    _checkpoint._WRITERS,
    kind,
    lambda p, s, t, produce_=None, on_leaf=None: writer(p, s, t, produce),
  )
  with pytest.raises(Interrupted):
    mcq_jax.save(path, {"a": np.ones(3), "b": np.ones(4)}, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == [os.path.basename(path)]
  assert list(mcq_jax.load(path)) == ["old"]


def test_format_comes_from_the_name_or_the_argument(tmp_path):
  mcq_jax.save(tmp_path / "a.safetensors", {"x": np.ones(2)})
  assert os.path.isfile(tmp_path / "a.safetensors")
  mcq_jax.save(tmp_path / "b", {"x": np.ones(2)})
  assert os.path.isdir(tmp_path / "b")
  mcq_jax.save(tmp_path / "c.bin", {"x": np.ones(2)}, format="safetensors")
  assert os.path.isfile(tmp_path / "c.bin")
  np.testing.assert_array_equal(mcq_jax.load(tmp_path / "c.bin")["x"], 1.0)
  with pytest.raises(ValueError, match="format"):
    mcq_jax.save(tmp_path / "d", {"x": np.ones(2)}, format="npz")


def test_unstorable_trees_are_refused_by_name(tmp_path):
  with pytest.raises(TypeError, match="'a/b'.*str"):
    mcq_jax.save(tmp_path / "x.safetensors", {"a": {"b": "text"}})
  with pytest.raises(ValueError, match="'a/b'"):
    mcq_jax.save(
      tmp_path / "y.safetensors", {"a/b": np.ones(1), "a": {"b": np.ones(1)}}
    )
  assert os.listdir(tmp_path) == []


# -- validation on load --------------------------------------------------------


def _header(path):
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    return n, json.loads(f.read(n))


def _rewrite_metadata(path, edit):
  """Edits the JSON metadata of a safetensors file in place."""
  with safe_open(path, framework="numpy") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(f.metadata()["mcq_jax"])
  edit(meta)
  save_file(tensors, path, metadata={"mcq_jax": json.dumps(meta)})


def _rewrite_tensors(path, edit):
  with safe_open(path, framework="numpy") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
    metadata = f.metadata()
  edit(tensors)
  save_file(tensors, path, metadata=metadata)


@pytest.fixture
def saved(tmp_path, tree):
  path = _path(tmp_path, "safetensors")
  mcq_jax.save(path, {"q": tree["mcq"], "rtn": tree["rtn"]})
  return path


def test_a_truncated_file_names_the_tensor_past_its_end(saved):
  size = os.path.getsize(saved)
  with open(saved, "r+b") as f:
    f.truncate(size - 10)
  with pytest.raises(ValueError, match="truncated"):
    mcq_jax.load(saved)


def test_a_damaged_orbax_checkpoint_names_the_tensor(tmp_path, tree):
  path = str(tmp_path / "q")
  w = np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32)
  mcq_jax.save(path, mcq_jax.quantize({"w": w}, jax.random.key(0)))
  chunks = [
    os.path.join(root, f)
    for root, _, files in os.walk(path)
    for f in files
    if os.sep + "d" + os.sep in os.path.join(root, f) + os.sep
  ]
  largest = max(chunks, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)
  with pytest.raises(ValueError, match="cannot read tensor 'w/values'"):
    mcq_jax.load(path)


def test_edited_hit_counts_are_caught(saved):
  def edit(t):
    v = t["q/dense/kernel.values"].copy()
    v[0, 2] += 1 if v[0, 2] >= 0 else -1
    t["q/dense/kernel.values"] = v

  _rewrite_tensors(saved, edit)
  with pytest.raises(
    mcq_jax.CheckpointFormatError,
    match=r"'q/dense/kernel.values'.*group \(2,\) sum to 37.*36 samples",
  ):
    mcq_jax.load(saved)


def test_metadata_that_disagrees_with_the_tensors_is_caught(saved):
  def samples(meta):
    meta["tree"]["dict"]["q"]["dict"]["dense"]["dict"]["kernel"]["samples"] = 20

  _rewrite_metadata(saved, samples)
  with pytest.raises(
    mcq_jax.CheckpointFormatError, match="sum to 36.*records 20"
  ):
    mcq_jax.load(saved)


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("channel_axes", [0], r"scale'? has shape \(1, 6\).*need \(12, 1\)"),
    ("channel_axes", [5], "channel_axes"),
    ("shape", [6, 12], r"shape \(12, 6\), its metadata says \(6, 12\)"),
    ("method", "magic", "unknown method"),
    ("sampler", "quantum", "unknown sampler"),
    ("dtype", "int8", "not a floating dtype"),
    ("samples", -1, "not a count"),
  ],
)
def test_each_metadata_field_is_checked(saved, field, value, message):
  def edit(meta):
    meta["tree"]["dict"]["q"]["dict"]["dense"]["dict"]["kernel"][field] = value

  _rewrite_metadata(saved, edit)
  with pytest.raises(mcq_jax.CheckpointFormatError, match=message):
    mcq_jax.load(saved)


def test_missing_extra_and_retyped_tensors_are_caught(tmp_path, saved):
  def drop(t):
    del t["q/dense/kernel.scale"]

  def add(t):
    t["intruder"] = np.ones(1, np.float32)

  def retype(t):
    t["q/dense/kernel.scale"] = t["q/dense/kernel.scale"].astype(np.float16)

  for edit, message in [
    (drop, "'q/dense/kernel.scale' is missing"),
    (add, "'intruder' is not in the checkpoint's metadata"),
    (retype, "dtype float16; scales are float32"),
  ]:
    path = str(tmp_path / f"{edit.__name__}.safetensors")
    with open(saved, "rb") as src, open(path, "wb") as dst:
      dst.write(src.read())
    _rewrite_tensors(path, edit)
    with pytest.raises(mcq_jax.CheckpointFormatError, match=message):
      mcq_jax.load(path)


def test_an_unknown_format_version_is_refused(saved):
  _rewrite_metadata(saved, lambda meta: meta.update(format_version=99))
  with pytest.raises(mcq_jax.CheckpointFormatError, match="version 99"):
    mcq_jax.load(saved)


def test_load_errors_for_missing_and_unknown_paths(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such file"):
    mcq_jax.load(tmp_path / "absent.safetensors")
  (tmp_path / "notes.txt").write_text("hello, world")
  with pytest.raises(ValueError, match="unknown format"):
    mcq_jax.load(tmp_path / "notes.txt")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="neither an orbax checkpoint"):
    mcq_jax.load(tmp_path / "empty")


def test_a_plain_checkpoint_loads_as_a_dict_of_its_tensors(tmp_path):
  tensors = {"a.weight": np.ones((2, 3), np.float32), "b": np.arange(4)}
  save_file(tensors, str(tmp_path / "plain.safetensors"))
  loaded = mcq_jax.load(tmp_path / "plain.safetensors")
  assert list(loaded) == ["a.weight", "b"]
  np.testing.assert_array_equal(loaded["b"], tensors["b"])
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "plain_orbax", {"x": {"y": tensors["b"]}})
  checkpointer.wait_until_finished()
  np.testing.assert_array_equal(
    mcq_jax.load(tmp_path / "plain_orbax")["x"]["y"], tensors["b"]
  )


# -- quantize_checkpoint -------------------------------------------------------


@pytest.fixture(scope="module")
def float_params():
  k = jax.random.key(1)
  return {
    "params": {
      "Dense_0": {
        "kernel": np.asarray(jax.random.normal(k, (16, 8))),
        "bias": np.linspace(-1, 1, 8, dtype=np.float32),
      },
      "Dense_1": {"kernel": np.asarray(jax.random.normal(k, (8, 4)))},
    }
  }


def _orbax_source(path, tree):
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, tree)
  checkpointer.wait_until_finished()
  return str(path)


@pytest.mark.parametrize("dst_kind", FORMATS)
@pytest.mark.parametrize("sampler", ["systematic", "stratified"])
def test_quantize_checkpoint_equals_quantize_of_the_loaded_tree(
  tmp_path, float_params, dst_kind, sampler
):
  src = _orbax_source(tmp_path / "src", float_params)
  dst = _path(tmp_path, dst_kind, "dst")
  key = jax.random.key(42)
  report = mcq_jax.quantize_checkpoint(
    src, dst, key, samples_per_weight=1.5, sampler=sampler
  )
  expected = mcq_jax.quantize(
    mcq_jax.load(src), key, samples_per_weight=1.5, sampler=sampler
  )
  _assert_identical(mcq_jax.load(dst), expected)
  assert [leaf.path for leaf in report.quantized] == [
    "params/Dense_0/kernel",
    "params/Dense_1/kernel",
  ]
  assert report.total_bytes == mcq_jax.summary(expected).total_bytes


def test_safetensors_input_uses_pytorch_layout_by_default(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {
    "model.fc.weight": rng.normal(size=(6, 10)).astype(np.float32),  # [out, in]
    "model.fc.bias": rng.normal(size=(6,)).astype(np.float32),
  }
  save_file(tensors, str(tmp_path / "torch.safetensors"))
  key = jax.random.key(3)
  mcq_jax.quantize_checkpoint(
    tmp_path / "torch.safetensors", tmp_path / "q.safetensors", key
  )
  loaded = mcq_jax.load(tmp_path / "q.safetensors")
  weight = loaded["model.fc.weight"]
  assert weight.channel_axes == (0,) and weight.scale.shape == (6, 1)
  _assert_identical(loaded, mcq_jax.quantize(tensors, key, channel_axis=0))
  mcq_jax.quantize_checkpoint(
    tmp_path / "torch.safetensors",
    tmp_path / "q1.safetensors",
    key,
    channel_axis=-1,
  )
  assert mcq_jax.load(tmp_path / "q1.safetensors")[
    "model.fc.weight"
  ].channel_axes == (1,)


def test_a_sharded_safetensors_directory_with_an_index(tmp_path):
  rng = np.random.default_rng(1)
  a = rng.normal(size=(4, 6)).astype(np.float32)
  b = rng.normal(size=(3, 6)).astype(np.float32)
  shards = tmp_path / "shards"
  shards.mkdir()
  save_file({"a.weight": a}, str(shards / "model-00001-of-00002.safetensors"))
  save_file({"b.weight": b}, str(shards / "model-00002-of-00002.safetensors"))
  (shards / "model.safetensors.index.json").write_text(
    json.dumps(
      {
        "metadata": {"total_size": a.nbytes + b.nbytes},
        "weight_map": {
          "a.weight": "model-00001-of-00002.safetensors",
          "b.weight": "model-00002-of-00002.safetensors",
        },
      }
    )
  )
  key = jax.random.key(5)
  mcq_jax.quantize_checkpoint(shards, tmp_path / "q.safetensors", key)
  _assert_identical(
    mcq_jax.load(tmp_path / "q.safetensors"),
    mcq_jax.quantize({"a.weight": a, "b.weight": b}, key, channel_axis=0),
  )


def test_quantize_checkpoint_errors_write_nothing(tmp_path, float_params):
  src = _orbax_source(tmp_path / "src", float_params)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="selects no tensor"):
    mcq_jax.quantize_checkpoint(src, tmp_path / "a", key, where="nothing")
  bad = jax.tree_util.tree_map(lambda x: x.copy(), float_params)
  bad["params"]["Dense_1"]["kernel"][2, 1] = np.nan
  bad_src = _orbax_source(tmp_path / "bad", bad)
  with pytest.raises(
    ValueError, match="'params/Dense_1/kernel' has non-finite"
  ):
    mcq_jax.quantize_checkpoint(bad_src, tmp_path / "b.safetensors", key)
  with pytest.raises(ValueError, match="samples_per_weight"):
    mcq_jax.quantize_checkpoint(src, tmp_path / "c", key, samples_per_weight=0)
  with pytest.raises(FileNotFoundError):
    mcq_jax.quantize_checkpoint(tmp_path / "absent", tmp_path / "d", key)
  with pytest.raises(FileExistsError):
    mcq_jax.quantize_checkpoint(src, tmp_path / "bad", key)
  assert sorted(os.listdir(tmp_path)) == ["bad", "src"]
  mcq_jax.quantize_checkpoint(src, tmp_path / "q", key)
  with pytest.raises(ValueError, match="already a quantized"):
    mcq_jax.quantize_checkpoint(tmp_path / "q", tmp_path / "e", key)


def test_checkpoint_summary_matches_summary_of_the_loaded_tree(saved):
  assert _checkpoint.checkpoint_summary(saved) == mcq_jax.summary(
    mcq_jax.load(saved)
  )


def test_float64_leaves_round_trip_with_float64_scales(tmp_path):
  with jax.enable_x64(True):
    w = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)) * 1e200)
    q = mcq_jax.quantize({"w": w}, jax.random.key(0))
    mcq_jax.save(tmp_path / "q.safetensors", q)
    loaded = mcq_jax.load(tmp_path / "q.safetensors")
  assert loaded["w"].scale.dtype == np.float64
  _assert_identical(loaded, jax.tree_util.tree_map(np.asarray, q))


def test_quantize_checkpoint_selects_across_the_whole_checkpoint(tmp_path):
  rng = np.random.default_rng(0)
  w = rng.normal(size=(4, 3)).astype(np.float32)
  src = str(tmp_path / "m.safetensors")
  save_file({"a.weight": w, "b.weight": w, "b.bias": w[0]}, src)
  key = jax.random.key(0)
  # `where` selects some tensors: the others are copied, no error.
  mcq_jax.quantize_checkpoint(src, tmp_path / "q.safetensors", key, where="^a")
  loaded = mcq_jax.load(tmp_path / "q.safetensors")
  assert isinstance(loaded["a.weight"], mcq_jax.QArray)
  assert isinstance(loaded["b.weight"], np.ndarray)
  # Keys are compared across tensors, as quantize does within a tree.
  save_file(
    {"layer_3985819": w, "layer_4420602": w}, str(tmp_path / "c.safetensors")
  )
  with pytest.raises(ValueError, match="keys coincide"):
    mcq_jax.quantize_checkpoint(
      tmp_path / "c.safetensors", tmp_path / "out.safetensors", key
    )
  assert not os.path.exists(tmp_path / "out.safetensors")


def test_overwrite_replaces_a_directory_with_a_file_and_back(tmp_path):
  path = tmp_path / "ckpt"
  mcq_jax.save(path, {"a": np.ones(2)}, format="orbax")
  mcq_jax.save(path, {"b": np.ones(3)}, format="safetensors", overwrite=True)
  assert os.path.isfile(path) and list(mcq_jax.load(path)) == ["b"]
  mcq_jax.save(path, {"c": np.ones(4)}, format="orbax", overwrite=True)
  assert os.path.isdir(path) and list(mcq_jax.load(path)) == ["c"]
  assert os.listdir(tmp_path) == ["ckpt"]
