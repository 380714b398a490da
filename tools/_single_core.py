"""Import first in a benchmark to measure ONE core: pins BLAS/OpenMP threads (before numpy
loads), OpenCV threads, and puts the repository on sys.path so `lowlight` imports from a
checkout."""

import os
import sys

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS"):
    os.environ[_var] = "1"

import cv2  # noqa: E402

cv2.setNumThreads(1)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
