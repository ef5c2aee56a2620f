"""Hit counts of groups of values: the Monte Carlo core of MCQ.

Given the magnitudes ``x`` of a group (one tensor, one channel, one example's
activations) and a number of samples ``N``, we return integer hit counts ``c``
with ``sum(c) == N`` exactly and ``E[c_i] = N * x_i / sum(x)``.

Everything here works in *sample space*: the CDF scaled by ``N``,
``T_i = e_1 + ... + e_i`` with expected counts ``e_i = N * x_i / sum(x)``.
Sample ``j`` of the stratified and systematic samplers sits at ``j + xi_j``, so
the number of samples below ``T = whole + frac`` is
``G(T) = whole + [xi_whole < frac]`` and the count of value ``i`` is
``G(T_i) - G(T_(i-1))``. No sample position is materialised for those two
samplers: time and memory are linear in ``n`` and independent of ``N``.

Numerics: every ``e_i`` is converted once to *fixed point*, an int32 whole part
plus a uint32 fraction in units of ``2**-32``, and every sum after that is an
integer sum (the fractions wrap modulo ``2**32``, their carries are counted).
Integer sums are exact in any order, so XLA is free to reduce and scan in
whatever order is fastest, and the counts are bit-identical eagerly, under
``jit``, under ``vmap`` and whatever the layout. ``T`` is then exact: a zero
value adds nothing, so it can never be hit, and ``G`` is monotone, so counts
are never negative. The float work is per value (no reductions): the group's
mass is summed exactly in 64-bit fixed point (four 16-bit limbs), the rate
``N / mass`` is a double-float, and each ``e_i`` is formed by an error-free
product. ``T_n`` then lies within ``n * 2**-32 + N * 2**-45`` of ``N``:
``G`` is capped at ``N``, and the last non-zero value in CDF order receives
what is missing to ``N`` (zero or one hit), as an exact ``T_n == N`` would.

Layout: a group of ``L`` values is viewed as ``R x M`` (``R = min(32, L)``
rows, ``M = ceil(L / R)`` columns, zero-padded), and its CDF visits the
values column by column: value ``l = r * M + m`` has position ``m * R + r``.
Groups are the last axis, ``(R, M, G)``, so that the scan over the ``R`` rows
works on contiguous rows of ``M * G`` lanes (one vector add per row), and the
prefix over the ``M`` column totals is an integer cumulative sum.
"""

from __future__ import annotations

import fractions
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mcq_jax import _keys, _native

# Rows of the layout: the length of the scan (see the module docstring).
_ROWS = 32

# Largest supported ``N + n`` per group: every int32 prefix stays below 2**31.
MAX_SAMPLES = 2**31 - 2**24

SAMPLERS = ("stratified", "systematic", "iid")
# The random samplers, and the systematic one with its offset fixed at 1/2:
# deterministic, sum-preserving rounding (biased; for comparison).
ALL_SAMPLERS = SAMPLERS + ("deterministic",)

_TWO32 = np.float32(2.0**32)
# Values this far below their group's largest are flushed to zero before
# sampling: each would expect fewer than N * 2**-40 < 2**-9 hits, and the
# 64-bit fixed point of every value left is then exact.
_FLUSH = np.float32(2.0**-40)
# Column totals are summed in chunks of this many, so 21-bit limb sums stay
# below 2**31.
_CHUNK = 1024


def num_samples(samples_per_value: float, n: int) -> int:
  """``N = max(1, round(K * n))`` for a group of ``n > 0`` values, else 0.

  Examples:
    >>> import mcq_jax
    >>> mcq_jax.num_samples(2.0, 25), mcq_jax.num_samples(0.01, 25)
    (50, 1)
  """
  if not n:
    return 0
  product = samples_per_value * n
  if math.isinf(product):  # a finite K so large that K * n overflows a float
    return int(fractions.Fraction(samples_per_value) * n)
  return max(1, round(product))


class BitBudget(NamedTuple):
  """Draw, in each group, as many samples as fit a bit budget.

  In place of a fixed ``N``: each group draws the largest ``N`` for which
  every count is guaranteed to lie in ``[-max_count, max_count]`` whatever
  the key (see :func:`budget_samples`). ``N`` depends on the group's
  magnitudes only, never on the draws, so the counts keep their expectation
  ``N * x_i / sum(x)`` and the reconstruction stays unbiased. Hashable: it
  passes as a static argument.

  Attributes:
    max_count: the largest allowed ``|count|``, ``2**(bits - 1) - 1``.
    group_size: ``n``, the number of values in a whole group (the rounding
      margin grows with it).
    limit: the largest ``N`` allowed (``MAX_SAMPLES - n``).
  """

  max_count: int
  group_size: int
  limit: int


def bit_budget(bits: int, group_size: int) -> BitBudget:
  """The :class:`BitBudget` of signed ``bits``-bit counts for groups of
  ``group_size`` values."""
  return BitBudget(2 ** (bits - 1) - 1, group_size, MAX_SAMPLES - group_size)


SampleAmount = int | BitBudget


def static_amount(amount: SampleAmount) -> SampleAmount:
  """``N`` as a Python int, or the budget of Python ints: hashable, for
  static arguments and caches."""
  if isinstance(amount, BitBudget):
    return BitBudget(*(int(f) for f in amount))
  return int(amount)


def operand_amount(amount: SampleAmount) -> Any:
  """``N`` (or each field of the budget) as a numpy int32 scalar: an
  operand, so that one compilation serves every amount."""
  if isinstance(amount, BitBudget):
    return BitBudget(*(np.int32(f) for f in amount))  # type: ignore[arg-type]
  return np.int32(amount)


