// Native CPU kernels of mcq_jax's systematic, stratified and deterministic
// samplers (see mcq_jax/_sampling.py, whose XLA program they reproduce bit
// for bit, and mcq_jax/_native.py, which builds and registers them).
//
// Two XLA FFI handlers, each one pass over a block of groups:
//
//   mcq_mass:   values, power -> the exact mass of each group as normalized
//               16-bit limbs.
//   mcq_counts: values, power, rate (hi, lo), N, key words -> signed counts.
//
// Between the two, XLA computes each group's N and rate from the limbs with
// the very code of the XLA path, so every per-group float is the same.
//
// Layouts: values are (..., L, G) (groups last: each row holds one value of
// every group) or (..., G, L) (groups first); per-group operands are
// (..., G). Within a group the CDF visits the values in memory order.
//
// Bit-identity with the XLA path rests on three things:
// * every float operation is the one the XLA program performs, in the same
//   order, in IEEE single precision; the build passes -ffp-contract=off (no
//   fused multiply-add) and no fast-math flag;
// * denormals are flushed, as XLA:CPU flushes them;
// * float-to-integer conversions saturate, as XLA's do.
// Sums of fixed-point numbers are exact integer sums, so their order is
// free: the prefix runs in a 64-bit integer.

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <string>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using mcq_jax::FlushDenormals;
using mcq_jax::ParallelFor;

constexpr float kTwo32 = 4294967296.0f;
constexpr float kFlush = 9.094947e-13f;  // 2**-40, as _sampling._FLUSH

inline uint32_t Bits(float a) {
  uint32_t b;
  std::memcpy(&b, &a, 4);
  return b;
}

inline float FromBits(uint32_t b) {
  float a;
  std::memcpy(&a, &b, 4);
  return a;
}

// XLA's float -> uint32 conversion: saturating (NaN and negatives to 0).
inline uint32_t ToU32(float a) {
  // Clamped into range before the conversion (no undefined behaviour), the
  // saturation selected after it.
  const float clamped = std::min(a > 0.0f ? a : 0.0f, 4294967040.0f);
  const uint32_t in_range = static_cast<uint32_t>(clamped);
  return a >= kTwo32 ? 0xFFFFFFFFu : in_range;
}

struct Halves {
  float hi, lo;
};

// _sampling._split: the top 12 significant bits by a mask, and the rest.
inline Halves Split(float a) {
  float hi = FromBits(Bits(a) & 0xFFFFF000u);
  return {hi, a - hi};
}

inline Halves TwoSum(float a, float b) {
  float s = a + b;
  float bb = s - a;
  return {s, (a - (s - bb)) + (b - bb)};
}

// What a group's values need: the power of two that scales them, the
// halves of its double-float rate.
struct Rate {
  float power;
  Halves hi, lo;  // Split(rate_hi), Split(rate_lo)
};

// _sampling.scaled: the magnitude brought into [0, 1), tiny ones flushed.
inline float Scaled(float v, float power) {
  float u = std::fabs(v) * power;
  return u >= kFlush ? u : 0.0f;
}

// _sampling._fixed_point: u * rate in units of 2**-32, as one int64
// (whole * 2**32 + frac; the int32 and uint32 halves of the XLA path).
inline int64_t FixedPoint(float u, const Rate& r) {
  Halves uh = Split(u);
  // _split_product(Split(u), Split(rate_hi))
  Halves middle = TwoSum(uh.hi * r.hi.lo, uh.lo * r.hi.hi);
  Halves top = TwoSum(uh.hi * r.hi.hi, middle.hi);
  float p_hi = top.hi;
  float p_lo = (top.lo + middle.lo) + uh.lo * r.hi.lo;
  p_lo = ((p_lo + uh.hi * r.lo.hi) + uh.hi * r.lo.lo) + uh.lo * r.lo.hi;
  float w_hi = std::floor(p_hi);
  float w_lo = std::floor(p_lo);
  uint32_t a = ToU32((p_hi - w_hi) * kTwo32 + 0.5f);
  uint32_t b = ToU32((p_lo - w_lo) * kTwo32 + 0.5f);
  uint32_t frac = a + b;
  int32_t whole = static_cast<int32_t>(w_hi) + static_cast<int32_t>(w_lo) +
                  static_cast<int32_t>(frac < a);
  return static_cast<int64_t>(static_cast<uint64_t>(
      (static_cast<uint64_t>(static_cast<uint32_t>(whole)) << 32) | frac));
}

