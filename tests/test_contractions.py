"""``_contractions``: the integer contractions and when they fall back to float.

End-to-end behaviour through Flax layers is in test_apply.py / test_nnx.py;
here the contraction factories are called directly, as Flax calls them.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from jax import lax

import mcq_jax
from mcq_jax import _contractions, _int8_matmul
from mcq_jax._keys import path_key
from mcq_jax._session import ActivationOptions, Session

_DENSE = (((1,), (0,)), ((), ()))


def _session(k_a=2.0, per_token=False):
  return Session(
    ActivationOptions(k_a, "systematic", per_token, True), jax.random.key(0)
  )


def _kernel(shape, **kw):
  w = jax.random.normal(jax.random.key(1), shape)
  return mcq_jax.quantize({"k": w}, jax.random.key(2), **kw)["k"]


def test_dot_general_is_the_rescaled_integer_product():
  kernel = _kernel((6, 3))
  x = jax.random.normal(jax.random.key(3), (4, 6))
  session = _session()
  y = _contractions.dot_general_fn(session, "L", "Dense", kernel)(
    x, kernel.dequantize(), _DENSE
  )
  a = mcq_jax.quantize_activations(x, path_key(jax.random.key(0), "L"), 2.0)
  exact = np.asarray(a.values, np.int64) @ np.asarray(kernel.values, np.int64)
  np.testing.assert_allclose(
    y, exact * np.asarray(a.scale) * np.asarray(kernel.scale), rtol=1e-6
  )
  assert session.log.report().integer_layers == ("L",)


@pytest.mark.parametrize(
  "case, note",
  [
    ("batch", "batch dimensions in the contraction: float"),
    ("input_channels", "per-channel scale on a contracted axis: float"),
    (
      "float_kernel",
      "float weights: activations sampled, contraction in float",
    ),
    ("not_sampled", "activations not sampled (activation_samples=None)"),
  ],
)
def test_dot_general_falls_back_to_float_and_says_why(case, note):
  session = _session(None if case == "not_sampled" else 2.0)
  x = jax.random.normal(jax.random.key(3), (2, 4, 6))
  dn = (((2,), (0,)), ((), ()))
  kernel = _kernel((6, 3))
  if case == "batch":
    kernel, dn = _kernel((2, 6, 3)), (((2,), (1,)), ((0,), (0,)))
  elif case == "input_channels":
    kernel = _kernel((6, 3), channel_axis=0)
  rhs = kernel.dequantize()
  if case == "float_kernel":
    kernel = rhs
  y = _contractions.dot_general_fn(session, "L", "Dense", kernel)(x, rhs, dn)
  (report,) = session.log.report().layers
  assert not report.integer and report.note == note
  if case == "not_sampled":
    np.testing.assert_array_equal(y, lax.dot_general(x, rhs, dn))
  else:  # the float contraction of the sampled activations
    # with batch dimensions in the contraction the whole input is one group
    group_ndim = 0 if case == "batch" else 1
    a = mcq_jax.quantize_activations(
      x, path_key(jax.random.key(0), "L"), 2.0, group_ndim=group_ndim
    )
    np.testing.assert_allclose(
      y, lax.dot_general(a.dequantize(), rhs, dn), rtol=1e-5, atol=1e-6
    )


def test_kernel_shape_mismatch_names_the_layer():
  kernel = _kernel((6, 3))
  with pytest.raises(
    ValueError, match=r"layer 'L': kernel shape \(6, 4\) != quantized \(6, 3\)"
  ):
    _contractions.dot_general_fn(_session(), "L", "Dense", kernel)(
      jnp.ones((2, 6)), jnp.ones((6, 4)), _DENSE
    )


def test_conv_checks_the_batch_axis_and_the_channel_axis():
  kernel = _kernel((3, 3, 2, 4))  # HWIO, per output channel
  x = jax.random.normal(jax.random.key(4), (2, 8, 8, 2))
  conv = _contractions.conv_fn(_session(), "C", "Conv", kernel, None)
  y = conv(
    x,
    kernel.dequantize(),
    (1, 1),
    "SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  assert y.shape == (2, 8, 8, 4)
  with pytest.raises(
    ValueError,
    match="layer 'C#1': the batch axis of a conv input must be first",
  ):
    conv(
      jnp.moveaxis(x, 0, 1),
      kernel.dequantize(),
      (1, 1),
      "SAME",
      dimension_numbers=("HNWC", "HWIO", "HNWC"),
    )
  session = _session()
  by_input = _kernel((3, 3, 2, 4), channel_axis=2)
  _contractions.conv_fn(session, "C", "Conv", by_input, None)(
    x,
    by_input.dequantize(),
    (1, 1),
    "SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  assert (
    session.log.report().layers[0].note
    == "per-channel scale not on the output features: float"
  )


def test_einsum_per_token_scales_land_on_their_output_axes():
  kernel = _kernel((5, 3, 2), channel_axis=(1, 2))
  x = jax.random.normal(jax.random.key(5), (2, 7, 5))
  session = _session(per_token=True)
  y = _contractions.einsum_fn(session, "E", "Einsum", kernel)(
    "btd,dhk->bhtk", x, kernel.dequantize()
  )
  a = mcq_jax.quantize_activations(
    x, path_key(jax.random.key(0), "E"), 2.0, group_ndim=2
  )
  exact = np.einsum(
    "btd,dhk->bhtk",
    np.asarray(a.values, np.int64),
    np.asarray(kernel.values, np.int64),
  )
  scale = (
    np.asarray(a.scale)[:, None, :, :]
    * np.asarray(kernel.scale)[0][None, :, None, :]
  )
  np.testing.assert_allclose(y, exact * scale, rtol=1e-6)
  assert session.log.report().integer_layers == ("E",)


def test_overflow_bound_is_static_when_it_is_safe():
  w = _kernel((4, 2))  # N_w = 8, N_a = 8: N_a * N_w < 2**31
  dot = lambda x: _contractions.dot_general_fn(_session(), "L", "Dense", w)(
    x, w.dequantize(), _DENSE
  )
  jaxpr = jax.make_jaxpr(dot)(jnp.ones((1, 4)))
  # no worst case computed (a cond), no check (a callback) at run time; the
  # one cond is the choice of the native product on the CPU, resolved when
  # the program is lowered
  conds = [e for e in jaxpr.eqns if e.primitive.name == "cond"]
  assert all(e.params.get("branches_platforms") for e in conds)
  assert "debug_callback" not in {e.primitive.name for e in jaxpr.eqns}


def test_grid_baseline_kernels_are_not_taken_as_statically_safe():
  # round_to_nearest draws no samples (samples == 0): the static bound must
  # come from its values' dtype, or a 16-bit grid times many activation
  # samples wraps int32 silently.
  w = {"k": jnp.array([[1.0], [1.0], [1.0], [1.0]])}
  kernel = mcq_jax.round_to_nearest(w, bits=16)["k"]
  assert kernel.samples == 0 and int(kernel.values.max()) == 32767
  x = jnp.ones((1, 4))
  session = _session(k_a=20000.0)  # N_a = 80,000: 4 * 20,000 * 32,767 > 2**31
  dot = _contractions.dot_general_fn(session, "L", "Dense", kernel)
  with pytest.raises(OverflowError, match="layer 'L': int32 accumulation"):
    dot(x, kernel.dequantize(), _DENSE)


def test_an_output_of_exactly_two_to_the_31_is_an_overflow():
  # N_w = 32,768 and N_a = 65,536 on one value each: the product is exactly
  # 2**31, which int32 wraps to -2**31; in float32 "> 2**31 - 1" misses it.
  kernel = mcq_jax.quantize(
    {"k": jnp.ones((1, 1))}, jax.random.key(0), samples_per_weight=32768.0
  )["k"]
  assert int(kernel.values[0, 0]) == 32768
  session = _session(k_a=65536.0)
  dot = _contractions.dot_general_fn(session, "L", "Dense", kernel)
  with pytest.raises(OverflowError, match="layer 'L': int32 accumulation"):
    dot(jnp.ones((1, 1)), kernel.dequantize(), _DENSE)
  # one sample fewer fits
  fits = _contractions.dot_general_fn(
    _session(k_a=65535.0), "L", "Dense", kernel
  )
  np.testing.assert_allclose(
    fits(jnp.ones((1, 1)), kernel.dequantize(), _DENSE), [[1.0]]
  )


# -- no silent wrap, ever: a property test against an int64 reference ---------


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
  n_in=st.sampled_from([1, 2, 3, 7, 33]),
  n_out=st.sampled_from([1, 3]),
  log2_nw=st.integers(9, 17),
  delta=st.integers(-2, 2),
  spread=st.sampled_from([0.0, 3.0, 30.0, 120.0]),
  signs=st.booleans(),
  seed=st.integers(0, 2**16),
)
def test_integer_dense_never_wraps_silently(
  n_in, n_out, log2_nw, delta, spread, signs, seed
):
  # N_w * N_a lands within two N_w of 2**31 (where int32 wraps and float32
  # can no longer tell 2**31 - 1 from 2**31); magnitudes spread over up to
  # 120 e-folds (the smallest underflow to zero) so that the counts
  # concentrate on a few values, which brings the largest output close to
  # N_w * N_a.
  rng = np.random.default_rng(seed)
  n_w = 2**log2_nw
  n_a = 2**31 // n_w + delta
  magnitude = lambda shape: np.exp(rng.uniform(-spread, 0, shape))
  w = magnitude((n_in, n_out)).astype(np.float32)
  x = magnitude((2, n_in)).astype(np.float32)
  if signs:
    w *= rng.choice([-1, 1], w.shape)
    x *= rng.choice([-1, 1], x.shape)
  kernel = mcq_jax.quantize(
    {"k": jnp.asarray(w)},
    jax.random.key(seed),
    samples_per_weight=n_w / n_in,
  )["k"]
  key = jax.random.key(seed + 1)
  session = Session(
    ActivationOptions(n_a / n_in, "systematic", False, True), key
  )
  a = mcq_jax.quantize_activations(
    jnp.asarray(x), path_key(key, "L"), n_a / n_in
  )
  assert (kernel.samples, a.samples) == (n_w, n_a)
  exact = np.asarray(a.values, np.int64) @ np.asarray(kernel.values, np.int64)
  worst = np.abs(np.asarray(a.values, np.int64)) @ np.abs(
    np.asarray(kernel.values, np.int64)
  )
  dot = _contractions.dot_general_fn(session, "L", "Dense", kernel)
  event(f"worst vs 2**31: {np.sign(int(worst.max()) - 2**31):+d}")
  try:
    y = np.asarray(dot(jnp.asarray(x), kernel.dequantize(), _DENSE))
  except OverflowError:
    # Raised only where the worst case is within float32 rounding of 2**31.
    assert worst.max() >= 2**31 * (1 - 2**-16), worst.max()
    return
  assert np.abs(exact).max() < 2**31  # never returned after a wrap
  # XLA flushes subnormal float32 inputs and results to zero; numpy does not.
  tiny = np.finfo(np.float32).tiny
  ftz = lambda v: np.where(np.abs(v) < tiny, np.float32(0), v)
  expected = ftz(
    ftz(exact.astype(np.float32) * ftz(np.asarray(a.scale, np.float32)))
    * ftz(np.asarray(kernel.scale, np.float32))
  )
  np.testing.assert_array_equal(y, expected)


# -- the exact contraction paths: int8, float32, int32 -------------------------


def _hand_kernel(values, samples):
  """A kernel QArray with these integer values (``samples``: its static
  bound), per tensor, scale 2**-10."""
  values = jnp.asarray(values, jnp.int32)
  return mcq_jax.QArray(
    values=values,
    scale=jnp.full((1,) * values.ndim, 2.0**-10, jnp.float32),
    method="mcq",
    samples=samples,
    samples_per_value=None,
    sampler="systematic",
    channel_axes=(),
    sort=False,
    dtype=jnp.dtype(jnp.float32),
  )


def _one_hot_input(shape, n_features, seed):
  """Inputs with one nonzero value per group of ``n_features`` (signs
  mixed): MCQ puts all of a group's ``N_a`` samples on it, whatever the
  sampler draws."""
  rng = np.random.default_rng(seed)
  groups = math.prod(shape) // n_features
  x = np.zeros((groups, n_features), np.float32)
  x[np.arange(groups), rng.integers(0, n_features, groups)] = rng.choice(
    [-1.0, 1.0], groups
  ) * rng.uniform(0.5, 2.0, groups)
  return jnp.asarray(x.reshape(shape))


def _rescaled(exact, a_scale, w_scale):
  """What the int32 path returns for the int64 products ``exact``: converted
  to float32, times the activation scale, times the kernel scale."""
  y = exact.astype(np.float32) * np.asarray(a_scale, np.float32)
  return y * np.asarray(w_scale, np.float32)


def test_pick_path_at_the_int8_and_float32_bounds():
  pick = _contractions._pick_path
  order = _contractions._MATMUL_ORDER
  assert order == ("int8", "float32", "int32")
  assert pick(order, 127, 127, 1000, 127) == 0
  assert pick(order, 128, 127, 1000, 128) == 1
  assert pick(order, 127, 128, 1000, 127) == 1
  # float32: max|w| * min(a_sum, terms * max|a|) must stay below 2**24
  assert pick(order, 4095, 4097, 10, 4095) == 1  # 2**24 - 1
  assert pick(order, 4096, 4096, 10, 4096) == 2  # 2**24
  assert pick(order, 300, 4097, 13, 10**6) == 1  # 13 * 300 < 4095
  assert pick(order, 300, 4097, 14, 10**6) == 2  # 14 * 300 > 4095
  # traced maxima: the same answers, at run time
  traced = jax.jit(lambda a, w: pick(order, a, w, 1, 10**6))
  assert [int(traced(a, w)) for a, w in [(127, 127), (128, 127)]] == [0, 1]
  assert [int(traced(a, w)) for a, w in [(4095, 4097), (4096, 4096)]] == [1, 2]
  conv = _contractions._CONV_ORDER
  assert (
    pick(conv, 127, 127, 10, 127) == 0 and pick(conv, 4096, 4096, 1, 4096) == 1
  )


# (N_a, kernel values' max, the kernel's static bound) on both sides of each
# bound, and the path an eager call takes.
_DENSE_CASES = [
  (127, 127, 127, "int8"),  # static
  (127, 127, 10**6, "int8"),  # found from the kernel's actual maximum
  (128, 127, 127, "float32"),  # a count of 128 does not fit int8
  (127, 128, 128, "float32"),
  (4095, 4097, 10**6, "float32"),  # partial sums up to 2**24 - 1
  (4096, 4096, 10**6, "int32"),  # up to 2**24
  (4097, 4097, 10**6, "int32"),  # 4097**2 is odd: float32 would round it
]


def _dense_matches_int64(kernel, w, x, n_a, jit):
  """Runs a 16-input dense layer on ``x`` (``K_a = n_a / 16``), eagerly or
  jitted, checks it against the int64 product of its sampled activations
  with ``w``, and returns the layer's report and those activations."""
  session = _session(k_a=n_a / 16)

  def run(x):
    dot = _contractions.dot_general_fn(session, "L", "Dense", kernel)
    return dot(x, kernel.dequantize(), _DENSE)

  y = jax.jit(run)(x) if jit else run(x)
  a = mcq_jax.quantize_activations(
    x, path_key(jax.random.key(0), "L"), n_a / 16
  )
  exact = np.asarray(a.values, np.int64) @ w
  np.testing.assert_array_equal(y, _rescaled(exact, a.scale, kernel.scale))
  (report,) = session.log.report().layers
  return report, a


