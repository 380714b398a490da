"""Model zoo: `create(name, **kwargs)` returns a flax.linen Module.

The registry maps a public name to "module:factory" and imports the module only when that name is
asked for, so creating a U-Net never imports the ViT code (and there is no import-everything
table to keep in sync). Each family lives in its own file; add a line here to publish a name.

Conventions every model follows:
  * input: float32 NHWC in [-1, 1] (`lowlight.data.normalize.to_model_input`);
  * `__call__(x, *, train: bool)`; BatchNorm statistics in the `batch_stats` collection;
    under `jax.jit` with a batch sharded over devices, BatchNorm already reduces over the global
    batch (the compiler inserts the cross-device reduction), so no `axis_name`/`pmean` is needed;
  * `dtype` (a jnp dtype or its name, e.g. "bfloat16") is the compute dtype; parameters stay
    float32, and heads / losses compute in float32 (mixed precision);
  * embedding models return `(embedding, aux)` where `aux["norm"]` is the unnormalised
    embedding norm (AdaFace / MagFace need it).
"""

from __future__ import annotations

import importlib
from typing import Any

_REGISTRY: dict[str, str] = {
    # Identity backbones (paper B §3.5; insightface arcface_torch structure).
    "iresnet18": "lowlight.models.iresnet:iresnet18",
    "iresnet34": "lowlight.models.iresnet:iresnet34",
    "iresnet50": "lowlight.models.iresnet:iresnet50",
    "iresnet100": "lowlight.models.iresnet:iresnet100",
    "iresnet200": "lowlight.models.iresnet:iresnet200",
    "vit_t": "lowlight.models.vit:vit_t",
    "vit_s": "lowlight.models.vit:vit_s",
    "vit_b": "lowlight.models.vit:vit_b",
    "vit_s_std": "lowlight.models.vit:vit_s_std",
    "vit_b_std": "lowlight.models.vit:vit_b_std",
    # Paper B illumination modules (§3.3–3.4) and the segmentation baseline (§4.5.4).
    "relight": "lowlight.models.relight:relight",
    "unet": "lowlight.models.unet:unet",
    "seg_cnn3": "lowlight.models.unet:seg_cnn3",
    # Paper A attribute models.
    "mobilenetv2": "lowlight.models.mobilenetv2:mobilenetv2",
    "lighting_cnn": "lowlight.models.lighting_cnn:lighting_cnn",
    "retinaface": "lowlight.models.retinaface:retinaface",  # detector, lowlight.align
}


def names() -> tuple[str, ...]:
    """All registered model names."""
    return tuple(sorted(_REGISTRY))


def register(name: str, target: str) -> None:
    """Publishes `name` -> "package.module:factory" (for users' own models)."""
    if ":" not in target:
        raise ValueError(f"register({name!r}): target must be 'module:factory', got {target!r}")
    _REGISTRY[name] = target


def create(name: str, **kwargs: Any):
    """Builds the model registered under `name` with `kwargs` (see each factory's docstring)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(names())}")
    if isinstance(kwargs.get("dtype"), str):  # configs say dtype="bfloat16"
        import jax.numpy as jnp

        try:
            kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
        except TypeError:
            raise ValueError(f"model {name!r}: unknown dtype {kwargs['dtype']!r}; valid: "
                             "float32, bfloat16, float16") from None
    module_name, factory = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), factory)(**kwargs)
