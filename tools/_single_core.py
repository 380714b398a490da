"""Import first in a benchmark to measure ONE core: pins BLAS/OpenMP threads (before numpy
loads), OpenCV threads, and puts the repository on sys.path so `lowlight` imports from a
checkout. Also the shared timing helper `best_rate`."""

import os
import sys

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS"):
    os.environ[_var] = "1"

import cv2  # noqa: E402

cv2.setNumThreads(1)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def best_rate(fn, n: int, repeats: int) -> tuple[float, float]:
    """Best-of-`repeats` (wall, cpu) items per second of fn(), which processes n items."""
    import time

    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        best_wall = min(best_wall, time.perf_counter() - w0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return n / best_wall, n / best_cpu
