"""Skin segmenters: paper B's U-Net (§3.3) and its 3-conv CNN baseline (§4.5.4, Table 9).

Both map a face, float32 NHWC in [-1, 1] (`lowlight.data.normalize.to_model_input`), to a soft
skin mask at the input resolution and follow the model contract of `lowlight.models`:
`__call__(x, *, train) -> (mask (B,H,W) in [0,1], {"logits": (B,H,W)})`. Train them with
`lowlight.losses.segmentation.segmentation_loss` (paper B eqs. 4-6), passing `aux["logits"]`
so the BCE term is computed stably.

U-Net — how §3.3's sentence "four encoder-decoder levels with channel dimensions of 64, 128, 256,
and 512" is read here. The paper lists the channel dimensions, and the list is taken as
exhaustive: the U has four *levels* (rows, i.e. resolutions 1, 1/2, 1/4, 1/8) whose widths are
exactly 64, 128, 256, 512; the deepest level (512 at 1/8 resolution, 14x14 for a 112x112 face) is
the bottleneck where encoder meets decoder. So

  encoder   [block 64] -pool- [block 128] -pool- [block 256] -pool-
  bottleneck                                                      [block 512]
  decoder   [block 64] -up- [block 128] -up- [block 256] -up-   (each after concat with skip)
  head      1x1 conv -> sigmoid

with three 2x2 max-pools, so H and W must be divisible by 2**3 = 8 (a clear ValueError
otherwise). The other reading — four pooled encoder levels 64..512 plus a 1024 bottleneck,
Ronneberger et al.'s original (31M parameters) — is `unet(features=(64, 128, 256, 512, 1024))`
(inputs divisible by 16; 112 = 16 * 7 works). We default to the first because the paper names
no 1024-channel stage and stresses a light segmentation stage (relighting + segmentation add
~10 ms, §4.6).

Details the paper leaves open, and the choices made:
  * block = (3x3 conv -> BN -> ReLU) x 2, the usual U-Net "double conv"; convs feeding a BN have
    no bias (the BN shift makes it redundant), BN uses PyTorch defaults (`layers.batch_norm`).
  * "SAME" padding, so the mask comes out at the input resolution (the original U-Net used valid
    convs and cropped; §3.3 says the mask is 112x112 for a 112x112 input).
  * upsampling: `upsample="transpose"` (default, as the original U-Net): ConvTranspose 2x2
    stride 2 with bias, halving the channels to the skip's width; `upsample="bilinear"`:
    bilinear resize x2 followed by a 1x1 conv (with bias) to the skip's width — no checkerboard
    artefacts, fewer parameters.
  * skips are concatenated (skip first, then the upsampled features) before the decoder block.
  * BatchNorm statistics live in `batch_stats`; under `jax.jit` with a sharded batch they are
    already global (see `lowlight.models.layers`).

Parameter counts (trainable, `params` collection): `unet()` 7,700,161; the classic reading
`unet(features=(64, 128, 256, 512, 1024))` 31,037,633; `unet(upsample="bilinear")` 7,184,065;
`seg_cnn3()` 10,177. Per level k of width c (input width c_in): block 9*c_in*c + 9*c*c + 4*c
(two BNs, scale + bias); transposed up-conv from the level below (width c'): 4*c'*c + c;
head c_0 + 1.

3-conv CNN (§4.5.4 "a simple CNN segmenter (3 conv layers)"): the paper gives only the layer
count; we use 3x3 conv 32 -> ReLU -> 3x3 conv 32 -> ReLU -> 1x1 conv 1 -> sigmoid, all with bias
and no BatchNorm (receptive field 5x5 — deliberately local, like a learned colour/texture
classifier, which is what makes it a baseline).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lowlight.models import fast_conv
from lowlight.models import layers as L

#: Paper B §3.3 widths: four levels, the last (512) is the bottleneck.
DEFAULT_FEATURES: tuple[int, ...] = (64, 128, 256, 512)
#: Ronneberger et al. (2015): four pooled levels plus a 1024-wide bottleneck.
CLASSIC_FEATURES: tuple[int, ...] = (64, 128, 256, 512, 1024)
UPSAMPLE_MODES: tuple[str, ...] = ("transpose", "bilinear")


def _check_size(x: jax.Array, multiple: int, name: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{name}: expected NHWC input (B, H, W, C), got shape {x.shape}")
    h, w = x.shape[1], x.shape[2]
    if h % multiple or w % multiple:
        raise ValueError(
            f"{name}: input height and width must be divisible by {multiple} "
            f"(2 ** number of poolings), got {h}x{w}; resize/pad the face (e.g. 112x112) or "
            f"use fewer levels (`features`)")


class ConvBlock(nn.Module):
    """(3x3 conv, no bias -> BatchNorm -> ReLU) x 2: one U-Net level (paper B §3.3)."""

    features: int
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = fast_conv.conv_module(self.conv_impl)
        for i in range(2):
            x = conv(self.features, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype,
                     name=f"conv{i}")(x)
            x = L.batch_norm(train=train, dtype=self.dtype, name=f"bn{i}")(x)
            x = nn.relu(x)
        return x


class UNet(nn.Module):
    """U-Net skin segmenter of paper B §3.3 (see the module docstring for the reading).

    Attributes:
      features: width of each level, shallow to deep; the last entry is the bottleneck, so
        there are `len(features) - 1` poolings and inputs must be divisible by
        `2 ** (len(features) - 1)`.
      upsample: "transpose" (ConvTranspose 2x2 stride 2) or "bilinear" (resize + 1x1 conv).
      dtype: computation dtype of the body (parameters stay float32); the head and the
        sigmoid run in float32.
      conv_impl: "auto" | "xla" | "fast" (`lowlight.models.fast_conv`; the same parameters).
    """

    features: Sequence[int] = DEFAULT_FEATURES
    upsample: str = "transpose"
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        feats = tuple(int(f) for f in self.features)
        _check_size(x, 2 ** (len(feats) - 1), "UNet")
        x = x.astype(self.dtype)
        skips = []
        for k, f in enumerate(feats[:-1]):
            x = ConvBlock(f, dtype=self.dtype, conv_impl=self.conv_impl,
                          name=f"enc{k}")(x, train)
            skips.append(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = ConvBlock(feats[-1], dtype=self.dtype, conv_impl=self.conv_impl,
                      name="bottleneck")(x, train)
        for k in reversed(range(len(feats) - 1)):
            f = feats[k]
            if self.upsample == "transpose":
                up = fast_conv.conv_transpose_module(self.conv_impl)
                x = up(f, (2, 2), strides=(2, 2), padding="VALID", dtype=self.dtype,
                       name=f"up{k}")(x)
            else:
                b, h, w, c = x.shape
                x = jax.image.resize(x, (b, 2 * h, 2 * w, c), "bilinear")
                x = nn.Conv(f, (1, 1), dtype=self.dtype, name=f"up{k}")(x)
            x = jnp.concatenate([skips[k], x], axis=-1)
            x = ConvBlock(f, dtype=self.dtype, conv_impl=self.conv_impl,
                          name=f"dec{k}")(x, train)
        # Paper B eq. (1): M = sigmoid(W_f F + b), a 1x1 conv on the last decoder features.
        logits = nn.Conv(1, (1, 1), dtype=jnp.float32, name="head")(x.astype(jnp.float32))
        logits = logits[..., 0]
        return jax.nn.sigmoid(logits), {"logits": logits}


class SegCNN3(nn.Module):
    """Paper B §4.5.4 baseline: three conv layers (k x k f1 -> ReLU -> k x k f2 -> ReLU -> 1x1).

    Attributes:
      features: widths of the two hidden conv layers.
      kernel_size: spatial size of the two hidden convs (the last conv is 1x1).
    """

    features: Sequence[int] = (32, 32)
    kernel_size: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        del train  # no BatchNorm/dropout; kept for the common model contract
        _check_size(x, 1, "SegCNN3")
        if len(self.features) != 2:
            raise ValueError(f"SegCNN3: features must name 2 hidden widths (3 conv layers in "
                             f"all), got {tuple(self.features)}")
        x = x.astype(self.dtype)
        k = int(self.kernel_size)
        for i, f in enumerate(self.features):
            x = nn.relu(nn.Conv(int(f), (k, k), padding="SAME", dtype=self.dtype,
                                name=f"conv{i}")(x))
        logits = nn.Conv(1, (1, 1), dtype=jnp.float32, name="head")(x.astype(jnp.float32))
        logits = logits[..., 0]
        return jax.nn.sigmoid(logits), {"logits": logits}


def unet(*, features: Sequence[int] | None = None, width: float = 1.0,
         upsample: str = "transpose", dtype: Any = jnp.float32, conv_impl: str = "auto") -> UNet:
    """Paper B §3.3 U-Net (registry name "unet"). 7,700,161 parameters at the defaults.

    Args:
      features: per-level widths, shallow to deep, last = bottleneck; default (64, 128, 256,
        512). `CLASSIC_FEATURES` gives Ronneberger's 5-level network.
      width: multiplier applied to `features` (rounded, at least 1), e.g. 0.125 -> (8, 16, 32, 64).
      upsample: "transpose" (default, original U-Net) or "bilinear".
      dtype: computation dtype (e.g. jnp.bfloat16); parameters are float32.
      conv_impl: "auto" (fast_conv on the CPU backend), "xla" or "fast".
    """
    feats = tuple(DEFAULT_FEATURES if features is None else features)
    if len(feats) < 2:
        raise ValueError(f"unet: features needs at least 2 levels (one pooling), got {feats}")
    if width <= 0:
        raise ValueError(f"unet: width must be > 0, got {width}")
    if upsample not in UPSAMPLE_MODES:
        raise ValueError(f"unet: upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
    feats = tuple(max(1, int(round(f * width))) for f in feats)
    return UNet(features=feats, upsample=upsample, dtype=dtype, conv_impl=conv_impl)


def seg_cnn3(*, features: Sequence[int] = (32, 32), kernel_size: int = 3,
             dtype: Any = jnp.float32) -> SegCNN3:
    """Paper B §4.5.4 "simple CNN segmenter (3 conv layers)" (registry name "seg_cnn3").

    10,177 parameters at the defaults: 3*9*32+32 + 32*9*32+32 + 32+1.
    """
    return SegCNN3(features=tuple(int(f) for f in features), kernel_size=kernel_size,
                   dtype=dtype)
