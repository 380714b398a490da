// Forward of a depthwise 2-D NHWC convolution with a per-channel affine + activation fused on
// its input and on its output, as an XLA FFI custom call (MobileNetV2 inference).
//
//   a[n, iy, ix, c] = act_in((x[n, iy, ix, c] - m_in[c]) * s_in[c] + b_in[c])   (or x itself)
//   z[n, oy, ox, c] = sum over taps (ky, kx) of a[n, oy*sh + ky - pt, ox*sw + kx - pl, c] * w[ky, kx, c]
//   y[n, oy, ox, c] = act_out((z - m_out[c]) * s_out[c] + b_out[c])               (or z itself)
// Taps outside the image read zero: the model pads the activated tensor a, not x.
//
// Why: in an inverted-residual block at inference XLA runs the expansion's BatchNorm + ReLU6
// and the depthwise convolution's zero padding as one pass that writes a padded copy of the
// expanded activation, then the shifted sum (with the second BatchNorm + ReLU6) as another that
// reads it back: the expanded tensor, the largest in the block, goes through memory three times
// (MobileNetV2-SE at batch 64: 11.7 + 18.1 ms of 70 ms, docs/performance.md). Here each image's
// rows are activated into a small padded ring buffer that stays in L1/L2 while the taps read
// it, so the expanded tensor is read once and the output written once. Work is split by images
// and bands of output rows; no item reads another's output, so the result does not depend on
// the number of threads.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using lowlight::kVW;
using lowlight::load;
using lowlight::store;
using lowlight::vf;

namespace {

enum Act : int64_t { kNone = 0, kRelu = 1, kRelu6 = 2 };

struct Op {  // the per-channel affine (if `affine`) then the activation
  bool affine;
  int64_t act;
  const float *mean, *mul, *bias;
};

struct Geometry {
  int64_t n, h, w, c, oh, ow, kh, kw, sh, sw, pt, pl, pw;  // pw: padded row width
};

inline vf apply(const Op& op, vf v, int64_t c) {
  if (op.affine) v = (v - load(op.mean + c)) * load(op.mul + c) + load(op.bias + c);
  if (op.act != kNone) {
    const vf zero{};  // written so that NaN passes through, as jnp.clip / jnp.maximum
    v = v < zero ? zero : v;
    if (op.act == kRelu6) {
      const vf six = zero + 6.0f;
      v = v > six ? six : v;
    }
  }
  return v;
}

inline float apply1(const Op& op, float v, int64_t c) {
  if (op.affine) v = (v - op.mean[c]) * op.mul[c] + op.bias[c];
  if (op.act != kNone) v = v < 0.0f ? 0.0f : v;
  if (op.act == kRelu6) v = v > 6.0f ? 6.0f : v;
  return v;
}

// Input row iy of image b, activated, into a padded row buffer (its border columns stay zero).
void fill_row(const Geometry& g, const Op& in, const float* x, int64_t b, int64_t iy,
              float* row) {
  const float* src = x + (b * g.h + iy) * g.w * g.c;
  float* dst = row + g.pl * g.c;
  const int64_t total = g.w * g.c;
  if (!in.affine && in.act == kNone) {
    std::copy(src, src + total, dst);
    return;
  }
  for (int64_t ix = 0; ix < g.w; ++ix, src += g.c, dst += g.c) {
    int64_t c = 0;
    for (; c + kVW <= g.c; c += kVW) store(dst + c, apply(in, load(src + c), c));
    for (; c < g.c; ++c) dst[c] = apply1(in, src[c], c);
  }
}

// Output row oy, channels [c0, c0 + NV*kVW), from the kh padded input rows `rows`. KH, KW > 0
// fix the kernel size at compile time so the taps' weights stay in registers.
template <int KH, int KW, int NV>
void out_row_vec(const Geometry& g, const Op& out, const float* const* rows, const float* w,
                 float* y, int64_t c0) {
  constexpr int T = KH * KW;
  vf wv[T][NV];
  for (int t = 0; t < T; ++t)
    for (int v = 0; v < NV; ++v) wv[t][v] = load(w + t * g.c + c0 + v * kVW);
  const int64_t step = g.sw * g.c;
  for (int64_t ox = 0; ox < g.ow; ++ox, y += g.c) {
    vf acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = vf{};
    for (int ky = 0; ky < KH; ++ky) {
      const float* r = rows[ky] + ox * step + c0;
      for (int kx = 0; kx < KW; ++kx)
        for (int v = 0; v < NV; ++v)
          acc[v] += load(r + kx * g.c + v * kVW) * wv[ky * KW + kx][v];
    }
    for (int v = 0; v < NV; ++v) store(y + c0 + v * kVW, apply(out, acc[v], c0 + v * kVW));
  }
}

// Any kernel size, and the channels past the last full vector: one channel at a time.
void out_row_scalar(const Geometry& g, const Op& out, const float* const* rows, const float* w,
                    float* y, int64_t c0) {
  for (int64_t ox = 0; ox < g.ow; ++ox, y += g.c)
    for (int64_t c = c0; c < g.c; ++c) {
      float acc = 0.0f;
      for (int64_t ky = 0; ky < g.kh; ++ky)
        for (int64_t kx = 0; kx < g.kw; ++kx)
          acc += rows[ky][(ox * g.sw + kx) * g.c + c] * w[(ky * g.kw + kx) * g.c + c];
      y[c] = apply1(out, acc, c);
    }
}

void out_row(const Geometry& g, const Op& out, const float* const* rows, const float* w,
             float* y) {
  int64_t c0 = 0;
  if (g.kh == 3 && g.kw == 3) {
    for (; c0 + 2 * kVW <= g.c; c0 += 2 * kVW) out_row_vec<3, 3, 2>(g, out, rows, w, y, c0);
    for (; c0 + kVW <= g.c; c0 += kVW) out_row_vec<3, 3, 1>(g, out, rows, w, y, c0);
  }
  if (c0 < g.c) out_row_scalar(g, out, rows, w, y, c0);
}

// Output rows [oy0, oy1) of image b. The input rows live in a ring of kh padded rows (slot
// iy mod kh), each activated once per band; rows outside the image point at a zero row.
void band(const Geometry& g, const Op& in, const Op& out, const float* x, const float* w,
          float* y, int64_t b, int64_t oy0, int64_t oy1) {
  const int64_t row_len = g.pw * g.c;
  thread_local std::vector<float> buf;
  buf.assign(static_cast<size_t>((g.kh + 1) * row_len), 0.0f);
  float* zero_row = buf.data() + g.kh * row_len;
  std::vector<int64_t> held(g.kh, -1);  // which input row each slot holds
  std::vector<const float*> rows(g.kh);
  for (int64_t oy = oy0; oy < oy1; ++oy) {
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      const int64_t iy = oy * g.sh + ky - g.pt;
      if (iy < 0 || iy >= g.h) {
        rows[ky] = zero_row;
        continue;
      }
      const int64_t slot = iy % g.kh;
      float* row = buf.data() + slot * row_len;
      if (held[slot] != iy) {
        fill_row(g, in, x, b, iy, row);
        held[slot] = iy;
      }
      rows[ky] = row;
    }
    out_row(g, out, rows.data(), w, y + (b * g.oh + oy) * g.ow * g.c);
  }
}

