"""CPU kernels compiled on first use and called from XLA as FFI custom calls.

Why (docs/performance.md, "Ablation" and "Compiled kernels"): some parts of a CNN step run
far slower on XLA:CPU than in PyTorch's oneDNN, and no formulation in JAX ops beat XLA's for
them inside a model:
  * the convolution kernel gradient: `kernels/conv_wgrad.cc` reads the operands in place,
    240-410 GFLOP/s against 160-250 for fast_conv's batch-chunked XLA convolution on the
    iResNet layers here; the iResNet-50 train step went from 0.84x to 0.99-1.01x PyTorch's;
  * both gradients of a depthwise convolution: `kernels/depthwise_bwd.cc` makes one pass over
    x and dy where autodiff of the shifted sum makes about two per tap;
  * the BatchNorm + activation backward: `kernels/bn_act_bwd.cc`, two passes over (x, dy)
    where XLA makes about nine; with the two above, the MobileNetV2-SE train step went from
    0.62x to 1.07x PyTorch's;
  * the forward convolution at small batch: `kernels/conv_fwd.cc`, for strided layers and
    batch-1 inference (iResNet-50 batch-1 latency 56.6 -> 48.2 ms).
All split their work into a fixed grid, so results are bitwise the same for any number of
threads (training runs repeat and resume exactly).

How: the C++ sources ship with the package and are compiled here, once per machine type, with
the system's C++ compiler (`$CXX`, else `g++`, `c++` or `clang++`) against the XLA FFI headers
that jaxlib ships (`jax.ffi.include_dir()`), with `-march=native` since the library only ever
runs on the machine that built it. The shared library is cached under `$LOWLIGHT_KERNEL_CACHE`
(default `~/.cache/lowlight/kernels`) keyed by the sources, jax's version, the compiler command
and the CPU's feature flags, so a home directory shared by different CPUs keeps one library
per CPU type. The compile writes to a temporary file and renames it, so concurrent processes
(pytest-xdist, several jobs on one node) never load a half-written library.

When the kernels cannot be used — no compiler, a failed compile or load, or
`LOWLIGHT_CPU_KERNELS=0` in the environment — `available()` returns False with the reason in
`unavailable_reason()` (logged once as a warning), and callers keep the JAX paths: the same
numbers to float32 rounding, only slower. Inside `disabled()` (used by `lowlight.export`) the
models trace without them too. They run on one CPU device only: a custom call has no SPMD
partitioning rule, so with a batch sharded over several devices the JAX paths run.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

_KERNELS = Path(__file__).with_name("kernels")
_SOURCES = (_KERNELS / "conv_wgrad.cc", _KERNELS / "depthwise_bwd.cc", _KERNELS / "bn_act_bwd.cc",
            _KERNELS / "conv_fwd.cc", _KERNELS / "depthwise_fwd.cc")
_HEADERS = (_KERNELS / "parallel.h",)
_TARGET = "lowlight_conv_wgrad_f32"
_DEPTHWISE_TARGET = "lowlight_depthwise_bwd_f32"
_BN_TARGET = "lowlight_bn_act_bwd_f32"
_FWD_TARGET = "lowlight_conv_fwd_f32"
_DEPTHWISE_FWD_TARGET = "lowlight_depthwise_fwd_f32"
_FLAGS = ("-O3", "-march=native", "-std=gnu++17", "-fPIC", "-shared", "-fno-math-errno")

_lock = threading.Lock()
_state: dict = {}  # "lib", "vector_width" once loaded; "reason" when unavailable


def _cpu_signature() -> str:
    """The CPU's model and feature flags (Linux), else the machine name: part of the cache key,
    because `-march=native` code may not run on another CPU."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() + platform.processor()
    keep = [line for line in text.splitlines()
            if line.startswith(("flags", "Features", "model name", "CPU part"))]
    return "\n".join(sorted(set(keep))) or platform.machine()


def _compiler() -> str | None:
    for cand in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if cand and shutil.which(cand):
            return cand
    return None


def cache_dir() -> Path:
    return Path(os.environ.get("LOWLIGHT_KERNEL_CACHE",
                               Path.home() / ".cache" / "lowlight" / "kernels"))


