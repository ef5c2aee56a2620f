"""Layer contractions on MCQ-sampled activations, in integers where possible.

Each factory returns a drop-in replacement for the contraction a Flax layer
calls (``dot_general``, ``conv_general_dilated``, ``einsum``). The replacement
samples its left operand (the layer input) by MCQ and, when the layer's kernel
is a :class:`QArray`, contracts the integer values with int32 accumulation and
rescales once in float: ``y = s_a * s_w * (q_a . q_w)``. Linen (``_apply``)
and NNX (``_nnx``) both install these through Flax's own injection points.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import opt_einsum
from jax import lax

from mcq_jax import _runtime_checks
from mcq_jax._qarray import QArray
from mcq_jax._session import Session
from mcq_jax._typing import DTypeLike

_INT32_MAX = 2**31 - 1
# 2**31 is exact in float32 (2**31 - 1 is not: it rounds up to 2**31), so the
# float32 guards below ask ">= 2**31" rather than "> 2**31 - 1".
_INT32_LIMIT_F32 = np.float32(2.0**31)


# Contracts two float arrays as the layer does (the worst case of |a| . |w|).
_AbsContract = Callable[[jax.Array, jax.Array], jax.Array]
# A layer's float contraction of its (possibly dequantized) input.
_FloatContract = Callable[[jax.Array], jax.Array]


def _check_overflow(
  a: QArray, w: QArray, abs_contract: _AbsContract, path: str
) -> None:
  """Raises if the int32 accumulation of ``a . w`` could have overflowed.

  Every output is at most ``N_a * max|w|`` (the activation counts of a group
  sum to ``N_a``); only when that bound is not safe is the exact worst case,
  the contraction of ``|a|`` with ``|w|``, computed.
  """
  if a.max_abs_value * w.max_abs_value <= _INT32_MAX:
    return  # statically safe: no value can reach 2**31
  w_max = jnp.max(jnp.abs(w.values)).astype(jnp.float32)
  # float32 products and sums round: each comparison leaves a margin for
  # their error, so that a true 2**31 is never computed as less (a value just
  # below it may be reported too: the error is raised, never a wrap).
  risky = jnp.float32(a.samples) * w_max >= _INT32_LIMIT_F32 * jnp.float32(
    1 - 2**-20
  )

  def exact() -> jax.Array:
    worst = abs_contract(
      jnp.abs(a.values).astype(jnp.float32),
      jnp.abs(w.values).astype(jnp.float32),
    )
    # A float32 sum of k terms (each converted and multiplied with one
    # rounding) is within (k + 2) * 2**-24 of the exact sum, relatively.
    terms = jnp.max(
      abs_contract(
        jnp.ones(a.values.shape, jnp.float32),
        jnp.ones(w.values.shape, jnp.float32),
      )
    )
    margin = 1 - (terms + 2) * jnp.float32(2**-24)
    return jnp.max(worst) >= _INT32_LIMIT_F32 * margin

  overflow = lax.cond(risky, exact, lambda: jnp.bool_(False))
  _runtime_checks.raise_if(
    overflow,
    OverflowError,
    f"layer {path!r}: int32 accumulation overflows; lower activation_samples"
    " or samples_per_weight",
  )


def _group_ndim(session: Session, ndim: int, contracted: set[int]) -> int:
  """Leading input axes that index groups: one (per example) or all free
  leading axes (per token); none for an unbatched vector."""
  free = 0
  while free < ndim and free not in contracted:
    free += 1
  return free if session.options.per_token else min(1, free)


def _place(
  scale: jax.Array, axes: Sequence[int], positions: Sequence[int], out_ndim: int
) -> jax.Array:
  """Reshapes ``scale`` (size 1 outside ``axes``) to broadcast against an output
  whose axes ``positions`` correspond to ``axes``."""
  shape = [1] * out_ndim
  for axis, pos in zip(axes, positions):
    shape[pos] = scale.shape[axis]
  kept = scale.reshape([scale.shape[a] for a in axes])
  order = tuple(int(i) for i in np.argsort(positions))
  return jnp.transpose(kept, order).reshape(shape)


def _rescale(
  y_int: jax.Array,
  a: QArray,
  a_pos: Sequence[int],
  w: QArray,
  w_pos: Sequence[int],
  dtype: DTypeLike,
) -> jax.Array:
  """``y_int * s_a * s_w``, each scale placed on its axes of the output.

  The layer adds its bias to the result next. Under ``jit``, XLA on CPU
  contracts a multiply followed by an add into one fused multiply-add (one
  rounding instead of eager's two), even across an optimization barrier, so
  jitted outputs would differ from eager ones in the last bit. A select on
  NaN (the identity: ``where(isnan(y), nan, y)``) sits between the two, which
  stops the contraction, so eager and jitted layers round the same way.
  """
  out_ndim = y_int.ndim
  a_scale = _place(a.scale, list(a.channel_axes), a_pos, out_ndim)
  w_scale = _place(w.scale, list(w.channel_axes), w_pos, out_ndim)
  y = (y_int.astype(jnp.float32) * a_scale * w_scale).astype(dtype)
  return jnp.where(jnp.isnan(y), jnp.asarray(jnp.nan, y.dtype), y)


_NOT_SAMPLED = "activations not sampled (activation_samples=None)"


def _in_float(
  session: Session,
  path: str,
  layer: str,
  kernel: object,
  contract: _FloatContract,
  x: jax.Array | QArray,
  note: str,
) -> jax.Array:
  """Falls back to the float contraction of ``x`` (a raw input, or sampled
  activations, dequantized) and reports why."""
  if isinstance(x, QArray):
    x = x.dequantize(jnp.float32).astype(x.dtype)
  session.record(path, layer, kernel, note)
  return contract(x)


def _integer_blocker(kernel: object, rhs: jax.Array, path: str) -> str:
  """Why the layer cannot run in integers ("" if it can)."""
  if not isinstance(kernel, QArray):
    return "float weights: activations sampled, contraction in float"
  if rhs.shape != kernel.shape:
    stacked = kernel.shape[kernel.ndim - rhs.ndim :] == rhs.shape
    raise ValueError(
      f"layer {path!r}: kernel shape {rhs.shape} != quantized {kernel.shape}"
      + (
        "; the layer runs on slices of a stacked kernel (nn.scan /"
        " nnx.scan / vmap) whose slice it did not read through indexing"
        " (kernel[...]); quantize the stack with stack_axes on its leading"
        " axes"
        if stacked and kernel.ndim > rhs.ndim
        else ""
      )
    )
  return ""


def _salt(rhs: jax.Array, lifted: bool) -> jax.Array | None:
  """What makes a lifted layer's activation key differ between iterations.

  Inside ``nn.scan`` / ``nn.vmap`` a layer's body is traced once for every
  iteration, so its path and call count, which the key comes from, are the
  same in each: every layer of a stack would draw the same noise. Its kernel
  is not: each iteration sees its own slice. The salt is a 32-bit sum of the
  kernel's bit patterns (integer addition, so the same eagerly and under
  ``jit``); layers of a stack with identical weights would share it.
  """
  if not lifted:
    return None
  bits = lax.bitcast_convert_type(rhs.astype(jnp.float32), jnp.uint32)
  return jnp.sum(bits, dtype=jnp.uint32)


def dot_general_fn(
  session: Session, base: str, layer: str, kernel: Any, lifted: bool = False
) -> Callable[..., jax.Array]:
  """A ``lax.dot_general`` replacement for Dense-like layers.

  Args:
    session: the model call's session.
    base: the layer's path.
    layer: the layer's class name, for the report.
    kernel: the layer's kernel as stored: a :class:`QArray` or a float array.
    lifted: the layer runs inside a lifted transform (see :func:`_salt`).

  Returns:
    A function with ``lax.dot_general``'s signature.
  """

  def dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: Any,
    precision: Any = None,
    preferred_element_type: DTypeLike | None = None,
    **unused: Any,
  ) -> jax.Array:
    path = session.log.claim(base, lifted)
    (lc, rc), (lb, rb) = dimension_numbers
    float_dot = lambda x: lax.dot_general(
      x,
      rhs,
      dimension_numbers,
      precision=precision,
      preferred_element_type=preferred_element_type,
    )
    if not session.sampled:
      return _in_float(
        session, path, layer, kernel, float_dot, lhs, _NOT_SAMPLED
      )
    contracted = set(lc)
    group_ndim = 0 if lb else _group_ndim(session, lhs.ndim, contracted)
    a = session.sample(lhs, path, group_ndim, _salt(rhs, lifted))
    blocker = (
      "batch dimensions in the contraction: float"
      if lb or rb
      else _integer_blocker(kernel, rhs, path)
    )
    if not blocker and set(kernel.channel_axes) & set(rc):
      blocker = "per-channel scale on a contracted axis: float"
    if blocker:
      return _in_float(session, path, layer, kernel, float_dot, a, blocker)
    int_dn = ((tuple(lc), tuple(rc)), ((), ()))
    _check_overflow(a, kernel, lambda x, w: lax.dot_general(x, w, int_dn), path)
    y = lax.dot_general(
      a.values,
      kernel.values.astype(jnp.int32),
      int_dn,
      preferred_element_type=jnp.int32,
    )
    lhs_free = [i for i in range(lhs.ndim) if i not in contracted]
    rhs_free = [i for i in range(rhs.ndim) if i not in set(rc)]
    w_pos = [len(lhs_free) + rhs_free.index(c) for c in kernel.channel_axes]
    session.record(path, layer, kernel)
    return _rescale(
      y,
      a,
      list(range(group_ndim)),
      kernel,
      w_pos,
      jnp.result_type(lhs.dtype, rhs.dtype),
    )

  return dot_general


def conv_fn(
  session: Session,
  base: str,
  layer: str,
  kernel: Any,
  mask: Any,
  lifted: bool = False,
) -> Callable[..., jax.Array]:
  """A ``lax.conv_general_dilated`` replacement for Conv layers.

  Args:
    session: the model call's session.
    base: the layer's path.
    layer: the layer's class name, for the report.
    kernel: the layer's kernel as stored: a :class:`QArray` or a float array.
    mask: the layer's kernel mask, or ``None``.
    lifted: the layer runs inside a lifted transform (see :func:`_salt`).

  Returns:
    A function with ``lax.conv_general_dilated``'s signature.
  """

  def conv(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: DTypeLike | None = None,
    **unused: Any,
  ) -> jax.Array:
    path = session.log.claim(base, lifted)
    args = dict(
      window_strides=window_strides,
      padding=padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
    )
    float_conv = lambda x: lax.conv_general_dilated(
      x,
      rhs,
      precision=precision,
      preferred_element_type=preferred_element_type,
      **args,
    )
    if not session.sampled:
      return _in_float(
        session, path, layer, kernel, float_conv, lhs, _NOT_SAMPLED
      )
    lhs_spec, rhs_spec, out_spec = lax.conv_dimension_numbers(
      lhs.shape, rhs.shape, dimension_numbers
    )
    if lhs_spec[0] != 0:
      raise ValueError(
        f"layer {path!r}: the batch axis of a conv input must be first"
      )
    # convs: one distribution per example
    a = session.sample(lhs, path, 1, _salt(rhs, lifted))
    blocker = _integer_blocker(kernel, rhs, path)
    if not blocker and kernel.channel_axes not in ((), (rhs_spec[0],)):
      blocker = "per-channel scale not on the output features: float"
    if blocker:
      return _in_float(session, path, layer, kernel, float_conv, a, blocker)
    w_values = kernel.values.astype(jnp.int32)
    if mask is not None:
      w_values = w_values * jnp.asarray(mask).astype(jnp.int32)
    _check_overflow(
      a, kernel, lambda x, w: lax.conv_general_dilated(x, w, **args), path
    )
    y = lax.conv_general_dilated(
      a.values, w_values, preferred_element_type=jnp.int32, **args
    )
    session.record(path, layer, kernel)
    return _rescale(
      y,
      a,
      [out_spec[0]],
      kernel,
      [out_spec[1]] * len(kernel.channel_axes),
      jnp.result_type(lhs.dtype, rhs.dtype),
    )

  return conv


def einsum_fn(
  session: Session, base: str, layer: str, kernel: Any, lifted: bool = False
) -> Callable[..., jax.Array]:
  """A ``jnp.einsum(equation, inputs, kernel)`` replacement for Einsum layers.

  Args:
    session: the model call's session.
    base: the layer's path.
    layer: the layer's class name, for the report.
    kernel: the layer's kernel as stored: a :class:`QArray` or a float array.
    lifted: the layer runs inside a lifted transform (see :func:`_salt`).

  Returns:
    A function with the signature of ``jnp.einsum`` on two operands.
  """

  def einsum(
    equation: str,
    lhs: jax.Array,
    rhs: jax.Array,
    precision: Any = None,
    preferred_element_type: DTypeLike | None = None,
    **unused: Any,
  ) -> jax.Array:
    path = session.log.claim(base, lifted)
    operands, result, _ = opt_einsum.parser.parse_einsum_input(
      (equation, lhs, rhs)
    )
    lhs_labels, rhs_labels = operands.split(",")
    expanded = f"{operands}->{result}"
    float_einsum = lambda x: jnp.einsum(
      expanded,
      x,
      rhs,
      precision=precision,
      preferred_element_type=preferred_element_type,
    )
    if not session.sampled:
      return _in_float(
        session, path, layer, kernel, float_einsum, lhs, _NOT_SAMPLED
      )
    contracted = {i for i, c in enumerate(lhs_labels) if c not in result}
    group_ndim = _group_ndim(session, len(lhs_labels), contracted)
    a = session.sample(lhs, path, group_ndim, _salt(rhs, lifted))
    blocker = _integer_blocker(kernel, rhs, path)
    channel_labels = (
      [] if blocker else [rhs_labels[c] for c in kernel.channel_axes]
    )
    if any(c not in result for c in channel_labels):
      blocker = "per-channel scale on a contracted axis: float"
    if blocker:
      return _in_float(session, path, layer, kernel, float_einsum, a, blocker)
    _check_overflow(a, kernel, lambda x, w: jnp.einsum(expanded, x, w), path)
    y = jnp.einsum(
      expanded,
      a.values,
      kernel.values.astype(jnp.int32),
      preferred_element_type=jnp.int32,
    )
    a_pos = [result.index(lhs_labels[i]) for i in range(group_ndim)]
    w_pos = [result.index(c) for c in channel_labels]
    session.record(path, layer, kernel)
    return _rescale(
      y, a, a_pos, kernel, w_pos, jnp.result_type(lhs.dtype, rhs.dtype)
    )

  return einsum
