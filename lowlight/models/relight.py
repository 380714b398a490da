"""Neural relighting network of paper B (§3.4): a lightweight residual CNN for inference-time
illumination correction.

What the paper fixes (§3.4): "a lightweight five-layer convolutional network with residual
connections. It predicts an illumination-adjusted RGB output using a combination of L1
reconstruction and structural similarity (SSIM) losses. The network contains approximately
1.2 M parameters and runs in real time." §4.1.5: it is pre-trained on its own (illumination
correction) and used only at inference, never while training the backbone. Table 14: 4.6 ms per
image and 28 MB on an RTX 3090. The loss lives in `lowlight.losses.reconstruction`, the
evaluation (PSNR / SSIM / illumination uniformity) in `lowlight.eval.relight_metrics`.

Gaps the paper leaves, and how we fill them (our choices):

* Layers: five 3x3 convolutions of `width` channels — an input conv (3 -> width, ReLU), three
  residual layers `h = h + relu(conv(h))`, an output conv (width -> 6). No normalisation layers:
  BatchNorm is known to hurt pixel-accurate restoration (it removes the range flexibility of the
  features; Lim et al. 2017, EDSR) and inference runs at batch size 1; so the model has no
  `batch_stats` and `train` changes nothing.
* Width 208 gives 1,185,814 parameters (27·w² + 85·w + 6), "approximately 1.2 M"; 208 rather
  than the exact solution (~209.2) so the channel count is a multiple of 16.
* Receptive field: five plain 3x3 layers see only 11x11 pixels, too little to tell which side of
  a 112x112 face is lit. The residual layers are dilated (2, 4, 8) so each output pixel sees
  33x33 pixels, at no parameter cost.
* Output: illumination acts multiplicatively on the image (image = albedo × shading, and the
  sensor's power-law gamma keeps a product a product), so the network predicts a per-pixel,
  per-channel *gain* and an additive *offset* on [0, 1] values:
  `out = clip(in · exp(g) + b, 0, 1)` with `g` softly bounded to ±log(max_gain). The output conv
  is zero-initialised, so the untrained network is exactly the identity and learning starts
  from "change nothing"; the offset handles what a gain cannot (crushed blacks, clipped
  highlights). The result is returned in model space [-1, 1].

Input/output follow the project convention (`lowlight.data.normalize`): NHWC float32 in [-1, 1].
The network is fully convolutional ('SAME' padding), so any image size works.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lowlight.data import normalize
from lowlight.models import fast_conv

#: Default width: 1,185,814 parameters, paper B §3.4's "approximately 1.2 M".
DEFAULT_WIDTH = 208
#: Dilations of the residual layers: receptive field 1 + 2·(1 + 2 + 4 + 8 + 1) = 33 pixels.
DEFAULT_DILATIONS = (2, 4, 8)


class RelightNet(nn.Module):
    """Five-layer residual CNN predicting a gain/offset relighting of the input (paper B §3.4).

    Attributes:
      width: channels of the hidden layers (208 -> ~1.19 M parameters).
      dilations: dilation of each residual 3x3 layer; its length is the number of residual layers
        (3 -> five convolutions in all, as in the paper).
      max_gain: bound of the per-pixel gain, exp(g) in [1/max_gain, max_gain].
      dtype: compute dtype of the convolutions (parameters stay float32; output float32).
      conv_impl: "auto" | "xla" | "fast" (`lowlight.models.fast_conv`: on XLA:CPU its
        dilated convolutions run as plain ones over interleaved sub-images).
    """

    width: int = DEFAULT_WIDTH
    dilations: Sequence[int] = DEFAULT_DILATIONS
    max_gain: float = 16.0
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> tuple[jax.Array, dict]:
        """Relights a batch.

        Args:
          x: (N, H, W, 3) float in [-1, 1] (`normalize.to_model_input`).
          train: unused (no dropout or normalisation); kept for the model-zoo signature.

        Returns:
          (relit, aux): relit (N, H, W, 3) float32 in [-1, 1]; aux {"gain": exp(g),
          "offset": b}, each (N, H, W, 3) float32, acting on [0, 1] values.
        """
        del train
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"RelightNet: expected (N, H, W, 3), got shape {x.shape}")
        x = x.astype(jnp.float32)
        conv = lambda feats, dil, name, **kw: fast_conv.conv_module(self.conv_impl)(  # noqa: E731
            feats, (3, 3), kernel_dilation=dil, padding="SAME", dtype=self.dtype, name=name, **kw)
        h = nn.relu(conv(self.width, 1, "conv_in")(x))
        for i, dil in enumerate(self.dilations):
            h = h + nn.relu(conv(self.width, int(dil), f"res{i}")(h))
        # Zero-initialised head: gain exp(0) = 1 and offset 0, i.e. the identity map at init.
        head = conv(6, 1, "conv_out", kernel_init=nn.initializers.zeros)(h).astype(jnp.float32)
        bound = math.log(self.max_gain)
        log_gain = bound * jnp.tanh(head[..., :3] / bound)
        gain, offset = jnp.exp(log_gain), head[..., 3:]
        x01 = (x + 1.0) * 0.5
        out01 = jnp.clip(x01 * gain + offset, 0.0, 1.0)
        return out01 * 2.0 - 1.0, {"gain": gain, "offset": offset}


def relight(*, width: int = DEFAULT_WIDTH, dilations: Sequence[int] = DEFAULT_DILATIONS,
            max_gain: float = 16.0, dtype: Any = jnp.float32,
            conv_impl: str = "auto") -> RelightNet:
    """Model-zoo factory for "relight" (paper B §3.4); see `RelightNet` for the arguments.

    `width=208` (default) is the paper-size model (1,185,814 parameters); e.g. `width=16` is a
    CPU-size variant with the same structure.
    """
    if width < 1:
        raise ValueError(f"width: expected a positive int, got {width}")
    if any(int(d) < 1 for d in dilations):
        raise ValueError(f"dilations: expected positive ints, got {tuple(dilations)}")
    if not max_gain > 1.0:
        raise ValueError(f"max_gain: expected a number > 1, got {max_gain}")
    return RelightNet(width=int(width), dilations=tuple(int(d) for d in dilations),
                      max_gain=float(max_gain), dtype=dtype, conv_impl=conv_impl)


def num_params(width: int, num_residual: int = len(DEFAULT_DILATIONS)) -> int:
    """Closed-form parameter count: conv_in 28w, each residual layer 9w²+w, conv_out 54w+6."""
    return 28 * width + num_residual * (9 * width * width + width) + 54 * width + 6


def uint8_relighter(model: nn.Module, variables: Any) -> Callable[[np.ndarray], np.ndarray]:
    """Wraps a trained model as `fn(uint8 (N, H, W, 3)) -> uint8 (N, H, W, 3)`.

    This is the form `lowlight.eval.relight_metrics.evaluate_relighting` takes. The forward pass
    is jitted once per input shape; conversion follows `lowlight.data.normalize`.
    """
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])

    def fn(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise TypeError(f"expected uint8 images, got {images.dtype}")
        squeeze = images.ndim == 3
        batch = images[None] if squeeze else images
        out = apply(variables, normalize.to_model_input(batch))
        out = np.rint(np.clip(normalize.from_model_input(np.asarray(out)), 0.0, 255.0))
        out = out.astype(np.uint8)
        return out[0] if squeeze else out

    return fn
