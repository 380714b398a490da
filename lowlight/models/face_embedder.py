"""Paper B's recognition forward pass (Fig. 3): [relight] → [skin mask] → backbone.

`FaceEmbedder` composes flax modules functionally instead of nesting them in one Module, so each
part keeps its own parameter subtree — `params = {"backbone", "relight", "segmenter"}` (and the
Partial FC `centers` beside them in the train state) — and a pretrained relighting net or U-Net
loads straight from its own run's checkpoint into its subtree (§3.9: pretrained, frozen for N
steps, then fine-tuned jointly).

Mask modulation (paper B eq. 2, eqs. 7–8):
  * iResNet: the soft mask, resized, modulates the feature map after `mask_stage`:
    F' = α·M·F + (1 − α)·F with learnable α (init 0.7) — inside `models.iresnet`;
  * ViT: patch scores t_k = mean of the pixel mask over patch k scale the patch embeddings before
    the first attention block (`token_scale`).
Mask sources: a learned segmenter (U-Net or the 3-conv CNN of §4.5.4), YCbCr thresholding
(Chai & Ngan; non-learned, computed on device), or none.

The relighting net and segmenter always run in inference mode (their BatchNorm statistics are
the pretrained ones); fine-tuning changes their weights only. Relighting is applied at inference
(`relight_eval`, paper B §3.2) and optionally during training too (`relight_train`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lowlight.data.normalize import MEAN, STD

MASK_SOURCES = ("none", "segmenter", "ycbcr")


def ycbcr_mask(x: jax.Array) -> jax.Array:
    """Chai & Ngan skin mask on device from model-space images (B,H,W,3) in [-1,1] → {0,1}."""
    from lowlight.data.skin_color import CB_RANGE, CR_RANGE

    rgb = (x * STD + MEAN) * 255.0
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cr = jnp.round(0.713 * (r - y) + 128.0)
    cb = jnp.round(0.564 * (b - y) + 128.0)
    skin = (cr >= CR_RANGE[0]) & (cr <= CR_RANGE[1]) & (cb >= CB_RANGE[0]) & (cb <= CB_RANGE[1])
    return skin.astype(jnp.float32)


def patch_scores(mask: jax.Array, patch: int) -> jax.Array:
    """(B,H,W) pixel mask → (B, (H/p)·(W/p)) per-patch means, row-major like the ViT tokens."""
    b, h, w = mask.shape
    m = mask[:, : h // patch * patch, : w // patch * patch]
    m = m.reshape(b, h // patch, patch, w // patch, patch)
    return m.mean(axis=(2, 4)).reshape(b, -1)


@dataclasses.dataclass(frozen=True)
class FaceEmbedder:
    backbone: nn.Module
    relight: nn.Module | None = None
    segmenter: nn.Module | None = None
    mask_source: str = "none"
    relight_train: bool = False
    relight_eval: bool = True

    def __post_init__(self):
        if self.mask_source not in MASK_SOURCES:
            raise ValueError(f"mask_source {self.mask_source!r}; valid: {', '.join(MASK_SOURCES)}")
        if self.mask_source == "segmenter" and self.segmenter is None:
            raise ValueError("mask_source='segmenter' needs a segmenter model")

    @property
    def is_vit(self) -> bool:
        return hasattr(self.backbone, "patch_size")

    def init(self, rng, x) -> tuple[dict, dict]:
        """(params, batch_stats), each {"backbone", ["relight"], ["segmenter"]}."""
        keys = jax.random.split(rng, 3)
        params, stats = {}, {}
        parts = {"relight": self.relight, "segmenter": self.segmenter}
        for (name, mod), k in zip(parts.items(), keys[1:]):
            if mod is not None:
                v = mod.init({"params": k, "dropout": k}, x, train=False)
                params[name], stats[name] = v["params"], v.get("batch_stats", {})
        kw = self._mask_kwargs(jnp.ones(x.shape[:3], jnp.float32))
        v = self.backbone.init({"params": keys[0], "dropout": keys[0]}, x, train=False, **kw)
        params["backbone"], stats["backbone"] = v["params"], v.get("batch_stats", {})
        return params, stats

    def _mask_kwargs(self, mask):
        if self.mask_source == "none":
            return {}
        if self.is_vit:
            return {"token_scale": patch_scores(mask, self.backbone.patch_size)}
        return {"feature_mask": mask}

    def preprocess(self, params, batch_stats, x, *, train: bool):
        """Relit input and skin mask (or None) for model-space images x."""
        if self.relight is not None and (self.relight_train if train else self.relight_eval):
            x, _ = self.relight.apply({"params": params["relight"],
                                       "batch_stats": batch_stats.get("relight", {})},
                                      x, train=False)
        mask = None
        if self.mask_source == "segmenter":
            mask, _ = self.segmenter.apply({"params": params["segmenter"],
                                            "batch_stats": batch_stats.get("segmenter", {})},
                                           x, train=False)
        elif self.mask_source == "ycbcr":
            mask = ycbcr_mask(x)
        return x, mask

    def apply(self, params, batch_stats, x, *, train: bool, rngs=None) -> tuple[Any, dict, dict]:
        """(embedding (B,D), aux {"norm", ["mask"]}, new batch_stats)."""
        x, mask = self.preprocess(params, batch_stats, x, train=train)
        kw = {} if mask is None else self._mask_kwargs(mask)
        variables = {"params": params["backbone"], "batch_stats": batch_stats["backbone"]}
        if train:
            (emb, aux), upd = self.backbone.apply(variables, x, train=True, rngs=rngs,
                                                  mutable=["batch_stats"], **kw)
            batch_stats = {**batch_stats, "backbone": upd.get("batch_stats", {})}
        else:
            emb, aux = self.backbone.apply(variables, x, train=False, **kw)
        aux = dict(aux)
        if mask is not None:
            aux["mask"] = mask
        return emb, aux, batch_stats
