"""fast_conv: same parameters as nn.Conv, same outputs, same gradients (float32 rounding).

References are XLA's own convolution (`nn.Conv` / `lax.conv_general_dilated`) and its
automatic derivative, and for the phase-decomposed strided input gradient also a numpy
direct convolution, so a shared mistake in XLA's convention could not hide. Shapes are tiny;
the wgrad chunking path is forced by lowering the chunk thresholds.
"""

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from lowlight.models import fast_conv as FC
from lowlight.models import winograd as WG

RTOL = 1e-4  # fp32: the implementations sum the same products in different orders


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# (batch, H, W, C_in, C_out, kernel, stride, dilation, padding, groups)
CASES = [
    (2, 9, 9, 4, 6, 3, 1, 1, "SAME", 1),
    (2, 9, 8, 4, 6, 3, 2, 1, ((1, 1), (1, 1)), 1),  # iResNet: strided 3x3, torch padding
    (2, 10, 10, 4, 6, 3, 2, 1, "SAME", 1),  # SAME at stride 2 pads (0, 1)
    (2, 8, 8, 4, 8, 1, 2, 1, "VALID", 1),  # strided 1x1 shortcut -> dot on a strided slice
    (2, 8, 8, 4, 8, 1, 1, 1, "VALID", 1),  # 1x1 -> dot
    (2, 12, 12, 4, 4, 3, 1, 2, "SAME", 1),  # dilated (relighting net): space-to-batch
    (1, 16, 16, 64, 64, 3, 1, 4, "SAME", 1),  # dilation 4, sub-images through Winograd
    (2, 10, 10, 4, 4, 3, 1, 4, "SAME", 1),  # 10 not divisible by 4: plain dilated conv
    (2, 13, 11, 4, 6, 3, 2, 2, ((2, 2), (2, 2)), 1),  # strided and dilated
    (2, 11, 11, 5, 5, 5, 3, 1, ((2, 1), (0, 2)), 1),  # stride 3, asymmetric padding
    (2, 10, 10, 6, 6, 3, 1, 1, ((1, 1), (1, 1)), 6),  # depthwise (MobileNetV2)
    (2, 11, 11, 6, 6, 3, 2, 1, ((1, 1), (1, 1)), 6),  # depthwise, stride 2
    (2, 9, 9, 4, 8, 3, 1, 1, "SAME", 4),  # depthwise with channel multiplier 2
    (2, 11, 11, 6, 12, 3, 2, 1, ((1, 1), (1, 1)), 3),  # grouped
    (2, 9, 9, 3, 5, 9, 9, 1, "VALID", 1),  # ViT-style patch embedding (kernel = stride)
    (2, 12, 11, 3, 8, 3, 2, 1, ((1, 1), (1, 1)), 1),  # RGB stem (MobileNetV2): im2col
    (2, 10, 9, 1, 5, 3, 3, 1, ((2, 0), (1, 1)), 1),  # gray, stride 3, uneven padding: im2col
    (2, 14, 14, 64, 64, 3, 1, 1, ((1, 1), (1, 1)), 1),  # Winograd forward and input gradient
    (1, 15, 17, 64, 72, 3, 1, 1, ((2, 0), (1, 1)), 1),  # Winograd, odd sizes, uneven padding
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}h{}w{}c{}o{}k{}s{}d{}p{}g{}".format(*c))
def test_module_matches_nn_conv_outputs_and_gradients(case):
    b, h, w, c, o, k, s, d, pad, g = case
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(b, h, w, c)), jnp.float32)
    kw = dict(strides=s, padding=pad, kernel_dilation=d, feature_group_count=g)
    ref = nn.Conv(o, (k, k), **kw)
    fast = FC.Conv(o, (k, k), **kw)
    v_ref = ref.init(jax.random.key(3), x)
    v_fast = fast.init(jax.random.key(3), x)
    # identical parameter tree: names, shapes and (same rng, same initialisers) values
    assert jax.tree.structure(v_ref) == jax.tree.structure(v_fast)
    for a, bb in zip(jax.tree.leaves(v_ref), jax.tree.leaves(v_fast)):
        np.testing.assert_array_equal(a, bb)

    def out_and_grads(m, dy):
        # jitted as a whole: one compilation instead of one per primitive
        f = lambda v, x: jnp.sum(m.apply(v, x) * dy)  # noqa: E731
        return jax.jit(lambda v, x: (m.apply(v, x), jax.grad(f, argnums=(0, 1))(v, x)))(
            v_ref, x)

    y_shape = jax.eval_shape(ref.apply, v_ref, x).shape
    dy = jnp.asarray(rng.normal(size=y_shape), jnp.float32)
    y_ref, (gv_ref, gx_ref) = out_and_grads(ref, dy)
    y, (gv, gx) = out_and_grads(fast, dy)
    assert y.shape == y_ref.shape
    assert _rel(y, y_ref) < RTOL
    assert _rel(gx, gx_ref) < RTOL
    assert _rel(gv["params"]["kernel"], gv_ref["params"]["kernel"]) < RTOL
    assert _rel(gv["params"]["bias"], gv_ref["params"]["bias"]) < RTOL