ffi::Error DepthwiseFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> affine,
                            ffi::ResultBuffer<ffi::F32> y, int64_t stride_h, int64_t stride_w,
                            int64_t pad_top, int64_t pad_left, int64_t in_affine,
                            int64_t in_act, int64_t out_affine, int64_t out_act,
                            int64_t max_workers) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions(), ad = affine.dimensions();
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4 || ad.size() != 3)
    return ffi::Error::InvalidArgument(
        "lowlight_depthwise_fwd: x, w and y must be 4-D and the affine vectors (2, 3, C)");
  Geometry g{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], wd[0], wd[1],
             stride_h, stride_w, pad_top, pad_left, 0};
  if (yd[0] != g.n || yd[3] != g.c || wd[2] != 1 || wd[3] != g.c || ad[0] != 2 || ad[1] != 3 ||
      ad[2] != g.c)
    return ffi::Error::InvalidArgument(
        "lowlight_depthwise_fwd: x (N,H,W,C), w (KH,KW,1,C), affine (2,3,C) and y (N,OH,OW,C) "
        "disagree");
  if (pad_top < 0 || pad_left < 0 || stride_h < 1 || stride_w < 1)
    return ffi::Error::InvalidArgument("lowlight_depthwise_fwd: negative padding or stride < 1");
  for (int64_t a : {in_act, out_act})
    if (a != kNone && a != kRelu && a != kRelu6)
      return ffi::Error::InvalidArgument("lowlight_depthwise_fwd: activation code not 0, 1, 2");
  g.pw = std::max(g.pl + g.w, (g.ow - 1) * g.sw + g.kw);
  const float* ap = affine.typed_data();
  const Op in{in_affine != 0, in_act, ap, ap + g.c, ap + 2 * g.c};
  const Op out{out_affine != 0, out_act, ap + 3 * g.c, ap + 4 * g.c, ap + 5 * g.c};
  // Bands of output rows so that a small batch still gives every thread work; a band
  // re-activates the kh - sh input rows it shares with the previous one.
  const int64_t want = std::min<int64_t>(g.oh, std::max<int64_t>(1, (8 + g.n - 1) / g.n));
  const int64_t rows_per = (g.oh + want - 1) / want;
  const int64_t bands = (g.oh + rows_per - 1) / rows_per;
  const float *xp = x.typed_data(), *wp = w.typed_data();
  float* yp = y->typed_data();
  lowlight::parallel_for(pool, g.n * bands, max_workers, [&](int64_t item) {
    const int64_t b = item / bands, oy0 = (item % bands) * rows_per;
    band(g, in, out, xp, wp, yp, b, oy0, std::min(g.oh, oy0 + rows_per));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowlightDepthwiseFwdF32, DepthwiseFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("in_affine")
                                  .Attr<int64_t>("in_act")
                                  .Attr<int64_t>("out_affine")
                                  .Attr<int64_t>("out_act")
                                  .Attr<int64_t>("max_workers"));
