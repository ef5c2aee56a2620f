"""Errors that depend on array values, raised with the documented type.

With concrete values (eager calls) the error is raised at once, here. Under
``jit`` the values are only known when the program runs, so the check travels
through a host callback that raises there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _raise_if_set(
  error: type[Exception], message: str, flag: np.typing.ArrayLike
) -> None:
  if np.any(flag):
    raise error(message)


def raise_if(
  flag: jax.Array | bool, error: type[Exception], message: str
) -> None:
  """Raises ``error(message)`` if ``flag`` is true (at run time if traced).

  Args:
    flag: a boolean scalar (concrete or traced).
    error: the exception type users catch (``ValueError``, ``OverflowError``).
    message: names the leaf or layer and the problem.
  """
  if isinstance(flag, jax.core.Tracer):
    jax.debug.callback(functools.partial(_raise_if_set, error, message), flag)
  else:
    _raise_if_set(error, message, np.asarray(flag))


def check_finite(x: jax.Array, error: type[Exception], message: str) -> None:
  """Raises ``error`` if ``x`` holds NaN or inf.

  Finiteness is judged in ``x``'s own dtype (a float64 of 1e300 is finite).
  Concrete values are checked where they live (on the device): only a flag
  reaches the host, and the values are counted only to say how many are bad.

  Args:
    x: a float array (concrete or traced).
    error: the exception type to raise.
    message: names the leaf or layer and the problem.
  """
  finite = jnp.isfinite(jnp.asarray(x))
  ok = jnp.all(finite)
  if isinstance(ok, jax.core.Tracer):  # also for constants inside a trace
    raise_if(jnp.logical_not(ok), error, message)
  elif not bool(ok):
    bad = finite.size - int(jnp.count_nonzero(finite))
    raise error(f"{message} ({bad} of {finite.size} values)")
