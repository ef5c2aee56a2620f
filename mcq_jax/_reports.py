"""Reports of how a model call ran under ``mcq_apply`` / ``mcq_call``."""

from __future__ import annotations

import dataclasses

from flax import struct


@dataclasses.dataclass(frozen=True)
class LayerReport:
  """How one layer call ran under :func:`mcq_jax.mcq_apply`.

  Attributes:
    path: ``/``-joined module path (with ``#i`` for the i-th call of a layer
      called more than once).
    layer: the layer class name.
    weights: ``"int"`` (a :class:`QArray` kernel) or ``"float"``.
    activations: ``"sampled"`` (MCQ) or ``"float"``.
    integer: whether the contraction ran in integer arithmetic.
    note: why a covered layer did not run in integers, if it did not.
    lifted: the layer ran inside a lifted transform (``nn.scan``,
      ``nnx.vmap``...), whose body is traced once: this one entry stands for
      every iteration (each iteration draws its own activation noise).
    contraction: for an integer layer, the operand type its exact contraction
      ran with: ``"int8"`` or ``"int32"`` (int32 accumulation) or
      ``"float32"`` (integer-valued, while every partial sum stays below
      ``2**24``); under ``jit``, where the choice depends on the values, the
      candidates followed by ``"(chosen at run time)"``.
  """

  path: str
  layer: str
  weights: str
  activations: str
  integer: bool
  note: str = ""
  lifted: bool = False
  contraction: str = ""


@struct.dataclass
class ApplyReport:
  """The covered layers a call ran, in call order.

  A pytree with no leaves, so it can be returned from ``jax.jit``.

  Attributes:
    layers: one :class:`LayerReport` per layer call, in call order.
  """

  layers: tuple[LayerReport, ...] = struct.field(pytree_node=False)

  @property
  def integer_layers(self) -> tuple[str, ...]:
    """Paths of the layer calls that ran in integer arithmetic."""
    return tuple(r.path for r in self.layers if r.integer)

  def __str__(self) -> str:
    lines = []
    for r in self.layers:
      how = "integer" if r.integer else "float"
      note = f"  ({r.note})" if r.note else ""
      if r.lifted:
        note += "  [lifted transform: one entry for all its iterations]"
      lines.append(
        f"{r.path}: {r.layer}, weights {r.weights}, activations"
        f" {r.activations} -> {how}{note}"
      )
    return "\n".join(lines)
