"""Demographic differentials of verification: TPR and FAR per group at global thresholds.

Thresholds are set once on the whole pair set (a deployed system has one threshold), then the
error rates of each demographic group (ethnicity, gender, or any group labels, e.g. the UTKFace
labels of ``lowlight.data.sources.UTKFace`` / ``SynthFaces``) are measured at that threshold,
as in NIST FRVT demographic effects (Part 3) and the paper B discussion of performance
"when lighting and population conditions change" (§4.3, TNR).

Definitions, for a threshold t (a pair is accepted when score >= t) and group g:
  TPR_g(t) = accepted positive pairs of g / positive pairs of g;   FRR_g = 1 − TPR_g
  FAR_g(t) = accepted negative pairs of g / negative pairs of g
  gap(rate) = max_g rate_g − min_g rate_g
  ratio(rate) = max_g rate_g / min_g rate_g  (1.0 when max = min, including both 0;
                inf when min = 0 < max)
Groups without positive pairs are left out of the TPR/FRR gap and ratio, groups without
negative pairs out of the FAR ones (their rates are NaN).

Operating points: "far=x" — the threshold of ``roc_stats.threshold_at_fpr`` on the calibration
pairs (the lowest threshold with global FAR <= x, i.e. the ``tpr@fpr=x`` point) — and "eer" —
``roc_stats.eer_threshold`` on the calibration pairs; or thresholds given by the caller.

Pair groups and cross-group pairs: ``groups`` is either (N,) — one group per pair, every pair
within its group — or (N, 2) — the group of each side. A pair whose sides carry different
labels is *cross-group*: it is used to calibrate the global thresholds when
``calibrate_on="all"`` (the default: the deployed threshold sees every pair), never counted in
any group's rates nor in the gaps and ratios (mixing them in would dilute the within-group
impostor FAR, which is what demographic differentials are about; cross-demographic impostors
usually score lower), and reported on their own under "cross_group".
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from lowlight.eval import roc_stats

__all__ = ["CROSS_GROUP", "ETHNICITY_NAMES", "GENDER_NAMES", "fairness_report", "group_rates",
           "pair_groups", "to_metrics"]

#: Names of the integer labels in lowlight.data (API.md: SynthFaces / UTKFace).
ETHNICITY_NAMES: tuple[str, ...] = ("White", "Black", "Asian", "Indian", "Others")
GENDER_NAMES: tuple[str, ...] = ("male", "female")

#: Label given to cross-group pairs by ``pair_groups``.
CROSS_GROUP = "cross_group"


def pair_groups(groups: Any) -> tuple[np.ndarray, np.ndarray]:
    """(label per pair, within-group mask) from (N,) or (N, 2) group labels (module docstring);
    cross-group pairs get ``CROSS_GROUP`` and mask False."""
    g = np.asarray(groups)
    if g.ndim == 1:
        return g, np.ones(g.shape[0], bool)
    if g.ndim != 2 or g.shape[1] != 2:
        raise ValueError(f"groups must be (N,) or (N, 2), got {g.shape}")
    within = g[:, 0] == g[:, 1]
    labels = np.where(within, g[:, 0].astype(object), CROSS_GROUP)
    return labels, within


def _rates(scores: np.ndarray, issame: np.ndarray, t: float) -> dict[str, Any]:
    accept = scores >= t
    num_pos, num_neg = int(issame.sum()), int((~issame).sum())
    tpr = float(np.sum(accept & issame) / num_pos) if num_pos else math.nan
    far = float(np.sum(accept & ~issame) / num_neg) if num_neg else math.nan
    return {"tpr": tpr, "frr": 1.0 - tpr, "far": far, "num_pos": num_pos, "num_neg": num_neg}


def _order(labels: Sequence[Hashable]) -> list[Hashable]:
    try:
        return sorted(labels)
    except TypeError:
        return sorted(labels, key=str)


def group_rates(scores: Any, issame: Any, groups: Any, threshold: float) -> dict[Hashable, dict]:
    """{group: {"tpr", "frr", "far", "num_pos", "num_neg"}} at one threshold (accept >= it),
    within-group pairs only (cross-group pairs of (N, 2) labels are dropped)."""
    scores = np.asarray(scores, np.float64).ravel()
    issame = np.asarray(issame, bool).ravel()
    labels, within = pair_groups(groups)
    if not (scores.size == issame.size == labels.shape[0]):
        raise ValueError("scores, issame and groups need one entry per pair")
    out = {}
    for g in _order(set(labels[within].tolist())):
        m = within & (labels == g)
        out[g] = _rates(scores[m], issame[m], threshold)
    return out


def _spread(per_group: Mapping[Hashable, dict], key: str) -> dict[str, Any]:
    vals = {g: r[key] for g, r in per_group.items() if not math.isnan(r[key])}
    if not vals:
        return {f"{key}_gap": math.nan, f"{key}_ratio": math.nan,
                f"{key}_min_group": None, f"{key}_max_group": None}
    lo, hi = min(vals, key=vals.get), max(vals, key=vals.get)
    vmin, vmax = vals[lo], vals[hi]
    if vmax == vmin:
        ratio = 1.0
    elif vmin == 0.0:
        ratio = math.inf
    else:
        ratio = vmax / vmin
    return {f"{key}_gap": vmax - vmin, f"{key}_ratio": ratio,
            f"{key}_min_group": lo, f"{key}_max_group": hi}


def fairness_report(
    scores: Any,
    issame: Any,
    groups: Any,
    *,
    fars: Sequence[float] = (1e-3,),
    eer: bool = True,
    thresholds: Mapping[str, float] | None = None,
    calibrate_on: str = "all",
) -> dict[str, dict[str, Any]]:
    """Per-group TPR / FRR / FAR at global operating points, with max−min gaps and ratios.

    Args:
      scores: (N,) pair similarity scores (accept score >= threshold).
      issame: (N,) bool.
      groups: (N,) or (N, 2) group labels (module docstring for cross-group pairs).
      fars: global FAR targets, each giving an operating point "far=x".
      eer: add the "eer" operating point.
      thresholds: extra named operating points {name: threshold}.
      calibrate_on: "all" pairs or "within"-group pairs only, for the far / eer thresholds.

    Returns:
      {operating point: {"threshold", "global" (rates over the calibration pairs),
       "groups" {group: rates}, "cross_group" (rates of cross-group pairs, only when there are
       any), "tpr_gap", "tpr_ratio", "frr_gap", "frr_ratio", "far_gap", "far_ratio",
       "<rate>_min_group", "<rate>_max_group"}}.
    """
    scores = np.asarray(scores, np.float64).ravel()
    issame = np.asarray(issame, bool).ravel()
    labels, within = pair_groups(groups)
    if not (scores.size == issame.size == labels.shape[0]):
        raise ValueError("scores, issame and groups need one entry per pair")
    if calibrate_on not in ("all", "within"):
        raise ValueError(f"calibrate_on={calibrate_on!r}; valid: all, within")
    cal = np.ones(scores.size, bool) if calibrate_on == "all" else within
    points: dict[str, float] = {}
    for x in fars:
        t = roc_stats.threshold_at_fpr(scores[cal], issame[cal], x)
        points[f"far={roc_stats.fpr_key(x)}"] = t
    if eer:
        points["eer"] = roc_stats.eer_threshold(scores[cal], issame[cal])
    points.update(thresholds or {})

    out: dict[str, dict[str, Any]] = {}
    for name, t in points.items():
        per_group = group_rates(scores, issame, groups, t)
        entry: dict[str, Any] = {
            "threshold": float(t),
            "global": _rates(scores[cal], issame[cal], t),
            "groups": per_group,
        }
        if not within.all():
            entry["cross_group"] = _rates(scores[~within], issame[~within], t)
        for key in ("tpr", "frr", "far"):
            entry.update(_spread(per_group, key))
        out[name] = entry
    return out


def to_metrics(report: Mapping[str, Any], prefix: str = "fairness") -> dict[str, Any]:
    """Flattens a report to scalar metrics, keys joined by '/':
    e.g. "fairness/far=1e-3/tpr_gap", "fairness/eer/groups/Black/far"."""
    flat: dict[str, Any] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{key}/{k}")
        else:
            flat[key] = node

    walk(report, prefix)
    return flat
