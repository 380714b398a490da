"""Colour-threshold skin detection: the non-learned baseline of paper B §4.5.4 (Table 9).

Chai & Ngan (1999), "Face segmentation using skin-color map in videophone applications": a pixel
is skin when its chrominance lies in the box Cr in [133, 173] and Cb in [77, 127] (bounds
inclusive) of 8-bit ITU-R BT.601 YCbCr. We compute YCbCr exactly as OpenCV's
`cv2.COLOR_RGB2YCrCb` does for uint8 input (Y = 0.299 R + 0.587 G + 0.114 B,
Cr = 0.713 (R - Y) + 128, Cb = 0.564 (B - Y) + 128, full 0-255 range, fixed-point rounded) —
note OpenCV's channel order is Y, Cr, Cb, not Y, Cb, Cr. Luminance is ignored, which is why the
rule degrades in low and over-exposed light (clipped or noise-dominated chroma) — the point of
comparing it per lighting condition.
"""

from __future__ import annotations

import cv2
import numpy as np

#: Chai & Ngan (1999) skin box, inclusive, on 8-bit BT.601 chroma.
CR_RANGE: tuple[int, int] = (133, 173)
CB_RANGE: tuple[int, int] = (77, 127)


def rgb_to_ycrcb(images: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., H, W, 3) -> uint8 (..., H, W, 3) in OpenCV's (Y, Cr, Cb) channel order."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB images, got dtype {images.dtype}")
    if images.ndim < 3 or images.shape[-1] != 3:
        raise ValueError(f"expected RGB images (..., H, W, 3), got shape {images.shape}")
    h, w = images.shape[-3:-1]
    # cv2 converts one 2-D image; stacking the batch along H is the same per-pixel map.
    flat = np.ascontiguousarray(images.reshape(-1, w, 3))
    return cv2.cvtColor(flat, cv2.COLOR_RGB2YCrCb).reshape(images.shape)


def ycbcr_skin_mask(images: np.ndarray, cr_range: tuple[int, int] = CR_RANGE,
                    cb_range: tuple[int, int] = CB_RANGE) -> np.ndarray:
    """Chai-Ngan skin mask of uint8 RGB image(s): (H,W,3) -> (H,W), (B,H,W,3) -> (B,H,W).

    Returns float32 in {0, 1}. Usable directly as a segmenter in
    `lowlight.eval.segmentation_metrics.evaluate_segmenters`.
    """
    ycrcb = rgb_to_ycrcb(images)
    cr, cb = ycrcb[..., 1], ycrcb[..., 2]
    skin = ((cr >= cr_range[0]) & (cr <= cr_range[1])
            & (cb >= cb_range[0]) & (cb <= cb_range[1]))
    return skin.astype(np.float32)
