"""The fused depthwise unit (kernels/depthwise_fwd.cc, `fused_depthwise`, MobileNetV2 inference).

References: a float64 numpy direct sum over the taps of the padded, transformed input
(independent of XLA and of the kernel's ring buffer), flax's unfused modules (the same
variables, outputs to float32 rounding), and autodiff of the JAX formulation for gradients.
Geometries cover the 2-vector / 1-vector / scalar channel paths, a 5x5 kernel (the generic
loop), strides 1-3, asymmetric padding, batch 1 (split into row bands) and many items over both
threads (bitwise equal to one thread).
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowlight import models
from lowlight.models import cpu_kernels as CK
from lowlight.models import fast_conv as FC
from lowlight.models import fused_depthwise as FD
from lowlight.models import mobilenetv2 as M

pytestmark = pytest.mark.skipif(not CK.available(), reason="compiled kernels unavailable")


def _np_terms(v, terms):
    if terms is None:
        return v
    mean, mul, bias, act = terms
    v = (v - np.float64(mean)) * np.float64(mul) + np.float64(bias)
    if act == "relu6":
        return np.clip(v, 0.0, 6.0)
    return np.maximum(v, 0.0) if act == "relu" else v


def _numpy_unit(x, w, strides, pads, pre, post):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    (sh, sw), ((pt, pb), (pl, pr)) = strides, pads
    kh, kw = w.shape[:2]
    a = np.pad(_np_terms(x, pre), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    oh = (a.shape[1] - kh) // sh + 1
    ow = (a.shape[2] - kw) // sw + 1
    y = np.zeros((x.shape[0], oh, ow, x.shape[3]))
    for i in range(kh):
        for j in range(kw):
            y += a[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw] * w[i, j, 0]
    return _np_terms(y, post)


def _terms(rng, c, act):
    vec = lambda lo, hi: jnp.asarray(rng.uniform(lo, hi, c), jnp.float32)  # noqa: E731
    return vec(-1, 1), vec(0.3, 2.0), vec(-1, 3), act


# (batch, H, W, C, kernel, stride, padding); C: 2-vector blocks + 1 vector + scalar tail, etc.
CASES = [
    (2, 9, 7, 2 * 16 * 2 + 16 + 5, 3, 1, ((1, 1), (1, 1))),
    (3, 10, 11, 40, 3, 2, ((1, 1), (1, 1))),
    (1, 13, 12, 48, 3, 1, ((1, 1), (1, 1))),  # batch 1: 8 bands of 2 rows, the last short
    (2, 7, 6, 32, 3, 2, ((0, 1), (0, 1))),
    (1, 8, 9, 21, 5, 3, ((2, 1), (0, 2))),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}h{}w{}c{}k{}s{}p{}".format(*c))
@pytest.mark.parametrize("ops", ["none", "pre+post", "post only", "affine, relu"])
def test_kernel_matches_numpy(case, ops):
    b, h, w, c, k, s, pads = case
    rng = np.random.default_rng(zlib.crc32(repr((case[:4], ops)).encode()))  # per case, fixed
    x = jnp.asarray(rng.normal(size=(b, h, w, c)) * 3, jnp.float32)
    kern = jnp.asarray(rng.normal(size=(k, k, 1, c)), jnp.float32)
    pre, post = {"none": (None, None),
                 "pre+post": (_terms(rng, c, "relu6"), _terms(rng, c, "relu6")),
                 "post only": (None, _terms(rng, c, "relu6")),
                 "affine, relu": (_terms(rng, c, "none"), _terms(rng, c, "relu"))}[ops]
    f = jax.jit(lambda x, kern: CK.depthwise_forward(x, kern, (s, s), pads, pre=pre, post=post))
    got = f(x, kern)
    want = _numpy_unit(x, kern, (s, s), pads, pre, post)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-5 * np.abs(want).max())
    if pre is not None and pre[3] == "relu6":  # the clip is applied: values reach both bounds
        assert float(got.min()) == 0.0 and float(got.max()) == 6.0
    one = jax.jit(lambda x, kern: CK.depthwise_forward(x, kern, (s, s), pads, pre=pre,
                                                       post=post, workers=1))(x, kern)
    np.testing.assert_array_equal(np.asarray(one), np.asarray(got))  # threads: bitwise


def test_kernel_rejects_bad_arguments():
    x = jnp.zeros((1, 4, 4, 8), jnp.float32)
    w = jnp.zeros((3, 3, 1, 8), jnp.float32)
    with pytest.raises(ValueError, match="output activation 'gelu'"):
        CK.depthwise_forward(x, w, (1, 1), ((1, 1), (1, 1)), post=(None, None, None, "gelu"))
    with pytest.raises(ValueError, match="gives no output"):
        CK.depthwise_forward(jnp.zeros((1, 1, 1, 8)), w, (1, 1), ((0, 0), (0, 0)))


def test_unit_gradient_is_the_reference_gradient():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 24)) * 2, jnp.float32)
    kern = jnp.asarray(rng.normal(size=(3, 3, 1, 24)), jnp.float32)
    pre, post = _terms(rng, 24, "relu6"), _terms(rng, 24, "relu6")
    pads = ((1, 1), (1, 1))

    def loss(unit, x, kern, pre_mul):
        p = (pre[0], pre_mul, pre[2], pre[3])
        return jnp.sum(jnp.sin(unit(x, kern, strides=(2, 2), padding=pads, pre=p, post=post)))

    got = jax.grad(lambda *a: loss(FD.depthwise_bn_act, *a), argnums=(0, 1, 2))(x, kern, pre[1])
    want = jax.grad(lambda *a: loss(FD.reference, *a), argnums=(0, 1, 2))(x, kern, pre[1])
    for g, r in zip(got, want):
        assert float(jnp.max(jnp.abs(r))) > 0
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)


def _ffi_calls(jaxpr, target):
    """The attributes of every `target` custom call in a jaxpr and its sub-jaxprs."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "ffi_call" and eqn.params["target_name"] == target:
            yield dict(eqn.params["attributes"])
        for v in eqn.params.values():
            sub = getattr(v, "jaxpr", v)
            if hasattr(sub, "eqns"):
                yield from _ffi_calls(sub, target)


