// Forward 2-D NHWC convolution over an already padded input ("VALID"), as an XLA FFI custom
// call, for small batches (batch-1 inference), where XLA:CPU's convolution and fast_conv's
// Winograd path have too little work per op to use both cores well.
//
//   y[n, oy, ox, co] = sum over (ky, kx, ci) of xp[n, oy*sh + ky, ox*sw + kx, ci] * w[ky, kx, ci, co]
//
// Register tile: 12 output pixels of one row (broadcast from x) x 2 vectors of output channels
// (loaded from w's row, contiguous in co): 24 accumulators. Work items are (output-channel
// block, range of output rows) pairs with disjoint outputs, so results do not depend on which
// thread computes which.

#include <algorithm>
#include <cstdint>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using lowlight::kVW;
using lowlight::load;
using lowlight::store;
using lowlight::vf;

namespace {

#if defined(__AVX512F__)
constexpr int kNP = 12;  // output pixels per register tile
#else
constexpr int kNP = 6;
#endif

struct Geometry {
  int64_t n, hp, wp, ci, oh, ow, co, kh, kw, sh, sw;
};

template <int NP, int NV>
inline void tile(const Geometry& g, const float* x, const float* w, float* y, int64_t b,
                 int64_t oy, int64_t ox0, int64_t c0) {
  vf acc[NP][NV];
  for (int p = 0; p < NP; ++p)
    for (int v = 0; v < NV; ++v) acc[p][v] = vf{};
  for (int64_t ky = 0; ky < g.kh; ++ky) {
    const float* xrow = x + ((b * g.hp + oy * g.sh + ky) * g.wp) * g.ci;
    for (int64_t kx = 0; kx < g.kw; ++kx) {
      const float* xp = xrow + (ox0 * g.sw + kx) * g.ci;
      const float* wp = w + ((ky * g.kw + kx) * g.ci) * g.co + c0;
      const int64_t xs = g.sw * g.ci;
      for (int64_t i = 0; i < g.ci; ++i, wp += g.co) {
        vf wv[NV];
        for (int v = 0; v < NV; ++v) wv[v] = load(wp + v * kVW);
        for (int p = 0; p < NP; ++p) {
          const float a = xp[p * xs + i];
          for (int v = 0; v < NV; ++v) acc[p][v] += wv[v] * a;
        }
      }
    }
  }
  float* out = y + ((b * g.oh + oy) * g.ow + ox0) * g.co + c0;
  for (int p = 0; p < NP; ++p)
    for (int v = 0; v < NV; ++v) store(out + p * g.co + v * kVW, acc[p][v]);
}

template <int NV>
void row(const Geometry& g, const float* x, const float* w, float* y, int64_t b, int64_t oy,
         int64_t c0) {
  int64_t ox = 0;
  for (; ox + kNP <= g.ow; ox += kNP) tile<kNP, NV>(g, x, w, y, b, oy, ox, c0);
  switch (g.ow - ox) {
#define LOWLIGHT_NP(k) \
  case k:              \
    return tile<(k < kNP ? k : 1), NV>(g, x, w, y, b, oy, ox, c0);
    LOWLIGHT_NP(1) LOWLIGHT_NP(2) LOWLIGHT_NP(3) LOWLIGHT_NP(4) LOWLIGHT_NP(5) LOWLIGHT_NP(6)
    LOWLIGHT_NP(7) LOWLIGHT_NP(8) LOWLIGHT_NP(9) LOWLIGHT_NP(10) LOWLIGHT_NP(11)
#undef LOWLIGHT_NP
    default:
      return;
  }
}

constexpr int64_t kChannelBlock = 2 * kVW;  // output channels per item (w block in L2)
constexpr int64_t kRowsPerItem = 4;

ffi::Error ConvFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y, int64_t stride_h, int64_t stride_w,
                       int64_t max_workers) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument("lowlight_conv_fwd: x, w and y must be 4-D");
  Geometry g{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], yd[3], wd[0], wd[1], stride_h, stride_w};
  if (yd[0] != g.n || wd[2] != g.ci || wd[3] != g.co || (g.oh - 1) * g.sh + g.kh > g.hp ||
      (g.ow - 1) * g.sw + g.kw > g.wp)
    return ffi::Error::InvalidArgument("lowlight_conv_fwd: padded x (N,HP,WP,CI), w "
                                       "(KH,KW,CI,CO) and y (N,OH,OW,CO) disagree");
  if (g.co % kVW != 0)
    return ffi::Error::InvalidArgument("lowlight_conv_fwd: output channels must be a multiple "
                                       "of the vector width");
  const float *xp = x.typed_data(), *wp = w.typed_data();
  float* yp = y->typed_data();
  const int64_t rows = g.n * g.oh;
  const int64_t blocks = (g.co + kChannelBlock - 1) / kChannelBlock;
  const int64_t row_items = (rows + kRowsPerItem - 1) / kRowsPerItem;
  lowlight::parallel_for(pool, blocks * row_items, max_workers, [&](int64_t item) {
    const int64_t c0 = (item / row_items) * kChannelBlock;
    const int64_t r0 = (item % row_items) * kRowsPerItem;
    const int64_t r1 = std::min(rows, r0 + kRowsPerItem);
    const bool full = c0 + 2 * kVW <= g.co;
    for (int64_t r = r0; r < r1; ++r) {
      if (full)
        row<2>(g, xp, wp, yp, r / g.oh, r % g.oh, c0);
      else
        row<1>(g, xp, wp, yp, r / g.oh, r % g.oh, c0);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowlightConvFwdF32, ConvFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("max_workers"));
