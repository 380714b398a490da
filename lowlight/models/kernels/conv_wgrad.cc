// Kernel gradient of a 2-D NHWC convolution on the CPU, as an XLA FFI custom call.
//
// Why: inside an iResNet-50 train step on XLA:CPU (jax 0.10) the kernel gradients cost
// 1.55-1.61 s of a 4.0 s step against 1.16 s for PyTorch's oneDNN (docs/performance.md,
// "Ablation"); without them the two frameworks run the step in the same time. XLA runs the
// kernel gradient as a convolution whose operands it first transposes, and every JAX-level
// rewrite (im2col matmuls, Winograd, batch chunks) wrote and re-read the operands several
// times, which lost inside the model. This kernel reads each operand in place, once per
// cache block:
//
//   dW[ky, kx, ci, co] = sum over output pixels p = (n, oy, ox) of
//                        x[n, oy*sh + ky - pt, ox*sw + kx - pl, ci] * dy[n, oy, ox, co]
//
// is a matrix product over the output pixels (M = KH*KW*CI rows, CO columns). The register
// tile is NV vectors of input channels (contiguous in x for a fixed pixel and tap) by NR
// output channels (broadcast from dy's row): NV loads and NR broadcasts feed NV*NR fused
// multiply-adds per pixel, and out-of-image taps are skipped by clipping each output row's
// pixel range instead of padding. The work is a fixed grid of items (ranges of output rows x
// ranges of output channels, see Job), each summed in chunks of whole output rows whose input
// rows fit in L2; items are claimed by the calling thread and by helpers scheduled on XLA's
// own intra-op thread pool (no locks), and the result does not depend on who took which.
//
// Requirements checked by the Python side (lowlight/models/cpu_kernels.py): float32, no
// dilation or groups, CI a multiple of the vector width. Everything else keeps XLA's path.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using lowlight::kVW;
using lowlight::vf;

namespace {

#if defined(__AVX512F__)
constexpr int kNR = 12;  // output channels per register tile (2 x 12 accumulators of 32)
#else
constexpr int kNR = 6;  // 2 x 6 accumulators of 16 ymm registers
#endif
constexpr int kNV = 2;  // vectors of input channels per register tile

// Counters for benchmarks and tests (cpu_kernels.wgrad_stats): calls, nanoseconds inside the
// handler, work items taken by the calling thread and by helpers.
std::atomic<int64_t> g_calls{0}, g_ns{0}, g_caller_chunks{0}, g_helper_chunks{0};

struct Geometry {
  int64_t n, h, w, ci, oh, ow, co, kh, kw, sh, sw, pt, pl;
  int64_t m() const { return kh * kw * ci; }
};

// acc[c][m] (row stride g.m()) += sum over output rows [r0, r1) for output channels
// [c0, c0 + NR) and rows m of tap (ky, kx), input channels [v0, v0 + NV * kVW).
template <int NR, int NV>
inline void tile(const Geometry& g, const float* x, const float* dy, int64_t r0, int64_t r1,
                 int64_t c0, int64_t ky, int64_t kx, int64_t v0, float* acc) {
  vf a[NR][NV];
  for (int j = 0; j < NR; ++j)
    for (int v = 0; v < NV; ++v) a[j][v] = vf{};
  // Output columns whose input column ix = ox*sw + kx - pl lies in [0, w).
  const int64_t off = kx - g.pl;
  const auto [lo, hi] = lowlight::columns_inside(off, g.sw, g.w, g.ow);
  const int64_t xstep = g.sw * g.ci;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / g.oh, oy = r % g.oh;
    const int64_t iy = oy * g.sh + ky - g.pt;
    if (iy < 0 || iy >= g.h || lo >= hi) continue;
    const float* xp = x + ((b * g.h + iy) * g.w + lo * g.sw + off) * g.ci + v0;
    const float* dp = dy + (r * g.ow + lo) * g.co + c0;
    for (int64_t ox = lo; ox < hi; ++ox, xp += xstep, dp += g.co) {
      vf xv[NV];
      for (int v = 0; v < NV; ++v) xv[v] = *reinterpret_cast<const vf*>(xp + v * kVW);
      for (int j = 0; j < NR; ++j) {
        const float d = dp[j];
        for (int v = 0; v < NV; ++v) a[j][v] += xv[v] * d;
      }
    }
  }
  const int64_t m0 = (ky * g.kw + kx) * g.ci + v0;
  for (int j = 0; j < NR; ++j) {
    float* out = acc + (c0 + j) * g.m() + m0;
    for (int v = 0; v < NV; ++v) {
      vf* o = reinterpret_cast<vf*>(out + v * kVW);
      *o += a[j][v];
    }
  }
}

