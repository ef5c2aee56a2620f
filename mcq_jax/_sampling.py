"""Hit counts of one group of values: the Monte Carlo core of MCQ.

Given the magnitudes ``x`` of a group (one tensor, one channel, one example's
activations) and a number of samples ``N``, we return integer hit counts ``c``
with ``sum(c) == N`` exactly and ``E[c_i] = N * x_i / sum(x)``.

Everything here works in *sample space*: the CDF scaled by ``N``,
``T_i = N * (x_1 + ... + x_i) / sum(x)``. Sample ``j`` of the stratified and
systematic samplers sits at ``j + xi_j`` in that space, so the number of samples
below a boundary ``T = whole + frac`` is ``G(T) = whole + [xi_whole < frac]``, a
closed form (see ``sample_counts``), and the count of value ``i`` is
``G(T_i) - G(T_(i-1))``. No sample position is ever
materialised for those two samplers: time and memory are linear in ``n`` and
independent of ``N``.

Numerics (why this is more than a ``cumsum``): ``T`` reaches ``N`` (up to
~1e9) but its fractional part decides the counts, and float32 has 24 bits. We
therefore carry ``T`` as an exact int32 part plus a float32 fraction in
``[0, 1]`` (``_split_cumsum``), built hierarchically over blocks of ``_BLOCK``
values so that no float sum ever grows beyond ``_BLOCK``. All float reductions
use an explicit addition order (no ``jnp.sum``/``jnp.cumsum`` on floats) so the
result is bit-identical eagerly, under ``jit`` and under ``vmap``. Exactness of
``sum(c) == N`` and ``c >= 0`` does not rest on float accuracy at all: counts
are differences of a monotone integer sequence pinned to ``0`` and ``N``.
"""

from __future__ import annotations

import fractions
import math

import jax
import jax.numpy as jnp
from jax import lax

# Block length of the hierarchical prefix sum. Float partial sums never exceed
# this many units of sample space, so their absolute error stays below ~1e-5.
_BLOCK = 32

# Largest supported ``N + n`` per group: every int32 prefix (at most ``N + n``
# plus a few counts of float rounding) stays below 2**31.
MAX_SAMPLES = 2**31 - 2**24

SAMPLERS = ("stratified", "systematic", "iid")


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


def _inclusive_scan_add(x: jax.Array) -> jax.Array:
  """Inclusive prefix sum along a short last axis, in sequential order.

  Used only on axes of length ``<= _BLOCK``. The explicit chain of adds fixes
  the rounding (``jnp.cumsum`` leaves the order to the compiler) and gives each
  increment a single rounding, which is what the counts depend on.
  """
  acc = x[..., 0]
  out = [acc]
  for i in range(1, x.shape[-1]):
    acc = acc + x[..., i]
    out.append(acc)
  return jnp.stack(out, axis=-1)


def pairwise_sum(x: jax.Array) -> jax.Array:
  """Sum of a 1-D float array by pairwise halving, in a fixed order.

  ``jnp.sum`` leaves the reduction order to the compiler, which may differ
  between eager, jitted and vmapped code; this does not.
  """
  while x.shape[0] > 1:
    if x.shape[0] % 2:
      x = jnp.concatenate([x, jnp.zeros((1,), x.dtype)])
    x = x[0::2] + x[1::2]
  return x[0] if x.shape[0] else jnp.zeros((), x.dtype)


