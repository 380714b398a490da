"""Classic enhancement baselines (uint8 in, uint8 out): CLAHE, gamma correction, multi-scale
retinex — the non-learned comparisons for the relighting net (paper B §3.4; paper A's related work
names CLAHE and MSR). Re-exported by `lowlight.data.illumination`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence

import cv2
import numpy as np

from lowlight.data.illumination import _check_image, _check_range, _check_scalar

# ---------------------------------------------------------------------------------------------
# Classic enhancement baselines (uint8 in, uint8 out)
# ---------------------------------------------------------------------------------------------


def _per_image(fn: Callable[[np.ndarray], np.ndarray], image: np.ndarray) -> np.ndarray:
    return np.stack([fn(im) for im in image]) if image.ndim == 4 else fn(image)


def clahe(image: np.ndarray, clip_limit: float = 2.0,
          tile_grid: tuple[int, int] = (8, 8)) -> np.ndarray:
    """CLAHE on the lightness channel: RGB -> CIELAB (OpenCV 8-bit), CLAHE on L, -> RGB.

    Equalising L only leaves chroma (a, b) untouched, so colours do not shift.

    Args:
      image: uint8 RGB, (H, W, 3) or (N, H, W, 3).
      clip_limit: OpenCV clipLimit (> 0); 2.0 is OpenCV's customary value.
      tile_grid: (rows, cols) of contextual tiles, positive ints.
    """
    image = _check_image(image, uint8_only=True)
    cl = _check_scalar(clip_limit, "clip_limit", 0.0, lo_open=True)
    if len(tile_grid) != 2 or any(operator.index(t) < 1 for t in tile_grid):
        raise ValueError(f"tile_grid: expected two positive ints, got {tile_grid!r}")
    op = cv2.createCLAHE(clipLimit=cl, tileGridSize=tuple(int(t) for t in tile_grid))

    def one(im):
        lab = cv2.cvtColor(np.ascontiguousarray(im), cv2.COLOR_RGB2LAB)
        lab[..., 0] = op.apply(np.ascontiguousarray(lab[..., 0]))
        return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)

    return _per_image(one, image)


def gamma_correct(image: np.ndarray, gamma: float | None = None) -> np.ndarray:
    """Gamma correction out = in ** gamma, automatic per image when `gamma` is None.

    Auto: gamma = log(0.5) / log(mean) with mean the image's mean value in [0, 1] (over pixels
    and channels, clipped to [1/255, 254/255]), which maps the mean to 0.5: a dark image gets
    gamma < 1 (brightened). Same convention as `gamma`: g > 1 darkens.

    Args:
      image: uint8 RGB, (H, W, 3) or (N, H, W, 3).
      gamma: fixed exponent (> 0) or None for the automatic choice.
    """
    image = _check_image(image, uint8_only=True)
    fixed = None if gamma is None else _check_scalar(gamma, "gamma", 0.0, lo_open=True)
    levels = np.arange(256, dtype=np.float64) / 255.0

    def one(im):
        g = fixed
        if g is None:
            g = math.log(0.5) / math.log(float(np.clip(im.mean() / 255.0, 1 / 255, 254 / 255)))
        return np.rint(255.0 * levels**g).astype(np.uint8)[im]

    return _per_image(one, image)


def multi_scale_retinex(image: np.ndarray, sigmas: Sequence[float] = (15.0, 80.0, 250.0),
                        percentiles: tuple[float, float] = (1.0, 99.0)) -> np.ndarray:
    """Multi-scale retinex (MSR; Jobson, Rahman & Woodell 1997), per channel.

    R = mean_s [log(I) - log(G_s * I)] with I = pixel + 1 (so log is finite) and G_s a Gaussian
    blur of std s pixels (OpenCV, reflected borders). R is mapped back to uint8 by a linear
    stretch of its [p_lo, p_hi] percentiles (taken jointly over all channels of the image, so
    channel balance is kept) to [0, 255], clipping outside; an image with no spread in R (e.g.
    constant) is returned unchanged.

    Args:
      image: uint8 RGB, (H, W, 3) or (N, H, W, 3).
      sigmas: Gaussian scales in pixels (> 0); (15, 80, 250) are Jobson et al.'s.
      percentiles: (low, high) percentiles of the stretch, 0 <= low < high <= 100.
    """
    image = _check_image(image, uint8_only=True)
    if len(sigmas) == 0:
        raise ValueError("sigmas: expected at least one scale")
    sig = [_check_scalar(s, f"sigmas[{i}]", 0.0, lo_open=True) for i, s in enumerate(sigmas)]
    p_lo, p_hi = _check_range(percentiles, "percentiles", 0.0, 100.0)
    if p_lo >= p_hi:
        raise ValueError(f"percentiles: expected low < high, got {percentiles!r}")

    def one(im):
        i = im.astype(np.float32) + 1.0
        log_i = np.log(i)
        r = np.zeros_like(i)
        for s in sig:
            blur = cv2.GaussianBlur(i, (0, 0), sigmaX=s, sigmaY=s, borderType=cv2.BORDER_REFLECT)
            r += log_i - np.log(blur)
        lo, hi = np.percentile(r / len(sig), [p_lo, p_hi])
        if hi - lo < 1e-6:
            return im.copy()
        return np.rint(np.clip((r / len(sig) - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)

    return _per_image(one, image)


def no_enhancement(image: np.ndarray) -> np.ndarray:
    """Identity baseline: validates a uint8 image and returns a copy."""
    return _check_image(image, uint8_only=True).copy()


#: Enhancement baselines by name: uint8 (H, W, 3) / (N, H, W, 3) -> same, default parameters.
ENHANCERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": no_enhancement,
    "clahe": clahe,
    "gamma": gamma_correct,
    "msr": multi_scale_retinex,
}
