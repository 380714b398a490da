"""Skin-segmentation quality per lighting condition: IoU, Dice and a comparison table.

Paper B §4.5.4 (Table 9) compares no segmentation, YCbCr thresholding
(`lowlight.data.skin_color.ycbcr_skin_mask`), a 3-conv CNN (`lowlight.models.unet.seg_cnn3`) and
the U-Net (§3.3) only through Rank-1 identification downstream. With the synthetic world's
ground-truth skin masks we can also score the masks themselves, per lighting condition
(`lowlight.data.conditions`), which is what this module does.

Conventions:
  * predictions and targets are binarised with `>= threshold` (0.5); a constant 0.5 mask is thus
    "all skin", the stronger of the two trivial baselines. Soft targets are binarised the same way.
  * per-image scores, then the plain mean over images (macro average) — so every face counts the
    same whatever its skin area. An image whose prediction and target are both empty scores 1
    (nothing to find, nothing found).
  * IoU = |P & T| / |P | T|; Dice = 2 |P & T| / (|P| + |T|).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from lowlight.data import conditions as cond

Segmenter = Callable[[np.ndarray], np.ndarray]  # uint8 (B,H,W,3) -> float (B,H,W) in [0,1]


def _binary_pair(pred, target, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred, np.float32)
    t = np.asarray(target, np.float32)
    if p.ndim == 4 and p.shape[-1] == 1:
        p = p[..., 0]
    if t.ndim == 4 and t.shape[-1] == 1:
        t = t[..., 0]
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} != target shape {t.shape}")
    if p.ndim == 2:
        p, t = p[None], t[None]
    if p.ndim != 3:
        raise ValueError(f"expected (H, W) or (B, H, W) masks, got shape {p.shape}")
    return p >= threshold, t >= threshold


def _scores(pred, target, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    p, t = _binary_pair(pred, target, threshold)
    inter = np.sum(p & t, axis=(1, 2)).astype(np.float64)
    union = np.sum(p | t, axis=(1, 2)).astype(np.float64)
    sizes = np.sum(p, axis=(1, 2)) + np.sum(t, axis=(1, 2)).astype(np.float64)
    empty = union == 0
    iou = np.where(empty, 1.0, inter / np.maximum(union, 1))
    dice = np.where(empty, 1.0, 2 * inter / np.maximum(sizes, 1))
    return iou, dice


def iou(pred, target, threshold: float = 0.5, *, per_image: bool = False):
    """Intersection over union of `pred >= threshold` and `target >= threshold`.

    Args:
      pred, target: (H, W) or (B, H, W) masks (a trailing channel of 1 is accepted).
      threshold: binarisation threshold for both.
      per_image: return the (B,) per-image scores instead of their mean.
    """
    scores = _scores(pred, target, threshold)[0]
    return scores if per_image else float(scores.mean())


def dice(pred, target, threshold: float = 0.5, *, per_image: bool = False):
    """Dice coefficient (F1) of the binarised masks; arguments as in `iou`."""
    scores = _scores(pred, target, threshold)[1]
    return scores if per_image else float(scores.mean())


def _condition_order(names) -> list[str]:
    known = [c for c in cond.CONDITIONS if c in names]
    return known + sorted(set(names) - set(known))


def evaluate_segmenters(
    images: np.ndarray,
    masks: np.ndarray,
    conditions: Sequence[str],
    segmenters: Mapping[str, Segmenter],
    *,
    threshold: float = 0.5,
    batch_size: int = 64,
) -> dict[str, dict[str, dict[str, float]]]:
    """Scores each segmenter per lighting condition and overall.

    Args:
      images: uint8 RGB (N, H, W, 3).
      masks: ground-truth skin masks (N, H, W) in [0, 1].
      conditions: N condition names (e.g. `SynthFaces` "condition").
      segmenters: name -> callable mapping a uint8 batch (b, H, W, 3) to masks (b, H, W) in
        [0, 1] (e.g. `ycbcr_skin_mask`, or a jitted model applied to `to_model_input(batch)`).
      threshold: binarisation threshold (`>=`).
      batch_size: images per segmenter call.

    Returns:
      {name: {condition: {"iou", "dice", "n"}, ..., "all": {"iou", "dice", "n"}}}, conditions in
      `lowlight.data.conditions.CONDITIONS` order; scores are per-image means.
    """
    images = np.asarray(images)
    masks = np.asarray(masks)
    conditions = np.asarray([str(c) for c in conditions])
    n = len(images)
    if len(masks) != n or len(conditions) != n:
        raise ValueError(f"images ({n}), masks ({len(masks)}) and conditions "
                         f"({len(conditions)}) must have the same length")
    order = _condition_order(set(conditions.tolist()))
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name, segment in segmenters.items():
        preds = [np.asarray(segment(images[s:s + batch_size]), np.float32)
                 for s in range(0, n, batch_size)]
        pred = np.concatenate(preds, axis=0) if preds else np.zeros(masks.shape, np.float32)
        ious, dices = _scores(pred, masks, threshold)
        row: dict[str, dict[str, float]] = {}
        for c in order:
            sel = conditions == c
            row[c] = {"iou": float(ious[sel].mean()), "dice": float(dices[sel].mean()),
                      "n": int(sel.sum())}
        row["all"] = {"iou": float(ious.mean()) if n else float("nan"),
                      "dice": float(dices.mean()) if n else float("nan"), "n": n}
        table[name] = row
    return table


def to_markdown(table: Mapping[str, Mapping[str, Mapping[str, float]]],
                metrics: Sequence[str] = ("iou", "dice"), digits: int = 3) -> str:
    """Markdown table: one row per segmenter, one column per condition (+ "all").

    Each cell is "iou / dice" (the `metrics` in order), e.g. `0.812 / 0.874`.
    """
    if not table:
        return ""
    columns: list[str] = []
    for row in table.values():
        for c in row:
            if c not in columns:
                columns.append(c)
    columns = _condition_order([c for c in columns if c != "all"]) + (
        ["all"] if "all" in columns else [])
    names = {"iou": "IoU", "dice": "Dice"}
    label = " / ".join(names.get(m, m) for m in metrics)
    lines = [f"| segmenter ({label}) | " + " | ".join(columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name, row in table.items():
        cells = []
        for c in columns:
            cell = row.get(c)
            cells.append("-" if cell is None else
                         " / ".join(f"{cell[m]:.{digits}f}" for m in metrics))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