def _budget_margin(budget: BitBudget) -> jax.Array:
  """How far below ``max_count`` the largest expected count is kept, in
  samples: it covers the float32 rounding of ``N``'s formula (relative
  ``2**-22``), the fixed-point rounding of each expected count, and the gap
  between ``T_n`` and ``N`` (at most ``n * 2**-32 + N * 2**-45``, with
  ``N <= max_count * n``) that the last non-zero value may receive. Float32
  throughout, so that a budget of Python ints and a traced one agree."""
  n = jnp.asarray(budget.group_size, jnp.float32)
  top = jnp.asarray(budget.max_count, jnp.float32)
  return 2.0**-8 + top * 2.0**-20 + n * 2.0**-31 + top * n * 2.0**-44


def budget_samples(
  mass: jax.Array, group_max: jax.Array, budget: BitBudget, sampler: str
) -> jax.Array:
  """``N`` per group under a :class:`BitBudget` (int32, at least 1).

  A value of probability ``p`` expects ``e = N * p`` hits. The systematic
  sampler gives it ``floor(e)`` or ``ceil(e)``; the stratified one, one hit
  per stratum its interval meets, at most ``ceil(e) + 1``. So with
  ``p_max = group_max / mass``, ``N = floor((max_count - d) / p_max)`` keeps
  every count within ``max_count``, where ``d`` is 0 (systematic) or 1
  (stratified) plus a rounding margin below ``2**-7``. No count exceeds
  ``N`` either, so ``N = max_count`` is always safe; the larger of the two
  is drawn, capped at ``budget.limit``. The iid sampler has no such bound:
  its callers draw a static ``N = max_count``.

  Args:
    mass: ``sum(x)`` of each group, float32.
    group_max: ``max(x)`` of each group, float32, in the units of ``mass``.
    budget: the bit budget.
    sampler: ``"systematic"`` or ``"stratified"``.
  """
  top = jnp.asarray(budget.max_count, jnp.float32)
  spread = 1.0 if sampler == "stratified" else 0.0
  room = top - spread - _budget_margin(budget)
  has_mass = group_max > 0
  ratio = mass / jnp.where(has_mass, group_max, 1.0)
  n = jnp.minimum(  # in float32 first: the quotient may exceed int32
    jnp.floor(room * ratio), jnp.asarray(budget.limit, jnp.float32)
  )
  n = jnp.clip(
    n.astype(jnp.int32),
    jnp.asarray(budget.max_count, jnp.int32),
    jnp.asarray(budget.limit, jnp.int32),
  )
  return jnp.where(has_mass, n, 1)


