"""2-D convolution with a backward pass that XLA:CPU runs fast; a drop-in for `nn.Conv`.

Why this exists (docs/performance.md has the measurements): on XLA:CPU (jax 0.10, YNNPACK
convolutions) the *forward* convolution of a ResNet runs near the machine's matmul peak, but the
two gradients that automatic differentiation derives from it do not:

  * the kernel gradient (wgrad) becomes one convolution whose window is the whole feature map
    and whose "input features" are the batch; XLA transposes both operands for it and runs it
    at 25-60% of the forward rate at batch 32, worst on 56x56 and 112x112 maps, because the
    operands of the whole batch no longer fit in cache. On one CPU device, float32 layers
    whose input channels fill vector registers (every 3x3 layer of the iResNets, U-Net and
    relighting net but the 3-channel stems) call a compiled kernel instead
    (`cpu_kernels.conv_wgrad`, an XLA FFI custom call reading both operands in place):
    1.7-2.8x XLA's kernel gradient per layer, the iResNet-50 train step 12% faster. Where
    that does not apply (or no C++ compiler is found) the same gradient is summed over small
    batch chunks whose operands fit in L2, 1.3-3x faster than one whole-batch op; the chunk
    size follows from the feature-map size (`_wgrad_chunk`; one device only — a sharded batch
    is already split, and the custom call has no partitioning rule).
  * the input gradient (dgrad) of a strided convolution becomes a convolution over the
    gradient with zeros inserted between its rows and columns (`lhs_dilation`), which spends
    s*s times the necessary work multiplying those zeros. Here it is computed by phase
    (sub-pixel) decomposition instead: input pixel (i, j) receives gradient only from the taps
    whose offset is congruent to (i, j) modulo the stride, so each of the s*s phases is a
    *stride-1* convolution with a sub-kernel, and interleaving the phases gives the gradient
    with exactly the forward's FLOPs.
  * 1x1 convolutions (the ResNet shortcuts, MobileNetV2 expansions/projections) are plain
    matmuls in every direction (`dot_general`), strided ones on a strided slice.
  * on one CPU device, float32 convolutions that would go to XLA's convolution (strided 3x3,
    stride-1 layers on large maps), to Winograd with a small output (batch-1 inference), or
    to Winograd on a narrow layer whose transformed tiles exceed the L3 cache call a compiled
    direct convolution (`cpu_kernels.conv_forward`; `_use_kernel_forward`), forward and for
    the stride-1 input gradient.
  * strided 3x3 convolutions over at most 4 channels (MobileNetV2's RGB stem) are one
    matmul over im2col patches: XLA:CPU's convolution ran the stem 3.4x slower (`_use_im2col`).
  * stride-1 3x3 convolutions with >= 64 channels use Winograd F(2x2, 3x3), forward and for
    the input gradient: 16 matmuls on transformed 4x4 tiles, 2.25x fewer multiplications;
    measured up to 1.9x faster than XLA's convolution (1.5x on the 14x14x256 layers that hold
    half of an iResNet's FLOPs) and never more than 4% slower where it is used
    (`winograd.use_winograd`). On one device, layers with >= 256 channels also take their kernel
    gradient in the Winograd domain (`winograd.wgrad`): 1.25-1.7x the compiled direct kernel
    gradient, the iResNet-50 train step 1.08-1.11x faster.
  * transposed convolutions whose kernel tiles the output (the U-Net's 2x2 stride-2
    up-convolution) are one matmul and a pixel shuffle (`ConvTranspose`), not a convolution
    over zero-inserted input.
  * dilated stride-1 convolutions (the relighting net) run as plain convolutions over the
    d*d interleaved sub-images (space-to-batch), which the paths above then speed up.
  * depthwise convolutions (MobileNetV2) go through XLA:CPU's grouped-convolution path at
    ~1 GFLOP/s; as a sum of shifted, scaled input views (one fused elementwise loop) they run
    20-40x faster forward and 6-20x faster with gradients (autodiff of the same sum). On one
    CPU device both gradients come from one pass of a compiled kernel instead
    (`cpu_kernels.depthwise_bwd`): the MobileNetV2-SE train step 1.41x faster.

`conv(x, kernel, ...)` is the functional form, `Conv` the flax module: the same parameters as
`nn.Conv` (`kernel` (kh, kw, in/groups, out), `bias` (out,)), the same initialisers and dtype
promotion, so checkpoints and `load_torch_state` converters do not change. `conv_module(impl)`
picks the implementation from a model attribute (`conv_impl`): "xla" is `nn.Conv` itself,
"fast" this file, "auto" (the models' default) "fast" on the CPU backend and "xla" elsewhere.
Numerics: outputs and gradients agree with XLA's to float32 rounding (tests/test_fast_conv.py;
the formulations sum the same products in other orders, relative differences ~1e-6).

Scope: NHWC inputs with one batch axis, 2-D kernels, any stride, dilation, explicit or
"SAME"/"VALID" padding and feature groups (depthwise included).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowlight.models import cpu_kernels, winograd

#: Values `conv_impl` may take in the models that thread it through. "auto" is "fast" when
#: the default backend is the CPU (where it was measured faster) and "xla" elsewhere (GPU/TPU
#: convolution libraries differentiate convolutions well; per-image kernel-gradient ops would
#: only add launches there).
CONV_IMPLS: tuple[str, ...] = ("auto", "xla", "fast")

_DN = ("NHWC", "HWIO", "NHWC")
#: Target bytes of one wgrad chunk's input activations (at least one image per chunk).
#: Measured on one Zen 5 core (1 MiB L2) at batch 32: 400-800 KiB chunks ran the kernel
#: gradient 1.2-3x faster than the whole batch at once (docs/performance.md). Re-checked
#: inside the iResNet-50 train step: targets of 128 KiB-1 MiB were equal; whole batches up to
#: 8 / 16 MiB were 6% / 11% slower. Alone, a layer's operands stay in L3 between calls, so
#: some single-layer figures disagree with the model.
_WGRAD_CHUNK_BYTES = 512 << 10
#: Below this many bytes of input activations the kernel gradient is one op.
_WGRAD_WHOLE_BATCH_BYTES = 2 << 20


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(v, int | np.integer):
        return int(v), int(v)
    v = tuple(int(a) for a in v)
    if len(v) != 2:
        raise ValueError(f"{name}: expected an int or 2 ints, got {v}")
    return v


def resolve_padding(padding: Any, in_hw: tuple[int, int], kernel_hw: tuple[int, int],
                    strides: tuple[int, int], dilation: tuple[int, int]
                    ) -> tuple[tuple[int, int], tuple[int, int]]:
    """flax/lax padding ("SAME", "VALID", int, (lo, hi) pairs) -> ((lo, hi), (lo, hi))."""
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"padding {padding!r}: fast_conv supports 'SAME', 'VALID', an int "
                             f"or (lo, hi) pairs (use conv_impl='xla' for {padding!r})")
        effective = tuple((k - 1) * d + 1 for k, d in zip(kernel_hw, dilation))
        pads = lax.padtype_to_pads(in_hw, effective, strides, padding.upper())
        return tuple((int(lo), int(hi)) for lo, hi in pads)
    if isinstance(padding, int | np.integer):
        return (int(padding),) * 2, (int(padding),) * 2
    pads = tuple(padding)
    if len(pads) != 2:
        raise ValueError(f"padding {padding!r}: expected 2 (lo, hi) pairs for a 2-D conv")
    out = []
    for p in pads:
        pair = (int(p), int(p)) if isinstance(p, int | np.integer) else tuple(int(a) for a in p)
        out.append(pair)
    return tuple(out)


# --------------------------------------------------------------------------------------------
# the three directions
# --------------------------------------------------------------------------------------------
def _xla_conv(x, w, strides, padding, dilation, groups, precision):
    return lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation,
                                    dimension_numbers=_DN, feature_group_count=groups,
                                    precision=precision)


def _use_winograd_wgrad(x_shape, w_shape, strides, dilation, groups, padding) -> bool:
    """The Winograd-domain kernel gradient (`winograd.wgrad`): on one device (where the batch
    is whole; a sharded batch keeps the per-device paths that were measured), for layers whose
    forward is Winograd and wide enough (`winograd.WINO_WGRAD_MIN_CHANNELS`). Callers check
    that the operands are float32: bfloat16 keeps XLA's kernel gradient, where the transforms'
    sums would be rounded to 8 bits before the matmuls."""
    return (winograd.use_winograd(x_shape, w_shape, strides, dilation, groups, padding)
            and winograd.wide_enough_for_wgrad(w_shape) and not _multi_device())


def _winograd_wgrad(x, dy, padding, precision):
    """`winograd.wgrad` summed over chunks of whole images (bounded transformed planes)."""
    return _sum_over_image_chunks(
        lambda xc, dyc: winograd.wgrad(xc, dyc, padding, precision), x, dy,
        winograd.wgrad_chunk_images(x.shape, padding))


def _sum_over_image_chunks(fn, x, dy, n: int):
    """sum of fn(x[i:i+n], dy[i:i+n]) over chunks of n images (one call if n covers the batch).
    A static python loop, not lax.scan/map: XLA:CPU runs a convolution or matmul inside a
    loop body through its generic emitter, far slower than the library call used outside."""
    total = None
    for start in range(0, x.shape[0], n):
        part = fn(x[start : start + n], dy[start : start + n])
        total = part if total is None else total + part
    return total


def _is_pointwise(w, padding, groups) -> bool:
    return w.shape[0] == w.shape[1] == 1 and groups == 1 and padding == ((0, 0), (0, 0))


#: Multiply-adds (output pixels x kh x kw x in x out channels) up to which the compiled forward
#: kernel replaces Winograd. At batch 1 it ran iResNet-50's 56x56x64, 28x28x128 and 7x7x512
#: layers (116M each) 1.2-1.9x faster than Winograd or XLA's convolution and 14x14x256 at par;
#: 112x112x64 (462M) 0.88x, and the U-Net's twice-as-wide layers (462M) lost inside the model
#: (batch-1 latency 42.6 vs 33.7 ms), where Winograd's 2.25x fewer multiplications pay.
KERNEL_FWD_MAX_WINOGRAD_MACS = 150_000_000
#: Bytes of Winograd's transformed tiles (16 planes of the input and of the output) beyond
#: which a narrow layer (channels below winograd.WINO_WIDE) runs the compiled kernel instead:
#: past the L3 cache the transforms are memory-bound. 56x56x64 at batch 32 (205 MB): 1.07x Winograd;
#: 112x112x64 at batch 1 (26 MB) stays Winograd (the kernel 0.88x).
KERNEL_FWD_MIN_WINOGRAD_BYTES = 32 << 20


def _use_kernel_forward(x_shape, w_shape, strides, padding, dilation, groups,
                        use_wino: bool) -> bool:
    """Whether the compiled forward (`cpu_kernels.conv_forward`) should run this shape: on one
    CPU device, where the alternative is XLA's convolution, Winograd on a small output (batch-1
    inference), or Winograd on a narrow layer whose transformed tiles would not stay in cache.
    Callers check that the operands are float32 (`_dense`)."""
    if use_wino:
        b, h, wd, _ = x_shape
        ho = (h + sum(padding[0]) - w_shape[0]) // strides[0] + 1
        wo = (wd + sum(padding[1]) - w_shape[1]) // strides[1] + 1
        _, _, th, tw = winograd.tile_grid(x_shape, padding)
        plane_bytes = 16 * b * th * tw * (w_shape[2] + w_shape[3]) * 4
        small = b * ho * wo * int(np.prod(w_shape)) <= KERNEL_FWD_MAX_WINOGRAD_MACS
        narrow_large = (not winograd.is_wide(w_shape)
                        and plane_bytes > KERNEL_FWD_MIN_WINOGRAD_BYTES)
        if not (small or narrow_large):
            return False
    return (_one_cpu_device()
            and cpu_kernels.forward_supported(x_shape, w_shape, jnp.float32, jnp.float32,
                                              dilation, groups, padding))


#: Input channels up to which a strided convolution with at most IM2COL_MAX_TAPS taps (an
#: RGB stem) runs as one matmul over im2col patches (`_im2col`).
IM2COL_MAX_IN_CHANNELS = 4
IM2COL_MAX_TAPS = 9


def _use_im2col(x_shape, w_shape, strides, dilation, groups) -> bool:
    """Strided 3x3 (or smaller) convolutions over few channels. XLA:CPU's convolution ran
    3 -> 24 and 3 -> 32 at stride 2 on 112x112 (MobileNetV2's stem) in 25.5 and 11.5 ms at
    batch 32, the patches and one matmul in 3.6 and 3.4 (batch 64: 22.1 vs 6.1; batch 1:
    0.35 vs 0.21); for 16, 48, 64 and 96 output channels im2col measured 0.8-1.1x XLA's
    time. Not adopted where it lost: 7x7 stride 2 (19.0 vs 10.9 ms, 3 -> 64) and stride 1
    (iResNet's 3 -> 64 stem: 10.1 vs 9.8 ms)."""
    return (strides != (1, 1) and groups == 1 and tuple(dilation) == (1, 1)
            and x_shape[-1] <= IM2COL_MAX_IN_CHANNELS
            and w_shape[0] * w_shape[1] <= IM2COL_MAX_TAPS)


def _im2col(x, w, strides, padding, precision):
    """The convolution as patches (B, HO, WO, KH*KW*CI), tap-major as HWIO flattens, times
    the kernel reshaped to (KH*KW*CI, CO)."""
    kh, kw, ci, co = w.shape
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    (sh, sw) = strides
    ho = (xp.shape[1] - kh) // sh + 1
    wo = (xp.shape[2] - kw) // sw + 1
    cols = [lax.slice(xp, (0, i, j, 0), (xp.shape[0], i + sh * (ho - 1) + 1,
                                         j + sw * (wo - 1) + 1, ci), (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]
    patches = jnp.concatenate(cols, axis=-1)
    return lax.dot_general(patches, w.reshape(kh * kw * ci, co), (((3,), (0,)), ((), ())),
                           precision=precision)


def _dense(x, w, strides, padding, dilation, groups, precision):
    """A dense (not pointwise) convolution by the fastest path measured for its shape:
    the compiled kernel, im2col, Winograd or XLA's convolution."""
    if _use_im2col(x.shape, w.shape, strides, dilation, groups):
        return _im2col(x, w, strides, padding, precision)
    use_wino = winograd.use_winograd(x.shape, w.shape, strides, dilation, groups, padding)
    if (x.dtype == jnp.float32 and w.dtype == jnp.float32
            and _use_kernel_forward(x.shape, w.shape, strides, padding, dilation, groups,
                                    use_wino)):
        return cpu_kernels.conv_forward(x, w, strides, padding)
    if use_wino:
        return winograd.forward(x, w, padding, precision, chunked=not _multi_device())
    return _xla_conv(x, w, strides, padding, dilation, groups, precision)


def _forward(x, w, strides, padding, dilation, groups, precision):
    if _is_pointwise(w, padding, groups):
        xs = x[:, :: strides[0], :: strides[1], :]
        return lax.dot_general(xs, w[0, 0], (((3,), (0,)), ((), ())), precision=precision)
    return _dense(x, w, strides, padding, dilation, groups, precision)


def _flip_io(w):
    """(kh, kw, I, O) -> (kh, kw, O, I) flipped in space: the kernel that maps a stride-1
    convolution's output gradient back to its input (its own inverse)."""
    return jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)


def _transposed_kernel(w, groups):
    """(kh, kw, Cg, G*Og) -> (kh, kw, Og, G*Cg): the kernel of the input-gradient conv."""
    kh, kw, cg, o = w.shape
    og = o // groups
    w = w.reshape(kh, kw, cg, groups, og).transpose(0, 1, 4, 3, 2)
    return w.reshape(kh, kw, og, groups * cg)


def _phases(k: int, s: int, d: int, pad_lo: int, n_in: int):
    """1-D phase plan: for input position j = i + pad_lo = q + s*t, the taps (kk, a) with
    kk*d = q + s*a; t runs over the common range [t0, t1] of all phases."""
    taps = [[(kk, (kk * d - q) // s) for kk in range(k) if (kk * d - q) % s == 0]
            for q in range(s)]
    return taps, pad_lo // s, (pad_lo + n_in - 1) // s


def _dgrad_strided(dy, w, x_shape, strides, padding, dilation, groups, precision):
    """Input gradient of a strided conv by phase decomposition (module docstring)."""
    b, h, wd, c = x_shape
    _, ho, wo, _ = dy.shape
    wt = _transposed_kernel(w, groups)
    (th, th0, th1), (tw, tw0, tw1) = (
        _phases(w.shape[0], strides[0], dilation[0], padding[0][0], h),
        _phases(w.shape[1], strides[1], dilation[1], padding[1][0], wd),
    )
    n_h, n_w = th1 - th0 + 1, tw1 - tw0 + 1
    rows = []
    for taps_h in th:
        cols = []
        for taps_w in tw:
            if not taps_h or not taps_w:
                cols.append(jnp.zeros((b, n_h, n_w, c), dy.dtype))
                continue
            ah, aw = max(a for _, a in taps_h), max(a for _, a in taps_w)
            # Dense sub-kernel: tap (kk, ll) sits at (ah - a, aw - a'); absent taps are zero.
            sub = jnp.zeros((ah + 1, aw + 1) + wt.shape[2:], wt.dtype)
            for kk, a in taps_h:
                for ll, a2 in taps_w:
                    sub = sub.at[ah - a, aw - a2].set(wt[kk, ll])
            pads = ((ah - th0, th1 - (ho - 1)), (aw - tw0, tw1 - (wo - 1)))
            cols.append(_xla_conv(dy, sub, (1, 1), pads, (1, 1), groups, precision))
        rows.append(jnp.stack(cols, axis=3))  # (B, n_h, n_w, s_w, C)
    full = jnp.stack(rows, axis=2).reshape(b, n_h * strides[0], n_w * strides[1], c)
    oh, ow = padding[0][0] - strides[0] * th0, padding[1][0] - strides[1] * tw0
    return full[:, oh : oh + h, ow : ow + wd, :]


def _dgrad(dy, w, x_shape, strides, padding, dilation, groups, precision):
    if _is_pointwise(w, padding, groups):
        g = lax.dot_general(dy, w[0, 0], (((3,), (1,)), ((), ())), precision=precision)
        if strides == (1, 1):
            return g
        b, h, wd, _ = x_shape
        # Scatter to the strided positions: interior padding, then trim/extend to (h, wd).
        cfg = [(0, 0, 0), (0, h - ((g.shape[1] - 1) * strides[0] + 1), strides[0] - 1),
               (0, wd - ((g.shape[2] - 1) * strides[1] + 1), strides[1] - 1), (0, 0, 0)]
        return lax.pad(g, jnp.zeros((), g.dtype), cfg)
    if strides == (1, 1):
        back_pad = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(w.shape[:2], padding))
        if dilation == (1, 1) and groups == 1 and min(p for pair in back_pad for p in pair) >= 0:
            # The stride-1 input gradient is the convolution of dy with the flipped, in/out
            # transposed kernel: the same choice of paths as the forward.
            wt = _flip_io(w)
            if (winograd.use_winograd(dy.shape, wt.shape, strides, dilation, groups, back_pad)
                    or _use_kernel_forward(dy.shape, wt.shape, strides, back_pad, dilation,
                                           groups, False)):
                return _dense(dy, wt, strides, back_pad, dilation, groups, precision)
        # Otherwise XLA's own transposed convolution: no inserted zeros at stride 1, fast.
        _, vjp = jax.vjp(lambda x: _xla_conv(x, w, strides, padding, dilation, groups,
                                             precision), jnp.zeros(x_shape, dy.dtype))
        return vjp(dy)[0]
    return _dgrad_strided(dy, w, x_shape, strides, padding, dilation, groups, precision)


def _multi_device() -> bool:
    return jax.device_count() > 1


def _one_cpu_device() -> bool:
    """Where the compiled `cpu_kernels` may run: a custom call has no SPMD partitioning rule,
    so with several devices (a sharded batch) the JAX paths run."""
    return not _multi_device() and jax.default_backend() == "cpu"


def _wgrad_chunk(x_shape, itemsize: int) -> int:
    """Images per wgrad chunk: as many as fit in `_WGRAD_CHUNK_BYTES`, a divisor of the batch;
    the whole batch when it is small enough to stay in cache anyway (fewer ops to compile)."""
    b = x_shape[0]
    per_image = int(np.prod(x_shape[1:])) * itemsize
    if b * per_image <= _WGRAD_WHOLE_BATCH_BYTES or _multi_device():
        # With several devices the batch is sharded over them (each already holds a fraction
        # of it), and a chunk of consecutive images would live on one device only.
        return b
    n = max(1, min(b, _WGRAD_CHUNK_BYTES // max(per_image, 1)))
    while b % n:
        n -= 1
    return n


def _wgrad(x, dy, w_shape, w_dtype, strides, padding, dilation, groups, precision):
    if _is_pointwise_shape(w_shape, padding, groups):
        xs = x[:, :: strides[0], :: strides[1], :]
        g = lax.dot_general(xs, dy, (((0, 1, 2), (0, 1, 2)), ((), ())), precision=precision)
        return g.reshape(w_shape).astype(w_dtype)

    if (x.dtype == dy.dtype == jnp.float32
            and _use_winograd_wgrad(x.shape, w_shape, strides, dilation, groups, padding)):
        return _winograd_wgrad(x, dy, padding, precision).astype(w_dtype)

    if (_one_cpu_device()
            and cpu_kernels.wgrad_supported(x.shape, dy.shape, w_shape, x.dtype, strides,
                                            padding, dilation, groups)):
        return cpu_kernels.conv_wgrad(x, dy, w_shape, strides, padding).astype(w_dtype)

    def one(xc, dyc):
        _, vjp = jax.vjp(lambda w: _xla_conv(xc, w, strides, padding, dilation, groups,
                                             precision), jnp.zeros(w_shape, w_dtype))
        return vjp(dyc)[0]

    return _sum_over_image_chunks(one, x, dy, _wgrad_chunk(x.shape, x.dtype.itemsize))


def _is_pointwise_shape(w_shape, padding, groups) -> bool:
    return w_shape[0] == w_shape[1] == 1 and groups == 1 and padding == ((0, 0), (0, 0))


def _is_depthwise(x_channels: int, w_shape, groups: int) -> bool:
    return groups > 1 and groups == x_channels and w_shape[2] == 1


def _depthwise(x, w, strides, padding, dilation, precision):
    """Depthwise conv (groups = in channels, kernel (kh, kw, 1, C*m)) as a sum of shifted,
    scaled views of the input: one fused elementwise loop instead of XLA:CPU's grouped
    convolution, which runs ~1 GFLOP/s here (20-40x slower forward, 6-20x slower with its
    gradients). On one CPU device, float32 without dilation or channel multiplier
    (MobileNetV2): the forward from the compiled `cpu_kernels.depthwise_forward` (it reads x
    unpadded, where the sum reads a padded copy; MobileNetV2-SE train step 2-4% faster), both
    gradients from one pass of `cpu_kernels.depthwise_bwd`; otherwise the sum and its autodiff
    (fused loops and per-tap reductions)."""
    if (_one_cpu_device() and x.dtype == w.dtype
            and cpu_kernels.depthwise_supported(x.shape, w.shape, x.dtype, dilation)):
        return _depthwise_kernel_bwd(x, w, strides, padding)
    return _depthwise_sum(x, w, strides, padding, dilation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_kernel_bwd(x, w, strides, padding):
    return cpu_kernels.depthwise_forward(x, w, strides, padding)


def _depthwise_kernel_bwd_fwd(x, w, strides, padding):
    return cpu_kernels.depthwise_forward(x, w, strides, padding), (x, w)


def _depthwise_kernel_bwd_bwd(strides, padding, res, dy):
    x, w = res
    return cpu_kernels.depthwise_bwd(x, w, dy, strides, padding)


_depthwise_kernel_bwd.defvjp(_depthwise_kernel_bwd_fwd, _depthwise_kernel_bwd_bwd)


def _depthwise_sum(x, w, strides, padding, dilation):
    """The forward as one fused elementwise sum over the taps (exact float32 products)."""
    kh, kw, _, o = w.shape
    b, h, wd, c = x.shape
    if o != c:  # channel multiplier m: output channel c*m + j reads input channel c
        x = jnp.repeat(x, o // c, axis=-1)
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    (sh, sw), (dh, dw) = strides, dilation
    ho = (xp.shape[1] - (kh - 1) * dh - 1) // sh + 1
    wo = (xp.shape[2] - (kw - 1) * dw - 1) // sw + 1
    y = None
    for i in range(kh):
        for j in range(kw):
            start = (0, i * dh, j * dw, 0)
            stop = (b, i * dh + sh * (ho - 1) + 1, j * dw + sw * (wo - 1) + 1, o)
            term = lax.slice(xp, start, stop, (1, sh, sw, 1)) * w[i, j, 0]
            y = term if y is None else y + term
    return y


def _space_to_batch_ok(x_shape, w_shape, strides, padding, dilation, groups) -> bool:
    """Dilated, stride-1, 'SAME'-padded odd kernels on maps divisible by the dilation."""
    d = dilation[0]
    return (d > 1 and dilation == (d, d) and strides == (1, 1) and groups == 1
            and w_shape[0] == w_shape[1] and w_shape[0] % 2 == 1
            and padding == ((d * (w_shape[0] - 1) // 2,) * 2,) * 2
            and x_shape[1] % d == 0 and x_shape[2] % d == 0)


def _dilated_by_space_to_batch(x, w, d, precision):
    """A dilation-d conv is a plain conv over each of the d*d interleaved sub-images
    (rows and columns i = r (mod d)): reshape them into the batch, convolve (fast path,
    Winograd where it pays), reshape back. XLA:CPU's dilated convolution ran 160 GFLOP/s on
    the relighting net's 112x112x208 layers against 170-180 this way, and its gradients 2.5x
    slower than fast_conv's; as plain 3x3 convs they also qualify for Winograd."""
    b, h, wd, c = x.shape
    o = w.shape[-1]
    xs = x.reshape(b, h // d, d, wd // d, d, c).transpose(0, 2, 4, 1, 3, 5)
    xs = xs.reshape(b * d * d, h // d, wd // d, c)
    p = (w.shape[0] - 1) // 2
    y = _conv_fast(xs, w, (1, 1), ((p, p), (p, p)), (1, 1), 1, precision)
    y = y.reshape(b, d, d, h // d, wd // d, o).transpose(0, 3, 1, 4, 2, 5)
    return y.reshape(b, h, wd, o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _conv_fast(x, w, strides, padding, dilation, groups, precision):
    return _forward(x, w, strides, padding, dilation, groups, precision)


def _conv_fast_fwd(x, w, strides, padding, dilation, groups, precision):
    return _forward(x, w, strides, padding, dilation, groups, precision), (x, w)


def _conv_fast_bwd(strides, padding, dilation, groups, precision, res, dy):
    x, w = res
    dx = _dgrad(dy, w, x.shape, strides, padding, dilation, groups, precision)
    dw = _wgrad(x, dy, w.shape, w.dtype, strides, padding, dilation, groups, precision)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_conv_fast.defvjp(_conv_fast_fwd, _conv_fast_bwd)


def conv(x: jax.Array, kernel: jax.Array, *, strides: int | Sequence[int] = 1,
         padding: Any = "SAME", dilation: int | Sequence[int] = 1, groups: int = 1,
         impl: str = "fast", precision: Any = None) -> jax.Array:
    """2-D convolution of NHWC `x` with an HWIO `kernel` ((kh, kw, in/groups, out)).

    Args:
      strides, dilation: int or (h, w); dilation is the kernel (atrous) dilation.
      padding: "SAME", "VALID", an int, or ((lo, hi), (lo, hi)), as `nn.Conv`.
      groups: feature groups (`nn.Conv.feature_group_count`); in channels = groups * kernel in.
      impl: "fast" (this module's paths), "xla" (plain `lax.conv_general_dilated`) or "auto"
        (`resolve_impl`).
    """
    if x.ndim != 4:
        raise ValueError(f"fast_conv.conv: expected NHWC input (B, H, W, C), got shape {x.shape}")
    if kernel.ndim != 4:
        raise ValueError(f"fast_conv.conv: expected an HWIO kernel, got shape {kernel.shape}")
    impl = resolve_impl(impl)
    if x.shape[-1] != kernel.shape[2] * groups:
        raise ValueError(f"fast_conv.conv: input has {x.shape[-1]} channels but the kernel "
                         f"{kernel.shape} with groups={groups} expects {kernel.shape[2] * groups}")
    if kernel.shape[3] % groups:
        raise ValueError(f"fast_conv.conv: {kernel.shape[3]} output channels are not divisible "
                         f"by groups={groups}")
    strides, dilation = _pair(strides, "strides"), _pair(dilation, "dilation")
    pads = resolve_padding(padding, x.shape[1:3], kernel.shape[:2], strides, dilation)
    if impl == "xla" or not _static(x.shape):
        return _xla_conv(x, kernel, strides, pads, dilation, groups, precision)
    if _is_depthwise(x.shape[-1], kernel.shape, groups):
        return _depthwise(x, kernel, strides, pads, dilation, precision)
    if _space_to_batch_ok(x.shape, kernel.shape, strides, pads, dilation, groups):
        return _dilated_by_space_to_batch(x, kernel, dilation[0], precision)
    return _conv_fast(x, kernel, strides, pads, dilation, int(groups), precision)


# --------------------------------------------------------------------------------------------
# flax module
# --------------------------------------------------------------------------------------------
class Conv(nn.Module):
    """`nn.Conv` for 2-D NHWC inputs with `fast_conv.conv` inside; identical parameters.

    Attributes are `nn.Conv`'s (the subset meaningful for 2-D convolutions) plus `impl`.
    """

    features: int
    kernel_size: Sequence[int]
    strides: int | Sequence[int] = 1
    padding: Any = "SAME"
    kernel_dilation: int | Sequence[int] = 1
    feature_group_count: int = 1
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()
    impl: str = "fast"

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        if inputs.ndim != 4:
            raise ValueError(f"fast_conv.Conv {self.name}: expected NHWC input (B, H, W, C), "
                             f"got shape {inputs.shape}")
        kh, kw = _pair(self.kernel_size, "kernel_size")
        in_features = inputs.shape[-1]
        if in_features % self.feature_group_count:
            raise ValueError(f"fast_conv.Conv {self.name}: {in_features} input channels are not "
                             f"divisible by feature_group_count={self.feature_group_count}")
        kernel_shape = (kh, kw, in_features // self.feature_group_count, self.features)
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = conv(inputs, kernel, strides=self.strides, padding=self.padding,
                 dilation=self.kernel_dilation, groups=self.feature_group_count,
                 impl=self.impl, precision=self.precision)
        if bias is not None:
            y = y + bias.reshape((1, 1, 1, -1))
        return y


def _static(shape) -> bool:
    """False for symbolic shapes (`jax.export` with a symbolic batch): the paths above choose
    by comparing sizes, which a symbolic dimension cannot answer, so such programs use XLA's
    convolution (the same numbers to float32 rounding)."""
    return all(isinstance(d, int | np.integer) for d in shape)


def resolve_impl(impl: str) -> str:
    """"auto" -> "fast" on the CPU backend, "xla" on others; "xla"/"fast" unchanged."""
    if impl == "auto":
        return "fast" if jax.default_backend() == "cpu" else "xla"
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl {impl!r}; valid: {', '.join(CONV_IMPLS)}")
    return impl


def _tiled_transpose(x, kernel, precision):
    """Transposed convolution whose kh x kw kernel tiles the output (strides == kernel size,
    VALID): one matmul (C_in -> kh*kw*C_out) and a pixel shuffle. lax.conv_transpose puts
    x[i, j] @ K[kh-1-a, kw-1-b] at output (kh*i + a, kw*j + b): a flipped kernel."""
    b, h, w, c = x.shape
    kh, kw, _, o = kernel.shape
    k = jnp.flip(kernel, (0, 1)).transpose(2, 0, 1, 3).reshape(c, kh * kw * o)
    y = lax.dot_general(x, k, (((3,), (0,)), ((), ())), precision=precision)
    y = y.reshape(b, h, w, kh, kw, o).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(b, h * kh, w * kw, o)


def _tiled_transpose_kernels_ok(x_shape, k_shape, dtype) -> bool:
    """Whether both gradients of `_tiled_transpose` can run the compiled kernels: one CPU
    device, float32, input and output channels whole vectors."""
    kh, kw, c, o = k_shape
    dy_shape = (x_shape[0], x_shape[1] * kh, x_shape[2] * kw, o)
    valid = ((0, 0), (0, 0))
    return (dtype == jnp.float32 and _one_cpu_device()
            and cpu_kernels.wgrad_supported(dy_shape, x_shape, (kh, kw, o, c), dtype, (kh, kw),
                                            valid, (1, 1), 1)
            and cpu_kernels.forward_supported(dy_shape, (kh, kw, o, c), dtype, dtype, (1, 1), 1,
                                              valid))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _tiled_transpose_kernels(x, kernel, precision):
    return _tiled_transpose(x, kernel, precision)


def _tiled_transpose_kernels_fwd(x, kernel, precision):
    return _tiled_transpose(x, kernel, precision), (x, kernel)


def _tiled_transpose_kernels_bwd(precision, res, dy):
    """Both gradients are ordinary convolutions of dy, strided by the kernel size:
    dx = conv(dy, K flipped, (o, c) swapped), and dK (flipped, swapped) is the kernel
    gradient of a conv that reads dy at stride (kh, kw) against x as its output gradient.
    Autodiff of the matmul form instead transposed dy channel-major for the kernel's matmul
    (the U-Net's 112x112x64 up-convolution: 102 ms of a 4 s train step)."""
    x, kernel = res
    kh, kw, c, o = kernel.shape
    kt = _flip_io(kernel)  # (kh, kw, o, c)
    valid = ((0, 0), (0, 0))
    dx = cpu_kernels.conv_forward(dy, kt, (kh, kw), valid)
    dkt = cpu_kernels.conv_wgrad(dy, x, (kh, kw, o, c), (kh, kw), valid)
    return dx.astype(x.dtype), _flip_io(dkt).astype(kernel.dtype)


_tiled_transpose_kernels.defvjp(_tiled_transpose_kernels_fwd, _tiled_transpose_kernels_bwd)


class ConvTranspose(nn.Module):
    """`nn.ConvTranspose` for 2-D NHWC inputs; identical parameters and outputs.

    When the kernel tiles the output exactly (kernel_size == strides, "VALID" padding, no
    dilation — the U-Net's 2x2 stride-2 up-convolution) each input pixel writes its own
    kh x kw output block, so the layer is one matmul (C_in -> kh*kw*C_out) and a reshape. XLA
    instead runs a convolution over the input with (stride - 1) zeros inserted between pixels,
    multiplying those zeros: s*s times the work forward and in the input gradient. On one CPU
    device (float32, channels whole vectors) its gradients run the compiled kernels
    (`_tiled_transpose_kernels_bwd`). Other configurations use `lax.conv_transpose` as
    `nn.ConvTranspose` does.
    """

    features: int
    kernel_size: Sequence[int]
    strides: int | Sequence[int] = 1
    padding: Any = "SAME"
    kernel_dilation: int | Sequence[int] = 1
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()
    impl: str = "fast"

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        if inputs.ndim != 4:
            raise ValueError(f"fast_conv.ConvTranspose {self.name}: expected NHWC input "
                             f"(B, H, W, C), got shape {inputs.shape}")
        kh, kw = _pair(self.kernel_size, "kernel_size")
        strides = _pair(self.strides, "strides")
        dilation = _pair(self.kernel_dilation, "kernel_dilation")
        kernel = self.param("kernel", self.kernel_init, (kh, kw, inputs.shape[-1], self.features),
                            self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        tiles = (isinstance(self.padding, str) and self.padding.upper() == "VALID"
                 and strides == (kh, kw) and dilation == (1, 1))
        if resolve_impl(self.impl) == "fast" and tiles and _static(inputs.shape):
            if _tiled_transpose_kernels_ok(inputs.shape, kernel.shape, inputs.dtype):
                y = _tiled_transpose_kernels(inputs, kernel, self.precision)
            else:
                y = _tiled_transpose(inputs, kernel, self.precision)
        else:
            pad = self.padding.upper() if isinstance(self.padding, str) else self.padding
            y = lax.conv_transpose(inputs, kernel, strides, pad, rhs_dilation=dilation,
                                   precision=self.precision)
        if bias is not None:
            y = y + bias.reshape((1, 1, 1, -1))
        return y


def conv_transpose_module(impl: str):
    """The transposed-conv class for a model's `conv_impl` (as `conv_module`)."""
    impl = resolve_impl(impl)
    return nn.ConvTranspose if impl == "xla" else functools.partial(ConvTranspose, impl="fast")


def conv_module(impl: str):
    """The conv class for a model's `conv_impl`: `nn.Conv` for "xla", `Conv(impl="fast")`
    for "fast", and either for "auto" (`resolve_impl`)."""
    impl = resolve_impl(impl)
    if impl == "xla":
        return nn.Conv
    if impl == "fast":
        return functools.partial(Conv, impl="fast")
    raise ValueError(f"conv_impl {impl!r}; valid: {', '.join(CONV_IMPLS)}")
