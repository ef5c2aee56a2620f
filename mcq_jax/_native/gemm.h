// The blocks of mcq_jax's exact int8 products (matmul.cc, conv.cc): weight
// panels packed for AVX512-VNNI, and tiles of rows multiplied against them.
// See matmul.cc for the arithmetic and why it is exact.

#ifndef MCQ_JAX_NATIVE_GEMM_H_
#define MCQ_JAX_NATIVE_GEMM_H_

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#include <immintrin.h>
#define MCQ_JAX_VNNI 1
#else
#define MCQ_JAX_VNNI 0
#endif

#if MCQ_JAX_VNNI

namespace mcq_jax {

constexpr int64_t kPanel = 64;     // columns of a panel: 4 vectors of 16
constexpr int kTileRows = 6;       // 24 accumulators, 4 panel vectors

// Packs columns [c0, c0 + 64) of w (K x N, row-major; zeros past N and K)
// into `panel`: for each quad q of rows 4q..4q+3, 4 vectors, vector i holding
// columns c0 + 16i .. c0 + 16i + 15, each int32 lane the 4 bytes of its
// column's rows 4q..4q+3 (byte p: row 4q + p), stored as w ^ 0x80.
inline void PackPanel(const int8_t* w, int64_t k, int64_t n, int64_t c0,
               __m512i* panel) {
  const int64_t cols = std::min(kPanel, n - c0);
  const __mmask64 mask =
      cols == kPanel ? ~__mmask64{0} : (__mmask64{1} << cols) - 1;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t quads = (k + 3) / 4;
  for (int64_t q = 0; q < quads; ++q) {
    __m512i r[4];
    for (int p = 0; p < 4; ++p) {
      const int64_t row = 4 * q + p;
      r[p] = row < k ? _mm512_maskz_loadu_epi8(mask, w + row * n + c0)
                     : _mm512_setzero_si512();
    }
    // Within each 128-bit lane L (columns 16L..16L+15): bytes, then words,
    // interleaved, so that u_i's lane L holds columns 16L + 4i .. + 3.
    const __m512i t0 = _mm512_unpacklo_epi8(r[0], r[1]);
    const __m512i t1 = _mm512_unpacklo_epi8(r[2], r[3]);
    const __m512i t2 = _mm512_unpackhi_epi8(r[0], r[1]);
    const __m512i t3 = _mm512_unpackhi_epi8(r[2], r[3]);
    const __m512i u0 = _mm512_unpacklo_epi16(t0, t1);
    const __m512i u1 = _mm512_unpackhi_epi16(t0, t1);
    const __m512i u2 = _mm512_unpacklo_epi16(t2, t3);
    const __m512i u3 = _mm512_unpackhi_epi16(t2, t3);
    // The 4x4 transpose of 128-bit lanes: vector i's lane L is u_L's lane
    // i, columns 16i + 4L .. + 3: vector i holds columns 16i .. 16i + 15.
    const __m512i x0 = _mm512_shuffle_i32x4(u0, u1, 0x44);
    const __m512i x1 = _mm512_shuffle_i32x4(u2, u3, 0x44);
    const __m512i x2 = _mm512_shuffle_i32x4(u0, u1, 0xEE);
    const __m512i x3 = _mm512_shuffle_i32x4(u2, u3, 0xEE);
    __m512i* out = panel + 4 * q;
    out[0] = _mm512_xor_si512(_mm512_shuffle_i32x4(x0, x1, 0x88), flip);
    out[1] = _mm512_xor_si512(_mm512_shuffle_i32x4(x0, x1, 0xDD), flip);
    out[2] = _mm512_xor_si512(_mm512_shuffle_i32x4(x2, x3, 0x88), flip);
    out[3] = _mm512_xor_si512(_mm512_shuffle_i32x4(x2, x3, 0xDD), flip);
  }
}

// The 4 bytes a[4q .. 4q + 3] of a row as one int32 (zeros past K: the last
// quad of a row whose length is not a multiple of 4 is never read past it).
inline int32_t Quad(const int8_t* row, int64_t q, int64_t k) {
  int32_t word = 0;
  const int64_t start = 4 * q;
  std::memcpy(&word, row + start, static_cast<size_t>(std::min<int64_t>(
                                       4, k - start)));
  return word;
}

// One row's 4 accumulators against the panel's 4 vectors of a quad (named
// registers: gcc spills an array of 24 vector accumulators to the stack).
#define MCQ_JAX_ROW(r)                                         \
  if constexpr (R > r) {                                       \
    int32_t word;                                              \
    std::memcpy(&word, p##r + 4 * q, 4);                       \
    const __m512i x = _mm512_set1_epi32(word);                 \
    c##r##0 = _mm512_dpbusd_epi32(c##r##0, b0, x);             \
    c##r##1 = _mm512_dpbusd_epi32(c##r##1, b1, x);             \
    c##r##2 = _mm512_dpbusd_epi32(c##r##2, b2, x);             \
    c##r##3 = _mm512_dpbusd_epi32(c##r##3, b3, x);             \
  }

// Rows [m0, m0 + R) of the product with one packed panel (columns
// [c0, c0 + 64)), written to out; `row_sums` holds sum_k a[m, k].
template <int R>
void Tile(const int8_t* a, int64_t k, const __m512i* panel, int64_t m0,
          const int32_t* row_sums, int64_t n, int64_t c0, int32_t* out) {
  static_assert(R >= 1 && R <= 6, "1 to 6 rows");
  const __m512i zero = _mm512_setzero_si512();
  __m512i c00 = zero, c01 = zero, c02 = zero, c03 = zero;
  __m512i c10 = zero, c11 = zero, c12 = zero, c13 = zero;
  __m512i c20 = zero, c21 = zero, c22 = zero, c23 = zero;
  __m512i c30 = zero, c31 = zero, c32 = zero, c33 = zero;
  __m512i c40 = zero, c41 = zero, c42 = zero, c43 = zero;
  __m512i c50 = zero, c51 = zero, c52 = zero, c53 = zero;
  const int8_t* p0 = a + m0 * k;
  const int8_t* p1 = p0 + (R > 1 ? k : 0);
  const int8_t* p2 = p0 + (R > 2 ? 2 * k : 0);
  const int8_t* p3 = p0 + (R > 3 ? 3 * k : 0);
  const int8_t* p4 = p0 + (R > 4 ? 4 * k : 0);
  const int8_t* p5 = p0 + (R > 5 ? 5 * k : 0);
  const int64_t full = k / 4;  // quads read as whole words
  for (int64_t q = 0; q < full; ++q) {
    const __m512i* b = panel + 4 * q;
    const __m512i b0 = b[0], b1 = b[1], b2 = b[2], b3 = b[3];
    MCQ_JAX_ROW(0) MCQ_JAX_ROW(1) MCQ_JAX_ROW(2)
    MCQ_JAX_ROW(3) MCQ_JAX_ROW(4) MCQ_JAX_ROW(5)
  }
  __m512i acc[6][4] = {{c00, c01, c02, c03}, {c10, c11, c12, c13},
                       {c20, c21, c22, c23}, {c30, c31, c32, c33},
                       {c40, c41, c42, c43}, {c50, c51, c52, c53}};
  const int8_t* rows[6] = {p0, p1, p2, p3, p4, p5};
  if (full * 4 < k) {  // the last, partial quad
    const __m512i* b = panel + 4 * full;
    for (int r = 0; r < R; ++r) {
      const __m512i x = _mm512_set1_epi32(Quad(rows[r], full, k));
      for (int i = 0; i < 4; ++i) {
        acc[r][i] = _mm512_dpbusd_epi32(acc[r][i], b[i], x);
      }
    }
  }
  const int64_t cols = std::min(kPanel, n - c0);
  for (int r = 0; r < R; ++r) {
    // 128 * sum_k a: what the +128 of the packed weights added (wrapping).
    const __m512i bias = _mm512_set1_epi32(static_cast<int32_t>(
        static_cast<uint32_t>(row_sums[m0 + r]) << 7));
    int32_t* dst = out + (m0 + r) * n + c0;
    for (int i = 0; i < 4; ++i) {
      const int64_t left = cols - 16 * i;
      if (left <= 0) break;
      const __mmask16 mask =
          left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      _mm512_mask_storeu_epi32(dst + 16 * i, mask,
                               _mm512_sub_epi32(acc[r][i], bias));
    }
  }
}

#undef MCQ_JAX_ROW

// sum_k of each row (wrapping int32), 64 bytes at a time.
inline void RowSums(const int8_t* rows, int64_t count, int64_t k, int32_t* sums) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t i = 0; i < count; ++i) {
    __m512i total = _mm512_setzero_si512();
    for (int64_t j = 0; j < k; j += 64) {
      const int64_t left = k - j;
      const __mmask64 mask =
          left >= 64 ? ~__mmask64{0} : (__mmask64{1} << left) - 1;
      total = _mm512_dpbusd_epi32(
          total, ones, _mm512_maskz_loadu_epi8(mask, rows + i * k + j));
    }
    sums[i] = _mm512_reduce_add_epi32(total);
  }
}