template <int NV>
void tile_nr(int nr, const Geometry& g, const float* x, const float* dy, int64_t r0, int64_t r1,
             int64_t c0, int64_t ky, int64_t kx, int64_t v0, float* acc) {
  switch (nr) {
#define LOWLIGHT_NR(k) \
  case k:              \
    return tile<(k <= kNR ? k : kNR), NV>(g, x, dy, r0, r1, c0, ky, kx, v0, acc);
    LOWLIGHT_NR(1) LOWLIGHT_NR(2) LOWLIGHT_NR(3) LOWLIGHT_NR(4) LOWLIGHT_NR(5) LOWLIGHT_NR(6)
    LOWLIGHT_NR(7) LOWLIGHT_NR(8) LOWLIGHT_NR(9) LOWLIGHT_NR(10) LOWLIGHT_NR(11) LOWLIGHT_NR(12)
#undef LOWLIGHT_NR
    default:
      return;
  }
}

// Output rows [r0, r1), output channels [c_lo, c_hi), into acc ([co][m]).
void chunk(const Geometry& g, const float* x, const float* dy, int64_t r0, int64_t r1,
           int64_t c_lo, int64_t c_hi, float* acc) {
  for (int64_t c0 = c_lo; c0 < c_hi; c0 += kNR) {
    const int nr = static_cast<int>(std::min<int64_t>(kNR, c_hi - c0));
    for (int64_t ky = 0; ky < g.kh; ++ky)
      for (int64_t kx = 0; kx < g.kw; ++kx) {
        int64_t v0 = 0;
        for (; v0 + kNV * kVW <= g.ci; v0 += kNV * kVW)
          tile_nr<kNV>(nr, g, x, dy, r0, r1, c0, ky, kx, v0, acc);
        for (; v0 < g.ci; v0 += kVW) tile_nr<1>(nr, g, x, dy, r0, r1, c0, ky, kx, v0, acc);
      }
  }
}

// The work is a fixed grid of items: `slots` ranges of output rows x `groups` ranges of
// output channels. Item (s, gi) sums its rows, in order and in cache-sized chunks, into slot
// s's own [co][m] buffer, rows [c_lo, c_hi); the slots are added in order at the end. Which
// thread takes which item changes nothing, so the result is bitwise the same whatever the
// number of threads or their timing (training runs resume and repeat exactly).
struct Job {
  Geometry g;
  const float* x;
  const float* dy;
  int64_t rows_per_chunk, slots, groups, channels_per_group;
  std::unique_ptr<float[]> acc;  // slots x [co][m]

  int64_t items() const { return slots * groups; }

  void item(int64_t i) {
    const int64_t s = i / groups, gi = i % groups, rows = g.n * g.oh, m = g.m();
    const int64_t c_lo = gi * channels_per_group;
    const int64_t c_hi = std::min(g.co, c_lo + channels_per_group);
    float* a = acc.get() + s * g.co * m;
    std::fill(a + c_lo * m, a + c_hi * m, 0.0f);
    const int64_t r_end = rows * (s + 1) / slots;
    for (int64_t r0 = rows * s / slots; r0 < r_end; r0 += rows_per_chunk)
      chunk(g, x, dy, r0, std::min(r0 + rows_per_chunk, r_end), c_lo, c_hi, a);
  }
};

// Items to aim for: enough for two threads to balance when one starts late.
constexpr int64_t kItems = 8;
// Operands (x and dy) up to this size are read once per channel group from L3.
constexpr int64_t kGroupOperandBytes = 16 << 20;
// Larger operands are streamed from memory once per channel group, so they get as many
// groups as their arithmetic pays for: at least this many multiply-adds per operand byte and
// group (a pass from memory costs about what ~10 per byte of compute does at this machine's
// rates). Wide layers (14x14x512 -> 512: 576 per byte) split into all kItems groups; narrow,
// large maps (112x112x64 -> 64: 72 per byte) stay one group, split by rows into slots.
constexpr int64_t kMacsPerOperandBytePerGroup = 64;
// Memory for the row slots' partial sums.
constexpr int64_t kSlotBytes = 16 << 20;

// Channel groups for a layer: up to kItems and the number of register tiles; for large
// operands a power of two, so that groups x slots splits evenly over two threads.
int64_t channel_groups(const Geometry& g, int64_t tiles) {
  const int64_t rows = g.n * g.oh;
  const int64_t operand_bytes = 4 * (g.n * g.h * g.w * g.ci + rows * g.ow * g.co);
  int64_t want = kItems;
  if (operand_bytes > kGroupOperandBytes) {
    const double macs = static_cast<double>(rows * g.ow) * g.m() * g.co;
    want = static_cast<int64_t>(macs / (static_cast<double>(operand_bytes) *
                                        kMacsPerOperandBytePerGroup));
    int64_t pow2 = 1;
    while (pow2 * 2 <= want) pow2 *= 2;
    want = pow2;
  }
  return std::max<int64_t>(1, std::min(want, std::min(tiles, kItems)));
}

