"""Process setup shared by the benchmark entry points: malloc tunables, threads, load.

glibc reads its tunables only when a process starts, and XLA/OpenMP read their thread settings
when they load, so both are applied here before jax or torch is imported (`reexec` restarts
the interpreter with the environment set, `pin_threads` narrows the CPU set).
"""

from __future__ import annotations

import os
import sys

from lowlight import cpu_malloc

#: glibc malloc settings that make freed memory reusable (lowlight/cpu_malloc.py: what they
#: change, measured). The benchmark sets them through the environment, for PyTorch's side as
#: well, since both sides run in one process.
MALLOC_TUNABLES = cpu_malloc.TUNABLES


def reexec_with_malloc_tunables(script: str) -> None:
    """Restarts `script` (with this process's arguments) under MALLOC_TUNABLES, once."""
    current = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.arena_max" in current:
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(t for t in (current, MALLOC_TUNABLES) if t))
    os.execve(sys.executable, [sys.executable, os.path.abspath(script), *sys.argv[1:]], env)


def pin_threads(threads: int) -> int:
    """Restricts this process to `threads` cores (0 = all) before jax/torch load; one thread
    also turns off XLA's multi-threaded Eigen and intra-op pool. Returns the count used."""
    cores = sorted(os.sched_getaffinity(0))
    if threads <= 0 or threads >= len(cores):
        return len(cores)
    os.sched_setaffinity(0, set(cores[:threads]))
    if threads == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1").strip()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    return threads


def load() -> float:
    """1-minute load average (/proc/loadavg)."""
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])
