"""Type aliases shared across the library (in the spirit of ``flax.typing``).

Pytrees are ``Any`` to the type checker (JAX has no precise pytree type); the
aliases below name what a parameter is meant to hold, so signatures read as
documentation.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal, TypeAlias

import jax
import numpy as np

# A pytree of arrays: a linen ``params`` dict, an ``nnx.State``, lists, ...
PyTree: TypeAlias = Any
# A ``jax.random`` key: typed (``jax.random.key``) or raw ``uint32[2]``.
PRNGKey: TypeAlias = jax.Array
# Anything ``jnp.dtype`` accepts.
DTypeLike: TypeAlias = Any
Shape: TypeAlias = tuple[int, ...]
# One axis or several, as users pass them (``channel_axis=-1`` or ``(0, 3)``).
AxisLike: TypeAlias = int | tuple[int, ...] | list[int]
# A Python or numpy real number, as users pass sampling amounts.
Real: TypeAlias = int | float | np.integer | np.floating

# ``where``: a regex searched in the "/"-joined path, a predicate over the path
# tuple and the item (a pytree leaf for ``quantize``, a module for
# ``mcq_apply`` / ``mcq_call``), or ``None`` for the default rule.
Where: TypeAlias = (
  None | str | re.Pattern[str] | Callable[[tuple[str, ...], Any], bool]
)

Sampler: TypeAlias = Literal["systematic", "stratified", "iid", "deterministic"]
Granularity: TypeAlias = Literal["per_channel", "per_tensor"]
# What produced a ``QArray``: MCQ or one of the uniform-grid baselines.
Method: TypeAlias = Literal["mcq", "round_to_nearest", "stochastic_rounding"]
