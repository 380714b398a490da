"""Every PNG the evaluation reports and `tools/reproduce.py` write (issue 7 §3).

Plots are drawn on bare `matplotlib.figure.Figure` objects (Agg canvas, no pyplot state), so
they are safe in threads and never open a window. Each function takes the output path first,
writes one PNG of a fixed size in pixels (`Figure(figsize=px / DPI)` saved at `DPI`, no "tight"
bounding box, so the size is exact and predictable for reports), and returns the numbers it drew
so tests can check the picture's content rather than only its existence:

  roc, det, cmc, tpr_by_condition   verification and identification curves (recognition)
  confusion                         confusion matrix (rows = true class, row-normalised colours,
                                    counts printed); returns the (K, K) counts
  reliability                       reliability diagram of a classifier's top-1 confidence with
                                    its expected calibration error (`calibration`)
  image_grid                        labelled sample mosaic (inputs / relit / masks / targets),
                                    pixels placed 1:1 (`figimage`), returns the mosaic
  bars_with_ci                      per-row means with 95% CI whiskers and the per-seed values
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["DPI", "bars_with_ci", "calibration", "cmc", "confusion", "confusion_counts", "det",
           "image_grid", "reliability", "roc", "tpr_by_condition"]

DPI = 100


def _figure(width_px: int, height_px: int):
    from matplotlib.figure import Figure

    return Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)


def _save(fig, path: str) -> None:
    fig.savefig(path, dpi=DPI)


# --------------------------------------------------------------------------------------------
# verification / identification curves
# --------------------------------------------------------------------------------------------


def roc(path: str, pairs: Mapping[str, tuple[Any, Any]], *, size=(550, 440)) -> None:
    """ROC curves (log FPR axis, floored at 1e-5) of {name: (scores, issame)}."""
    from lowlight.eval import verification

    fig = _figure(*size)
    ax = fig.subplots()
    for name, (scores, issame) in pairs.items():
        fpr, tpr, _ = verification.roc(scores, issame)
        ax.plot(np.maximum(fpr, 1e-5), tpr, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC (cosine scores)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def det(path: str, pairs: Mapping[str, tuple[Any, Any]], *, size=(550, 440)) -> None:
    """DET curves (FAR vs FRR on probit axes) of {name: (scores, issame)}."""
    from lowlight.eval import roc_stats

    fig = _figure(*size)
    ax = fig.subplots()
    for name, (scores, issame) in pairs.items():
        fpr, fnr, _ = roc_stats.det_curve(scores, issame)
        ax.plot(roc_stats.probit(fpr), roc_stats.probit(fnr), label=name)
    roc_stats.det_axes(ax)
    ax.set_title("DET (cosine scores)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def cmc(path: str, curves: Mapping[str, Any], *, size=(550, 440)) -> None:
    """CMC curves {name: (max_rank,) identification rate at rank 1..max_rank}."""
    fig = _figure(*size)
    ax = fig.subplots()
    for name, curve in curves.items():
        curve = np.asarray(curve)
        if curve.size:
            ax.plot(np.arange(1, curve.size + 1), curve, marker=".", label=name)
    ax.set_xlabel("rank")
    ax.set_ylabel("identification rate")
    ax.set_ylim(0, 1.02)
    ax.set_title("CMC (closed set, mated probes)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def tpr_by_condition(path: str, tables: Mapping[str, Mapping[str, dict]],
                     fpr_targets: Sequence[float]) -> None:
    """One panel per evaluator: TPR at each FPR target (bars) per condition, from the tables of
    ``lowlight.eval.report.condition_table``; a TPR that is not reachable (too few negatives) or
    undefined is drawn as an empty slot labelled n/r / n/a."""
    from lowlight.eval import roc_stats

    n = max(len(tables), 1)
    width_px = int(110 * max(5.0, max((len(t) for t in tables.values()), default=1)))
    fig = _figure(max(550, width_px), 308 * n)
    axes = np.atleast_1d(fig.subplots(n, 1, squeeze=False)[:, 0])
    width = 0.8 / len(fpr_targets)
    for ax, (name, table) in zip(axes, tables.items()):
        conds = list(table)
        x = np.arange(len(conds))
        for j, fx in enumerate(fpr_targets):
            k = roc_stats.fpr_key(fx)
            vals = np.array([table[c][f"tpr@fpr={k}"] for c in conds], np.float64)
            pos = x + (j - (len(fpr_targets) - 1) / 2) * width
            ax.bar(pos, np.nan_to_num(vals), width, label=f"FPR={k}")
            for p, v, c in zip(pos, vals, conds):
                if math.isnan(v):
                    txt = "n/a" if not (table[c]["pos"] and table[c]["neg"]) else "n/r"
                    ax.text(p, 0.02, txt, ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_xticks(x, conds, rotation=20)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("TPR")
        ax.set_title(f"{name}: TPR@FPR per lighting condition")
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


# --------------------------------------------------------------------------------------------
# classifiers: confusion matrix, calibration
# --------------------------------------------------------------------------------------------


def confusion_counts(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts, rows = true class, columns = predicted class (sklearn's layout)."""
    t = np.asarray(y_true, np.int64).ravel()
    p = np.asarray(y_pred, np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    bad = (t < 0) | (t >= num_classes) | (p < 0) | (p >= num_classes)
    if bad.any():
        raise ValueError(f"labels must lie in [0, {num_classes}); got e.g. "
                         f"true={int(t[bad][0])}, predicted={int(p[bad][0])}")
    out = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(out, (t, p), 1)
    return out


def confusion(path: str, y_true: Any, y_pred: Any, labels: Sequence[str], *,
              title: str = "confusion matrix") -> np.ndarray:
    """Confusion matrix PNG: colour = fraction of the true class (row-normalised, so rare
    classes stay readable), text = raw count. Returns the counts it drew."""
    counts = confusion_counts(y_true, y_pred, len(labels))
    rows = counts.sum(axis=1, keepdims=True)
    frac = np.divide(counts, rows, out=np.zeros(counts.shape, np.float64), where=rows > 0)
    k = len(labels)
    side = int(max(360, 80 + 70 * k))
    fig = _figure(side + 90, side)
    ax = fig.subplots()
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if frac[i, j] > 0.6 else "black")
    ax.set_xticks(range(k), labels, rotation=30, ha="right")
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title} (n={int(counts.sum())})", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    fig.tight_layout()
    _save(fig, path)
    return counts


