"""iResNet identity backbones (ArcFace "r18/r34/r50/r100/r200") in flax linen.

Paper B §3.6 (and Fig. 3) uses ResNet-100/iResNet as the convolutional identity backbone,
producing 512-d embeddings. This is the structure of insightface `recognition/arcface_torch/
backbones/iresnet.py`, layer for layer, so its parameter counts are identical (trainable: r50
43,590,336, r100 65,155,648) and its PyTorch weights load with `load_torch_state`:

  stem    conv3x3(3->64, stride 1, no bias) - BN - PReLU(per channel)
  stages  widths 64/128/256/512, each starting with stride 2 and a 1x1 conv + BN shortcut;
          IBasicBlock = BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, identity add,
          no activation after the add
  head    BN2d - flatten - dropout - FC(512*7*7 -> embed_dim, bias) - BN1d (scale frozen at 1)

Layout note: activations are NHWC here, NCHW in PyTorch. The head flattens in PyTorch's (C, H, W)
order (a transpose before the reshape), so a torch `fc.weight` loads with a plain transpose and no
permutation of its 25,088 inputs. Mixed precision: `dtype=jnp.bfloat16` (or float16) runs the
convolutional body in that dtype with float32 parameters, and — like arcface_torch's `fp16` flag,
which leaves `fc` and `features` outside autocast — the FC head in float32.

Hook for skin-mask modulation (paper B Eq. (2), F' = a*M*F + (1-a)*F with learnable a initialised
to 0.7): set `mask_stage` (0 = after the stem, k = after stage k) and pass `feature_mask` (B,H,W)
or (B,H,W,1) in [0, 1] at any resolution; it is resized to the feature map. Stages are separate
modules called in one loop (`IResNet.__call__`); other per-stage modulations belong in `_hook`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lowlight.models import fast_conv
from lowlight.models import layers as L

# arcface_torch initialises every conv weight with N(0, 0.1).
_CONV_INIT = nn.initializers.normal(stddev=0.1)
_PAD1 = ((1, 1), (1, 1))  # torch padding=1; flax "SAME" pads (0, 1) at stride 2, which differs.

STAGE_LAYERS = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}


class IBasicBlock(nn.Module):
    """BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, plus the (projected) identity."""

    planes: int
    stride: int = 1
    downsample: bool = False
    dtype: Any = jnp.float32
    conv_impl: str = "auto"
    bn_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = functools.partial(fast_conv.conv_module(self.conv_impl), use_bias=False,
                                 dtype=self.dtype, kernel_init=_CONV_INIT)
        # every BatchNorm of the block through the fused VJP where bn_impl resolves to "fast"
        # (activation "none" for bn1, bn3 and the projection's BN)
        bn = functools.partial(L.batch_norm_act, train=train, dtype=self.dtype,
                               impl=self.bn_impl or self.conv_impl)
        out = bn(x, activation="none", name="bn1")
        out = conv(self.planes, (3, 3), padding=_PAD1, name="conv1")(out)
        out = bn(out, activation="prelu", name="bn2")  # + the sibling "prelu" slope
        out = conv(self.planes, (3, 3), strides=self.stride, padding=_PAD1, name="conv2")(out)
        out = bn(out, activation="none", name="bn3")
        identity = x
        if self.downsample:
            identity = conv(
                self.planes, (1, 1), strides=self.stride, padding="VALID", name="downsample_conv"
            )(x)
            identity = bn(identity, activation="none", name="downsample_bn")
        return out + identity


class IResNetStage(nn.Module):
    """`blocks` IBasicBlocks; the first one strides and projects (insightface `_make_layer`)."""

    planes: int
    blocks: int
    in_planes: int
    stride: int = 2
    dtype: Any = jnp.float32
    remat: bool = False
    conv_impl: str = "auto"
    bn_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        block_cls = nn.remat(IBasicBlock, static_argnums=(2,)) if self.remat else IBasicBlock
        for j in range(self.blocks):
            first = j == 0
            x = block_cls(
                planes=self.planes,
                stride=self.stride if first else 1,
                downsample=first and (self.stride != 1 or self.in_planes != self.planes),
                dtype=self.dtype,
                conv_impl=self.conv_impl,
                bn_impl=self.bn_impl,
                name=f"block{j}",
            )(x, train)
        return x


class MaskModulation(nn.Module):
    """Paper B Eq. (2): F' = alpha*M*F + (1-alpha)*F, alpha learnable (init 0.7), used in [0, 1]."""

    alpha_init: float = 0.7

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        # The parameter exists whether or not a mask is given, so the tree never changes shape.
        alpha = self.param("alpha", nn.initializers.constant(self.alpha_init), ())
        if mask is None:
            return x
        if mask.ndim == 3:
            mask = mask[..., None]
        b, h, w, _ = x.shape
        # Linear resize with antialiasing averages the mask over each feature cell when shrinking.
        mask = jax.image.resize(mask.astype(jnp.float32), (b, h, w, 1), method="linear")
        a = jnp.clip(alpha, 0.0, 1.0)
        return (x * (a * mask + (1.0 - a))).astype(x.dtype)


