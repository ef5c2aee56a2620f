"""The exact int8 convolution: the native kernel against int64 sums."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import mcq_jax
from mcq_jax import _int8_conv, _native

# (batch, height, width, channels), (kh, kw, outputs), strides,
# ((top, bottom), (left, right)), dilation
_CASES = {
  "lenet first": ((2, 28, 28, 1), (5, 5, 6), (1, 1), ((2, 2), (2, 2)), (1, 1)),
  "lenet second": (
    (3, 14, 14, 6),
    (5, 5, 16),
    (1, 1),
    ((0, 0), (0, 0)),
    (1, 1),
  ),
  "strided, dilated, uneven": (
    (2, 9, 7, 3),
    (3, 2, 70),
    (2, 1),
    ((1, 0), (0, 3)),
    (1, 2),
  ),
  "wide outputs": (
    (4, 10, 10, 4),
    (3, 3, 130),
    (1, 2),
    ((3, 3), (1, 1)),
    (2, 1),
  ),
  "1x1, many channels": (
    (2, 5, 6, 200),
    (1, 1, 17),
    (1, 1),
    ((0, 0), (0, 0)),
    (1, 1),
  ),
  "kernel past the input": (
    (1, 3, 3, 2),
    (5, 5, 3),
    (1, 1),
    ((4, 4), (4, 4)),
    (1, 1),
  ),
}


def _reference(a, w, strides, pads, dilation):
  """The convolution in int64 (XLA's, on float64: every sum is exact
  below 2**53), wrapped to int32 (what int32 sums give)."""
  with jax.enable_x64():
    exact = lax.conv_general_dilated(
      jnp.asarray(a, jnp.float64),
      jnp.asarray(w, jnp.float64),
      strides,
      pads,
      rhs_dilation=dilation,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=lax.Precision.HIGHEST,
    )
    exact = np.asarray(exact).astype(np.int64)
  return exact.astype(np.uint64).astype(np.uint32).view(np.int32)


def _activations(shape, kind, rng):
  if kind == "int8":
    return rng.integers(-128, 128, shape).astype(np.int8)
  a = rng.integers(-127, 128, shape).astype(np.int16)
  if kind == "some high":  # a few pixels with counts past int8
    a.reshape(-1, shape[-1])[::7] = rng.integers(-30000, 30000, shape[-1])
  elif kind == "wide":  # a high digit of 128: the call is summed directly
    a.reshape(-1)[3] = 32700
  return a


@pytest.mark.parametrize("case", list(_CASES))
@pytest.mark.parametrize("kind", ["int8", "int16", "some high", "wide"])
def test_exact_against_int64(case, kind):
  x_shape, (kh, kw, outputs), strides, pads, dilation = _CASES[case]
  rng = np.random.default_rng(len(case))
  a = _activations(x_shape, kind, rng)
  w = rng.integers(-128, 128, (kh, kw, x_shape[3], outputs)).astype(np.int8)
  got = jax.jit(
    lambda a, w: _int8_conv.int8_conv(a, w, strides, pads, dilation)
  )(a, w)
  np.testing.assert_array_equal(
    np.asarray(got), _reference(a, w, strides, pads, dilation)
  )


def test_the_native_conv_is_in_use_on_this_machine():
  assert mcq_jax.native_status().int8_matmul
  fn = lambda a, w: _int8_conv.int8_conv(a, w, (1, 1), ((1, 1), (1, 1)), (1, 1))
  a, w = jnp.ones((2, 6, 6, 3), jnp.int8), jnp.ones((3, 3, 3, 4), jnp.int8)
  assert _native.INT8_CONV_TARGET in jax.jit(fn).lower(a, w).compile().as_text()
  for platform, native in (("cpu", True), ("cuda", False)):
    exported = jax.export.export(
      jax.jit(fn),
      platforms=[platform],
      disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call(_native.INT8_CONV_TARGET)
      ],
    )(a, w)
    assert (_native.INT8_CONV_TARGET in exported.mlir_module()) == native


def test_vmap_over_inputs_and_kernels():
  rng = np.random.default_rng(5)
  a = rng.integers(-128, 128, (3, 2, 8, 8, 4)).astype(np.int8)
  w = rng.integers(-128, 128, (3, 3, 3, 4, 5)).astype(np.int8)
  args = ((1, 1), ((1, 1), (1, 1)), (1, 1))
  fn = lambda a, w: _int8_conv.int8_conv(a, w, *args)
  inputs = jax.vmap(fn, (0, None))(a, w[0])
  both = jax.vmap(fn)(a, w)
  for i in range(3):
    np.testing.assert_array_equal(inputs[i], _reference(a[i], w[0], *args))
    np.testing.assert_array_equal(both[i], _reference(a[i], w[i], *args))


def test_bad_operands_are_named():
  a, w = jnp.ones((1, 5, 5, 2), jnp.int8), jnp.ones((3, 3, 2, 4), jnp.int8)
  args = ((1, 1), ((0, 0), (0, 0)), (1, 1))
  with pytest.raises(TypeError, match="int8 weights expected, got int32"):
    _int8_conv.int8_conv(a.astype(jnp.int32), w, *args)
  with pytest.raises(ValueError, match="NHWC input and HWIO kernel"):
    _int8_conv.int8_conv(a, w[:, :, :1], *args)
  with pytest.raises(ValueError, match="must be >= 1"):
    _int8_conv.int8_conv(a, w, (0, 1), args[1], args[2])
  call = jax.ffi.ffi_call(
    _native.INT8_CONV_TARGET, jax.ShapeDtypeStruct((1, 3, 3, 5), jnp.int32)
  )
  kwargs = dict(stride_h=1, stride_w=1, pad_top=0, pad_left=0)
  with pytest.raises(Exception, match="outputs 4 / 5 do not match"):
    jax.block_until_ready(call(a, w, dilation_h=1, dilation_w=1, **kwargs))


@pytest.mark.parametrize(
  "padding, strides, dilation",
  [
    ("SAME", 1, 1),
    ("VALID", 2, 1),
    (((2, 0), (1, 3)), 1, 2),
    ("CIRCULAR", 1, 1),
  ],
)
def test_conv_layers_of_mcq_apply_take_it(
  padding, strides, dilation, monkeypatch
):
  # a Conv layer's int8 product is the kernel's, and the same integers as
  # the XLA paths (the kernel switched off)
  model = nn.Conv(
    7, (3, 3), strides=strides, padding=padding, kernel_dilation=dilation
  )
  x = jax.random.normal(jax.random.key(0), (3, 9, 9, 5))
  params = model.init(jax.random.key(1), x)["params"]
  variables = {"params": mcq_jax.quantize(params, jax.random.key(2))}
  run = lambda v, x: mcq_jax.mcq_apply(model, v, x, key=jax.random.key(3))
  text = jax.jit(run).lower(variables, x).compile().as_text()
  assert _native.INT8_CONV_TARGET in text
  native = jax.jit(run)(variables, x)
  _, report = mcq_jax.mcq_apply(
    model, variables, x, key=jax.random.key(3), return_report=True
  )
  assert report.layers[0].contraction == "int8"
  status = mcq_jax.native_status()._replace(int8_matmul=False)
  monkeypatch.setattr(_native, "native_status", lambda: status)
  run_xla = lambda v, x: mcq_jax.mcq_apply(model, v, x, key=jax.random.key(3))
  xla = jax.jit(run_xla)(variables, x)
  np.testing.assert_array_equal(np.asarray(native), np.asarray(xla))