inline uint32_t Fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

enum Sampler : int32_t { kSystematic = 0, kStratified = 1, kDeterministic = 2 };

// G(T): the samples below T = hi + lo * 2**-32, capped at N.
template <int32_t kSampler>
inline int32_t HitsBelow(int64_t t, uint32_t w0, uint32_t w1, int32_t n) {
  int32_t hi = static_cast<int32_t>(t >> 32);
  uint32_t lo = static_cast<uint32_t>(t);
  uint32_t jitter;
  if constexpr (kSampler == kSystematic) {
    jitter = w0;
  } else if constexpr (kSampler == kDeterministic) {
    jitter = 0x80000000u;
  } else {
    jitter = Fmix32(Fmix32(static_cast<uint32_t>(hi) ^ w0) ^ w1);
  }
  int32_t g = hi + static_cast<int32_t>(jitter < lo);
  return g < n ? g : n;
}

// The shape of one call: `batch` blocks of `groups` groups of `length`.
// Groups last, consecutive rows are `stride` values apart (the groups of
// the whole block; a part of them is a slab of columns).
struct Shape {
  int64_t batch, groups, length;
  bool groups_first;
  int64_t stride;
};

// The shape of values of rank 2 or more: leading axes are a batch.
ffi::Error ShapeOf(ffi::AnyBuffer::Dimensions dims, bool groups_first,
                   Shape* shape) {
  if (dims.size() < 2) {
    return ffi::Error::InvalidArgument("values must have rank 2 or more");
  }
  int64_t batch = 1;
  for (size_t i = 0; i + 2 < dims.size(); ++i) batch *= dims[i];
  int64_t a = dims[dims.size() - 2], b = dims[dims.size() - 1];
  // One group last, (L, 1), is (1, L) in memory: the groups-first loops
  // vectorize along it (the groups-last ones across groups, here one).
  if (!groups_first && b == 1) {
    *shape = Shape{batch, 1, a, true, a};
  } else if (groups_first) {
    *shape = Shape{batch, a, b, true, b};
  } else {
    *shape = Shape{batch, b, a, false, b};
  }
  return ffi::Error::Success();
}