def _build(cxx: str) -> Path:
    include = jax.ffi.include_dir()
    sources = [p.read_bytes() for p in (*_SOURCES, *_HEADERS)]
    key = hashlib.sha256(b"\0".join([
        *sources, jax.__version__.encode(), cxx.encode(), " ".join(_FLAGS).encode(),
        _cpu_signature().encode(), str(include).encode()])).hexdigest()[:20]
    out = cache_dir() / f"lowlight_kernels-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *_FLAGS, "-w", f"-I{include}", *map(str, _SOURCES), "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n"
                               f"{proc.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load() -> None:
    if os.environ.get("LOWLIGHT_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        _state["reason"] = "disabled by LOWLIGHT_CPU_KERNELS"
        return
    cxx = _compiler()
    if cxx is None:
        _state["reason"] = "no C++ compiler found ($CXX, g++, c++, clang++)"
        return
    try:
        path = _build(cxx)
        lib = ctypes.cdll.LoadLibrary(str(path))
        jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.LowlightConvWgradF32),
                                    platform="cpu")
        jax.ffi.register_ffi_target(_DEPTHWISE_TARGET,
                                    jax.ffi.pycapsule(lib.LowlightDepthwiseBwdF32),
                                    platform="cpu")
        jax.ffi.register_ffi_target(_BN_TARGET, jax.ffi.pycapsule(lib.LowlightBnActBwdF32),
                                    platform="cpu")
        jax.ffi.register_ffi_target(_FWD_TARGET, jax.ffi.pycapsule(lib.LowlightConvFwdF32),
                                    platform="cpu")
        jax.ffi.register_ffi_target(_DEPTHWISE_FWD_TARGET,
                                    jax.ffi.pycapsule(lib.LowlightDepthwiseFwdF32),
                                    platform="cpu")
    except Exception as e:  # noqa: BLE001 — any failure means "use XLA's path", reported
        _state["reason"] = f"{type(e).__name__}: {e}"
        return
    _state["lib"] = lib
    _state["vector_width"] = int(lib.lowlight_kernels_vector_width())


def available() -> bool:
    """True when the compiled kernels are loaded and registered with XLA (compiling them on the
    first call in a process, a few seconds, or loading the cached library)."""
    if not _state:
        with _lock:
            if not _state:
                _load()
                if "reason" in _state:
                    logging.warning("lowlight CPU kernels unavailable (%s); using XLA's kernel "
                                    "gradient instead (same numbers, slower).", _state["reason"])
    return "lib" in _state


def unavailable_reason() -> str | None:
    available()
    return _state.get("reason")


_disabled = threading.local()


@contextlib.contextmanager
def disabled():
    """Trace without the compiled kernels (the JAX paths instead), e.g. for `jax.export`: an
    exported program must not call a custom call that exists only in this process."""
    depth = getattr(_disabled, "depth", 0)
    _disabled.depth = depth + 1
    try:
        yield
    finally:
        _disabled.depth = depth


def usable() -> bool:
    """`available()` and not inside `disabled()`: what the models' paths check."""
    return getattr(_disabled, "depth", 0) == 0 and available()


def _require() -> None:
    if not available():
        raise RuntimeError(f"lowlight CPU kernels unavailable: {unavailable_reason()}")


def vector_width() -> int:
    """Floats per vector register the library was built for (16 with AVX-512)."""
    _require()
    return _state["vector_width"]


def wgrad_stats() -> dict[str, float]:
    """Counters of the kernel-gradient kernel since the last call (for benchmarks and tests):
    calls, seconds inside it, and the work items the calling thread and the helper threads
    took (the result does not depend on who took which)."""
    if not available():
        return {}
    buf = (ctypes.c_int64 * 4)()
    _state["lib"].lowlight_kernels_wgrad_stats(buf)
    return {"calls": buf[0], "seconds": buf[1] * 1e-9, "caller_items": buf[2],
            "helper_items": buf[3]}


#: Bytes of input and output-gradient rows per work chunk of the kernel gradient (L2-sized:
#: a chunk is re-read once per tile of output channels).
WGRAD_CHUNK_BYTES = 256 << 10


def wgrad_supported(x_shape, dy_shape, w_shape, dtype, strides, padding, dilation,
                    groups) -> bool:
    """Whether `conv_wgrad` handles this convolution (and the kernels are available)."""
    return (dtype == jnp.float32 and groups == 1 and tuple(dilation) == (1, 1)
            and len(x_shape) == 4 and len(w_shape) == 4
            and padding[0][0] >= 0 and padding[1][0] >= 0
            and usable() and x_shape[-1] % vector_width() == 0)


