"""Errors that depend on array values, raised with the documented type.

With concrete values (eager calls) the error is raised at once, here. Under
``jit`` the values are only known when the program runs, so the check travels
through a host callback. JAX turns any exception raised in a callback into a
``JaxRuntimeError`` whose message holds the original traceback as text, so the
callback keeps the real exception (``OverflowError``, ``ValueError``,
``FloatingPointError``) here, raises a :class:`DeferredError` that says which
one, and :func:`checked` re-raises the real one when the program's error
reaches the caller.

A model call's checks on the CPU run instead as a native kernel that fails
the program with the error's type and message in its text (no callback: a
program holding one is dispatched by JAX's slower path); :func:`checked`
rebuilds the error from that text. JAX reports that failure as a
``JaxRuntimeError``, or as a ``ValueError`` from its fast dispatch path.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import re
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import tracers

from mcq_jax import _native, _sampling, _sharded


class DeferredError(Exception):
  """Raised inside a host callback: names the real error, kept host-side."""


# Errors raised in callbacks and not yet re-raised by `checked`, by number.
# Bounded: errors that no `checked` call collects are eventually dropped.
_PENDING: collections.OrderedDict[int, Exception] = collections.OrderedDict()
_PENDING_MAX = 64
_LOCK = threading.Lock()
_NUMBERS = itertools.count(1)
_TAG = re.compile(r"\[mcq_jax deferred error #(\d+)\]")


def _defer(error: Exception) -> DeferredError:
  with _LOCK:
    number = next(_NUMBERS)
    _PENDING[number] = error
    while len(_PENDING) > _PENDING_MAX:
      _PENDING.popitem(last=False)
  name = type(error).__name__
  return DeferredError(
    f"{name}: {error} [mcq_jax deferred error #{number}] (call through"
    f" mcq_jax.checked(...) to receive it as {name})"
  )


class _DropDeferred(logging.Filter):
  """JAX logs every exception raised in a callback, with its traceback, to
  stderr, even when the caller catches the resulting error; ours reach the
  caller whole, so their log record is dropped (others are kept)."""

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, DeferredError)


logging.getLogger("jax._src.debugging").addFilter(_DropDeferred())


def _raise_if_set(
  error: type[Exception],
  message: str,
  flag: np.typing.ArrayLike,
  deferred: bool = False,
) -> None:
  """Raises ``error(message)`` if ``flag`` is set; from a host callback
  (``deferred``), the :class:`DeferredError` that carries it."""
  if np.any(flag):
    raise _defer(error(message)) if deferred else error(message)


def _callback_if_set(
  callback: Callable[[np.ndarray], None], flags: jax.Array
) -> None:
  """Calls ``callback(flags)`` on the host, only when a flag is set.

  A host callback is a round trip from the running program (about as long as
  a small model's whole call); inside a conditional it costs nothing until a
  check fails. Under ``vmap`` the conditional runs both branches, so the
  callback is then made and checks the flags itself.
  """
  jax.lax.cond(
    jnp.any(flags),
    lambda f: jax.debug.callback(callback, f),
    lambda f: None,
    flags,
  )


# Errors the native check raises by name (see _native/checks.cc).
_NATIVE_ERRORS: dict[str, type[Exception]] = {
  e.__name__: e for e in (ValueError, OverflowError, FloatingPointError)
}
_NATIVE_MARK = "[mcq_jax check failed]"
_NATIVE_TAG = re.compile(
  r"\b(" + "|".join(_NATIVE_ERRORS) + r"): (.*?) " + re.escape(_NATIVE_MARK),
  re.S,
)


def _natively_checked_outputs(
  errors: tuple[tuple[type[Exception], str], ...],
  flags: jax.Array,
  outputs: list[jax.Array],
) -> list[jax.Array]:
  """``outputs``, passed through the native check, which fails the running
  program with the first set flag's error: no host callback and no effect
  (see ``_native/checks.cc``). The outputs are aliased to its results (no
  copy), and it runs wherever they are used."""
  messages = "\x1e".join(
    f"{error.__name__}: {message} {_NATIVE_MARK}" for error, message in errors
  )
  passed = jax.ffi.ffi_call(
    _native.RAISE_IF_TARGET,
    [jax.ShapeDtypeStruct(o.shape, o.dtype) for o in outputs],
    vmap_method="broadcast_all",
    input_output_aliases={i + 1: i for i in range(len(outputs))},
  )(flags, *outputs, messages=messages)
  # under shard_map, as varying over the mesh axes as what passed in
  return [_sampling._varying_like(p, o, flags) for p, o in zip(passed, outputs)]


def _natively_checked(errors: tuple[tuple[type[Exception], str], ...]) -> bool:
  """Whether these checks run as the native check: the kernels are built,
  programs run on the CPU (the default backend: the check's call is in the
  program whatever platform it is lowered for, where a host callback would
  be an effect in every platform's program), and each error is one the
  check can name."""
  return (
    jax.default_backend() == "cpu"
    and _native.native_status().available
    and all(error in _NATIVE_ERRORS.values() for error, _ in errors)
    and not any(
      _NATIVE_MARK in message or "\x1e" in message for _, message in errors
    )
  )


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
    _callback_if_set(
      functools.partial(_raise_if_set, error, message, deferred=True), flag
    )
  else:
    _raise_if_set(error, message, np.asarray(flag))


def deferred_error(error: BaseException) -> Exception | None:
  """The error a check raised while a program ran, if ``error`` (a
  ``JaxRuntimeError``) carries one: a callback's is removed from the pending
  errors, the native check's is rebuilt from its message."""
  native = _NATIVE_TAG.search(str(error))
  if native is not None:
    return _NATIVE_ERRORS[native.group(1)](native.group(2))
  match = _TAG.search(str(error))
  if match is None:
    return None
  with _LOCK:
    return _PENDING.pop(int(match.group(1)), None)


def checked(fun: Callable[..., Any]) -> Callable[..., Any]:
  """Wraps ``fun`` so that errors found while its program runs keep their type.

  Eagerly, :func:`mcq_jax.quantize`, :func:`mcq_jax.mcq_apply` and the rest
  raise their documented errors directly. Under ``jax.jit`` the values are
  known only when the compiled program runs, and JAX reports any error found
  then as a ``JaxRuntimeError`` (or a ``ValueError`` whose message starts with
  ``UNKNOWN:``, from the CPU's native check). Call the jitted function through
  ``checked``: it waits for the result and re-raises the error that was found
  as its documented type, with its message: ``ValueError`` (non-finite
  weights), ``FloatingPointError`` (non-finite activations), ``OverflowError``
  (int32 accumulation overflow). Other errors pass through unchanged.

  Args:
    fun: any function, typically a ``jax.jit`` of code that calls the library.

  Returns:
    A function with the same signature that returns ``fun``'s result once
    it is computed.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, mcq_jax
    >>> model = nn.Dense(2)
    >>> v = model.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> run = mcq_jax.checked(jax.jit(
    ...     lambda x: mcq_jax.mcq_apply(model, v, x, key=jax.random.key(1))))
    >>> try:
    ...   run(jnp.array([[1.0, jnp.nan, 0.0]]))
    ... except FloatingPointError as e:
    ...   print(type(e).__name__, "in", str(e).split(":")[0])
    FloatingPointError in layer '<root>'
  """

  @functools.wraps(fun)
  def wrapper(*args: Any, **kwargs: Any) -> Any:
    try:
      return jax.block_until_ready(fun(*args, **kwargs))
    except (jax.errors.JaxRuntimeError, ValueError) as e:
      original = deferred_error(e)
      if original is None:
        raise
      # The runtime error only wraps the original: raise that one alone.
      raise original.with_traceback(None) from None

  return wrapper


# How a traced check is raised: `raise_if`, or `DeferredChecks.raise_if`.
_RaiseIf = Callable[[jax.Array, type[Exception], str], None]


def check_finite(
  x: jax.Array,
  error: type[Exception],
  message: str,
  traced: _RaiseIf = raise_if,
) -> None:
  """Raises ``error`` if ``x`` holds NaN or inf.

  Finiteness is judged in ``x``'s own dtype (a float64 of 1e300 is finite).
  Concrete values are checked where they live (on the device): only a flag
  reaches the host, and the values are counted only to say how many are bad.

  Args:
    x: a float array (concrete or traced).
    error: the exception type to raise.
    message: names the leaf or layer and the problem.
    traced: what raises a traced flag (default: :func:`raise_if`, one host
      callback).
  """
  x = jnp.asarray(x)
  finite = _all_finite(x)
  if isinstance(finite, jax.core.Tracer):  # also for constants inside a trace
    traced(~finite, error, message)
  elif not bool(finite):
    bad = int(_count_not_finite(x))
    raise error(f"{message} ({bad} of {x.size} values)")


@jax.jit  # one small program per shape (op by op it would compile three)
def _all_finite(x: jax.Array) -> jax.Array:
  """Whether every value of ``x`` is finite, in one fast reduction.

  ``x - x`` is 0 for a finite value and NaN for NaN or inf, and a sum keeps
  any NaN: a float sum runs about 14x faster on XLA:CPU than counting
  ``~isfinite`` (an integer sum of a predicate), and about 3x faster than
  ``all(isfinite)``. A max-reduction cannot serve: XLA:CPU's vectorized
  max may drop a NaN.
  """
  return jnp.isfinite(jnp.sum(x - x))


# Counted only to say how many values are bad, once the check has failed.
_count_not_finite = jax.jit(
  lambda x: jnp.sum(~jnp.isfinite(x), dtype=jnp.int32)
)


def _raise_first(
  errors: tuple[tuple[type[Exception], str], ...], flags: np.ndarray
) -> None:
  """From a host callback: the deferred error of the first set flag."""
  for (error, message), flag in zip(errors, np.asarray(flags)):
    _raise_if_set(error, message, flag, deferred=True)


class DeferredChecks:
  """The value checks of one model call, raised by at most one callback.

  Under ``jit`` a check raised through :func:`raise_if` is a host callback,
  a round trip that costs more than a small layer. A model call instead
  collects its traced flags here and :meth:`flush` raises the first set one
  (checks are kept in call order) from one callback at the end. Concrete
  flags raise at once, as with :func:`raise_if`. A flag traced inside a
  transform nested in the call (the body of ``nn.scan``, ``nnx.vmap``...)
  cannot leave that transform: it takes a callback of its own.
  """

  def __init__(self) -> None:
    self._trace = tracers.current_trace()
    self._pending: list[tuple[jax.Array, type[Exception], str]] = []

  def raise_if(
    self, flag: jax.Array | bool, error: type[Exception], message: str
  ) -> None:
    """:func:`raise_if`, deferred to :meth:`flush` when ``flag`` is traced
    at the level the call started at."""
    if (
      isinstance(flag, jax.core.Tracer)
      and tracers.current_trace() == self._trace
    ):
      self._pending.append((flag, error, message))
    else:
      raise_if(flag, error, message)

  def check_finite(
    self, x: jax.Array, error: type[Exception], message: str
  ) -> None:
    """:func:`check_finite`, deferred like :meth:`raise_if`."""
    check_finite(x, error, message, self.raise_if)

  def flush(self, outputs: Any) -> Any:
    """Raises (at run time) the first collected check whose flag is set.

    Args:
      outputs: what the model call returns.

    Returns:
      ``outputs``, passed through the native check where that runs (see
      :func:`_natively_checked`): the check is computed with them.
    """
    if not self._pending:
      return outputs
    flags = jnp.stack([jnp.reshape(f, ()) for f, _, _ in self._pending])
    errors = tuple((e, m) for _, e, m in self._pending)
    self._pending = []
    leaves, treedef = jax.tree.flatten(outputs)
    arrays = [i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.Array)]
    # outputs split over devices in their types: the kernel's results would
    # carry no sharding
    if (
      _natively_checked(errors)
      and arrays
      and not any(_sharded.mesh_axes(leaves[i]) for i in arrays)
    ):
      passed = _natively_checked_outputs(
        errors, flags, [leaves[i] for i in arrays]
      )
      for i, leaf in zip(arrays, passed):
        leaves[i] = leaf
      return jax.tree.unflatten(treedef, leaves)
    _callback_if_set(functools.partial(_raise_first, errors), flags)
    return outputs
