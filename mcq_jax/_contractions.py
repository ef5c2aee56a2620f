"""Layer contractions on MCQ-sampled activations, in integers where possible.

Each factory returns a drop-in replacement for the contraction a Flax layer
calls (``dot_general``, ``conv_general_dilated``, ``einsum``). The replacement
samples its left operand (the layer input) by MCQ and, when the layer's kernel
is a :class:`QArray`, contracts the integer values exactly, with int32
accumulation or in float32 where that is exact (see :func:`_pick_path`), and
rescales once in float: ``y = s_a * s_w * (q_a . q_w)``. Linen (``_apply``)
and NNX (``_nnx``) both install these through Flax's own injection points.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import opt_einsum
from jax import lax

from mcq_jax import _blocks, _dtypes, _int8_conv, _int8_matmul
from mcq_jax._qarray import QArray
from mcq_jax._session import Session
from mcq_jax._typing import DTypeLike

_INT32_MAX = 2**31 - 1
# 2**31 is exact in float32 (2**31 - 1 is not: it rounds up to 2**31), so the
# float32 guards below ask ">= 2**31" rather than "> 2**31 - 1".
_INT32_LIMIT_F32 = np.float32(2.0**31)


# Contracts the layer's two operands as the layer does, with this result type
# (float32 contractions run at full float32 precision).
_Contract = Callable[[jax.Array, jax.Array, DTypeLike], jax.Array]
# A layer's float contraction of its (possibly dequantized) input.
_FloatContract = Callable[[jax.Array], jax.Array]

# The exact contractions of integer values, by operand type. Measured on
# XLA:CPU (jax 0.10): an int8 x int8 -> int32 matmul runs ~4x faster than a
# float32 one, int16/int32 operands 6-16x slower; integer-valued float32
# operands give the exact integer result while every partial sum stays below
# 2**24. int8 convs run 3x faster to 9x slower than float32 ones depending on
# their shapes, with no simple rule: convs prefer float32, which costs what
# the float model's own conv costs (and is exact whenever int8 would be: a
# conv output sums one example's counts, at most N_a <= 127, times 127).
_INT8, _FLOAT32, _INT32 = "int8", "float32", "int32"
_MATMUL_ORDER = (_INT8, _FLOAT32, _INT32)
_CONV_ORDER = (_FLOAT32, _INT32)
_INT8_MAX = 127
_F32_EXACT = 2**24
# With fewer rows than this (uses of each kernel value), the product is bound
# by reading the kernel once, and a pass that scans or converts it costs more
# than the product itself (a batch-1 MLP layer: 0.08 ms in int32, 0.3 ms
# converting the kernel to float32 first): such layers take the kernel in the
# dtype it is stored in, int8 (where the activations fit it) or int32.
_FEW_ROWS = 8


def _pick_path(
  order: Sequence[str],
  a_max: int | jax.Array,
  w_max: int | jax.Array,
  terms: int,
  a_sum: int,
) -> int | jax.Array:
  """The index in ``order`` of the first exact contraction for the operands.

  int8 holds both operands when ``max|a|`` and ``max|w|`` are at most 127;
  its int32 accumulation is the int32 path's. float32 is exact while every
  partial sum stays below 2**24, and each is at most ``max|w| *
  min(a_sum, terms * max|a|)``: ``a_sum`` bounds the sum of ``|a|`` over the
  ``terms`` products of one output (the activation counts of a group sum to
  ``N_a``). int32 is always exact (overflow is checked apart). The bounds
  are compared by integer division, so that no product overflows int32.

  Args:
    order: the paths by preference, ending with ``"int32"``.
    a_max: a bound on ``|a|``: a static ``int`` or the traced maximum.
    w_max: a bound on ``|w|``: a static ``int`` or the traced maximum.
    terms: products summed into one output (the contraction length).
    a_sum: a static bound on the sum of ``|a|`` over one output's terms.

  Returns:
    A static ``int`` when both bounds are static, else a traced index.
  """
  limit: int | jax.Array
  if isinstance(w_max, int):
    limit = (_F32_EXACT - 1) // max(w_max, 1)
  else:
    limit = (_F32_EXACT - 1) // jnp.maximum(w_max, 1)
  exact = {
    _INT8: (a_max <= _INT8_MAX) & (w_max <= _INT8_MAX),
    # min(): limit < 2**24, and a Python int beyond int32 cannot meet a
    # traced int32
    _FLOAT32: (min(a_sum, _F32_EXACT) <= limit)
    | (a_max <= limit // max(terms, 1)),
  }
  index: int | jax.Array = len(order) - 1
  for i in reversed(range(len(order) - 1)):
    ok = exact[order[i]]
    if isinstance(ok, jax.core.Tracer):
      index = jnp.where(ok, i, index)
    elif bool(ok):
      index = i
  return index


def _product(
  path: str, contract: _Contract, a: jax.Array, w: jax.Array, rows: int
) -> jax.Array:
  """``a . w`` with operands of the path's type, as (integer-valued)
  float32.

  An int8 product of a single row (``rows == 1``: a batch of one example)
  is computed on two, the second zero, and the first result is kept: XLA:CPU
  runs an int8 matrix-vector product by converting the whole kernel to int32
  first, which costs twice the two-row int8 product (a 784x512 kernel:
  0.31 ms against 0.15 ms, jax 0.10). The zero row adds nothing to the
  first, so the integers are the same.
  """
  if path == _FLOAT32:
    return contract(a.astype(jnp.float32), w.astype(jnp.float32), jnp.float32)
  dtype = jnp.int8 if path == _INT8 else jnp.int32
  a, w = a.astype(dtype), w.astype(dtype)
  if path == _INT8 and rows == 1:
    pair = jnp.stack([a, jnp.zeros_like(a)])
    y = jax.vmap(lambda x: contract(x, w, jnp.int32))(pair)[0]
  else:
    y = contract(a, w, jnp.int32)
  return y.astype(jnp.float32)


def _integer_product(
  session: Session,
  path: str,
  a: QArray,
  w_values: jax.Array,
  w_bound: int,
  contract: _Contract,
  order: Sequence[str],
  terms: int,
  rows: int,
  spread: int = 1,
  native: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> tuple[jax.Array, str]:
  """``a . w`` computed exactly, fastest way first, and the path it took.

  Args:
    session: the model call's session (for the overflow check).
    path: the layer call's path.
    a: the sampled activations.
    w_values: the kernel's integer values as contracted (masked).
    w_bound: a static bound on ``|w_values|``.
    contract: the layer's contraction.
    order: the paths by preference (see :func:`_pick_path`).
    terms: products summed into one output.
    rows: how many times each kernel value is used, about.
    spread: activation groups (times kernel-only summed indices) that one
      output sums over: 1 but for some einsums.
    native: the layer's exact int32 product of int8 weights and int8 or
      int16 activations by a native CPU kernel
      (:func:`mcq_jax._int8_matmul.int8_matmul`,
      :func:`mcq_jax._int8_conv.int8_conv`), where the layer has one.

  Returns:
    The exact product as float32 (exactly what the int32 path gives,
    converted) and the path: ``"int8"``, ``"float32"``, ``"int32"``, or the
    candidates and ``"(chosen at run time)"`` when that depends on traced
    values.
  """
  a_sum = a.samples * spread
  if rows < _FEW_ROWS:  # int8 if the layer allows it and the kernel is int8
    stored = _INT8 if w_values.dtype == jnp.int8 else _INT32
    order = tuple(p for p in order if p in (stored, _INT32))
  candidates = order[
    : int(_pick_path(order, a.max_abs_value, w_bound, terms, a_sum)) + 1
  ]
  scan_w = w_bound > _INT8_MAX and len(candidates) > 1
  overflow_safe = a_sum * w_bound <= _INT32_MAX
  w_max = _dtypes.max_abs(w_values) if scan_w or not overflow_safe else None
  if not overflow_safe:
    assert w_max is not None
    _check_overflow(
      session,
      a,
      a_sum,
      w_values,
      w_max,
      lambda x, w: contract(x, w, jnp.float32),
      path,
    )

  def chosen() -> tuple[jax.Array, str]:
    if len(candidates) == 1:
      y = _product(candidates[0], contract, a.values, w_values, rows)
      return y, candidates[0]
    return _chosen_product(
      a,
      w_values,
      w_bound,
      w_max,
      contract,
      candidates,
      terms,
      a_sum,
      rows,
    )

  if (
    native is not None
    and w_values.dtype == jnp.int8
    and a.values.dtype in (jnp.int8, jnp.int16)
    and _int8_matmul.native_available()
  ):
    # On the CPU the native product takes int8 or int16 activations whole
    # (int16 as two int8 digits; only rows or patches with a count above
    # 127 take a second pass): no run-time choice, no maximum, no
    # conversion. Elsewhere, the exact path chosen as below.
    label: list[
      str
    ] = []  # the fallback's path, found when its branch is traced

    def fallback() -> jax.Array:
      y, how = chosen()
      label.append(how)
      return y

    y = lax.platform_dependent(
      cpu=lambda: native(a.values, w_values).astype(jnp.float32),
      default=fallback,
    )
    return y, _INT8 if jax.default_backend() == "cpu" else label[0]
  return chosen()


def _chosen_product(
  a: QArray,
  w_values: jax.Array,
  w_bound: int,
  w_max: jax.Array | None,
  contract: _Contract,
  candidates: Sequence[str],
  terms: int,
  a_sum: int,
  rows: int,
) -> tuple[jax.Array, str]:
  """The product on the first of ``candidates`` that the actual maxima of
  the operands allow, chosen at run time where they are traced."""
  # the actual maxima may allow a faster path than the static bounds
  index = _pick_path(
    candidates,
    a.max_abs_value
    if a.max_abs_value <= _INT8_MAX
    else _dtypes.max_abs(a.values),
    w_bound if w_max is None else w_max,
    terms,
    a_sum,
  )
  if isinstance(index, jax.core.Tracer):
    branches = [
      functools.partial(_product, p, contract, a.values, w_values, rows)
      for p in candidates
    ]
    label = "/".join(candidates) + " (chosen at run time)"
    return lax.switch(index, branches), label
  chosen = candidates[int(index)]
  return _product(chosen, contract, a.values, w_values, rows), chosen


def _check_overflow(
  session: Session,
  a: QArray,
  a_sum: int,
  w_values: jax.Array,
  w_max: jax.Array,
  abs_contract: Callable[[jax.Array, jax.Array], jax.Array],
  path: str,
) -> None:
  """Raises if the int32 accumulation of ``a . w`` could overflow.

  Every output is at most ``a_sum * max|w|`` (the activation counts of a
  group sum to ``N_a``); the caller checks that bound statically, and only
  when it is not safe for the actual ``max|w|`` is the exact worst case, the
  contraction of ``|a|`` with ``|w|``, computed.
  """
  # float32 products and sums round: each comparison leaves a margin for
  # their error, so that a true 2**31 is never computed as less (a value just
  # below it may be reported too: the error is raised, never a wrap).
  risky = jnp.float32(a_sum) * w_max.astype(
    jnp.float32
  ) >= _INT32_LIMIT_F32 * jnp.float32(1 - 2**-20)

  def exact() -> jax.Array:
    worst = abs_contract(
      jnp.abs(a.values).astype(jnp.float32),
      jnp.abs(w_values).astype(jnp.float32),
    )
    # A float32 sum of k terms (each converted and multiplied with one
    # rounding) is within (k + 2) * 2**-24 of the exact sum, relatively.
    terms = jnp.max(
      abs_contract(
        jnp.ones(a.values.shape, jnp.float32),
        jnp.ones(w_values.shape, jnp.float32),
      )
    )
    margin = 1 - (terms + 2) * jnp.float32(2**-24)
    return jnp.max(worst) >= _INT32_LIMIT_F32 * margin

  overflow = lax.cond(risky, exact, lambda: jnp.bool_(False))
  session.checks.raise_if(
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


def _integer_blocker(
  kernel: object, rhs: jax.Array, path: str, blocks: bool = False
) -> str:
  """Why the layer cannot run in integers ("" if it can); ``blocks``: the
  layer contracts a blocked kernel block by block."""
  if not isinstance(kernel, QArray):
    return "float weights: activations sampled, contraction in float"
  if kernel.num_blocks > 1 and not blocks:
    return (
      f"kernel in blocks of {kernel.group_size} (group_size), one scale each:"
      " contraction in float on the dequantized kernel"
    )
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


def _blocks_times_scales(
  y: jax.Array,
  scale: jax.Array,
  a: QArray,
  a_pos: Sequence[int],
  dtype: DTypeLike,
) -> jax.Array:
  """``s_a * sum_b y[b] * s_w[b]`` for a blocked kernel: ``y`` holds each
  block's exact integer product on its leading axis, ``scale`` the blocks'
  scales (broadcasting against ``y[b]``); the sum runs in block order, and
  ``a_pos`` places the activations' scale on the result."""
  total = None
  for b in range(y.shape[0]):
    part = y[b] * scale[b]
    # stops XLA fusing the product into the sum (see _rescale)
    part = jnp.where(jnp.isnan(part), jnp.asarray(jnp.nan, part.dtype), part)
    total = part if total is None else total + part
  assert total is not None
  a_scale = _place(a.scale, list(a.channel_axes), a_pos, total.ndim)
  out = (total * a_scale).astype(dtype)
  return jnp.where(jnp.isnan(out), jnp.asarray(jnp.nan, out.dtype), out)


