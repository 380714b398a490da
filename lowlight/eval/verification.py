"""Pair verification metrics: the insightface 10-fold protocol and ROC metrics on cosine scores.

Paper B §3.7 scores pairs by the cosine similarity of L2-normalised embeddings and reports ROC,
EER and TPR@FPR; §4.3 defines TPR/FPR (Eqs. 10–11), AUC (Eq. 12), EER (FAR = FRR, Eqs. 13–14),
the verification rate at FPR = 1e-3, 1e-4, 1e-5 and accuracy (Eq. 15). LFW / CFP-FP / AgeDB-30
accuracies in the literature (and paper B's tables) follow insightface's ``verification.py``,
reproduced here exactly:

- embeddings are L2-normalised in float64 (as ``sklearn.preprocessing.normalize``: a zero vector
  stays zero); the distance is the squared L2 distance of the unit embeddings (= 2 − 2·cos);
- thresholds ``np.arange(0, 4, 0.01)``; ``KFold(n_splits, shuffle=False)`` contiguous folds; for
  each fold the first threshold maximising accuracy on the other folds is applied to the fold,
  predicting "same" when ``dist < threshold`` (strict); "acc" and "acc_std" are the mean and
  ``np.std`` (ddof=0) of the fold accuracies;
- VAL@FAR=1e-3 (``calculate_val``): thresholds ``np.arange(0, 4, 0.001)``; on the training folds
  the threshold at the target FAR is interpolated from (FAR, threshold) with
  ``interp1d(kind='slinear')`` (0 if the training FAR never reaches the target), then VAL and FAR
  are measured on the test fold and averaged. scipy >= 1.15 rejects the duplicate FAR values
  this always has; we rebuild what ``interp1d`` did before (stable sort, degree-1 B-spline with
  knots [x0, x, x_last]), i.e. linear interpolation from the last threshold whose FAR <= target
  to the next one. A fold without positive (negative) test pairs gets VAL (FAR) 0, as
  ``calculate_accuracy`` does for TPR/FPR, where insightface would divide by zero.

ROC metrics use the cosine score over all pairs (no folds): a pair is accepted when
score >= threshold. ``tpr@fpr=x`` is the largest TPR among ROC points with FPR <= x. With
``num_neg`` negative pairs the smallest non-zero FPR is 1/num_neg; for x below it only FPR = 0
qualifies, so the value is still defined (the TPR at FPR 0) but the operating point is not
actually measurable: ``"tpr@fpr=x/reachable"`` says which (always present, True or False).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.interpolate import BSpline
from sklearn.model_selection import KFold

__all__ = [
    "FPR_TARGETS",
    "eer",
    "evaluate",
    "flip_tta",
    "pair_embeddings",
    "roc",
    "tpr_at_fpr",
]

FPR_TARGETS: tuple[tuple[str, float], ...] = (("1e-3", 1e-3), ("1e-4", 1e-4), ("1e-5", 1e-5))
_FAR_TARGET = 1e-3


# --------------------------------------------------------------------------------------------
# embeddings
# --------------------------------------------------------------------------------------------


def flip_tta(embed_fn: Callable[[Any], Any], images: Any) -> Any:
    """insightface flip test: embed(images) + embed(horizontally mirrored images).

    The two raw (un-normalised) embeddings are summed; normalise afterwards (``evaluate`` does),
    as insightface's ``test`` does with ``sklearn.preprocessing.normalize``.

    Args:
      embed_fn: maps a batch of images to (B, D) embeddings.
      images: (B, H, W, C) numpy or jax array; axis 2 (width) is mirrored.
    """
    return embed_fn(images) + embed_fn(images[:, :, ::-1])


def pair_embeddings(embs: Any, idx1: Any = None, idx2: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """The two sides of each pair: ``(embs[idx1], embs[idx2])``.

    Without indices, the insightface ``.bin`` layout is assumed: image 2i and 2i+1 form pair i
    (``read_verification_bin`` returns images in that order).
    """
    embs = np.asarray(embs)
    if idx1 is None and idx2 is None:
        return embs[0::2], embs[1::2]
    if idx1 is None or idx2 is None:
        raise ValueError("pass both idx1 and idx2, or neither")
    return embs[np.asarray(idx1)], embs[np.asarray(idx2)]


def _l2_normalize(x: Any) -> np.ndarray:
    # sklearn.preprocessing.normalize: row norms via einsum, zero norms left as 1.
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {x.shape}")
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    norms[norms == 0.0] = 1.0
    return x / norms[:, None]


# --------------------------------------------------------------------------------------------
# ROC on scores (higher = more likely the same identity)
# --------------------------------------------------------------------------------------------


def roc(scores: Any, issame: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full ROC curve, one point per distinct score (sklearn ``roc_curve`` with
    ``drop_intermediate=False``).

    Args:
      scores: (N,) similarity scores; a pair is accepted when score >= threshold.
      issame: (N,) bool.

    Returns:
      (fpr, tpr, thresholds), each (K+1,), starting at (0, 0) with threshold +inf and ending at
      (1, 1); fpr and tpr are non-decreasing.

    Raises:
      ValueError: on non-finite scores or if either class has no pairs.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    issame = np.asarray(issame, dtype=bool).ravel()
    if scores.shape != issame.shape:
        raise ValueError(f"scores {scores.shape} and issame {issame.shape} differ in length")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    num_pos = int(issame.sum())
    num_neg = issame.size - num_pos
    if num_pos == 0 or num_neg == 0:
        raise ValueError(f"need positive and negative pairs, got {num_pos} and {num_neg}")
    order = np.argsort(-scores, kind="mergesort")
    scores, issame = scores[order], issame[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tps = np.cumsum(issame)[last_of_run]
    fps = last_of_run + 1 - tps
    fpr = np.r_[0, fps] / num_neg
    tpr = np.r_[0, tps] / num_pos
    thresholds = np.r_[np.inf, scores[last_of_run]]
    return fpr, tpr, thresholds


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, x: float) -> float:
    """Largest TPR among ROC points with FPR <= x (0.0 if there is none)."""
    fpr, tpr = np.asarray(fpr), np.asarray(tpr)
    ok = fpr <= x
    return float(np.max(tpr[ok])) if np.any(ok) else 0.0


def eer(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Equal error rate: where the piecewise-linear ROC crosses FPR = FNR (= 1 − TPR).

    Exact intersection of the polyline through the ROC points with the line tpr = 1 − fpr
    (the facenet/insightface ``brentq`` on ``interp1d(fpr, tpr)`` computes the same point but
    is ill-defined on vertical ROC segments). Expects points ordered as ``roc`` returns them.
    """
    fpr, tpr = np.asarray(fpr, np.float64), np.asarray(tpr, np.float64)
    d = 1.0 - tpr - fpr  # non-increasing from 1 at (0, 0) to -1 at (1, 1)
    i = int(np.argmax(d <= 0)) if np.any(d <= 0) else d.size - 1
    if d[i] == 0 or i == 0:
        return float(fpr[i])
    w = d[i - 1] / (d[i - 1] - d[i])
    return float(fpr[i - 1] + w * (fpr[i] - fpr[i - 1]))