@pytest.mark.parametrize("n_a, w_max, w_bound, expected", _DENSE_CASES)
@pytest.mark.parametrize("jit", [False, True])
def test_dense_paths_are_bit_identical_to_int64(
  n_a, w_max, w_bound, expected, jit
):
  rng = np.random.default_rng(n_a + w_max)
  w = rng.integers(-w_max, w_max + 1, (16, 5))
  w[rng.integers(0, 16), 0] = w_max
  kernel = _hand_kernel(w, w_bound)
  x = _one_hot_input((8, 16), 16, n_a)
  report, a = _dense_matches_int64(kernel, w, x, n_a, jit)
  assert int(jnp.max(jnp.abs(a.values))) == a.samples == n_a
  if jit and w_bound > 127 or jit and n_a > 127:
    assert report.contraction.endswith("(chosen at run time)")
  else:
    assert report.contraction == expected


@pytest.mark.parametrize(
  "n_a, dtype, expected",
  [
    (127, jnp.int8, "int8"),  # the stored int8 kernel, as it is
    (128, jnp.int8, "int32"),  # a count of 128 does not fit int8
    (127, jnp.int16, "int32"),  # no pass converts a wider kernel to int8
  ],
)
@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("batch", [1, 2])
def test_few_rows_take_the_kernel_as_stored(n_a, dtype, expected, jit, batch):
  # batches 1 and 2: the product reads the kernel once, so only a path that
  # takes the kernel in its stored dtype is worth it (at batch 1 the int8
  # product runs on two rows, the second zero)
  rng = np.random.default_rng(n_a)
  w = rng.integers(-127, 128, (16, 5))
  kernel = _hand_kernel(w, 127)
  kernel = kernel.replace(values=kernel.values.astype(dtype))
  x = _one_hot_input((batch, 16), 16, n_a)
  report, _ = _dense_matches_int64(kernel, w, x, n_a, jit)
  if dtype == jnp.int8 and n_a > 127 and _int8_matmul.native_available():
    # the CPU's native product takes the int16 counts as int8 digits
    assert report.contraction == "int8"
  elif jit and dtype == jnp.int8 and n_a > 127:  # their maximum is traced
    assert report.contraction == "int8/int32 (chosen at run time)"
  else:
    assert report.contraction == expected


