// The exact int8 convolution of mcq_jax's integer conv layers (see
// mcq_jax/_int8_conv.py, which calls it).
//
//   mcq_int8_conv: a (B, H, W, C) int8 or int16, w (KH, KW, C, O) int8
//                  -> (B, OH, OW, O) int32, the 2-D convolution with the
//                  given strides, top/left padding (the output's size sets
//                  the rest) and kernel dilation.
//
// Why a kernel of our own: XLA:CPU's convolutions of small channel counts
// are slow in float32 (a LeNet's first layer, 1 -> 6 channels, 5x5, on
// 256x28x28: ~10 ms) and int8 is no remedy (its second layer, 6 -> 16: 20
// ms in int8 against 5 in float32). Here each chunk of output pixels
// gathers its patches (im2col, in the cache) and multiplies them with the
// packed kernel by AVX512-VNNI, as matmul.cc does: the same exact int32
// sums, wrapping modulo 2**32.
//
// int16 activations are split into two int8 digits first, as in matmul.cc:
// a = 256 h + l; every patch runs on l, and the patches that hold a pixel
// with a non-zero h take a second product on h. A call holding an h of 128
// (a count in [32640, 32767]) is summed directly.

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "common.h"
#include "gemm.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Geometry {
  int64_t batch, height, width, channels;    // input
  int64_t kh, kw, outputs;                   // kernel
  int64_t out_h, out_w;                      // output
  int64_t stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w;
  int64_t depth() const { return kh * kw * channels; }
  int64_t rows() const { return batch * out_h * out_w; }
};

#if MCQ_JAX_VNNI

// The input pixel of output pixel (oy, ox) under tap (ky, kx), or -1 where
// the tap falls in the padding.
inline int64_t Pixel(const Geometry& g, int64_t b, int64_t oy, int64_t ox,
                     int64_t ky, int64_t kx) {
  const int64_t iy = oy * g.stride_h - g.pad_top + ky * g.dilation_h;
  const int64_t ix = ox * g.stride_w - g.pad_left + kx * g.dilation_w;
  if (iy < 0 || iy >= g.height || ix < 0 || ix >= g.width) return -1;
  return (b * g.height + iy) * g.width + ix;
}

// Writes row `row` of the patch matrix (its K = kh * kw * channels values,
// in the kernel's HWI order) from `source` (one int8 digit of the input);
// returns whether one of its pixels is marked in `marked` (if given).
template <typename T>
bool Patch(const Geometry& g, const T* source, const bool* marked,
           int64_t row, T* dst) {
  const int64_t ox = row % g.out_w;
  const int64_t oy = (row / g.out_w) % g.out_h;
  const int64_t b = row / (g.out_w * g.out_h);
  bool any = false;
  const int64_t run = g.kw * g.channels;  // one kernel row's taps
  const int64_t ix0 = ox * g.stride_w - g.pad_left;
  const bool inside_w =
      g.dilation_w == 1 && ix0 >= 0 && ix0 + g.kw <= g.width;
  for (int64_t ky = 0; ky < g.kh; ++ky) {
    T* row_dst = dst + ky * run;
    const int64_t iy = oy * g.stride_h - g.pad_top + ky * g.dilation_h;
    if (iy < 0 || iy >= g.height) {
      std::memset(row_dst, 0, sizeof(T) * run);
      continue;
    }
    if (inside_w) {  // the row's taps are contiguous in the input: one copy
      const int64_t pixel = (b * g.height + iy) * g.width + ix0;
      std::memcpy(row_dst, source + pixel * g.channels, sizeof(T) * run);
      if (marked != nullptr) {
        for (int64_t kx = 0; kx < g.kw; ++kx) any |= marked[pixel + kx];
      }
      continue;
    }
    for (int64_t kx = 0; kx < g.kw; ++kx) {
      T* to = row_dst + kx * g.channels;
      const int64_t pixel = Pixel(g, b, oy, ox, ky, kx);
      if (pixel < 0) {
        std::memset(to, 0, sizeof(T) * g.channels);
      } else {
        std::memcpy(to, source + pixel * g.channels, sizeof(T) * g.channels);
        any |= marked != nullptr && marked[pixel];
      }
    }
  }
  return any;
}

// The product summed directly, for any int16 input (the rare call with a
// high digit of 128).
void Direct(const Geometry& g, const int16_t* a, const int8_t* w,
            int32_t* out) {
  const int64_t k = g.depth();
  std::vector<int16_t> patch(k);
  for (int64_t row = 0; row < g.rows(); ++row) {
    Patch<int16_t>(g, a, nullptr, row, patch.data());
    mcq_jax::DirectRow(patch.data(), k, w, g.outputs, out + row * g.outputs);
  }
}

using mcq_jax::kPanel;
using mcq_jax::kTileRows;

// Output pixels per part: 16 tiles, whose patches stay in the cache.
constexpr int64_t kChunkRows = 16 * kTileRows;
constexpr int64_t kMacsPerPart = int64_t{1} << 21;

// The patch buffers' slack: a copy below may write up to 7 bytes past its
// run, which the next run (or the next row, or this slack) overwrites.
constexpr int64_t kSlack = 8;