class IResNet(nn.Module):
    """insightface iResNet. `__call__(x, *, train, feature_mask=None) -> (embedding, aux)`.

    Attributes:
      layers: blocks per stage, e.g. (3, 13, 30, 3) for r100 (see `STAGE_LAYERS`).
      embed_dim: embedding size (insightface `num_features`).
      dropout: dropout rate before the FC (needs a "dropout" rng when > 0 and training).
      dtype: computation dtype of the body (params stay float32; the FC head runs in float32).
      widths: channels per stage.
      mask_stage: None (no modulation, no extra parameter) or the stage after which the skin mask
        modulates features (0 = stem output, 1..4 = stage outputs).
      mask_alpha_init: initial alpha of the modulation.
      attention: "none" | "se" | "cbam" — a channel (SE) or channel+spatial (CBAM) attention
        block after `attention_stage`, the alternatives paper B Table 8 compares with the mask.
      attention_stage: stage index as for `mask_stage`.
      remat: recompute block activations in the backward pass (insightface `using_ckpt`).
      conv_impl: "auto" (default: "fast" on the CPU backend, "xla" elsewhere), "xla"
        (`nn.Conv`) or "fast" (`fast_conv.Conv`: the same parameters, outputs and gradients to
        float32 rounding; docs/performance.md: 1.19x faster train step and 1.34x inference
        throughput for iResNet-50 on a 2-core CPU).
      bn_impl: the stem's BatchNorm + PReLU and every BatchNorm of the blocks (bn2 + prelu; bn1,
        bn3 and the projection's BN without activation): None (default) follows `conv_impl`;
        "xla" is `nn.BatchNorm` (+ `PReLU`) differentiated by JAX, "fast" `layers.BatchNormAct`
        (train mode: one hand-written VJP, the same variables and numbers to float32 rounding;
        1.03-1.05x the iResNet-50 train step on a 2-core CPU), "auto" "fast" on the CPU
        backend. The head's BatchNorms are flax's.
    """

    layers: Sequence[int]
    embed_dim: int = 512
    dropout: float = 0.0
    dtype: Any = jnp.float32
    widths: Sequence[int] = (64, 128, 256, 512)
    mask_stage: int | None = None
    mask_alpha_init: float = 0.7
    attention: str = "none"
    attention_stage: int = 1
    remat: bool = False
    conv_impl: str = "auto"
    bn_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, feature_mask: jax.Array | None = None):
        if len(self.layers) != len(self.widths):
            raise ValueError(f"layers {self.layers} and widths {self.widths} differ in length")
        if feature_mask is not None and self.mask_stage is None:
            raise ValueError("feature_mask given but mask_stage is None; set mask_stage to use it")
        x = x.astype(self.dtype)

        # ---- stem ----
        x = fast_conv.conv_module(self.conv_impl)(
            self.widths[0],
            (3, 3),
            padding=_PAD1,
            use_bias=False,
            dtype=self.dtype,
            kernel_init=_CONV_INIT,
            name="conv1",
        )(x)
        x = L.batch_norm_act(x, train=train, activation="prelu", dtype=self.dtype,
                             impl=self.bn_impl or self.conv_impl, name="bn1")  # + "prelu"
        x = self._hook(x, 0, feature_mask, train)

        # ---- stages (hook point after each) ----
        in_planes = self.widths[0]
        for i, (planes, blocks) in enumerate(zip(self.widths, self.layers, strict=True)):
            x = IResNetStage(
                planes=planes,
                blocks=blocks,
                in_planes=in_planes,
                stride=2,
                dtype=self.dtype,
                remat=self.remat,
                conv_impl=self.conv_impl,
                bn_impl=self.bn_impl,
                name=f"layer{i + 1}",
            )(x, train)
            in_planes = planes
            x = self._hook(x, i + 1, feature_mask, train)

        # ---- head ----
        x = L.batch_norm(train=train, dtype=self.dtype, name="bn2")(x)
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # torch.flatten order (C, H, W)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = x.astype(jnp.float32)
        init = L.torch_linear_init(x.shape[-1])
        x = nn.Dense(self.embed_dim, kernel_init=init, bias_init=init, name="fc")(x)
        x = L.frozen_scale_batch_norm(train=train, name="features")(x)
        return x, {"norm": L.l2_norm(x)}

    def _hook(self, x: jax.Array, stage: int, feature_mask: jax.Array | None,
              train: bool) -> jax.Array:
        if self.attention != "none" and self.attention_stage == stage:
            from lowlight.models import attention as att

            blocks = {"se": att.SqueezeExcitation, "cbam": att.CBAM}
            if self.attention not in blocks:
                raise ValueError(f"attention {self.attention!r}; valid: none, se, cbam")
            x = blocks[self.attention](name=f"attention_{self.attention}")(x, train=train)
        if self.mask_stage != stage:
            return x
        return MaskModulation(alpha_init=self.mask_alpha_init, name="mask_modulation")(
            x, feature_mask
        )


