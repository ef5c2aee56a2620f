"""MCQ of activations: one distribution per example (or per token)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mcq_jax import _groups, _sampling, _validation
from mcq_jax._qarray import QArray
from mcq_jax._typing import PRNGKey, Sampler


def quantize_activations(
  x: jax.Array,
  key: PRNGKey,
  activation_samples: float | None = None,
  *,
  bits: int | None = None,
  group_ndim: int = 1,
  sampler: Sampler = "systematic",
) -> QArray:
  """Quantizes an activation tensor by MCQ, one group per leading index.

  The leading ``group_ndim`` axes index independent groups (``1``: one
  distribution per example; ``x.ndim - 1``: one per token/position). Each group
  of ``n`` values gets ``N = max(1, round(K_a * n))`` samples and its own key,
  derived from ``key`` and the group index. Signs are kept. This is what
  :func:`mcq_jax.mcq_apply` does to the input of each covered layer.

  Args:
    x: float activations.
    key: a ``jax.random`` key.
    activation_samples: ``K_a > 0``, samples per activation value (the same
      option as in :func:`mcq_jax.mcq_apply`).
    bits: instead of ``activation_samples``: each group draws the largest
      ``N`` whose counts fit signed ``bits``-bit values whatever the key
      (``activation_bits`` of :func:`mcq_jax.mcq_apply`; see ``bits`` in
      :func:`mcq_jax.quantize`).
    group_ndim: number of leading axes that index groups (0: whole tensor).
    sampler: as in :func:`mcq_jax.quantize`.

  Returns:
    A :class:`QArray` with ``values`` in the smallest integer dtype that
    holds ``N`` (int16 for ``N`` up to 32767) and a float32 ``scale`` of shape
    ``x.shape[:group_ndim] + (1,) * (x.ndim - group_ndim)``.

  Raises:
    ValueError: a bad ``activation_samples``, ``bits``, ``group_ndim`` or
      sampler, neither or both of ``activation_samples`` and ``bits``, or more
      samples per group than supported.

  Examples:
    >>> import jax, jax.numpy as jnp, mcq_jax
    >>> x = jnp.array([[0.5, -0.25, 0.25], [1.0, 0.0, 3.0]])
    >>> q = mcq_jax.quantize_activations(x, jax.random.key(0), 2.0)
    >>> jnp.abs(q.values).sum(axis=1).tolist()   # N = 6 samples per example
    [6, 6]
    >>> q.scale.shape, q.samples_per_value
    ((2, 1), 2.0)
  """
  if activation_samples is None and bits is None:
    raise ValueError("pass activation_samples or bits")
  activation_samples = _validation.sampling_or_bits(
    "activation_samples", activation_samples, bits, 0.0
  )
  _validation.check_choice("sampler", sampler, _sampling.ALL_SAMPLERS)
  if not 0 <= group_ndim <= x.ndim:
    raise ValueError(f"group_ndim must be in [0, {x.ndim}], got {group_ndim}")
  size = math.prod(x.shape[group_ndim:])
  amount = _groups.sample_amount(activation_samples, bits, size, sampler)
  _validation.check_group_samples(
    amount.least,
    size,
    "activations",
    "lower activation_samples" if bits is None else "lower bits",
  )
  axes = tuple(range(group_ndim))
  # N is static: activations are sampled inside the caller's trace, where N
  # (or the budget) is a constant of the layer.
  values, scale = _groups.sample_grouped(
    x,
    key,
    amount.draw,
    axes,
    sampler,
    dtype=amount.dtype,
    static_num_samples=True,
  )
  return QArray(
    values=values,
    scale=scale,
    method="mcq",
    samples=amount.samples,
    samples_per_value=activation_samples,
    sampler=sampler,
    channel_axes=axes,
    sort=False,
    dtype=jnp.dtype(x.dtype),
    bits=bits,
  )
