"""``quantize`` over pytrees: selection, granularity, purity, errors, stats."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import mcq_jax
from mcq_jax import QArray
from tests.conftest import PINNED, STRATIFIED_PER_TENSOR


class _Net(nn.Module):
  """A small real Flax model with every kind of leaf the default rule sees."""

  @nn.compact
  def __call__(self, tokens, image):
    h = nn.Embed(50, 8)(tokens).mean(axis=1)
    c = nn.Conv(4, (3, 3))(image).mean(axis=(1, 2))
    h = nn.LayerNorm()(jnp.concatenate([h, c], -1))
    return nn.Dense(3)(nn.relu(nn.Dense(16)(h)))


@pytest.fixture(scope="module")
def linen_params():
  return _Net().init(
    jax.random.key(0), jnp.zeros((2, 5), jnp.int32), jnp.zeros((2, 6, 6, 1))
  )["params"]


def _flat(tree):
  leaves, _ = jax.tree_util.tree_flatten_with_path(
    tree, is_leaf=mcq_jax.QArray.__instancecheck__
  )
  return {
    "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in p): v
    for p, v in leaves
  }


def test_default_selects_kernels_and_embeddings(linen_params):
  q = mcq_jax.quantize(linen_params, jax.random.key(1), **PINNED)
  flat = _flat(q)
  quantized = sorted(p for p, v in flat.items() if isinstance(v, QArray))
  assert quantized == [
    "Conv_0/kernel",
    "Dense_0/kernel",
    "Dense_1/kernel",
    "Embed_0/embedding",
  ]
  original = _flat(linen_params)
  for path, leaf in flat.items():
    if not isinstance(leaf, QArray):
      assert leaf is original[path]  # untouched, not even copied


def test_each_leaf_has_exact_samples_and_signs(linen_params):
  q = mcq_jax.quantize(
    linen_params,
    jax.random.key(1),
    samples_per_weight=2.5,
    **STRATIFIED_PER_TENSOR,
  )
  original = _flat(linen_params)
  for path, leaf in _flat(q).items():
    if isinstance(leaf, QArray):
      w = np.asarray(original[path])
      assert leaf.samples == round(2.5 * w.size)
      assert int(np.abs(np.asarray(leaf.values)).sum()) == leaf.samples
      assert (np.sign(np.asarray(leaf.values)) * np.sign(w) >= 0).all()
      np.testing.assert_allclose(
        float(leaf.scale.reshape(())) * leaf.samples, np.abs(w).sum(), rtol=1e-5
      )


def test_where_regex_and_predicate(linen_params):
  q = mcq_jax.quantize(
    linen_params, jax.random.key(1), where=r"^Dense_\d+/", **PINNED
  )
  got = sorted(p for p, v in _flat(q).items() if isinstance(v, QArray))
  assert got == [
    "Dense_0/bias",
    "Dense_0/kernel",
    "Dense_1/bias",
    "Dense_1/kernel",
  ]
  q = mcq_jax.quantize(
    linen_params, jax.random.key(1), where=re.compile("embedding$"), **PINNED
  )
  assert [p for p, v in _flat(q).items() if isinstance(v, QArray)] == [
    "Embed_0/embedding"
  ]
  q = mcq_jax.quantize(
    linen_params,
    jax.random.key(1),
    where=lambda path, x: path[-1] == "kernel" and x.ndim == 4,
    **PINNED,
  )
  assert [p for p, v in _flat(q).items() if isinstance(v, QArray)] == [
    "Conv_0/kernel"
  ]
  with pytest.raises(TypeError, match="`where` must be"):
    mcq_jax.quantize(linen_params, jax.random.key(1), where=3, **PINNED)


def test_calls_compose(linen_params):
  key = jax.random.key(1)
  once = mcq_jax.quantize(
    linen_params,
    key,
    where="Dense",
    samples_per_weight=4.0,
    **STRATIFIED_PER_TENSOR,
  )
  twice = mcq_jax.quantize(once, key, where="Conv", **PINNED)
  flat = _flat(twice)
  assert flat["Dense_0/kernel"] is _flat(once)["Dense_0/kernel"]
  assert flat["Dense_0/kernel"].samples_per_value == 4.0
  assert isinstance(flat["Conv_0/kernel"], QArray)


@pytest.mark.parametrize(
  "a, b, union",
  [
    (
      r"Conv_\d+/kernel",
      r"Dense_\d+/kernel",
      r"Conv_\d+/kernel|Dense_\d+/kernel",
    ),
    ("Dense_0", "Dense", "Dense_0|Dense"),  # overlapping selections
    (
      lambda n, x: n[0] == "Conv_0",
      lambda n, x: n[-1] == "kernel",
      lambda n, x: n[0] == "Conv_0" or n[-1] == "kernel",
    ),
  ],
)
def test_two_calls_with_one_key_equal_one_call_with_the_union(
  linen_params, a, b, union
):
  # What composing means: a leaf is quantized by the first call that selects
  # it and kept by later ones, and its key depends on the key and its path
  # only; so with one key and the same options, two calls equal one call
  # whose `where` selects what either selects.
  key = jax.random.key(3)
  opts = dict(samples_per_weight=1.5, sampler="stratified")
  twice = mcq_jax.quantize(
    mcq_jax.quantize(linen_params, key, where=a, **opts), key, where=b, **opts
  )
  once = mcq_jax.quantize(linen_params, key, where=union, **opts)
  flat_twice, flat_once = _flat(twice), _flat(once)
  assert flat_twice.keys() == flat_once.keys()
  for name, leaf in flat_once.items():
    other = flat_twice[name]
    assert type(other) is type(leaf), name
    if isinstance(leaf, QArray):
      np.testing.assert_array_equal(other.values, leaf.values)
      np.testing.assert_array_equal(other.scale, leaf.scale)
    else:
      assert other is leaf or np.array_equal(other, leaf)


def test_nnx_state():
  model = nnx.Sequential(
    nnx.Linear(6, 5, rngs=nnx.Rngs(0)), nnx.Linear(5, 2, rngs=nnx.Rngs(1))
  )
  state = nnx.state(model, nnx.Param)
  q = mcq_jax.quantize(state, jax.random.key(0), where=r"kernel$", **PINNED)
  kernels = [
    leaf
    for leaf in jax.tree_util.tree_leaves(
      q, is_leaf=lambda x: isinstance(x, QArray)
    )
    if isinstance(leaf, QArray)
  ]
  assert [k.shape for k in kernels] == [(6, 5), (5, 2)]
  restored = mcq_jax.dequantize(q)
  nnx.update(model, restored)
  y = model(jnp.ones((1, 6)))
  assert y.shape == (1, 2) and bool(jnp.isfinite(y).all())


def test_lists_tuples_and_non_float_leaves():
  tree = [
    jnp.ones((3, 3)),
    (jnp.arange(6).reshape(2, 3), jnp.array([[True, False]])),
    {"s": "x"},
  ]
  q = mcq_jax.quantize(
    tree, jax.random.key(0), where=lambda p, x: True, **PINNED
  )
  assert isinstance(q[0], QArray)
  assert q[1][0] is tree[1][0] and q[1][1] is tree[1][1]
  assert q[2] == {"s": "x"}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_half_precision_in_float_out(dtype):
  w = jax.random.normal(jax.random.key(0), (16, 8)).astype(dtype)
  q = mcq_jax.quantize(
    {"kernel": w},
    jax.random.key(1),
    samples_per_weight=3.0,
    **STRATIFIED_PER_TENSOR,
  )
  assert q["kernel"].dtype == jnp.dtype(dtype)
  assert int(jnp.abs(q["kernel"].values).sum()) == 3 * 128
  assert mcq_jax.dequantize(q)["kernel"].dtype == jnp.dtype(dtype)
  assert mcq_jax.dequantize(q, jnp.float32)["kernel"].dtype == jnp.float32


def test_traced_values_take_the_smallest_dtype_that_holds_n():
  quantize = jax.jit(
    lambda p, k, spw: mcq_jax.quantize(
      p, k, samples_per_weight=spw, **STRATIFIED_PER_TENSOR
    ),
    static_argnums=2,
  )
  w = {"k": jnp.ones((10, 10))}
  assert quantize(w, jax.random.key(0), 1.27)["k"].values.dtype == jnp.int8
  assert quantize(w, jax.random.key(0), 1.28)["k"].values.dtype == jnp.int16
  big = quantize({"k": jnp.ones((200, 200))}, jax.random.key(0), 1.0)
  assert big["k"].values.dtype == jnp.int32  # N = 40000


@pytest.mark.parametrize("sampler", mcq_jax.SAMPLERS)
@pytest.mark.parametrize("sort", [False, True])
def test_concrete_values_take_the_smallest_dtype_that_holds_them(sampler, sort):
  # N = 40000, so under a trace int32; concretely, the largest count decides
  opts = dict(samples_per_weight=1.0, granularity="per_tensor", sort=sort)
  flat = {"k": jnp.ones((200, 200))}  # every count is 1 (systematic)
  peaked = {"k": jnp.ones((200, 200)).at[3, 4].set(1e4)}  # one ~8000
  for w, dtype in ((flat, jnp.int8), (peaked, jnp.int16)):
    eager = mcq_jax.quantize(w, jax.random.key(0), sampler=sampler, **opts)
    jitted = jax.jit(
      lambda p, k: mcq_jax.quantize(p, k, sampler=sampler, **opts)
    )(w, jax.random.key(0))
    largest = int(jnp.abs(eager["k"].values).max())
    if sampler == "iid" and w is flat:  # iid counts vary: fit the largest
      dtype = jnp.int8 if largest <= 127 else jnp.int16
    assert eager["k"].values.dtype == dtype, (largest, dtype)
    assert eager["k"].max_abs_value == np.iinfo(dtype).max >= largest
    assert jitted["k"].values.dtype == jnp.int32
    assert jitted["k"].max_abs_value == 40000
    np.testing.assert_array_equal(eager["k"].values, jitted["k"].values)
    np.testing.assert_array_equal(eager["k"].scale, jitted["k"].scale)


@pytest.mark.parametrize("sampler", mcq_jax.SAMPLERS)
def test_per_channel_groups(sampler):
  w = jax.random.normal(jax.random.key(0), (3, 3, 4, 6))
  q = mcq_jax.quantize(
    {"kernel": w},
    jax.random.key(1),
    granularity="per_channel",
    sampler=sampler,
    samples_per_weight=1.0,
  )["kernel"]
  assert (
    q.scale.shape == (1, 1, 1, 6)
    and q.num_groups == 6
    and q.granularity == "per_channel"
  )
  assert q.samples == 36
  np.testing.assert_array_equal(
    np.abs(np.asarray(q.values)).sum(axis=(0, 1, 2)), [36] * 6
  )
  np.testing.assert_allclose(
    np.asarray(q.scale).ravel() * 36,
    np.abs(np.asarray(w)).sum(axis=(0, 1, 2)),
    rtol=1e-5,
  )
  multi = mcq_jax.quantize(
    {"kernel": w},
    jax.random.key(1),
    granularity="per_channel",
    channel_axis=(0, -1),
    samples_per_weight=1.0,
    sampler="stratified",
  )["kernel"]
  assert multi.scale.shape == (3, 1, 1, 6) and multi.num_groups == 18
  np.testing.assert_array_equal(
    np.abs(np.asarray(multi.values)).sum(axis=(1, 2)), np.full((3, 6), 12)
  )


def test_all_zero_and_empty_leaves():
  q = mcq_jax.quantize(
    {"zero": jnp.zeros((4, 5)), "empty": jnp.zeros((0, 7))},
    jax.random.key(0),
    **PINNED,
  )
  assert (
    not np.asarray(q["zero"].values).any()
    and float(q["zero"].scale.sum()) == 0.0
  )
  assert q["empty"].shape == (0, 7) and q["empty"].samples == 0
  w_hat = mcq_jax.dequantize(q)
  assert w_hat["empty"].shape == (0, 7) and not np.asarray(w_hat["zero"]).any()


@pytest.mark.parametrize(
  "bad", [0.0, -1.0, float("nan"), float("inf"), True, "2"]
)
def test_bad_samples_per_weight(bad):
  with pytest.raises(
    ValueError, match="samples_per_weight must be a finite number > 0"
  ):
    mcq_jax.quantize(
      {"k": jnp.ones((2, 2))},
      jax.random.key(0),
      samples_per_weight=bad,
      **STRATIFIED_PER_TENSOR,
    )


def test_unknown_options():
  with pytest.raises(ValueError, match="unknown sampler 'sobol'.*stratified"):
    mcq_jax.quantize(
      {"k": jnp.ones((2, 2))},
      jax.random.key(0),
      sampler="sobol",
      samples_per_weight=1.0,
      granularity="per_tensor",
    )
  with pytest.raises(
    ValueError, match="unknown granularity 'per_row'.*per_channel"
  ):
    mcq_jax.quantize(
      {"k": jnp.ones((2, 2))},
      jax.random.key(0),
      granularity="per_row",
      samples_per_weight=1.0,
      sampler="stratified",
    )
  with pytest.raises(
    ValueError, match="leaf 'a/k'.*channel_axis 2 is out of range"
  ):
    mcq_jax.quantize(
      {"a": {"k": jnp.ones((2, 2))}},
      jax.random.key(0),
      granularity="per_channel",
      channel_axis=2,
      samples_per_weight=1.0,
      sampler="stratified",
    )


def test_too_many_samples_names_the_leaf():
  with pytest.raises(ValueError, match="leaf 'big'.*exceeds the supported"):
    mcq_jax.quantize(
      {"big": jnp.ones((1000, 1000))},
      jax.random.key(0),
      samples_per_weight=3000.0,
      **STRATIFIED_PER_TENSOR,
    )


def test_non_finite_values_name_the_leaf():
  params = {"layer": {"kernel": jnp.array([[1.0, jnp.nan], [jnp.inf, 2.0]])}}
  with pytest.raises(
    ValueError,
    match=r"leaf 'layer/kernel' has non-finite values.*\(2 of 4 values\)",
  ):
    mcq_jax.quantize(params, jax.random.key(0), **PINNED)
  # The check can be switched off; the result is then simply garbage-in.
  mcq_jax.quantize(params, jax.random.key(0), check_finite=False, **PINNED)


def test_non_finite_values_under_jit_raise_at_run_time(fresh_python):
  code, err = fresh_python("""
      import jax, jax.numpy as jnp, mcq_jax
      params = {"layer": {"kernel": jnp.array([[1.0, jnp.nan], [0.5, 2.0]])}}
      q = jax.jit(mcq_jax.quantize)(params, jax.random.key(0))
      jax.block_until_ready(q)
  """)
  assert code != 0 and "leaf 'layer/kernel' has non-finite values" in err


@pytest.mark.parametrize("sampler", mcq_jax.SAMPLERS)
@pytest.mark.parametrize("granularity", mcq_jax.GRANULARITIES)
def test_eager_jit_vmap_bit_identical(linen_params, sampler, granularity):
  opts = dict(sampler=sampler, granularity=granularity, samples_per_weight=1.5)
  key = jax.random.key(42)
  eager = mcq_jax.quantize(linen_params, key, **opts)
  jitted = jax.jit(lambda p, k: mcq_jax.quantize(p, k, **opts))(
    linen_params, key
  )
  keys = jax.random.split(jax.random.key(0), 4).at[2].set(key)
  batched = jax.vmap(lambda k: mcq_jax.quantize(linen_params, k, **opts))(keys)
  jax.tree_util.tree_map(np.testing.assert_array_equal, eager, jitted)
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_array_equal(a, b[2]), eager, batched
  )
  # and the four keys gave four different quantizations
  v = np.asarray(batched["Dense_0"]["kernel"].values)
  assert len({v[i].tobytes() for i in range(4)}) == 4


def test_raw_uint32_keys_work():
  w = {"k": jnp.ones((4, 4))}
  a = mcq_jax.quantize(w, jax.random.PRNGKey(3), **PINNED)
  b = mcq_jax.quantize(
    w,
    jax.random.wrap_key_data(jax.random.key_data(jax.random.PRNGKey(3))),
    **PINNED,
  )
  np.testing.assert_array_equal(a["k"].values, b["k"].values)


def test_leaf_keys_depend_on_path_not_on_other_leaves():
  w = jax.random.normal(jax.random.key(0), (20, 20))
  alone = mcq_jax.quantize({"a": w}, jax.random.key(1), **PINNED)
  with_other = mcq_jax.quantize({"a": w, "b": w}, jax.random.key(1), **PINNED)
  np.testing.assert_array_equal(alone["a"].values, with_other["a"].values)
  assert (
    np.asarray(with_other["a"].values) != np.asarray(with_other["b"].values)
  ).any()


@pytest.mark.parametrize("sampler", mcq_jax.SAMPLERS)
@pytest.mark.parametrize("granularity", mcq_jax.GRANULARITIES)
def test_dequantize_is_unbiased_over_keys(sampler, granularity):
  # w spans three orders of magnitude and includes zeros and both signs.
  w = np.random.default_rng(0).standard_normal((6, 5)) * np.logspace(
    -3, 0, 30
  ).reshape(6, 5)
  w[0, 0] = w[3, 2] = 0.0
  w = jnp.asarray(w, jnp.float32)
  k, reps = 2.0, 4096
  f = jax.jit(
    jax.vmap(
      lambda key: mcq_jax.dequantize(
        mcq_jax.quantize(
          {"k": w},
          key,
          samples_per_weight=k,
          sampler=sampler,
          granularity=granularity,
        )
      )["k"]
    )
  )
  samples = np.asarray(f(jax.random.split(jax.random.key(7), reps)), np.float64)
  mean = samples.mean(axis=0)
  # Per value: |mean - w| <= 6 standard errors, with the standard deviation of
  # a single draw bounded above: scale * (1/2 for systematic, 2 for stratified,
  # sqrt(N p) for iid), plus float32 rounding of the scale.
  w64 = np.asarray(w, np.float64)
  axes = (0,) if granularity == "per_channel" else (0, 1)
  mass = np.abs(w64).sum(axis=axes, keepdims=True)
  n = w.size // (w.shape[1] if granularity == "per_channel" else 1)
  scale = mass / round(k * n)
  if sampler == "systematic":
    sd = 0.5 * scale
  elif sampler == "stratified":
    sd = 2.0 * scale
  else:
    sd = scale * np.sqrt(np.abs(w64) / scale)
  assert (np.abs(mean - w64) <= 6 * sd / np.sqrt(reps) + 1e-6 * mass).all()
  # and the spread is real: single draws differ from w
  assert np.abs(samples[0] - w64).max() > 0


@settings(max_examples=40, deadline=None)
@given(
  shape=st.lists(st.integers(0, 9), min_size=1, max_size=4).map(tuple),
  dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
  k=st.floats(0.05, 20.0),
  sampler=st.sampled_from(mcq_jax.SAMPLERS),
  granularity=st.sampled_from(mcq_jax.GRANULARITIES),
  sparsity=st.floats(0.0, 1.0),
  seed=st.integers(0, 2**16),
)
def test_property_exact_counts_signs_and_mass(
  shape, dtype, k, sampler, granularity, sparsity, seed
):
  rng = np.random.default_rng(seed)
  w = rng.standard_cauchy(shape) * (rng.random(shape) >= sparsity)
  w = jnp.asarray(w, jnp.float32).astype(dtype)
  q = mcq_jax.quantize(
    {"w": w},
    jax.random.key(seed),
    samples_per_weight=k,
    sampler=sampler,
    granularity=granularity,
    where=lambda p, x: True,
  )["w"]
  values = np.asarray(q.values).astype(np.int64)
  w32 = np.asarray(w.astype(jnp.float32))
  assert values.shape == w.shape
  assert (values[w32 == 0] == 0).all()
  assert (np.sign(values) * np.sign(w32) >= 0).all()
  axes = tuple(a for a in range(w.ndim) if a not in q.channel_axes)
  totals = np.abs(values).sum(axis=axes)
  mass = np.abs(w32.astype(np.float64)).sum(axis=axes)
  group_size = int(np.prod([w.shape[a] for a in axes]))
  assert q.samples == mcq_jax.num_samples(k, group_size)
  np.testing.assert_array_equal(totals, np.where(mass > 0, q.samples, 0))
  scale = (
    np.asarray(q.scale, np.float64).reshape(totals.shape)
    if totals.ndim
    else float(q.scale.reshape(()))
  )
  np.testing.assert_allclose(scale * q.samples, mass, rtol=1e-5)


def test_bias_and_norm_leaves_stay_float_whatever_their_rank():
  params = {
    "einsum": {"kernel": jnp.ones((4, 2, 3)), "bias": jnp.ones((2, 3))},
    "norm": {"scale": jnp.ones((2, 3)), "mean": jnp.ones((2, 3))},
  }
  q = mcq_jax.quantize(params, jax.random.key(0), **PINNED)
  assert isinstance(q["einsum"]["kernel"], QArray)
  assert q["einsum"]["bias"] is params["einsum"]["bias"]
  assert (
    q["norm"]["scale"] is params["norm"]["scale"]
    and q["norm"]["mean"] is params["norm"]["mean"]
  )


def test_defaults_are_the_measured_ones():
  """K = 2, systematic, per channel: chosen from the committed study."""
  w = jax.random.normal(jax.random.key(0), (6, 4))
  q = mcq_jax.quantize({"kernel": w}, jax.random.key(1))["kernel"]
  assert (
    q.samples_per_value == 2.0 and q.samples == 12
  )  # round(2 * 6) per channel
  assert q.sampler == "systematic" and q.channel_axes == (1,)
  assert q.method == "mcq"
  np.testing.assert_array_equal(
    np.abs(np.asarray(q.values)).sum(axis=0), [12] * 4
  )
  # systematic counts are floor or ceil of their expectation
  expected = 12 * np.abs(np.asarray(w)) / np.abs(np.asarray(w)).sum(axis=0)
  values = np.abs(np.asarray(q.values))
  assert np.all((values == np.floor(expected)) | (values == np.ceil(expected)))


@pytest.mark.parametrize("magnitude", [1e300, 1e-300, 1e-305])
@pytest.mark.parametrize("sampler", ["systematic", "stratified"])
def test_float64_weights_beyond_float32_range_keep_their_mass(
  magnitude, sampler
):
  # float64 leaves (x64) are rescaled by an exact power of two per group, not
  # cast to float32: 1e300 is not "non-finite" and 1e-300 is not all zeros.
  w = np.random.default_rng(0).normal(size=(24, 3)) * magnitude
  with jax.enable_x64(True):
    q = mcq_jax.quantize(
      {"w": jnp.asarray(w)}, jax.random.key(0), sampler=sampler
    )
    values, scale = np.asarray(q["w"].values), np.asarray(q["w"].scale)
    w_hat = np.asarray(mcq_jax.dequantize(q)["w"])
  assert scale.dtype == np.float64 and w_hat.dtype == np.float64
  np.testing.assert_array_equal(np.abs(values).sum(axis=0), [48, 48, 48])
  np.testing.assert_array_equal(np.sign(values), np.sign(w) * (values != 0))
  np.testing.assert_allclose(
    np.abs(w_hat).sum(axis=0), np.abs(w).sum(axis=0), rtol=1e-6
  )
  assert np.all(np.isfinite(w_hat))


def test_float64_weights_are_checked_for_finiteness_in_float64():
  with jax.enable_x64(True):
    w = jnp.asarray(np.array([[1e300, np.inf], [1.0, 2.0]]))
    with pytest.raises(ValueError, match=r"'w' has non-finite.*\(1 of 4"):
      mcq_jax.quantize({"w": w}, jax.random.key(0))


def test_leaves_whose_keys_would_coincide_are_refused():
  # Keys come from the "/"-joined path: two leaves that join alike (or whose
  # path hashes collide) would get the same random draws.
  w = jnp.ones((4, 3))
  with pytest.raises(
    ValueError, match=r"\('a', 'b'\) and \('a/b',\) have the same path 'a/b'"
  ):
    mcq_jax.quantize({"a/b": w, "a": {"b": w}}, jax.random.key(0))
  collide = {"layer_3985819": w, "layer_4420602": w}  # crc32s agree on 31 bits
  with pytest.raises(ValueError, match="keys coincide"):
    mcq_jax.quantize(collide, jax.random.key(0))
  with pytest.raises(ValueError, match="keys coincide"):
    mcq_jax.stochastic_rounding(collide, jax.random.key(0))
  # Selecting only one of them is fine.
  q = mcq_jax.quantize(collide, jax.random.key(0), where="3985819")
  assert isinstance(q["layer_3985819"], QArray)


@pytest.mark.parametrize(
  "call",
  [
    lambda p, where: mcq_jax.quantize(p, jax.random.key(0), where=where),
    lambda p, where: mcq_jax.round_to_nearest(p, where=where),
    lambda p, where: mcq_jax.stochastic_rounding(
      p, jax.random.key(0), where=where
    ),
  ],
)
def test_a_where_that_selects_nothing_is_an_error_as_in_mcq_apply(call):
  params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
  with pytest.raises(
    ValueError,
    match=r"`where`='Dense' selects none of the float or quantized leaves:"
    r" 'dense/bias', 'dense/kernel'",
  ):
    call(params, "Dense")
  # The default rule selecting nothing is not an error (a tree of vectors).
  assert call({"bias": jnp.zeros(2)}, None)["bias"].shape == (2,)
  # Selecting only leaves that are already quantized is a valid no-op.
  once = call(params, "kernel")
  again = call(once, "kernel")
  assert again["dense"]["kernel"] is once["dense"]["kernel"]


def test_huge_and_traced_sampling_amounts_get_clear_errors():
  params = {"layer": {"kernel": jnp.ones((3, 2))}}
  with pytest.raises(
    ValueError,
    match=r"leaf 'layer/kernel': 3.00e\+308 samples for a group of 3",
  ):
    mcq_jax.quantize(params, jax.random.key(0), samples_per_weight=1e308)
  with pytest.raises(TypeError, match="must be a static Python number"):
    jax.jit(
      lambda k: mcq_jax.quantize(
        params, jax.random.key(0), samples_per_weight=k
      )
    )(2.0)
  with pytest.raises(ValueError, match=r"activations: 2.00e\+308 samples"):
    mcq_jax.quantize_activations(jnp.ones((3, 2)), jax.random.key(0), 1e308)


# -- bit budgets: quantize(..., bits=b) ---------------------------------------


def _group_totals(q, w):
  """Per-group sums of |values|, |w| and max |w| (float64), over the axes
  that are not channel axes."""
  values = np.abs(np.asarray(q.values).astype(np.int64))
  w64 = np.abs(np.asarray(w, np.float32).astype(np.float64))
  axes = tuple(a for a in range(w64.ndim) if a not in q.channel_axes)
  return values.sum(axis=axes), w64.sum(axis=axes), w64.max(axis=axes)


@pytest.mark.parametrize("sampler", ["systematic", "stratified"])
@pytest.mark.parametrize("granularity", mcq_jax.GRANULARITIES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bits_draw_the_largest_n_that_fits_every_key(
  sampler, granularity, bits
):
  w = np.random.default_rng(bits).standard_normal((40, 6)) ** 3
  w[:, 2] = 0.5  # equal magnitudes: the expected counts sit at the bound
  w[:, 3] = 0.0
  w[7, 3] = -2.0  # one non-zero value
  w = jnp.asarray(w, jnp.float32)
  top = 2 ** (bits - 1) - 1
  keys = jax.random.split(jax.random.key(3), 64)
  q = jax.vmap(
    lambda k: mcq_jax.quantize(
      {"w": w}, k, bits=bits, sampler=sampler, granularity=granularity
    )["w"]
  )(keys)
  assert q.bits == bits and q.samples_per_value is None
  assert q.values.dtype == jnp.int8
  # Every count of every key fits the budget; for stratified even
  # 64 keys reach it on the equal-magnitude channel.
  assert int(jnp.abs(q.values).max()) <= top
  first = jax.tree_util.tree_map(lambda a: a[0], q)
  totals, mass, largest = _group_totals(first, w)
  # N depends on the weights only: every key draws the same N per group.
  for i in range(1, 64):
    other = jax.tree_util.tree_map(lambda a, i=i: a[i], q)
    np.testing.assert_array_equal(_group_totals(other, w)[0], totals)
  # The largest N whose counts are guaranteed to fit: a value of
  # probability p expects N p hits, and gets at most ceil(N p) of them
  # (systematic) or ceil(N p) + 1 (stratified); N = top always fits.
  room = top - (1 if sampler == "stratified" else 0)
  bound = np.maximum(np.floor(room * mass / largest), top)
  near = np.maximum(np.floor((room - 2.0**-6) * mass / largest), top)
  assert (totals <= bound).all() and (totals >= near).all()
  # The scale is each group's mass over its own N.
  scale = np.asarray(first.scale, np.float64).reshape(totals.shape)
  np.testing.assert_allclose(scale * totals, mass, rtol=1e-6)


def test_bits_with_iid_draw_exactly_the_budget():
  w = jax.random.normal(jax.random.key(0), (30, 4))
  q = mcq_jax.quantize({"w": w}, jax.random.key(1), bits=3, sampler="iid")["w"]
  totals, _, _ = _group_totals(q, w)
  assert q.samples == 3 and (totals == 3).all()
  assert int(jnp.abs(q.values).max()) <= 3


@pytest.mark.parametrize("sampler", ["systematic", "stratified"])
def test_bits_are_unbiased_over_keys(sampler):
  w = np.random.default_rng(1).standard_normal((12, 3)) * np.logspace(
    -2, 0, 36
  ).reshape(12, 3)
  w = jnp.asarray(w, jnp.float32)
  reps = 4096
  f = jax.jit(
    jax.vmap(
      lambda key: mcq_jax.dequantize(
        mcq_jax.quantize({"k": w}, key, bits=3, sampler=sampler)
      )["k"]
    )
  )
  draws = np.asarray(f(jax.random.split(jax.random.key(5), reps)), np.float64)
  q = mcq_jax.quantize({"k": w}, jax.random.key(0), bits=3, sampler=sampler)
  scale = np.asarray(q["k"].scale, np.float64)
  # A draw's error is below two grid steps; the mean's is 6 standard errors.
  w64 = np.asarray(w, np.float64)
  assert (np.abs(draws - w64) <= 2 * scale + 1e-6).all()
  assert (np.abs(draws.mean(0) - w64) <= 6 * 2 * scale / np.sqrt(reps)).all()
  assert np.abs(draws[0] - w64).max() > 0


@pytest.mark.parametrize("granularity", mcq_jax.GRANULARITIES)
def test_bits_eager_jit_vmap_bit_identical(linen_params, granularity):
  opts = dict(bits=4, granularity=granularity)
  key = jax.random.key(2)
  eager = mcq_jax.quantize(linen_params, key, **opts)
  jitted = jax.jit(lambda p, k: mcq_jax.quantize(p, k, **opts))(
    linen_params, key
  )
  mapped = jax.vmap(lambda k: mcq_jax.quantize(linen_params, k, **opts))(
    jnp.stack([key, key])
  )
  second = jax.tree_util.tree_map(lambda a: a[1], mapped)
  for name, leaf in _flat(eager).items():
    if isinstance(leaf, QArray):
      for other in (_flat(jitted)[name], _flat(second)[name]):
        np.testing.assert_array_equal(other.values, leaf.values)
        np.testing.assert_array_equal(other.scale, leaf.scale)


def test_bits_wider_than_a_byte_take_int16():
  w = jax.random.normal(jax.random.key(0), (20, 2))
  q = mcq_jax.quantize({"w": w}, jax.random.key(0), bits=12)["w"]
  assert q.values.dtype == jnp.int16 and q.max_abs_value == 2047
  assert int(jnp.abs(q.values).max()) > 127  # the budget is used


@pytest.mark.parametrize(
  ("options", "message"),
  [
    (dict(bits=4, samples_per_weight=2.0), "not both"),
    (dict(bits=1), "bits must be an int in"),
    (dict(bits=4.0), "bits must be an int in"),
    (dict(bits=33), "bits must be an int in"),
  ],
)
def test_bad_bit_budgets(options, message):
  with pytest.raises(ValueError, match=message):
    mcq_jax.quantize({"w": jnp.ones((4, 2))}, jax.random.key(0), **options)


def test_a_bit_budget_too_wide_for_the_group_names_the_leaf():
  with pytest.raises(ValueError, match="leaf 'w'.*lower bits"):
    mcq_jax.quantize({"w": jnp.ones((4, 2))}, jax.random.key(0), bits=32)


# -- variants: deterministic rounding and a least-squares scale ----------------


def test_deterministic_sampler_rounds_the_cdf_to_nearest():
  w = np.random.default_rng(0).standard_normal((30, 4)).astype(np.float32)
  w[3, :] = 0.0
  runs = [
    mcq_jax.quantize(
      {"w": w},
      jax.random.key(s),
      samples_per_weight=1.5,
      sampler="deterministic",
    )["w"]
    for s in range(3)
  ]
  for other in runs[1:]:  # no key is read
    np.testing.assert_array_equal(other.values, runs[0].values)
  q = runs[0]
  assert q.sampler == "deterministic" and q.samples == 45
  counts = np.abs(np.asarray(q.values, np.int64))
  a = np.abs(w.astype(np.float64))
  cdf = np.cumsum(45 * a / a.sum(axis=0), axis=0)
  expected = np.diff(np.floor(cdf + 0.5), axis=0, prepend=0)
  np.testing.assert_array_equal(counts, expected)
  assert (counts[3] == 0).all() and (counts.sum(axis=0) == 45).all()
  jitted = jax.jit(
    lambda p: mcq_jax.quantize(
      p, jax.random.key(0), samples_per_weight=1.5, sampler="deterministic"
    )
  )({"w": w})["w"]
  np.testing.assert_array_equal(jitted.values, q.values)


@pytest.mark.parametrize("bits", [None, 4])
def test_refit_scale_is_the_least_squares_fit(bits):
  w = jax.random.normal(jax.random.key(0), (40, 5)) ** 3
  opts = dict(bits=bits) if bits else dict(samples_per_weight=1.0)
  plain = mcq_jax.quantize({"w": w}, jax.random.key(1), **opts)["w"]
  fit = mcq_jax.quantize({"w": w}, jax.random.key(1), refit_scale=True, **opts)[
    "w"
  ]
  assert fit.refit_scale and not plain.refit_scale
  np.testing.assert_array_equal(fit.values, plain.values)
  q = np.asarray(fit.values, np.float64)
  w64 = np.asarray(w, np.float64)
  expected = (w64 * q).sum(axis=0) / (q * q).sum(axis=0)
  np.testing.assert_allclose(np.asarray(fit.scale)[0], expected, rtol=1e-5)
  # it minimises each group's squared error for these integers
  err = lambda s: ((w64 - q * np.asarray(s, np.float64)) ** 2).sum(axis=0)
  assert (err(fit.scale) <= err(plain.scale) * (1 + 1e-6)).all()
  assert (err(fit.scale) < err(plain.scale)).any()
