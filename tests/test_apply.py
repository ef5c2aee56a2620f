"""``mcq_apply`` on linen models: integer layers, statistics, errors."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mcq_jax
from mcq_jax._keys import path_key


def _init(model, *inputs):
  return model.init(jax.random.key(0), *inputs)


def _quantized(variables, k=2.0, **kw):
  return {
    **variables,
    "params": mcq_jax.quantize(
      variables["params"], jax.random.key(1), samples_per_weight=k, **kw
    ),
  }


def _assert_exact_dense(y, a, w, bias):
  """``y`` is the int64 product of the integers, rescaled, plus the bias."""
  y_int = np.asarray(a.values, np.int64) @ np.asarray(w.values, np.int64)
  scale = np.asarray(a.scale, np.float64) * np.asarray(w.scale, np.float64)
  expected = y_int * scale + np.asarray(bias, np.float64)
  np.testing.assert_allclose(
    np.asarray(y, np.float64), expected, rtol=2e-6, atol=1e-6
  )


def test_dense_integer_result_is_the_exact_integer_product():
  model = nn.Dense(5)
  x = jax.random.normal(jax.random.key(3), (4, 7))
  v = _quantized(_init(model, x), granularity="per_channel")
  key = jax.random.key(9)
  y, report = mcq_jax.mcq_apply(
    model, v, x, key=key, activation_samples=3.0, return_report=True
  )
  assert report.integer_layers == ("<root>",)
  a = mcq_jax.quantize_activations(x, path_key(key, "<root>"), 3.0)
  w = v["params"]["kernel"]
  _assert_exact_dense(y, a, w, v["params"]["bias"])
  # and it is the float computation on the dequantized values
  float_y = np.asarray(a.dequantize(jnp.float32), np.float64) @ np.asarray(
    w.dequantize(), np.float64
  )
  np.testing.assert_allclose(
    np.asarray(y, np.float64),
    float_y + np.asarray(v["params"]["bias"]),
    rtol=1e-5,
    atol=1e-5,
  )


_CONVS = [
  dict(features=4, kernel_size=(3,), padding="SAME"),
  dict(features=4, kernel_size=(3, 3), padding="VALID", strides=(2, 1)),
  dict(
    features=6,
    kernel_size=(3, 2),
    padding=((1, 2), (0, 1)),
    kernel_dilation=(2, 1),
  ),
  dict(
    features=6,
    kernel_size=(2, 2),
    padding=1,
    input_dilation=(2, 2),
    feature_group_count=3,
  ),
  dict(features=4, kernel_size=(2, 2, 2), padding="SAME"),
]


@pytest.mark.parametrize("conv", _CONVS)
@pytest.mark.parametrize("granularity", mcq_jax.GRANULARITIES)
def test_conv_integer_result_equals_float_conv_of_the_integers(
  conv, granularity
):
  model = nn.Conv(**conv)
  spatial = (6,) * len(conv["kernel_size"])
  x = jax.random.normal(jax.random.key(3), (2, *spatial, 3))
  v = _quantized(_init(model, x), granularity=granularity)
  key = jax.random.key(5)
  y, report = mcq_jax.mcq_apply(
    model, v, x, key=key, activation_samples=2.0, return_report=True
  )
  assert report.integer_layers == ("<root>",), str(report)
  a = mcq_jax.quantize_activations(x, path_key(key, "<root>"), 2.0)
  w = v["params"]["kernel"]
  # The same Flax conv on the integers as floats is exact (small sums).
  ints = {
    "params": {
      "kernel": jnp.asarray(w.values, jnp.float32),
      "bias": jnp.zeros_like(v["params"]["bias"]),
    }
  }
  y_int = model.apply(ints, jnp.asarray(a.values, jnp.float32))
  expected = (
    y_int * a.scale.reshape(-1, *([1] * (y_int.ndim - 1))) * w.scale.reshape(-1)
    + v["params"]["bias"]
  )
  np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)


def test_circular_padding_and_masks_run_in_integers():
  mask = np.ones((3, 3, 2, 4), np.float32)
  mask[1, 1] = 0
  model = nn.Conv(4, (3, 3), padding="CIRCULAR", mask=jnp.asarray(mask))
  x = jax.random.normal(jax.random.key(0), (2, 5, 5, 2))
  v = _quantized(_init(model, x))
  y, report = mcq_jax.mcq_apply(
    model,
    v,
    x,
    key=jax.random.key(1),
    return_report=True,
    activation_samples=2.0,
  )
  assert y.shape == (2, 5, 5, 4) and report.integer_layers == ("<root>",)


@pytest.mark.parametrize("per_token", [False, True])
def test_einsum_and_dense_general(per_token):
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Einsum((5, 2, 3), "btf,fhd->bthd")(x)
      return nn.DenseGeneral(4, axis=(-2, -1))(h)

  model = Net()
  x = jax.random.normal(jax.random.key(0), (3, 4, 5))
  v = _quantized(_init(model, x), granularity="per_channel")
  key = jax.random.key(2)
  y, report = mcq_jax.mcq_apply(
    model,
    v,
    x,
    key=key,
    per_token=per_token,
    return_report=True,
    activation_samples=2.0,
  )
  assert y.shape == (3, 4, 4)
  assert report.integer_layers == ("Einsum_0", "DenseGeneral_0"), str(report)
  # the einsum output matches its integer reference
  a = mcq_jax.quantize_activations(
    x, path_key(key, "Einsum_0"), 2.0, group_ndim=2 if per_token else 1
  )
  w = v["params"]["Einsum_0"]["kernel"]
  ref = np.einsum(
    "btf,fhd->bthd",
    np.asarray(a.values, np.int64),
    np.asarray(w.values, np.int64),
  )
  ref = (
    ref
    * np.asarray(a.scale, np.float64)[..., None]
    * np.asarray(w.scale, np.float64)
  )
  ref = ref + np.asarray(v["params"]["Einsum_0"]["bias"])
  _, state = model.apply(
    {"params": mcq_jax.dequantize(v["params"])},
    x,
    capture_intermediates=True,
    mutable=["intermediates"],
  )
  got = mcq_jax.mcq_apply(
    model,
    v,
    x,
    key=key,
    per_token=per_token,
    capture_intermediates=True,
    mutable=["intermediates"],
    activation_samples=2.0,
  )[1]
  np.testing.assert_allclose(
    got["intermediates"]["Einsum_0"]["__call__"][0], ref, rtol=2e-6, atol=1e-6
  )
  assert state["intermediates"]["Einsum_0"]["__call__"][0].shape == ref.shape


def test_per_token_groups_each_position():
  model = nn.Dense(3)
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  a = mcq_jax.quantize_activations(x, jax.random.key(1), 1.5, group_ndim=2)
  assert a.scale.shape == (2, 5, 1)
  np.testing.assert_array_equal(
    np.abs(np.asarray(a.values)).sum(-1), np.full((2, 5), 12)
  )
  v = _quantized(_init(model, x))
  y = mcq_jax.mcq_apply(
    model, v, x, key=jax.random.key(1), per_token=True, activation_samples=2.0
  )
  assert y.shape == (2, 5, 3)


def test_weights_only_equals_plain_apply_on_dequantized_params():
  model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(3)])
  x = jax.random.normal(jax.random.key(0), (4, 8))
  v = _quantized(_init(model, x))
  y = mcq_jax.mcq_apply(
    model, v, x, key=jax.random.key(0), activation_samples=None
  )
  np.testing.assert_array_equal(
    y, model.apply({"params": mcq_jax.dequantize(v["params"])}, x)
  )
  # QArray is a Flax metadata box: plain apply runs on the dequantized weights
  np.testing.assert_array_equal(y, model.apply(v, x))


def test_float_params_sample_activations_only():
  model = nn.Dense(3)
  x = jax.random.normal(jax.random.key(0), (4, 8))
  v = _init(model, x)
  y, report = mcq_jax.mcq_apply(
    model,
    v,
    x,
    key=jax.random.key(1),
    return_report=True,
    activation_samples=2.0,
  )
  (layer,) = report.layers
  assert (
    layer.weights == "float"
    and layer.activations == "sampled"
    and not layer.integer
  )
  a = mcq_jax.quantize_activations(
    x, path_key(jax.random.key(1), "<root>"), 2.0
  )
  np.testing.assert_allclose(
    y, model.apply(v, a.dequantize()), rtol=1e-6, atol=1e-6
  )


def test_uncovered_layers_run_in_float_on_dequantized_weights():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2)(nn.ConvTranspose(3, (2, 2))(x).reshape(x.shape[0], -1))

  model = Net()
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
  v = _quantized(_init(model, x))
  assert isinstance(v["params"]["ConvTranspose_0"]["kernel"], mcq_jax.QArray)
  y, report = mcq_jax.mcq_apply(
    model,
    v,
    x,
    key=jax.random.key(1),
    return_report=True,
    activation_samples=2.0,
  )
  assert [r.path for r in report.layers] == [
    "ConvTranspose_0",
    "Dense_0",
  ] and y.shape == (2, 2)
  assert report.integer_layers == ("Dense_0",)
  assert (
    "not covered" in report.layers[0].note and report.layers[0].weights == "int"
  )


def test_jit_matches_eager_and_vmap_gives_an_ensemble():
  model = nn.Sequential(
    [
      nn.Conv(4, (3, 3)),
      nn.relu,
      lambda h: h.reshape(h.shape[0], -1),
      nn.Dense(3),
    ]
  )
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 1))
  v = _quantized(_init(model, x))
  run = lambda v, x, key: mcq_jax.mcq_apply(
    model, v, x, key=key, activation_samples=2.0
  )
  key = jax.random.key(4)
  eager = run(v, x, key)
  jitted = jax.jit(run)
  np.testing.assert_array_equal(eager, jitted(v, x, key))
  other = jitted(v, x, jax.random.key(5))  # new key, same compiled function
  assert not np.array_equal(eager, other)
  ensemble = jax.vmap(run, in_axes=(None, None, 0))(
    v, x, jax.random.split(key, 8)
  )
  assert (
    ensemble.shape == (8, 2, 3)
    and len({np.asarray(e).tobytes() for e in ensemble}) == 8
  )


@pytest.mark.parametrize("sampler", mcq_jax.SAMPLERS)
def test_linear_layer_outputs_are_unbiased_over_keys(sampler):
  model = nn.Dense(4)
  x = jax.random.normal(jax.random.key(0), (3, 10)) * jnp.logspace(-2, 0, 10)
  v = _quantized(_init(model, x))
  reps = 4096
  outs = jax.jit(
    jax.vmap(
      lambda k: mcq_jax.mcq_apply(
        model, v, x, key=k, sampler=sampler, activation_samples=1.0
      )
    )
  )(jax.random.split(jax.random.key(3), reps))
  outs = np.asarray(outs, np.float64)
  target = np.asarray(
    model.apply({"params": mcq_jax.dequantize(v["params"])}, x), np.float64
  )
  se = outs.std(axis=0) / np.sqrt(reps)
  assert (np.abs(outs.mean(axis=0) - target) <= 5 * se + 1e-6).all()
  assert outs.std(axis=0).min() > 0  # the outputs really vary with the key


class _BNNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.Conv(8, (3, 3))(x)
    h = nn.BatchNorm(use_running_average=not train)(h)
    h = nn.Dropout(0.5, deterministic=not train)(nn.relu(h))
    h = nn.LayerNorm()(h.reshape(h.shape[0], -1))
    return nn.Dense(3)(h)


def test_batchnorm_dropout_layernorm_model():
  model = _BNNet()
  x = jax.random.normal(jax.random.key(0), (4, 6, 6, 1))
  v = _quantized(model.init(jax.random.key(0), x, train=False))
  y = mcq_jax.mcq_apply(
    model,
    v,
    x,
    key=jax.random.key(1),
    train=False,
    mutable=False,
    activation_samples=2.0,
  )
  assert y.shape == (4, 3) and bool(jnp.isfinite(y).all())
  y, updates = mcq_jax.mcq_apply(
    model,
    v,
    x,
    key=jax.random.key(1),
    train=True,
    mutable=["batch_stats"],
    rngs={"dropout": jax.random.key(2)},
    activation_samples=2.0,
  )
  assert "batch_stats" in updates and y.shape == (4, 3)


def test_layers_called_twice_get_independent_keys():
  class Shared(nn.Module):
    @nn.compact
    def __call__(self, x):
      dense = nn.Dense(6)
      return dense(x), dense(x)

  model = Shared()
  x = jax.random.normal(jax.random.key(0), (2, 6))
  (y1, y2), report = mcq_jax.mcq_apply(
    model,
    _quantized(_init(model, x)),
    x,
    key=jax.random.key(1),
    return_report=True,
    activation_samples=2.0,
  )
  assert [r.path for r in report.layers] == ["Dense_0", "Dense_0#1"]
  assert not np.array_equal(y1, y2)


def test_where_selects_layers_and_rejects_selectors_that_match_nothing():
  model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
  x = jnp.ones((1, 3))
  v = _quantized(_init(model, x))
  _, report = mcq_jax.mcq_apply(
    model,
    v,
    x,
    key=jax.random.key(0),
    where="layers_2",
    return_report=True,
    activation_samples=2.0,
  )
  assert [r.path for r in report.layers] == ["layers_2"]
  with pytest.raises(
    ValueError, match="selects none of the covered layers.*layers_0"
  ):
    mcq_jax.mcq_apply(
      model, v, x, key=jax.random.key(0), where="conv", activation_samples=2.0
    )
  with pytest.raises(TypeError, match="`where` must be"):
    mcq_jax.mcq_apply(
      model, v, x, key=jax.random.key(0), where=1, activation_samples=2.0
    )


def test_bad_options_and_inputs():
  model = nn.Dense(2)
  x = jnp.ones((1, 3))
  v = _quantized(_init(model, x))
  for bad in (0, -1.0, float("nan"), True):
    with pytest.raises(
      ValueError, match="activation_samples must be a finite number > 0"
    ):
      mcq_jax.mcq_apply(
        model, v, x, key=jax.random.key(0), activation_samples=bad
      )
  with pytest.raises(ValueError, match="unknown sampler"):
    mcq_jax.mcq_apply(
      model,
      v,
      x,
      key=jax.random.key(0),
      sampler="halton",
      activation_samples=2.0,
    )
  bad_x = x.at[0, 1].set(jnp.nan)
  with pytest.raises(
    FloatingPointError, match="layer '<root>': its input has non-finite"
  ):
    mcq_jax.mcq_apply(
      model, v, bad_x, key=jax.random.key(0), activation_samples=2.0
    )
  with pytest.raises(Exception, match="ScopeParamShapeError|shape"):
    mcq_jax.mcq_apply(
      nn.Dense(5), v, x, key=jax.random.key(0), activation_samples=2.0
    )


def test_runtime_errors_under_jit(fresh_python):
  code, err = fresh_python("""
      import jax, jax.numpy as jnp, flax.linen as nn, mcq_jax
      model = nn.Dense(2)
      x = jnp.ones((1, 3))
      v = model.init(jax.random.key(0), x)
      key = jax.random.key(0)
      run = jax.jit(lambda x: mcq_jax.mcq_apply(model, v, x, key=key))
      jax.block_until_ready(run(x.at[0, 1].set(jnp.nan)))
  """)
  assert code != 0 and "layer '<root>': its input has non-finite values" in err
  code, err = fresh_python("""
      import jax, jax.numpy as jnp, flax.linen as nn, mcq_jax
      model = nn.Dense(1, use_bias=False)
      x = jnp.array([[1.0, 1e-3, 1e-3, 1e-3]])
      w = {"kernel": jnp.array([[1.0], [1e-3], [1e-3], [1e-3]])}
      wq = mcq_jax.quantize(w, jax.random.key(1), samples_per_weight=20000.0)
      run = jax.jit(lambda x, k: mcq_jax.mcq_apply(
          model, {"params": wq}, x, key=k, activation_samples=20000.0))
      jax.block_until_ready(run(x, jax.random.key(0)))
  """)
  assert code != 0 and "layer '<root>': int32 accumulation overflows" in err


def test_int32_overflow_is_reported():
  model = nn.Dense(1, use_bias=False)
  x = jnp.array([[1.0, 1e-3, 1e-3, 1e-3]])
  v = {"params": {"kernel": jnp.array([[1.0], [1e-3], [1e-3], [1e-3]])}}
  vq = _quantized(v, k=20000.0, where=lambda p, leaf: True)  # N_w = 80,000
  with pytest.raises(
    OverflowError, match="layer '<root>': int32 accumulation overflows"
  ):
    mcq_jax.mcq_apply(
      model, vq, x, key=jax.random.key(0), activation_samples=20000.0
    )
  y = mcq_jax.mcq_apply(
    model, vq, x, key=jax.random.key(0), activation_samples=100.0
  )
  assert bool(jnp.isfinite(y).all())


def test_default_activation_samples_is_four():
  """K_a = 4 by default (chosen from the committed study; README)."""
  model = nn.Dense(3)
  x = jax.random.normal(jax.random.key(0), (2, 10))
  v = _quantized(_init(model, x))
  key = jax.random.key(5)
  np.testing.assert_array_equal(
    mcq_jax.mcq_apply(model, v, x, key=key),
    mcq_jax.mcq_apply(
      model, v, x, key=key, activation_samples=4.0, sampler="systematic"
    ),
  )
  assert not np.array_equal(
    mcq_jax.mcq_apply(model, v, x, key=key),
    mcq_jax.mcq_apply(model, v, x, key=key, activation_samples=2.0),
  )


@pytest.mark.parametrize(
  "equation, shape, x_shape",
  [
    ("btd,dhk->bhtk", (5, 3, 2), (2, 7, 5)),
    ("...d,dk->...k", (5, 4), (2, 3, 5)),
    ("bd,dk->kb", (5, 4), (3, 5)),
  ],
)
def test_einsum_bias_is_added_as_flax_adds_it(equation, shape, x_shape):
  model = nn.Einsum(shape, equation, bias_init=nn.initializers.normal(1.0))
  x = jax.random.normal(jax.random.key(0), x_shape)
  v = _quantized(_init(model, x))
  # weights-only: the same float computation, our bias broadcast against Flax's
  np.testing.assert_allclose(
    mcq_jax.mcq_apply(
      model, v, x, key=jax.random.key(1), activation_samples=None
    ),
    model.apply(v, x),
    rtol=1e-6,
    atol=1e-6,
  )


def _random_biases(variables, seed=7):
  """Non-zero biases (init gives zeros, which hide the rescale-add order)."""
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  return jax.tree_util.tree_map_with_path(
    lambda path, leaf: (
      jax.random.normal(next(keys), leaf.shape)
      if path[-1].key == "bias"
      else leaf
    ),
    variables,
  )


@pytest.mark.parametrize(
  "model, shape",
  [
    (nn.Dense(32), (64, 48)),
    (nn.Conv(8, (3, 3)), (4, 9, 9, 3)),
    (nn.DenseGeneral((4, 8), axis=-1), (16, 24)),
    (nn.Einsum((24, 16), "bi,io->bo"), (32, 24)),
  ],
)
def test_jit_matches_eager_with_non_zero_biases(model, shape):
  x = jax.random.normal(jax.random.key(0), shape)
  v = _quantized(_random_biases(_init(model, x)))
  run = lambda v, x, key: mcq_jax.mcq_apply(model, v, x, key=key)
  key = jax.random.key(4)
  eager, jitted = run(v, x, key), jax.jit(run)(v, x, key)
  np.testing.assert_array_equal(eager, jitted)


def test_flax_errors_inside_a_layer_name_the_layer_not_the_root():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(4, name="body")(x)

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, name="head")(Block()(x))

  model = Model()
  v = _quantized(_init(model, jnp.ones((1, 5))))
  with pytest.raises(
    flax.errors.ScopeParamShapeError, match='"kernel" in "/Block_0/body"'
  ):
    mcq_jax.mcq_apply(model, v, jnp.ones((2, 6)), key=jax.random.key(0))


# -- lifted transforms: nn.scan, nn.vmap, nn.remat -----------------------------


class _Probe(nn.Module):
  """A scan body that keeps its carry and emits its layer's output."""

  @nn.compact
  def __call__(self, x, _):
    return x, nn.Dense(6, use_bias=False)(x)


