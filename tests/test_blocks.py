"""Sub-channel blocks (``group_size``): layout, scales, and every consumer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mcq_jax
from mcq_jax import _blocks
from mcq_jax._keys import path_key


@pytest.mark.parametrize(
  ("shape", "axes", "size"),
  [
    ((10, 3), (1,), 4),  # a Dense kernel, a short last block
    ((3, 3, 5, 4), (3,), 16),  # a conv: blocks cross the tap axes
    ((2, 10, 3), (0, 2), 5),  # a stack of two Dense kernels
    ((10, 3), (1,), 32),  # one block per channel
    ((6,), (0,), 4),  # nothing within the groups
  ],
)
def test_blocks_round_trip_and_scales_broadcast_by_block(shape, axes, size):
  x = jnp.arange(1, np.prod(shape) + 1, dtype=jnp.float32).reshape(shape)
  blocked = _blocks.to_blocks(x, axes, size)
  np.testing.assert_array_equal(_blocks.from_blocks(blocked, shape, axes), x)
  # Block b of group j is column b * G + j: its values are the j-th group's
  # values b * size ... (b + 1) * size - 1 in row-major order.
  other = tuple(a for a in range(len(shape)) if a not in axes)
  groups = int(np.prod([shape[a] for a in axes]))
  flat = np.transpose(np.asarray(x), other + axes).reshape(-1, groups)
  blocks = _blocks.block_count(shape, axes, size)
  length = blocked.shape[0]
  for b in range(blocks):
    for j in range(groups):
      want = flat[b * length : (b + 1) * length, j]
      got = np.asarray(blocked)[: len(want), b * groups + j]
      np.testing.assert_array_equal(got, want)
  # Column scales placed and expanded: each value gets its block's scale.
  column = jnp.arange(blocks * groups, dtype=jnp.float32)
  scale = _blocks.block_scales(column, shape, axes, size)
  assert scale.shape == _blocks.scale_shape(shape, axes, size)
  np.testing.assert_array_equal(_blocks.column_scales(scale, axes), column)
  per_value = np.asarray(_blocks.expand(scale, shape, axes, size))
  per_value = np.transpose(per_value, other + axes).reshape(-1, groups)
  rows = np.arange(flat.shape[0]) // length
  np.testing.assert_array_equal(
    per_value, rows[:, None] * groups + np.arange(groups)
  )


@pytest.mark.parametrize(
  "options",
  [
    dict(samples_per_weight=2.0),
    dict(bits=4),
    dict(bits=3, sampler="stratified"),
    dict(samples_per_weight=1.0, sampler="iid"),
  ],
)
def test_each_block_is_a_group_of_its_own(options):
  w = np.random.default_rng(0).standard_normal((50, 6)).astype(np.float32)
  w[16:32, 1] = 0.0  # an empty block
  q = mcq_jax.quantize({"w": w}, jax.random.key(0), group_size=16, **options)[
    "w"
  ]
  assert q.group_size == 16 and q.scale.shape == (4, 6)
  assert q.num_blocks == 4 and q.num_groups == 24
  values = np.abs(np.asarray(q.values, np.int64))
  scale = np.asarray(q.scale, np.float64)
  for b in range(4):
    block = slice(16 * b, 16 * (b + 1))
    totals = values[block].sum(axis=0)
    mass = np.abs(w[block].astype(np.float64)).sum(axis=0)
    # exact totals per block, the block's own scale
    np.testing.assert_allclose(scale[b] * totals, mass, rtol=1e-5)
    if "samples_per_weight" in options:
      n = round(options["samples_per_weight"] * 16)  # the short block too
      np.testing.assert_array_equal(totals, np.where(mass > 0, n, 0))
  if "bits" in options:
    assert values.max() <= 2 ** (options["bits"] - 1) - 1
  # dequantize applies each block's scale to its values
  expected = (
    np.asarray(q.values, np.float64) * np.repeat(scale, 16, axis=0)[:50]
  )
  np.testing.assert_allclose(
    np.asarray(mcq_jax.dequantize(q), np.float64), expected, rtol=1e-6
  )
  # eager == jit
  jitted = jax.jit(
    lambda p: mcq_jax.quantize(p, jax.random.key(0), group_size=16, **options)
  )({"w": w})["w"]
  np.testing.assert_array_equal(jitted.values, q.values)
  np.testing.assert_array_equal(jitted.scale, q.scale)


def test_blocks_are_unbiased_over_keys():
  w = jnp.asarray(
    np.random.default_rng(1).standard_normal((20, 3)) ** 3, jnp.float32
  )
  f = jax.jit(
    jax.vmap(
      lambda k: mcq_jax.dequantize(
        mcq_jax.quantize({"w": w}, k, bits=3, group_size=8)
      )["w"]
    )
  )
  reps = 4096
  draws = np.asarray(f(jax.random.split(jax.random.key(2), reps)), np.float64)
  q = mcq_jax.quantize({"w": w}, jax.random.key(0), bits=3, group_size=8)["w"]
  step = np.asarray(q.value_scale, np.float64)
  w64 = np.asarray(w, np.float64)
  assert (np.abs(draws.mean(0) - w64) <= 6 * step / np.sqrt(reps) + 1e-7).all()


@pytest.mark.parametrize("method", ["round_to_nearest", "stochastic_rounding"])
def test_grid_baselines_take_one_grid_per_block(method):
  w = np.random.default_rng(0).standard_normal((40, 3)).astype(np.float32)
  w[:8] *= 100.0  # one loud block: its grid must not coarsen the others
  kw = dict(bits=4, granularity="per_channel", group_size=8)
  if method == "round_to_nearest":
    q = mcq_jax.round_to_nearest({"w": w}, **kw)["w"]
  else:
    q = mcq_jax.stochastic_rounding({"w": w}, jax.random.key(0), **kw)["w"]
  assert q.group_size == 8 and q.scale.shape == (5, 3) and q.bits == 4
  block_max = np.abs(w).reshape(5, 8, 3).max(axis=1)
  np.testing.assert_allclose(np.asarray(q.scale), block_max / 7, rtol=1e-6)
  err = np.abs(np.asarray(mcq_jax.dequantize(q)) - w)
  assert (err <= np.repeat(np.asarray(q.scale), 8, axis=0) + 1e-6).all()


def test_blocks_survive_a_checkpoint_and_show_in_the_summary(tmp_path):
  w = np.random.default_rng(0).standard_normal((3, 3, 5, 8)).astype(np.float32)
  q = mcq_jax.quantize({"w": w}, jax.random.key(0), bits=4, group_size=16)
  mcq_jax.save(tmp_path / "q.safetensors", q)
  loaded = mcq_jax.load(tmp_path / "q.safetensors")["w"]
  assert loaded.group_size == 16 and loaded.scale.shape == (3, 1, 1, 8)
  np.testing.assert_array_equal(loaded.values, q["w"].values)
  np.testing.assert_array_equal(loaded.scale, q["w"].scale)
  leaf = mcq_jax.summary(q).leaves[0]
  assert leaf.groups == 24 and len(leaf.samples_per_group) == 24


def test_mcq_apply_sums_exact_integer_products_block_by_block():
  model = nn.Dense(5)
  x = jax.random.normal(jax.random.key(0), (3, 40))
  params = model.init(jax.random.key(1), x)["params"]
  q = mcq_jax.quantize(params, jax.random.key(2), bits=4, group_size=16)
  key = jax.random.key(3)
  y, report = mcq_jax.mcq_apply(
    model, {"params": q}, x, key=key, return_report=True
  )
  assert report.integer_layers == ("<root>",)
  assert report.layers[0].contraction == "int8"
  jitted = jax.jit(
    lambda p, x, k: mcq_jax.mcq_apply(model, {"params": p}, x, key=k)
  )(q, x, key)
  np.testing.assert_array_equal(jitted, y)
  # int64 partial sums per block (16, 16 and 8 inputs), each rescaled
  a = mcq_jax.quantize_activations(x, path_key(key, "<root>"), 4.0)
  qa = np.asarray(a.values, np.int64)
  qw = np.asarray(q["kernel"].values, np.int64)
  scale = np.asarray(q["kernel"].scale, np.float64)
  parts = [
    (qa[:, 16 * b : 16 * (b + 1)] @ qw[16 * b : 16 * (b + 1)]) * scale[b]
    for b in range(3)
  ]
  expected = sum(parts) * np.asarray(a.scale, np.float64) + np.asarray(
    q["bias"], np.float64
  )
  np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=2e-6)


@pytest.mark.parametrize("strides", [1, 2])
def test_mcq_apply_runs_blocked_convs_in_integers(strides):
  # 3x3x3 = 27 values per output: blocks of 8, 8, 8 and 3 across taps
  model = nn.Conv(4, (3, 3), strides=strides, padding="SAME")
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
  params = model.init(jax.random.key(1), x)["params"]
  q = mcq_jax.quantize(params, jax.random.key(2), bits=5, group_size=8)
  assert q["kernel"].num_blocks == 4
  key = jax.random.key(3)
  y, report = mcq_jax.mcq_apply(
    model, {"params": q}, x, key=key, return_report=True
  )
  assert report.integer_layers == ("<root>",), report
  jitted = jax.jit(
    lambda p, x, k: mcq_jax.mcq_apply(model, {"params": p}, x, key=k)
  )(q, x, key)
  np.testing.assert_array_equal(jitted, y)
  # the float convolution of the sampled activations and the blocked kernel
  a = mcq_jax.quantize_activations(x, path_key(key, "<root>"), 4.0)
  expected = model.apply(
    {"params": mcq_jax.dequantize(q)}, a.dequantize(jnp.float32)
  )
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  assert report.layers[0].contraction in ("int8", "int32", "float32")


def test_mcq_apply_runs_grouped_blocked_convs_in_float_and_says_so():
  model = nn.Conv(6, (3, 3), feature_group_count=3)
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
  params = model.init(jax.random.key(1), x)["params"]
  q = mcq_jax.quantize(params, jax.random.key(2), group_size=4)
  key = jax.random.key(3)
  y, report = mcq_jax.mcq_apply(
    model, {"params": q}, x, key=key, return_report=True
  )
  assert "feature_group_count > 1" in report.layers[0].note
  assert report.integer_layers == ()
  a = mcq_jax.quantize_activations(x, path_key(key, "<root>"), 4.0)
  expected = model.apply({"params": mcq_jax.dequantize(q)}, a.dequantize())
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_bad_group_sizes():
  w = {"w": jnp.ones((4, 2))}
  for bad in (0, 2.0, True):
    with pytest.raises(ValueError, match="group_size must be an int >= 1"):
      mcq_jax.quantize(w, jax.random.key(0), group_size=bad)
  with pytest.raises(ValueError, match="needs granularity='per_channel'"):
    mcq_jax.quantize(
      w, jax.random.key(0), group_size=2, granularity="per_tensor"
    )
  with pytest.raises(ValueError, match="needs granularity='per_channel'"):
    mcq_jax.round_to_nearest(w, bits=4, group_size=2)


def test_stacked_blocked_kernels_slice_with_their_scales_under_nn_scan():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return nn.relu(nn.Dense(40)(x)), None

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      scan = nn.scan(
        Block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        length=3,
      )
      return scan()(x, None)[0]

  model = Net()
  x = jax.random.normal(jax.random.key(0), (2, 40))
  params = model.init(jax.random.key(1), x)["params"]
  q = mcq_jax.quantize(
    params,
    jax.random.key(2),
    where="kernel",
    stack_axes=0,
    bits=4,
    group_size=16,
  )
  kernel = q["ScanBlock_0"]["Dense_0"]["kernel"]
  assert kernel.scale.shape == (3, 3, 40) and kernel.num_blocks == 3
  # weights only: exactly the float model on the dequantized stack
  y = mcq_jax.mcq_apply(
    model, {"params": q}, x, key=jax.random.key(3), activation_samples=None
  )
  np.testing.assert_array_equal(
    y, model.apply({"params": mcq_jax.dequantize(q)}, x)
  )
  # sampled activations: every iteration's slice runs block by block
  _, report = mcq_jax.mcq_apply(
    model, {"params": q}, x, key=jax.random.key(3), return_report=True
  )
  assert report.layers and all(
    layer.integer and layer.lifted for layer in report.layers
  )