def _numpy_conv(x, w, stride, pad):
    """Direct NHWC/HWIO cross-correlation in float64 (groups = 1)."""
    (pt, pb), (pl, pr) = pad
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    kh, kw, _, o = w.shape
    ho = (xp.shape[1] - kh) // stride + 1
    wo = (xp.shape[2] - kw) // stride + 1
    y = np.zeros((x.shape[0], ho, wo, o))
    for i in range(kh):
        for j in range(kw):
            hi, wi = i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1
            patch = xp[:, i:hi:stride, j:wi:stride]
            y += patch @ w[i, j]
    return y


@pytest.mark.parametrize("h,stride,pad", [(8, 2, ((1, 1), (1, 1))), (9, 2, ((1, 1), (1, 1))),
                                          (10, 3, ((1, 0), (2, 1)))])
def test_strided_input_gradient_matches_numpy(h, stride, pad):
    """dL/dx of L = sum(conv(x) * dy), by finite linearity: column e_i of the Jacobian."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, h, h, 2))
    w = rng.normal(size=(3, 3, 2, 3))
    dy = rng.normal(size=_numpy_conv(x, w, stride, pad).shape)
    # <conv(x), dy> is linear in x, so its gradient entry i is <conv(e_i), dy>.
    expected = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        e = np.zeros_like(x)
        e[idx] = 1.0
        expected[idx] = np.sum(_numpy_conv(e, w, stride, pad) * dy)
    fn = lambda x: jnp.sum(FC.conv(x, jnp.asarray(w, jnp.float32), strides=stride,  # noqa: E731
                                   padding=pad) * jnp.asarray(dy, jnp.float32))
    got = jax.grad(fn)(jnp.asarray(x, jnp.float32))
    assert _rel(got, expected) < RTOL


def test_winograd_is_used_where_measured_faster():
    use = WG.use_winograd
    one, pad = (1, 1), ((1, 1), (1, 1))
    assert use((32, 14, 14, 256), (3, 3, 256, 256), one, one, 1, pad)
    assert use((1, 28, 28, 128), (3, 3, 128, 128), one, one, 1, pad)
    assert use((1, 7, 7, 512), (3, 3, 512, 512), one, one, 1, pad)
    assert use((32, 56, 56, 64), (3, 3, 64, 64), one, one, 1, pad)
    assert not use((1, 3, 3, 512), (3, 3, 512, 512), one, one, 1, pad)  # 4 tiles
    assert not use((32, 112, 112, 64), (3, 3, 64, 64), one, one, 1, pad)  # 100k tiles
    assert use((32, 112, 112, 208), (3, 3, 208, 208), one, one, 1, pad)  # wide: any size
    assert not use((32, 14, 14, 256), (3, 3, 256, 256), (2, 2), one, 1, pad)  # strided
    assert not use((32, 14, 14, 256), (3, 3, 256, 256), one, (2, 2), 1, pad)  # dilated
    assert not use((32, 14, 14, 256), (3, 3, 1, 256), one, one, 256, pad)  # depthwise
    assert not use((32, 14, 14, 3), (3, 3, 3, 64), one, one, 1, pad)  # too few channels


def _numpy_wgrad(x, dy, pad):
    """d <conv(x, w), dy> / d w of a stride-1 3x3 convolution, float64 direct sum."""
    (pt, pb), (pl, pr) = pad
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    ho, wo = dy.shape[1:3]
    return np.stack([np.stack([np.einsum("bhwc,bhwo->co", xp[:, i : i + ho, j : j + wo], dy)
                               for j in range(3)]) for i in range(3)])


@pytest.mark.parametrize("b,h,w,c,o,pad", [
    (2, 8, 8, 8, 16, ((1, 1), (1, 1))),  # even map: whole tiles
    (3, 7, 9, 16, 8, ((1, 1), (1, 1))),  # odd sizes: the last tiles half outside the output
    (1, 9, 8, 8, 8, ((2, 0), (0, 1))),  # uneven padding
    (2, 6, 6, 8, 8, ((0, 0), (0, 0))),  # VALID
])
def test_winograd_kernel_gradient_matches_numpy(b, h, w, c, o, pad):
    """The kernel gradient through the F(2x2, 3x3) transforms (`winograd.wgrad`) equals the
    float64 direct sum over the taps."""
    rng = np.random.default_rng(b * 100 + h)
    x = rng.normal(size=(b, h, w, c))
    ho, wo = h + sum(pad[0]) - 2, w + sum(pad[1]) - 2
    dy = rng.normal(size=(b, ho, wo, o))
    got = FC._winograd_wgrad(jnp.asarray(x, jnp.float32), jnp.asarray(dy, jnp.float32), pad,
                             None)
    assert got.shape == (3, 3, c, o) and got.dtype == jnp.float32
    assert _rel(got, _numpy_wgrad(x, dy, pad)) < 1e-5


def test_winograd_kernel_gradient_in_batch_chunks(monkeypatch):
    """Beyond WINO_WGRAD_CHUNK_TILES tiles the gradient is summed over chunks of whole
    images (2, 2, 1 here): 3 x 16 matmuls, the same value as the direct sum."""
    monkeypatch.setattr(WG, "WINO_WGRAD_CHUNK_TILES", 2 * 16)  # 8x8 maps: 16 tiles an image
    rng = np.random.default_rng(3)
    x, dy = rng.normal(size=(5, 8, 8, 8)), rng.normal(size=(5, 8, 8, 16))
    pad = ((1, 1), (1, 1))
    f = lambda x, dy: FC._winograd_wgrad(x, dy, pad, None)  # noqa: E731
    args = (jnp.asarray(x, jnp.float32), jnp.asarray(dy, jnp.float32))
    assert jax.jit(f).lower(*args).as_text().count("dot_general") == 3 * 16
    assert _rel(f(*args), _numpy_wgrad(x, dy, pad)) < 1e-5


def test_winograd_kernel_gradient_path(monkeypatch):
    """On one device, layers whose forward is Winograd and that are wide enough
    (WINO_WGRAD_MIN_CHANNELS) take their kernel gradient in the Winograd domain: 16 more
    matmuls in the backward pass and no kernel-gradient convolution; the gradients equal
    XLA's. Narrower layers and several devices keep the other paths."""
    from lowlight.models import cpu_kernels

    monkeypatch.setattr(FC, "_multi_device", lambda: False)  # conftest fakes 8 devices
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.normal(size=(2, 10, 10, 64)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 64, 64)) * 0.05, jnp.float32)
    assert WG.WINO_WGRAD_MIN_CHANNELS == 256
    assert FC._use_winograd_wgrad((32, 14, 14, 256), (3, 3, 256, 256), (1, 1), (1, 1), 1,
                                  ((1, 1), (1, 1)))
    assert not FC._use_winograd_wgrad((32, 28, 28, 128), (3, 3, 128, 128), (1, 1), (1, 1), 1,
                                      ((1, 1), (1, 1)))

    def grad_ops(**patch):
        for k, val in patch.items():
            monkeypatch.setattr(WG, k, val)
        f = lambda w: jnp.sum(jnp.sin(FC.conv(x, w, padding=((1, 1), (1, 1)))))  # noqa: E731
        return str(jax.make_jaxpr(jax.grad(f))(w)), jax.grad(f)(w)

    f_ref = lambda w: jnp.sum(jnp.sin(FC.conv(x, w, padding=((1, 1), (1, 1)), impl="xla")))
    want = jax.grad(f_ref)(w)
    wide, g_wide = grad_ops(WINO_WGRAD_MIN_CHANNELS=64)
    narrow, g_narrow = grad_ops(WINO_WGRAD_MIN_CHANNELS=65)
    # the kernel gradient: 16 matmuls more (the forward and the input gradient are the same
    # in both: the compiled kernel where it is available, else Winograd)
    assert wide.count("dot_general") - narrow.count("dot_general") == 16
    assert "conv_general_dilated" not in wide
    if cpu_kernels.usable():
        assert "lowlight_conv_wgrad" in narrow and "lowlight_conv_wgrad" not in wide
    for g in (g_wide, g_narrow):
        assert _rel(g, want) < RTOL
    # bfloat16 operands keep XLA's kernel gradient
    monkeypatch.setattr(WG, "WINO_WGRAD_MIN_CHANNELS", 64)
    fb = lambda w: jnp.sum(FC.conv(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16),  # noqa: E731
                                   padding=((1, 1), (1, 1))).astype(jnp.float32))
    bf16 = str(jax.make_jaxpr(jax.grad(fb))(w))
    assert "conv_general_dilated" in bf16
    monkeypatch.setattr(FC, "_multi_device", lambda: True)
    several, _ = grad_ops(WINO_WGRAD_MIN_CHANNELS=64)
    # forward and input gradient by Winograd (16 matmuls each), the kernel gradient by XLA
    assert several.count("dot_general") == 32 and "conv_general_dilated" in several


