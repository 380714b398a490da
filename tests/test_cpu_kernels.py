"""cpu_kernels: the compiled kernels (kernels/*.cc) — kernel gradient, depthwise backward,
BatchNorm + activation backward, forward convolution.

References: float64 numpy direct sums over taps (independent of XLA), XLA's own convolution and
its automatic derivative, and the JAX closed form of the BatchNorm backward. Geometries cover the
kernels' remainder paths (channels not a multiple of the register tile or of the vector width,
odd numbers of vectors), strides, asymmetric and "VALID" paddings whose output does not cover
the input, kernels larger than the map, many work items over both threads (bitwise equal to
one thread), vmap, where fast_conv and BatchNormAct call them, `disabled()` for export, and the
fallbacks (disabled, no compiler, a failed compile), which must keep the JAX paths and say why.
"""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from lowlight.models import cpu_kernels as CK
from lowlight.models import fast_conv as FC


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _numpy_wgrad(x, dy, kh, kw, strides, pads):
    """dW[i, j] = sum_{n,oy,ox} xpad[n, oy*sh + i, ox*sw + j, :] (x) dy[n, oy, ox, :]."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    (sh, sw), ((pt, _), (pl, _)) = strides, pads
    _, oh, ow, co = dy.shape
    xp = np.pad(x, ((0, 0), (pt, kh + sh), (pl, kw + sw), (0, 0)))  # generous zeros below/right
    dw = np.zeros((kh, kw, x.shape[-1], co))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw]
            dw[i, j] = np.einsum("nhwc,nhwo->co", patch, dy)
    return dw


def _xla_wgrad(x, dy, w_shape, strides, pads):
    def f(w):
        return lax.conv_general_dilated(x, w, strides, pads,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=lax.Precision.HIGHEST)

    return jax.vjp(f, jnp.zeros(w_shape, jnp.float32))[1](dy)[0]


def test_kernels_build_and_load_here():
    assert CK.available(), CK.unavailable_reason()
    assert CK.vector_width() in (4, 8, 16)
    assert CK.cache_dir().is_dir()


# (batch, H, W, C_in in vectors, C_out, (kh, kw), (sh, sw), padding)
CASES = [
    (2, 9, 9, 2, 13, (3, 3), (1, 1), ((1, 1), (1, 1))),  # 13 = a full tile of 12 and 1
    (3, 10, 7, 1, 24, (3, 3), (2, 2), ((0, 1), (1, 1))),  # "SAME" at stride 2 pads (0, 1)
    (1, 11, 11, 3, 5, (5, 5), (3, 3), ((2, 1), (0, 2))),  # 3 vectors: tiles of 2 and 1
    (2, 8, 8, 2, 12, (1, 1), (2, 2), ((0, 0), (0, 0))),  # strided 1x1 shortcut
    (2, 6, 9, 2, 7, (3, 1), (1, 2), ((1, 1), (0, 0))),  # non-square kernel, unequal strides
    (1, 4, 4, 1, 3, (5, 5), (1, 1), ((2, 2), (2, 2))),  # kernel larger than the map
    (2, 10, 10, 1, 8, (3, 3), (2, 2), ((0, 0), (0, 0))),  # VALID: the last row is never read
    (2, 5, 6, 1, 4, (3, 3), (1, 1), ((3, 0), (0, 3))),  # taps entirely outside some rows
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}h{}w{}v{}o{}k{}s{}p{}".format(*c))
def test_kernel_gradient_matches_numpy_and_xla(case):
    b, h, w, nv, co, (kh, kw), strides, pads = case
    ci = nv * CK.vector_width()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(b, h, w, ci)), jnp.float32)
    oh = (h + sum(pads[0]) - kh) // strides[0] + 1
    ow = (w + sum(pads[1]) - kw) // strides[1] + 1
    dy = jnp.asarray(rng.normal(size=(b, oh, ow, co)), jnp.float32)
    w_shape = (kh, kw, ci, co)
    got = jax.jit(lambda x, dy: CK.conv_wgrad(x, dy, w_shape, strides, pads))(x, dy)
    assert got.shape == w_shape and got.dtype == jnp.float32
    assert _rel(got, _numpy_wgrad(x, dy, kh, kw, strides, pads)) < 1e-5
    assert _rel(got, _xla_wgrad(x, dy, w_shape, strides, pads)) < 1e-5


def test_many_chunks_and_threads_give_bitwise_equal_results(monkeypatch):
    """Rows in many cache chunks (tiny chunk size) and a grid of work items taken by the caller
    and a helper thread, or by one thread: bitwise the same gradient (training runs repeat and
    resume exactly), equal to the reference."""
    ci = 2 * CK.vector_width()
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 28, 28, ci)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(4, 28, 28, 40)), jnp.float32)
    pads, w_shape = ((1, 1), (1, 1)), (3, 3, ci, 40)
    monkeypatch.setattr(CK, "WGRAD_CHUNK_BYTES", 1)  # one output row per chunk
    want = _numpy_wgrad(x, dy, 3, 3, (1, 1), pads)
    CK.wgrad_stats()
    got = [np.asarray(jax.jit(lambda x, dy, n=n: CK.conv_wgrad(x, dy, w_shape, (1, 1), pads, n))(
        x, dy)) for n in (0, 1, 0)]
    assert _rel(got[0], want) < 1e-5
    np.testing.assert_array_equal(got[0], got[1])
    np.testing.assert_array_equal(got[0], got[2])
    stats = CK.wgrad_stats()
    assert stats["calls"] == 3
    # 40 output channels = 4 tiles of 12 -> 4 channel groups x 2 row slots = 8 items per call
    assert stats["caller_items"] + stats["helper_items"] == 3 * 8


def test_wide_layer_with_large_operands_splits_by_output_channels():
    """Operands beyond L3 (here 21 MB) used to run as one work item when the partial sums
    of a row slot were too large to repeat (a 512 -> 512 layer: one thread). They now split
    by output channels as far as the arithmetic per operand byte pays for re-reading them:
    8 items, equal to XLA and bitwise the same on one thread."""
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.normal(size=(5, 32, 32, 512)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(5, 32, 32, 512)), jnp.float32)
    pads, w_shape = ((1, 1), (1, 1)), (3, 3, 512, 512)
    CK.wgrad_stats()
    got = [np.asarray(jax.jit(lambda x, dy, n=n: CK.conv_wgrad(x, dy, w_shape, (1, 1), pads, n))(
        x, dy)) for n in (0, 1)]
    stats = CK.wgrad_stats()
    assert stats["calls"] == 2
    assert stats["caller_items"] + stats["helper_items"] == 2 * 8
    assert _rel(got[0], _xla_wgrad(x, dy, w_shape, (1, 1), pads)) < 1e-5
    np.testing.assert_array_equal(got[0], got[1])


def test_per_example_gradients_under_vmap():
    ci = CK.vector_width()
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(3, 6, 6, ci)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(3, 6, 6, 5)), jnp.float32)
    pads = ((1, 1), (1, 1))
    got = jax.vmap(lambda a, b: CK.conv_wgrad(a[None], b[None], (3, 3, ci, 5), (1, 1), pads))(
        x, dy)
    for i in range(3):
        assert _rel(got[i], _numpy_wgrad(x[i : i + 1], dy[i : i + 1], 3, 3, (1, 1), pads)) < 1e-5


def test_kernel_rejects_channels_it_cannot_vectorise():
    x = jnp.ones((1, 5, 5, 3), jnp.float32)
    dy = jnp.ones((1, 5, 5, 4), jnp.float32)
    with pytest.raises(Exception, match="multiple of the vector width"):
        jax.block_until_ready(CK.conv_wgrad(x, dy, (3, 3, 3, 4), (1, 1), ((1, 1), (1, 1))))
    assert not CK.wgrad_supported((1, 5, 5, 3), (1, 5, 5, 4), (3, 3, 3, 4), jnp.float32,
                                  (1, 1), ((1, 1), (1, 1)), (1, 1), 1)


def test_fast_conv_uses_the_kernel_on_one_device(monkeypatch):
    """fast_conv's backward calls the kernel where it applies (one device, float32, no
    groups or dilation) and keeps XLA's path elsewhere; both give XLA's gradient."""
    monkeypatch.setattr(FC, "_multi_device", lambda: False)  # conftest fakes 8 devices
    ci = CK.vector_width()
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 9, 9, ci)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, ci, 6)) * 0.1, jnp.float32)

    def grad(impl, w, **kw):
        f = lambda w: jnp.sum(jnp.sin(FC.conv(x, w, impl=impl, **kw)))  # noqa: E731
        return jax.block_until_ready(jax.jit(jax.grad(f))(w))  # the counters need it done

    for stride in (1, 2):
        CK.wgrad_stats()
        got = grad("fast", w, strides=stride)
        assert CK.wgrad_stats()["calls"] == 1
        assert _rel(got, grad("xla", w, strides=stride)) < 1e-4
    # bfloat16 and dilated convolutions keep XLA's kernel gradient
    CK.wgrad_stats()
    grad("fast", w, dilation=2)
    f = lambda w: jnp.sum(FC.conv(x.astype(jnp.bfloat16), w, impl="fast"))  # noqa: E731
    jax.block_until_ready(jax.jit(jax.grad(f))(w.astype(jnp.bfloat16)))
    assert CK.wgrad_stats()["calls"] == 0


def test_disabled_by_environment():
    code = ("from lowlight.models import cpu_kernels as CK; "
            "print(CK.available(), CK.unavailable_reason())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "LOWLIGHT_CPU_KERNELS": "0"},
                         check=True)
    assert out.stdout.strip() == "False disabled by LOWLIGHT_CPU_KERNELS"
    assert "using XLA's kernel gradient instead" in out.stderr


def test_no_compiler_or_failed_compile_falls_back_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(CK, "_state", {})
    monkeypatch.setattr(CK, "_compiler", lambda: None)
    assert not CK.available()
    assert "no C++ compiler" in CK.unavailable_reason()
    assert not CK.wgrad_supported((1, 5, 5, 16), (1, 5, 5, 4), (3, 3, 16, 4), jnp.float32,
                                  (1, 1), ((1, 1), (1, 1)), (1, 1), 1)
    # fast_conv still differentiates (XLA's path)
    monkeypatch.setattr(FC, "_multi_device", lambda: False)
    x = jnp.ones((1, 5, 5, 16), jnp.float32)
    g = jax.grad(lambda w: jnp.sum(FC.conv(x, w, impl="fast")))(jnp.ones((3, 3, 16, 4)))
    assert _rel(g, _numpy_wgrad(x, np.ones((1, 5, 5, 4)), 3, 3, (1, 1), ((1, 1),) * 2)) < 1e-5

    bad = tmp_path / "bad.cc"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(CK, "_state", {})
    monkeypatch.setattr(CK, "_SOURCES", (bad,))
    monkeypatch.setattr(CK, "_compiler", lambda: "g++")
    monkeypatch.setenv("LOWLIGHT_KERNEL_CACHE", str(tmp_path / "cache"))
    assert not CK.available()
    assert "failed" in CK.unavailable_reason() and "bad.cc" in CK.unavailable_reason()
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written library left


def test_built_library_is_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWLIGHT_KERNEL_CACHE", str(tmp_path))
    first = CK._build(CK._compiler())
    assert first.parent == tmp_path and first.stat().st_size > 0

    def no_compile(*a, **k):
        raise AssertionError("recompiled although the library is cached")

    monkeypatch.setattr(CK.subprocess, "run", no_compile)
    assert CK._build(CK._compiler()) == first


def _numpy_depthwise_grads(x, w, dy, strides, pads):
    """dx and dw of y[n, oy, ox, c] = sum_taps xpad[n, oy*sh + i, ox*sw + j, c] * w[i, j, 0, c],
    by the same tap loop as `_numpy_wgrad` (float64)."""
    x, w, dy = (np.asarray(a, np.float64) for a in (x, w, dy))
    (sh, sw), ((pt, _), (pl, _)) = strides, pads
    kh, kw = w.shape[:2]
    n, h, wd, c = x.shape
    _, oh, ow, _ = dy.shape
    xp = np.pad(x, ((0, 0), (pt, kh + sh), (pl, kw + sw), (0, 0)))
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(w)
    for i in range(kh):
        for j in range(kw):
            win = (slice(None), slice(i, i + sh * (oh - 1) + 1, sh),
                   slice(j, j + sw * (ow - 1) + 1, sw))
            dw[i, j, 0] = np.einsum("nhwc,nhwc->c", xp[win], dy)
            dxp[win] += dy * w[i, j, 0]
    return dxp[:, pt : pt + h, pl : pl + wd], dw


# (batch, H, W, C, kernel, stride, padding): C covers full 4-vector blocks, single vectors and
# a scalar tail
DEPTHWISE_CASES = [
    (2, 9, 9, 4 * 16 + 16 + 5, 3, 1, ((1, 1), (1, 1))),
    (3, 10, 7, 16, 3, 2, ((0, 1), (1, 1))),
    (2, 11, 11, 7, 5, 3, ((2, 1), (0, 2))),
    (1, 4, 4, 40, 5, 1, ((2, 2), (2, 2))),
    (2, 8, 8, 144, 3, 2, ((1, 1), (1, 1))),  # MobileNetV2's stride-2 depthwise
]


@pytest.mark.parametrize("case", DEPTHWISE_CASES, ids=lambda c: "b{}h{}w{}c{}k{}s{}p{}".format(*c))
def test_depthwise_gradients_match_numpy_and_autodiff(case):
    b, h, w, c, k, s, pads = case
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(b, h, w, c)), jnp.float32)
    kern = jnp.asarray(rng.normal(size=(k, k, 1, c)), jnp.float32)
    y = FC._depthwise_sum(x, kern, (s, s), pads, (1, 1))
    dy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    dx, dw = jax.jit(lambda x, kern, dy: CK.depthwise_bwd(x, kern, dy, (s, s), pads))(x, kern, dy)
    want_dx, want_dw = _numpy_depthwise_grads(x, kern, dy, (s, s), pads)
    assert _rel(dx, want_dx) < 1e-5 and _rel(dw, want_dw) < 1e-5
    auto_dx, auto_dw = jax.vjp(lambda x, kern: FC._depthwise_sum(x, kern, (s, s), pads, (1, 1)),
                               x, kern)[1](dy)
    assert _rel(dx, auto_dx) < 1e-5 and _rel(dw, auto_dw) < 1e-5
    one = jax.jit(lambda x, kern, dy: CK.depthwise_bwd(x, kern, dy, (s, s), pads, workers=1))
    for got, want in zip(one(x, kern, dy), (dx, dw)):  # one thread: bitwise the same
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_fast_conv_depthwise_uses_the_kernel_on_one_device(monkeypatch):
    monkeypatch.setattr(FC, "_multi_device", lambda: False)  # conftest fakes 8 devices
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(2, 9, 9, 24)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 1, 24)), jnp.float32)

    def grads(impl, **kw):
        f = lambda x, w: jnp.sum(jnp.sin(FC.conv(x, w, groups=24, impl=impl, **kw)))  # noqa: E731
        return jax.jit(jax.grad(f, argnums=(0, 1)))(x, w)

    for stride in (1, 2):
        got, want = grads("fast", strides=stride), grads("xla", strides=stride)
        assert _rel(got[0], want[0]) < 1e-4 and _rel(got[1], want[1]) < 1e-4
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda w: jnp.sum(FC.conv(x, w, groups=24))))(w))
    assert CK._DEPTHWISE_TARGET in jaxpr
    monkeypatch.setattr(FC, "_multi_device", lambda: True)  # sharded batch: autodiff of the sum
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda w: jnp.sum(FC.conv(x, w, groups=24))))(w))
    assert CK._DEPTHWISE_TARGET not in jaxpr


@pytest.mark.parametrize("activation", ["none", "relu", "relu6", "prelu"])
@pytest.mark.parametrize("with_scale", [True, False])
def test_batchnorm_backward_matches_the_jax_closed_form(activation, with_scale):
    """kernels/bn_act_bwd.cc against layers._bn_act_bwd_jnp (itself tested against autodiff of
    flax's BatchNorm in test_fused_bn): channels with a scalar tail, pre-activations exactly on
    the activations' kinks, a zero and a negative raw variance (flax's clip), and non-zero
    cotangents of the returned statistics."""
    from lowlight.models import layers as L

    rng = np.random.default_rng(6)
    c = CK.vector_width() + 5
    x = rng.normal(size=(3, 5, 7, c)).astype(np.float32)
    x[:, :, :, 0] = 1.5  # constant channel: raw variance 0 (or a rounding negative)
    mean = x.mean((0, 1, 2))
    var_raw = (x * x).mean((0, 1, 2)) - mean * mean
    var_raw[0], var_raw[1] = 0.0, -1e-7
    scale = (1 + 0.1 * rng.normal(size=c)).astype(np.float32) if with_scale else None
    bias = (0.1 * rng.normal(size=c)).astype(np.float32)
    slope = np.full(c, 0.25, np.float32) if activation == "prelu" else None
    # put some pre-activations exactly on 0 and 6: h = (x - mean) * rstd * scale + bias = bias
    x[0, 0, :3, 2:] = mean[2:]
    bias[3] = 6.0
    dy, dmean, dvar = (rng.normal(size=s).astype(np.float32) for s in (x.shape, c, c))
    args = [jnp.asarray(a) if a is not None else None
            for a in (x, mean, var_raw, scale, bias, slope, dy, dmean, dvar)]
    want = L._bn_act_bwd_jnp(activation, 1e-5, jnp.float32, jnp.float32, *args)
    xj, mj, vj, sj, bj, slj, dyj, dmj, dvj = args
    got = jax.jit(lambda *a: CK.bn_act_bwd(*a, activation=activation, eps=1e-5))(
        xj, dyj, mj, vj, sj, bj, slj, dmj, dvj)
    for name, g, w in zip(("dx", "dscale", "dbias", "dslope"), got, want):
        if w is None:
            continue
        assert _rel(g, w) < 1e-5, name
    one = CK.bn_act_bwd(xj, dyj, mj, vj, sj, bj, slj, dmj, dvj, activation=activation, eps=1e-5,
                        workers=1)
    for a, b in zip(one, got):  # one thread: bitwise the same
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# (batch, H, W, C_in, C_out in vectors, kernel, stride, padding)
FORWARD_CASES = [
    (2, 9, 9, 5, 2, 3, 1, ((1, 1), (1, 1))),  # 9 output columns: a partial pixel tile
    (1, 30, 30, 16, 1, 3, 2, ((1, 1), (1, 1))),  # strided, 15 columns: a full and a partial tile
    (2, 11, 11, 8, 3, 5, 3, ((2, 1), (0, 2))),  # 3 vectors: a block of 2 and one of 1
    (1, 4, 4, 3, 1, 5, 1, ((2, 2), (2, 2))),  # kernel larger than the map
    (2, 10, 10, 4, 1, 3, 2, ((0, 0), (0, 0))),  # VALID: the last row is never read
]


@pytest.mark.parametrize("case", FORWARD_CASES, ids=lambda c: "b{}h{}w{}c{}v{}k{}s{}p{}".format(*c))
def test_forward_matches_xla(case):
    b, h, w, ci, nv, k, s, pads = case
    co = nv * CK.vector_width()
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(b, h, w, ci)), jnp.float32)
    kern = jnp.asarray(rng.normal(size=(k, k, ci, co)), jnp.float32)
    want = lax.conv_general_dilated(x, kern, (s, s), pads,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=lax.Precision.HIGHEST)
    got = jax.jit(lambda x, kern: CK.conv_forward(x, kern, (s, s), pads))(x, kern)
    assert got.shape == want.shape
    assert _rel(got, want) < 1e-5
    one = CK.conv_forward(x, kern, (s, s), pads, workers=1)  # one thread: bitwise the same
    np.testing.assert_array_equal(np.asarray(one), np.asarray(got))


def test_fast_conv_forward_uses_the_kernel_where_it_measured_faster(monkeypatch):
    """On one device: strided 3x3 convolutions (XLA's convolution otherwise) and Winograd-sized
    ones on small outputs (batch-1 inference) run the compiled forward; large Winograd outputs
    and 1x1 convolutions do not."""
    monkeypatch.setattr(FC, "_multi_device", lambda: False)  # conftest fakes 8 devices
    vw = CK.vector_width()

    def uses(x_shape, w_shape, stride):
        x, w = jnp.zeros(x_shape), jnp.zeros(w_shape)
        pad = "SAME" if w_shape[0] > 1 else "VALID"
        jaxpr = str(jax.make_jaxpr(lambda x, w: FC.conv(x, w, strides=stride, padding=pad))(x, w))
        return CK._FWD_TARGET in jaxpr

    assert uses((1, 16, 16, 64), (3, 3, 64, 64), 2)  # strided
    assert uses((1, 56, 56, 64), (3, 3, 64, 64), 1)  # Winograd layer, 3,136 output pixels
    assert not uses((1, 112, 112, 64), (3, 3, 64, 64), 1)  # 12,544 pixels: Winograd
    # narrow layers whose Winograd tiles leave the L3 cache (205 MB): the kernel
    assert uses((32, 56, 56, 64), (3, 3, 64, 64), 1)
    assert not uses((32, 28, 28, 128), (3, 3, 128, 128), 1)  # 128 channels: Winograd
    assert not uses((64, 56, 56, 128), (3, 3, 128, 128), 1)  # wide, 50k tiles: Winograd
    assert uses((32, 112, 112, 64), (3, 3, 64, 64), 1)  # XLA's convolution otherwise
    assert not uses((1, 8, 8, 64), (1, 1, 64, 64), 1)  # 1x1: a matmul
    assert not uses((1, 8, 8, 64), (3, 3, 64, vw + 3), 2)  # channels not whole vectors
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(size=(1, 16, 16, 64)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 64, 64)), jnp.float32)
    for stride in (1, 2):
        got = FC.conv(x, w, strides=stride, impl="fast")
        assert _rel(got, FC.conv(x, w, strides=stride, impl="xla")) < 1e-5


def test_stride1_input_gradient_runs_the_forward_kernel(monkeypatch):
    """The stride-1 input gradient is a convolution of dy with the flipped, transposed kernel
    and takes the forward's path: the compiled kernel where the forward would (here forced
    for a small layer), equal to XLA's gradient; its padding mirrors the forward's (VALID and
    asymmetric SAME included)."""
    monkeypatch.setattr(FC, "_multi_device", lambda: False)  # conftest fakes 8 devices
    monkeypatch.setattr(FC, "KERNEL_FWD_MIN_WINOGRAD_BYTES", 0)  # every narrow layer
    c = 2 * CK.vector_width()
    rng = np.random.default_rng(12)
    for hw, k, pad in ((12, 3, "SAME"), (12, 3, "VALID"), (11, 2, "SAME")):
        x = jnp.asarray(rng.normal(size=(3, hw, hw, c)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(k, k, c, c)) * 0.1, jnp.float32)

        def loss(x, w, impl, pad=pad):
            return jnp.sum(jnp.sin(FC.conv(x, w, padding=pad, impl=impl)))

        dx = jax.grad(loss)
        jaxpr = str(jax.make_jaxpr(lambda x, w, dx=dx: dx(x, w, "fast"))(x, w))
        assert jaxpr.count(CK._FWD_TARGET) == 2, (hw, k, pad)  # forward and input gradient
        assert _rel(dx(x, w, "fast"), dx(x, w, "xla")) < 1e-5, (hw, k, pad)


@pytest.mark.parametrize("k", [2, 3])
def test_tiled_up_convolution_gradients_run_the_kernels(monkeypatch, k):
    """The U-Net's up-convolution (ConvTranspose, kernel == strides, VALID) on one device:
    the input gradient is the compiled forward at stride k, the kernel gradient the compiled
    kernel gradient with dy and x in each other's roles; both equal flax's nn.ConvTranspose
    (XLA's transposed convolution differentiated), and so does the output."""
    import flax.linen as nn

    monkeypatch.setattr(FC, "_multi_device", lambda: False)  # conftest fakes 8 devices
    vw = CK.vector_width()
    x = jnp.asarray(np.random.default_rng(13).normal(size=(3, 6, 5, 2 * vw)), jnp.float32)
    fast = FC.ConvTranspose(vw, (k, k), strides=k, padding="VALID")
    ref = nn.ConvTranspose(vw, (k, k), strides=k, padding="VALID")
    v = ref.init(jax.random.key(1), x)

    def loss(v, x, m):
        return jnp.sum(jnp.sin(m.apply(v, x)))

    jaxpr = str(jax.make_jaxpr(lambda v, x: jax.grad(loss, (0, 1))(v, x, fast))(v, x))
    assert jaxpr.count(CK._FWD_TARGET) == 1 and jaxpr.count(CK._TARGET) == 1
    assert _rel(fast.apply(v, x), ref.apply(v, x)) < 1e-5
    got, want = jax.grad(loss, (0, 1))(v, x, fast), jax.grad(loss, (0, 1))(v, x, ref)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.shape == b.shape and _rel(a, b) < 1e-5


def test_disabled_for_export(monkeypatch):
    """`jax.export` artifacts must not call this process's custom calls: inside
    `cpu_kernels.disabled()` (as lowlight.export traces) the JAX paths run, forward and
    backward, and the program exports."""
    monkeypatch.setattr(FC, "_multi_device", lambda: False)  # conftest fakes 8 devices
    x = jnp.zeros((1, 16, 16, 64))
    w = jnp.zeros((3, 3, 64, 64))

    def f(x, w):
        return jax.grad(lambda w: jnp.sum(FC.conv(x, w, strides=2)))(w)

    targets = (CK._FWD_TARGET, CK._TARGET)
    assert all(t in str(jax.make_jaxpr(lambda *a: f(*a))(x, w)) for t in targets)
    with CK.disabled():
        assert not CK.usable() and CK.available()
        assert not any(t in str(jax.make_jaxpr(lambda *a: f(*a))(x, w)) for t in targets)
        exported = jax.export.export(jax.jit(lambda *a: f(*a)))(x, w)
    assert CK.usable()
    assert not any(t in exported.mlir_module() for t in targets)