@pytest.mark.parametrize(
  "n_a, w_max, expected",
  [(4095, 4097, "float32"), (4096, 4096, "int32"), (4097, 4097, "int32")],
)
@pytest.mark.parametrize("jit", [False, True])
def test_conv_paths_are_bit_identical_to_int64(n_a, w_max, expected, jit):
  rng = np.random.default_rng(n_a)
  w = rng.integers(-w_max, w_max + 1, (3, 3, 2, 4))
  w[1, 1, :, :] = w_max  # the hot pixel's centre tap: outputs of N_a * w_max
  kernel = _hand_kernel(w, 10**6)
  x = _one_hot_input((3, 5, 5, 2), 50, n_a)
  session = _session(k_a=n_a / 50)
  args = dict(
    window_strides=(1, 1),
    padding="SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )

  def run(x):
    conv = _contractions.conv_fn(session, "C", "Conv", kernel, None)
    return conv(x, kernel.dequantize(), **args)

  y = jax.jit(run)(x) if jit else run(x)
  a = mcq_jax.quantize_activations(
    x, path_key(jax.random.key(0), "C"), n_a / 50
  )
  assert int(jnp.max(jnp.abs(a.values))) == n_a
  # the reference: the conv as a sum over taps, in int64
  av = np.pad(np.asarray(a.values, np.int64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  exact = sum(
    np.einsum("bhwi,io->bhwo", av[:, i : i + 5, j : j + 5], w[i, j])
    for i in range(3)
    for j in range(3)
  )
  assert np.abs(exact).max() == n_a * w_max
  np.testing.assert_array_equal(y, _rescaled(exact, a.scale, kernel.scale))
  (report,) = session.log.report().layers
  assert report.contraction == (
    "float32/int32 (chosen at run time)" if jit else expected
  )


def test_few_row_convs_keep_to_the_conv_paths():
  # a batch-1 2x2 image gives 4 rows; the int8 kernel is taken as stored
  # only by paths the layer allows: XLA's int8 convs are not among them,
  # the CPU's native int8 conv is
  w = np.random.default_rng(0).integers(-127, 128, (3, 3, 2, 4))
  kernel = _hand_kernel(w, 127)
  kernel = kernel.replace(values=kernel.values.astype(jnp.int8))
  x = _one_hot_input((1, 2, 2, 2), 8, 3)
  session = _session(k_a=127 / 8)
  conv = _contractions.conv_fn(session, "C", "Conv", kernel, None)
  dims = ("NHWC", "HWIO", "NHWC")
  y = conv(x, kernel.dequantize(), (1, 1), "SAME", dimension_numbers=dims)
  a = mcq_jax.quantize_activations(x, path_key(jax.random.key(0), "C"), 127 / 8)
  av = np.pad(np.asarray(a.values, np.int64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  exact = sum(  # the conv as a sum over taps, in int64
    np.einsum("bhwi,io->bhwo", av[:, i : i + 2, j : j + 2], w[i, j])
    for i in range(3)
    for j in range(3)
  )
  np.testing.assert_array_equal(y, _rescaled(exact, a.scale, kernel.scale))
  (report,) = session.log.report().layers
  native = _int8_matmul.native_available()
  assert report.contraction == ("int8" if native else "int32")


def test_one_row_einsum_takes_the_int8_kernel_as_stored():
  # one token of one example: the int8 product runs on two rows (the second
  # zero), as for Dense, and gives the same integers
  rng = np.random.default_rng(3)
  w = rng.integers(-127, 128, (16, 4))
  kernel = _hand_kernel(w, 127)
  kernel = kernel.replace(values=kernel.values.astype(jnp.int8))
  x = _one_hot_input((1, 1, 16), 16, 127)
  session = _session(k_a=127 / 16, per_token=True)
  y = _contractions.einsum_fn(session, "E", "Einsum", kernel)(
    "btd,dk->btk", x, kernel.dequantize()
  )
  a = mcq_jax.quantize_activations(
    x, path_key(jax.random.key(0), "E"), 127 / 16, group_ndim=2
  )
  exact = np.einsum("btd,dk->btk", np.asarray(a.values, np.int64), w)
  np.testing.assert_array_equal(
    y, _rescaled(exact, np.asarray(a.scale), kernel.scale[0])
  )
  assert session.log.report().layers[0].contraction == "int8"


@pytest.mark.parametrize(
  "equation, n_a, w_max, expected",
  [
    ("btd,dk->btk", 127, 127, "int8"),
    ("btd,dk->btk", 128, 127, "float32"),
    ("btd,dk->btk", 4095, 4097, "float32"),
    ("btd,dk->btk", 4097, 4097, "int32"),
    # a kernel-only summed label: each output sums 4 products per count, so
    # the bound is 4 * N_a * max|w| (1023 * 4097 * 4 < 2**24 < 1024 * ...)
    ("btd,dk->bt", 1023, 4097, "float32"),
    ("btd,dk->bt", 1025, 4097, "int32"),
  ],
)
def test_einsum_paths_are_bit_identical_to_int64(
  equation, n_a, w_max, expected
):
  rng = np.random.default_rng(n_a)
  w = rng.integers(-w_max, w_max + 1, (16, 4))
  w[:, 0] = w_max  # some output reaches the bound's worst case
  if equation.endswith("bt"):  # ... which sums the 4 columns
    w[:, :] = w_max
  kernel = _hand_kernel(w, 10**6)
  x = _one_hot_input((2, 4, 16), 16, n_a)
  session = _session(k_a=n_a / 16, per_token=True)
  y = _contractions.einsum_fn(session, "E", "Einsum", kernel)(
    equation, x, kernel.dequantize()
  )
  a = mcq_jax.quantize_activations(
    x, path_key(jax.random.key(0), "E"), n_a / 16, group_ndim=2
  )
  exact = np.einsum(equation, np.asarray(a.values, np.int64), w)
  a_scale = np.asarray(a.scale)
  if equation.endswith("bt"):
    a_scale = a_scale[..., 0]
  np.testing.assert_array_equal(y, _rescaled(exact, a_scale, kernel.scale[0]))
  assert session.log.report().layers[0].contraction == expected
