// Both gradients of a depthwise 2-D NHWC convolution (MobileNetV2) in one pass, as an XLA FFI
// custom call.
//
//   y[n, oy, ox, c] = sum over taps (ky, kx) of x[n, oy*sh + ky - pt, ox*sw + kx - pl, c] * w[ky, kx, c]
//   dx[n, iy, ix, c] = sum of dy[n, oy, ox, c] * w[ky, kx, c] over the taps that read (iy, ix)
//   dw[ky, kx, c]    = sum over output pixels of x[n, iy, ix, c] * dy[n, oy, ox, c]
//
// Why: fast_conv runs the forward as a fused sum of shifted, scaled views of x; automatic
// differentiation of it gives, per tap, a padded copy of dy * w for dx and a product x * dy
// materialised and then reduced for dw: about 2 x KH*KW passes over activation-sized arrays
// per layer. Here each output row's dy, the input rows it reads and the dx rows it writes stay
// in L1/L2 while all taps are applied, so x and dy are read and dx written about once. Work is
// split by whole images (their dx never overlap) between the calling thread and helpers on
// XLA's intra-op pool; each image's dw is summed on its own and added up at the end.

#include <algorithm>
#include <cstdint>
#include <memory>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using lowlight::kVW;
using lowlight::vf;

namespace {

constexpr int kNV = 4;  // channel vectors per inner loop

struct Geometry {
  int64_t n, h, w, c, oh, ow, kh, kw, sh, sw, pt, pl;
};

// One tap (ky, kx) of output row oy of image b, channels [c0, c0 + NV*kVW): dx row += dy * w,
// dw[tap] += x * dy.
template <int NV>
inline void tap_row(const Geometry& g, const float* x, const float* dy, const float* w,
                    float* dx, float* dw, int64_t b, int64_t oy, int64_t iy, int64_t ky,
                    int64_t kx, int64_t c0) {
  const int64_t off = kx - g.pl;
  const auto [lo, hi] = lowlight::columns_inside(off, g.sw, g.w, g.ow);
  if (lo >= hi) return;
  const int64_t t = (ky * g.kw + kx) * g.c + c0;
  vf wv[NV], acc[NV];
  for (int v = 0; v < NV; ++v) {
    wv[v] = *reinterpret_cast<const vf*>(w + t + v * kVW);
    acc[v] = vf{};
  }
  const int64_t in_row = ((b * g.h + iy) * g.w) * g.c + c0;
  const float* xp = x + in_row + (lo * g.sw + off) * g.c;
  float* dxp = dx + in_row + (lo * g.sw + off) * g.c;
  const float* dp = dy + ((b * g.oh + oy) * g.ow + lo) * g.c + c0;
  const int64_t step = g.sw * g.c;
  for (int64_t ox = lo; ox < hi; ++ox, xp += step, dxp += step, dp += g.c) {
    for (int v = 0; v < NV; ++v) {
      const vf d = *reinterpret_cast<const vf*>(dp + v * kVW);
      vf* o = reinterpret_cast<vf*>(dxp + v * kVW);
      *o += d * wv[v];
      acc[v] += *reinterpret_cast<const vf*>(xp + v * kVW) * d;
    }
  }
  for (int v = 0; v < NV; ++v) *reinterpret_cast<vf*>(dw + t + v * kVW) += acc[v];
}

// The channels past the last full vector, one at a time.
inline void tap_row_scalar(const Geometry& g, const float* x, const float* dy, const float* w,
                           float* dx, float* dw, int64_t b, int64_t oy, int64_t iy, int64_t ky,
                           int64_t kx, int64_t c0) {
  const int64_t off = kx - g.pl;
  const auto [lo, hi] = lowlight::columns_inside(off, g.sw, g.w, g.ow);
  const int64_t t = (ky * g.kw + kx) * g.c;
  for (int64_t ox = lo; ox < hi; ++ox) {
    const int64_t ix = ox * g.sw + off;
    const float* xp = x + ((b * g.h + iy) * g.w + ix) * g.c;
    float* dxp = dx + ((b * g.h + iy) * g.w + ix) * g.c;
    const float* dp = dy + ((b * g.oh + oy) * g.ow + ox) * g.c;
    for (int64_t c = c0; c < g.c; ++c) {
      dxp[c] += dp[c] * w[t + c];
      dw[t + c] += xp[c] * dp[c];
    }
  }
}

void image(const Geometry& g, const float* x, const float* dy, const float* w, float* dx,
           float* dw, int64_t b) {
  std::fill(dx + b * g.h * g.w * g.c, dx + (b + 1) * g.h * g.w * g.c, 0.0f);
  for (int64_t oy = 0; oy < g.oh; ++oy)
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      const int64_t iy = oy * g.sh + ky - g.pt;
      if (iy < 0 || iy >= g.h) continue;
      for (int64_t kx = 0; kx < g.kw; ++kx) {
        int64_t c0 = 0;
        for (; c0 + kNV * kVW <= g.c; c0 += kNV * kVW)
          tap_row<kNV>(g, x, dy, w, dx, dw, b, oy, iy, ky, kx, c0);
        for (; c0 + kVW <= g.c; c0 += kVW) tap_row<1>(g, x, dy, w, dx, dw, b, oy, iy, ky, kx, c0);
        if (c0 < g.c) tap_row_scalar(g, x, dy, w, dx, dw, b, oy, iy, ky, kx, c0);
      }
    }
}

ffi::Error DepthwiseBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> dy,
                            ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dw,
                            int64_t stride_h, int64_t stride_w, int64_t pad_top,
                            int64_t pad_left, int64_t max_workers) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = dy.dimensions();
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument("lowlight_depthwise_bwd: x, w and dy must be 4-D");
  Geometry g{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], wd[0], wd[1],
             stride_h, stride_w, pad_top, pad_left};
  if (yd[0] != g.n || yd[3] != g.c || wd[2] != 1 || wd[3] != g.c)
    return ffi::Error::InvalidArgument("lowlight_depthwise_bwd: x (N,H,W,C), w (KH,KW,1,C) and "
                                       "dy (N,OH,OW,C) disagree");
  const float *xp = x.typed_data(), *dyp = dy.typed_data(), *wp = w.typed_data();
  float* dxp = dx->typed_data();
  // Images are claimed by the calling thread and helpers; each image's dw goes to its own
  // slice of `parts`, added up in image order, so the result is bitwise the same whatever the
  // number of threads or their timing.
  const int64_t k = g.kh * g.kw * g.c;
  std::unique_ptr<float[]> parts(new float[static_cast<size_t>(g.n * k)]);
  float* pp = parts.get();
  lowlight::parallel_for(pool, g.n, max_workers, [&](int64_t b) {
    std::fill(pp + b * k, pp + (b + 1) * k, 0.0f);
    image(g, xp, dyp, wp, dxp, pp + b * k, b);
  });
  float* out = dw->typed_data();
  std::fill(out, out + k, 0.0f);
  for (int64_t b = 0; b < g.n; ++b)
    for (int64_t i = 0; i < k; ++i) out[i] += pp[b * k + i];
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowlightDepthwiseBwdF32, DepthwiseBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("max_workers"));