def calibration(confidence: Any, correct: Any, n_bins: int = 10) -> dict[str, Any]:
    """Equal-width binning of top-1 confidence (Guo et al. 2017, "On Calibration of Modern
    Neural Networks"): bin m holds confidences in ((m−1)/M, m/M] (the first bin also 0).

    Returns {"ece": Σ_m (n_m/N)·|acc_m − conf_m|, "mce": max_m |acc_m − conf_m| over non-empty
    bins, "edges": (M+1,), "count": (M,), "accuracy": (M,), "confidence": (M,) — NaN in empty
    bins, "n": N}.
    """
    conf = np.asarray(confidence, np.float64).ravel()
    ok = np.asarray(correct, np.float64).ravel()
    if conf.shape != ok.shape or conf.size == 0:
        raise ValueError(f"need equal-length non-empty confidence and correct arrays, got "
                         f"{conf.size} and {ok.size}")
    if np.any((conf < 0) | (conf > 1)) or not np.all(np.isfinite(conf)):
        raise ValueError("confidences must be probabilities in [0, 1]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(idx, weights=ok, minlength=n_bins) / count
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
    gap = np.abs(acc - mean_conf)
    filled = count > 0
    ece = float(np.sum(count[filled] / conf.size * gap[filled]))
    return {"ece": ece, "mce": float(gap[filled].max()), "edges": edges, "count": count,
            "accuracy": acc, "confidence": mean_conf, "n": int(conf.size)}


def reliability(path: str, confidence: Any, correct: Any, *, n_bins: int = 10,
                title: str = "reliability") -> dict[str, Any]:
    """Reliability diagram: accuracy per confidence bin against the diagonal (perfect
    calibration), the gap shaded, and a histogram of the confidences below. Returns
    ``calibration(confidence, correct, n_bins)``."""
    cal = calibration(confidence, correct, n_bins)
    edges, width = cal["edges"], 1.0 / n_bins
    centres = edges[:-1] + width / 2
    fig = _figure(480, 560)
    top, bottom = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    acc = np.nan_to_num(cal["accuracy"])
    top.bar(centres, acc, width, edgecolor="black", label="accuracy")
    filled = cal["count"] > 0
    conf = cal["confidence"]
    # the gap from accuracy to mean confidence, hatched so it reads the same above (over-
    # confident) and inside (under-confident) an accuracy bar
    low = np.minimum(acc, conf)[filled]
    top.bar(centres[filled], np.abs(conf - acc)[filled], width, bottom=low, facecolor="none",
            edgecolor="tab:red", hatch="//", label="gap to mean confidence")
    top.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"{title}: ECE {cal['ece']:.4f} (n={cal['n']}, {n_bins} bins)", fontsize=10)
    top.legend(fontsize=8, loc="upper left")
    bottom.bar(centres, cal["count"], width, color="gray", edgecolor="black")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("top-1 confidence")
    bottom.set_ylabel("count")
    fig.tight_layout()
    _save(fig, path)
    return cal


# --------------------------------------------------------------------------------------------
# image mosaics
# --------------------------------------------------------------------------------------------


