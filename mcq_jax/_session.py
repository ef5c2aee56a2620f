"""The state of one ``mcq_apply`` / ``mcq_call``: options, keys and the log.

Three separate pieces, each with one job: :class:`ActivationOptions` (what the
user asked for, validated once), the key the activation samples derive from,
and :class:`CallLog` (how many times each layer ran and how each call ran).
"""

from __future__ import annotations

import dataclasses

import jax

from mcq_jax import _keys, _runtime_checks, _sampling, _validation
from mcq_jax._activations import quantize_activations
from mcq_jax._qarray import QArray
from mcq_jax._reports import ApplyReport, LayerReport
from mcq_jax._typing import PRNGKey, Sampler


@dataclasses.dataclass(frozen=True)
class ActivationOptions:
  """How a model call samples the inputs of its covered layers.

  Attributes:
    activation_samples: ``K_a > 0``, or ``None`` for float activations.
    sampler: the MCQ sampler.
    per_token: one distribution per position rather than per example.
    check_finite: reject NaN/inf inputs.
    activation_bits: instead of ``activation_samples``, a bit budget: each
      example (or token) draws the largest ``N`` whose counts fit signed
      ``activation_bits``-bit values.
  """

  activation_samples: float | None
  sampler: Sampler
  per_token: bool
  check_finite: bool
  activation_bits: int | None = None

  def __post_init__(self) -> None:
    if self.activation_samples is not None or self.activation_bits is not None:
      _validation.sampling_or_bits(
        "activation_samples",
        self.activation_samples,
        self.activation_bits,
        0.0,  # unused: one of the two is set
      )
    _validation.check_choice("sampler", self.sampler, _sampling.ALL_SAMPLERS)

  @property
  def sampled(self) -> bool:
    """Whether activations are sampled (a sampling amount or budget)."""
    return (
      self.activation_samples is not None or self.activation_bits is not None
    )


# K_a of mcq_apply and mcq_call (see their docs).
DEFAULT_ACTIVATION_SAMPLES = 4.0


def activation_options(
  activation_samples: float | None,
  activation_bits: int | None,
  sampler: Sampler,
  per_token: bool,
  check_finite: bool,
) -> ActivationOptions:
  """The options of a model call. ``activation_bits`` replaces the default
  ``activation_samples``; with any other ``activation_samples`` (``None``,
  float activations, included) it is an error."""
  if activation_bits is not None:
    if activation_samples != DEFAULT_ACTIVATION_SAMPLES:
      raise ValueError(
        "pass activation_samples or activation_bits, not both:"
        f" activation_bits={activation_bits!r} chooses each example's number"
        f" of samples, activation_samples={activation_samples!r}"
        + (" runs float activations" if activation_samples is None else "")
        + (" fixes it" if activation_samples is not None else "")
      )
    activation_samples = None
  return ActivationOptions(
    activation_samples, sampler, per_token, check_finite, activation_bits
  )


class CallLog:
  """Counts the calls of each layer and records how each call ran."""

  def __init__(self) -> None:
    self._calls: dict[str, int] = {}
    self._lifted: set[str] = set()
    self._layers: list[LayerReport] = []

  def claim(self, base: str, lifted: bool = False) -> str:
    """The path of this call of layer ``base`` (``base#i`` after the first);
    ``lifted``: the call is the traced body of a lifted transform."""
    count = self._calls.get(base, 0)
    self._calls[base] = count + 1
    path = base if count == 0 else f"{base}#{count}"
    if lifted:
      self._lifted.add(path)
    return path

  def is_lifted(self, path: str) -> bool:
    """Whether the call ``path`` was claimed as lifted."""
    return path in self._lifted

  def record(self, layer: LayerReport) -> None:
    self._layers.append(layer)

  def report(self) -> ApplyReport:
    """The calls in order; a lifted layer's entry once. Flax traces an
    ``nn.scan`` body more than once (a first pass whose result it discards,
    then ``lax.scan``'s), so each of its layers is claimed again, as
    ``base#1``, with the same outcome."""
    seen: set[tuple] = set()
    layers = []
    for r in self._layers:
      if r.lifted:
        outcome = dataclasses.astuple(
          dataclasses.replace(r, path=r.path.partition("#")[0])
        )
        if outcome in seen:
          continue
        seen.add(outcome)
      layers.append(r)
    return ApplyReport(layers=tuple(layers))


@dataclasses.dataclass
class Session:
  """One model call: its options, the key of its samples, its log, and its
  value checks (raised together at the end of the call under ``jit``: the
  caller calls ``checks.flush()``)."""

  options: ActivationOptions
  key: PRNGKey
  log: CallLog = dataclasses.field(default_factory=CallLog)
  checks: _runtime_checks.DeferredChecks = dataclasses.field(
    default_factory=_runtime_checks.DeferredChecks
  )

  @property
  def sampled(self) -> bool:
    """Whether activations are sampled (``activation_samples`` or
    ``activation_bits`` is set)."""
    return self.options.sampled

  def sample(
    self,
    x: jax.Array,
    path: str,
    group_ndim: int,
    salt: jax.Array | None = None,
  ) -> QArray:
    """MCQ of a layer input, with a key derived from the layer call's path
    (and ``salt``, a uint32 scalar, folded in when given)."""
    assert self.options.sampled, "checked by callers"
    if self.options.check_finite:
      self.checks.check_finite(
        x,
        FloatingPointError,
        f"layer {path!r}: its input has non-finite values (NaN or inf)",
      )
    key = _keys.path_key(self.key, path)
    if salt is not None:
      key = jax.random.fold_in(key, salt)
    return quantize_activations(
      x,
      key,
      self.options.activation_samples,
      bits=self.options.activation_bits,
      group_ndim=group_ndim,
      sampler=self.options.sampler,
    )

  def record(
    self,
    path: str,
    layer: str,
    kernel: object,
    note: str = "",
    contraction: str = "",
  ) -> None:
    """Reports one layer call: in integers unless ``note`` says why not,
    with the operand types of its exact ``contraction``."""
    self.log.record(
      LayerReport(
        path=path,
        layer=layer,
        lifted=self.log.is_lifted(path),
        weights="int" if isinstance(kernel, QArray) else "float",
        activations="sampled" if self.sampled else "float",
        integer=not note,
        note=note,
        contraction=contraction,
      )
    )
