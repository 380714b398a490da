"""Vision Transformers for 112x112 faces (ArcFace "vit_t/vit_s/vit_b" plus standard widths).

Paper B §3.6 uses ViT-Base as the transformer identity backbone (512-d embeddings) and, for the
skin-mask variant, scales each patch token by its mean mask score before self-attention (Eqs.
(7)-(8)): pass that score as `token_scale` (B, num_patches); None means no scaling.

The arcface_torch variants follow insightface `recognition/arcface_torch/backbones/vit.py` and
its `get_model` exactly, so the parameter counts are the same (vit_t 19,137,792; vit_s
76,023,296; vit_b 113,833,472) and its weights load with `load_torch_state`:

  patch embed   conv 9x9 stride 9 (bias) -> 12x12 = 144 tokens at 112x112 (the last 4 pixel
                rows/columns are not seen, as in arcface_torch); learnable position embedding;
                no CLS token
  blocks        pre-LN: x + DropPath(Attn(LN(x))); x + DropPath(MLP(LN(x))); 8 heads, qkv
                without bias, proj with bias; MLP ratio 4 with ReLU6; LayerNorm eps 1e-5 (torch)
  final         LayerNorm, flatten (144*width) -> Linear(no bias) -> BN1d -> Linear(no bias)
                -> BN1d (both BN eps 2e-5, affine)
  training      stochastic depth linearly 0 -> drop_path_rate (0.1) over the blocks; random
                token masking (mask_ratio 0.1): 90% of tokens (129 of 144) go through the blocks,
                the dropped positions are refilled with the learnable `mask_token` after the
                final LayerNorm. `mask_token` is counted in the parameters (arcface_torch has it).

Standard-width variants (paper B names "ViT-Base"; the common ViT-S/ViT-B widths): `vit_s_std`
(width 384, depth 12, 6 heads) and `vit_b_std` (width 768, depth 12, 12 heads), exact-erf GELU
MLP with ratio 4, otherwise identical (patch-9 stem, no qkv bias, same embedding head, same
training options).

Naming: `width` is the token dimension (arcface_torch's `embed_dim`), `embed_dim` the output
embedding size (its `num_classes`). RNG: stochastic depth, dropout and token masking all draw
from the "dropout" stream, so training needs `rngs={"dropout": key}`. Mixed precision:
`dtype` is the computation dtype of the patch embedding and blocks; attention logits/softmax,
the final LayerNorm and the feature head run in float32 (as arcface_torch's autocast regions).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lowlight.models import layers as L

_LINEAR_INIT = nn.initializers.truncated_normal(stddev=0.02)  # timm trunc_normal_(std=.02)
_LN_EPS = 1e-5  # torch.nn.LayerNorm default (flax's is 1e-6)
_HEAD_BN_EPS = 2e-5  # arcface_torch feature head

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu6": jax.nn.relu6,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # torch nn.GELU() is exact
}


def _dense(
    features: int, *, use_bias: bool = True, dtype: Any = jnp.float32, name: str | None = None
):
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=_LINEAR_INIT,
        bias_init=nn.initializers.zeros,
        name=name,
    )


def _layer_norm(name: str, dtype: Any = jnp.float32) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=_LN_EPS, dtype=dtype, use_fast_variance=False, name=name)


class Attention(nn.Module):
    """Multi-head self-attention; qkv projection in `dtype`, scores and softmax in float32."""

    width: int
    num_heads: int
    qkv_bias: bool = False
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        b, n, d = x.shape
        head_dim = d // self.num_heads
        qkv = _dense(3 * d, use_bias=self.qkv_bias, dtype=self.dtype, name="qkv")(x)
        # torch reshapes to (B, N, 3, heads, head_dim): the same feature order as here.
        qkv = qkv.reshape(b, n, 3, self.num_heads, head_dim).astype(jnp.float32)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        attn = jnp.einsum("bqhd,bkhd->bhqk", q, k) * head_dim**-0.5
        attn = jax.nn.softmax(attn, axis=-1)
        attn = nn.Dropout(self.dropout, deterministic=not train)(attn)
        out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, d)
        out = _dense(d, dtype=self.dtype, name="proj")(out.astype(self.dtype))
        return nn.Dropout(self.dropout, deterministic=not train)(out)


class Mlp(nn.Module):
    hidden: int
    activation: str = "relu6"
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        drop = nn.Dropout(self.dropout, deterministic=not train)
        y = _dense(self.hidden, dtype=self.dtype, name="fc1")(x)
        y = drop(_ACTIVATIONS[self.activation](y))
        y = _dense(x.shape[-1], dtype=self.dtype, name="fc2")(y)
        return drop(y)


class Block(nn.Module):
    """Pre-LN transformer block with stochastic depth (per-sample DropPath)."""

    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    activation: str = "relu6"
    dropout: float = 0.0
    drop_path: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        d = x.shape[-1]
        # Dropout broadcast over tokens and channels = timm DropPath (per-sample branch drop).
        drop_path = nn.Dropout(self.drop_path, broadcast_dims=(1, 2), deterministic=not train)
        y = _layer_norm("norm1", self.dtype)(x)
        y = Attention(d, self.num_heads, self.qkv_bias, self.dropout, self.dtype, name="attn")(
            y, train
        )
        x = x + drop_path(y)
        y = _layer_norm("norm2", self.dtype)(x)
        y = Mlp(int(d * self.mlp_ratio), self.activation, self.dropout, self.dtype, name="mlp")(
            y, train
        )
        return x + drop_path(y)


def random_masking(x: jax.Array, key: jax.Array, mask_ratio: float) -> tuple[jax.Array, jax.Array]:
    """MAE-style per-sample random token subset (arcface_torch `random_masking`).

    Returns the kept tokens (B, int(L*(1-mask_ratio)), D) and `ids_restore` (B, L) that undoes
    the shuffle once the dropped positions are appended back.
    """
    b, n, d = x.shape
    keep = int(n * (1 - mask_ratio))
    noise = jax.random.uniform(key, (b, n))
    ids_shuffle = jnp.argsort(noise, axis=1)
    ids_restore = jnp.argsort(ids_shuffle, axis=1)
    kept = jnp.take_along_axis(x, ids_shuffle[:, :keep, None], axis=1)
    return kept, ids_restore


class VisionTransformer(nn.Module):
    """Face ViT. `__call__(x, *, train, token_scale=None) -> (embedding, aux)`.

    Attributes:
      width, depth, num_heads, mlp_ratio, qkv_bias, activation ("relu6" | "gelu"): the trunk.
      embed_dim: embedding size. img_size, patch_size: 112 and 9 give 144 tokens.
      dropout: arcface_torch `drop_rate` (after the position embedding, in attention output and
        MLP). drop_path_rate: stochastic depth of the last block. mask_ratio: token masking at
        train time (0 disables). dtype: computation dtype. remat: rematerialise blocks
        (arcface_torch `using_checkpoint`, on for vit_b there).
    """

    width: int
    depth: int
    num_heads: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    activation: str = "relu6"
    embed_dim: int = 512
    img_size: int = 112
    patch_size: int = 9
    dropout: float = 0.0
    drop_path_rate: float = 0.1
    mask_ratio: float = 0.1
    dtype: Any = jnp.float32
    remat: bool = False

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, token_scale: jax.Array | None = None):
        b, h, w, _ = x.shape
        if (h, w) != (self.img_size, self.img_size):
            raise ValueError(f"input {h}x{w} does not match img_size {self.img_size}")
        n, d = self.num_patches, self.width

        # ---- tokens ----
        p = self.patch_size
        x = nn.Conv(
            d,
            (p, p),
            strides=p,
            padding="VALID",
            dtype=self.dtype,
            kernel_init=L.torch_linear_init(3 * p * p),
            bias_init=L.torch_linear_init(3 * p * p),
            name="patch_embed",
        )(x.astype(self.dtype))
        x = x.reshape(b, n, d)  # row-major over the patch grid, as torch flatten(2).transpose(1, 2)
        if token_scale is not None:
            # Paper B Eq. (8): scale the patch-projection embedding E_k by its mask score t_k.
            x = x * token_scale.reshape(b, n, 1).astype(x.dtype)
        pos_embed = self.param("pos_embed", _LINEAR_INIT, (1, n, d))
        mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, d))
        x = x + pos_embed.astype(x.dtype)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)

        masking = train and self.mask_ratio > 0
        if masking:
            x, ids_restore = random_masking(x, self.make_rng("dropout"), self.mask_ratio)

        # ---- blocks ----
        block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
        rates = np.linspace(0.0, self.drop_path_rate, self.depth)
        for i in range(self.depth):
            x = block_cls(
                self.num_heads,
                self.mlp_ratio,
                self.qkv_bias,
                self.activation,
                self.dropout,
                float(rates[i]),
                self.dtype,
                name=f"block{i}",
            )(x, train)
        x = _layer_norm("norm")(x.astype(jnp.float32))

        if masking:
            fill = jnp.broadcast_to(mask_token, (b, n - x.shape[1], d))
            x = jnp.concatenate([x, fill], axis=1)
            x = jnp.take_along_axis(x, ids_restore[:, :, None], axis=1)

        # ---- feature head (float32) ----
        x = x.reshape(b, n * d)
        x = _dense(d, use_bias=False, name="feature_fc1")(x)
        x = L.batch_norm(train=train, eps=_HEAD_BN_EPS, name="feature_bn1")(x)
        x = _dense(self.embed_dim, use_bias=False, name="feature_fc2")(x)
        x = L.batch_norm(train=train, eps=_HEAD_BN_EPS, name="feature_bn2")(x)
        return x, {"norm": L.l2_norm(x)}


_HEAD_NAMES = {"0": "feature_fc1", "1": "feature_bn1", "2": "feature_fc2", "3": "feature_bn2"}


def _torch_rename(module: list[str]) -> list[str]:
    """torch -> flax path: blocks.3.attn.qkv -> block3/attn/qkv, feature.1 -> feature_bn1."""
    if module[0] == "blocks":
        return [f"block{module[1]}"] + module[2:]
    if module[0] == "feature":
        return [_HEAD_NAMES[module[1]]]
    if module == ["patch_embed", "proj"]:
        return ["patch_embed"]
    return module


def load_torch_state(state_dict: Any) -> dict:
    """arcface_torch VisionTransformer `state_dict` -> flax `{"params", "batch_stats"}`."""
    return L.convert_torch_state(state_dict, _torch_rename)


# ---- factories: arcface_torch get_model("vit_t" | "vit_s" | "vit_b") and standard widths ----
_KWARGS_DOC = (
    " kwargs override any VisionTransformer attribute, e.g. embed_dim=512, dropout=0.0, "
    "drop_path_rate=0.1, mask_ratio=0.1, dtype=jnp.float32, remat=False."
)


def _factory(name: str, doc: str, **arch: Any):
    def make(**kwargs: Any) -> VisionTransformer:
        return VisionTransformer(**{**arch, **kwargs})

    make.__name__ = name
    make.__doc__ = doc + _KWARGS_DOC
    return make


vit_t = _factory(
    "vit_t",
    "arcface_torch vit_t: width 256, depth 12, 8 heads, ReLU6.",
    width=256,
    depth=12,
    num_heads=8,
)
vit_s = _factory(
    "vit_s",
    "arcface_torch vit_s: width 512, depth 12, 8 heads, ReLU6.",
    width=512,
    depth=12,
    num_heads=8,
)
vit_b = _factory(
    "vit_b",
    "arcface_torch vit_b: width 512, depth 24, 8 heads, ReLU6.",
    width=512,
    depth=24,
    num_heads=8,
)
vit_s_std = _factory(
    "vit_s_std",
    "Standard ViT-S width: 384, depth 12, 6 heads, GELU.",
    width=384,
    depth=12,
    num_heads=6,
    activation="gelu",
)
vit_b_std = _factory(
    "vit_b_std",
    "Standard ViT-B width: 768, depth 12, 12 heads, GELU.",
    width=768,
    depth=12,
    num_heads=12,
    activation="gelu",
)
