// Shared by the lowlight CPU kernels: vector types, the clipped column range of a tap and a
// parallel loop on XLA's thread pool.
#ifndef LOWLIGHT_KERNELS_PARALLEL_H_
#define LOWLIGHT_KERNELS_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace lowlight {

#if defined(__AVX512F__)
constexpr int kVW = 16;  // floats per vector register
#elif defined(__AVX__)
constexpr int kVW = 8;
#else
constexpr int kVW = 4;
#endif

// A vector of kVW floats; loads and stores through it need only 4-byte alignment.
typedef float vf __attribute__((vector_size(kVW * 4), aligned(4)));

inline vf load(const float* p) { return *reinterpret_cast<const vf*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vf*>(p) = v; }

// The output columns [lo, hi) of a row (ow wide, stride sw) whose input column
// ox * sw + off lies inside [0, w): a tap at offset off reads only these, so nothing is padded.
struct Columns {
  int64_t lo, hi;
};
inline Columns columns_inside(int64_t off, int64_t sw, int64_t w, int64_t ow) {
  const int64_t lo = off >= 0 ? 0 : (-off + sw - 1) / sw;
  const int64_t hi = (w - 1 - off) >= 0 ? (w - 1 - off) / sw + 1 : 0;
  return {lo, std::min(hi, ow)};
}

// Runs fn(i) for i in [0, items): the calling thread and up to max_workers - 1 helpers
// scheduled on XLA's intra-op pool (max_workers <= 0: the pool's size) claim items one at a
// time, and the call returns when all are done. A helper that starts late (the pool busy with
// other ops) finds no item left and returns; the shared state outlives the call for it. Items
// must not depend on which thread runs them, so results do not depend on thread timing.
// `caller_items` / `helper_items`, if given, count who took what (benchmarks).
inline void parallel_for(xla::ffi::ThreadPool& pool, int64_t items, int64_t max_workers,
                         std::function<void(int64_t)> fn,
                         std::atomic<int64_t>* caller_items = nullptr,
                         std::atomic<int64_t>* helper_items = nullptr) {
  struct State {
    std::atomic<int64_t> next{0}, done{0}, ids{0};
    int64_t items = 0, workers = 1;
    std::function<void(int64_t)> fn;
    std::atomic<int64_t>*caller_items = nullptr, *helper_items = nullptr;

    void run(bool caller) {
      if (ids.fetch_add(1) >= workers) return;
      std::atomic<int64_t>* count = caller ? caller_items : helper_items;
      for (int64_t i; (i = next.fetch_add(1)) < items;) {
        fn(i);
        if (count) count->fetch_add(1, std::memory_order_relaxed);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto st = std::make_shared<State>();
  st->items = items;
  st->fn = std::move(fn);
  st->caller_items = caller_items;
  st->helper_items = helper_items;
  int64_t workers = pool.num_threads();
  if (max_workers > 0) workers = std::min<int64_t>(workers, max_workers);
  st->workers = std::max<int64_t>(1, std::min<int64_t>(workers, items));
  for (int64_t i = 1; i < st->workers; ++i) pool.Schedule([st] { st->run(false); });
  st->run(true);
  while (st->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
}

}  // namespace lowlight

#endif  // LOWLIGHT_KERNELS_PARALLEL_H_