def layout(n: int) -> tuple[int, int]:
  """``(R, M)``: the rows and columns a group of ``n`` values is viewed as."""
  rows = max(1, min(_ROWS, n))
  return rows, -(-n // rows)


def _computed_once(x: jax.Array) -> jax.Array:
  """``x`` itself (a non-negative per-group float), in a buffer of its own.

  A per-group value (a scale, a rate) comes out of a long chain of cheap
  elementwise steps. XLA fuses such a chain into every per-value loop that
  broadcasts it, and so computes it once per *value*, in each of those loops:
  in a model, the input scale of a layer was recomputed that way inside the
  next layer's three sampling passes, which then cost more than the whole
  float model. XLA:CPU drops ``lax.optimization_barrier`` before it fuses,
  but it does not fuse a reduction into the loops that consume its result:
  ``x + 0`` summed by one ends the chain (exact for ``x >= 0``; measured on
  XLA:CPU, jax 0.10).
  """
  return jnp.sum(jnp.stack([x, jnp.zeros_like(x)]), axis=0)


# ---------------------------------------------------------------------------
# Double-float arithmetic (Dekker, Knuth), immune to fused multiply-add.
#
# Under jit, XLA:CPU (through LLVM) may contract ``c + a * b`` into one fused
# multiply-add, rounding once instead of twice, and it decides per fused
# loop: the same expression could round differently in the pass that sums a
# group's expected counts and in the pass that scans them, and a count then
# received one hit too many (measured: a group of one value drew 2 of N = 1).
# So every product below that feeds an addition is exact (two halves of at
# most 12 significant bits each): fused or not, the sum is rounded the same.


def _split(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``a == hi + lo`` exactly, each of at most 12 significant bits: ``hi``
  keeps the top 12 bits of the significand (a bit mask, so no rounding is
  involved), ``lo`` the rest."""
  bits = lax.bitcast_convert_type(a, jnp.uint32)
  hi = lax.bitcast_convert_type(bits & jnp.uint32(0xFFFFF000), jnp.float32)
  return hi, a - hi


def _split_product(
  a: tuple[jax.Array, jax.Array], b: tuple[jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array]:
  """``a * b`` as a double-float ``(hi, lo)`` from the halves of ``a`` and
  ``b`` (:func:`_split`): four exact partial products, summed error-free but
  for the last two roundings (relative error below ``2**-46``)."""
  (a_hi, a_lo), (b_hi, b_lo) = a, b
  middle, middle_err = _two_sum(a_hi * b_lo, a_lo * b_hi)
  hi, err = _two_sum(a_hi * b_hi, middle)
  return hi, (err + middle_err) + a_lo * b_lo


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Error-free sum: ``a + b == s + e`` exactly."""
  s = a + b
  bb = s - a
  return s, (a - (s - bb)) + (b - bb)


# ---------------------------------------------------------------------------
# Exact sums.


def _limbs(u: jax.Array) -> list[jax.Array]:
  """``u * 2**64`` (``u`` in ``[0, 1)``, a multiple of ``2**-64``) as four
  16-bit limbs, least significant first."""
  scaled = u * _TWO32
  top = jnp.floor(scaled)
  hi = top.astype(jnp.uint32)
  lo = ((scaled - top) * _TWO32).astype(jnp.uint32)
  mask = jnp.uint32(0xFFFF)
  return [lo & mask, lo >> 16, hi & mask, hi >> 16]


def _limb_total(limb_sums: list[jax.Array]) -> list[jax.Array]:
  """The sum over axis 0 of a multi-limb integer, normalized.

  Args:
    limb_sums: limbs (16 bits apart, least significant first) of shape
      ``(M, G)``, each value below ``2**21``.

  Returns:
    limbs of shape ``(G,)``, 16 bits apart, each below ``2**16`` but the
    most significant (small): the exact total.
  """
  limbs = list(limb_sums)
  while True:
    m = limbs[0].shape[0]
    chunk = min(m, _CHUNK)
    pad = -m % chunk
    # Values below 2**21, 1024 of them: sums below 2**31.
    limbs = [
      jnp.pad(v, ((0, pad), (0, 0)))
      .reshape((m + pad) // chunk, chunk, -1)
      .sum(axis=1, dtype=jnp.uint32)
      for v in limbs
    ]
    limbs = _normalize(limbs)
    if limbs[0].shape[0] == 1:
      return [v[0] for v in limbs]


def _limbs_to_float(limbs: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
  """A multi-limb integer (16 bits apart) as a double-float ``(hi, lo)``, in
  units of the least significant limb, to a relative ``2**-46``."""
  hi = jnp.zeros(limbs[0].shape, jnp.float32)
  lo = jnp.zeros(limbs[0].shape, jnp.float32)
  for k in reversed(range(len(limbs))):  # most significant first
    term = limbs[k].astype(jnp.float32) * jnp.float32(2.0 ** (16 * k))
    hi, err = _two_sum(hi, term)
    lo = lo + err
  return _two_sum(hi, lo)


def _normalize(limbs: list[jax.Array]) -> list[jax.Array]:
  """Carries each limb's bits above 16 into the next (one more limb at the
  top): every limb but the top one ends below ``2**16``."""
  out = []
  carry = jnp.zeros_like(limbs[0])
  for v in limbs:
    v = v + carry
    out.append(v & jnp.uint32(0xFFFF))
    carry = v >> 16
  out.append(carry)
  return out


# ---------------------------------------------------------------------------
# Fixed-point expected counts.


def _fixed_point(
  u: jax.Array, rate_hi: jax.Array, rate_lo: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """``e = u * rate`` as an int32 whole part and a uint32 fraction (units of
  ``2**-32``), rounded to the nearest unit."""
  u_halves = _split(u)
  p_hi, p_lo = _split_product(u_halves, _split(rate_hi))
  # u * rate_lo, a correction: its leading partial products, each exact.
  (u_hi, u_lo), (r_hi, r_lo) = u_halves, _split(rate_lo)
  p_lo = ((p_lo + u_hi * r_hi) + u_hi * r_lo) + u_lo * r_hi
  w_hi = jnp.floor(p_hi)
  w_lo = jnp.floor(p_lo)
  a = ((p_hi - w_hi) * _TWO32 + jnp.float32(0.5)).astype(jnp.uint32)
  b = ((p_lo - w_lo) * _TWO32 + jnp.float32(0.5)).astype(jnp.uint32)
  frac = a + b
  whole = (
    w_hi.astype(jnp.int32)
    + w_lo.astype(jnp.int32)
    + (frac < a).astype(jnp.int32)
  )
  return whole, frac


def _add(
  hi: jax.Array, lo: jax.Array, whole: jax.Array, frac: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """``(hi, lo) + (whole, frac)`` in fixed point, with the fraction's carry."""
  lo = lo + frac
  return hi + whole + (lo < frac).astype(jnp.int32), lo


# ---------------------------------------------------------------------------
# Where the samples are.


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finalizer: a bijection that mixes every input bit
  into every output bit."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def stratum_jitter(words: jax.Array, stratum: jax.Array) -> jax.Array:
  """The jitter of stratum ``j`` as a uint32 (``xi_j * 2**32``).

  A keyed counter-based hash: two rounds of MurmurHash3's finalizer, each
  after mixing in one 32-bit word of the key. For a fixed key it is a
  bijection of the stratum index, so distinct strata never share a value.

  Args:
    words: ``uint32[..., 2]``, two words drawn from the group's key.
    stratum: int32 stratum indices, broadcastable against ``words[..., 0]``.
  """
  h = lax.bitcast_convert_type(stratum, jnp.uint32)
  h = _fmix32(h ^ words[..., 0])
  return _fmix32(h ^ words[..., 1])


def _hits_below(
  sampler: str,
  words: jax.Array,
  hi: jax.Array,
  lo: jax.Array,
  num_samples: jax.Array,
) -> jax.Array:
  """``G(T)``: how many samples lie below ``T = hi + lo * 2**-32``."""
  if sampler == "systematic":
    jitter = words[..., 0]  # one offset for the whole group
  elif sampler == "deterministic":
    # Sample j at j + 1/2: every count is its CDF rounded to nearest,
    # differenced (sum-preserving rounding); no key is read.
    jitter = jnp.full_like(hi, 2**31, dtype=jnp.uint32)
  else:
    jitter = stratum_jitter(words, hi)
  return jnp.minimum(hi + (jitter < lo).astype(jnp.int32), num_samples)


def _iid_hits_below(
  samples: tuple[jax.Array, jax.Array],
  groups: jax.Array,
  hi: jax.Array,
  lo: jax.Array,
  num_samples: int,
) -> jax.Array:
  """How many of the sorted iid samples of each value's group (``samples``:
  ``(G, N)`` each, ``groups`` broadcastable against ``hi``) lie below each
  ``T``: a binary search, vectorised over values."""
  s_whole, s_frac = samples  # sorted lexicographically per group
  # Derived from hi, so that under shard_map the bounds vary over devices as
  # the loop's results do.
  lo_idx = hi * 0
  hi_idx = lo_idx + jnp.int32(num_samples)

  def step(
    _: jax.Array, bounds: tuple[jax.Array, jax.Array]
  ) -> tuple[jax.Array, jax.Array]:
    lo_i, hi_i = bounds
    mid = lo_i + (hi_i - lo_i) // 2  # lo + hi could overflow int32
    mid_c = jnp.minimum(mid, num_samples - 1)
    w = s_whole[groups, mid_c]
    f = s_frac[groups, mid_c]
    below = ((w < hi) | ((w == hi) & (f < lo))) & (lo_i < hi_i)
    return jnp.where(below, mid + 1, lo_i), jnp.where(
      below | (lo_i >= hi_i), hi_i, mid
    )

  lo_idx, _ = lax.fori_loop(
    0, int(num_samples).bit_length() + 1, step, (lo_idx, hi_idx)
  )
  return lo_idx


def _iid_samples(
  keys: jax.Array, num_samples: int
) -> tuple[jax.Array, jax.Array]:
  """``N`` iid uniform positions on ``[0, N)`` per group, as (whole, frac)
  sorted lexicographically: the textbook baseline, O(N) memory."""

  def draw(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    k_whole, k_frac = jax.random.split(key)
    whole = jax.random.randint(
      k_whole, (num_samples,), 0, num_samples, jnp.int32
    )
    frac = jax.random.bits(k_frac, (num_samples,), jnp.uint32)
    whole, frac = lax.sort((whole, frac), num_keys=2)
    return whole, frac

  return jax.vmap(draw)(keys)


# ---------------------------------------------------------------------------
# The grouped sampler.


def _rate(
  total_hi: jax.Array, total_lo: jax.Array, num_samples: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """``N / total`` as a double-float (relative error ~``2**-46``)."""
  n_hi = num_samples.astype(jnp.float32)
  n_lo = (num_samples - n_hi.astype(jnp.int32)).astype(jnp.float32)
  safe = jnp.where(total_hi > 0, total_hi, 1.0)
  q1 = n_hi / safe
  q1_halves = _split(q1)
  p_hi, p_lo = _split_product(q1_halves, _split(safe))
  # q1 * total_lo from its leading partial products, each exact.
  (q_hi, q_lo), (t_hi, t_lo) = q1_halves, _split(total_lo)
  correction = (q_hi * t_hi + q_hi * t_lo) + q_lo * t_hi
  residual = (((n_hi - p_hi) - p_lo) + n_lo) - correction
  q2 = residual / safe
  rate_hi, rate_lo = _two_sum(q1, q2)
  return rate_hi, rate_lo


def _row_sums(*arrays: jax.Array) -> tuple[jax.Array, ...]:
  """Integer sums over axis 0 of several arrays in one reduction (one pass
  over their common producer; integer sums are exact in any order)."""
  return tuple(
    lax.reduce(
      arrays,
      tuple(jnp.zeros((), a.dtype) for a in arrays),
      lambda a, b: tuple(x + y for x, y in zip(a, b)),
      (0,),
    )
  )


def group_words(keys: jax.Array) -> jax.Array:
  """The two uint32 words each group's stratified or systematic draws come
  from: ``jax.random.bits`` of its key, ``(G, 2)``."""
  return _keys.key_words(keys)


def group_draws(keys: jax.Array, sampler: str) -> jax.Array:
  """What :func:`counts_of_layout` draws each group's samples from: the
  ``G`` keys themselves for ``"iid"``, their :func:`group_words` otherwise."""
  return keys if sampler == "iid" else group_words(keys)


class Segments(NamedTuple):
  """How the groups of a layout are parts (*segments*) of larger groups.

  By default each group of a layout is a whole group. When a tensor is
  sharded along the axes within its groups, each device lays out its own
  parts, and these functions (collectives, under ``shard_map``) combine what
  the parts need to know of their whole group; every count then equals the
  one the whole group would get. Each receives and returns arrays of shape
  ``(G,)``, one entry per group of the layout.

  Attributes:
    group_max: the largest magnitude of each part -> of its whole group.
    limb_total: the exact mass of each part as normalized 16-bit limbs -> the
      whole group's, normalized (:func:`_normalize`).
    offsets: ``(whole, frac, nonzero)``: each part's total in sample space
      (fixed point) and whether it holds a non-zero value -> ``(start_whole,
      start_frac, end_whole, end_frac, holds_last)``: where the part starts
      in its group's sample space, where the group ends, and whether the
      part holds the group's last non-zero value.
  """

  group_max: Callable[[jax.Array], jax.Array]
  limb_total: Callable[[list[jax.Array]], list[jax.Array]]
  offsets: Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, ...]]


def _whole_groups() -> Segments:
  """Every group of the layout is a whole group: nothing to combine."""
  return Segments(
    group_max=lambda m: m,
    limb_total=lambda limbs: limbs,
    offsets=lambda whole, frac, nonzero: (
      jnp.zeros_like(whole),
      jnp.zeros_like(frac),
      whole,
      frac,
      nonzero,
    ),
  )


def exclusive_prefix(
  whole: jax.Array, frac: jax.Array, axis: int = 0
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Exclusive prefix sums of fixed-point numbers along ``axis``, exact.

  Args:
    whole: int32 whole parts.
    frac: uint32 fractions (units of ``2**-32``); their sums wrap and the
      carries are counted.
    axis: the axis to sum along.

  Returns:
    ``(start_whole, start_frac, total_whole, total_frac)``: the sums of the
    entries before each entry, and of all of them (``axis`` removed).
  """
  incl_frac = jnp.cumsum(frac, axis=axis, dtype=jnp.uint32)
  wraps = (incl_frac < frac).astype(jnp.int32)
  incl_whole = jnp.cumsum(whole + wraps, axis=axis, dtype=jnp.int32)
  last = lambda a: jnp.take(a, -1, axis=axis)
  return (
    incl_whole - whole - wraps,
    incl_frac - frac,
    last(incl_whole),
    last(incl_frac),
  )


def _group_power(group_max: jax.Array) -> tuple[jax.Array, ...]:
  """``(has_mass, exponent, power)`` of each group's largest magnitude:
  ``power = 2**-exponent`` brings it into [0.5, 1) (exact), so that no
  product or quotient below can overflow or underflow."""
  has_mass = group_max > 0
  _, exponent = jnp.frexp(jnp.where(has_mass, group_max, 1.0))
  return has_mass, exponent, jnp.ldexp(jnp.float32(1.0), -exponent)


def _samples_and_rate(
  mass_hi: jax.Array,
  mass_lo: jax.Array,
  group_max: jax.Array,
  power: jax.Array,
  num_samples: int | jax.Array | BitBudget,
  sampler: str,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(N, rate_hi, rate_lo)`` of each group from its exact mass (a
  double-float in units of ``2**-64``) and its largest magnitude (scaled by
  ``power`` here)."""
  scale_64 = jnp.float32(2.0**64)
  if isinstance(num_samples, BitBudget):
    # N of each group from its whole mass and largest value.
    scaled_max = jnp.where(group_max > 0, group_max, 0.0) * power
    n = budget_samples(
      (mass_hi + mass_lo) / scale_64, scaled_max, num_samples, sampler
    )
  else:
    n = jnp.asarray(num_samples, jnp.int32)
  rate_hi, rate_lo = _rate(mass_hi / scale_64, mass_lo / scale_64, n)
  return n, rate_hi, rate_lo


def _group_scale(
  mass_hi: jax.Array,
  mass_lo: jax.Array,
  n: jax.Array,
  exponent: jax.Array,
  has_mass: jax.Array,
) -> jax.Array:
  """``sum(x) / N`` of each group, in a buffer of its own. In the rescaled
  units first, then the power of two back; a product with the reciprocal
  rather than a division: XLA rewrites division by a constant that way, so
  a constant N and a traced N would differ."""
  mass = (mass_hi + mass_lo) / jnp.float32(2.0**64)
  scale = jnp.ldexp(mass * (jnp.float32(1.0) / n.astype(jnp.float32)), exponent)
  return _computed_once(jnp.where(has_mass, scale, 0.0))


def _native_counts(
  values: jax.Array,
  words: jax.Array,
  num_samples: int | jax.Array | BitBudget,
  sampler: str,
  dtype: np.dtype,
  groups_first: bool,
) -> tuple[jax.Array, jax.Array]:
  """:func:`counts_of_layout` of whole groups by the native CPU kernels
  (:mod:`mcq_jax._native`): the same integers and scales, in two passes
  over the values. The groups are the last axis of ``values``, or the first
  with ``groups_first``; the CDF visits each group's values in memory order
  (``(L, G)``, ``(G, L)`` or either packed layout). The counts have
  ``values``' shape."""
  shape = values.shape
  if groups_first:
    values = values.reshape(shape[0], -1)
  else:
    values = values.reshape(-1, shape[-1])
  num_groups = values.shape[0 if groups_first else 1]
  if num_groups == 1:  # a flat reduction: XLA:CPU reduces (L, 1) ~15x slower
    group_max = jnp.max(jnp.abs(values.reshape(-1)), keepdims=True)
  else:
    group_max = jnp.max(jnp.abs(values), axis=1 if groups_first else 0)
  has_mass, exponent, power = _group_power(group_max)
  limbs = jax.ffi.ffi_call(
    _native.MASS_TARGET,
    jax.ShapeDtypeStruct((num_groups, 6), jnp.uint32),
    vmap_method="broadcast_all",
  )(values, power, groups_first=groups_first)
  mass_hi, mass_lo = _limbs_to_float([limbs[:, k] for k in range(6)])
  n, rate_hi, rate_lo = _samples_and_rate(
    mass_hi, mass_lo, group_max, power, num_samples, sampler
  )
  group_n = jnp.broadcast_to(n, (num_groups,))
  counts = jax.ffi.ffi_call(
    _native.COUNTS_TARGET,
    jax.ShapeDtypeStruct(values.shape, dtype),
    vmap_method="broadcast_all",
  )(
    values,
    power,
    rate_hi,
    rate_lo,
    group_n,
    words,
    sampler=np.int32(_NATIVE_SAMPLERS[sampler]),
    groups_first=groups_first,
  )
  scale = _group_scale(mass_hi, mass_lo, group_n, exponent, has_mass)
  # Under shard_map, as varying over the mesh axes as the XLA program's
  # results (an FFI call's results are typed as not varying).
  counts = _varying_like(counts.reshape(shape), values, words, num_samples)
  return counts, _varying_like(scale, values, num_samples)


def _vma(x: Any) -> frozenset[str]:
  """The mesh axes that the arrays in ``x`` vary over (under shard_map)."""
  axes: frozenset[str] = frozenset()
  for leaf in jax.tree.leaves(x):
    aval = jax.typeof(leaf)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.9
    axes |= manual.varying if manual else getattr(aval, "vma", frozenset())
  return axes


def _varying_like(x: jax.Array, *sources: Any) -> jax.Array:
  """``x``, varying over every mesh axis that one of ``sources`` varies
  over."""
  missing = _vma(sources) - _vma(x)
  return lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x


# The native kernels' sampler codes (counts.cc's Sampler).
_NATIVE_SAMPLERS = {"systematic": 0, "stratified": 1, "deterministic": 2}


def counts_of_layout(
  values: jax.Array,
  draws: jax.Array,
  num_samples: int | jax.Array | BitBudget,
  sampler: str,
  dtype: np.dtype,
  groups_first: bool = False,
  segments: Segments | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Signed hit counts of ``G`` groups laid out as ``(M, R, G)``.

  Args:
    values: finite float32 values (padding is zero), value ``l`` of group
      ``g`` at ``[l // R, l % R, g]`` (see :func:`pack`); the distribution
      of a group is its magnitudes. With ``groups_first``, ``(G, M, R)``
      instead (value ``l`` of group ``g`` at ``[g, l // R, l % R]``).
    draws: :func:`group_draws` of the ``G`` groups' keys (the words may be
      computed apart, in a program of their own).
    num_samples: ``N`` per group (int or traced int32 scalar; static for
      ``"iid"``), or a :class:`BitBudget` (stratified and systematic; its
      fields static or traced int32 scalars) that sets each group's ``N``.
    sampler: one of :data:`SAMPLERS`.
    dtype: integer dtype of the counts (it must hold ``N``).
    groups_first: the layout of ``values`` (and of the counts).
    segments: how the groups are parts of larger groups (default: they are
      whole groups).

  Returns:
    ``(counts, scale)``: ``sign(values) * hits`` of ``values``' shape in
    ``dtype`` (hits sum to ``N`` in every group that has mass, 0 elsewhere),
    and float32 scales ``sum(|values|) / N`` of shape ``(G,)``.
  """
  if segments is not None:  # parts of groups: the XLA program combines them
    return _xla_counts_of_layout(
      values, draws, num_samples, sampler, dtype, groups_first, segments
    )
  return _native_or_xla(
    sampler,
    native=lambda: _native_counts(
      values, draws, num_samples, sampler, dtype, groups_first
    ),
    xla=lambda: _xla_counts_of_layout(
      values, draws, num_samples, sampler, dtype, groups_first
    ),
  )


_Result = tuple[jax.Array, jax.Array]


def _native_or_xla(
  sampler: str, native: Callable[[], _Result], xla: Callable[[], _Result]
) -> _Result:
  """``native()`` on the CPU and ``xla()`` elsewhere, where the native
  kernels serve ``sampler`` and are built; else ``xla()``. Both give the
  same integers and scales."""
  if sampler in _NATIVE_SAMPLERS and _native.native_status().available:
    return lax.platform_dependent(cpu=native, default=xla)
  return xla()


def _unpacked(
  result: tuple[jax.Array, jax.Array], n: int, groups_first: bool
) -> tuple[jax.Array, jax.Array]:
  counts, scale = result
  return unpack(counts, n, groups_first), scale


def _xla_counts_of_layout(
  values: jax.Array,
  draws: jax.Array,
  num_samples: int | jax.Array | BitBudget,
  sampler: str,
  dtype: np.dtype,
  groups_first: bool,
  segments: Segments | None = None,
) -> tuple[jax.Array, jax.Array]:
  """:func:`counts_of_layout` as one XLA program (any platform, any
  sampler, groups in segments)."""
  segments = segments or _whole_groups()
  if not groups_first and values.shape[2] == 1:
    # One group: (M, R, 1) is (1, M, R) in memory, whose columns XLA:CPU
    # reduces faster (a minor axis rather than a middle one).
    cols, rows, _ = values.shape
    counts, scale = _xla_counts_of_layout(
      values.reshape(1, cols, rows),
      draws,
      num_samples,
      sampler,
      dtype,
      True,
      segments,
    )
    return counts.reshape(cols, rows, 1), scale
  # Reductions read the values where they lie, reducing each column of R
  # consecutive values; the scan reads (R, lanes) rows, one transposing copy
  # (XLA:CPU reduces and scans a trailing unit axis (G = 1) far slower than a
  # flat one). Lanes are (M, G) flattened, or (G, M) for groups first.
  if groups_first:
    num_groups, cols, rows = values.shape
    row_axis = 2
    rows_view = jnp.transpose(values, (2, 0, 1)).reshape(rows, -1)
    columns = lambda v: v.T  # (G, M) column reductions -> (M, G)
    lanes = lambda a: a.T.reshape(-1)  # (M, G) -> lanes
    per_lane = lambda p: jnp.repeat(p, cols, axis=0)  # (G, ...) -> lanes
    per_value = lambda p: p[:, None, None]  # (G,) -> the layout
  else:
    cols, rows, num_groups = values.shape
    row_axis = 1
    rows_view = jnp.swapaxes(values, 0, 1).reshape(rows, -1)
    columns = lambda v: v
    lanes = lambda a: a.reshape(-1)
    per_lane = lambda p: jnp.tile(p, (cols,) + (1,) * (p.ndim - 1))
    per_value = lambda p: p[None, None, :]

  def column_reduce(
    arrays: tuple[jax.Array, ...],
    inits: tuple[jax.Array, ...],
    combine: Callable[..., tuple[jax.Array, ...]],
  ) -> tuple[jax.Array, ...]:
    """One pass over the layout reducing each column: ``(M, G)`` each."""
    out = lax.reduce(arrays, inits, combine, (row_axis,))
    return tuple(columns(v) for v in out)

  group_max = segments.group_max(
    jnp.max(jnp.abs(values), axis=(0, 1) if not groups_first else (1, 2))
  )
  has_mass, exponent, power = _group_power(group_max)

  def scaled(v: jax.Array, p: jax.Array) -> jax.Array:
    """Scaled magnitudes in [0, 1), tiny ones flushed. A function, not an
    array: XLA recomputes it inside each pass instead of storing it."""
    u = jnp.abs(v) * p
    return jnp.where(u >= _FLUSH, u, 0.0)

  u = scaled(values, per_value(power))
  # One pass: the exact mass as four 16-bit limb sums, and the last non-zero
  # row of each column (the last non-zero value in CDF order, position
  # m * R + r, takes the difference between T_n and N).
  row_index = jnp.where(
    u > 0, lax.broadcasted_iota(jnp.int32, u.shape, row_axis), -1
  )
  *limb_sums, last_row = column_reduce(
    (*_limbs(u), row_index),
    (*(jnp.uint32(0),) * 4, jnp.int32(-1)),
    lambda a, b: (
      *(x + y for x, y in zip(a[:4], b[:4])),
      jnp.maximum(a[4], b[4]),
    ),
  )
  col_index = lax.broadcasted_iota(jnp.int32, (cols, num_groups), 0)
  last = jnp.max(
    jnp.where(last_row >= 0, col_index * rows + last_row, -1), axis=0
  )

  # Exact mass, then the double-float rate N / mass.
  mass_hi, mass_lo = _limbs_to_float(  # units of 2**-64
    segments.limb_total(_limb_total(limb_sums))
  )
  n, rate_hi, rate_lo = _samples_and_rate(
    mass_hi, mass_lo, group_max, power, num_samples, sampler
  )

  # Column totals in fixed point, then their exclusive prefix (exact).
  whole, frac = _fixed_point(u, per_value(rate_hi), per_value(rate_lo))
  frac_hi, frac_lo, whole_sum = column_reduce(  # limb sums below 2**21
    (frac >> 16, frac & jnp.uint32(0xFFFF), whole),
    (jnp.uint32(0), jnp.uint32(0), jnp.int32(0)),
    lambda a, b: tuple(x + y for x, y in zip(a, b)),
  )
  col_carry = (frac_hi + (frac_lo >> 16)) >> 16
  col_frac = (frac_hi << 16) + frac_lo  # wraps: carries counted
  col_whole = whole_sum + col_carry.astype(jnp.int32)
  start_whole, start_frac, part_whole, part_frac = exclusive_prefix(
    col_whole, col_frac
  )
  offset_whole, offset_frac, end_hi, end_lo, holds_last = segments.offsets(
    part_whole, part_frac, last >= 0
  )
  start_hi, start_lo = _add(
    start_whole, start_frac, offset_whole[None], offset_frac[None]
  )
  start_hi, start_lo = lanes(start_hi), lanes(start_lo)
  rate_hi = per_lane(rate_hi)
  rate_lo = per_lane(rate_lo)
  lane_power = per_lane(power)

  # What G needs of each group: its iid samples' row, or its key words.
  if sampler == "iid":
    assert not isinstance(num_samples, BitBudget), "iid draws a static N"
    samples = _iid_samples(draws, int(num_samples))
    per_group = jnp.arange(num_groups)  # each group's row of samples
    below = lambda hi, lo, groups, _: _iid_hits_below(
      samples, groups, hi, lo, int(num_samples)
    )
  else:
    per_group = draws
    below = lambda hi, lo, words, cap: _hits_below(sampler, words, hi, lo, cap)
  lane_draws = per_lane(per_group)
  lane_n = per_lane(n) if n.ndim else n

  g_start = below(start_hi, start_lo, lane_draws, lane_n)
  if sampler == "iid":
    # T of every value, then one batched search.
    def row_t(
      carry: tuple[jax.Array, jax.Array], row: jax.Array
    ) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
      hi, lo = _add(
        *carry, *_fixed_point(scaled(row, lane_power), rate_hi, rate_lo)
      )
      return (hi, lo), (hi, lo)

    _, (t_hi, t_lo) = lax.scan(row_t, (start_hi, start_lo), rows_view)
    g = below(t_hi, t_lo, lane_draws, lane_n)
    hits = jnp.diff(g, axis=0, prepend=g_start[None])
    counts = jnp.where(rows_view < 0, -hits, hits).astype(dtype)
  else:

    def row_counts(
      carry: tuple[jax.Array, jax.Array, jax.Array], row: jax.Array
    ) -> tuple[tuple[jax.Array, jax.Array, jax.Array], jax.Array]:
      hi, lo, g_prev = carry
      hi, lo = _add(
        hi, lo, *_fixed_point(scaled(row, lane_power), rate_hi, rate_lo)
      )
      g = below(hi, lo, lane_draws, lane_n)
      hits = g - g_prev
      return (hi, lo, g), jnp.where(row < 0, -hits, hits).astype(dtype)

    _, counts = lax.scan(row_counts, (start_hi, start_lo, g_start), rows_view)

  # (R, lanes) -> the layout of the input: a transposing copy of the (small)
  # integers, so that they come out row-major for the layer's contraction,
  # which runs several times slower on a transposed int8 operand.
  if groups_first:
    counts = jnp.transpose(counts.reshape(rows, num_groups, cols), (1, 2, 0))
  else:
    counts = jnp.swapaxes(counts.reshape(rows, cols, num_groups), 0, 1)
  # What an exact T_n == N gives: samples above T_n (0 or 1 of them for the
  # bounded samplers) belong to the last non-zero value; G is capped at N.
  deficit = jnp.where(holds_last, n - below(end_hi, end_lo, per_group, n), 0)
  if groups_first:
    # Elementwise rather than a scatter: under jit on a batch-sharded input
    # (an auto-mode mesh), XLA's partitioner keeps it on each device, where
    # it all-reduced a scatter's result across them.
    position = lax.broadcasted_iota(
      jnp.int32, values.shape, 1
    ) * rows + lax.broadcasted_iota(jnp.int32, values.shape, 2)
    extra = jnp.where(position == per_value(last), per_value(deficit), 0)
    counts = counts + jnp.where(values < 0, -extra, extra).astype(dtype)
  else:  # one scatter: faster than a pass over the counts
    safe_last = jnp.maximum(last, 0)
    at = (safe_last // rows, safe_last % rows, jnp.arange(num_groups))
    deficit = jnp.where(values[at] < 0, -deficit, deficit)
    counts = counts.at[at].add(deficit.astype(dtype))
  return counts, _group_scale(mass_hi, mass_lo, n, exponent, has_mass)


def pack(x: jax.Array, groups_first: bool = False) -> jax.Array:
  """``(L, G)`` -> the ``(M, R, G)`` layout, zero-padded; ``(G, L)`` ->
  ``(G, M, R)`` with ``groups_first``. Both are reshapes: value ``l`` of a
  group sits in column ``l // R``, row ``l % R``, so the CDF, which visits
  the layout column by column, visits each group's values in their order."""
  if groups_first:
    groups, n = x.shape
    rows, cols = layout(n)
    x = jnp.pad(x, ((0, 0), (0, rows * cols - n)))
    return x.reshape(groups, cols, rows)
  n, groups = x.shape
  rows, cols = layout(n)
  x = jnp.pad(x, ((0, rows * cols - n), (0, 0)))
  return x.reshape(cols, rows, groups)


def unpack(y: jax.Array, n: int, groups_first: bool = False) -> jax.Array:
  """The inverse of :func:`pack`."""
  if groups_first:
    groups, cols, rows = y.shape
    return y.reshape(groups, cols * rows)[:, :n]
  cols, rows, groups = y.shape
  return y.reshape(cols * rows, groups)[:n]


def sample_counts(
  x: jax.Array,
  key: jax.Array,
  num_samples: int | jax.Array,
  sampler: str = "systematic",
  sort: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Hit counts of ``num_samples`` samples drawn from the PDF ``x / sum(x)``.

  Args:
    x: 1-D float32 magnitudes (``>= 0``, finite). Zeros never receive a hit.
    key: a ``jax.random`` key.
    num_samples: ``N`` with ``N + len(x) <= MAX_SAMPLES``: a Python int, or
      for the stratified and systematic samplers also a traced int32 scalar
      (one compilation then serves every ``N``; ``"iid"`` draws an ``N``-sized
      array, so its ``N`` must be static).
    sampler: ``"systematic"`` (default), ``"stratified"`` or ``"iid"``.
    sort: build the CDF over values ordered by decreasing magnitude.

  Returns:
    ``(counts, scale)``: int32 counts of shape ``x.shape`` summing to exactly
    ``N``, and the float32 scale ``sum(x) / N`` so that ``scale * counts`` is an
    unbiased estimate of ``x``. Both are zero when ``x`` is all zero.
  """
  if sampler not in ALL_SAMPLERS:
    raise ValueError(
      f"unknown sampler {sampler!r}; expected one of {ALL_SAMPLERS}"
    )
  n = x.shape[0]
  if n == 0:
    return jnp.zeros((0,), jnp.int32), jnp.zeros((), jnp.float32)
  if sampler == "iid" and not isinstance(num_samples, int):
    raise TypeError("the iid sampler needs a static (Python int) num_samples")
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)  # a raw uint32[2] key
  counts, scale = grouped_counts(
    x.astype(jnp.float32)[:, None],
    key[None],
    num_samples,
    sampler,
    sort,
    np.dtype(np.int32),
  )
  return counts[:, 0], scale[0]


def grouped_counts(
  values: jax.Array,
  keys: jax.Array,
  num_samples: int | jax.Array | BitBudget,
  sampler: str,
  sort: bool,
  dtype: np.dtype,
  groups_first: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Signed counts of the groups in the columns of ``values`` (``(L, G)``;
  ``(G, L)``, groups in rows, with ``groups_first``), one key each; see
  :func:`counts_of_layout`. ``sort`` orders each group's values by decreasing
  magnitude (stable) before building its CDF."""
  axis = 1 if groups_first else 0
  n = values.shape[axis]
  if sort:
    order = jnp.argsort(-jnp.abs(values), axis=axis, stable=True)
    values = jnp.take_along_axis(values, order, axis=axis)
  draws = group_draws(keys, sampler)
  counts, scale = _native_or_xla(
    sampler,
    # The native kernels read the groups as they are: no padded copy.
    native=lambda: _native_counts(
      values, draws, num_samples, sampler, dtype, groups_first
    ),
    xla=lambda: _unpacked(
      _xla_counts_of_layout(
        pack(values, groups_first),
        draws,
        num_samples,
        sampler,
        dtype,
        groups_first,
      ),
      n,
      groups_first,
    ),
  )
  if sort:
    unsorted = jnp.zeros_like(counts)
    if groups_first:
      counts = unsorted.at[jnp.arange(counts.shape[0])[:, None], order].set(
        counts
      )
    else:
      counts = unsorted.at[order, jnp.arange(counts.shape[1])[None, :]].set(
        counts
      )
  return counts, scale