def conv_wgrad(x: jax.Array, dy: jax.Array, w_shape, strides, padding,
               workers: int = 0) -> jax.Array:
    """Kernel gradient of an NHWC / HWIO convolution: d loss / d kernel, float32.

    x (N, H, W, CI), dy (N, OH, OW, CO) -> (KH, KW, CI, CO). `padding` is ((top, bottom),
    (left, right)); the bottom/right padding follows from dy's shape. `workers` caps the
    threads used (0: XLA's intra-op pool); the result is bitwise the same for any number."""
    _require()
    out = jax.ShapeDtypeStruct(tuple(w_shape), jnp.float32)
    return jax.ffi.ffi_call(_TARGET, out, vmap_method="sequential")(
        x.astype(jnp.float32), dy.astype(jnp.float32),
        stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
        pad_top=np.int64(padding[0][0]), pad_left=np.int64(padding[1][0]),
        chunk_bytes=np.int64(WGRAD_CHUNK_BYTES), max_workers=np.int64(workers))


def depthwise_supported(x_shape, w_shape, dtype, dilation) -> bool:
    """Whether `depthwise_bwd` handles this depthwise convolution (channel multiplier 1)."""
    return (dtype == jnp.float32 and tuple(dilation) == (1, 1) and len(x_shape) == 4
            and tuple(w_shape[2:]) == (1, x_shape[-1]) and usable())


def depthwise_bwd(x: jax.Array, w: jax.Array, dy: jax.Array, strides, padding,
                  workers: int = 0) -> tuple[jax.Array, jax.Array]:
    """Both gradients of a depthwise NHWC convolution (kernel (KH, KW, 1, C), stride
    `strides`, ((top, bottom), (left, right)) `padding`, no dilation): (dx, dw), float32,
    bitwise the same for any number of `workers` (0: XLA's intra-op pool)."""
    _require()
    outs = (jax.ShapeDtypeStruct(x.shape, jnp.float32),
            jax.ShapeDtypeStruct(w.shape, jnp.float32))
    return jax.ffi.ffi_call(_DEPTHWISE_TARGET, outs, vmap_method="sequential")(
        x.astype(jnp.float32), w.astype(jnp.float32), dy.astype(jnp.float32),
        stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
        pad_top=np.int64(padding[0][0]), pad_left=np.int64(padding[1][0]),
        max_workers=np.int64(workers))


#: Activation codes of the depthwise forward kernel (kernels/depthwise_fwd.cc).
DEPTHWISE_ACTIVATION_CODES = {"none": 0, "relu": 1, "relu6": 2}


def depthwise_forward(x: jax.Array, w: jax.Array, strides, padding, *,
                      pre: tuple | None = None, post: tuple | None = None,
                      workers: int = 0) -> jax.Array:
    """Forward of a depthwise NHWC convolution (kernel (KH, KW, 1, C), no dilation) with an
    optional per-channel affine + activation on its input (`pre`) and on its output (`post`),
    each `(mean, mul, bias, activation)`: act((v - mean) * mul + bias), the order of flax's
    BatchNorm at inference, or `(None, None, None, activation)` for the activation alone. The
    zero padding ((top, bottom), (left, right)) applies to the transformed input, as a model
    that pads its activated tensor. float32; bitwise the same for any number of `workers`.
    No gradient: callers differentiate a JAX formulation of the same function."""
    _require()
    kh, kw, _, c = w.shape
    oh = (x.shape[1] + padding[0][0] + padding[0][1] - kh) // strides[0] + 1
    ow = (x.shape[2] + padding[1][0] + padding[1][1] - kw) // strides[1] + 1
    if min(padding[0] + padding[1]) < 0 or oh < 1 or ow < 1:
        raise ValueError(f"depthwise_forward: padding {padding} with a {kh}x{kw} kernel on "
                         f"{x.shape[1:3]} gives no output (or negative padding)")
    ones = jnp.ones((c,), jnp.float32)
    attrs, vecs = {}, []
    for side, op in (("in", pre), ("out", post)):
        mean, mul, bias, act = op if op is not None else (None, None, None, "none")
        if act not in DEPTHWISE_ACTIVATION_CODES:
            raise ValueError(f"depthwise_forward: {side}put activation {act!r}; valid: "
                             f"{', '.join(DEPTHWISE_ACTIVATION_CODES)}")
        affine = mean is not None
        vecs += ([jnp.asarray(v, jnp.float32).reshape(c) for v in (mean, mul, bias)] if affine
                 else [ones, ones, ones])
        attrs[f"{side}_affine"] = np.int64(affine)
        attrs[f"{side}_act"] = np.int64(DEPTHWISE_ACTIVATION_CODES[act])
    out = jax.ShapeDtypeStruct((x.shape[0], oh, ow, c), jnp.float32)
    return jax.ffi.ffi_call(_DEPTHWISE_FWD_TARGET, out, vmap_method="sequential")(
        x.astype(jnp.float32), w.astype(jnp.float32), jnp.stack(vecs).reshape(2, 3, c),
        stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
        pad_top=np.int64(padding[0][0]), pad_left=np.int64(padding[1][0]),
        max_workers=np.int64(workers), **attrs)