// One row of the product summed directly, in wrapping int32 (for int16
// values whose high digit does not fit int8: rare, and never fast).
inline void DirectRow(const int16_t* row, int64_t k, const int8_t* w,
                      int64_t n, int32_t* out) {
  uint32_t* dst = reinterpret_cast<uint32_t*>(out);
  for (int64_t c = 0; c < n; ++c) dst[c] = 0;
  for (int64_t j = 0; j < k; ++j) {
    const uint32_t value = static_cast<uint32_t>(int32_t{row[j]});
    const int8_t* wrow = w + j * n;
    for (int64_t c = 0; c < n; ++c) {
      dst[c] += value * static_cast<uint32_t>(int32_t{wrow[c]});
    }
  }
}

// Splits `count` int16 values into signed base-256 digits, a = 256 h + l:
// l = (int8) a, its low byte read as signed, into `low`; h = (a - l) / 256
// into `high` if given. Sets *any if some h is not zero, *wide if some h is
// 128 (a in [32640, 32767], where h does not fit int8). 32 values a step.
inline void Digits(const int16_t* a, int64_t count, int8_t* low,
                   int8_t* high, bool* any, bool* wide) {
  __m512i ors = _mm512_setzero_si512();
  __mmask32 wides = 0;
  // h = 128 wraps to -128 in 16 bits (a - l = 32768): told apart from a true
  // -128 by the sign of a
  const __m512i wrapped = _mm512_set1_epi16(-128);
  const __m512i minus_one = _mm512_set1_epi16(-1);
  for (int64_t j = 0; j < count; j += 32) {
    const int64_t left = count - j;
    const __mmask32 mask =
        left >= 32 ? ~__mmask32{0} : (__mmask32{1} << left) - 1;
    const __m512i v = _mm512_maskz_loadu_epi16(mask, a + j);
    const __m256i l = _mm512_cvtepi16_epi8(v);  // truncates: the low byte
    const __m512i h =
        _mm512_srai_epi16(_mm512_sub_epi16(v, _mm512_cvtepi8_epi16(l)), 8);
    _mm256_mask_storeu_epi8(low + j, mask, l);
    if (high != nullptr) {
      _mm256_mask_storeu_epi8(high + j, mask, _mm512_cvtepi16_epi8(h));
    }
    ors = _mm512_or_si512(ors, h);
    wides |= _mm512_mask_cmpeq_epi16_mask(
        _mm512_cmpgt_epi16_mask(v, minus_one), h, wrapped);
  }
  *any = _mm512_test_epi16_mask(ors, ors) != 0;
  *wide = wides != 0;
}