# --------------------------------------------------------------------------------------------
# insightface k-fold protocol on squared L2 distances
# --------------------------------------------------------------------------------------------


def _folds(n: int, n_folds: int):
    """insightface LFold: KFold(shuffle=False), or train = test = everything for one fold."""
    indices = np.arange(n)
    if n_folds > 1:
        return list(KFold(n_splits=n_folds, shuffle=False).split(indices))
    return [(indices, indices)]


def _accepted_counts(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray):
    """For each threshold: (#positives, #negatives) with dist < threshold, by sorted search
    (``side='left'`` counts values strictly below, matching insightface's ``np.less``)."""
    tp = np.searchsorted(np.sort(dist[issame]), thresholds, side="left")
    fp = np.searchsorted(np.sort(dist[~issame]), thresholds, side="left")
    return tp, fp


def _accuracy(dist, issame, thresholds):
    tp, fp = _accepted_counts(dist, issame, thresholds)
    tn = int(np.sum(~issame)) - fp
    return (tp + tn) / dist.size


def _legacy_slinear(x: np.ndarray, y: np.ndarray, x_new: float) -> float:
    """``scipy.interpolate.interp1d(x, y, kind='slinear')(x_new)`` as scipy < 1.15 computed it,
    duplicate x included: stable sort, then make_interp_spline's k=1 shortcut
    (knots [x0, x, x_last], coefficients y). Kept as the spline evaluates it, including its one
    odd case: at x_new equal to a repeated maximum of x (a zero-length last interval) it is 0."""
    order = np.argsort(x, kind="mergesort")
    x, y = x[order], y[order]
    spline = BSpline(np.r_[x[0], x, x[-1]], y, 1, extrapolate=False)
    return float(spline(x_new))