// Copies `count` int8 values 8 at a time (runs are short: a LeNet's first
// layer copies 5 bytes per kernel row); where 8-byte reads would pass
// `end`, the end of the source, byte by byte.
inline void Copy(const int8_t* src, int8_t* dst, int64_t count,
                 const int8_t* end) {
  if (end - src >= ((count + 7) & ~int64_t{7})) {
    for (int64_t j = 0; j < count; j += 8) {
      uint64_t word;
      std::memcpy(&word, src + j, 8);
      std::memcpy(dst + j, &word, 8);
    }
  } else {
    std::memcpy(dst, src, count);
  }
}

inline void Zero(int8_t* dst, int64_t count) {
  const uint64_t zero = 0;
  for (int64_t j = 0; j < count; j += 8) std::memcpy(dst + j, &zero, 8);
}

// Patch() of an int8 source into a row of `stride` bytes (the depth rounded
// up to whole quads, zeros after it), written in 8-byte words: the buffer
// has kSlack bytes past its last row.
bool PatchInt8(const Geometry& g, const int8_t* source, const bool* marked,
               int64_t b, int64_t oy, int64_t ox, int64_t stride,
               int8_t* dst) {
  const int8_t* end = source + g.batch * g.height * g.width * g.channels;
  const int64_t run = g.kw * g.channels;
  const int64_t ix0 = ox * g.stride_w - g.pad_left;
  const bool inside_w =
      g.dilation_w == 1 && ix0 >= 0 && ix0 + g.kw <= g.width;
  bool any = false;
  for (int64_t ky = 0; ky < g.kh; ++ky) {
    int8_t* row_dst = dst + ky * run;
    const int64_t iy = oy * g.stride_h - g.pad_top + ky * g.dilation_h;
    if (iy < 0 || iy >= g.height) {
      Zero(row_dst, run);
      continue;
    }
    const int64_t base = (b * g.height + iy) * g.width;
    if (inside_w) {
      Copy(source + (base + ix0) * g.channels, row_dst, run, end);
      if (marked != nullptr) {
        for (int64_t kx = 0; kx < g.kw; ++kx) any |= marked[base + ix0 + kx];
      }
      continue;
    }
    for (int64_t kx = 0; kx < g.kw; ++kx) {
      int8_t* to = row_dst + kx * g.channels;
      const int64_t ix = ix0 + kx * g.dilation_w;
      if (ix < 0 || ix >= g.width) {
        Zero(to, g.channels);
      } else {
        Copy(source + (base + ix) * g.channels, to, g.channels, end);
        any |= marked != nullptr && marked[base + ix];
      }
    }
  }
  for (int64_t j = g.depth(); j < stride; ++j) dst[j] = 0;
  return any;
}

// `low` (and `high`, `marked`: the second digit, and the pixels where it is
// not zero; null for an int8 input) -> out.
void Conv(const Geometry& g, const int8_t* low, const int8_t* high,
          const bool* marked, const int8_t* w, int32_t* out,
          ffi::ThreadPool* pool) {
  const int64_t k = g.depth(), n = g.outputs, m = g.rows();
  const int64_t quads = (k + 3) / 4;
  const int64_t panels = (n + kPanel - 1) / kPanel;
  std::unique_ptr<__m512i[]> packed(new __m512i[panels * 4 * quads]);
  for (int64_t p = 0; p < panels; ++p) {
    mcq_jax::PackPanel(w, k, n, p * kPanel, packed.get() + p * 4 * quads);
  }
  // Patch rows padded to whole quads (the packed kernel's rows past the
  // depth are zeros), so that a tile never reads a partial quad.
  const int64_t stride = 4 * quads;
  const int64_t chunks = (m + kChunkRows - 1) / kChunkRows;
  const bool parallel = m * k * n >= kMacsPerPart && chunks > 1;
  mcq_jax::ParallelFor(parallel ? pool : nullptr, chunks, [&](int64_t c) {
    const int64_t r0 = c * kChunkRows, rows = std::min(kChunkRows, m - r0);
    std::unique_ptr<int8_t[]> patches(new int8_t[rows * stride + kSlack]);
    std::unique_ptr<int32_t[]> sums(new int32_t[rows]);
    std::vector<int64_t> high_rows;
    // the output pixel of row r0, then stepped (no division per row)
    int64_t ox = r0 % g.out_w, oy = (r0 / g.out_w) % g.out_h;
    int64_t b = r0 / (g.out_w * g.out_h);
    for (int64_t i = 0; i < rows; ++i) {
      if (PatchInt8(g, low, marked, b, oy, ox, stride,
                    patches.get() + i * stride)) {
        high_rows.push_back(i);
      }
      if (++ox == g.out_w) {
        ox = 0;
        if (++oy == g.out_h) oy = 0, ++b;
      }
    }
    mcq_jax::RowSums(patches.get(), rows, stride, sums.get());
    int32_t* dst = out + r0 * n;
    for (int64_t p = 0; p < panels; ++p) {
      mcq_jax::Rows(patches.get(), stride, packed.get() + p * 4 * quads, 0,
                    rows, sums.get(), n, p * kPanel, dst);
    }
    if (high_rows.empty()) return;
    const int64_t count = static_cast<int64_t>(high_rows.size());
    for (int64_t i = 0; i < count; ++i) {  // reuses the low patches' buffer
      const int64_t row = r0 + high_rows[i];
      PatchInt8(g, high, nullptr, row / (g.out_w * g.out_h),
                (row / g.out_w) % g.out_h, row % g.out_w, stride,
                patches.get() + i * stride);
    }
    mcq_jax::RowSums(patches.get(), count, stride, sums.get());
    std::unique_ptr<int32_t[]> upper(new int32_t[count * n]);
    for (int64_t p = 0; p < panels; ++p) {
      mcq_jax::Rows(patches.get(), stride, packed.get() + p * 4 * quads, 0,
                    count, sums.get(), n, p * kPanel, upper.get());
    }
    for (int64_t i = 0; i < count; ++i) {
      uint32_t* to = reinterpret_cast<uint32_t*>(dst + high_rows[i] * n);
      const uint32_t* add = reinterpret_cast<const uint32_t*>(upper.get());
      for (int64_t o = 0; o < n; ++o) to[o] += add[i * n + o] << 8;
    }
  });
}