class _ScanStack(nn.Module):
  @nn.compact
  def __call__(self, x):
    stack = nn.scan(
      _Probe,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      length=3,
    )
    _, ys = stack(name="layers")(x, None)
    return ys


def _powers_of_two_stack(x):
  """Stacked float kernels W, 2W, 4W: exact multiples, so identical
  activation noise in every iteration would give outputs y, 2y, 4y exactly."""
  v = _init(_ScanStack(), x)
  w = v["params"]["layers"]["Dense_0"]["kernel"][0]
  stacked = jnp.stack([w, 2 * w, 4 * w])
  return {"params": {"layers": {"Dense_0": {"kernel": stacked}}}}


def test_each_scan_iteration_draws_its_own_activation_noise():
  x = jax.random.normal(jax.random.key(0), (16, 5))
  v = _powers_of_two_stack(x)
  ys = mcq_jax.mcq_apply(
    _ScanStack(), v, x, key=jax.random.key(1), activation_samples=2.0
  )
  assert ys.shape == (3, 16, 6)
  assert not np.array_equal(ys[1], 2 * ys[0])
  assert not np.array_equal(ys[2], 4 * ys[0])
  # jit gives the same draws
  jitted = jax.jit(
    lambda v, x, k: mcq_jax.mcq_apply(
      _ScanStack(), v, x, key=k, activation_samples=2.0
    )
  )(v, x, jax.random.key(1))
  np.testing.assert_array_equal(ys, jitted)


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_stacked_kernels_quantize_per_layer_and_run_in_integers(granularity):
  model = _ScanStack()
  x = jax.random.normal(jax.random.key(0), (8, 5))
  v = _init(model, x)
  q = mcq_jax.quantize(
    v["params"], jax.random.key(2), stack_axes=0, granularity=granularity
  )
  kernel = q["layers"]["Dense_0"]["kernel"]
  per_layer = (3, 1, 6) if granularity == "per_channel" else (3, 1, 1)
  assert kernel.scale.shape == per_layer
  # Each layer is a tensor of its own: its groups hold exactly N samples.
  n = kernel.samples
  totals = np.abs(np.asarray(kernel.values)).sum(axis=1)
  if granularity == "per_tensor":
    totals = totals.sum(axis=-1)
  assert np.all(totals == n)
  for i in range(3):  # the same as quantizing layer i on its own, same groups
    layer = mcq_jax.dequantize(kernel)[i]
    w = v["params"]["layers"]["Dense_0"]["kernel"][i]
    np.testing.assert_allclose(
      np.abs(np.asarray(layer)).sum(), np.abs(np.asarray(w)).sum(), rtol=1e-5
    )
  ys, report = mcq_jax.mcq_apply(
    model, {"params": q}, x, key=jax.random.key(3), return_report=True
  )
  assert report.layers and all(r.integer for r in report.layers)
  # One entry stands for all iterations, and says so (Flax traces the body
  # twice; the report lists its layer once).
  assert [r.path for r in report.layers] == ["layers/Dense_0"]
  assert all(r.lifted for r in report.layers)
  assert "[lifted transform: one entry for all its iterations]" in str(report)
  # Unbiased over keys: the mean of many draws approaches the dequantized
  # float model.
  keys = jax.random.split(jax.random.key(4), 200)
  draws = jax.vmap(
    lambda k: mcq_jax.mcq_apply(
      model, {"params": q}, x, key=k, activation_samples=4.0
    )
  )(keys)
  expected = model.apply({"params": mcq_jax.dequantize(q)}, x)
  mean = np.asarray(draws).mean(axis=0)
  stderr = np.asarray(draws).std(axis=0) / np.sqrt(len(keys))
  assert np.all(np.abs(mean - np.asarray(expected)) < 5 * stderr + 1e-5)


