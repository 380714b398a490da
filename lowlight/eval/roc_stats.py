"""Uncertainty and operating points for pair verification, and aggregation over seeds.

Paper B §4.3 reports AUC "with 95% confidence intervals", EER, TPR (verification rate) at
FPR = 1e-3 / 1e-4 / 1e-5, TNR (specificity) and accuracy; §4.4 repeats every experiment over
n = 5 seeds and gives the interval of Eq. 18, ``mean ± 1.96·std/√n``. This file adds what those
numbers need beyond ``lowlight.eval.verification``:

- ``Roc``: the ROC of ``verification.roc`` (one point per distinct score, a pair accepted when
  ``score >= threshold``) plus the class counts, so that threshold metrics can be read off it;
- operating points: ``threshold_at_fpr`` (the threshold giving FPR <= x with the largest TPR),
  ``eer_threshold``, ``operating_point`` (TPR / FPR / TNR / FNR / accuracy at a threshold);
- ``fpr_metrics``: TPR@FPR down to 1e-6 with ``NOT_REACHABLE`` (NaN) when the pair set has too
  few negatives to measure that FPR at all;
- DET curve points (FPR vs FNR) and the probit (normal-deviate) axes DET plots use;
- bootstrap confidence intervals over pairs (stratified: positives and negatives resampled
  separately) for any of these metrics, and a generic bootstrap for any function of arrays;
- ``mean_ci`` (paper B Eq. 18) and ``mean_ci_t`` (Student-t) over per-seed values;
- ``per_condition``: a metric per lighting-condition tag (``lowlight.data.conditions``).

Definitions (N_pos positive = same-identity pairs, N_neg negative pairs, threshold t, a pair
accepted when its score >= t):
  TPR(t) = #accepted positives / N_pos        FNR(t) = FRR(t) = 1 − TPR(t)
  FPR(t) = FAR(t) = #accepted negatives / N_neg   TNR(t) = 1 − FPR(t)
  accuracy(t) = (#accepted positives + #rejected negatives) / (N_pos + N_neg)
  AUC = trapezoidal area under the ROC polyline (= Mann–Whitney U / (N_pos·N_neg) with ties
  counted 1/2, = ``sklearn.metrics.roc_auc_score``); EER as ``verification.eer``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from scipy import stats

from lowlight.data import conditions as cond_lib
from lowlight.eval import verification

__all__ = [
    "DEFAULT_FPR_TARGETS",
    "Interval",
    "NOT_REACHABLE",
    "Roc",
    "accuracy_at",
    "bootstrap",
    "bootstrap_ci",
    "det_axes",
    "det_curve",
    "eer_threshold",
    "fpr_key",
    "fpr_metrics",
    "mean_ci",
    "mean_ci_t",
    "operating_point",
    "per_condition",
    "probit",
    "resample_indices",
    "roc_auc",
    "roc_eer",
    "threshold_at_fpr",
    "tnr_at",
    "tpr_at",
]

#: Value of a TPR@FPR=x that cannot be measured: fewer than 1/x negative pairs, so no
#: threshold has a non-zero FPR <= x. NaN so that it can never be mistaken for a rate, is
#: written by ``MetricWriter`` (allow_nan) and skipped by TensorBoard; test with ``math.isnan``.
NOT_REACHABLE = float("nan")

DEFAULT_FPR_TARGETS: tuple[float, ...] = (1e-3, 1e-4, 1e-5, 1e-6)


def fpr_key(x: float) -> str:
    """Metric-name spelling of a rate: 1e-3 -> '1e-3', 5e-4 -> '5e-4', 0.01 -> '1e-2'."""
    mantissa, exponent = f"{x:.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


# --------------------------------------------------------------------------------------------
# ROC with counts
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Roc:
    """ROC points with the (possibly bootstrap-weighted) class counts behind them.

    Point i: accept pairs with score >= thresholds[i]; thresholds[0] = +inf (nothing accepted),
    then every distinct score in decreasing order. ``tps`` / ``fps`` are the accepted positive /
    negative counts (weights), ``num_pos`` / ``num_neg`` the totals.
    """

    thresholds: np.ndarray
    tps: np.ndarray
    fps: np.ndarray
    num_pos: float
    num_neg: float

    @property
    def tpr(self) -> np.ndarray:
        return self.tps / self.num_pos

    @property
    def fpr(self) -> np.ndarray:
        return self.fps / self.num_neg

    @classmethod
    def from_scores(cls, scores: Any, issame: Any) -> Roc:
        """The points of ``verification.roc`` (same order, same thresholds)."""
        return _SortedPairs(scores, issame).roc()

    def index_at(self, threshold: float) -> int:
        """Index of the point that accepts exactly the pairs with score >= threshold."""
        # thresholds decrease; the last one >= threshold.
        return int(np.searchsorted(-self.thresholds, -threshold, side="right")) - 1


class _SortedPairs:
    """Scores sorted once (descending, stable) so that every bootstrap replicate's ROC is two
    weighted cumulative sums: a replicate is a vector of multiplicities, no re-sort needed."""

    def __init__(self, scores: Any, issame: Any):
        scores = np.asarray(scores, np.float64).ravel()
        issame = np.asarray(issame, bool).ravel()
        # the checks of verification.roc
        if scores.shape != issame.shape:
            raise ValueError(f"scores {scores.shape} and issame {issame.shape} differ in length")
        if not np.all(np.isfinite(scores)):
            raise ValueError("scores must be finite")
        if issame.all() or not issame.any():
            raise ValueError("need positive and negative pairs")
        self.order = np.argsort(-scores, kind="mergesort")
        s = scores[self.order]
        self.pos = issame[self.order]
        self.last_of_run = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
        self.thresholds = np.r_[np.inf, s[self.last_of_run]]

    def roc(self, weights: np.ndarray | None = None) -> Roc:
        if weights is None:
            w = np.ones(self.pos.size)
        else:
            w = np.asarray(weights, np.float64)[self.order]
        wp = np.where(self.pos, w, 0.0)
        wn = w - wp
        tps = np.r_[0.0, np.cumsum(wp)[self.last_of_run]]
        fps = np.r_[0.0, np.cumsum(wn)[self.last_of_run]]
        return Roc(self.thresholds, tps, fps, float(tps[-1]), float(fps[-1]))


# --------------------------------------------------------------------------------------------
# metrics of a Roc (the callables bootstrap_ci accepts)
# --------------------------------------------------------------------------------------------


def roc_auc(r: Roc) -> float:
    """Trapezoidal area under the ROC polyline."""
    return float(np.trapezoid(r.tpr, r.fpr))


def roc_eer(r: Roc) -> float:
    """Equal error rate (``verification.eer``: the polyline's crossing of FPR = FNR)."""
    return verification.eer(r.fpr, r.tpr)


def _index_at_fpr(r: Roc, x: float) -> int:
    # fpr is non-decreasing, so the last point with FPR <= x has the largest TPR among them.
    return int(np.searchsorted(r.fpr, x, side="right")) - 1


def _reachable(num_neg: float, x: float) -> bool:
    # Same test as verification.evaluate's "/reachable": the smallest non-zero FPR is 1/N_neg.
    return bool(1.0 / num_neg <= x)


def tpr_at(x: float, *, mark_unreachable: bool = False) -> Callable[[Roc], float]:
    """Metric: the largest TPR among ROC points with FPR <= x (= ``verification.tpr_at_fpr``).

    With ``mark_unreachable`` it returns ``NOT_REACHABLE`` when x < 1/N_neg.
    """

    def metric(r: Roc) -> float:
        if mark_unreachable and not _reachable(r.num_neg, x):
            return NOT_REACHABLE
        return float(r.tpr[_index_at_fpr(r, x)])

    return metric


def tnr_at(x: float) -> Callable[[Roc], float]:
    """Metric: TNR = 1 − FPR at the ``tpr_at(x)`` operating point (the last ROC point with
    FPR <= x, i.e. the lowest threshold keeping FAR <= x). At least 1 − x by construction;
    it tells how much of the FAR budget the threshold actually spends."""

    def metric(r: Roc) -> float:
        return float(1.0 - r.fpr[_index_at_fpr(r, x)])

    return metric


def accuracy_at(threshold: float) -> Callable[[Roc], float]:
    """Metric: (accepted positives + rejected negatives) / all pairs, accepting score >= t."""

    def metric(r: Roc) -> float:
        i = r.index_at(threshold)
        return float((r.tps[i] + r.num_neg - r.fps[i]) / (r.num_pos + r.num_neg))

    return metric


_NAMED = re.compile(r"^(tpr|tnr)@fpr=(.+)$|^acc@thr=(.+)$")


def _metric_from_name(name: str) -> Callable[[Roc], float]:
    if name == "auc":
        return roc_auc
    if name == "eer":
        return roc_eer
    m = _NAMED.match(name)
    if m is None:
        raise ValueError(f"unknown metric {name!r}; use auc, eer, tpr@fpr=X, tnr@fpr=X, acc@thr=T")
    if m.group(3) is not None:
        return accuracy_at(float(m.group(3)))
    x = float(m.group(2))
    return tpr_at(x, mark_unreachable=True) if m.group(1) == "tpr" else tnr_at(x)


# --------------------------------------------------------------------------------------------
# operating points
# --------------------------------------------------------------------------------------------


def threshold_at_fpr(scores: Any, issame: Any, x: float) -> float:
    """The lowest ROC threshold whose FPR is <= x (accept score >= it).

    This is the threshold of the ``tpr@fpr=x`` point: among thresholds keeping FAR <= x it
    accepts the most positives. It is +inf (accept nothing) when no score keeps FPR <= x, i.e.
    when x < 1/N_neg and the highest score belongs to a negative pair.
    """
    r = Roc.from_scores(scores, issame)
    return float(r.thresholds[_index_at_fpr(r, x)])


def eer_threshold(scores: Any, issame: Any) -> float:
    """Threshold of the ROC point minimising max(FPR, FNR), the highest one among ties.

    FNR falls and FPR rises with the point index, so this is one of the two points that bracket
    the EER crossing (``verification.eer`` interpolates between them); the threshold is a real
    score, so rates measured at it are attainable.
    """
    r = Roc.from_scores(scores, issame)
    return float(r.thresholds[int(np.argmin(np.maximum(r.fpr, 1.0 - r.tpr)))])


def operating_point(scores: Any, issame: Any, threshold: float) -> dict[str, float]:
    """Rates at one threshold (accept score >= threshold).

    Returns:
      dict with "threshold", "tpr", "fnr" (= FRR), "fpr" (= FAR), "tnr", "acc", "num_pos",
      "num_neg". A rate whose class has no pairs is NaN.
    """
    scores = np.asarray(scores, np.float64).ravel()
    issame = np.asarray(issame, bool).ravel()
    if scores.shape != issame.shape:
        raise ValueError(f"scores {scores.shape} and issame {issame.shape} differ in length")
    accept = scores >= threshold
    num_pos, num_neg = int(issame.sum()), int((~issame).sum())
    tp, fp = int(np.sum(accept & issame)), int(np.sum(accept & ~issame))
    tpr = tp / num_pos if num_pos else math.nan
    fpr = fp / num_neg if num_neg else math.nan
    return {
        "threshold": float(threshold),
        "tpr": tpr,
        "fnr": 1.0 - tpr,
        "fpr": fpr,
        "tnr": 1.0 - fpr,
        "acc": (tp + num_neg - fp) / scores.size if scores.size else math.nan,
        "num_pos": num_pos,
        "num_neg": num_neg,
    }


def fpr_metrics(
    scores: Any, issame: Any, targets: Sequence[float] = DEFAULT_FPR_TARGETS
) -> dict[str, Any]:
    """TPR and TNR at fixed FPRs, refusing to report FPRs the pair set cannot measure.

    For each x: "tpr@fpr=x" = largest TPR among ROC points with FPR <= x if N_neg >= 1/x,
    else ``NOT_REACHABLE`` (unlike ``verification.evaluate``, which then reports the TPR at
    FPR = 0); "tpr@fpr=x/reachable" (bool); "tnr@fpr=x" = 1 − FPR at that point;
    "threshold@fpr=x" the threshold of that point. Keys spell x with ``fpr_key``.
    """
    r = Roc.from_scores(scores, issame)
    out: dict[str, Any] = {}
    for x in targets:
        k, i = fpr_key(x), _index_at_fpr(r, x)
        ok = _reachable(r.num_neg, x)
        out[f"tpr@fpr={k}"] = float(r.tpr[i]) if ok else NOT_REACHABLE
        out[f"tpr@fpr={k}/reachable"] = ok
        out[f"tnr@fpr={k}"] = float(1.0 - r.fpr[i])
        out[f"threshold@fpr={k}"] = float(r.thresholds[i])
    return out


# --------------------------------------------------------------------------------------------
# DET
# --------------------------------------------------------------------------------------------


def det_curve(scores: Any, issame: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DET points: (fpr, fnr, thresholds) with fnr = 1 − tpr, one per ROC point of
    ``verification.roc`` (starts at FPR 0, FNR 1, threshold +inf; FPR rises, FNR falls)."""
    fpr, tpr, thresholds = verification.roc(scores, issame)
    return fpr, 1.0 - tpr, thresholds


def probit(p: Any, eps: float = 1e-9) -> np.ndarray:
    """Normal deviate Φ⁻¹(p), the DET axis scale; p clipped to [eps, 1 − eps] so the DET
    end points (rates 0 and 1) stay on the plot."""
    return stats.norm.ppf(np.clip(np.asarray(p, np.float64), eps, 1.0 - eps))


def det_axes(ax: Any, ticks: Sequence[float] = (1e-4, 1e-3, 1e-2, 0.05, 0.2, 0.5, 0.8),
             *, xlabel: str = "FAR (%)", ylabel: str = "FRR (%)") -> Any:
    """Labels a matplotlib Axes whose data are ``probit(fpr)``, ``probit(fnr)``: ticks at
    ``probit(ticks)`` labelled in percent, limits at the outer ticks. Returns ``ax``.

    Example: ``ax.plot(probit(fpr), probit(fnr)); det_axes(ax)``.
    """
    pos = probit(ticks)
    labels = [f"{100 * t:g}" for t in ticks]
    ax.set_xticks(pos, labels)
    ax.set_yticks(pos, labels)
    ax.set_xlim(pos[0], pos[-1])
    ax.set_ylim(pos[0], pos[-1])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return ax


# --------------------------------------------------------------------------------------------
# bootstrap
# --------------------------------------------------------------------------------------------


class Interval(NamedTuple):
    """A point estimate with a confidence interval.

    value: the statistic on the original data; low, high: the interval; se: the standard
    deviation (ddof=1) of the bootstrap replicates (for mean_ci*: the standard error).
    """

    value: float
    low: float
    high: float
    se: float


def resample_indices(n: int, n_boot: int, seed: int, strata: Any = None) -> Iterator[np.ndarray]:
    """Bootstrap resamples of range(n): ``n_boot`` index arrays of length n drawn with
    replacement, within each stratum separately when ``strata`` (n,) labels are given (so
    every replicate keeps each stratum's size). Deterministic in ``seed``: replicate b is
    drawn from ``np.random.default_rng(seed)`` after replicates 0..b-1, strata in sorted
    label order, and the indices are returned stratum after stratum."""
    rng = np.random.default_rng(seed)
    if strata is None:
        groups = [np.arange(n)]
    else:
        strata = np.asarray(strata).ravel()
        if strata.size != n:
            raise ValueError(f"strata has {strata.size} labels for {n} items")
        groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    for _ in range(n_boot):
        yield np.concatenate([g[rng.integers(0, g.size, g.size)] for g in groups])


def _interval(value: float, reps: np.ndarray, confidence: float) -> Interval:
    reps = reps[np.isfinite(reps)]
    if reps.size == 0 or not math.isfinite(value):
        return Interval(value, math.nan, math.nan, math.nan)
    a = (1.0 - confidence) / 2.0
    low, high = np.quantile(reps, [a, 1.0 - a])
    se = float(np.std(reps, ddof=1)) if reps.size > 1 else math.nan
    return Interval(float(value), float(low), float(high), se)


def bootstrap_ci(
    scores: Any,
    issame: Any,
    metrics: Sequence[str] | Mapping[str, Callable[[Roc], float]] = ("auc", "eer"),
    *,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    stratify: bool = True,
    return_replicates: bool = False,
) -> dict[str, Any]:
    """Percentile bootstrap confidence intervals over pairs for ROC metrics.

    Pairs are resampled with replacement ``n_boot`` times (``resample_indices`` with
    ``strata=issame`` when ``stratify``: positives and negatives separately, so every replicate
    has the original N_pos and N_neg and the same FPR resolution). For each metric the interval
    is the [(1−c)/2, (1+c)/2] quantiles (numpy "linear") of the replicate values; ``value`` is
    the metric on the original pairs. Replicates with a non-finite value (e.g. a class missing
    when not stratified) are dropped. Each replicate costs two weighted cumulative sums over
    the pairs sorted once, not a sort.

    Args:
      scores, issame: (N,) similarity scores (accept >= threshold) and same-identity flags.
      metrics: names ("auc", "eer", "tpr@fpr=X", "tnr@fpr=X", "acc@thr=T" — accuracy when
        accepting score >= T) or a mapping name -> callable(Roc) -> float (e.g. ``tpr_at(x)``).
      return_replicates: also return "<name>/replicates" arrays (n_boot,).

    Returns:
      {name: Interval(value, low, high, se)} (+ replicate arrays if asked).
    """
    if not isinstance(metrics, Mapping):
        metrics = {name: _metric_from_name(name) for name in metrics}
    pairs = _SortedPairs(scores, issame)
    issame = np.asarray(issame, bool).ravel()
    reps = np.empty((len(metrics), n_boot))
    strata = issame if stratify else None
    for b, idx in enumerate(resample_indices(issame.size, n_boot, seed, strata)):
        w = np.bincount(idx, minlength=issame.size)
        r = pairs.roc(w)
        for j, fn in enumerate(metrics.values()):
            reps[j, b] = fn(r) if r.num_pos > 0 and r.num_neg > 0 else math.nan
    full = pairs.roc()
    out: dict[str, Any] = {}
    for j, (name, fn) in enumerate(metrics.items()):
        out[name] = _interval(fn(full), reps[j], confidence)
        if return_replicates:
            out[f"{name}/replicates"] = reps[j]
    return out


def bootstrap(
    fn: Callable[..., float],
    *arrays: Any,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    strata: Any = None,
) -> Interval:
    """Percentile bootstrap of any statistic ``fn(*arrays)`` whose arrays share axis 0 (the
    items, e.g. pairs): each replicate calls ``fn(*(a[idx] for a in arrays))`` with
    ``resample_indices(n, n_boot, seed, strata)``. Slower than ``bootstrap_ci`` for ROC
    metrics (which avoids re-sorting) but general."""
    arrays = tuple(np.asarray(a) for a in arrays)
    n = arrays[0].shape[0]
    if any(a.shape[0] != n for a in arrays):
        raise ValueError("arrays differ in length along axis 0")
    reps = np.array([fn(*(a[idx] for a in arrays))
                     for idx in resample_indices(n, n_boot, seed, strata)], np.float64)
    return _interval(float(fn(*arrays)), reps, confidence)


# --------------------------------------------------------------------------------------------
# over seeds
# --------------------------------------------------------------------------------------------


def _mean_se(values: Any, ddof: int) -> tuple[np.ndarray, float, float]:
    v = np.asarray(values, np.float64).ravel()
    if v.size <= ddof:
        raise ValueError(f"need more than {ddof} values, got {v.size}")
    return v, float(np.mean(v)), float(np.std(v, ddof=ddof) / math.sqrt(v.size))


def mean_ci(values: Any, *, z: float = 1.96, ddof: int = 1) -> tuple[float, float]:
    """Paper B Eq. 18: ``(mean, z·std/√n)``; the interval is mean ± half_width.

    ``std`` is the sample standard deviation with ddof=1 (Bessel): Eq. 18 is the normal
    approximation to the interval for the mean, whose standard error σ/√n needs an estimate of
    the population σ from n runs, and ddof=1 is its usual (variance-unbiased) estimate — the
    one the t-tests of §4.4, pandas ``std`` and R ``sd`` use (``np.std`` defaults to ddof=0).
    With n = 5, ddof=0 would shrink the interval by √(4/5) ≈ 0.89. Paper B does not state its
    ddof; its Table 7 "99.65 ± 0.08 (99.58–99.72)" is the reported std 0.08 with the Eq. 18
    half-width 1.96·0.08/√5 = 0.07.

    Note that with n = 5 the z = 1.96 interval covers less than 95% (t₀.₉₇₅,₄ = 2.78); use
    ``mean_ci_t`` for a calibrated interval.
    """
    _, mean, se = _mean_se(values, ddof)
    return mean, z * se


def mean_ci_t(values: Any, *, confidence: float = 0.95) -> tuple[float, float]:
    """Student-t interval for the mean over n runs: ``(mean, t_{(1+c)/2, n−1}·s/√n)`` with s
    the ddof=1 standard deviation (exact coverage for normally distributed run results)."""
    v, mean, se = _mean_se(values, 1)
    return mean, float(stats.t.ppf((1.0 + confidence) / 2.0, v.size - 1) * se)


# --------------------------------------------------------------------------------------------
# per lighting condition
# --------------------------------------------------------------------------------------------


def per_condition(
    metric_fn: Callable[..., Any],
    conditions: Any,
    *arrays: Any,
    coarse: bool = False,
    errors: str = "raise",
) -> dict[Hashable, Any]:
    """Applies ``metric_fn(*arrays_restricted)`` to the items of each condition tag.

    Args:
      metric_fn: e.g. ``lambda s, y: roc_stats.fpr_metrics(s, y)`` or ``verification.evaluate``.
      conditions: (N,) tag per item (for pairs: the pair's condition, e.g. the probe image's).
        Any hashable tags; names from ``lowlight.data.conditions`` come first in CONDITIONS
        (or GROUPS) order, other tags after them, sorted.
      *arrays: arrays sharing axis 0 of length N, sliced with the same mask.
      coarse: map fine condition names to their coarse group ('normal'/'low'/'side'/'over')
        first (``conditions.group``; every tag must then be a known condition).
      errors: "raise" to propagate a metric's ValueError (e.g. a condition without negative
        pairs), "nan" to record NaN for that condition instead.
    """
    if errors not in ("raise", "nan"):
        raise ValueError(f"errors={errors!r}; valid: raise, nan")
    tags = np.asarray(conditions).ravel()
    if coarse:
        tags = np.asarray([cond_lib.group(str(t)) for t in tags])
    arrays = tuple(np.asarray(a) for a in arrays)
    if any(a.shape[0] != tags.size for a in arrays):
        raise ValueError("every array needs one row per condition tag")
    known = cond_lib.GROUPS if coarse else cond_lib.CONDITIONS
    present = list(dict.fromkeys(tags.tolist()))
    order = [c for c in known if c in present]
    order += sorted((c for c in present if c not in known), key=str)
    out: dict[Hashable, Any] = {}
    for c in order:
        mask = tags == c
        try:
            out[c] = metric_fn(*(a[mask] for a in arrays))
        except ValueError:
            if errors == "raise":
                raise
            out[c] = math.nan
    return out