#: `activation` codes of the BatchNorm backward kernel (kernels/bn_act_bwd.cc).
BN_ACTIVATION_CODES = {"none": 0, "relu": 1, "relu6": 2, "prelu": 3}


def bn_act_supported(x_dtype, dtype, stats_dtype, activation: str) -> bool:
    """Whether `bn_act_bwd` handles this BatchNorm + activation (float32 throughout)."""
    return (x_dtype == jnp.float32 and dtype == jnp.float32 and stats_dtype == jnp.float32
            and activation in BN_ACTIVATION_CODES and usable())


def bn_act_bwd(x, dy, mean, var_raw, scale, bias, slope, dmean, dvar, *, activation: str,
               eps: float, workers: int = 0):
    """Backward of train-mode BatchNorm + activation over every axis of x but the last
    (`layers._bn_act_bwd`'s closed form in two passes): (dx, dscale, dbias, dslope), float32.
    `scale` / `slope` may be None (no scale; activation other than "prelu")."""
    _require()
    c = x.shape[-1]
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    scale = jnp.ones((c,), jnp.float32) if scale is None else f32(scale)
    slope = jnp.zeros((c,), jnp.float32) if slope is None else f32(slope)
    vec = jax.ShapeDtypeStruct((c,), jnp.float32)
    outs = (jax.ShapeDtypeStruct(x.shape, jnp.float32), vec, vec, vec)
    return jax.ffi.ffi_call(_BN_TARGET, outs, vmap_method="sequential")(
        f32(x), f32(dy), f32(mean), f32(var_raw), scale, f32(bias), slope, f32(dmean),
        f32(dvar), activation=np.int64(BN_ACTIVATION_CODES[activation]), eps=np.float32(eps),
        max_workers=np.int64(workers))


#: The forward kernel keeps a block of 2 vectors of output channels' weights (kh*kw*ci*2
#: vectors) in L2; beyond this many bytes (wider layers, e.g. the U-Net's 1024-channel ones)
#: it re-reads them from L3 and lost to XLA's convolution.
FORWARD_MAX_WEIGHT_BLOCK_BYTES = 640 << 10


def forward_supported(x_shape, w_shape, x_dtype, w_dtype, dilation, groups, padding) -> bool:
    """Whether `conv_forward` handles this convolution well (and the kernels are available):
    float32, no groups or dilation, input and output channels whole vectors (a 3-channel stem
    gives the register tile too little work per tap), the weight block within L2."""
    if not (x_dtype == jnp.float32 and w_dtype == jnp.float32 and groups == 1
            and tuple(dilation) == (1, 1) and len(x_shape) == 4 and len(w_shape) == 4
            and min(padding[0] + padding[1]) >= 0 and usable()):
        return False
    vw = vector_width()
    kh, kw, ci, co = w_shape
    return (ci % vw == 0 and co % vw == 0
            and kh * kw * ci * 2 * vw * 4 <= FORWARD_MAX_WEIGHT_BLOCK_BYTES)


def conv_forward(x: jax.Array, w: jax.Array, strides, padding, workers: int = 0) -> jax.Array:
    """Forward NHWC / HWIO convolution (float32, no dilation or groups; output channels a
    multiple of `vector_width()`): `padding` ((top, bottom), (left, right)) is applied with
    `jnp.pad` first. Bitwise the same for any number of `workers` (0: XLA's intra-op pool)."""
    _require()
    kh, kw, _, co = w.shape
    xp = jnp.pad(x.astype(jnp.float32), ((0, 0), *padding, (0, 0)))
    oh = (xp.shape[1] - kh) // strides[0] + 1
    ow = (xp.shape[2] - kw) // strides[1] + 1
    out = jax.ShapeDtypeStruct((x.shape[0], oh, ow, co), jnp.float32)
    return jax.ffi.ffi_call(_FWD_TARGET, out, vmap_method="sequential")(
        xp, w.astype(jnp.float32), stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
        max_workers=np.int64(workers))