def _to_rgb_uint8(x: np.ndarray, name: str) -> np.ndarray:
    """(N,H,W) masks / (N,H,W,1|3) images, uint8 or float in [0, 1] -> (N,H,W,3) uint8."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"image_grid column {name!r}: expected (N,H,W), (N,H,W,1) or "
                         f"(N,H,W,3), got shape {x.shape}")
    if x.dtype != np.uint8:
        x = np.rint(np.clip(np.asarray(x, np.float64), 0.0, 1.0) * 255).astype(np.uint8)
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def image_grid(path: str, columns: Mapping[str, Any], *, row_labels: Sequence[str] | None = None,
               scale: int = 2, pad: int = 2, title: str = "") -> np.ndarray:
    """A labelled mosaic: one row per sample, one column per entry of ``columns`` ({name:
    (N,H,W[,C]) uint8 images or float masks in [0, 1]}), every image upscaled ``scale``×
    (nearest) and separated by ``pad`` white pixels. Column names are written above, row labels
    (e.g. the lighting condition) at the left. The mosaic is placed pixel for pixel
    (``figimage``), so the PNG shows exactly the returned array in its lower-right region.

    Returns the (rows·(H·scale+pad)+pad, cols·(W·scale+pad)+pad, 3) uint8 mosaic.
    """
    cols = {k: _to_rgb_uint8(v, k) for k, v in columns.items()}
    if not cols:
        raise ValueError("image_grid needs at least one column")
    shapes = {k: v.shape for k, v in cols.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"image_grid columns differ in shape: {shapes}")
    n, h, w, _ = next(iter(cols.values())).shape
    if row_labels is not None and len(row_labels) != n:
        raise ValueError(f"{len(row_labels)} row labels for {n} rows")
    ch, cw = h * scale, w * scale
    mosaic = np.full((n * (ch + pad) + pad, len(cols) * (cw + pad) + pad, 3), 255, np.uint8)
    for j, imgs in enumerate(cols.values()):
        big = imgs.repeat(scale, axis=1).repeat(scale, axis=2)
        for i in range(n):
            y, x = pad + i * (ch + pad), pad + j * (cw + pad)
            mosaic[y:y + ch, x:x + cw] = big[i]
    left = 90 if row_labels is not None else 0
    head = 22 + (22 if title else 0)
    fig = _figure(mosaic.shape[1] + left, mosaic.shape[0] + head)
    fig.figimage(mosaic, xo=left, yo=0, origin="upper")
    fig_w, fig_h = mosaic.shape[1] + left, mosaic.shape[0] + head
    for j, name in enumerate(cols):
        x = left + pad + j * (cw + pad) + cw / 2
        fig.text(x / fig_w, (mosaic.shape[0] + 4) / fig_h, name, ha="center", va="bottom",
                 fontsize=8)
    if row_labels is not None:
        for i, label in enumerate(row_labels):
            y = mosaic.shape[0] - (pad + i * (ch + pad) + ch / 2)
            fig.text(4 / fig_w, y / fig_h, str(label), ha="left", va="center", fontsize=8)
    if title:
        fig.text(0.5, 1 - 4 / fig_h, title, ha="center", va="top", fontsize=9)
    _save(fig, path)
    return mosaic


# --------------------------------------------------------------------------------------------
# results over seeds
# --------------------------------------------------------------------------------------------


def bars_with_ci(path: str, panels: Mapping[str, Mapping[str, Mapping[str, Any]]], *,
                 title: str = "", panel_px: tuple[int, int] = (420, 320)) -> None:
    """One panel per metric: a bar per row at its mean over seeds, a whisker of ±half_width
    (the 95% CI) and the per-seed values as dots.

    Args:
      panels: {metric title: {row label: {"mean": float, "half_width": float (NaN: none),
        "values": [per-seed floats]}}}; a row whose mean is NaN leaves an empty slot.
      panel_px: size of one panel; panels are laid out 2 per line.
    """
    n = max(len(panels), 1)
    ncols = min(n, 2)
    nrows = math.ceil(n / ncols)
    fig = _figure(panel_px[0] * ncols, panel_px[1] * nrows + (30 if title else 0))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax, (metric, rows) in zip(axes, panels.items()):
        labels = list(rows)
        x = np.arange(len(labels))
        means = np.array([rows[r]["mean"] for r in labels], np.float64)
        half = np.array([rows[r].get("half_width", math.nan) for r in labels], np.float64)
        ax.bar(x, np.nan_to_num(means), 0.6, color="tab:blue", alpha=0.7)
        ok = np.isfinite(half) & np.isfinite(means)
        ax.errorbar(x[ok], means[ok], yerr=half[ok], fmt="none", ecolor="black", capsize=4)
        for xi, r in zip(x, labels):
            vals = np.asarray(rows[r].get("values", []), np.float64)
            vals = vals[np.isfinite(vals)]
            if vals.size:
                jitter = np.linspace(-0.12, 0.12, vals.size) if vals.size > 1 else np.zeros(1)
                ax.plot(xi + jitter, vals, "o", color="black", ms=3)
        ax.set_xticks(x, labels, rotation=25, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        dots = np.asarray([v for r in labels for v in rows[r].get("values", [])], np.float64)
        finite = np.concatenate([means[np.isfinite(means)], (means + half)[ok],
                                 (means - half)[ok], dots[np.isfinite(dots)]])
        if finite.size:
            lo, hi = min(0.0, float(finite.min())), float(finite.max())
            span = max(hi - lo, 0.05 * max(abs(lo), abs(hi)), 1e-3)
            if max(abs(lo), abs(hi)) < 1e-12:  # every value 0: a readable 0..1 axis
                lo, hi, span = 0.0, 1.0, 1.0
            ax.set_ylim(lo - 0.05 * span if lo < 0 else 0.0, hi + 0.15 * span)
    for ax in axes[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
