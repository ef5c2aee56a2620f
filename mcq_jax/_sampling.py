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

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Rows of the layout: the length of the scan (see the module docstring).
_ROWS = 32

# Largest supported ``N + n`` per group: every int32 prefix stays below 2**31.
MAX_SAMPLES = 2**31 - 2**24

SAMPLERS = ("stratified", "systematic", "iid")

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
# Double-float arithmetic (Dekker, Knuth): written without fused multiply-add.


def _split(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Veltkamp split of float32 ``a`` into two halves of 12 significant bits."""
  c = a * jnp.float32(4097.0)  # 2**12 + 1
  hi = c - (c - a)
  return hi, a - hi


def _two_product(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Error-free product: ``a * b == hi + lo`` exactly (barring underflow)."""
  hi = a * b
  a_hi, a_lo = _split(a)
  b_hi, b_lo = _split(b)
  lo = ((a_hi * b_hi - hi) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo
  return hi, lo


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


def _exact_total(limb_sums: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
  """The sum over axis 0 of a multi-limb integer, as a double-float.

  Args:
    limb_sums: limbs (16 bits apart, least significant first) of shape
      ``(M, G)``, each value below ``2**21``.

  Returns:
    ``(hi, lo)`` float32 of shape ``(G,)``: the exact integer total, in units
    of the least significant limb, to a relative ``2**-46``.
  """
  limbs = list(limb_sums)
  while limbs[0].shape[0] > 1:
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
  limbs = [v[0] for v in limbs]
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
  p_hi, p_lo = _two_product(u, rate_hi)
  p_lo = p_lo + u * rate_lo
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
  lo_idx = jnp.zeros(hi.shape, jnp.int32)
  hi_idx = jnp.full(hi.shape, num_samples, jnp.int32)

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
  p_hi, p_lo = _two_product(q1, safe)
  residual = (((n_hi - p_hi) - p_lo) + n_lo) - q1 * total_lo
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
  return jax.vmap(lambda k: jax.random.bits(k, (2,), jnp.uint32))(keys)


def group_draws(keys: jax.Array, sampler: str) -> jax.Array:
  """What :func:`counts_of_layout` draws each group's samples from: the
  ``G`` keys themselves for ``"iid"``, their :func:`group_words` otherwise."""
  return keys if sampler == "iid" else group_words(keys)


def counts_of_layout(
  values: jax.Array,
  draws: jax.Array,
  num_samples: int | jax.Array,
  sampler: str,
  dtype: np.dtype,
  groups_first: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Signed hit counts of ``G`` groups laid out as ``(R, M, G)``.

  Args:
    values: finite float32 values (padding is zero), group ``g`` in
      ``values[..., g]``, its value ``l = r * M + m`` at ``[r, m, g]``; the
      distribution of a group is its magnitudes. With ``groups_first``,
      ``(G, R, M)`` instead (value ``l`` of group ``g`` at ``[g, r, m]``).
    draws: :func:`group_draws` of the ``G`` groups' keys (the words may be
      computed apart, in a program of their own).
    num_samples: ``N`` per group (int or traced int32 scalar; static for
      ``"iid"``).
    sampler: one of :data:`SAMPLERS`.
    dtype: integer dtype of the counts (it must hold ``N``).
    groups_first: the layout of ``values`` (and of the counts).

  Returns:
    ``(counts, scale)``: ``sign(values) * hits`` of ``values``' shape in
    ``dtype`` (hits sum to ``N`` in every group that has mass, 0 elsewhere),
    and float32 scales ``sum(|values|) / N`` of shape ``(G,)``.
  """
  n = jnp.asarray(num_samples, jnp.int32)
  # Work on (R, lanes) rows: XLA:CPU reduces and scans a trailing unit axis
  # (G = 1) far slower than a flat one. Lanes are (M, G) flattened, or (G, M)
  # for groups first.
  if groups_first:
    num_groups, rows, cols = values.shape
    values = jnp.moveaxis(values, 1, 0).reshape(rows, num_groups * cols)
    columns = lambda v: v.reshape(num_groups, cols).T  # lanes -> (M, G)
    lanes = lambda a: a.T.reshape(-1)  # (M, G) -> lanes
    per_lane = lambda p: jnp.repeat(p, cols, axis=0)  # (G, ...) -> lanes
    lane_of = lambda m, g: g * cols + m
  else:
    rows, cols, num_groups = values.shape
    values = values.reshape(rows, cols * num_groups)
    columns = lambda v: v.reshape(cols, num_groups)
    lanes = lambda a: a.reshape(-1)
    per_lane = lambda p: jnp.tile(p, (cols,) + (1,) * (p.ndim - 1))
    lane_of = lambda m, g: m * num_groups + g

  # Bring each group's largest value into [0.5, 1) by a power of two (exact),
  # so that no product or quotient below can overflow or underflow.
  group_max = jnp.max(columns(jnp.max(jnp.abs(values), axis=0)), axis=0)
  has_mass = group_max > 0
  _, exponent = jnp.frexp(jnp.where(has_mass, group_max, 1.0))
  power = jnp.ldexp(jnp.float32(1.0), -exponent)
  lane_power = per_lane(power)

  def scaled(v: jax.Array) -> jax.Array:
    """Scaled magnitudes in [0, 1), tiny ones flushed. A function, not an
    array: XLA recomputes it inside each pass instead of storing it."""
    u = jnp.abs(v) * lane_power
    return jnp.where(u >= _FLUSH, u, 0.0)

  u = scaled(values)
  # One pass: the exact mass as four 16-bit limb sums, and the last non-zero
  # row of each column (the last non-zero value in CDF order, position
  # m * R + r, takes the difference between T_n and N).
  row_index = jnp.where(u > 0, lax.broadcasted_iota(jnp.int32, u.shape, 0), -1)
  *limb_totals, last_row = lax.reduce(
    (*_limbs(u), row_index),
    (*(jnp.uint32(0),) * 4, jnp.int32(-1)),
    lambda a, b: (
      *(x + y for x, y in zip(a[:4], b[:4])),
      jnp.maximum(a[4], b[4]),
    ),
    (0,),
  )
  col_index = lax.broadcasted_iota(jnp.int32, (cols, num_groups), 0)
  last = jnp.max(
    jnp.where(columns(last_row) >= 0, col_index * rows + columns(last_row), -1),
    axis=0,
  )

  # Exact mass, then the double-float rate N / mass.
  limb_sums = [columns(v) for v in limb_totals]
  mass_hi, mass_lo = _exact_total(limb_sums)  # units of 2**-64
  scale_64 = jnp.float32(2.0**64)
  rate_hi, rate_lo = _rate(mass_hi / scale_64, mass_lo / scale_64, n)
  rate_hi = per_lane(rate_hi)
  rate_lo = per_lane(rate_lo)

  # Column totals in fixed point, then their exclusive prefix (exact).
  whole, frac = _fixed_point(u, rate_hi, rate_lo)
  frac_hi, frac_lo, whole_sum = _row_sums(  # limb sums below 2**21
    frac >> 16, frac & jnp.uint32(0xFFFF), whole
  )
  col_carry = (frac_hi + (frac_lo >> 16)) >> 16
  col_frac = columns((frac_hi << 16) + frac_lo)  # wraps: carries counted
  col_whole = columns(whole_sum + col_carry.astype(jnp.int32))
  incl_frac = jnp.cumsum(col_frac, axis=0, dtype=jnp.uint32)
  wraps = (incl_frac < col_frac).astype(jnp.int32)
  incl_whole = jnp.cumsum(col_whole + wraps, axis=0, dtype=jnp.int32)
  start_hi = lanes(incl_whole - col_whole - wraps)
  start_lo = lanes(incl_frac - col_frac)
  end_hi, end_lo = incl_whole[-1], incl_frac[-1]

  # What G needs of each group: its iid samples' row, or its key words.
  if sampler == "iid":
    samples = _iid_samples(draws, int(num_samples))
    per_group = jnp.arange(num_groups)  # each group's row of samples
    below = lambda hi, lo, groups: _iid_hits_below(
      samples, groups, hi, lo, int(num_samples)
    )
  else:
    per_group = draws
    below = lambda hi, lo, words: _hits_below(sampler, words, hi, lo, n)
  lane_draws = per_lane(per_group)

  g_start = below(start_hi, start_lo, lane_draws)
  if sampler == "iid":
    # T of every value, then one batched search.
    def row_t(
      carry: tuple[jax.Array, jax.Array], row: jax.Array
    ) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
      hi, lo = _add(*carry, *_fixed_point(row, rate_hi, rate_lo))
      return (hi, lo), (hi, lo)

    _, (t_hi, t_lo) = lax.scan(row_t, (start_hi, start_lo), u)
    g = below(t_hi, t_lo, lane_draws)
    hits = jnp.diff(g, axis=0, prepend=g_start[None])
    counts = jnp.where(values < 0, -hits, hits).astype(dtype)
  else:

    def row_counts(
      carry: tuple[jax.Array, jax.Array, jax.Array], row: jax.Array
    ) -> tuple[tuple[jax.Array, jax.Array, jax.Array], jax.Array]:
      hi, lo, g_prev = carry
      hi, lo = _add(hi, lo, *_fixed_point(scaled(row), rate_hi, rate_lo))
      g = below(hi, lo, lane_draws)
      hits = g - g_prev
      return (hi, lo, g), jnp.where(row < 0, -hits, hits).astype(dtype)

    if groups_first:
      # Rows read from the (R, lanes) view (one transposing copy of the
      # values, contiguous rows after it) and written into (G, R, M) in
      # place: the counts come out row-major for the layer's contraction,
      # which runs several times slower on a transposed int8 operand.
      def row_into(
        r: jax.Array, carry: tuple[jax.Array, ...]
      ) -> tuple[jax.Array, ...]:
        hi, lo, g_prev, out = carry
        row = values[r]
        state, row_out = row_counts((hi, lo, g_prev), row)
        out = lax.dynamic_update_slice_in_dim(
          out, row_out.reshape(num_groups, 1, cols), r, axis=1
        )
        return (*state, out)

      out = jnp.zeros((num_groups, rows, cols), dtype)
      counts = lax.fori_loop(
        0, rows, row_into, (start_hi, start_lo, g_start, out)
      )[3]
    else:
      _, counts = lax.scan(row_counts, (start_hi, start_lo, g_start), values)

  # What an exact T_n == N gives: samples above T_n (0 or 1 of them for the
  # bounded samplers) belong to the last non-zero value; G is capped at N.
  if counts.ndim == 2:  # (R, lanes) -> the layout of the input
    counts = (
      jnp.moveaxis(counts.reshape(rows, num_groups, cols), 0, 1)
      if groups_first
      else counts.reshape(rows, cols, num_groups)
    )
  groups = jnp.arange(num_groups)
  deficit = jnp.where(has_mass, n - below(end_hi, end_lo, per_group), 0)
  safe_last = jnp.maximum(last, 0)
  row, col = safe_last % rows, safe_last // rows
  deficit = jnp.where(values[row, lane_of(col, groups)] < 0, -deficit, deficit)
  at = (groups, row, col) if groups_first else (row, col, groups)
  counts = counts.at[at].add(deficit.astype(dtype))
  # sum(x) / N in the rescaled units, then the power of two back. A product
  # with the reciprocal rather than a division: XLA rewrites division by a
  # constant that way, so a constant N and a traced N would differ.
  mass = (mass_hi + mass_lo) / scale_64
  scale = jnp.ldexp(mass * (jnp.float32(1.0) / n.astype(jnp.float32)), exponent)
  return counts, _computed_once(jnp.where(has_mass, scale, 0.0))


def pack(x: jax.Array, groups_first: bool = False) -> jax.Array:
  """``(L, G)`` -> the ``(R, M, G)`` layout, zero-padded; ``(G, L)`` ->
  ``(G, R, M)`` with ``groups_first``."""
  if groups_first:
    groups, n = x.shape
    rows, cols = layout(n)
    x = jnp.pad(x, ((0, 0), (0, rows * cols - n)))
    return x.reshape(groups, rows, cols)
  n, groups = x.shape
  rows, cols = layout(n)
  x = jnp.pad(x, ((0, rows * cols - n), (0, 0)))
  return x.reshape(rows, cols, groups)


def unpack(y: jax.Array, n: int, groups_first: bool = False) -> jax.Array:
  """The inverse of :func:`pack`."""
  if groups_first:
    groups, rows, cols = y.shape
    return y.reshape(groups, rows * cols)[:, :n]
  rows, cols, groups = y.shape
  return y.reshape(rows * cols, groups)[:n]


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
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
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
  num_samples: int | jax.Array,
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
  counts, scale = counts_of_layout(
    pack(values, groups_first),
    group_draws(keys, sampler),
    num_samples,
    sampler,
    dtype,
    groups_first,
  )
  counts = unpack(counts, n, groups_first)
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
