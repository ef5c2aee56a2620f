"""``mcq_call``: the NNX counterpart of ``mcq_apply``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from mcq_jax import _paths, _session
from mcq_jax._contractions import conv_fn, dot_general_fn, einsum_fn
from mcq_jax._qarray import QArray, recording_reads
from mcq_jax._session import Session
from mcq_jax._typing import PRNGKey, Sampler, Where

# NNX layers computed by mcq_call, with the attribute through which each one
# lets its contraction be replaced.
NNX_COVERED_LAYERS = {
  nnx.Linear: "dot_general",
  nnx.LinearGeneral: "dot_general",
  nnx.Conv: "conv_general_dilated",
  nnx.Einsum: "einsum_op",
}


# The layer types above, for the type checker.
_CoveredLayer = nnx.Linear | nnx.LinearGeneral | nnx.Conv | nnx.Einsum


def _current_kernel(stored: Any, rhs: jax.Array, reads: list[QArray]) -> Any:
  """The kernel this call of a layer contracts with.

  Outside lifted transforms it is the stored kernel. Inside ``nnx.scan`` /
  ``nnx.vmap`` over a stack, the layer works on one slice of the stored
  (stacked) kernel: the slice is the last ``QArray`` the layer read with the
  shape it passes on. Its channel axes still count the stack's leading axes
  (NNX slices the values, not the static metadata), so they are shifted.
  """
  if not isinstance(stored, QArray) or stored.shape == tuple(rhs.shape):
    return stored
  for q in reversed(reads):
    if q.shape == tuple(rhs.shape):
      lead = stored.ndim - q.ndim
      axes = tuple(a - lead for a in stored.channel_axes if a >= lead)
      return dataclasses.replace(q, channel_axes=axes)
  return stored  # not found: the shape check reports the mismatch


def _contraction(
  session: Session, module: _CoveredLayer, base: str, reads: list[QArray]
) -> Callable[..., jax.Array]:
  """The layer's contraction for this call: the kernel (or the slice of it
  the layer works on) is found when the layer calls it."""
  layer = type(module).__name__
  stored = module.kernel.get_value()

  def for_rhs(rhs: jax.Array) -> Callable[..., jax.Array]:
    kernel = _current_kernel(stored, rhs, reads)
    # A stored kernel of another shape than the one the layer contracts with
    # means a slice of a stack: the iteration's key folds in its content.
    lifted = tuple(getattr(stored, "shape", ())) != tuple(rhs.shape)
    if isinstance(module, nnx.Conv):
      return conv_fn(session, base, layer, kernel, module.mask, lifted)
    if isinstance(module, nnx.Einsum):
      return einsum_fn(session, base, layer, kernel, lifted)
    return dot_general_fn(session, base, layer, kernel, lifted)

  if isinstance(module, nnx.Einsum):  # einsum_op(equation, lhs, rhs, ...)
    return lambda equation, lhs, rhs, *args, **kwargs: for_rhs(rhs)(
      equation, lhs, rhs, *args, **kwargs
    )
  return lambda lhs, rhs, *args, **kwargs: for_rhs(rhs)(
    lhs, rhs, *args, **kwargs
  )


def mcq_call(
  model: nnx.Module,
  *args: Any,
  key: PRNGKey,
  activation_samples: float | None = _session.DEFAULT_ACTIVATION_SAMPLES,
  activation_bits: int | None = None,
  sampler: Sampler = "systematic",
  per_token: bool = False,
  where: Where = None,
  check_finite: bool = True,
  return_report: bool = False,
  **kwargs: Any,
) -> Any:
  """Calls an NNX model with MCQ-sampled activations and integer layers.

  ``mcq_call(model, x, key=k)`` is ``model(x)`` in which every covered layer
  (``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Conv``, ``nnx.Einsum``) samples
  its input by MCQ (one distribution per example, or per token) and, when its
  kernel holds a :class:`QArray`, contracts integers with int32 accumulation
  and rescales once in float, exactly as :func:`mcq_jax.mcq_apply` does for
  linen. Quantize an NNX model in place the NNX way::

      nnx.update(model, mcq_jax.quantize(nnx.state(model, nnx.Param), key))

  after which a plain ``model(x)`` runs in float on the dequantized weights
  and ``mcq_call`` runs it in integers. The contraction is installed through
  each layer's own injection attribute (``dot_general``,
  ``conv_general_dilated``, ``einsum_op``) for the duration of the call and
  restored afterwards, also on error; nothing global is patched. Works inside
  ``nnx.jit`` and ``nnx.vmap`` (pass the key as an argument).

  Args:
    model: an ``nnx.Module``.
    *args: positional inputs of the call.
    key: a ``jax.random`` key for the activation samples.
    activation_samples: ``K_a > 0`` (default 4, as in :func:`mcq_apply`);
      ``None`` samples nothing.
    activation_bits: instead of ``activation_samples``, a bit budget, as in
      :func:`mcq_apply`.
    sampler: ``"systematic"`` (default), ``"stratified"`` or ``"iid"``.
    per_token: one distribution per position instead of per example (dense
      and einsum layers).
    where: regex on the ``/``-joined module path, or a callable
      ``(path_tuple, module) -> bool``; ``None`` means all covered layers.
    check_finite: raise ``FloatingPointError`` naming the layer on NaN/inf
      inputs.
    return_report: also return an :class:`ApplyReport`.
    **kwargs: keyword arguments of the model call.

  Returns:
    The model's output, and the report if ``return_report``.

  Examples:
    >>> import jax, jax.numpy as jnp, mcq_jax
    >>> from flax import nnx
    >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    >>> params = nnx.state(model, nnx.Param)
    >>> nnx.update(model, mcq_jax.quantize(params, jax.random.key(1)))
    >>> y, report = mcq_jax.mcq_call(
    ...     model, jnp.ones((2, 4)), key=jax.random.key(2), return_report=True)
    >>> y.shape, report.integer_layers
    ((2, 3), ('<root>',))
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}")
  session = Session(
    _session.activation_options(
      activation_samples, activation_bits, sampler, per_token, check_finite
    ),
    key,
  )
  selector = _paths.make_selector(where, _paths.select_all, "module")

  covered: list[str] = []
  chosen: list[tuple[str, _CoveredLayer, str]] = []
  for path, module in nnx.iter_modules(model):
    if not isinstance(module, _CoveredLayer):
      continue
    attr = next(
      a for t, a in NNX_COVERED_LAYERS.items() if isinstance(module, t)
    )
    names = tuple(str(p) for p in path)
    base = "/".join(names) or "<root>"
    covered.append(base)
    if selector(names, module):
      chosen.append((base, module, attr))
  if where is not None and covered and not chosen:
    raise ValueError(
      f"`where`={where!r} selects none of the covered layers: {sorted(covered)}"
    )

  saved: list[tuple[_CoveredLayer, str, Any]] = []
  reads: list[QArray] = []
  try:
    for base, module, attr in chosen:
      saved.append((module, attr, getattr(module, attr)))
      setattr(module, attr, _contraction(session, module, base, reads))
      # Only some covered layers have a dot_general_cls (which would take
      # precedence over dot_general): reached by name, not as an attribute of
      # the union type.
      factory = getattr(module, "dot_general_cls", None)
      if attr == "dot_general" and factory is not None:
        saved.append((module, "dot_general_cls", factory))
        setattr(module, "dot_general_cls", None)  # noqa: B010
    with recording_reads(reads):
      out = model(*args, **kwargs)
  finally:
    for module, attr, value in reversed(saved):
      setattr(module, attr, value)
  # all the layers' checks at once: the native check (tied to the outputs)
  # or one host callback
  out = session.checks.flush(out)
  if return_report:
    return out, session.log.report()
  return out
