"""lowlight.cpu_malloc: when the settings apply, and that they do keep freed memory (a freed
block is reused without page faults), checked in fresh interpreters."""

import os
import platform
import subprocess
import sys

import pytest

from lowlight import cpu_malloc

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")

# Allocate (malloc), touch and free a 64 MiB block three times, counting minor page faults of
# the last two rounds. glibc's defaults mmap such a block afresh each time (16k faults per
# round); with the settings the freed memory is kept and the next round faults (almost) nothing.
_PROBE = """
import ctypes, resource, sys
from lowlight import cpu_malloc
applied = cpu_malloc.apply(force=len(sys.argv) > 1)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def round_trip(n=64 << 20):
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
round_trip()
start = faults()
round_trip()
round_trip()
print(applied, faults() - start)
"""


def _probe(env_extra: dict, *args) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LOWLIGHT_MALLOC")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", _PROBE, *args], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])


def test_settings_keep_freed_memory():
    applied, faults = _probe({}, "force")
    assert applied
    assert faults < 1000  # two rounds of 16k 4-KiB pages each without the settings
    applied, faults_default = _probe({"LOWLIGHT_MALLOC": "default"}, "force")
    assert not applied
    # (with transparent huge pages "always" the default rounds fault 2 MiB pages: fewer)
    assert faults_default > 2 * 14_000 or faults_default > 10 * faults


def test_applies_on_cpu_only_installs_and_respects_the_user():
    assert _probe({"JAX_PLATFORMS": "cpu"})[0]
    assert not _probe({"JAX_PLATFORMS": "cuda"})[0]  # an accelerator: leave malloc alone
    assert not _probe({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}, "force")[0]
    assert cpu_malloc.TUNABLES.startswith("glibc.malloc.arena_max=1:")
