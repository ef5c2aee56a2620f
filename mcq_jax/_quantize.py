"""``quantize``: MCQ over a whole parameter pytree."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mcq_jax import (
  _blocks,
  _groups,
  _keys,
  _paths,
  _runtime_checks,
  _sampling,
  _sharded,
  _validation,
)
from mcq_jax._qarray import QArray
from mcq_jax._typing import (
  AxisLike,
  DTypeLike,
  Granularity,
  PRNGKey,
  PyTree,
  Sampler,
  Where,
)


def least_squares_scale(
  leaf: jax.Array, values: jax.Array, axes: tuple[int, ...], dtype: DTypeLike
) -> jax.Array:
  """Each group's ``<w, q> / <q, q>`` (0 where ``q == 0``), shaped as the
  group scales (1 on the axes within groups)."""
  other = tuple(a for a in range(leaf.ndim) if a not in axes)
  w = leaf.astype(dtype)
  q = values.astype(dtype)
  num = jnp.sum(w * q, axis=other, keepdims=True)
  den = jnp.sum(q * q, axis=other, keepdims=True)
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), 0).astype(dtype)


# K when neither samples_per_weight nor bits is given (see quantize's doc).
DEFAULT_SAMPLES_PER_WEIGHT = 2.0


def _quantize_leaf(
  leaf: jax.Array,
  key: PRNGKey,
  name: str,
  samples_per_weight: float | None,
  bits: int | None,
  sampler: Sampler,
  granularity: Granularity,
  channel_axis: AxisLike,
  stack_axes: AxisLike,
  sort: bool,
  refit_scale: bool,
  block: int | None,
  check_finite: bool,
) -> QArray:
  axes = _validation.group_axes(
    granularity, channel_axis, stack_axes, leaf.ndim, name
  )
  group_size = math.prod(d for a, d in enumerate(leaf.shape) if a not in axes)
  if block is not None:  # each group's blocks are groups of their own
    group_size = min(block, group_size)
  amount = _groups.sample_amount(samples_per_weight, bits, group_size, sampler)
  _validation.check_group_samples(
    amount.least,
    group_size,
    f"leaf {name!r}",
    "lower samples_per_weight or use granularity='per_channel'"
    if bits is None
    else "lower bits",
  )
  if check_finite and leaf.size:
    _runtime_checks.check_finite(
      leaf,
      ValueError,
      f"leaf {name!r} has non-finite values (NaN or inf); MCQ needs finite"
      " weights to build a distribution",
    )
  _sharded.validate(leaf, key, f"leaf {name!r}", sort=bool(sort))
  # With blocks, a (g, blocks * groups) array whose columns are the groups.
  source = leaf if block is None else _blocks.to_blocks(leaf, axes, block)
  source_axes = axes if block is None else (1,)
  values, scale = _groups.sample_grouped(
    source,
    _keys.path_key(key, name),
    amount.draw,
    source_axes,
    sampler,
    sort=bool(sort),
    dtype=amount.dtype,
    narrow=True,
    partition_traced=True,
  )
  if refit_scale:
    scale = least_squares_scale(source, values, source_axes, scale.dtype)
  if block is not None:
    values = _blocks.from_blocks(values, leaf.shape, axes)
    scale = _blocks.block_scales(scale, leaf.shape, axes, block)
  return QArray(
    values=values,
    scale=scale,
    method="mcq",
    samples=amount.samples,
    samples_per_value=samples_per_weight,
    sampler=sampler,
    channel_axes=axes,
    sort=bool(sort),
    dtype=jnp.dtype(leaf.dtype),
    bits=bits,
    refit_scale=bool(refit_scale),
    group_size=block,
  )


def quantize(
  params: PyTree,
  key: PRNGKey,
  *,
  samples_per_weight: float | None = None,
  bits: int | None = None,
  sampler: Sampler = "systematic",
  granularity: Granularity = "per_channel",
  where: Where = None,
  channel_axis: AxisLike = -1,
  stack_axes: AxisLike = (),
  sort: bool = False,
  refit_scale: bool = False,
  group_size: int | None = None,
  check_finite: bool = True,
) -> PyTree:
  """Quantizes the selected leaves of a pytree by Monte Carlo sampling (MCQ).

  For each group of values ``w`` (a whole leaf, or one output channel), MCQ
  draws ``N = max(1, round(K * n))`` samples from the distribution
  ``|w| / sum(|w|)``
  and replaces each value by ``sign(w_i) * c_i``, its signed hit count, with the
  scale ``sum(|w|) / N``. The counts sum to exactly ``N``, the reconstruction
  ``scale * values`` is unbiased, and values that are never hit become exactly
  zero, so ``K`` sets bit-width, sparsity and error together.

  A pure function of ``(params, key)``: it runs eagerly, under ``jax.jit`` (mark
  the keyword options static) and under ``jax.vmap`` over keys, with
  bit-identical results for the same key. Time and memory are linear in the
  number of values and independent of ``K`` for the stratified and systematic
  samplers.

  Args:
    params: any pytree of arrays: a Flax linen ``params`` dict, an
      ``nnx.State``, plain dicts, lists or tuples. Leaves that are already
      :class:`QArray` are kept, so calls compose: a leaf is quantized by the
      first call that selects it, and its key depends only on ``key`` and its
      path, so two calls with one key and the same options equal one call
      whose ``where`` selects what either selects.
    key: a ``jax.random`` key (typed or raw ``uint32[2]``). Each leaf uses a
      key derived from this one and from its path.
    samples_per_weight: ``K > 0``, samples per value. More samples give more
      bits, fewer zeros and lower error. ``None`` (the default) means 2 unless
      ``bits`` is given; K = 2 kept the committed study's models within 1
      point of float (digits MLP, MNIST-5k MLP and LeNet-5; 2.5 points for
      LeNet-5 on 8x8 digits, whose 25-weight conv channels want K = 4).
    bits: instead of ``samples_per_weight``, a width in ``[2, 32]``: each
      group draws the largest ``N`` whose counts are guaranteed to fit signed
      ``bits``-bit values (``|q| <= 2**(bits - 1) - 1``) whatever the key.
      A value of probability ``p`` gets at most ``ceil(N p)`` hits from the
      systematic sampler (``ceil(N p) + 1`` from the stratified one), so
      ``N = floor(max_count / p_max)`` less a rounding margin below
      ``2**-7`` (one more hit of headroom for stratified; the iid sampler
      draws ``N = max_count``). ``N`` depends on the weights only, so the
      counts stay unbiased and sum to each group's own ``N``; ``samples`` is
      then a bound on every group's ``N``, which :func:`mcq_jax.summary`
      lists.
    sampler: ``"systematic"`` (one shared offset; counts are ``floor`` or
      ``ceil`` of their expectation; default: the most accurate and least
      variable at K <= 2 in the study), ``"stratified"`` (one jittered sample
      per stratum), ``"iid"`` (plain Monte Carlo, the textbook baseline;
      O(N) memory) or ``"deterministic"`` (the systematic sampler with its
      offset fixed at 1/2: each count is its CDF rounded to nearest,
      differenced; sum-preserving, floor or ceil of its expectation, the
      same for every key, so biased: a baseline).
    granularity: ``"per_channel"`` (one distribution per index of
      ``channel_axis``; default: as accurate as per tensor or better at K = 2
      in the study, with fewer bits) or ``"per_tensor"`` (one per leaf).
    where: which leaves to quantize. ``None`` selects float leaves with at least
      two dimensions (kernels, embeddings), leaving biases and normalisation
      scales in float (as are leaves named ``bias``, ``scale``, ``mean`` or
      ``var`` of any rank). A string is a regex searched in the ``/``-joined
      path (``"Dense_0/kernel"``); a callable receives ``(path_tuple, leaf)``.
      Selected leaves that are not floating point are returned unchanged.
    channel_axis: the output-channel axis (or axes) for ``per_channel``; Flax
      kernels keep output features last, hence ``-1``.
    stack_axes: axes of the selected leaves that stack independent tensors:
      the layer axis of an ``nn.scan`` / ``nn.vmap`` / ``nnx.scan`` stack
      (``0`` for ``variable_axes={"params": 0}``). Each index along them is
      quantized as a tensor of its own (its own groups, scales and ``N``),
      for either granularity, and its scale keeps the axis, so the lifted
      transform slices values and scales together. Select the stacked leaves
      with ``where`` (calls compose: quantize the stack, then the rest).
    sort: build each CDF over values sorted by decreasing magnitude
      (O(n log n)).
    refit_scale: replace each group's scale ``sum|w| / N`` by the least
      squares fit ``<w, q> / <q, q>``, which minimises the group's squared
      error for the integers drawn. It depends on the draws, so the
      reconstruction is no longer unbiased; the values are unchanged. It is
      a float reduction: eager and jitted calls may differ in its last bits.
    group_size: split each output channel (``per_channel`` only) into blocks
      of this many consecutive values, in the row-major order of the axes
      within it (a ``Dense`` kernel's input features), the last block
      holding the rest; each block is a group of its own, with its own
      ``N`` (``round(K * group_size)``, the shorter last block too) and
      scale. Scales keep the leaf's rank, with the blocks on the first axis
      within the channels: ``(ceil(in / g), out)`` for a ``Dense`` kernel.
    check_finite: reject NaN/inf weights; raised eagerly for concrete inputs
      and at run time under ``jit``.

  Returns:
    A pytree of the same structure in which each selected leaf is a
    :class:`QArray` and every other leaf is the input leaf itself.

  Raises:
    ValueError: for ``samples_per_weight <= 0``, both ``samples_per_weight``
      and ``bits``, ``bits`` outside ``[2, 32]``, an unknown sampler or
      granularity, non-finite values or too many samples, naming the leaf;
      for an explicit ``where`` that selects no float or quantized leaf; for
      two selected leaves whose paths (and so keys) coincide.

  Examples:
    >>> import jax, jax.numpy as jnp, mcq_jax
    >>> params = {"dense": {"kernel": jnp.array([[0.3, -0.1], [0.0, 0.6]]),
    ...                     "bias": jnp.array([0.1, 0.2])}}
    >>> q = mcq_jax.quantize(params, jax.random.key(0), samples_per_weight=5.0)
    >>> q["dense"]["kernel"].samples   # per output channel: N = round(5.0 * 2)
    10
    >>> jnp.abs(q["dense"]["kernel"].values).sum(axis=0).tolist()
    [10, 10]
    >>> q["dense"]["bias"] is params["dense"]["bias"]
    True
    >>> q4 = mcq_jax.quantize(params, jax.random.key(0), bits=4)
    >>> kernel = q4["dense"]["kernel"]
    >>> kernel.values.dtype, kernel.max_abs_value, kernel.bits
    (dtype('int8'), 7, 4)

  References:
    Mordido, Van Keirsbilck, Keller. Instant Quantization of Neural Networks
    using Monte Carlo Methods. EMC2 workshop at NeurIPS 2019, arXiv:1905.12253.
  """
  samples_per_weight = _validation.sampling_or_bits(
    "samples_per_weight", samples_per_weight, bits, DEFAULT_SAMPLES_PER_WEIGHT
  )
  _validation.check_choice("sampler", sampler, _sampling.ALL_SAMPLERS)
  _validation.check_choice(
    "granularity", granularity, _validation.GRANULARITIES
  )
  _validation.check_group_size(group_size, granularity)
  return _paths.map_selected(
    lambda leaf, name: _quantize_leaf(
      leaf,
      key,
      name,
      samples_per_weight,
      bits,
      sampler,
      granularity,
      channel_axis,
      stack_axes,
      sort,
      refit_scale,
      group_size,
      check_finite,
    ),
    params,
    where,
    inputs=(key,),
  )