ffi::Error ConvWgradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                         ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw,
                         int64_t stride_h, int64_t stride_w, int64_t pad_top, int64_t pad_left,
                         int64_t chunk_bytes, int64_t max_workers) {
  const auto t0 = std::chrono::steady_clock::now();
  auto xd = x.dimensions(), yd = dy.dimensions(), wd = dw->dimensions();
  if (xd.size() != 4 || yd.size() != 4 || wd.size() != 4)
    return ffi::Error::InvalidArgument("lowlight_conv_wgrad: x, dy and dw must be 4-D");
  Geometry g{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], yd[3], wd[0], wd[1],
             stride_h, stride_w, pad_top, pad_left};
  if (yd[0] != g.n || wd[2] != g.ci || wd[3] != g.co)
    return ffi::Error::InvalidArgument("lowlight_conv_wgrad: x (N,H,W,CI), dy (N,OH,OW,CO) and "
                                       "dw (KH,KW,CI,CO) disagree");
  if (g.ci % kVW != 0)
    return ffi::Error::InvalidArgument("lowlight_conv_wgrad: input channels must be a multiple "
                                       "of the vector width");
  const int64_t m = g.m();
  float* out = dw->typed_data();
  const int64_t rows = g.n * g.oh;
  if (rows == 0 || g.co == 0 || m == 0) {
    std::fill(out, out + m * g.co, 0.0f);
    return ffi::Error::Success();
  }
  Job job;
  Job* jp = &job;
  job.g = g;
  job.x = x.typed_data();
  job.dy = dy.typed_data();
  // Rows per chunk: the input rows a chunk reads (sh per output row) and its dy rows in about
  // chunk_bytes (L2), re-read from there once per tile of output channels.
  const int64_t row_bytes = (g.sh * g.w * g.ci + g.ow * g.co) * 4;
  job.rows_per_chunk = std::max<int64_t>(1, chunk_bytes / std::max<int64_t>(row_bytes, 1));
  // The grid depends on the shapes only (see Job).
  const int64_t tiles = (g.co + kNR - 1) / kNR;
  const int64_t groups = channel_groups(g, tiles);
  const int64_t tiles_per_group = (tiles + groups - 1) / groups;
  job.channels_per_group = tiles_per_group * kNR;
  job.groups = (g.co + job.channels_per_group - 1) / job.channels_per_group;
  int64_t slots = (kItems + job.groups - 1) / job.groups;
  slots = std::min(slots, std::max<int64_t>(1, kSlotBytes / (4 * g.co * m)));
  job.slots = std::max<int64_t>(1, std::min(slots, rows));
  job.acc.reset(new float[static_cast<size_t>(job.slots * g.co * m)]);
  lowlight::parallel_for(pool, job.items(), max_workers, [jp](int64_t i) { jp->item(i); },
                         &g_caller_chunks, &g_helper_chunks);
  // dw[m][c] = sum over slots, in order, of acc[s][c][m]: blocks of kB rows of dw, each
  // element summed in slot order whichever thread takes the block.
  const float* acc = job.acc.get();
  const int64_t slot_size = g.co * m, n_slots = job.slots, co = g.co;
  constexpr int64_t kB = 32;  // transpose in blocks that stay in L1
  lowlight::parallel_for(pool, (m + kB - 1) / kB, max_workers, [=](int64_t b) {
    const int64_t m0 = b * kB, m1 = std::min(m0 + kB, m);
    for (int64_t c0 = 0; c0 < co; c0 += kB) {
      const int64_t c1 = std::min(c0 + kB, co);
      for (int64_t i = m0; i < m1; ++i)
        for (int64_t c = c0; c < c1; ++c) {
          float sum = acc[c * m + i];
          for (int64_t s = 1; s < n_slots; ++s) sum += acc[s * slot_size + c * m + i];
          out[i * co + c] = sum;
        }
    }
  });
  g_calls.fetch_add(1, std::memory_order_relaxed);
  g_ns.fetch_add(std::chrono::duration_cast<std::chrono::nanoseconds>(
                     std::chrono::steady_clock::now() - t0).count(),
                 std::memory_order_relaxed);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LowlightConvWgradF32, ConvWgradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("chunk_bytes")
                                  .Attr<int64_t>("max_workers"));

extern "C" int lowlight_kernels_vector_width() { return kVW; }

// out[0..3] = calls, nanoseconds in the handler, items by callers, items by helpers; then
// the counters restart from zero.
extern "C" void lowlight_kernels_wgrad_stats(int64_t* out) {  // items, not chunks
  out[0] = g_calls.exchange(0);
  out[1] = g_ns.exchange(0);
  out[2] = g_caller_chunks.exchange(0);
  out[3] = g_helper_chunks.exchange(0);
}
