"""The one input convention every lowlight model uses.

Images travel through data pipelines as uint8 RGB (H, W, 3). Models see float32
`(x / 255 - 0.5) / 0.5`, i.e. values in [-1, 1] — the insightface arcface_torch convention, so
weights converted from it work unchanged. Masks and targets that are not images stay in [0, 1].
"""

from __future__ import annotations

import numpy as np

MEAN = 0.5
STD = 0.5


def to_model_input(images, xp=np):
    """uint8 (or float in [0, 255]) RGB -> float32 in [-1, 1]. `xp` is numpy or jax.numpy."""
    x = xp.asarray(images).astype(xp.float32)
    return (x / 255.0 - MEAN) / STD


def from_model_input(x, xp=np):
    """Inverse of `to_model_input`, returned as float32 in [0, 255] (not rounded)."""
    return (xp.asarray(x) * STD + MEAN) * 255.0
