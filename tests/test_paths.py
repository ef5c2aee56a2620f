"""``_paths``: leaf names and the ``where`` selectors built on them."""

import os
import re
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, struct

import mcq_jax
from mcq_jax import _paths


def _names(tree):
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [_paths.path_names(p) for p, _ in flat]


def test_names_of_dicts_lists_attributes_and_nnx_state():
  assert _names({"a": {"kernel": 1}, "b": [2, 3]}) == [
    ("a", "kernel"),
    ("b", "0"),
    ("b", "1"),
  ]
  state = nnx.state(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Param)
  # NNX flattens each variable through ``.value``: users think without it
  assert sorted(n for n, _ in _paths.named_leaves(state)) == ["bias", "kernel"]
  assert _paths.path_str(()) == "<root>"
  assert (
    _paths.path_str((jax.tree_util.DictKey("a"), jax.tree_util.SequenceKey(2)))
    == "a/2"
  )


def test_default_rule_keeps_vectors_and_named_statistics_in_float():
  m = jnp.ones((3, 3))
  assert _paths.default_where(("Dense_0", "kernel"), m)
  assert not _paths.default_where(("Dense_0", "bias"), jnp.ones(3))
  for name in _paths.FLOAT_BY_DEFAULT:
    assert not _paths.default_where(("Einsum_0", name), m)
  assert not _paths.default_where(("ids",), jnp.ones((3, 3), jnp.int32))


def test_selectors_from_regex_pattern_callable_and_none():
  names, leaf = ("block", "Dense_1", "kernel"), jnp.ones((2, 2))
  assert _paths.make_selector(r"Dense_\d")(names, leaf)
  assert not _paths.make_selector("^Dense")(names, leaf)
  assert _paths.make_selector(re.compile("kernel$"))(names, leaf)
  assert _paths.make_selector(lambda n, x: n[0] == "block")(names, leaf)
  assert _paths.make_selector(None) is _paths.default_where
  assert _paths.make_selector(None, _paths.select_all, "module")(
    names, object()
  )
  with pytest.raises(
    TypeError,
    match=r"`where` must be None, a regex .* '/'-joined module path, .*;"
    r" got int",
  ):
    _paths.make_selector(3, _paths.select_all, "module")


def test_map_selected_returns_untouched_leaves_as_they_are():
  q = mcq_jax.quantize({"k": jnp.ones((2, 2))}, jax.random.key(0))["k"]
  tree = {
    "w": jnp.ones((2, 3)),
    "ids": np.arange(4),
    "q": q,
    "b": jnp.zeros(3),
    "s": "text",
  }
  seen = []
  out = _paths.map_selected(
    lambda leaf, name: seen.append(name) or leaf * 2, tree, None
  )
  assert seen == ["w"]
  assert (
    out["ids"] is tree["ids"]
    and out["q"] is q
    and out["b"] is tree["b"]
    and out["s"] == "text"
  )
  np.testing.assert_array_equal(out["w"], 2 * np.ones((2, 3)))


@struct.dataclass
class _Box:
  value: jax.Array
  raw_value: jax.Array


def test_a_struct_field_named_value_keeps_its_name():
  # Only NNX's own Variable box is seen through; a user's field named
  # "value" is part of the path like any other.
  tree = {"layer": _Box(value=jnp.ones((2, 3)), raw_value=jnp.ones((3, 2)))}
  assert [n for n, _ in _paths.named_leaves(tree)] == [
    "layer/value",
    "layer/raw_value",
  ]
  q = mcq_jax.quantize(tree, jax.random.key(0), where="layer/value$")
  assert isinstance(q["layer"].value, mcq_jax.QArray)
  assert not isinstance(q["layer"].raw_value, mcq_jax.QArray)
  bad = {"layer": _Box(value=jnp.full((2, 3), jnp.nan), raw_value=jnp.ones(2))}
  with pytest.raises(ValueError, match="'layer/value' has non-finite"):
    mcq_jax.quantize(bad, jax.random.key(0))
  assert [leaf.path for leaf in mcq_jax.summary(q).leaves] == [
    "layer/value",
    "layer/raw_value",
  ]


def test_concrete_leaves_run_on_threads_with_sequential_results():
  # Eager quantize processes concrete leaves on a few threads (cold calls
  # compile in parallel); results and the first error follow leaf order.
  tree = {f"w{i}": jnp.full((2, 2), float(i)) for i in range(6)}
  parallel = (os.cpu_count() or 1) >= 2
  # The first two leaves wait for each other: a sequential run would time out.
  meet = threading.Barrier(2)
  threads = set()

  def fn(leaf, name):
    threads.add(threading.get_ident())
    if parallel and name in ("w0", "w1"):
      meet.wait(timeout=60)
    return name, float(leaf[0, 0])

  out = _paths.map_selected(fn, tree, None, inputs=())
  assert out == {f"w{i}": (f"w{i}", float(i)) for i in range(6)}
  assert len(threads) >= (2 if parallel else 1)

  def failing(leaf, name):
    if name in ("w2", "w4"):
      raise ValueError(name)
    return leaf

  with pytest.raises(ValueError, match="^w2$"):
    _paths.map_selected(failing, tree, None, inputs=())


def test_the_first_leaf_of_each_shape_starts_first():
  a, b = jnp.ones((2, 2)), jnp.ones((3, 2))
  jobs = [(a, "w0"), (a, "w1"), (b, "w2"), (a, "w3"), (b, "w4")]
  jobs.append((a.astype(jnp.bfloat16), "w5"))  # another dtype: compiles too
  assert _paths._new_shapes_first(jobs) == [0, 2, 5, 1, 3, 4]


def test_traced_or_undeclared_inputs_keep_one_thread():
  tree = {"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2))}
  seen = set()

  def fn(leaf, name):
    seen.add(threading.get_ident())
    return leaf

  jax.vmap(lambda k: _paths.map_selected(fn, tree, None, inputs=(k,)))(
    jax.random.split(jax.random.key(0), 2)
  )
  jax.jit(lambda t: _paths.map_selected(fn, t, None, inputs=()))(tree)
  _paths.map_selected(fn, tree, None)  # no inputs declared: sequential
  assert seen == {threading.get_ident()}