def test_strided_few_channel_convolution_is_one_matmul():
    """RGB stems at stride 2 run as im2col + one dot_general (XLA's convolution was 3.4x
    slower); stride 1, 7x7 kernels and more channels keep the other paths."""
    def ops(x_shape, k, stride):
        x, w = jnp.zeros(x_shape), jnp.zeros((k, k, x_shape[-1], 32))
        return str(jax.make_jaxpr(lambda x, w: FC.conv(x, w, strides=stride))(x, w))

    stem = ops((2, 16, 16, 3), 3, 2)
    assert "dot_general" in stem and "conv_general_dilated" not in stem
    for x_shape, k, stride in (((2, 16, 16, 3), 3, 1), ((2, 16, 16, 3), 7, 2),
                               ((2, 16, 16, 8), 3, 2)):
        assert "conv_general_dilated" in ops(x_shape, k, stride)


def test_chunked_kernel_gradient(monkeypatch):
    """The per-chunk kernel gradient (large batches) sums to the whole-batch one."""
    monkeypatch.setattr(FC, "_WGRAD_CHUNK_BYTES", 2 * 6 * 6 * 4 * 4)  # 2 images per chunk
    monkeypatch.setattr(FC, "_WGRAD_WHOLE_BATCH_BYTES", 0)
    monkeypatch.setattr(FC, "_multi_device", lambda: False)  # conftest fakes 8 devices
    assert FC._wgrad_chunk((8, 6, 6, 4), 4) == 2
    assert FC._wgrad_chunk((6, 6, 6, 4), 4) == 2
    assert FC._wgrad_chunk((5, 6, 6, 4), 4) == 1  # largest divisor of the batch that fits
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(8, 6, 6, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 4, 5)), jnp.float32)
    for stride in (1, 2):
        f_ref = lambda w, s=stride: jnp.sum(jnp.sin(FC.conv(x, w, strides=s, impl="xla")))
        f = lambda w, s=stride: jnp.sum(jnp.sin(FC.conv(x, w, strides=s, impl="fast")))
        assert _rel(jax.grad(f)(w), jax.grad(f_ref)(w)) < RTOL


