"""``mcq_call`` on NNX models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mcq_jax
from mcq_jax._keys import path_key


def _quantize_in_place(model, **kw):
  # written for per-tensor scales; the library default is per channel
  kw = {"granularity": "per_tensor", **kw}
  nnx.update(
    model,
    mcq_jax.quantize(nnx.state(model, nnx.Param), jax.random.key(1), **kw),
  )
  return model


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.norm = nnx.LayerNorm(4 * 36, rngs=rngs)
    self.proj = nnx.Einsum("bf,fk->bk", (4 * 36, 8), (8,), rngs=rngs)
    self.head = nnx.LinearGeneral(8, (2, 3), rngs=rngs)

  def __call__(self, x):
    h = self.drop(nnx.relu(self.bn(self.conv(x))))
    h = self.norm(h.reshape(h.shape[0], -1))
    return self.head(nnx.relu(self.proj(h)))


def test_every_covered_layer_runs_in_integers_and_attributes_are_restored():
  model = _quantize_in_place(_Net(nnx.Rngs(0)), granularity="per_channel")
  model.eval()
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 1))
  before = (
    model.conv.conv_general_dilated,
    model.proj.einsum_op,
    model.head.dot_general,
  )
  y, report = mcq_jax.mcq_call(
    model, x, key=jax.random.key(3), return_report=True, activation_samples=2.0
  )
  assert y.shape == (2, 2, 3)
  assert report.integer_layers == ("conv", "proj", "head"), str(report)
  assert (
    model.conv.conv_general_dilated,
    model.proj.einsum_op,
    model.head.dot_general,
  ) == before


def test_linear_integer_result_is_exact():
  model = _quantize_in_place(nnx.Linear(7, 5, rngs=nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(3), (4, 7))
  key = jax.random.key(9)
  y = mcq_jax.mcq_call(model, x, key=key, activation_samples=3.0)
  a = mcq_jax.quantize_activations(x, path_key(key, "<root>"), 3.0)
  w = model.kernel.get_value()
  expected = np.asarray(a.values, np.int64) @ np.asarray(
    w.values, np.int64
  ) * np.asarray(a.scale, np.float64) * float(w.scale.reshape(())) + np.asarray(
    model.bias.get_value()
  )
  np.testing.assert_allclose(
    np.asarray(y, np.float64), expected, rtol=2e-6, atol=1e-6
  )


def test_same_outputs_as_linen_for_the_same_weights_and_key():
  import flax.linen as nn

  x = jax.random.normal(jax.random.key(0), (3, 6))
  nnx_model = _quantize_in_place(nnx.Linear(6, 4, rngs=nnx.Rngs(0)))
  params = {
    "kernel": nnx_model.kernel.get_value(),
    "bias": nnx_model.bias.get_value(),
  }
  key = jax.random.key(5)
  y_nnx = mcq_jax.mcq_call(nnx_model, x, key=key, activation_samples=2.0)
  y_linen = mcq_jax.mcq_apply(
    nn.Dense(4), {"params": params}, x, key=key, activation_samples=2.0
  )
  np.testing.assert_array_equal(y_nnx, y_linen)


def test_plain_call_runs_on_dequantized_weights():
  model = nnx.Sequential(
    nnx.Linear(5, 8, rngs=nnx.Rngs(0)),
    nnx.relu,
    nnx.Linear(8, 2, rngs=nnx.Rngs(1)),
  )
  x = jax.random.normal(jax.random.key(0), (3, 5))
  _quantize_in_place(model)
  y = model(x)
  deq = nnx.Sequential(
    nnx.Linear(5, 8, rngs=nnx.Rngs(0)),
    nnx.relu,
    nnx.Linear(8, 2, rngs=nnx.Rngs(1)),
  )
  nnx.update(deq, mcq_jax.dequantize(nnx.state(model, nnx.Param)))
  np.testing.assert_array_equal(y, deq(x))
  np.testing.assert_array_equal(
    y,
    mcq_jax.mcq_call(model, x, key=jax.random.key(0), activation_samples=None),
  )


def test_nnx_jit_and_vmap_over_keys():
  model = _quantize_in_place(nnx.Linear(6, 3, rngs=nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(0), (2, 6))

  # stratified: with 6 inputs and K_a = 2, systematic sampling has so few
  # distinct outcomes that two of five keys may coincide
  @nnx.jit
  def run(model, x, key):
    return mcq_jax.mcq_call(
      model, x, key=key, sampler="stratified", activation_samples=2.0
    )

  key = jax.random.key(4)
  np.testing.assert_array_equal(
    run(model, x, key),
    mcq_jax.mcq_call(
      model, x, key=key, sampler="stratified", activation_samples=2.0
    ),
  )
  ensemble = nnx.vmap(run, in_axes=(None, None, 0))(
    model, x, jax.random.split(key, 5)
  )
  assert (
    ensemble.shape == (5, 2, 3)
    and len({np.asarray(e).tobytes() for e in ensemble}) == 5
  )
  assert model.dot_general is jax.lax.dot_general


def test_errors_and_restoration_on_error():
  model = _quantize_in_place(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="selects none of the covered layers"):
    mcq_jax.mcq_call(
      model,
      jnp.ones((1, 3)),
      key=jax.random.key(0),
      where="conv",
      activation_samples=2.0,
    )
  with pytest.raises(FloatingPointError, match="layer '<root>'"):
    mcq_jax.mcq_call(
      model,
      jnp.full((1, 3), jnp.nan),
      key=jax.random.key(0),
      activation_samples=2.0,
    )
  assert model.dot_general is jax.lax.dot_general
  with pytest.raises(TypeError, match="nnx.Module"):
    mcq_jax.mcq_call(
      lambda x: x, jnp.ones(3), key=jax.random.key(0), activation_samples=2.0
    )


class _NoNorms(nnx.Module):
  """Covered layers only: normalisations are float code whose eager and
  jitted results XLA itself does not keep identical."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.proj = nnx.Einsum("bf,fk->bk", (4 * 36, 8), (8,), rngs=rngs)
    self.head = nnx.LinearGeneral(8, (2, 3), rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.conv(x)).reshape(x.shape[0], -1)
    return self.head(nnx.relu(self.proj(h)))