def _torch_rename(module: list[str]) -> list[str]:
    """torch module path -> flax path: layer1.0.downsample.1 -> layer1/block0/downsample_bn."""
    if module[0].startswith("layer"):
        path = [module[0], f"block{module[1]}"]
        rest = module[2:]
        if rest[0] == "downsample":
            path.append({"0": "downsample_conv", "1": "downsample_bn"}[rest[1]])
        else:
            path += rest
        return path
    return module


def load_torch_state(state_dict: Any) -> dict:
    """arcface_torch iResNet `state_dict` (tensors or arrays) -> flax `{"params", "batch_stats"}`.

    Works for any depth; the result feeds `model.apply(variables, x, train=False)`. Conv kernels
    are transposed to HWIO, linear weights to (in, out); the FC needs no input permutation because
    `IResNet` flattens in torch's (C, H, W) order. `features.weight` (frozen at 1) is checked and
    dropped.
    """
    return L.convert_torch_state(state_dict, _torch_rename, frozen_unit_scales=("features",))


def _factory(depth: int):
    def make(**kwargs: Any) -> IResNet:
        return IResNet(layers=STAGE_LAYERS[depth], **kwargs)

    make.__name__ = f"iresnet{depth}"
    make.__doc__ = (
        f"insightface iResNet-{depth} (stages {STAGE_LAYERS[depth]}). kwargs: embed_dim=512, "
        "dropout=0.0, dtype=jnp.float32, mask_stage=None, mask_alpha_init=0.7, remat=False, "
        'conv_impl="auto", bn_impl=None.'
    )
    return make


iresnet18 = _factory(18)
iresnet34 = _factory(34)
iresnet50 = _factory(50)
iresnet100 = _factory(100)
iresnet200 = _factory(200)
