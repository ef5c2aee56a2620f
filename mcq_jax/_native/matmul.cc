// The exact int8 matrix product of mcq_jax's integer layers (see
// mcq_jax/_int8_matmul.py, which calls it, and mcq_jax/_native/__init__.py,
// which builds and registers it).
//
//   mcq_int8_matmul: a (M, K) int8 or int16, w (K, N) int8
//                    -> a . w (M, N) int32.
//
// Why a kernel of our own: XLA:CPU runs an int8 x int8 -> int32 product only
// 1.2-1.3x faster than the float32 one, and a single row (a batch of one)
// ~2x slower, while AVX512-VNNI multiplies 64 byte pairs per instruction,
// four times the float32 rate.
//
// VPDPBUSD multiplies unsigned bytes by signed bytes. The activations stay
// signed (the broadcast operand), and the weights are stored as unsigned
// w + 128 (w ^ 0x80) when a panel is packed, so that
//   sum_k a[m,k] * w[k,n] = sum_k a[m,k] * (w[k,n] + 128) - 128 * sum_k a[m,k].
// Each byte product fits the instruction's 16-bit intermediate (|a| <= 128,
// w + 128 <= 255), and every sum is an int32 sum that wraps: the result is
// the exact product modulo 2**32, which is the product itself wherever it
// fits int32 (the caller checks that bound before it calls).
//
// Without AVX512-VNNI the handler is built but reports an error: the Python
// side asks McqInt8MatmulAvailable() and keeps XLA's product there.

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>

#include "common.h"
#include "gemm.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if MCQ_JAX_VNNI

using mcq_jax::kPanel;
using mcq_jax::kTileRows;
using mcq_jax::PackPanel;
using mcq_jax::Rows;

// Products smaller than this many multiply-adds run on the calling thread.
constexpr int64_t kMacsPerPart = int64_t{1} << 21;

void Matmul(const int8_t* a, const int8_t* w, int64_t m, int64_t k,
            int64_t n, int32_t* out, ffi::ThreadPool* pool) {
  std::unique_ptr<int32_t[]> row_sums(new int32_t[m]);
  mcq_jax::RowSums(a, m, k, row_sums.get());
  const int64_t panels = (n + kPanel - 1) / kPanel;
  const int64_t quads = (k + 3) / 4;
  const int64_t threads = pool == nullptr ? 1 : pool->num_threads() + 1;
  const int64_t parts = std::max<int64_t>(
      1, std::min(threads, m * k * n / kMacsPerPart));
  // Each part packs its own panel: row chunks only where the panels are
  // fewer than the parts.
  const int64_t tiles = (m + kTileRows - 1) / kTileRows;
  const int64_t chunks =
      std::min(tiles, std::max<int64_t>(1, (parts + panels - 1) / panels));
  // A small product runs on the calling thread alone: handing panels to
  // the pool costs more than it saves (and waits on busy threads).
  mcq_jax::ParallelFor(parts > 1 ? pool : nullptr, panels * chunks,
                       [&](int64_t i) {
    const int64_t p = i / chunks, c = i % chunks;
    const int64_t m0 = std::min(m, c * tiles / chunks * kTileRows);
    const int64_t m1 = std::min(m, (c + 1) * tiles / chunks * kTileRows);
    std::unique_ptr<__m512i[]> panel(new __m512i[4 * quads]);
    PackPanel(w, k, n, p * kPanel, panel.get());
    Rows(a, k, panel.get(), m0, m1, row_sums.get(), n, p * kPanel, out);
  });
}

// int16 activations: each is two signed base-256 digits, a = 256 h + l with
// l = (int8) a (its low byte, read as signed) and h = (a - l) / 256, both
// int8 unless h = 128 (a in [32640, 32767]). The product is l . w for every
// row plus 256 (h . w) for the rows with a non-zero h (sampled activations
// above 127 are rare), both int32 sums that wrap: exact modulo 2**32. A row
// with an h of 128 is summed directly.
void MatmulInt16(const int16_t* a, const int8_t* w, int64_t m, int64_t k,
                 int64_t n, int32_t* out, ffi::ThreadPool* pool) {
  std::unique_ptr<int8_t[]> low(new int8_t[m * k]);
  std::unique_ptr<bool[]> any_high(new bool[m]), direct(new bool[m]);
  int64_t high_rows = 0;
  for (int64_t i = 0; i < m; ++i) {
    bool any = false, wide = false;
    mcq_jax::Digits(a + i * k, k, low.get() + i * k, nullptr, &any, &wide);
    direct[i] = wide;
    any_high[i] = any && !wide;
    high_rows += any_high[i];
  }
  Matmul(low.get(), w, m, k, n, out, pool);
  if (high_rows > 0) {  // the rows with a count above 127
    std::unique_ptr<int8_t[]> high(new int8_t[high_rows * k]);
    std::unique_ptr<int64_t[]> row_of(new int64_t[high_rows]);
    for (int64_t i = 0, r = 0; i < m; ++i) {
      if (!any_high[i]) continue;
      bool any = false, wide = false;
      mcq_jax::Digits(a + i * k, k, low.get(), high.get() + r * k, &any,
                      &wide);
      row_of[r++] = i;
    }
    std::unique_ptr<int32_t[]> upper(new int32_t[high_rows * n]);
    Matmul(high.get(), w, high_rows, k, n, upper.get(), pool);
    for (int64_t r = 0; r < high_rows; ++r) {
      uint32_t* dst = reinterpret_cast<uint32_t*>(out + row_of[r] * n);
      const uint32_t* add =
          reinterpret_cast<const uint32_t*>(upper.get()) + r * n;
      for (int64_t c = 0; c < n; ++c) dst[c] += add[c] << 8;
    }
  }
  for (int64_t i = 0; i < m; ++i) {
    if (direct[i]) mcq_jax::DirectRow(a + i * k, k, w, n, out + i * n);
  }
}

#endif  // MCQ_JAX_VNNI

ffi::Error Int8MatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer a,
                          ffi::Buffer<ffi::S8> w,
                          ffi::Result<ffi::Buffer<ffi::S32>> out) {
  const auto ad = a.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (ad.size() != 2 || wd.size() != 2 || od.size() != 2) {
    return ffi::Error::InvalidArgument(
        "int8 matmul: a, w and the result must be matrices");
  }
  if (ad[1] != wd[0] || od[0] != ad[0] || od[1] != wd[1]) {
    return ffi::Error::InvalidArgument(
        "int8 matmul: shapes (" + std::to_string(ad[0]) + ", " +
        std::to_string(ad[1]) + ") . (" + std::to_string(wd[0]) + ", " +
        std::to_string(wd[1]) + ") -> (" + std::to_string(od[0]) + ", " +
        std::to_string(od[1]) + ") do not match");
  }
#if MCQ_JAX_VNNI
  switch (a.element_type()) {
    case ffi::DataType::S8:
      Matmul(static_cast<const int8_t*>(a.untyped_data()), w.typed_data(),
             ad[0], ad[1], wd[1], out->typed_data(), &pool);
      return ffi::Error::Success();
    case ffi::DataType::S16:
      MatmulInt16(static_cast<const int16_t*>(a.untyped_data()),
                  w.typed_data(), ad[0], ad[1], wd[1], out->typed_data(),
                  &pool);
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument(
          "int8 matmul: a must be int8 or int16");
  }
#else
  return ffi::Error::Internal(
      "int8 matmul: this library was built without AVX512-VNNI");
#endif
}

}  // namespace

extern "C" int McqInt8MatmulAvailable() { return MCQ_JAX_VNNI; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(McqInt8Matmul, Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