def test_nnx_jit_matches_eager_with_non_zero_biases():
  model = _NoNorms(nnx.Rngs(0))
  for i, layer in enumerate((model.conv, model.proj, model.head)):
    layer.bias[...] = jax.random.normal(
      jax.random.key(10 + i), layer.bias[...].shape
    )
  model = _quantize_in_place(model, granularity="per_channel")
  x = jax.random.normal(jax.random.key(0), (8, 6, 6, 1))
  run = lambda model, x, key: mcq_jax.mcq_call(model, x, key=key)
  key = jax.random.key(4)
  np.testing.assert_array_equal(run(model, x, key), nnx.jit(run)(model, x, key))


class _Block(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(5, 4, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return self.lin(x)


@nnx.vmap(in_axes=0, out_axes=0)
def _make_blocks(rngs):
  return _Block(rngs)


class _Stack(nnx.Module):
  """Three stacked blocks run by nnx.scan; the carry is kept and every
  iteration's output is emitted."""

  def __init__(self):
    self.blocks = _make_blocks(nnx.Rngs(0).split(3))

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
    def body(x, block):
      return x, block(x)

    return body(x, self.blocks)[1]


def test_nnx_scan_stacks_run_in_integers_and_are_unbiased():
  model = _Stack()
  x = jax.random.normal(jax.random.key(0), (6, 5))
  state = nnx.state(model, nnx.Param)
  nnx.update(model, mcq_jax.quantize(state, jax.random.key(1), stack_axes=0))
  ys, report = mcq_jax.mcq_call(
    model, x, key=jax.random.key(2), return_report=True
  )
  assert ys.shape == (3, 6, 4)
  assert report.integer_layers == ("blocks/lin",)
  assert report.layers[0].lifted and "lifted transform" in str(report)
  expected = np.asarray(model(x))  # a plain call: float, dequantized weights
  draws = nnx.vmap(
    lambda m, x, k: mcq_jax.mcq_call(m, x, key=k), in_axes=(None, None, 0)
  )(model, x, jax.random.split(jax.random.key(3), 200))
  mean = np.asarray(draws).mean(axis=0)
  stderr = np.asarray(draws).std(axis=0) / np.sqrt(200)
  assert np.all(np.abs(mean - expected) < 5 * stderr + 1e-5)


def test_each_nnx_scan_iteration_draws_its_own_activation_noise():
  model = _Stack()
  w = model.blocks.lin.kernel[...][0]
  model.blocks.lin.kernel[...] = jnp.stack([w, 2 * w, 4 * w])  # float stack
  x = jax.random.normal(jax.random.key(0), (16, 5))
  ys = mcq_jax.mcq_call(model, x, key=jax.random.key(1), activation_samples=2.0)
  # identical noise in every iteration would give y, 2y and 4y exactly
  assert not np.array_equal(ys[1], 2 * ys[0])
  assert not np.array_equal(ys[2], 4 * ys[0])


def test_nnx_vmap_and_remat_layers_run_in_integers():
  class Heads(nnx.Module):
    def __init__(self):
      self.blocks = _make_blocks(nnx.Rngs(0).split(2))

    def __call__(self, x):
      run = nnx.vmap(lambda block, x: block(x), in_axes=(0, None))
      return run(self.blocks, x)

  class Remat(nnx.Module):
    def __init__(self):
      self.block = _Block(nnx.Rngs(0))

    def __call__(self, x):
      return nnx.remat(lambda block, x: block(x))(self.block, x)

  x = jax.random.normal(jax.random.key(0), (3, 5))
  for model, stack in ((Heads(), 0), (Remat(), ())):
    state = nnx.state(model, nnx.Param)
    q = mcq_jax.quantize(state, jax.random.key(1), stack_axes=stack)
    nnx.update(model, q)
    y, report = mcq_jax.mcq_call(
      model, x, key=jax.random.key(2), return_report=True
    )
    assert report.layers and all(r.integer for r in report.layers), report
    assert y.shape == model(x).shape


def test_a_jitted_call_makes_one_check_for_all_its_layers(check_kind):
  # on the CPU, the native check (no callback, no effect); elsewhere, one
  # host callback
  from tests.test_runtime_checks import assert_checks_in

  model = nnx.Sequential(
    nnx.Linear(4, 8, rngs=nnx.Rngs(0)),
    nnx.Linear(8, 8, rngs=nnx.Rngs(1)),
    nnx.Linear(8, 2, rngs=nnx.Rngs(2)),
  )
  params = nnx.state(model, nnx.Param)
  nnx.update(model, mcq_jax.quantize(params, jax.random.key(1)))
  graphdef, state = nnx.split(model)
  run = lambda state, x, k: mcq_jax.mcq_call(
    nnx.merge(graphdef, state), x, key=k
  )
  x, key = jnp.ones((2, 4)), jax.random.key(0)
  assert_checks_in(jax.make_jaxpr(run)(state, x, key).jaxpr, check_kind)
  checked = mcq_jax.checked(jax.jit(run))
  assert checked(state, x, key).shape == (2, 2)
  # the inf reaches every layer: the first one is named
  with pytest.raises(FloatingPointError, match="^layer 'layers/0': its input"):
    checked(state, x.at[0, 0].set(jnp.inf), key)
