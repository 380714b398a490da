"""Lighting-condition classifier: paper A's "CNN-based model" (Fig. 2).

Paper A's second method first classifies a face image as low-light or high-light with a small CNN
(99.33% accuracy, §"Proposed method") and routes it to the MobileNetV2 trained on that lighting;
its further-work section names a multi-class version. The paper gives no architecture beyond
"CNN-based", so we use the classic Keras image-classifier layout it most plausibly means:

  3 x [conv3x3 (32, 64, 128 channels, bias) - ReLU - maxpool 2x2]
  global average pool - FC 128 - ReLU - dropout 0.5 (train only) - FC num_classes (logits)

Global average pooling (rather than Keras' Flatten) keeps the model valid at any input size;
lighting is a global property of the image, so nothing is lost. `num_classes=2` labels
(0 normal, 1 low) as in paper A; `num_classes=4` labels `lowlight.data.conditions.GROUPS`
(normal, low, side, over) in that order, so `conditions.group_index(name)` gives the target.

`__call__(x, *, train)` -> (logits (B, num_classes) float32, aux {"features": (B, dense)}).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lowlight.data import conditions

#: Class names per supported `num_classes` (index = label).
CLASS_NAMES: dict[int, tuple[str, ...]] = {2: ("normal", "low"), 4: conditions.GROUPS}


class LightingCNN(nn.Module):
    """Small conv net classifying the lighting of an image (paper A, Fig. 2).

    Attributes:
      num_classes: 2 (normal / low, paper A) or 4 (`conditions.GROUPS`); other counts are
        accepted for user label sets.
      widths: output channels of the conv - ReLU - maxpool stages.
      dense: width of the hidden FC layer.
      dropout: dropout rate before the classifier (active only with `train=True`).
    """

    num_classes: int = 2
    widths: Sequence[int] = (32, 64, 128)
    dense: int = 128
    dropout: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool):
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        x = x.astype(self.dtype)
        for i, width in enumerate(self.widths):
            x = nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                        name=f"conv{i}")(x)
            x = nn.relu(x)
            # 'SAME' keeps odd sizes valid (ceil); a 1x1 map stays 1x1.
            x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        h = nn.relu(nn.Dense(self.dense, name="fc")(x))
        z = nn.Dropout(self.dropout, deterministic=not train)(h)
        logits = nn.Dense(self.num_classes, name="classifier")(z)
        return logits, {"features": h}


def lighting_cnn(num_classes: int = 2, **kwargs: Any) -> LightingCNN:
    """Paper A's lighting classifier. kwargs: widths=(32, 64, 128), dense=128, dropout=0.5,
    dtype=jnp.float32. Labels: `CLASS_NAMES[num_classes]` for 2 or 4 classes."""
    return LightingCNN(num_classes=num_classes, **kwargs)
