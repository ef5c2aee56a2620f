"""``_runtime_checks``: value-dependent errors keep their type, also in jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcq_jax import _runtime_checks


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
      from mcq_jax import _runtime_checks

      @jax.jit
      def f(x):
        message = "layer 'L': bad input"
        _runtime_checks.check_finite(x, FloatingPointError, message)
        return x
      jax.block_until_ready(f(jnp.array([1.0, jnp.nan])))
  """)
  assert code != 0 and "FloatingPointError: layer 'L': bad input" in err