// Splits int16 values into two int8 digits (see the top of the file), and
// marks the pixels with a non-zero high digit; returns false if some high
// digit is 128.
bool Digits(const int16_t* a, int64_t pixels, int64_t channels, int8_t* low,
            int8_t* high, bool* marked) {
  bool wide = false;
  for (int64_t p = 0; p < pixels; ++p) {
    bool any = false, w = false;
    mcq_jax::Digits(a + p * channels, channels, low + p * channels,
                    high + p * channels, &any, &w);
    marked[p] = any;
    wide |= w;
  }
  return !wide;
}

#endif  // MCQ_JAX_VNNI

ffi::Error Int8ConvImpl(ffi::ThreadPool pool, int64_t stride_h,
                        int64_t stride_w, int64_t pad_top, int64_t pad_left,
                        int64_t dilation_h, int64_t dilation_w,
                        ffi::AnyBuffer a, ffi::Buffer<ffi::S8> w,
                        ffi::Result<ffi::Buffer<ffi::S32>> out) {
  const auto ad = a.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (ad.size() != 4 || wd.size() != 4 || od.size() != 4) {
    return ffi::Error::InvalidArgument(
        "int8 conv: input, kernel and result must have rank 4 (NHWC, HWIO)");
  }
  if (wd[2] != ad[3] || od[0] != ad[0] || od[3] != wd[3]) {
    return ffi::Error::InvalidArgument(
        "int8 conv: input channels " + std::to_string(ad[3]) + " / kernel " +
        std::to_string(wd[2]) + ", batch " + std::to_string(ad[0]) + " / " +
        std::to_string(od[0]) + ", outputs " + std::to_string(wd[3]) + " / " +
        std::to_string(od[3]) + " do not match");
  }
  if (stride_h < 1 || stride_w < 1 || dilation_h < 1 || dilation_w < 1) {
    return ffi::Error::InvalidArgument(
        "int8 conv: strides and dilations must be positive");
  }
  const Geometry g{ad[0],      ad[1],      ad[2],    ad[3],    wd[0],
                   wd[1],      wd[3],      od[1],    od[2],    stride_h,
                   stride_w,   pad_top,    pad_left, dilation_h,
                   dilation_w};
  int32_t* result = out->typed_data();
  if (g.rows() == 0 || g.outputs == 0) return ffi::Error::Success();
  if (g.depth() == 0) {
    std::memset(result, 0, sizeof(int32_t) * g.rows() * g.outputs);
    return ffi::Error::Success();
  }
#if MCQ_JAX_VNNI
  switch (a.element_type()) {
    case ffi::DataType::S8:
      Conv(g, static_cast<const int8_t*>(a.untyped_data()), nullptr, nullptr,
           w.typed_data(), result, &pool);
      return ffi::Error::Success();
    case ffi::DataType::S16: {
      const auto* values = static_cast<const int16_t*>(a.untyped_data());
      const int64_t pixels = g.batch * g.height * g.width;
      std::unique_ptr<int8_t[]> low(new int8_t[pixels * g.channels]);
      std::unique_ptr<int8_t[]> high(new int8_t[pixels * g.channels]);
      std::unique_ptr<bool[]> marked(new bool[pixels]);
      if (Digits(values, pixels, g.channels, low.get(), high.get(),
                 marked.get())) {
        Conv(g, low.get(), high.get(), marked.get(), w.typed_data(), result,
             &pool);
      } else {
        Direct(g, values, w.typed_data(), result);
      }
      return ffi::Error::Success();
    }
    default:
      return ffi::Error::InvalidArgument(
          "int8 conv: the input must be int8 or int16");
  }
#else
  return ffi::Error::Internal(
      "int8 conv: this library was built without AVX512-VNNI");
#endif
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(McqInt8Conv, Int8ConvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("dilation_h")
                                  .Attr<int64_t>("dilation_w")
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
