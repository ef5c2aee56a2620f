"""MCQ of activations: one distribution per example (or per token)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from mcq_jax import _sampling
from mcq_jax._qarray import QArray
from mcq_jax._quantize import num_samples


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _sample_groups(x, key, group_ndim: int, n_samples: int, sampler: str):
  """Signed counts and per-group scales (jitted: one dispatch when eager)."""
  group_shape = x.shape[:group_ndim]
  magnitude = jnp.abs(x).astype(jnp.float32).reshape(
      math.prod(group_shape), math.prod(x.shape[group_ndim:])
  )
  keys = jax.vmap(jax.random.fold_in, (None, 0))(
      key, jnp.arange(magnitude.shape[0], dtype=jnp.uint32)
  )
  counts, scale = jax.vmap(
      lambda m, k: _sampling.sample_counts(m, k, n_samples, sampler)
  )(magnitude, keys)
  counts = counts.reshape(x.shape)
  scale = scale.reshape(group_shape + (1,) * (x.ndim - group_ndim))
  return jnp.where(x < 0, -counts, counts), scale


def quantize_activations(
    x: jax.Array,
    key: jax.Array,
    samples_per_value: float,
    *,
    group_ndim: int = 1,
    sampler: str = "systematic",
) -> QArray:
  """Quantizes an activation tensor by MCQ, one group per leading index.

  The leading ``group_ndim`` axes index independent groups (``1``: one
  distribution per example; ``x.ndim - 1``: one per token/position). Each group
  of ``n`` values gets ``N = round(K * n)`` samples and its own key, derived
  from ``key`` and the group index. Signs are kept.

  Args:
    x: float activations.
    key: a ``jax.random`` key.
    samples_per_value: ``K > 0``.
    group_ndim: number of leading axes that index groups (0: whole tensor).
    sampler: as in :func:`mcq_jax.quantize`.

  Returns:
    A :class:`QArray` with int32 ``values`` and a float32 ``scale`` of shape
    ``x.shape[:group_ndim] + (1,) * (x.ndim - group_ndim)``.

  Examples:
    >>> import jax, jax.numpy as jnp, mcq_jax
    >>> x = jnp.array([[0.5, -0.25, 0.25], [1.0, 0.0, 3.0]])
    >>> q = mcq_jax.quantize_activations(x, jax.random.key(0), 2.0)
    >>> jnp.abs(q.values).sum(axis=1).tolist()   # N = 6 samples per example
    [6, 6]
    >>> q.scale.shape
    (2, 1)
  """
  if not 0 <= group_ndim <= x.ndim:
    raise ValueError(f"group_ndim must be in [0, {x.ndim}], got {group_ndim}")
  size = math.prod(x.shape[group_ndim:])
  n_samples = num_samples(samples_per_value, size)
  if n_samples + size > _sampling.MAX_SAMPLES:
    raise ValueError(
        f"{n_samples} activation samples for a group of {size} values exceeds"
        f" the supported {_sampling.MAX_SAMPLES}"
    )
  values, scale = _sample_groups(x, key, group_ndim, n_samples, sampler)
  return QArray(
      values=values,
      scale=scale,
      samples=n_samples,
      samples_per_weight=float(samples_per_value),
      sampler=sampler,
      channel_axes=tuple(range(group_ndim)),
      sort=False,
      dtype=jnp.dtype(x.dtype),
  )
