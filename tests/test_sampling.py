"""The per-group sampler: exact totals, count bounds, unbiasedness, cost."""

import fractions
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcq_jax import _sampling
from mcq_jax._sampling import SAMPLERS, sample_counts


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _counts(x, key, n_samples, sampler, sort=False):
  return sample_counts(x, key, n_samples, sampler, sort)


def _data(kind: str, n: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  if kind == "gaussian":
    x = rng.standard_normal(n)
  elif kind == "cauchy":  # heavy tailed: a few values hold most of the mass
    x = rng.standard_cauchy(n)
  elif kind == "sparse":  # nearly all zero
    x = np.zeros(n)
    x[rng.integers(0, n, size=max(1, n // 1000))] = rng.standard_normal(
      max(1, n // 1000)
    )
    x[n // 2] = 0.75  # at least one non-zero
  elif kind == "equal":
    x = np.full(n, 0.1)
  elif kind == "tiny":  # far below 1: counts must not depend on the units
    x = (1 + rng.random(n)) * 1e-30
  else:
    raise ValueError(kind)
  return np.abs(x).astype(np.float32)


def _expected(x: np.ndarray, n_samples: int) -> np.ndarray:
  x64 = x.astype(np.float64)
  return n_samples * x64 / x64.sum()


def _check_counts(x, counts, n_samples):
  counts = np.asarray(counts)
  assert counts.dtype == np.int32
  assert counts.shape == x.shape
  assert counts.sum() == n_samples
  assert counts.min() >= 0
  assert not counts[x == 0].any(), "a zero value received a hit"


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize(
  "kind", ["gaussian", "cauchy", "sparse", "equal", "tiny"]
)
@pytest.mark.parametrize("n", [1, 2, 31, 32, 33, 1000, 1025, 40_000])
@pytest.mark.parametrize("k", [0.01, 1.0, 3.7])
def test_counts_sum_exactly_to_n(sampler, kind, n, k):
  x = _data(kind, n)
  n_samples = max(1, round(k * n))
  counts, scale = _counts(jnp.asarray(x), jax.random.key(n), n_samples, sampler)
  _check_counts(x, counts, n_samples)
  np.testing.assert_allclose(
    float(scale), x.astype(np.float64).sum() / n_samples, rtol=1e-5
  )


# Float32 inputs define expectations only up to float32 rounding; a count that
# lands on the wrong side of an integer expectation by less than this is not a
# sampler error.
_TOL = 1e-3


@pytest.mark.parametrize("kind", ["gaussian", "cauchy", "sparse", "equal"])
@pytest.mark.parametrize("n", [7, 1000, 70_001])
@pytest.mark.parametrize("k", [0.3, 1.0, 16.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_systematic_counts_are_floor_or_ceil(kind, n, k, seed):
  x = _data(kind, n, seed)
  n_samples = round(k * n)
  counts = np.asarray(
    _counts(jnp.asarray(x), jax.random.key(seed), n_samples, "systematic")[0]
  )
  e = _expected(x, n_samples)
  assert (counts >= np.floor(e - _TOL)).all() and (
    counts <= np.ceil(e + _TOL)
  ).all()


@pytest.mark.parametrize("kind", ["gaussian", "cauchy", "sparse", "equal"])
@pytest.mark.parametrize("n", [7, 1000, 70_001])
@pytest.mark.parametrize("k", [0.3, 1.0, 16.0])
def test_stratified_counts_within_two(kind, n, k):
  x = _data(kind, n)
  n_samples = round(k * n)
  counts = np.asarray(
    _counts(jnp.asarray(x), jax.random.key(3), n_samples, "stratified")[0]
  )
  assert np.abs(counts - _expected(x, n_samples)).max() < 2


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_subnormals_count_as_zero(sampler):
  # XLA flushes subnormal floats to zero on CPU and GPU, so they weigh nothing.
  x = np.array([1e-39, 0.5, 1e-40, 0.25], np.float32)
  counts, scale = _counts(jnp.asarray(x), jax.random.key(0), 30, sampler)
  assert np.asarray(counts)[[0, 2]].tolist() == [0, 0]
  assert int(np.asarray(counts).sum()) == 30
  np.testing.assert_allclose(float(scale), 0.75 / 30, rtol=1e-6)


@pytest.mark.parametrize("sort", [False, True])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_zero_and_empty_groups(sampler, sort):
  counts, scale = _counts(jnp.zeros(17), jax.random.key(0), 9, sampler, sort)
  assert not np.asarray(counts).any() and float(scale) == 0.0
  counts, scale = _counts(jnp.zeros(0), jax.random.key(0), 0, sampler, sort)
  assert counts.shape == (0,) and float(scale) == 0.0


def _unbiasedness_gap(counts_mean, expected, bound_range, reps, n_values):
  """Largest |mean - E| in units of a Hoeffding bound at overall level 1e-9.

  Each count lies in an interval of width ``bound_range`` around its
  expectation, so P(|mean - E| > t) <= 2 exp(-2 reps t^2 / range^2); with a
  union bound over ``n_values`` values, t below fails with probability < 1e-9.
  """
  t = bound_range * np.sqrt(np.log(2 * n_values / 1e-9) / (2 * reps))
  return np.abs(counts_mean - expected).max() / t


_REPS = 4096


def _mean_counts(x, n_samples, sampler, reps=_REPS, sort=False):
  keys = jax.random.split(jax.random.key(2024), reps)
  f = jax.jit(
    jax.vmap(
      lambda k: sample_counts(jnp.asarray(x), k, n_samples, sampler, sort)[0]
    )
  )
  return np.asarray(f(keys), np.float64).mean(axis=0)


# A group with values spanning five orders of magnitude and zeros.
_UNBIASED_X = np.abs(
  np.concatenate(
    [np.random.default_rng(7).standard_cauchy(40), [0.0, 1e-4, 3e-3, 0.0, 2.5]]
  )
).astype(np.float32)


@pytest.mark.parametrize("sort", [False, True])
@pytest.mark.parametrize(
  "sampler,width", [("systematic", 1.0), ("stratified", 4.0)]
)
def test_unbiased_bounded_samplers(sampler, width, sort):
  n_samples = 2 * _UNBIASED_X.size
  mean = _mean_counts(_UNBIASED_X, n_samples, sampler, sort=sort)
  e = _expected(_UNBIASED_X, n_samples)
  assert _unbiasedness_gap(mean, e, width, _REPS, e.size) < 1.0


def test_unbiased_iid():
  # iid counts are Binomial(N, p): Bernstein-style bound from the variance.
  n_samples = 2 * _UNBIASED_X.size
  mean = _mean_counts(_UNBIASED_X, n_samples, "iid")
  e = _expected(_UNBIASED_X, n_samples)
  sd = np.sqrt(e * (1 - e / n_samples) / _REPS)
  assert (np.abs(mean - e) <= 6.5 * sd + 1e-9).all()


def test_unbiasedness_check_rejects_a_biased_rounding():
  # The same statistic must catch a quantizer that is not unbiased: rounding
  # each expectation to the nearest integer (deterministic, no sampling).
  e = _expected(_UNBIASED_X, 2 * _UNBIASED_X.size)
  assert _unbiasedness_gap(np.round(e), e, 1.0, _REPS, e.size) > 1.0


def test_sort_changes_which_values_are_hit_but_not_the_totals():
  x = _data("gaussian", 500)
  plain = np.asarray(
    _counts(jnp.asarray(x), jax.random.key(0), 100, "systematic")[0]
  )
  srt = np.asarray(
    _counts(jnp.asarray(x), jax.random.key(0), 100, "systematic", True)[0]
  )
  _check_counts(x, srt, 100)
  assert (plain != srt).any()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_same_key_same_counts_eager_jit_vmap(sampler):
  x = jnp.asarray(_data("cauchy", 3001))
  key = jax.random.key(11)
  eager = sample_counts(x, key, 4000, sampler)[0]
  jitted = _counts(x, key, 4000, sampler)[0]
  keys = jax.random.split(jax.random.key(5), 3)
  keys = keys.at[1].set(key)
  batched = jax.vmap(lambda k: sample_counts(x, k, 4000, sampler)[0])(keys)
  np.testing.assert_array_equal(eager, jitted)
  np.testing.assert_array_equal(eager, batched[1])


@pytest.mark.parametrize("sampler", ["stratified", "systematic"])
def test_no_intermediate_grows_with_samples(sampler):
  # K = 1e4 samples per value: nothing of size N may be materialised.
  n, n_samples = 100, 1_000_000
  jaxpr = jax.make_jaxpr(lambda x, k: sample_counts(x, k, n_samples, sampler))(
    jnp.ones(n), jax.random.key(0)
  )
  sizes = [
    int(np.prod(v.aval.shape))
    for eqn in jaxpr.jaxpr.eqns
    for v in eqn.outvars
    if hasattr(v.aval, "shape")
  ]
  assert max(sizes) <= 2 * n


def test_iid_materialises_its_samples():
  # The check above can see an O(N) intermediate: iid is one.
  jaxpr = jax.make_jaxpr(lambda x, k: sample_counts(x, k, 1_000_000, "iid"))(
    jnp.ones(100), jax.random.key(0)
  )
  sizes = [
    int(np.prod(v.aval.shape)) for e in jaxpr.jaxpr.eqns for v in e.outvars
  ]
  assert max(sizes) >= 1_000_000


def exact_total(limb_sums):
  """The group mass as the sampler forms it: limb sums, then double-float."""
  return _sampling._limbs_to_float(_sampling._limb_total(limb_sums))


def test_exact_total_is_the_integer_sum():
  # The group's mass is an integer sum of 16-bit limbs; its double-float
  # value must match the exact (Python integer) total to ~2**-46.
  rng = np.random.default_rng(0)
  for m in (1, 7, 1024, 5000):
    limbs = rng.integers(0, 2**21, size=(4, m, 3), dtype=np.uint64)
    hi, lo = jax.jit(exact_total)([jnp.asarray(v, jnp.uint32) for v in limbs])
    for g in range(3):
      exact = sum(int(limbs[k, :, g].sum()) << (16 * k) for k in range(4))
      got = fractions.Fraction(float(hi[g])) + fractions.Fraction(float(lo[g]))
      assert abs(got - exact) <= exact * fractions.Fraction(1, 2**46)


def test_fixed_point_totals_end_at_n():
  # T_n, the sum of the fixed-point expectations, is N up to the rounding of
  # each expectation to 2**-32 and the double-float rate, for awkward groups.
  for kind in ("gaussian", "cauchy", "sparse", "equal", "tiny"):
    for n, n_samples in ((1, 1), (1000, 7), (40_000, 1_000_000_000)):
      x = _data(kind, n)
      mag = _sampling.pack(jnp.asarray(x)[:, None])
      u = mag / np.float32(2.0 ** np.frexp(x.max())[1])
      limb_sums = [v.sum(axis=0, dtype=jnp.uint32) for v in _sampling._limbs(u)]
      m_hi, m_lo = exact_total(limb_sums)
      r_hi, r_lo = _sampling._rate(
        m_hi / np.float32(2.0**64),
        m_lo / np.float32(2.0**64),
        jnp.int32(n_samples),
      )
      whole, frac = _sampling._fixed_point(u, r_hi, r_lo)
      total = int(np.asarray(whole, np.int64).sum()) + fractions.Fraction(
        int(np.asarray(frac, np.int64).sum()), 2**32
      )
      assert abs(total - n_samples) <= n * 2**-31 + n_samples * 2**-44


def test_stratum_jitter_is_uniform_and_independent():
  # The stratified sampler's per-stratum uniform: a keyed counter hash.
  # Uniform: chi-square of the top 8 bits over 2**20 strata; independent:
  # chi-square of (stratum j, stratum j + 1) top-4-bit pairs, and of the same
  # stratum under two keys. Thresholds: p < 1e-6 of a true uniform failing.
  words = jax.random.bits(jax.random.key(0), (2, 2), jnp.uint32)
  j = jnp.arange(2**20, dtype=jnp.int32)
  a = np.asarray(_sampling.stratum_jitter(words[0], j))
  b = np.asarray(_sampling.stratum_jitter(words[1], j))

  def chi2(observed: np.ndarray) -> float:
    expected = observed.sum() / observed.size
    return float(((observed - expected) ** 2 / expected).sum())

  top8 = np.bincount(a >> 24, minlength=256)
  assert chi2(top8) < 255 + 6 * np.sqrt(2 * 255)
  pairs = np.bincount((a[:-1] >> 28) * 16 + (a[1:] >> 28), minlength=256)
  assert chi2(pairs) < 255 + 6 * np.sqrt(2 * 255)
  keys = np.bincount((a >> 28) * 16 + (b >> 28), minlength=256)
  assert chi2(keys) < 255 + 6 * np.sqrt(2 * 255)
  # and the same statistic rejects a jitter that is not uniform
  assert chi2(np.bincount((a >> 24) | 1, minlength=256)) > 1e4


def test_unknown_sampler():
  with pytest.raises(ValueError, match="unknown sampler 'sobol'"):
    sample_counts(jnp.ones(3), jax.random.key(0), 3, "sobol")


@pytest.mark.large
@pytest.mark.parametrize(
  # iid sorts its N samples: 10 million of them keep this test near 20 s
  "sampler,k",
  [("systematic", 16.0), ("stratified", 16.0), ("iid", 0.2)],
)
def test_fifty_million_values(sampler, k):
  n = 50_000_000
  x = _data("cauchy", n)
  x[np.random.default_rng(1).random(n) < 0.5] = 0.0
  n_samples = round(k * n)
  counts = np.asarray(
    _counts(jnp.asarray(x), jax.random.key(0), n_samples, sampler)[0]
  )
  _check_counts(x, counts, n_samples)
  dev = np.abs(counts - _expected(x, n_samples))
  if sampler == "systematic":
    assert dev.max() < 1 + _TOL
  elif sampler == "stratified":
    assert dev.max() < 2


@pytest.mark.parametrize("sampler", ["systematic", "stratified"])
def test_samples_near_the_int32_limit(sampler):
  x = _data("cauchy", 1000)
  n_samples = _sampling.MAX_SAMPLES - 1000
  counts = np.asarray(
    _counts(jnp.asarray(x), jax.random.key(0), n_samples, sampler)[0]
  )
  _check_counts(x, counts, n_samples)
  bound = 1 + _TOL if sampler == "systematic" else 2
  assert np.abs(counts - _expected(x, n_samples)).max() < bound


def test_computed_once_returns_its_input_bit_for_bit():
  # (subnormals are left out: XLA:CPU flushes them to zero in any
  # computation, this one or the scale's own arithmetic before it)
  x = np.array(
    [0.0, 1.18e-38, 2.5e-30, 0.1, 1.0, 3.4e38, np.inf, np.nan], np.float32
  )
  for y in (_sampling._computed_once(x), jax.jit(_sampling._computed_once)(x)):
    np.testing.assert_array_equal(
      np.asarray(y).view(np.uint32), x.view(np.uint32)
    )


def test_double_float_products_are_exact_whether_or_not_fused():
  # Under jit XLA may fuse a multiply into the next add (one rounding
  # instead of two); the double-float product is built from exact partial
  # products only, so it is the same fused or not: eagerly (one op at a
  # time, nothing fused) and jitted alike, and within 2**-46 of a * b.
  rng = np.random.default_rng(0)
  a = (rng.random(4096) * 2.0 ** rng.integers(-30, 30, 4096)).astype(np.float32)
  b = (rng.random(4096) * 2.0 ** rng.integers(-30, 30, 4096)).astype(np.float32)
  product = lambda a, b: _sampling._split_product(
    _sampling._split(a), _sampling._split(b)
  )
  eager = product(jnp.asarray(a), jnp.asarray(b))
  jitted = jax.jit(product)(a, b)
  for x, y in zip(eager, jitted):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  exact = a.astype(np.float64) * b.astype(np.float64)
  got = np.asarray(eager[0], np.float64) + np.asarray(eager[1], np.float64)
  assert (np.abs(got - exact) <= 2.0**-46 * np.abs(exact)).all()
  hi, lo = _sampling._split(jnp.asarray(a))
  np.testing.assert_array_equal(np.asarray(hi) + np.asarray(lo), a)
  for half in (hi, lo):  # at most 12 significant bits each
    m, _ = np.frexp(np.asarray(half, np.float64))
    assert (m * 2.0**12 == np.round(m * 2.0**12)).all()


def test_groups_of_one_value_draw_exactly_n():
  # Regression: a group's expected counts are summed in one pass and scanned
  # in another; when the two rounded a product differently (a multiply-add
  # fused in one of them only), this group of one value drew 2 of N = 1
  # (found by test_quantize's property test: a (3,) leaf per channel, K = 1).
  from mcq_jax import _groups, _keys

  x = jnp.asarray([[-0.95174557, 6.105071, -1.4814068]], jnp.float32)
  words = _groups._group_words(_keys.path_key(jax.random.key(0), "w"), 3)
  for columns in (1, 16):  # the eager path pads groups to 16 columns
    packed = jnp.pad(_sampling.pack(x), ((0, columns - 1), (0, 0), (0, 0)))
    counts, _ = jax.jit(_sampling.counts_of_layout, static_argnums=(3, 4))(
      packed, words, np.int32(1), "stratified", np.dtype(np.int32)
    )
    np.testing.assert_array_equal(np.asarray(counts)[0, 0], [-1, 1, -1])
