"""``_runtime_checks``: value-dependent errors keep their type, also in jit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcq_jax import _native, _runtime_checks


def test_raise_if_eager():
  _runtime_checks.raise_if(jnp.bool_(False), OverflowError, "never")
  _runtime_checks.raise_if(False, OverflowError, "never")
  with pytest.raises(OverflowError, match="^layer 'x': too big$"):
    _runtime_checks.raise_if(
      jnp.bool_(True), OverflowError, "layer 'x': too big"
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float16, jnp.bfloat16])
def test_check_finite_counts_the_bad_values(dtype):
  x = jnp.asarray(np.array([[1.0, np.nan, 2.0], [np.inf, 0.0, -np.inf]]), dtype)
  with pytest.raises(ValueError, match=r"^leaf 'k' is bad \(3 of 6 values\)$"):
    _runtime_checks.check_finite(x, ValueError, "leaf 'k' is bad")
  _runtime_checks.check_finite(jnp.ones((2, 3), dtype), ValueError, "fine")


@pytest.mark.parametrize("dtype", [np.float32, np.float16, jnp.bfloat16])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("at", [0, 65_536, 100_002])
def test_one_bad_value_anywhere_is_found(dtype, bad, at):
  # one reduction over 1e5 values must keep a single NaN/inf wherever it is
  # (a vectorized max-reduction on XLA:CPU can drop a NaN)
  x = np.random.default_rng(at).uniform(-1e3, 1e3, 100_003)
  x[at] = bad
  x = jnp.asarray(x, dtype)
  assert not bool(_runtime_checks._all_finite(x))
  assert not bool(jax.jit(_runtime_checks._all_finite)(x))
  with pytest.raises(ValueError, match=r"\(1 of 100003 values\)$"):
    _runtime_checks.check_finite(x, ValueError, "leaf 'k'")
  assert bool(_runtime_checks._all_finite(jnp.where(jnp.isfinite(x), x, 0)))


def test_traced_checks_pass_when_the_values_are_good():
  @jax.jit
  def f(x):
    _runtime_checks.check_finite(x, FloatingPointError, "bad input")
    _runtime_checks.raise_if(x.sum() > 1e9, OverflowError, "too big")
    return x * 2

  np.testing.assert_array_equal(f(jnp.ones(3)), [2.0, 2.0, 2.0])

  @jax.jit
  def g():  # a concrete constant inside a trace is checked at run time too
    _runtime_checks.check_finite(jnp.ones(3), FloatingPointError, "bad input")
    return jnp.float32(1.0)

  assert g() == 1.0


def test_traced_checks_raise_at_run_time(fresh_python):
  code, err = fresh_python("""
      import jax, jax.numpy as jnp
      from mcq_jax import _native, _runtime_checks

      @jax.jit
      def f(x):
        message = "layer 'L': bad input"
        _runtime_checks.check_finite(x, FloatingPointError, message)
        return x
      jax.block_until_ready(f(jnp.array([1.0, jnp.nan])))
  """)
  assert code != 0 and "FloatingPointError: layer 'L': bad input" in err


# -- the documented error types under jit: `checked` ---------------------------


def test_checked_raises_the_documented_types_under_jit():
  import flax.linen as nn

  import mcq_jax

  bad_w = {"layer": {"kernel": jnp.array([[1.0, jnp.nan], [0.5, 2.0]])}}
  quantize = mcq_jax.checked(
    jax.jit(lambda p: mcq_jax.quantize(p, jax.random.key(0)))
  )
  with pytest.raises(ValueError, match="^leaf 'layer/kernel' has non-finite"):
    quantize(bad_w)

  model = nn.Dense(2)
  v = model.init(jax.random.key(0), jnp.ones((1, 3)))
  run = mcq_jax.checked(
    jax.jit(lambda x: mcq_jax.mcq_apply(model, v, x, key=jax.random.key(1)))
  )
  with pytest.raises(FloatingPointError, match="^layer '<root>': its input"):
    run(jnp.array([[1.0, jnp.inf, 0.0]]))
  assert run(jnp.ones((1, 3))).shape == (1, 2)  # and good input still runs

  dense = nn.Dense(1, use_bias=False)
  w = {"kernel": jnp.array([[1.0], [1e-3], [1e-3], [1e-3]])}
  wq = mcq_jax.quantize(w, jax.random.key(1), samples_per_weight=20000.0)
  overflow = mcq_jax.checked(
    jax.jit(
      lambda x: mcq_jax.mcq_apply(
        dense,
        {"params": wq},
        x,
        key=jax.random.key(0),
        activation_samples=20000.0,
      )
    )
  )
  with pytest.raises(OverflowError, match="int32 accumulation overflows"):
    overflow(jnp.array([[1.0, 1e-3, 1e-3, 1e-3]]))


def test_checked_lets_other_errors_through_and_returns_results():
  def boom(x):
    raise KeyError(x)

  with pytest.raises(KeyError):
    _runtime_checks.checked(boom)("k")
  double = _runtime_checks.checked(jax.jit(lambda x: x * 2))
  np.testing.assert_array_equal(double(jnp.ones(2)), [2.0, 2.0])


def test_without_checked_the_runtime_error_says_what_and_how(fresh_python):
  code, err = fresh_python("""
      import jax, jax.numpy as jnp
      from mcq_jax import _native, _runtime_checks
      f = jax.jit(lambda x: _runtime_checks.raise_if(x > 0, OverflowError,
                                                     "layer 'a': too big"))
      try:
        jax.block_until_ready(f(1.0))
      except jax.errors.JaxRuntimeError as e:
        text = str(e)
      tag = "OverflowError: layer 'a': too big [mcq_jax deferred error #"
      assert tag in text
      assert "mcq_jax.checked" in text
      g = _runtime_checks.checked(f)
      try:
        g(2.0)
      except OverflowError as e:
        print("caught", e)
  """)
  assert code == 0, err
  # JAX logs a callback's exception with its traceback even when the caller
  # catches it; ours are not logged (the error reaches the caller whole).
  assert "Traceback" not in err and "callback failed" not in err, err


def test_uncollected_deferred_errors_are_bounded():
  f = jax.jit(lambda x: _runtime_checks.raise_if(x > 0, ValueError, "bad"))
  for _ in range(_runtime_checks._PENDING_MAX + 5):
    with pytest.raises(jax.errors.JaxRuntimeError):
      jax.block_until_ready(f(1.0))
  assert len(_runtime_checks._PENDING) <= _runtime_checks._PENDING_MAX


def test_concrete_values_are_checked_on_the_device(monkeypatch):
  # Only the flag (and, on failure, the count) reaches the host: the values
  # are never copied, which for a sharded leaf would gather it whole.
  x = jnp.ones((300, 7))
  copied = []
  real_asarray = np.asarray

  def spy(a, *args, **kwargs):
    copied.append(getattr(a, "size", 1))
    return real_asarray(a, *args, **kwargs)

  monkeypatch.setattr(np, "asarray", spy)
  monkeypatch.setattr(np, "array", spy)
  _runtime_checks.check_finite(x, ValueError, "fine")
  assert all(size < x.size for size in copied), copied


# -- DeferredChecks: one callback per model call -------------------------------


def _count(jaxpr, found):
  """The equations of a jaxpr for which ``found(eqn)``, its sub-jaxprs
  (cond, scan...) included."""
  count = 0
  for eqn in jaxpr.eqns:
    count += bool(found(eqn))
    for param in eqn.params.values():
      for sub in param if isinstance(param, tuple | list) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          count += _count(sub.jaxpr, found)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          count += _count(sub, found)
  return count


def _callbacks(jaxpr):
  """The host callbacks in a jaxpr, its sub-jaxprs included."""
  return _count(jaxpr, lambda eqn: eqn.primitive.name == "debug_callback")


def _native_checks(jaxpr):
  """The native checks in a jaxpr, its sub-jaxprs included."""
  return _count(
    jaxpr,
    lambda eqn: eqn.params.get("target_name") == _native.RAISE_IF_TARGET,
  )


def assert_checks_in(jaxpr, kind, count=1):
  """``count`` callbacks, or one native check and no effect at all."""
  if kind == "native":
    assert (_callbacks(jaxpr), _native_checks(jaxpr)) == (0, 1)
    assert not jaxpr.effects, jaxpr.effects
  else:
    assert (_callbacks(jaxpr), _native_checks(jaxpr)) == (count, 0)


def test_deferred_checks_raise_concrete_flags_at_once():
  checks = _runtime_checks.DeferredChecks()
  checks.raise_if(jnp.bool_(False), OverflowError, "never")
  with pytest.raises(OverflowError, match="^layer 'a': too big$"):
    checks.raise_if(jnp.bool_(True), OverflowError, "layer 'a': too big")
  with pytest.raises(FloatingPointError, match=r"^layer 'b' \(1 of 2 values"):
    checks.check_finite(
      jnp.array([1.0, jnp.nan]), FloatingPointError, "layer 'b'"
    )
  assert checks.flush("out") == "out"  # nothing was deferred


def test_deferred_checks_raise_the_first_set_flag_from_one_check(check_kind):
  def f(x):
    checks = _runtime_checks.DeferredChecks()
    checks.check_finite(x, FloatingPointError, "layer 'a': non-finite")
    checks.raise_if(x[0] > 1, OverflowError, "layer 'b': too big")
    checks.raise_if(x[1] > 1, ValueError, "layer 'c': bad")
    return checks.flush(x)

  assert_checks_in(jax.make_jaxpr(f)(jnp.ones(2)).jaxpr, check_kind)
  run = _runtime_checks.checked(jax.jit(f))
  np.testing.assert_array_equal(run(jnp.ones(2)), [1.0, 1.0])
  with pytest.raises(ValueError, match="^layer 'c': bad$"):
    run(jnp.array([1.0, 2.0]))
  with pytest.raises(OverflowError, match="^layer 'b': too big$"):
    run(jnp.array([2.0, 2.0]))
  with pytest.raises(FloatingPointError, match="^layer 'a': non-finite$"):
    run(jnp.array([jnp.inf, 2.0]))


def test_flags_inside_a_nested_transform_take_their_own_callback(check_kind):
  # a flag traced in a scan's body cannot leave it: it is raised there
  def f(xs):
    checks = _runtime_checks.DeferredChecks()

    def body(carry, x):
      checks.raise_if(x > 1, OverflowError, "layer 'scanned': too big")
      return carry, x

    _, ys = jax.lax.scan(body, 0, xs)
    checks.raise_if(xs.sum() > 10, ValueError, "layer 'outer': bad")
    return checks.flush(ys)

  jaxpr = jax.make_jaxpr(f)(jnp.ones(3)).jaxpr
  native = check_kind == "native"
  assert (_callbacks(jaxpr), _native_checks(jaxpr)) == (2 - native, native)
  run = _runtime_checks.checked(jax.jit(f))
  np.testing.assert_array_equal(run(jnp.ones(3)), [1.0, 1.0, 1.0])
  with pytest.raises(OverflowError, match="^layer 'scanned': too big$"):
    run(jnp.array([1.0, 2.0, 1.0]))


def test_passing_checks_make_no_host_round_trip(monkeypatch):
  # the callback sits in a conditional branch taken only when a flag is set
  monkeypatch.setattr(_runtime_checks, "_natively_checked", lambda e: False)
  calls = []
  real = _runtime_checks._raise_first

  def counted(*args):
    calls.append(args)
    real(*args)

  monkeypatch.setattr(_runtime_checks, "_raise_first", counted)

  def f(x):
    checks = _runtime_checks.DeferredChecks()
    checks.check_finite(x, FloatingPointError, "layer 'a': non-finite")
    checks.raise_if(x[0] > 1, OverflowError, "layer 'b': too big")
    return checks.flush(x)

  run = _runtime_checks.checked(jax.jit(f))
  for _ in range(3):
    run(jnp.ones(2))
  assert calls == []
  with pytest.raises(OverflowError, match="^layer 'b': too big$"):
    run(jnp.array([2.0, 1.0]))
  assert len(calls) == 1


def test_checks_under_vmap_still_raise(check_kind):
  # under vmap the conditional becomes a select: the callback is made and
  # reads the batched flags itself; the native check reads them all
  def f(x):
    checks = _runtime_checks.DeferredChecks()
    checks.raise_if(x[0] > 1, OverflowError, "layer 'b': too big")
    checks.raise_if(x[1] > 1, ValueError, "layer 'c': bad")
    return checks.flush(x)

  run = _runtime_checks.checked(jax.jit(jax.vmap(f)))
  np.testing.assert_array_equal(run(jnp.ones((3, 2))), np.ones((3, 2)))
  with pytest.raises(OverflowError, match="^layer 'b': too big$"):
    run(jnp.array([[1.0, 1.0], [2.0, 1.0], [1.0, 1.0]]))
  # the first failing check of the first batch entry that fails one
  with pytest.raises(ValueError, match="^layer 'c': bad$"):
    run(jnp.array([[1.0, 2.0], [2.0, 1.0], [1.0, 1.0]]))
  with pytest.raises(OverflowError, match="^layer 'b': too big$"):
    run(jnp.array([[1.0, 1.0], [2.0, 2.0], [1.0, 1.0]]))


def test_the_native_check_fails_the_first_call_and_later_ones():
  # JAX reports the failure as a JaxRuntimeError from its first (Python)
  # dispatch and as a ValueError from its fast path: `checked` receives
  # both as the error's own type, and the process runs on.
  def f(x):
    checks = _runtime_checks.DeferredChecks()
    checks.check_finite(x, FloatingPointError, "layer 'a': non-finite")
    return checks.flush(x * 2)

  assert _native_checks(jax.make_jaxpr(f)(jnp.ones(2)).jaxpr) == 1
  jitted = jax.jit(f)
  with pytest.raises(Exception, match=r"FloatingPointError: layer 'a'") as e:
    jax.block_until_ready(jitted(jnp.array([jnp.nan, 1.0])))
  assert isinstance(e.value, jax.errors.JaxRuntimeError | ValueError)
  run = _runtime_checks.checked(jitted)
  for _ in range(2):
    with pytest.raises(FloatingPointError, match="^layer 'a': non-finite$"):
      run(jnp.array([1.0, jnp.inf]))
    np.testing.assert_array_equal(run(jnp.ones(2)), [2.0, 2.0])


def test_messages_the_native_check_cannot_carry_take_a_callback():
  def f(x, message):
    checks = _runtime_checks.DeferredChecks()
    checks.raise_if(x[0] > 1, ValueError, message)
    return checks.flush(x)

  for message, native in (
    ("plain", 1),
    ("a\x1eb", 0),
    ("x [mcq_jax check failed]", 0),
  ):
    jaxpr = jax.make_jaxpr(functools.partial(f, message=message))(
      jnp.ones(2)
    ).jaxpr
    assert (_native_checks(jaxpr), _callbacks(jaxpr)) == (native, 1 - native)


def test_outputs_of_every_kind_pass_the_native_check_unchanged():
  # arrays of any dtype pass through (aliased), a key array and non-array
  # leaves beside them; the same array twice is fine; a failing flag fails
  def f(x, key):
    checks = _runtime_checks.DeferredChecks()
    checks.raise_if(x[0] > 1, OverflowError, "layer 'b': too big")
    ints = x.astype(jnp.int8)
    return checks.flush({"x": x, "again": x, "i": ints, "key": key, "n": 3})

  jaxpr = jax.make_jaxpr(f)(jnp.ones(2), jax.random.key(0)).jaxpr
  assert _native_checks(jaxpr) == 1
  run = _runtime_checks.checked(jax.jit(f))
  out = run(jnp.ones(2), jax.random.key(4))
  np.testing.assert_array_equal(out["x"], [1.0, 1.0])
  np.testing.assert_array_equal(out["again"], [1.0, 1.0])
  assert out["i"].dtype == jnp.int8 and out["n"] == 3
  np.testing.assert_array_equal(
    jax.random.key_data(out["key"]), jax.random.key_data(jax.random.key(4))
  )
  with pytest.raises(OverflowError, match="^layer 'b': too big$"):
    run(jnp.array([2.0, 1.0]), jax.random.key(4))