def _perturbed_stats(variables, seed=1):
    """Running statistics away from (0, 1), so the BN terms matter."""
    rng = np.random.default_rng(seed)

    def f(path, a):
        name = jax.tree_util.keystr(path)
        if name.endswith("['mean']"):
            return a + jnp.asarray(rng.normal(size=a.shape) * 0.2, a.dtype)
        if name.endswith("['var']"):
            return a * jnp.asarray(rng.uniform(0.5, 2.0, a.shape), a.dtype)
        if name.endswith("['bias']"):
            return a + jnp.asarray(rng.normal(size=a.shape) * 0.1, a.dtype)
        return a

    return jax.tree_util.tree_map_with_path(f, variables)


def test_mobilenet_inference_fused_on_one_device(monkeypatch):
    """The whole MobileNetV2-SE at inference on one device: 17 fused units (one per block,
    the expansion's BN + ReLU6 deferred into 16 of them), the same outputs as the unfused
    modules, the same variables; training and several devices keep the unfused modules."""
    monkeypatch.setattr(FC, "_multi_device", lambda: False)  # conftest fakes 8 devices
    model = models.create("mobilenetv2", attention="se", alpha=0.5, projection_dim=32)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)), jnp.float32)
    variables = _perturbed_stats(model.init(jax.random.key(0), x, train=False))
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    assert str(jax.make_jaxpr(apply)(variables, x)).count(CK._DEPTHWISE_FWD_TARGET) == 17
    got = apply(variables, x)
    with CK.disabled():  # the unfused modules (and no other compiled kernel)
        want = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        scale = float(jnp.max(jnp.abs(w)))
        assert scale > 0
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-5 * scale)
    # train mode: the unfused modules (BN batch statistics), the kernel for the bare sum only
    train_jaxpr = jax.make_jaxpr(lambda v, x: model.apply(
        v, x, train=True, rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"]))(
            variables, x)
    calls = list(_ffi_calls(train_jaxpr.jaxpr, CK._DEPTHWISE_FWD_TARGET))
    assert len(calls) == 17
    assert all(c["in_affine"] == c["out_affine"] == 0 for c in calls)
    monkeypatch.setattr(FC, "_multi_device", lambda: True)
    eval_jaxpr = str(jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x))
    assert CK._DEPTHWISE_FWD_TARGET not in eval_jaxpr


def test_fused_block_variables_and_rules(monkeypatch):
    """An inverted residual's variables do not depend on the path (init runs the unfused
    modules; the fused one reads the same names), and `usable` says no for bfloat16, several
    devices and inside `disabled()`."""
    monkeypatch.setattr(FC, "_multi_device", lambda: False)
    block = M.InvertedResidual(24, stride=2, expand_ratio=6)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 10, 10, 16)), jnp.float32)
    variables = _perturbed_stats(block.init(jax.random.key(0), x, train=False), seed=4)
    fused = jax.jit(lambda v, x: block.apply(v, x, train=False))
    assert CK._DEPTHWISE_FWD_TARGET in str(jax.make_jaxpr(fused)(variables, x))
    with CK.disabled():
        want = block.apply(variables, x, train=False)
    np.testing.assert_allclose(np.asarray(fused(variables, x)), np.asarray(want), rtol=0,
                               atol=1e-5 * float(jnp.max(jnp.abs(want))))
    shape = (2, 10, 10, 96)
    assert FD.usable("auto", shape, (3, 3, 1, 96), jnp.float32)
    assert not FD.usable("xla", shape, (3, 3, 1, 96), jnp.float32)
    assert not FD.usable("fast", shape, (3, 3, 1, 96), jnp.bfloat16)
    with CK.disabled():
        assert not FD.usable("fast", shape, (3, 3, 1, 96), jnp.float32)
    monkeypatch.setattr(FC, "_multi_device", lambda: True)
    assert not FD.usable("fast", shape, (3, 3, 1, 96), jnp.float32)