def _blocked_dense(
  session: Session,
  path: str,
  layer: str,
  a: QArray,
  group_ndim: int,
  kernel: QArray,
  axis: int,
  lhs: jax.Array,
  rhs: jax.Array,
) -> jax.Array:
  """``a . kernel`` for a kernel ``(in, out)`` in blocks of ``g`` inputs:
  one exact integer product per block (a batched contraction), each
  rescaled by its block's scale, summed in block order, then rescaled by
  the activations' scale."""
  assert kernel.group_size is not None
  size, blocks = kernel.group_size, kernel.num_blocks
  inputs, outputs = kernel.shape
  pad = blocks * size - inputs

  def contract(x: jax.Array, w: jax.Array, dtype: DTypeLike) -> jax.Array:
    x = jnp.moveaxis(x, axis, -1)
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    x = x.reshape(x.shape[:-1] + (blocks, size))
    w = jnp.pad(w, ((0, pad), (0, 0))).reshape(blocks, size, outputs)
    dn = (((x.ndim - 1,), (1,)), ((x.ndim - 2,), (0,)))
    return lax.dot_general(
      x, w, dn, precision=lax.Precision.HIGHEST, preferred_element_type=dtype
    )  # (blocks, *free axes of x, outputs)

  y, how = _integer_product(
    session,
    path,
    a,
    kernel.values,
    kernel.max_abs_value,
    contract,
    _MATMUL_ORDER,
    size,
    rows=lhs.size // max(inputs, 1),
  )
  scale = kernel.scale.reshape((blocks,) + (1,) * (y.ndim - 2) + (outputs,))
  session.record(path, layer, kernel, contraction=how)
  return _blocks_times_scales(
    y,
    scale,
    a,
    list(range(group_ndim)),
    jnp.result_type(lhs.dtype, rhs.dtype),
  )


