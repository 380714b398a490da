"""tools/_bench_ablate.py: each stand-in removes exactly the part it names, and is undone after.

The ablation's figures are only meaningful if a variant removes the named gradient and nothing
else, and if the originals are back once its step is compiled (the variants are compiled one
after another in one process).
"""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowlight.models import fast_conv
from lowlight.models import layers as L
from tests.helpers import ROOT


def _tool():
    path = os.path.join(ROOT, "tools", "_bench_ablate.py")
    spec = importlib.util.spec_from_file_location("_bench_ablate", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _grads(x, w3, w1, wd, scale, bias, slope):
    """Gradients through a 3x3, a 1x1 and a depthwise fast_conv and a fused BN + PReLU."""

    def loss(x, w3, w1, wd, scale, bias, slope):
        h = fast_conv.conv(x, w3, padding="SAME")
        h = fast_conv.conv(h, w1, padding="VALID")
        h = fast_conv.conv(h, wd, padding="SAME", groups=h.shape[-1])
        y, _, _ = L.bn_act(h, scale, bias, slope, activation="prelu")
        return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape)))

    return jax.grad(loss, argnums=range(7))(x, w3, w1, wd, scale, bias, slope)


def _inputs():
    rng = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    return (f(2, 6, 6, 4), f(3, 3, 4, 8), f(1, 1, 8, 8), f(3, 3, 1, 8),
            jnp.ones(8) + 0.1 * f(8), 0.1 * f(8), jnp.full((8,), 0.25))


@pytest.mark.parametrize("one_device", [False, True])
def test_each_variant_removes_its_part_and_is_undone(one_device, monkeypatch):
    """On several devices (conftest fakes 8) the depthwise gradients come from autodiff, on
    one from the compiled depthwise kernel (`cpu_kernels.depthwise_bwd`)."""
    if one_device:
        monkeypatch.setattr(fast_conv, "_multi_device", lambda: False)
    tool = _tool()
    args = _inputs()
    # a fresh function: make_jaxpr caches traces by function like jit
    uses_kernel = "lowlight_depthwise_bwd" in str(jax.make_jaxpr(lambda *a: _grads(*a))(*args))
    assert uses_kernel == one_device
    ref = _grads(*args)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in ref)
    names = ("x", "w3", "w1", "wd", "scale", "bias", "slope")
    zero_in = {"no kernel grads": {"w3", "w1", "wd"}, "BN bwd identity": {"scale", "bias", "slope"},
               "no input grads": set()}
    for variant in tool.VARIANTS[1:]:
        with tool._patched(variant):
            got = dict(zip(names, _grads(*args)))
        for name in zero_in[variant]:
            np.testing.assert_array_equal(np.asarray(got[name]), 0, err_msg=f"{variant}: {name}")
        if variant == "no kernel grads":  # input and BN gradients untouched
            for name in ("x", "scale", "bias", "slope"):
                np.testing.assert_allclose(got[name], ref[names.index(name)], rtol=1e-5,
                                           atol=1e-5, err_msg=name)
        if variant == "no input grads":
            # the first conv's input gradient is the stand-in (a broadcast scalar: zero)
            np.testing.assert_array_equal(np.asarray(got["x"]), 0)
        # undone: the next trace differentiates everything again
        again = _grads(*args)
        for a, b in zip(again, ref):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
