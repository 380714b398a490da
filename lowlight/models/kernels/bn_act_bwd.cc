// Backward of train-mode BatchNorm + activation (lowlight.models.layers.BatchNormAct) as an
// XLA FFI custom call: the closed form of layers._bn_act_bwd in two passes over (x, dy).
//
//   h  = (x - mean) * (rstd * scale) + bias          (the forward's pre-activation)
//   g  = dy * act'(h)                                 (none / relu / relu6 / prelu)
//   pass 1, per channel: dbias = sum g, dscale = sum g * xhat, dslope = sum_{h<0} dy * h
//   pass 2: dx = s * g + xhat * b + c, with s = rstd * scale and per-channel b, c from the sums
//
// Why: XLA:CPU runs each reduction as its own op over a materialised operand, so the same
// formula written in JAX ops makes about 9 activation-sized passes per BatchNorm + PReLU; here
// it is 2 reads of x and dy and 1 write of dx. Rows are split into a fixed number of slots
// whose partial sums are added in order, so results do not depend on thread timing.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using lowlight::kVW;
using lowlight::load;
using lowlight::store;
using lowlight::vf;

namespace {

enum Activation : int64_t { kNone = 0, kRelu = 1, kRelu6 = 2, kPrelu = 3 };

// act'(h) * dy for one vector or one float (T = vf or float: the comparisons give masks or
// bools, and ?: selects lanes or values), as autodiff of the models'
// activations gives it: jnp.clip's derivative is 1/2 where h equals a bound, relu's is 0 at 0.
template <class T>
inline T act_grad(T h, T dy, T slope, int64_t act) {
  const T zero = h - h, one = zero + 1.0f, half = zero + 0.5f, six = zero + 6.0f;
  switch (act) {
    case kRelu:
      return h > zero ? dy : zero;
    case kRelu6: {
      const T f = (h > zero) & (h < six) ? one : ((h == zero) | (h == six) ? half : zero);
      return dy * f;
    }
    case kPrelu:
      return h < zero ? slope * dy : dy;
    default:
      return dy;
  }
}

struct Params {  // per channel
  const float *mean, *rstd, *mul, *bias, *slope;
};

// Pass 1 over a block of rows [r0, r1): sums[0..C) += sum of g, sums[C..2C) += sum of
// g * xhat, sums[2C..3C) += dslope's terms. A block's sums are formed in float32 and added in
// float64, so the error does not grow with the number of rows (the sums feed dx through a
// cancellation, which a long float32 running sum measurably degrades).
void sums_rows(const float* x, const float* dy, int64_t r0, int64_t r1, int64_t c,
               const Params& p, int64_t act, double* sums) {
  double *db = sums, *ds = sums + c, *dsl = sums + 2 * c;
  int64_t c0 = 0;
  for (; c0 + kVW <= c; c0 += kVW) {
    const vf mean = load(p.mean + c0), rstd = load(p.rstd + c0), mul = load(p.mul + c0),
             bias = load(p.bias + c0), slope = load(p.slope + c0);
    const vf zero = mean - mean;
    vf a_db = zero, a_ds = zero, a_dsl = zero;
    for (int64_t r = r0; r < r1; ++r) {
      const vf xv = load(x + r * c + c0), d = load(dy + r * c + c0);
      const vf xc = xv - mean;
      const vf h = xc * mul + bias;
      const vf g = act_grad<vf>(h, d, slope, act);
      a_db += g;
      a_ds += g * (xc * rstd);
      if (act == kPrelu) a_dsl += h < zero ? d * h : zero;
    }
    for (int i = 0; i < kVW; ++i) {
      db[c0 + i] += a_db[i];
      ds[c0 + i] += a_ds[i];
      dsl[c0 + i] += a_dsl[i];
    }
  }
  for (; c0 < c; ++c0) {
    float a_db = 0.0f, a_ds = 0.0f, a_dsl = 0.0f;
    for (int64_t r = r0; r < r1; ++r) {
      const float xc = x[r * c + c0] - p.mean[c0], d = dy[r * c + c0];
      const float h = xc * p.mul[c0] + p.bias[c0];
      const float g = act_grad<float>(h, d, p.slope[c0], act);
      a_db += g;
      a_ds += g * (xc * p.rstd[c0]);
      if (act == kPrelu && h < 0.0f) a_dsl += d * h;
    }
    db[c0] += a_db;
    ds[c0] += a_ds;
    dsl[c0] += a_dsl;
  }
}

// Pass 2 over rows [r0, r1): dx = s * g + xhat * b + cc.
void dx_rows(const float* x, const float* dy, float* dx, int64_t r0, int64_t r1, int64_t c,
             const Params& p, const float* b, const float* cc, int64_t act) {
  int64_t c0 = 0;
  for (; c0 + kVW <= c; c0 += kVW) {
    const vf mean = load(p.mean + c0), rstd = load(p.rstd + c0), mul = load(p.mul + c0),
             bias = load(p.bias + c0), slope = load(p.slope + c0), bv = load(b + c0),
             cv = load(cc + c0);
    for (int64_t r = r0; r < r1; ++r) {
      const vf xc = load(x + r * c + c0) - mean, d = load(dy + r * c + c0);
      const vf g = act_grad<vf>(xc * mul + bias, d, slope, act);
      store(dx + r * c + c0, mul * g + (xc * rstd) * bv + cv);
    }
  }
  for (; c0 < c; ++c0)
    for (int64_t r = r0; r < r1; ++r) {
      const float xc = x[r * c + c0] - p.mean[c0];
      const float g = act_grad<float>(xc * p.mul[c0] + p.bias[c0], dy[r * c + c0], p.slope[c0], act);
      dx[r * c + c0] = p.mul[c0] * g + (xc * p.rstd[c0]) * b[c0] + cc[c0];
    }
}

constexpr int64_t kSlots = 8;  // row ranges: the grid of both passes
constexpr int64_t kRowBlock = 64;  // rows per inner block (the channel loop re-reads them)

ffi::Error BnActBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                        ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> var_raw,
                        ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                        ffi::Buffer<ffi::F32> slope, ffi::Buffer<ffi::F32> dmean,
                        ffi::Buffer<ffi::F32> dvar, ffi::ResultBuffer<ffi::F32> dx,
                        ffi::ResultBuffer<ffi::F32> dscale, ffi::ResultBuffer<ffi::F32> dbias,
                        ffi::ResultBuffer<ffi::F32> dslope, int64_t activation, float eps,
                        int64_t max_workers) {
  auto xd = x.dimensions();
  if (xd.size() < 1 || dy.element_count() != x.element_count())
    return ffi::Error::InvalidArgument("lowlight_bn_act_bwd: x and dy must have one shape");
  const int64_t c = xd[xd.size() - 1];
  const int64_t rows = c == 0 ? 0 : x.element_count() / c;
  for (auto* v : {&mean, &var_raw, &scale, &bias, &slope, &dmean, &dvar})
    if (v->element_count() != c)
      return ffi::Error::InvalidArgument("lowlight_bn_act_bwd: per-channel inputs must have "
                                         "the channel count of x's last axis");
  if (activation < kNone || activation > kPrelu)
    return ffi::Error::InvalidArgument("lowlight_bn_act_bwd: unknown activation");
  // Per-channel constants, as the JAX closed form computes them.
  std::unique_ptr<float[]> buf(new float[static_cast<size_t>(4 * c)]);
  float *rstd = buf.get(), *mul = rstd + c, *bvec = mul + c, *cvec = bvec + c;
  std::unique_ptr<double[]> slot_buf(new double[static_cast<size_t>(kSlots * 3 * c)]);
  double* slot_sums = slot_buf.get();
  const float *vr = var_raw.typed_data(), *sc = scale.typed_data();
  for (int64_t i = 0; i < c; ++i) {
    rstd[i] = 1.0f / std::sqrt(std::max(0.0f, vr[i]) + eps);
    mul[i] = rstd[i] * sc[i];
  }
  const Params p{mean.typed_data(), rstd, mul, bias.typed_data(), slope.typed_data()};
  const float *xp = x.typed_data(), *dyp = dy.typed_data();
  const int64_t slots = std::max<int64_t>(1, std::min(kSlots, rows));
  lowlight::parallel_for(pool, slots, max_workers, [&](int64_t s) {
    double* sums = slot_sums + s * 3 * c;
    std::fill(sums, sums + 3 * c, 0.0);
    const int64_t end = rows * (s + 1) / slots;
    for (int64_t r0 = rows * s / slots; r0 < end; r0 += kRowBlock)
      sums_rows(xp, dyp, r0, std::min(r0 + kRowBlock, end), c, p, activation, sums);
  });
  float *db = dbias->typed_data(), *ds = dscale->typed_data(), *dsl = dslope->typed_data();
  const float *dm = dmean.typed_data(), *dv = dvar.typed_data();
  const double n = static_cast<double>(rows);
  for (int64_t i = 0; i < c; ++i) {
    double a = 0.0, b = 0.0, e = 0.0;
    for (int64_t s = 0; s < slots; ++s) {
      a += slot_sums[s * 3 * c + i];
      b += slot_sums[s * 3 * c + c + i];
      e += slot_sums[s * 3 * c + 2 * c + i];
    }
    db[i] = static_cast<float>(a);
    ds[i] = static_cast<float>(b);
    dsl[i] = static_cast<float>(e);
    const double k = vr[i] > 0.0f ? 1.0 : (vr[i] == 0.0f ? 0.5 : 0.0);
    bvec[i] = static_cast<float>(k * (2.0 * dv[i] / rstd[i] - double(mul[i]) * b) / n);
    cvec[i] = static_cast<float>((dm[i] - double(mul[i]) * a) / n);
  }
  float* dxp = dx->typed_data();
  lowlight::parallel_for(pool, slots, max_workers, [&](int64_t s) {
    const int64_t end = rows * (s + 1) / slots;
    for (int64_t r0 = rows * s / slots; r0 < end; r0 += kRowBlock)
      dx_rows(xp, dyp, dxp, r0, std::min(r0 + kRowBlock, end), c, p, bvec, cvec, activation);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowlightBnActBwdF32, BnActBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // var_raw
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale (ones if none)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // slope (any if not prelu)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dmean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dvar
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dscale
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dbias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dslope
                                  .Attr<int64_t>("activation")
                                  .Attr<float>("eps")
                                  .Attr<int64_t>("max_workers"));
