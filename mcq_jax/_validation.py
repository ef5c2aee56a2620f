"""Checks of the options users pass, shared by every public entry point.

Each check raises a ``ValueError`` that names the option (and the leaf or
layer, where one is involved) before anything is computed.
"""

from __future__ import annotations

import decimal
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from mcq_jax._sampling import MAX_SAMPLES

GRANULARITIES = ("per_tensor", "per_channel")


def check_sampling_amount(name: str, value: Any) -> None:
  """Rejects anything but a finite real number > 0 (bools included).

  A JAX array (a traced value above all) is rejected with its own message:
  the amount sets ``N``, and ``N`` sets the integer dtype of the values, so
  it must be known when the function is traced.
  """
  if isinstance(value, jax.Array):
    raise TypeError(
      f"{name} must be a static Python number, got a JAX array"
      f" ({getattr(value, 'aval', value)}): it sets the number of samples and"
      " so the integer dtype of the values; under jax.jit mark it static"
      f" (static_argnames=[{name!r}]) or close over it"
    )
  if (
    isinstance(value, bool)
    or not isinstance(value, (int, float, np.integer, np.floating))
    or not math.isfinite(value)
    or value <= 0
  ):
    raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_choice(kind: str, value: Any, options: Sequence[str]) -> None:
  """Rejects a ``value`` that is not one of ``options``."""
  if value not in options:
    raise ValueError(
      f"unknown {kind} {value!r}; expected one of {tuple(options)}"
    )


def sampling_or_bits(
  name: str, amount: Any, bits: Any, default: float
) -> float | None:
  """Validates the two mutually exclusive ways to ask for samples.

  Returns:
    The sampling amount to use (``default`` when neither is given), or
    ``None`` when ``bits`` is given (each group then draws what fits it).
  """
  if bits is None:
    amount = default if amount is None else amount
    check_sampling_amount(name, amount)
    return amount
  if amount is not None:
    raise ValueError(
      f"pass {name} or bits, not both: bits={bits!r} chooses the number of"
      f" samples of each group, {name}={amount!r} fixes it"
    )
  check_bits(bits)
  return None


def check_group_size(group_size: Any, granularity: str) -> None:
  """Rejects a block size that is not an int >= 1, or one with a granularity
  other than ``per_channel`` (blocks split channels)."""
  if group_size is None:
    return
  if (
    isinstance(group_size, bool)
    or not isinstance(group_size, (int, np.integer))
    or group_size < 1
  ):
    raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
  if granularity != "per_channel":
    raise ValueError(
      f"group_size={group_size} splits output channels into blocks; it needs"
      f" granularity='per_channel', got {granularity!r}"
    )


def check_bits(bits: Any) -> None:
  """Rejects a grid width that is not an ``int`` in ``[2, 32]``."""
  if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 32:
    raise ValueError(f"bits must be an int in [2, 32], got {bits!r}")


def channel_axes(
  axis: int | Sequence[int], ndim: int, name: str, option: str = "channel_axis"
) -> tuple[int, ...]:
  """Normalises ``channel_axis`` for a leaf of rank ``ndim``: sorted, >= 0.

  Args:
    axis: one axis or several, negative counting from the end.
    ndim: the rank of the leaf.
    name: the leaf's path, for the error message.
    option: the option's name, for the error message.

  Returns:
    The axes as a sorted tuple of non-negative ints.

  Raises:
    ValueError: an axis out of range, or a repeated axis.
  """
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(
        f"leaf {name!r}: {option} {a} is out of range for a leaf of rank"
        f" {ndim}"
        + (
          "; per_channel needs a channel axis"
          if option == "channel_axis"
          else ""
        )
      )
    out.append(a % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"leaf {name!r}: repeated axes in {option} {axes}")
  return tuple(sorted(out))


def group_axes(
  granularity: str,
  channel_axis: int | Sequence[int],
  stack_axes: int | Sequence[int],
  ndim: int,
  name: str,
) -> tuple[int, ...]:
  """The axes that index a leaf's groups: its stack axes (independent
  tensors stacked by ``nn.scan`` / ``nn.vmap``), plus its channel axes for
  ``per_channel``.

  Raises:
    ValueError: an axis out of range or repeated, or a stack axis that is
      also a channel axis, naming the leaf.
  """
  stacks = channel_axes(stack_axes, ndim, name, "stack_axes")
  if granularity != "per_channel":
    return stacks
  channels = channel_axes(channel_axis, ndim, name)
  both = sorted(set(stacks) & set(channels))
  if both:
    raise ValueError(
      f"leaf {name!r}: axis {both[0]} is both a stack axis and a channel"
      " axis; a stack axis already gives each index its own groups"
    )
  return tuple(sorted(stacks + channels))


def check_group_samples(
  num_samples: int, group_size: int, what: str, hint: str
) -> None:
  """Rejects groups whose ``N + n`` would overflow the sampler's int32 prefix.

  Args:
    num_samples: ``N``, samples per group.
    group_size: ``n``, values per group.
    what: names the group in the message (``"leaf 'Dense_0/kernel'"``).
    hint: how the user can lower ``N``.
  """
  if num_samples + group_size > MAX_SAMPLES:
    shown = (
      str(num_samples)
      if num_samples < 10**15
      else f"{decimal.Decimal(num_samples):.3g}"
    )
    raise ValueError(
      f"{what}: {shown} samples for a group of {group_size} values"
      f" exceeds the supported {MAX_SAMPLES} (samples + values) per group;"
      f" {hint}"
    )
