"""The exact int8 matrix product: the native kernel against int64 sums."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import mcq_jax
from mcq_jax import _int8_matmul, _native

# Rows around the kernel's tile of 6, depths around its quads of 4, columns
# around its panels of 64 (and vectors of 16).
_SHAPES = [
  (1, 1, 1),
  (1, 3, 5),
  (1, 784, 512),
  (2, 7, 65),
  (5, 9, 63),
  (6, 4, 64),
  (7, 8, 16),
  (13, 5, 130),
  (64, 257, 200),
  (300, 256, 10),
]


def _operands(m, k, n, seed, extremes=False):
  rng = np.random.default_rng(seed)
  if extremes:  # only -128 and 127: the largest products of either sign
    a = rng.choice(np.array([-128, 127], np.int8), (m, k))
    w = rng.choice(np.array([-128, 127], np.int8), (k, n))
  else:
    a = rng.integers(-128, 128, (m, k)).astype(np.int8)
    w = rng.integers(-128, 128, (k, n)).astype(np.int8)
  return a, w


def _reference(a, w):
  """The product in int64, wrapped to int32 (what int32 sums give)."""
  exact = a.astype(np.int64) @ w.astype(np.int64)
  return exact.astype(np.uint64).astype(np.uint32).view(np.int32)


def test_the_native_product_is_in_use_on_this_machine():
  # The test machines have AVX512-VNNI: the kernel must be what runs.
  status = mcq_jax.native_status()
  assert status.available and status.int8_matmul, status
  text = (
    jax.jit(_int8_matmul.int8_matmul)
    .lower(jnp.ones((4, 8), jnp.int8), jnp.ones((8, 3), jnp.int8))
    .compile()
    .as_text()
  )
  assert _native.INT8_MATMUL_TARGET in text


@pytest.mark.parametrize("shape", _SHAPES, ids=str)
@pytest.mark.parametrize("extremes", [False, True])
def test_exact_against_int64(shape, extremes):
  a, w = _operands(*shape, seed=sum(shape), extremes=extremes)
  got = jax.jit(_int8_matmul.int8_matmul)(a, w)
  assert got.dtype == jnp.int32 and got.shape == shape[::2]
  np.testing.assert_array_equal(np.asarray(got), _reference(a, w))


@pytest.mark.parametrize("shape", [(1, 9, 70), (13, 257, 130)], ids=str)
@pytest.mark.parametrize("spread", ["int8", "some", "all", "extremes"])
def test_int16_activations_exact_against_int64(shape, spread):
  # int16 activations run as two int8 digits: rows within int8 take one
  # pass, rows above it a second, rows with a count in [32640, 32767] (a
  # high digit of 128) are summed directly; every row of every kind is exact
  m, k, n = shape
  rng = np.random.default_rng(m + k)
  a = rng.integers(-127, 128, (m, k)).astype(np.int16)
  if spread == "some":  # every other row holds larger counts
    a[::2] = rng.integers(-3000, 3000, (len(a[::2]), k))
  elif spread == "all":
    a = rng.integers(-32768, 32768, (m, k)).astype(np.int16)
  elif spread == "extremes":  # the digit edges, and -128 * 256
    edges = np.array([32767, 32640, 32639, -32768, -32640, 128, -129, 255])
    a[:, : len(edges)] = edges[: min(k, len(edges))]
  w = rng.integers(-128, 128, (k, n)).astype(np.int8)
  got = jax.jit(_int8_matmul.int8_matmul)(a, w)
  np.testing.assert_array_equal(np.asarray(got), _reference(a, w))
  xla = _int8_matmul._xla_matmul(jnp.asarray(a), jnp.asarray(w))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(xla))


def test_sums_beyond_int32_wrap_as_xlas_do():
  # 127 * 127 * 140_000 > 2**31: both products wrap modulo 2**32, and
  # agree with each other and with the wrapped int64 sum.
  k = 140_000
  a = np.full((3, k), 127, np.int8)
  a[1] = -128
  w = np.full((k, 70), 127, np.int8)
  w[:, 5] = -128
  native = np.asarray(jax.jit(_int8_matmul.int8_matmul)(a, w))
  xla = np.asarray(
    jax.jit(lambda a, w: lax.dot(a, w, preferred_element_type=jnp.int32))(a, w)
  )
  np.testing.assert_array_equal(native, _reference(a, w))
  np.testing.assert_array_equal(native, xla)
  assert (np.abs(a.astype(np.int64) @ w.astype(np.int64)) > 2**31).all()


def test_several_contracted_axes_and_leading_free_axes():
  x = _operands(2 * 3 * 5, 4 * 7, 1, seed=1)[0].reshape(2, 3, 5, 4, 7)
  kernel = _operands(4, 7 * 6 * 2, 1, seed=3)[0].reshape(4, 7, 6, 2)
  got = _int8_matmul.int8_matmul(jnp.asarray(x), jnp.asarray(kernel), 2)
  want = np.einsum(
    "abcij,ijde->abcde", x.astype(np.int64), kernel.astype(np.int64)
  )
  assert got.shape == (2, 3, 5, 6, 2)
  np.testing.assert_array_equal(np.asarray(got), want)


def test_vmap_over_inputs_kernels_and_both():
  a, w = _operands(4 * 5, 33, 70, seed=4)
  xs = a.reshape(4, 5, 33)
  ws = np.stack([w, -np.clip(w, -127, 127), w // 3, w])
  fn = _int8_matmul.int8_matmul
  cases = {
    "inputs": (jax.vmap(fn, (0, None))(xs, w), [_reference(x, w) for x in xs]),
    "kernels": (
      jax.vmap(fn, (None, 0))(xs[0], ws),
      [_reference(xs[0], v) for v in ws],
    ),
    "both": (jax.vmap(fn)(xs, ws), [_reference(x, v) for x, v in zip(xs, ws)]),
    "nested": (
      jax.vmap(jax.vmap(fn, (0, None)), (0, None))(xs.reshape(2, 2, 5, 33), w),
      np.reshape([_reference(x, w) for x in xs], (2, 2, 5, 70)),
    ),
  }
  for name, (got, want) in cases.items():
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), name)


def test_other_platforms_get_xlas_product():
  fn = jax.jit(_int8_matmul.int8_matmul)
  a, w = jnp.ones((4, 8), jnp.int8), jnp.ones((8, 3), jnp.int8)
  for platform, native in (("cpu", True), ("cuda", False), ("tpu", False)):
    exported = jax.export.export(
      fn,
      platforms=[platform],
      disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call(_native.INT8_MATMUL_TARGET)
      ],
    )(a, w)
    text = exported.mlir_module()
    assert (_native.INT8_MATMUL_TARGET in text) == native, platform
    assert ("stablehlo.dot_general" in text) != native, platform


def test_bad_operands_are_named():
  a = jnp.ones((4, 8), jnp.int8)
  with pytest.raises(TypeError, match="int8 weights expected.*int16"):
    _int8_matmul.int8_matmul(a, jnp.ones((8, 3), jnp.int16))
  with pytest.raises(TypeError, match="expected, got int32 and int8"):
    _int8_matmul.int8_matmul(a.astype(jnp.int32), jnp.ones((8, 3), jnp.int8))
  with pytest.raises(ValueError, match=r"contracted axes differ: \(8,\)"):
    _int8_matmul.int8_matmul(a, jnp.ones((9, 3), jnp.int8))
  # the kernel checks its own operands too
  call = jax.ffi.ffi_call(
    _native.INT8_MATMUL_TARGET, jax.ShapeDtypeStruct((4, 5), jnp.int32)
  )
  with pytest.raises(Exception, match=r"shapes \(4, 8\) . \(8, 3\)"):
    jax.block_until_ready(call(a, jnp.ones((8, 3), jnp.int8)))
  call = jax.ffi.ffi_call(
    _native.INT8_MATMUL_TARGET, jax.ShapeDtypeStruct((4, 3, 1), jnp.int32)
  )
  with pytest.raises(Exception, match="must be matrices"):
    jax.block_until_ready(call(a, jnp.ones((8, 3), jnp.int8)))


def test_dense_layers_of_mcq_apply_take_it(monkeypatch):
  # An int8 Dense layer's product is the kernel's, and the same integers
  # as XLA's product (the kernel switched off for one call).
  model = nn.Dense(70)
  x = jax.random.normal(jax.random.key(0), (9, 130))
  params = model.init(jax.random.key(1), x)["params"]
  variables = {"params": mcq_jax.quantize(params, jax.random.key(2))}
  run = lambda v, x: mcq_jax.mcq_apply(model, v, x, key=jax.random.key(3))
  text = jax.jit(run).lower(variables, x).compile().as_text()
  assert _native.INT8_MATMUL_TARGET in text
  _, report = mcq_jax.mcq_apply(
    model, variables, x, key=jax.random.key(3), return_report=True
  )
  assert report.layers[0].contraction == "int8"
  native = jax.jit(run)(variables, x)
  status = mcq_jax.native_status()._replace(int8_matmul=False)
  monkeypatch.setattr(_native, "native_status", lambda: status)
  run_xla = lambda v, x: mcq_jax.mcq_apply(model, v, x, key=jax.random.key(3))
  xla_text = jax.jit(run_xla).lower(variables, x).compile().as_text()
  xla = jax.jit(run_xla)(variables, x)
  assert _native.INT8_MATMUL_TARGET not in xla_text
  np.testing.assert_array_equal(np.asarray(native), np.asarray(xla))
