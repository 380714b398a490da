"""Channel and spatial attention blocks over NHWC feature maps: SE and CBAM.

Paper A (§"Proposed method", Fig. 1) puts an "Attentional block" between the MobileNetV2 feature
extractor and the feature projection: squeeze-and-excitation by default, CBAM in its Table 2
comparison. Paper B's Table 8 compares the same blocks on iResNet features, so nothing here knows
about MobileNetV2: every block takes any (B, H, W, C) map and returns one of the same shape.

  * `SqueezeExcitation` — Hu et al., "Squeeze-and-Excitation Networks" (CVPR 2018):
    s = sigmoid(FC_C(ReLU(FC_{C/r}(GAP(x))))), out = x * s. Paper A describes exactly this
    (GAP, ReLU, expansion back to C channels with a sigmoid, reweighting of the input) but does not
    state the reduction ratio r; we use Hu et al.'s default r = 16.
  * `ChannelAttention`, `SpatialAttention`, `CBAM` — Woo et al., "CBAM: Convolutional Block
    Attention Module" (ECCV 2018), Eqs. (2)-(3): channel attention
    Mc = sigmoid(MLP(AvgPool(F)) + MLP(MaxPool(F))) with one shared MLP (C -> C/r -> C, ReLU),
    then spatial attention Ms = sigmoid(conv7x7([AvgPool_c(F); MaxPool_c(F)])) on F' = Mc * F.
    The paper's equation has no normalisation after the 7x7 conv; the authors' PyTorch code adds
    a BatchNorm there (`spatial_bn=True` reproduces it) and concatenates (max, mean) rather than
    (mean, max) — swap the two input channels of the conv kernel when loading those weights.

Every block has the signature `__call__(x, *, train=False)` (only CBAM with `spatial_bn` uses
`train`) and sows its attention weights into the "intermediates" collection ("scale" for SE and
channel attention, "map" for spatial attention) so that evaluators can show them.
Use `attention_block(kind, **kw)` to build one from a config string.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lowlight.models import layers as L

#: Names `attention_block` accepts (paper A Table 2: SE, CBAM, none).
KINDS: tuple[str, ...] = ("se", "cbam", "none")


def _hidden(channels: int, reduction: int) -> int:
    if reduction < 1:
        raise ValueError(f"reduction must be >= 1, got {reduction}")
    return max(1, channels // reduction)


def _dense(features: int, fan_in: int, name: str) -> nn.Dense:
    # PyTorch's nn.Linear default init, so torch reference blocks start from the same law.
    init = L.torch_linear_init(fan_in)
    return nn.Dense(features, kernel_init=init, bias_init=init, name=name)


class SqueezeExcitation(nn.Module):
    """SE block (Hu et al. 2018; paper A's "SE Attentional block"): x * sigmoid(MLP(GAP(x))).

    Attributes:
      reduction: r; the bottleneck has max(1, C // r) units (paper A silent; Hu et al.: 16).
    """

    reduction: int = 16

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # no batch statistics here; accepted so every block has one signature
        c = x.shape[-1]
        hidden = _hidden(c, self.reduction)
        s = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # squeeze: (B, C)
        s = nn.relu(_dense(hidden, c, "fc1")(s))
        s = nn.sigmoid(_dense(c, hidden, "fc2")(s))  # excitation
        self.sow("intermediates", "scale", s)
        return (x * s[:, None, None, :]).astype(x.dtype)


class ChannelAttention(nn.Module):
    """CBAM channel attention (Woo et al. 2018, Eq. 2): shared MLP over avg- and max-pooled."""

    reduction: int = 16

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        hidden = _hidden(c, self.reduction)
        fc1, fc2 = _dense(hidden, c, "fc1"), _dense(c, hidden, "fc2")
        x32 = x.astype(jnp.float32)
        pooled = jnp.stack([jnp.mean(x32, axis=(1, 2)), jnp.max(x32, axis=(1, 2))])  # (2, B, C)
        s = nn.sigmoid(jnp.sum(fc2(nn.relu(fc1(pooled))), axis=0))  # one MLP, both descriptors
        self.sow("intermediates", "scale", s)
        return (x * s[:, None, None, :]).astype(x.dtype)


class SpatialAttention(nn.Module):
    """CBAM spatial attention (Woo et al. 2018, Eq. 3): sigmoid(conv_kxk([mean_c; max_c]))."""

    kernel_size: int = 7
    use_bn: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        x32 = x.astype(jnp.float32)
        desc = jnp.stack([jnp.mean(x32, axis=-1), jnp.max(x32, axis=-1)], axis=-1)  # (B,H,W,2)
        p = (self.kernel_size - 1) // 2
        fan_in = 2 * self.kernel_size**2
        a = nn.Conv(
            1,
            (self.kernel_size, self.kernel_size),
            padding=((p, p), (p, p)),
            use_bias=not self.use_bn,
            kernel_init=L.torch_linear_init(fan_in),  # torch Conv2d default law (bound 1/sqrt)
            bias_init=L.torch_linear_init(fan_in),
            name="conv",
        )(desc)
        if self.use_bn:
            a = L.batch_norm(train=train, name="bn")(a)
        a = nn.sigmoid(a)  # (B, H, W, 1)
        self.sow("intermediates", "map", a[..., 0])
        return (x * a).astype(x.dtype)


class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al. 2018): channel then spatial attention.

    Attributes:
      reduction: channel-MLP reduction ratio r (Woo et al.: 16).
      kernel_size: spatial-attention conv size (Woo et al.: 7).
      spatial_bn: BatchNorm after the spatial conv, as the authors' code (not the paper's Eq. 3).
    """

    reduction: int = 16
    kernel_size: int = 7
    spatial_bn: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        x = ChannelAttention(self.reduction, name="channel")(x)
        return SpatialAttention(self.kernel_size, self.spatial_bn, name="spatial")(x, train=train)


class Identity(nn.Module):
    """`attention="none"`: no parameters, returns x (keeps the call site branch-free)."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        return x


def attention_block(kind: str, *, name: str | None = None, **kwargs: Any) -> nn.Module:
    """Builds the block named `kind` ("se" | "cbam" | "none") with its attributes in `kwargs`.

    Example: `attention_block("se", reduction=8, name="attention")(features, train=train)`.
    Options that exist for another kind only (e.g. `kernel_size` for SE) are ignored, so one
    config section can describe every kind; a name no block has raises.
    """
    unknown = set(kwargs) - set(_OPTIONS)
    if unknown:
        raise ValueError(f"unknown attention option(s) {sorted(unknown)}; valid: {_OPTIONS}")
    kind = str(kind).lower()
    if kind not in _BLOCKS:
        raise ValueError(f"unknown attention {kind!r}; valid: {', '.join(KINDS)}")
    cls, keep = _BLOCKS[kind]
    return cls(**{k: v for k, v in kwargs.items() if k in keep and v is not None}, name=name)


_OPTIONS = ("reduction", "kernel_size", "spatial_bn")
_BLOCKS = {
    "se": (SqueezeExcitation, ("reduction",)),
    "cbam": (CBAM, ("reduction", "kernel_size", "spatial_bn")),
    "none": (Identity, ()),
}
