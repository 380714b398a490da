"""Inference of BatchNorm+ReLU6 -> depthwise conv -> BatchNorm+ReLU6 as one compiled pass.

Why (docs/performance.md, "MobileNetV2 inference: the depthwise unit in one pass"): at
inference XLA:CPU runs an inverted-residual block's expansion BatchNorm + ReLU6 together with
the depthwise convolution's zero padding as one loop that writes a padded copy of the expanded
activation, then reads it back for the shifted sum (fused with the depthwise BatchNorm +
ReLU6). The expanded tensor is the largest in the block; those two loops were 30 of the 70 ms
of op time of MobileNetV2-SE at batch 64. `cpu_kernels.depthwise_forward` reads it once,
activating rows into a cache-resident ring buffer, and writes the block's depthwise output
once: the same layers 2.1x faster.

The unit spans two modules (the expansion's BatchNorm and the depthwise conv with its own),
so the model asks for it explicitly (`MobileNetV2`'s `InvertedResidual` at inference):
`BatchNormTerms` reads a BatchNorm's variables as flax's inference affine, `ConvKernel` a
conv's kernel under the name `Conv` gives it, and `depthwise_bn_act` applies the unit. The
variables are the ones the unfused modules create, so checkpoints do not change.
Differentiating through it (saliency maps on an inference model) differentiates the same
function written in JAX ops.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from lowlight.models import cpu_kernels, fast_conv
from lowlight.models import layers as L

#: (mean, mul, bias, activation): act((v - mean) * mul + bias); mean, mul, bias (C,) float32.
Terms = tuple[jax.Array, jax.Array, jax.Array, str]


def usable(impl: str, x_shape, w_shape, dtype) -> bool:
    """Whether `depthwise_bn_act` runs the compiled kernel for this layer: `impl` resolving to
    "fast", static shapes, float32, one CPU device and the kernels available (not inside
    `cpu_kernels.disabled()`, e.g. for export)."""
    return (fast_conv.resolve_impl(impl) == "fast" and fast_conv._static(x_shape)
            and fast_conv._one_cpu_device() and dtype == jnp.float32
            and cpu_kernels.depthwise_supported(x_shape, w_shape, dtype, (1, 1)))


class BatchNormTerms(nn.Module):
    """The inference affine of a BatchNorm over the last axis, from its variables (`scale`
    unless `use_scale=False`, `bias`, `batch_stats` `mean` and `var`, as `layers.batch_norm`
    and `layers.BatchNormAct` create them): (mean, rsqrt(var + eps) * scale, bias) in flax's
    order of operations, and `activation`. Use it in place of such a module, with its name."""

    epsilon: float
    activation: str = "none"
    use_scale: bool = True
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, channels: int) -> Terms:
        mean, var, scale, bias = L.bn_variables(self, channels, self.use_scale,
                                                self.param_dtype)
        mul = lax.rsqrt(var.value + self.epsilon)
        if scale is not None:
            mul = mul * scale
        f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
        return f32(mean.value), f32(mul), f32(bias), self.activation


class ConvKernel(nn.Module):
    """The `kernel` parameter of a `fast_conv.Conv` / `nn.Conv` (no bias) with the same shape,
    initialiser and dtype, without applying it: use it in place of such a module, with its
    name, when the convolution runs inside a fused kernel."""

    features: int
    kernel_size: Sequence[int]
    feature_group_count: int = 1
    kernel_init: Any = nn.initializers.lecun_normal()
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, in_features: int) -> jax.Array:
        kh, kw = fast_conv._pair(self.kernel_size, "kernel_size")
        shape = (kh, kw, in_features // self.feature_group_count, self.features)
        return self.param("kernel", self.kernel_init, shape, self.param_dtype)


def _apply(v: jax.Array, terms: Terms | None) -> jax.Array:
    if terms is None:
        return v
    mean, mul, bias, act = terms
    return L._activate((v - mean) * mul + bias, act, None)


def reference(x, kernel, strides, padding, pre: Terms | None, post: Terms | None):
    """The unit in JAX ops, as the unfused modules compute it: pre, zero padding, the shifted
    sum of `fast_conv`'s depthwise path, post."""
    y = fast_conv._depthwise_sum(_apply(x, pre), kernel, strides, padding, (1, 1))
    return _apply(y, post)


def depthwise_bn_act(x: jax.Array, kernel: jax.Array, *, strides: Sequence[int],
                     padding: tuple, pre: Terms | None, post: Terms | None) -> jax.Array:
    """post(depthwise_conv(pad(pre(x)))) for NHWC float32 x and a (KH, KW, 1, C) kernel;
    `padding` ((top, bottom), (left, right)), `pre`/`post` `Terms` or None. Runs the compiled
    kernel (check `usable` first); its gradient is that of `reference`."""
    strides = tuple(int(s) for s in strides)
    padding = tuple(tuple(int(p) for p in side) for side in padding)
    acts = tuple(t[3] if t is not None else None for t in (pre, post))
    vecs = tuple(tuple(t[:3]) if t is not None else None for t in (pre, post))
    return _fused(x, kernel, vecs, strides, padding, acts)


def _terms(vecs, act):
    return None if vecs is None else (*vecs, act)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fused(x, kernel, vecs, strides, padding, acts):
    return cpu_kernels.depthwise_forward(x, kernel, strides, padding,
                                         pre=_terms(vecs[0], acts[0]),
                                         post=_terms(vecs[1], acts[1]))


def _fused_fwd(x, kernel, vecs, strides, padding, acts):
    return _fused(x, kernel, vecs, strides, padding, acts), (x, kernel, vecs)


def _fused_bwd(strides, padding, acts, res, dy):
    def f(x, kernel, vecs):
        return reference(x, kernel, strides, padding, _terms(vecs[0], acts[0]),
                         _terms(vecs[1], acts[1]))
    _, vjp = jax.vjp(f, *res)
    return vjp(dy)


_fused.defvjp(_fused_fwd, _fused_bwd)