// Rows [m0, m0 + R) against the first 16 columns of a panel (a panel of at
// most 16 columns: a conv with few outputs), one accumulator per row.
template <int R>
void NarrowTile(const int8_t* a, int64_t k, const __m512i* panel, int64_t m0,
                const int32_t* row_sums, int64_t n, int64_t c0,
                int32_t* out) {
  __m512i acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_si512();
  const int64_t full = k / 4;
  const int8_t* base = a + m0 * k;
  for (int64_t q = 0; q < full; ++q) {
    const __m512i b0 = panel[4 * q];
    for (int r = 0; r < R; ++r) {
      int32_t word;
      std::memcpy(&word, base + r * k + 4 * q, 4);
      acc[r] = _mm512_dpbusd_epi32(acc[r], b0, _mm512_set1_epi32(word));
    }
  }
  if (full * 4 < k) {
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm512_dpbusd_epi32(acc[r], panel[4 * full],
                                   _mm512_set1_epi32(Quad(base + r * k, full, k)));
    }
  }
  const int64_t cols = std::min<int64_t>(16, n - c0);
  const __mmask16 mask = __mmask16((1u << cols) - 1);
  for (int r = 0; r < R; ++r) {
    const __m512i bias = _mm512_set1_epi32(static_cast<int32_t>(
        static_cast<uint32_t>(row_sums[m0 + r]) << 7));
    _mm512_mask_storeu_epi32(out + (m0 + r) * n + c0, mask,
                             _mm512_sub_epi32(acc[r], bias));
  }
}

constexpr int kNarrowRows = 12;

template <int R>
void NarrowRest(const int8_t* a, int64_t k, const __m512i* panel, int64_t m,
                int64_t left, const int32_t* row_sums, int64_t n, int64_t c0,
                int32_t* out) {
  if constexpr (R > 0) {
    if (left == R) {
      NarrowTile<R>(a, k, panel, m, row_sums, n, c0, out);
    } else {
      NarrowRest<R - 1>(a, k, panel, m, left, row_sums, n, c0, out);
    }
  }
}

inline void Rows(const int8_t* a, int64_t k, const __m512i* panel, int64_t m0,
          int64_t m1, const int32_t* row_sums, int64_t n, int64_t c0,
          int32_t* out) {
  int64_t m = m0;
  if (n - c0 <= 16) {  // one vector of columns: taller tiles
    for (; m + kNarrowRows <= m1; m += kNarrowRows) {
      NarrowTile<kNarrowRows>(a, k, panel, m, row_sums, n, c0, out);
    }
    NarrowRest<kNarrowRows - 1>(a, k, panel, m, m1 - m, row_sums, n, c0, out);
    return;
  }
  for (; m + kTileRows <= m1; m += kTileRows) {
    Tile<kTileRows>(a, k, panel, m, row_sums, n, c0, out);
  }
  switch (m1 - m) {
    case 5: Tile<5>(a, k, panel, m, row_sums, n, c0, out); break;
    case 4: Tile<4>(a, k, panel, m, row_sums, n, c0, out); break;
    case 3: Tile<3>(a, k, panel, m, row_sums, n, c0, out); break;
    case 2: Tile<2>(a, k, panel, m, row_sums, n, c0, out); break;
    case 1: Tile<1>(a, k, panel, m, row_sums, n, c0, out); break;
    default: break;
  }
}

}  // namespace mcq_jax

#endif  // MCQ_JAX_VNNI
#endif  // MCQ_JAX_NATIVE_GEMM_H_
