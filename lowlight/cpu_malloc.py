"""glibc malloc settings for XLA:CPU processes: keep freed memory for reuse.

XLA:CPU allocates each call's temporary buffers (one block per executable run, megabytes at
batch 1, gigabytes for a train step) and frees them on return. With glibc's defaults such a block
is mmap'ed afresh on every call — XLA's worker threads allocate from per-thread arenas, which
serve every request above 64 MiB with a fresh mmap, and the main arena mmaps blocks above its
threshold — so every call page-faults all of its memory again. Measured here (2-core Zen 5,
docs/performance.md): iResNet-50 batch-1 latency with fast_conv 88.6 ms -> 55.7 ms (XLA's
convolution 60.0 -> 54.3), and 1.0M minor faults / 1.7 s of kernel time in a 10 s batch-32 train
step on one core -> ~0.

The settings (one arena, no mmap for large blocks, no trimming) are those of the environment
variable ``GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:
glibc.malloc.trim_threshold=...``; ``apply()`` sets them with ``mallopt`` at run time instead,
which works as long as it runs before XLA starts its threads. The cost: one arena serialises
the allocations of threaded host work — a grain pipeline reading RecordIO with 2 threads fell
from 13.4k to 7.4k images/s, the synthetic world from 983 to 920 — which is far above what a
model trains at on a CPU (iResNet-50: 6 images/s), so the entry points apply them on CPU-only
installs. ``LOWLIGHT_MALLOC=default`` keeps glibc's defaults.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform

#: The same settings as an environment variable (for a process started from a shell script).
TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
            "glibc.malloc.trim_threshold=68719476736")

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # <malloc.h>
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin", "libtpu")


def cpu_only() -> bool:
    """Whether jax will run on the CPU, decided without importing jax (which would start the
    threads the settings must precede): JAX_PLATFORMS=cpu, or no accelerator plugin installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(importlib.util.find_spec(p) is not None for p in _ACCELERATOR_PLUGINS)


def apply(force: bool = False) -> bool:
    """Sets the settings (glibc only; on CPU-only installs unless ``force``; not when
    ``LOWLIGHT_MALLOC=default`` or GLIBC_TUNABLES already sets malloc). Returns whether it did."""
    if os.environ.get("LOWLIGHT_MALLOC", "") == "default":
        return False
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False  # the user's own choice (or TUNABLES already)
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if not (force or cpu_only()):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = [libc.mallopt(_M_ARENA_MAX, 1), libc.mallopt(_M_MMAP_MAX, 0),
          libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)]
    return all(r == 1 for r in ok)
