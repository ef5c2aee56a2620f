"""``mcq_apply``: run a linen model with sampled activations and integer layers.

Layers are intercepted with Flax's own ``nn.intercept_methods``; nothing in jax
or flax is patched. A covered layer (``Dense``, ``DenseGeneral``, ``Conv``,
``Einsum``) is re-run with its contraction replaced:

* ``Dense``/``DenseGeneral``/``Conv`` keep all of Flax's own logic (padding
  modes, strides, dilation, feature groups, masks) and receive our contraction
  through their ``dot_general`` / ``conv_general_dilated`` attributes;
* ``Einsum`` (which has no such attribute) is computed here from its equation.

The contraction samples the incoming activations by MCQ and, when the weights
are a :class:`QArray`, multiplies integers with int32 accumulation, then
rescales once in float. Every other layer runs unchanged; where it reads a
quantized parameter it sees the dequantized float value (``QArray`` is a Flax
``AxisMetadata`` box).
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Callable, Mapping
from typing import Any, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import opt_einsum
from flax import struct
from jax import lax

from mcq_jax import _paths
from mcq_jax import _quantize
from mcq_jax._activations import quantize_activations
from mcq_jax._qarray import QArray

# Layers computed by mcq_apply; everything else runs as the model defines it.
COVERED_LAYERS = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum)

LayerWhere = Union[None, str, re.Pattern, Callable[[tuple[str, ...], nn.Module], bool]]

_INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class LayerReport:
  """How one layer call ran under :func:`mcq_apply`.

  Attributes:
    path: ``/``-joined module path (with ``#i`` for the i-th call of a layer
      called more than once).
    layer: the layer class name.
    weights: ``"int"`` (a :class:`QArray` kernel) or ``"float"``.
    activations: ``"sampled"`` (MCQ, ``activation_samples`` per value) or
      ``"float"``.
    integer: whether the contraction ran in integer arithmetic.
    note: why a covered layer did not run in integers, if it did not.
  """

  path: str
  layer: str
  weights: str
  activations: str
  integer: bool
  note: str = ""


@struct.dataclass
class ApplyReport:
  """The layers :func:`mcq_apply` saw, in call order. A pytree with no leaves,
  so it can be returned from ``jax.jit``."""

  layers: tuple[LayerReport, ...] = struct.field(pytree_node=False)

  @property
  def integer_layers(self) -> tuple[str, ...]:
    return tuple(r.path for r in self.layers if r.integer)

  def __str__(self) -> str:
    lines = []
    for r in self.layers:
      how = "integer" if r.integer else "float"
      note = f"  ({r.note})" if r.note else ""
      lines.append(
          f"{r.path}: {r.layer}, weights {r.weights}, activations"
          f" {r.activations} -> {how}{note}"
      )
    return "\n".join(lines)


def _check_finite(x: jax.Array, path: str) -> None:
  message = f"layer {path!r}: its input has non-finite values (NaN or inf)"

  def raise_if_bad(ok):
    if not np.all(ok):
      raise FloatingPointError(message)

  ok = jnp.all(jnp.isfinite(x))
  if isinstance(ok, jax.core.Tracer):  # also for constants inside a trace
    jax.debug.callback(raise_if_bad, ok)
  else:
    raise_if_bad(np.asarray(ok))


def _check_overflow(a: QArray, w: QArray, abs_contract: Callable, path: str) -> None:
  """Raises if the int32 accumulation of ``a . w`` could have overflowed.

  Every output is at most ``N_a * max|w|`` (the activation counts of a group
  sum to ``N_a``); only when that bound is not safe is the exact worst case,
  the contraction of ``|a|`` with ``|w|``, computed.
  """
  if a.samples * w.samples <= _INT32_MAX:
    return  # statically safe: no value can reach 2**31
  w_max = jnp.max(jnp.abs(w.values)).astype(jnp.float32)
  risky = jnp.float32(a.samples) * w_max > _INT32_MAX

  def exact():
    worst = abs_contract(
        jnp.abs(a.values).astype(jnp.float32), jnp.abs(w.values).astype(jnp.float32)
    )
    return jnp.max(worst) > _INT32_MAX

  overflow = lax.cond(risky, exact, lambda: jnp.bool_(False))
  message = (
      f"layer {path!r}: int32 accumulation overflows; lower activation_samples"
      " or samples_per_weight"
  )

  def raise_if_overflow(flag):
    if np.any(flag):
      raise OverflowError(message)

  jax.debug.callback(raise_if_overflow, overflow)


class _Session:
  """Per-call state of one :func:`mcq_apply`: keys, options and the report."""

  def __init__(self, key, samples, sampler, per_token, selector, check_finite):
    self.key = key
    self.samples = samples
    self.sampler = sampler
    self.per_token = per_token
    self.selector = selector
    self.check_finite = check_finite
    self.reports: list[LayerReport] = []
    self.calls: dict[str, int] = {}
    self.covered_seen: list[str] = []
    self.inside = False

  def layer_key(self, path: str) -> jax.Array:
    return jax.random.fold_in(self.key, zlib.crc32(path.encode()) & 0x7FFFFFFF)

  def sample(self, x: jax.Array, key: jax.Array, group_ndim: int, path: str) -> QArray:
    if self.check_finite:
      _check_finite(x, path)
    return quantize_activations(
        x, key, self.samples, group_ndim=group_ndim, sampler=self.sampler
    )


def _leading_free_axes(ndim: int, contracted: set[int]) -> int:
  count = 0
  while count < ndim and count not in contracted:
    count += 1
  return count


def _scale_for_output(scale: jax.Array, keep: list[int], out_positions: list[int], out_ndim: int):
  """Moves the axes ``keep`` of ``scale`` (others have size 1) to ``out_positions``."""
  s = scale.reshape([scale.shape[a] for a in keep]) if keep else scale.reshape(())
  shape = [1] * out_ndim
  for axis, pos in zip(keep, out_positions):
    shape[pos] = scale.shape[axis]
  order = np.argsort(out_positions)
  return jnp.transpose(s, order).reshape(shape) if keep else s


def _dot_general_fn(session: _Session, kernel: Any, path: str, notes: list[str]):
  """A ``dot_general`` for Dense/DenseGeneral that samples its lhs."""

  def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
    (lc, rc), (lb, rb) = dimension_numbers
    float_dot = lambda a, b: lax.dot_general(
        a, b, dimension_numbers, precision=precision,
        preferred_element_type=preferred_element_type)
    if session.samples is None:
      notes.append("activations not sampled (activation_samples=None)")
      return float_dot(lhs, rhs)
    if lb or rb:
      notes.append("batch dimensions in the contraction: computed in float")
      a = session.sample(lhs, session.layer_key(path), 0, path)
      return float_dot(a.dequantize(jnp.float32).astype(lhs.dtype), rhs)
    contracted = set(lc)
    free = _leading_free_axes(lhs.ndim, contracted)
    group_ndim = free if session.per_token else min(1, free)
    if lhs.ndim == 1:
      group_ndim = 0
    a = session.sample(lhs, session.layer_key(path), group_ndim, path)
    if not isinstance(kernel, QArray):
      notes.append("float weights: activations sampled, contraction in float")
      return float_dot(a.dequantize(jnp.float32).astype(lhs.dtype), rhs)
    if rhs.shape != kernel.shape:
      raise ValueError(f"layer {path!r}: kernel shape {rhs.shape} != quantized {kernel.shape}")
    if set(kernel.channel_axes) & set(rc):
      notes.append("per-channel scale on a contracted axis: computed in float")
      return float_dot(a.dequantize(jnp.float32).astype(lhs.dtype), rhs)
    int_dn = ((tuple(lc), tuple(rc)), ((), ()))
    _check_overflow(
        a, kernel, lambda x, y: lax.dot_general(x, y, int_dn), path)
    y = lax.dot_general(a.values, kernel.values.astype(jnp.int32), int_dn,
                        preferred_element_type=jnp.int32)
    lhs_free = [i for i in range(lhs.ndim) if i not in contracted]
    rhs_free = [i for i in range(rhs.ndim) if i not in set(rc)]
    out_ndim = len(lhs_free) + len(rhs_free)
    a_scale = _scale_for_output(
        a.scale, list(range(group_ndim)), list(range(group_ndim)), out_ndim)
    w_scale = _scale_for_output(
        kernel.scale, list(kernel.channel_axes),
        [len(lhs_free) + rhs_free.index(c) for c in kernel.channel_axes], out_ndim)
    out = y.astype(jnp.float32) * a_scale * w_scale
    return out.astype(jnp.result_type(lhs.dtype, rhs.dtype))

  return dot_general


def _conv_fn(session: _Session, module: nn.Conv, kernel: Any, path: str, notes: list[str]):
  """A ``conv_general_dilated`` for Conv that samples its lhs per example."""

  def conv(lhs, rhs, window_strides=None, padding=None, lhs_dilation=None,
           rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
           precision=None, **kw):
    kw.pop("preferred_element_type", None)
    args = dict(window_strides=window_strides, padding=padding,
                lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                dimension_numbers=dimension_numbers,
                feature_group_count=feature_group_count, **kw)
    float_conv = lambda a, b: lax.conv_general_dilated(a, b, precision=precision, **args)
    if session.samples is None:
      notes.append("activations not sampled (activation_samples=None)")
      return float_conv(lhs, rhs)
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    lhs_spec, rhs_spec, out_spec = dn
    if lhs_spec[0] != 0:
      raise ValueError(f"layer {path!r}: batch axis of the conv input must be first")
    a = session.sample(lhs, session.layer_key(path), 1, path)
    if not isinstance(kernel, QArray):
      notes.append("float weights: activations sampled, contraction in float")
      return float_conv(a.dequantize(jnp.float32).astype(lhs.dtype), rhs)
    if rhs.shape != kernel.shape:
      raise ValueError(f"layer {path!r}: kernel shape {rhs.shape} != quantized {kernel.shape}")
    if kernel.channel_axes not in ((), (rhs_spec[0],)):
      notes.append("per-channel scale not on the output features: computed in float")
      return float_conv(a.dequantize(jnp.float32).astype(lhs.dtype), rhs)
    w_values = kernel.values.astype(jnp.int32)
    if module.mask is not None:
      w_values = w_values * jnp.asarray(module.mask).astype(jnp.int32)
    int_conv = lambda x, y: lax.conv_general_dilated(x, y, **args)
    _check_overflow(a, kernel, int_conv, path)
    y = lax.conv_general_dilated(a.values, w_values, preferred_element_type=jnp.int32, **args)
    out_ndim = y.ndim
    a_scale = _scale_for_output(a.scale, [0], [out_spec[0]], out_ndim)
    w_scale = _scale_for_output(
        kernel.scale, list(kernel.channel_axes), [out_spec[1]] * len(kernel.channel_axes), out_ndim)
    out = y.astype(jnp.float32) * a_scale * w_scale
    return out.astype(jnp.result_type(lhs.dtype, rhs.dtype))

  return conv


def _einsum(session: _Session, module: nn.Einsum, args, kwargs, path: str, notes: list[str]):
  """``nn.Einsum.__call__`` with the contraction done on sampled integers."""
  inputs = args[0]
  call_str = kwargs.get("einsum_str", args[1] if len(args) > 1 else None)
  if (module.einsum_str is None) == (call_str is None):
    raise ValueError(
        f"layer {path!r}: exactly one of the module's and the call's einsum_str must be set"
    )
  equation = (module.einsum_str or call_str).replace(" ", "")
  params = module.variables["params"]
  kernel = params["kernel"]
  k_float = kernel.dequantize(jnp.float32) if isinstance(kernel, QArray) else nn.meta.unbox(kernel)
  if tuple(k_float.shape) != tuple(module.shape):
    raise ValueError(f"layer {path!r}: kernel shape {k_float.shape} != layer shape {module.shape}")
  operands, result, _ = opt_einsum.parser.parse_einsum_input((equation, inputs, k_float))
  lhs_labels, rhs_labels = operands.split(",")
  expanded = f"{operands}->{result}"
  dtype = module.dtype or jnp.result_type(inputs.dtype, kernel.dtype if isinstance(kernel, QArray) else k_float.dtype)

  if session.samples is None:
    notes.append("activations not sampled (activation_samples=None)")
    y = jnp.einsum(expanded, inputs, k_float, precision=module.precision)
  else:
    contracted = {i for i, c in enumerate(lhs_labels) if c not in result}
    free = _leading_free_axes(len(lhs_labels), contracted)
    group_ndim = free if session.per_token else min(1, free)
    a = session.sample(inputs, session.layer_key(path), group_ndim, path)
    channel_labels = [rhs_labels[c] for c in kernel.channel_axes] if isinstance(kernel, QArray) else []
    if not isinstance(kernel, QArray):
      notes.append("float weights: activations sampled, contraction in float")
      y = jnp.einsum(expanded, a.dequantize(jnp.float32), k_float, precision=module.precision)
    elif any(c not in result for c in channel_labels):
      notes.append("per-channel scale on a contracted axis: computed in float")
      y = jnp.einsum(expanded, a.dequantize(jnp.float32), k_float, precision=module.precision)
    else:
      int_einsum = lambda x, w: jnp.einsum(expanded, x, w)
      _check_overflow(a, kernel, int_einsum, path)
      y = jnp.einsum(expanded, a.values, kernel.values.astype(jnp.int32),
                     preferred_element_type=jnp.int32)
      a_scale = _scale_for_output(
          a.scale, list(range(group_ndim)),
          [result.index(lhs_labels[i]) for i in range(group_ndim)], len(result))
      w_scale = _scale_for_output(
          kernel.scale, list(kernel.channel_axes),
          [result.index(c) for c in channel_labels], len(result))
      y = y.astype(jnp.float32) * a_scale * w_scale
  if module.use_bias:
    _, bias_shape = module._get_bias_shape(equation, inputs, k_float)  # pylint: disable=protected-access
    bias = nn.meta.unbox(params["bias"])
    if isinstance(bias, QArray):
      bias = bias.dequantize()
    y = y + jnp.reshape(bias, bias_shape)
  return y.astype(dtype)


def mcq_apply(
    model: nn.Module,
    variables: Mapping[str, Any],
    *args: Any,
    key: jax.Array,
    activation_samples: float | None = 2.0,
    sampler: str = "stratified",
    per_token: bool = False,
    where: LayerWhere = None,
    check_finite: bool = True,
    return_report: bool = False,
    **apply_kwargs: Any,
) -> Any:
  """Runs a linen model with MCQ-sampled activations and integer layers.

  Before each covered layer (``nn.Dense``, ``nn.DenseGeneral``, ``nn.Conv`` of
  any rank, padding, stride, dilation or feature grouping, ``nn.Einsum``) the
  layer's input is quantized by MCQ, one distribution per example (or per
  token with ``per_token=True``), signs kept, ``N_a = round(K_a * n_a)``
  samples and an independent key per layer, call and example. With a
  :class:`QArray` kernel the layer is computed in integers: int32 accumulation
  of ``q_a . q_w``, then one float rescale ``s_a * s_w`` and the float bias.
  That equals the float computation on the dequantized values exactly while
  int32 does not overflow; an overflow raises ``OverflowError`` (at run time
  under ``jit``), it is never silent.

  Layers that are not covered (``ConvTranspose``, ``ConvLocal``, ``Embed``,
  norms, attention's own einsums, ...) run as the model defines them, on the
  dequantized float values of any quantized parameter they read.

  Args:
    model: a ``flax.linen`` module.
    variables: its variables, e.g. ``{"params": params_q, "batch_stats": ...}``;
      ``params`` may hold :class:`QArray` leaves from :func:`mcq_jax.quantize`
      or plain floats (activations are then sampled, weights stay float).
    *args: positional inputs of the model call.
    key: a ``jax.random`` key for the activation samples (an argument, so a
      jitted ``mcq_apply`` takes new keys without recompiling).
    activation_samples: ``K_a > 0``, samples per activation value; ``None``
      runs weights-only (float activations, dequantized weights).
    sampler: ``"stratified"``, ``"systematic"`` or ``"iid"``.
    per_token: one distribution per position's feature vector (sequence
      models) instead of per example, for dense and einsum layers; convs are
      always per example.
    where: which covered layers to sample: a regex on the ``/``-joined module
      path or a callable ``(path_tuple, module) -> bool``; ``None`` means all.
    check_finite: raise ``FloatingPointError`` naming the layer if its input
      holds NaN/inf.
    return_report: also return an :class:`ApplyReport` of how each layer ran.
    **apply_kwargs: passed to ``model.apply`` (``method``, ``mutable``,
      ``rngs``, model keyword arguments such as ``train``).

  Returns:
    What ``model.apply`` returns, and the report if ``return_report``.

  Raises:
    ValueError: an unknown sampler, a bad ``activation_samples``, or a
      ``where`` that selects no covered layer.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, mcq_jax
    >>> model = nn.Dense(3)
    >>> variables = model.init(jax.random.key(0), jnp.ones((2, 4)))
    >>> params_q = mcq_jax.quantize(variables["params"], jax.random.key(1))
    >>> y, report = mcq_jax.mcq_apply(model, {"params": params_q}, jnp.ones((2, 4)),
    ...                               key=jax.random.key(2), return_report=True)
    >>> y.shape, report.integer_layers
    ((2, 3), ('<root>',))
  """
  if activation_samples is not None:
    _quantize.check_sampling_amount("activation_samples", activation_samples)
  _quantize.check_choice("sampler", sampler, _quantize.SAMPLERS)
  if not isinstance(model, nn.Module):
    raise TypeError(f"model must be a flax.linen Module, got {type(model).__name__}")
  selector = _paths.make_selector(where, lambda path, module: True, "module")
  session = _Session(key, activation_samples, sampler, per_token, selector, check_finite)

  def interceptor(next_fun, call_args, call_kwargs, context):
    module = context.module
    if (session.inside or context.method_name != "__call__"
        or not isinstance(module, COVERED_LAYERS)):
      return next_fun(*call_args, **call_kwargs)
    names = tuple(module.path)
    base = "/".join(names) or "<root>"
    session.covered_seen.append(base)
    if not session.selector(names, module):
      return next_fun(*call_args, **call_kwargs)
    count = session.calls.get(base, 0)
    session.calls[base] = count + 1
    path = base if count == 0 else f"{base}#{count}"
    kernel = module.variables.get("params", {}).get("kernel")
    notes: list[str] = []
    session.inside = True
    try:
      if isinstance(module, nn.Einsum):
        out = _einsum(session, module, call_args, call_kwargs, path, notes)
      else:
        if isinstance(module, nn.Conv):
          fn = _conv_fn(session, module, kernel, path, notes)
          clone = module.clone(parent=None, conv_general_dilated=fn, conv_general_dilated_cls=None)
        else:
          fn = _dot_general_fn(session, kernel, path, notes)
          clone = module.clone(parent=None, dot_general=fn, dot_general_cls=None)
        out = clone.apply(dict(module.variables), *call_args, **call_kwargs)
    finally:
      session.inside = False
    sampled = activation_samples is not None
    session.reports.append(LayerReport(
        path=path,
        layer=type(module).__name__,
        weights="int" if isinstance(kernel, QArray) else "float",
        activations="sampled" if sampled else "float",
        integer=sampled and isinstance(kernel, QArray) and not notes,
        note="; ".join(dict.fromkeys(notes)),
    ))
    return out

  with nn.intercept_methods(interceptor):
    out = model.apply(variables, *args, **apply_kwargs)
  if where is not None and session.covered_seen and not session.calls:
    raise ValueError(
        f"`where`={where!r} selects none of the covered layers:"
        f" {sorted(set(session.covered_seen))}"
    )
  if return_report:
    return out, ApplyReport(layers=tuple(session.reports))
  return out