def test_winograd_in_batch_chunks(monkeypatch):
    """Large batches run Winograd in chunks of whole images on one device: outputs and both
    gradients equal XLA's convolution, a last chunk smaller than the others included."""
    monkeypatch.setattr(WG, "WINO_CHUNK_TILES", 2 * 16)  # 8x8 maps: 16 tiles, 2 images a chunk
    monkeypatch.setattr(WG, "WINO_WIDE", 64)  # chunks are for wide layers
    monkeypatch.setattr(FC, "_multi_device", lambda: False)  # conftest fakes 8 devices
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(5, 8, 8, 64)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 64, 64)) * 0.05, jnp.float32)
    assert WG.use_winograd(x.shape, w.shape, (1, 1), (1, 1), 1, ((1, 1), (1, 1)))
    hlo = jax.jit(lambda x: WG.forward(x, w, ((1, 1), (1, 1)), None)).lower(x).as_text()
    assert hlo.count("dot_general") == 3 * 16  # chunks of 2, 2, 1 images, 16 matmuls each
    monkeypatch.setattr(WG, "WINO_WIDE", 128)  # a narrower layer: one pass
    hlo = jax.jit(lambda x: WG.forward(x, w, ((1, 1), (1, 1)), None)).lower(x).as_text()
    assert hlo.count("dot_general") == 16
    f_ref = lambda x, w: jnp.sum(jnp.sin(FC.conv(x, w, impl="xla")))  # noqa: E731
    f = lambda x, w: jnp.sum(jnp.sin(FC.conv(x, w, impl="fast")))  # noqa: E731
    assert _rel(FC.conv(x, w, impl="fast"), FC.conv(x, w, impl="xla")) < RTOL
    for a, b in zip(jax.grad(f, (0, 1))(x, w), jax.grad(f_ref, (0, 1))(x, w)):
        assert _rel(a, b) < RTOL