def _kfold_accuracy(dist, issame, n_folds):
    thresholds = np.arange(0, 4, 0.01)
    acc = np.zeros(n_folds)
    for k, (train, test) in enumerate(_folds(dist.size, n_folds)):
        best = int(np.argmax(_accuracy(dist[train], issame[train], thresholds)))
        acc[k] = _accuracy(dist[test], issame[test], thresholds[best : best + 1])[0]
    return acc


def _kfold_val(dist, issame, n_folds, far_target=_FAR_TARGET):
    thresholds = np.arange(0, 4, 0.001)
    val, far = np.zeros(n_folds), np.zeros(n_folds)
    for k, (train, test) in enumerate(_folds(dist.size, n_folds)):
        n_diff = int(np.sum(~issame[train]))
        _, fa = _accepted_counts(dist[train], issame[train], thresholds)
        far_train = fa / n_diff if n_diff else np.zeros(thresholds.size)
        if np.max(far_train) >= far_target:
            threshold = _legacy_slinear(far_train, thresholds, far_target)
        else:
            threshold = 0.0
        ta, fa = _accepted_counts(dist[test], issame[test], np.array([threshold]))
        n_same, n_diff = int(np.sum(issame[test])), int(np.sum(~issame[test]))
        val[k] = ta[0] / n_same if n_same else 0.0
        far[k] = fa[0] / n_diff if n_diff else 0.0
    return val, far


# --------------------------------------------------------------------------------------------
# everything at once
# --------------------------------------------------------------------------------------------


def evaluate(emb1: Any, emb2: Any, issame: Any, *, n_folds: int = 10) -> dict[str, Any]:
    """Verification metrics for N pairs (the public contract in API.md).

    Args:
      emb1, emb2: (N, D) embeddings of the two sides of each pair (normalised here).
      issame: (N,) bool, True for same-identity pairs.
      n_folds: folds of the insightface protocol (1: train = test = all pairs).

    Returns:
      dict of Python scalars:
        "acc", "acc_std"       insightface k-fold accuracy, mean and std (ddof=0) over folds
        "val@far=1e-3", "val_std", "far"
                               insightface VAL at FAR 1e-3: mean, std over folds, mean test FAR
        "auc", "eer"           on cosine scores over all pairs
        "tpr@fpr=1e-3", "tpr@fpr=1e-4", "tpr@fpr=1e-5"
                               largest TPR with FPR <= x, each with "<key>/reachable"
                               (False when x < 1/num_neg, see the module docstring)
        "best_threshold"       cosine threshold (accept if score >= it) with the highest
                               accuracy on all pairs, the largest one among ties (+inf if
                               rejecting every pair is best); "best_threshold_acc" that
                               accuracy (optimistic: chosen on the same pairs)
        "num_pos", "num_neg"   pair counts
    """
    e1, e2 = _l2_normalize(emb1), _l2_normalize(emb2)
    issame = np.asarray(issame, dtype=bool).ravel()
    if e1.shape != e2.shape or e1.shape[0] != issame.size:
        raise ValueError(f"shapes differ: emb1 {e1.shape}, emb2 {e2.shape}, issame {issame.shape}")
    if not (np.all(np.isfinite(e1)) and np.all(np.isfinite(e2))):
        raise ValueError("embeddings must be finite")

    dist = np.sum(np.square(e1 - e2), axis=1)
    acc = _kfold_accuracy(dist, issame, n_folds)
    val, far = _kfold_val(dist, issame, n_folds)

    scores = np.sum(e1 * e2, axis=1)
    fpr, tpr, thresholds = roc(scores, issame)
    num_pos, num_neg = int(issame.sum()), int((~issame).sum())
    # accuracy at each ROC threshold: TP + TN = tpr·P + (1 − fpr)·N, first maximum
    correct = np.round(tpr * num_pos + (1.0 - fpr) * num_neg)
    best = int(np.argmax(correct))

    out: dict[str, Any] = {
        "acc": float(np.mean(acc)),
        "acc_std": float(np.std(acc)),
        "val@far=1e-3": float(np.mean(val)),
        "val_std": float(np.std(val)),
        "far": float(np.mean(far)),
        "auc": float(np.trapezoid(tpr, fpr)),
        "eer": eer(fpr, tpr),
    }
    for name, x in FPR_TARGETS:
        out[f"tpr@fpr={name}"] = tpr_at_fpr(fpr, tpr, x)
        out[f"tpr@fpr={name}/reachable"] = bool(1.0 / num_neg <= x)
    out.update(
        best_threshold=float(thresholds[best]),
        best_threshold_acc=float(correct[best] / issame.size),
        num_pos=num_pos,
        num_neg=num_neg,
    )
    return out