// A per-group operand must hold `per_group` entries for each group.
ffi::Error CheckGroups(const char* name, size_t count, const Shape& s,
                       int64_t per_group) {
  const int64_t want = s.batch * s.groups * per_group;
  if (static_cast<int64_t>(count) != want) {
    return ffi::Error::InvalidArgument(
        std::string(name) + " has " + std::to_string(count) +
        " entries; the values' groups need " + std::to_string(want));
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// mcq_mass

ffi::Error MassImpl(bool groups_first, ffi::Buffer<ffi::F32> values,
                    ffi::Buffer<ffi::F32> power,
                    ffi::ResultBuffer<ffi::U32> limbs) {
  Shape s;
  auto error = ShapeOf(values.dimensions(), groups_first, &s);
  if (error.failure()) return error;
  for (auto check : {CheckGroups("power", power.element_count(), s, 1),
                     CheckGroups("limbs", limbs->element_count(), s, 6)}) {
    if (check.failure()) return check;
  }
  FlushDenormals flush;
  const float* v = values.typed_data();
  const float* p = power.typed_data();
  uint32_t* out_limbs = limbs->typed_data();
  // Each scaled magnitude is an integer u * 2**64 = hi * 2**32 + lo (exact:
  // u is a multiple of 2**-64); the hi and lo halves are summed apart, each
  // in 64 bits (fewer than 2**31 terms below 2**32).
  std::vector<uint64_t> sum_hi(s.groups), sum_lo(s.groups);
  for (int64_t b = 0; b < s.batch; ++b) {
    const float* vb = v + b * s.groups * s.length;
    const float* pb = p + b * s.groups;
    std::fill(sum_hi.begin(), sum_hi.end(), 0);
    std::fill(sum_lo.begin(), sum_lo.end(), 0);
    auto add = [&](int64_t g, float x) {
      float u = Scaled(x, pb[g]);
      float scaled = u * kTwo32;
      float top = std::floor(scaled);
      sum_hi[g] += ToU32(top);
      sum_lo[g] += ToU32((scaled - top) * kTwo32);
    };
    if (s.groups_first) {
      for (int64_t g = 0; g < s.groups; ++g) {
        const float* row = vb + g * s.length;
        for (int64_t l = 0; l < s.length; ++l) add(g, row[l]);
      }
    } else {
      for (int64_t l = 0; l < s.length; ++l) {
        const float* row = vb + l * s.groups;
        for (int64_t g = 0; g < s.groups; ++g) add(g, row[g]);
      }
    }
    for (int64_t g = 0; g < s.groups; ++g) {
      unsigned __int128 total =
          (static_cast<unsigned __int128>(sum_hi[g]) << 32) + sum_lo[g];
      uint32_t* out = out_limbs + (b * s.groups + g) * 6;
      for (int k = 0; k < 5; ++k) {
        out[k] = static_cast<uint32_t>((total >> (16 * k)) & 0xFFFF);
      }
      out[5] = static_cast<uint32_t>(total >> 80);
    }
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// mcq_counts

// What each group of a block needs, one array per field (the lanes of the
// groups-last loop load them as vectors).
struct Groups {
  std::vector<float> power, rate_hi_hi, rate_hi_lo, rate_lo_hi, rate_lo_lo;
  std::vector<uint32_t> word0, word1;
  explicit Groups(int64_t n)
      : power(n), rate_hi_hi(n), rate_hi_lo(n), rate_lo_hi(n),
        rate_lo_lo(n), word0(n), word1(n) {}
  Rate rate(int64_t g) const {
    return {power[g], {rate_hi_hi[g], rate_hi_lo[g]},
            {rate_lo_hi[g], rate_lo_lo[g]}};
  }
};

// Groups last, (L, G): each row holds one value of every group, and the
// groups are the lanes of one vector loop per row. Returns, per group, the
// hits below its total (in `below_end`).
template <int32_t kSampler, typename Count>
void CountsLanes(const Shape& s, const float* __restrict v, const Groups& gr,
                 const int32_t* __restrict n, int32_t* __restrict below_end,
                 Count* __restrict out) {
  const int64_t groups = s.groups;
  std::vector<int64_t> prefix(groups, 0);  // T of each lane so far
  int64_t* __restrict t = prefix.data();
  const float* __restrict power = gr.power.data();
  const float* __restrict hh = gr.rate_hi_hi.data();
  const float* __restrict hl = gr.rate_hi_lo.data();
  const float* __restrict lh = gr.rate_lo_hi.data();
  const float* __restrict ll = gr.rate_lo_lo.data();
  const uint32_t* __restrict w0 = gr.word0.data();
  const uint32_t* __restrict w1 = gr.word1.data();
  std::fill(below_end, below_end + groups, 0);
  for (int64_t l = 0; l < s.length; ++l) {
    const float* __restrict row = v + l * s.stride;
    Count* __restrict out_row = out + l * s.stride;
    for (int64_t g = 0; g < groups; ++g) {
      const float x = row[g];
      const Rate r{power[g], {hh[g], hl[g]}, {lh[g], ll[g]}};
      const int64_t tg = t[g] + FixedPoint(Scaled(x, r.power), r);
      t[g] = tg;
      const int32_t below = HitsBelow<kSampler>(tg, w0[g], w1[g], n[g]);
      const int32_t hits = below - below_end[g];
      below_end[g] = below;
      out_row[g] = static_cast<Count>(x < 0.0f ? -hits : hits);
    }
  }
}

// Groups first, (G, L): each group is contiguous. In chunks: the expected
// counts (a vector loop), their prefix (the one serial loop), then G and
// the hits (vector loops). Returns, per group, the hits below its total (in
// `below_end`).
template <int32_t kSampler, typename Count>
void CountsRows(const Shape& s, const float* __restrict v, const Groups& gr,
                const int32_t* __restrict n, int32_t* __restrict below_end,
                Count* __restrict out) {
  constexpr int64_t kChunk = 512;
  alignas(64) int64_t prefix[kChunk];
  alignas(64) int32_t below[kChunk];
  for (int64_t g = 0; g < s.groups; ++g) {
    const Rate r = gr.rate(g);
    const uint32_t w0 = gr.word0[g], w1 = gr.word1[g];
    const int32_t ng = n[g];
    const float* __restrict x = v + g * s.length;
    Count* __restrict o = out + g * s.length;
    int64_t total = 0;
    int32_t previous = 0;
    for (int64_t start = 0; start < s.length; start += kChunk) {
      const int64_t m = std::min(kChunk, s.length - start);
      const float* __restrict xs = x + start;
      for (int64_t i = 0; i < m; ++i) {
        prefix[i] = FixedPoint(Scaled(xs[i], r.power), r);
      }
      for (int64_t i = 0; i < m; ++i) {
        total += prefix[i];
        prefix[i] = total;
      }
      for (int64_t i = 0; i < m; ++i) {
        below[i] = HitsBelow<kSampler>(prefix[i], w0, w1, ng);
      }
      Count* __restrict os = o + start;
      const int32_t first = below[0] - previous;
      os[0] = static_cast<Count>(xs[0] < 0.0f ? -first : first);
      for (int64_t i = 1; i < m; ++i) {
        const int32_t hits = below[i] - below[i - 1];
        os[i] = static_cast<Count>(xs[i] < 0.0f ? -hits : hits);
      }
      previous = below[m - 1];
    }
    below_end[g] = previous;
  }
}

// The last value of group g (in the block's memory) that the sampler sees
// as non-zero, or -1: a backward search, which stops at once unless the
// group ends in zeros (padding).
int64_t LastNonZero(const Shape& s, const float* v, float power, int64_t g) {
  for (int64_t l = s.length - 1; l >= 0; --l) {
    const int64_t at = s.groups_first ? g * s.length + l : l * s.stride + g;
    if (Scaled(v[at], power) > 0.0f) return at;
  }
  return -1;
}

template <int32_t kSampler, typename Count>
void CountsBlock(const Shape& s, const float* v, const float* power,
                 const float* rate_hi, const float* rate_lo, const int32_t* n,
                 const uint32_t* words, Count* out) {
  Groups gr(s.groups);
  for (int64_t g = 0; g < s.groups; ++g) {
    const Halves hi = Split(rate_hi[g]), lo = Split(rate_lo[g]);
    gr.power[g] = power[g];
    gr.rate_hi_hi[g] = hi.hi;
    gr.rate_hi_lo[g] = hi.lo;
    gr.rate_lo_hi[g] = lo.hi;
    gr.rate_lo_lo[g] = lo.lo;
    gr.word0[g] = words[2 * g];
    gr.word1[g] = words[2 * g + 1];
  }
  // Per group: the hits below T at the group's end.
  std::vector<int32_t> below_end(s.groups);
  if (s.groups_first) {
    CountsRows<kSampler, Count>(s, v, gr, n, below_end.data(), out);
  } else {
    CountsLanes<kSampler, Count>(s, v, gr, n, below_end.data(), out);
  }
  // The last non-zero value receives what the capped G leaves missing to N
  // (what an exact T_n == N would give it).
  for (int64_t g = 0; g < s.groups; ++g) {
    const int64_t at = LastNonZero(s, v, power[g], g);
    if (at < 0) continue;
    const int32_t deficit = n[g] - below_end[g];
    out[at] = static_cast<Count>(out[at] + (v[at] < 0.0f ? -deficit : deficit));
  }
}

// Parts of a call smaller than this many values are not worth a thread.
constexpr int64_t kValuesPerPart = int64_t{1} << 16;

// Every block of the call, each cut into slabs of groups (the parts that
// run in parallel; groups are independent, so the counts do not depend on
// the cut).
template <int32_t kSampler, typename Count>
void Counts(const Shape& s, const float* v, const float* power,
            const float* rate_hi, const float* rate_lo, const int32_t* n,
            const uint32_t* words, Count* out, ffi::ThreadPool* pool) {
  const int64_t block = s.groups * s.length;
  const int64_t threads = pool == nullptr ? 1 : pool->num_threads() + 1;
  const int64_t parts =
      std::max<int64_t>(1, std::min(threads, s.batch * block / kValuesPerPart));
  const int64_t slabs =
      std::min(s.groups, std::max<int64_t>(1, (parts + s.batch - 1) / s.batch));
  ParallelFor(pool, s.batch * slabs, [&](int64_t i) {
    const int64_t b = i / slabs, j = i % slabs;
    const int64_t g0 = j * s.groups / slabs, g1 = (j + 1) * s.groups / slabs;
    Shape part = s;
    part.batch = 1;
    part.groups = g1 - g0;
    const int64_t first = b * s.groups + g0;  // of the per-group operands
    const int64_t offset = b * block + (s.groups_first ? g0 * s.length : g0);
    CountsBlock<kSampler, Count>(part, v + offset, power + first,
                                 rate_hi + first, rate_lo + first, n + first,
                                 words + 2 * first, out + offset);
  });
}

template <typename Count>
ffi::Error CountsOfType(int32_t sampler, const Shape& s, const float* v,
                        const float* power, const float* rate_hi,
                        const float* rate_lo, const int32_t* n,
                        const uint32_t* words, Count* out,
                        ffi::ThreadPool* pool) {
  switch (sampler) {
    case kSystematic:
      Counts<kSystematic>(s, v, power, rate_hi, rate_lo, n, words, out, pool);
      break;
    case kStratified:
      Counts<kStratified>(s, v, power, rate_hi, rate_lo, n, words, out, pool);
      break;
    case kDeterministic:
      Counts<kDeterministic>(s, v, power, rate_hi, rate_lo, n, words, out, pool);
      break;
    default:
      return ffi::Error::InvalidArgument("unknown sampler " +
                                         std::to_string(sampler));
  }
  return ffi::Error::Success();
}

ffi::Error CountsImpl(ffi::ThreadPool pool, int32_t sampler, bool groups_first,
                      ffi::Buffer<ffi::F32> values,
                      ffi::Buffer<ffi::F32> power,
                      ffi::Buffer<ffi::F32> rate_hi,
                      ffi::Buffer<ffi::F32> rate_lo,
                      ffi::Buffer<ffi::S32> n, ffi::Buffer<ffi::U32> words,
                      ffi::Result<ffi::AnyBuffer> counts) {
  Shape s;
  auto error = ShapeOf(values.dimensions(), groups_first, &s);
  if (error.failure()) return error;
  for (auto check : {CheckGroups("power", power.element_count(), s, 1),
                     CheckGroups("rate_hi", rate_hi.element_count(), s, 1),
                     CheckGroups("rate_lo", rate_lo.element_count(), s, 1),
                     CheckGroups("n", n.element_count(), s, 1),
                     CheckGroups("words", words.element_count(), s, 2)}) {
    if (check.failure()) return check;
  }
  if (counts->element_count() != values.element_count()) {
    return ffi::Error::InvalidArgument("counts must have the values' shape");
  }
  FlushDenormals flush;
  const float* v = values.typed_data();
  const float* p = power.typed_data();
  const float* rh = rate_hi.typed_data();
  const float* rl = rate_lo.typed_data();
  const int32_t* np = n.typed_data();
  const uint32_t* w = words.typed_data();
  void* out = counts->untyped_data();
  switch (counts->element_type()) {
    case ffi::DataType::S8:
      return CountsOfType(sampler, s, v, p, rh, rl, np, w,
                          static_cast<int8_t*>(out), &pool);
    case ffi::DataType::S16:
      return CountsOfType(sampler, s, v, p, rh, rl, np, w,
                          static_cast<int16_t*>(out), &pool);
    case ffi::DataType::S32:
      return CountsOfType(sampler, s, v, p, rh, rl, np, w,
                          static_cast<int32_t*>(out), &pool);
    case ffi::DataType::S64:
      return CountsOfType(sampler, s, v, p, rh, rl, np, w,
                          static_cast<int64_t*>(out), &pool);
    default:
      return ffi::Error::InvalidArgument(
          "counts must be int8, int16, int32 or int64");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(McqMass, MassImpl,
                              ffi::Ffi::Bind()
                                  .Attr<bool>("groups_first")
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(McqCounts, CountsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<int32_t>("sampler")
                                  .Attr<bool>("groups_first")
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::AnyBuffer>());