def test_jit_and_bfloat16():
    """Under jit, and in bf16 (compute dtype) with fp32 params: close to XLA's bf16 conv."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 8)), jnp.float32)
    ref = nn.Conv(8, (3, 3), strides=2, padding=((1, 1), (1, 1)), dtype=jnp.bfloat16)
    fast = FC.Conv(8, (3, 3), strides=2, padding=((1, 1), (1, 1)), dtype=jnp.bfloat16)
    v = ref.init(jax.random.key(0), x)
    y_ref = jax.jit(ref.apply)(v, x)
    y = jax.jit(fast.apply)(v, x)
    assert y.dtype == jnp.bfloat16
    assert _rel(y.astype(jnp.float32), y_ref.astype(jnp.float32)) < 2e-2
    g_ref = jax.jit(jax.grad(lambda v: jnp.sum(ref.apply(v, x).astype(jnp.float32) ** 2)))(v)
    g = jax.jit(jax.grad(lambda v: jnp.sum(fast.apply(v, x).astype(jnp.float32) ** 2)))(v)
    assert g["params"]["kernel"].dtype == jnp.float32
    assert _rel(g["params"]["kernel"], g_ref["params"]["kernel"]) < 5e-2


def test_no_chunks_across_devices():
    """With several devices (conftest: 8) the batch is sharded: one kernel-gradient op."""
    assert jax.device_count() > 1
    assert FC._wgrad_chunk((32, 112, 112, 64), 4) == 32


def test_impl_resolution_and_errors():
    assert FC.resolve_impl("auto") == ("fast" if jax.default_backend() == "cpu" else "xla")
    assert FC.conv_module("xla") is nn.Conv
    with pytest.raises(ValueError, match="conv_impl 'cudnn'; valid: auto, xla, fast"):
        FC.conv_module("cudnn")
    x = jnp.zeros((1, 4, 4, 3))
    with pytest.raises(ValueError, match="expected NHWC input"):
        FC.conv(jnp.zeros((4, 4, 3)), jnp.zeros((3, 3, 3, 2)))
    with pytest.raises(ValueError, match="input has 3 channels but the kernel"):
        FC.conv(x, jnp.zeros((3, 3, 2, 2)))
    with pytest.raises(ValueError, match="padding 'CIRCULAR'"):
        FC.conv(x, jnp.zeros((3, 3, 3, 2)), padding="CIRCULAR")


@pytest.mark.parametrize("impl", ["fast", "auto"])
def test_models_keep_their_parameter_tree(impl):
    """conv_impl changes no parameter name or shape: checkpoints and torch converters load."""
    from lowlight import models
    from lowlight.models import layers as L

    for name, kw in (("iresnet50", {}), ("mobilenetv2", {"attention": "se"}), ("unet", {}),
                     ("unet", {"upsample": "bilinear"})):
        ref = L.param_shapes(models.create(name, conv_impl="xla", **kw))
        got = L.param_shapes(models.create(name, conv_impl=impl, **kw))
        assert jax.tree.map(lambda a: (a.shape, a.dtype), got) == jax.tree.map(
            lambda a: (a.shape, a.dtype), ref)


def test_model_blocks_match_in_train_mode():
    """An iResNet block (strided 3x3, 1x1 shortcut, BN, PReLU) and a MobileNetV2 block
    (1x1 expand, strided depthwise, 1x1 project): outputs, batch statistics and gradients of
    parameters and input agree with the nn.Conv versions in train mode."""
    from lowlight.models import iresnet, mobilenetv2

    x = jnp.asarray(np.random.default_rng(5).normal(size=(4, 16, 16, 8)), jnp.float32)
    blocks = [
        lambda impl: iresnet.IBasicBlock(16, stride=2, downsample=True, conv_impl=impl),
        lambda impl: mobilenetv2.InvertedResidual(16, stride=2, expand_ratio=6, conv_impl=impl),
    ]
    for make in blocks:
        ref, fast = make("xla"), make("fast")
        v = ref.init(jax.random.key(0), x, True)
        out_ref, out_fast = _train_step_outputs(ref, v, x), _train_step_outputs(fast, v, x)
        for a, b in zip(jax.tree.leaves(out_fast), jax.tree.leaves(out_ref)):
            # BatchNorm's backward subtracts batch means of products (cancellation), which
            # scales the conv gradients' rounding differences up ~10x in its own gradients.
            assert _rel(a, b) < 10 * RTOL


def _train_step_outputs(module, variables, x):
    """(output, new batch_stats, (d params, d x)) of sum(sin(module(x))) in train mode."""

    def loss(params, x):
        y, upd = module.apply({**variables, "params": params}, x, True, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y)), (y, upd)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, (y, upd)), g = grad(variables["params"], x)
    return y, upd, g


@pytest.mark.parametrize("k,s,pad", [(2, 2, "VALID"), (3, 3, "VALID"), (3, 2, "SAME"),
                                     (2, 2, ((0, 1), (1, 0)))])
def test_conv_transpose_matches_nn_conv_transpose(k, s, pad):
    """Tiling case (kernel == stride, VALID) by matmul + pixel shuffle; others as flax."""
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(2, 5, 4, 6)), jnp.float32)
    ref = nn.ConvTranspose(3, (k, k), strides=s, padding=pad)
    fast = FC.ConvTranspose(3, (k, k), strides=s, padding=pad)
    v = ref.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, v) == jax.tree.map(jnp.shape, fast.init(jax.random.key(0), x))
    y_ref, y = ref.apply(v, x), fast.apply(v, x)
    assert y.shape == y_ref.shape
    assert _rel(y, y_ref) < RTOL
    dy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    g_ref = jax.grad(lambda v, x: jnp.sum(ref.apply(v, x) * dy), argnums=(0, 1))(v, x)
    g = jax.grad(lambda v, x: jnp.sum(fast.apply(v, x) * dy), argnums=(0, 1))(v, x)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        assert _rel(a, b) < RTOL


@pytest.mark.parametrize("name,kw,one_device", [
    ("unet", {"width": 0.125}, False),
    # one device: the compiled kernels, the up-convolutions' gradients through them included
    ("unet", {"width": 0.25}, True),
    ("relight", {"width": 16}, False),
    ("iresnet18", {"embed_dim": 32, "widths": (16, 32, 64, 128)}, False),
    # one device: batch-chunked paths and the compiled kernel-gradient kernel (cpu_kernels)
    ("iresnet18", {"embed_dim": 32, "widths": (16, 32, 64, 128)}, True),
    ("mobilenetv2", {"alpha": 0.5, "attention": "se"}, False)])
def test_whole_models_match_xla_outputs_and_gradients(name, kw, one_device, monkeypatch):
    """Every model that threads `conv_impl`: the same parameter tree, and outputs and
    parameter gradients in train mode equal to the nn.Conv model's to float32 rounding."""
    from lowlight import models
    from lowlight.models import cpu_kernels

    if one_device:
        monkeypatch.setattr(FC, "_multi_device", lambda: False)  # conftest fakes 8 devices
        cpu_kernels.wgrad_stats()

    # big enough that train-mode BatchNorm of the last stage sees >= 16 values per channel
    # (over fewer, its normalisation amplifies rounding differences by cancellation)
    size = {"relight": 24, "unet": 16, "iresnet18": 32, "mobilenetv2": 64}[name]
    x = jnp.asarray(np.random.default_rng(7).uniform(-1, 1, (4, size, size, 3)), jnp.float32)
    ref, fast = models.create(name, conv_impl="xla", **kw), models.create(name, conv_impl="fast",
                                                                          **kw)
    v = ref.init(jax.random.key(0), x, train=False)
    v = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape), v)
    assert jax.tree.map(jnp.shape, fast.init(jax.random.key(0), x, train=False)) == \
        jax.tree.map(jnp.shape, v)

    def loss(model, params):
        # linear in the outputs (fixed random weights): a sin/cos of large eval-mode outputs
        # would turn float32 rounding of the outputs into O(1) gradient differences
        out = jax.tree.leaves(model.apply({**v, "params": params}, x, train=False))
        return sum(jnp.sum(y * jax.random.normal(jax.random.key(i), y.shape))
                   for i, y in enumerate(out))

    outs = [m.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(2)})
            for m in (fast, ref)]
    for a, b in zip(*(jax.tree.leaves(o) for o in outs)):  # outputs and new batch statistics
        assert _rel(a, b) < 10 * RTOL
    # Gradients in eval mode, over the whole tree (norm of the difference / norm of the
    # reference). Not in train mode: through a whole network's train-mode BatchNorms at these
    # sizes, XLA's own float32 gradient moves by ~1% when only the parameters' dtype changes
    # (rounding amplified by cancellation), so no tolerance would separate a bug from noise;
    # test_model_blocks_match_in_train_mode covers train-mode gradients block by block.
    got, want = (jax.flatten_util.ravel_pytree(jax.grad(lambda p, m=m: loss(m, p))(v["params"]))[0]
                 for m in (fast, ref))
    assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 10 * RTOL
    if one_device:
        # iResNet-18: the 16 3x3 convolutions of the blocks (not the 3-channel stem); U-Net:
        # 13 3x3 convolutions (not the 3-channel first one) and the 3 up-convolutions
        assert cpu_kernels.wgrad_stats()["calls"] == {"iresnet18": 16, "unet": 16}[name]


def test_symbolic_batch_exports_through_xla_convolution():
    """jax.export with a symbolic batch: the size-based path choices cannot be made, so the
    program uses XLA's convolution; it runs at any batch and equals the static-shape result."""
    from jax import export

    rng = np.random.default_rng(8)
    w = jnp.asarray(rng.normal(size=(3, 3, 64, 64)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(3, 8, 8, 64)), jnp.float32)
    up = FC.ConvTranspose(4, (2, 2), strides=2, padding="VALID")
    v = up.init(jax.random.key(0), x)

    def f(x):
        return up.apply(v, FC.conv(x, w, impl="fast"))

    (b,) = export.symbolic_shape("b")
    exp = export.export(jax.jit(f))(jax.ShapeDtypeStruct((b, 8, 8, 64), jnp.float32))
    assert _rel(exp.call(x), f(x)) < RTOL