def _split(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Veltkamp split of float32 ``a`` into two halves of 12 significant bits."""
  c = a * jnp.float32(4097.0)  # 2**12 + 1
  hi = c - (c - a)
  return hi, a - hi


def _two_product(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Dekker's error-free product: ``a * b == hi + lo`` exactly (no underflow).

  Written without fused multiply-add, which XLA on CPU does not introduce.
  """
  hi = a * b
  a_hi, a_lo = _split(a)
  b_hi, b_lo = _split(b)
  lo = ((a_hi * b_hi - hi) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo
  return hi, lo


def _split_cumsum(f: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Inclusive prefix sums of ``f`` (values in ``[0, 1)``) as int32 + fraction.

  Returns ``(whole, frac)`` with ``whole + frac`` equal to the prefix sum up to
  ~1e-5 absolute error for any length, and ``frac`` in ``[0, 1]``.
  """
  n = f.shape[0]
  if n <= _BLOCK:
    c = _inclusive_scan_add(f)
    whole = jnp.floor(c)
    return whole.astype(jnp.int32), c - whole
  num_blocks = -(-n // _BLOCK)
  blocks = jnp.pad(f, (0, num_blocks * _BLOCK - n)).reshape(num_blocks, _BLOCK)
  local = _inclusive_scan_add(blocks)  # each row <= _BLOCK
  total = local[:, -1]
  total_whole = jnp.floor(total)
  # Prefix over blocks: integer parts exactly, fractional parts recursively.
  sub_whole, sub_frac = _split_cumsum(total - total_whole)
  incl_whole = jnp.cumsum(total_whole.astype(jnp.int32)) + sub_whole
  offset_whole = jnp.concatenate([jnp.zeros((1,), jnp.int32), incl_whole[:-1]])
  offset_frac = jnp.concatenate([jnp.zeros((1,), f.dtype), sub_frac[:-1]])
  v = offset_frac[:, None] + local
  v_whole = jnp.floor(v)
  whole = offset_whole[:, None] + v_whole.astype(jnp.int32)
  return whole.reshape(-1)[:n], (v - v_whole).reshape(-1)[:n]


def _sample_space_cdf(
  x: jax.Array, num_samples: int | jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The CDF of ``x`` scaled to ``[0, N]``, as exact integer + fraction.

  Args:
    x: float32 magnitudes, ``>= 0``, 1-D, not all zero (callers mask that case).
    num_samples: ``N``.

  Returns:
    ``(whole, frac, scale)``: ``T_i ~= whole_i + frac_i`` with ``frac`` in
    ``[0, 1]`` and ``T_n ~= N``, and ``scale = sum(x) / N``.
  """
  # Bring the largest value into [0.5, 1) by an exact power-of-two rescale, so
  # that N / mass can neither overflow nor underflow (subnormal inputs are
  # flushed to zero by XLA on CPU and GPU before they get here).
  x_max = jnp.max(x)
  _, exponent = jnp.frexp(jnp.where(x_max > 0, x_max, 1.0))
  u = jnp.ldexp(x, -exponent)
  norm = pairwise_sum(u)
  n_float = jnp.asarray(num_samples, jnp.int32).astype(jnp.float32)
  rate = n_float / jnp.where(norm > 0, norm, 1.0)
  # Expected counts e = u * rate, carried exactly as e_hi + e_lo: a single
  # float32 product would be off by up to N * 6e-8 hits on the largest values.
  e_hi, e_lo = _two_product(u, rate)
  hi_whole = jnp.floor(e_hi)
  lo_whole = jnp.floor(e_lo)
  f = (e_hi - hi_whole) + (e_lo - lo_whole)  # in [0, 2)
  f_whole = jnp.floor(f)
  e_whole = (
    hi_whole.astype(jnp.int32)
    + lo_whole.astype(jnp.int32)
    + f_whole.astype(jnp.int32)
  )
  whole = jnp.cumsum(e_whole)
  f_whole, frac = _split_cumsum(f - f_whole)
  whole = whole + f_whole
  # The per-value rounding of e leaves the total a few ulps of N away from N.
  # Rescale T proportionally (as exact arithmetic would) so that T_n == N; the
  # correction is tiny (|deficit| ~ N * 1e-7) and monotone in i.
  deficit = (num_samples - whole[-1]).astype(jnp.float32) - frac[-1]
  approx = whole.astype(jnp.float32) + frac
  frac = frac + deficit * (approx / approx[-1])
  shift = jnp.floor(frac)
  # sum(x) / N, computed in the rescaled units so that it cannot overflow. A
  # product with the reciprocal rather than a division: XLA rewrites division
  # by a constant that way, so a constant N and a traced N would differ.
  scale = jnp.ldexp(norm * (jnp.float32(1.0) / n_float), exponent)
  return whole + shift.astype(jnp.int32), frac - shift, scale


def _uniform_of_stratum(key: jax.Array, stratum: jax.Array) -> jax.Array:
  """The jitter of stratum ``j``, derived on demand from ``(key, j)``.

  Both CDF boundaries that fall into one stratum see the same value, which is
  what keeps counts non-negative. One counter-based hash per value: the first
  word of ``fold_in(key, j)``, mapped to ``[0, 1)`` with 23 bits.
  """
  bits = jax.vmap(lambda j: jax.random.key_data(jax.random.fold_in(key, j))[0])(
    stratum
  )
  mantissa = (bits >> 9) | jnp.uint32(0x3F800000)
  return lax.bitcast_convert_type(mantissa, jnp.float32) - 1.0


def _iid_hits_below(
  key: jax.Array, whole: jax.Array, frac: jax.Array, num_samples: int
) -> jax.Array:
  """How many of N iid uniform samples on ``[0, N)`` lie below each ``T``.

  Samples are drawn as (integer part, fraction) so that their resolution does
  not degrade with N, sorted lexicographically, and each boundary is located by
  a binary search. Memory is O(N): this is the textbook baseline.
  """
  k_int, k_frac = jax.random.split(key)
  s_whole = jax.random.randint(k_int, (num_samples,), 0, num_samples, jnp.int32)
  s_frac = jax.random.uniform(k_frac, (num_samples,))
  s_whole, s_frac = lax.sort((s_whole, s_frac), num_keys=2)

  lo = jnp.zeros(whole.shape, jnp.int32)
  hi = jnp.full(whole.shape, num_samples, jnp.int32)

  def step(
    _: jax.Array, bounds: tuple[jax.Array, jax.Array]
  ) -> tuple[jax.Array, jax.Array]:
    lo, hi = bounds
    mid = lo + (hi - lo) // 2  # lo + hi could overflow int32
    mid_c = jnp.minimum(mid, num_samples - 1)
    below = (s_whole[mid_c] < whole) | (
      (s_whole[mid_c] == whole) & (s_frac[mid_c] < frac)
    )
    below = below & (lo < hi)
    return jnp.where(below, mid + 1, lo), jnp.where(below | (lo >= hi), hi, mid)

  lo, _ = lax.fori_loop(0, int(num_samples).bit_length() + 1, step, (lo, hi))
  return lo


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
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)  # a raw uint32[2] key
  if sort:
    order = jnp.argsort(-x, stable=True)
    counts, scale = sample_counts(x[order], key, num_samples, sampler)
    return jnp.zeros_like(counts).at[order].set(counts), scale

  whole, frac, scale = _sample_space_cdf(x, num_samples)
  if sampler == "iid":
    if not isinstance(num_samples, int):
      raise TypeError("the iid sampler needs a static (Python int) num_samples")
    below = _iid_hits_below(key, whole, frac, num_samples)
  else:
    if sampler == "systematic":
      jitter = jax.random.uniform(key)
    else:
      jitter = _uniform_of_stratum(key, jnp.clip(whole, 0, num_samples))
    # Samples sit at j + jitter_j: those of strata below `whole` all lie below
    # T, and the one of stratum `whole` does iff its jitter is below `frac`.
    below = whole + (jitter < frac).astype(jnp.int32)
  below = jnp.clip(below, 0, num_samples)

  index = jnp.arange(n, dtype=jnp.int32)
  nonzero = x > 0
  # A zero value must get no hit even where two float boundaries that should be
  # equal differ in the last bit: it inherits the boundary of the value before.
  source = lax.cummax(jnp.where(nonzero, index, -1))
  below = jnp.where(source >= 0, below[jnp.maximum(source, 0)], 0)
  # Pin the end: everything from the last non-zero value on has all N below.
  last = source[-1]
  below = jnp.where(index >= last, num_samples, below)
  below = lax.cummax(below)
  counts = jnp.diff(below, prepend=jnp.zeros((1,), jnp.int32))
  has_mass = last >= 0
  return jnp.where(has_mass, counts, 0), jnp.where(has_mass, scale, 0.0)