def _block_ids(shape: tuple[int, ...], axis: int, size: int) -> np.ndarray:
  """Each value's block: ``size`` consecutive values, row-major over the
  axes other than the output axis ``axis`` (``_blocks``' order), the same
  for every output."""
  within = [d for a, d in enumerate(shape) if a != axis]
  ids = (np.arange(math.prod(within)) // size).reshape(within)
  return np.expand_dims(ids, axis)


def _blocked_conv(
  session: Session,
  path: str,
  layer: str,
  a: QArray,
  kernel: QArray,
  w_values: jax.Array,
  rhs: jax.Array,
  specs: tuple[Sequence[int], Sequence[int], Sequence[int]],
  conv: Callable[[jax.Array, jax.Array, DTypeLike], jax.Array],
  lhs: jax.Array,
) -> jax.Array:
  """A conv whose kernel is in blocks of ``g`` values (``group_size``) as
  one integer conv with ``nb * out`` outputs: block ``b``'s output ``o``
  contracts only block ``b`` of kernel ``o`` (the others zeroed), so each
  output is one block's exact integer partial sum; those are rescaled by
  their blocks' scales and summed in block order, then rescaled by the
  activations' scale. It does ``nb`` times the float conv's multiply-adds."""
  _, rhs_spec, out_spec = specs
  out_axis = rhs_spec[0]
  assert kernel.group_size is not None
  size, blocks = kernel.group_size, kernel.num_blocks
  outputs = rhs.shape[out_axis]
  ids = _block_ids(kernel.shape, out_axis, size)
  onehot = jnp.asarray(ids[..., None] == np.arange(blocks))  # (..., nb)
  stacked = jnp.where(onehot, w_values[..., None], 0).astype(w_values.dtype)
  # (..., out, ..., nb) -> (..., nb * out, ...), block-major
  stacked = jnp.moveaxis(stacked, -1, out_axis)
  shape = list(kernel.shape)
  shape[out_axis] = blocks * outputs
  stacked = stacked.reshape(shape)
  y, how = _integer_product(
    session,
    path,
    a,
    stacked,
    kernel.max_abs_value,
    conv,
    _CONV_ORDER,
    terms=size,
    rows=lhs.size // max(lhs.shape[specs[0][1]], 1),
  )
  # The output features (block b of output o at b * out + o) split into a
  # leading block axis and the outputs in place.
  feature = out_spec[1]
  y = y.reshape(y.shape[:feature] + (blocks, outputs) + y.shape[feature + 1 :])
  y = jnp.moveaxis(y, feature, 0)
  # block b of output o at column b * out + o, whatever the kernel's layout
  scale = _blocks.column_scales(kernel.scale, kernel.channel_axes).reshape(
    (blocks,) + (1,) * feature + (outputs,) + (1,) * (y.ndim - 2 - feature)
  )
  session.record(path, layer, kernel, contraction=how)
  return _blocks_times_scales(
    y, scale, a, [out_spec[0]], jnp.result_type(lhs.dtype, rhs.dtype)
  )


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
    # A blocked kernel (group_size) runs in integers as a (in, out) matrix
    # contracted along its input axis: one integer product per block.
    blocks = (
      isinstance(kernel, QArray)
      and kernel.num_blocks > 1
      and kernel.ndim == 2
      and tuple(rc) == (0,)
      and kernel.channel_axes == (1,)
    )
    blocker = (
      "batch dimensions in the contraction: float"
      if lb or rb
      else _integer_blocker(kernel, rhs, path, blocks)
    )
    if not blocker and set(kernel.channel_axes) & set(rc):
      blocker = "per-channel scale on a contracted axis: float"
    if blocker:
      return _in_float(session, path, layer, kernel, float_dot, a, blocker)
    if blocks:
      return _blocked_dense(
        session, path, layer, a, group_ndim, kernel, lc[0], lhs, rhs
      )
    int_dn = ((tuple(lc), tuple(rc)), ((), ()))
    terms = math.prod(lhs.shape[c] for c in lc)
    # trailing input axes against leading kernel axes: a matrix product
    plain = tuple(lc) == tuple(range(lhs.ndim - len(lc), lhs.ndim)) and tuple(
      rc
    ) == tuple(range(len(rc)))
    y, how = _integer_product(
      session,
      path,
      a,
      kernel.values,
      kernel.max_abs_value,
      lambda x, w, t: lax.dot_general(
        x, w, int_dn, precision=lax.Precision.HIGHEST, preferred_element_type=t
      ),
      _MATMUL_ORDER,
      terms,
      rows=lhs.size // max(terms, 1),
      native=(
        functools.partial(_int8_matmul.int8_matmul, contracting=len(lc))
        if plain
        else None
      ),
    )
    lhs_free = [i for i in range(lhs.ndim) if i not in contracted]
    rhs_free = [i for i in range(rhs.ndim) if i not in set(rc)]
    w_pos = [len(lhs_free) + rhs_free.index(c) for c in kernel.channel_axes]
    session.record(path, layer, kernel, contraction=how)
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
    # A blocked kernel (group_size) whose blocks run along the input
    # features and taps of each output runs as one wider integer conv.
    blocks = (
      isinstance(kernel, QArray)
      and kernel.num_blocks > 1
      and kernel.channel_axes == (rhs_spec[0],)
      and feature_group_count == 1
    )
    blocker = _integer_blocker(kernel, rhs, path, blocks)
    if not blocker and kernel.channel_axes not in ((), (rhs_spec[0],)):
      blocker = "per-channel scale not on the output features: float"
    if (
      blocker
      and isinstance(kernel, QArray)
      and kernel.num_blocks > 1
      and feature_group_count != 1
    ):
      blocker = (
        f"kernel in blocks of {kernel.group_size} (group_size) with"
        " feature_group_count > 1: contraction in float on the dequantized"
        " kernel"
      )
    if blocker:
      return _in_float(session, path, layer, kernel, float_conv, a, blocker)
    w_values = kernel.values
    if mask is not None:
      w_values = w_values * jnp.asarray(mask).astype(w_values.dtype)
    int_conv = lambda x, w, t: lax.conv_general_dilated(
      x,
      w,
      precision=lax.Precision.HIGHEST,
      preferred_element_type=t,
      **args,
    )
    if blocks:
      return _blocked_conv(
        session,
        path,
        layer,
        a,
        kernel,
        w_values,
        rhs,
        (lhs_spec, rhs_spec, out_spec),
        int_conv,
        lhs,
      )
    features = rhs.shape[rhs_spec[1]]  # input features of one output
    native = None
    if (
      lhs.ndim == 4
      and tuple(lhs_spec) == _int8_conv.NHWC
      and tuple(rhs_spec) == _int8_conv.HWIO
      and tuple(out_spec) == _int8_conv.NHWC
      and feature_group_count == 1
      and all(d == 1 for d in (lhs_dilation or (1, 1)))
    ):
      dilation = tuple(rhs_dilation or (1, 1))
      pads = (
        lax.padtype_to_pads(
          lhs.shape[1:3],
          [(k - 1) * d + 1 for k, d in zip(rhs.shape[:2], dilation)],
          window_strides,
          padding,
        )
        if isinstance(padding, str)
        else padding
      )
      native = functools.partial(
        _int8_conv.int8_conv,
        strides=window_strides,
        pads=pads,
        dilation=dilation,
      )
    y, how = _integer_product(
      session,
      path,
      a,
      w_values,
      kernel.max_abs_value,
      int_conv,
      _CONV_ORDER,
      terms=math.prod(rhs.shape[d] for d in rhs_spec[2:]) * features,
      rows=lhs.size // max(lhs.shape[lhs_spec[1]], 1),
      native=native,
    )
    session.record(path, layer, kernel, contraction=how)
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
    size = dict(zip(lhs_labels, lhs.shape)) | dict(zip(rhs_labels, rhs.shape))
    summed = (set(lhs_labels) | set(rhs_labels)) - set(result)
    # One output sums the activations of every group whose label is summed,
    # and each activation once per index of a summed kernel-only label.
    spread = math.prod(
      size[c]
      for c in summed
      if c in lhs_labels[:group_ndim] or c not in lhs_labels
    )
    y, how = _integer_product(
      session,
      path,
      a,
      kernel.values,
      kernel.max_abs_value,
      lambda x, w, t: jnp.einsum(
        expanded,
        x,
        w,
        precision=lax.Precision.HIGHEST,
        preferred_element_type=t,
      ),
      _MATMUL_ORDER,
      terms=math.prod(size[c] for c in summed),
      rows=lhs.size // max(math.prod(lhs.shape[i] for i in contracted), 1),
      spread=spread,
    )
    a_pos = [result.index(lhs_labels[i]) for i in range(group_ndim)]
    w_pos = [result.index(c) for c in channel_labels]
    session.record(path, layer, kernel, contraction=how)
    return _rescale(
      y, a, a_pos, kernel, w_pos, jnp.result_type(lhs.dtype, rhs.dtype)
    )

  return einsum