def test_nn_vmap_and_nn_remat_layers_run_in_integers():
  class VmapStack(nn.Module):
    @nn.compact
    def __call__(self, x):
      dense = nn.vmap(
        nn.Dense,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=None,
        out_axes=0,
        axis_size=2,
      )
      return dense(4, name="heads")(x)

  class Remat(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.remat(nn.Dense)(4, name="body")(x)

  x = jax.random.normal(jax.random.key(0), (3, 5))
  for model, stack in ((VmapStack(), 0), (Remat(), ())):
    v = _init(model, x)
    q = mcq_jax.quantize(v["params"], jax.random.key(1), stack_axes=stack)
    y, report = mcq_jax.mcq_apply(
      model, {"params": q}, x, key=jax.random.key(2), return_report=True
    )
    assert all(r.integer for r in report.layers), report
    assert y.shape == model.apply({"params": mcq_jax.dequantize(q)}, x).shape
  heads = mcq_jax.mcq_apply(
    VmapStack(),
    {
      "params": mcq_jax.quantize(
        _init(VmapStack(), x)["params"], jax.random.key(1), stack_axes=0
      )
    },
    x,
    key=jax.random.key(2),
  )
  assert heads.shape == (2, 3, 4)


def test_stack_axes_errors_name_the_leaf():
  params = {"layers": {"kernel": jnp.ones((3, 4, 5))}}
  with pytest.raises(ValueError, match="'layers/kernel': axis 0 is both"):
    mcq_jax.quantize(params, jax.random.key(0), stack_axes=0, channel_axis=0)
  with pytest.raises(ValueError, match="'layers/kernel': stack_axes 3 is out"):
    mcq_jax.quantize(params, jax.random.key(0), stack_axes=3)
  rtn = mcq_jax.round_to_nearest(params, bits=4, stack_axes=0)
  assert rtn["layers"]["kernel"].scale.shape == (3, 1, 1)


# -- value checks: at most one host callback per call --------------------------


class _TwoLayers(nn.Module):
  """``second``'s input is -inf where ``x[:, 3]`` is 0 (log 0), so each
  layer's check can fail alone."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(4, name="first")(x[:, :3])
    h = nn.Dense(4, name="second")(h + jnp.log(x[:, 3:]))
    return nn.Dense(2, name="third")(h)


def test_a_jitted_call_makes_one_check_for_all_its_layers(check_kind):
  # on the CPU, the native check (no callback, no effect); elsewhere, one
  # host callback
  from tests.test_runtime_checks import assert_checks_in

  model = _TwoLayers()
  x = jnp.ones((2, 4))
  # K = 2,000, K_a = 20,000: the static int32 bound fails for 'second'
  # (N_a * N_w = 80,000 * 32,000), which also checks for overflow at run
  # time, besides the finite checks
  v = _quantized(_init(model, x), k=2000.0)
  run = lambda x, k: mcq_jax.mcq_apply(
    model, v, x, key=k, activation_samples=20000.0
  )
  assert_checks_in(jax.make_jaxpr(run)(x, jax.random.key(0)).jaxpr, check_kind)
  checked = mcq_jax.checked(jax.jit(run))
  key = jax.random.key(1)
  assert checked(x, key).shape == (2, 2)
  bad_first = x.at[0, 1].set(jnp.nan)
  bad_second = x.at[1, 3].set(0.0)
  with pytest.raises(FloatingPointError, match="^layer 'first': its input"):
    checked(bad_first, key)
  with pytest.raises(FloatingPointError, match="^layer 'second': its input"):
    checked(bad_second, key)
  with pytest.raises(FloatingPointError, match="^layer 'first': its input"):
    checked(bad_first.at[1, 3].set(0.0), key)  # the first failing layer
  # eagerly, the check raises at once with the count of bad values
  with pytest.raises(FloatingPointError, match=r"'second'.*\(4 of 8 values\)"):
    mcq_jax.mcq_apply(model, v, bad_second, key=key)


@pytest.mark.parametrize("bits", [3, 8])
def test_activation_bits_give_the_exact_integer_product(bits):
  model = nn.Dense(5)
  x = jax.random.normal(jax.random.key(3), (6, 40)) ** 3
  v = _init(model, x)
  v = {"params": mcq_jax.quantize(v["params"], jax.random.key(1), bits=4)}
  key = jax.random.key(9)
  y, report = mcq_jax.mcq_apply(
    model, v, x, key=key, activation_bits=bits, return_report=True
  )
  jitted = jax.jit(
    lambda v, x, k: mcq_jax.mcq_apply(model, v, x, key=k, activation_bits=bits)
  )(v, x, key)
  np.testing.assert_array_equal(jitted, y)
  # both operands fit a byte: the int8 contraction
  assert report.layers[0].contraction == "int8"
  a = mcq_jax.quantize_activations(x, path_key(key, "<root>"), bits=bits)
  top = 2 ** (bits - 1) - 1
  assert a.bits == bits and int(jnp.abs(a.values).max()) <= top
  # each example draws its own N, the largest its counts fit
  totals = np.abs(np.asarray(a.values, np.int64)).sum(axis=1)
  assert len(set(totals.tolist())) > 1 and (totals >= top).all()
  w = v["params"]["kernel"]
  _assert_exact_dense(y, a, w, v["params"]["bias"])


def test_activation_bits_replace_the_default_activation_samples_only():
  model = nn.Dense(2)
  x = jnp.ones((1, 3))
  v = _init(model, x)
  for samples in (2.0, None):
    with pytest.raises(ValueError, match="activation_bits, not both"):
      mcq_jax.mcq_apply(
        model,
        v,
        x,
        key=jax.random.key(0),
        activation_samples=samples,
        activation_bits=4,
      )
  with pytest.raises(ValueError, match="bits must be an int in"):
    mcq_jax.mcq_apply(model, v, x, key=jax.random.key(0), activation_bits=1)
