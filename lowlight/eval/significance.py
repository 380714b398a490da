"""Significance tests for comparing models: over seeds and over evaluation pairs.

Paper B §4.4 runs every configuration with five seeds and compares two configurations with an
*unpaired two-sample t-test* (runs "not paired by the same random seed"), calling p < 0.05
significant. Implemented here from the formulas (tested against ``scipy.stats``):

- ``ttest_ind(a, b, equal_var=True)``: Student's t, pooled variance
  s_p² = ((n_a−1)s_a² + (n_b−1)s_b²)/(n_a+n_b−2), t = (ā−b̄)/(s_p·√(1/n_a+1/n_b)),
  df = n_a+n_b−2 (paper B's test);
- ``ttest_ind(a, b, equal_var=False)``: Welch, se² = s_a²/n_a + s_b²/n_b, t = (ā−b̄)/se,
  Welch–Satterthwaite df = se⁴ / ((s_a²/n_a)²/(n_a−1) + (s_b²/n_b)²/(n_b−1));
- ``ttest_rel(a, b)``: paired, on dᵢ = aᵢ − bᵢ for runs sharing seed i: t = d̄/(s_d/√n), df = n−1;
- ``compare_runs``: paired when both sets of runs carry the same seeds, else Student.
s² are ddof=1 variances. p-values from the t distribution: two-sided 2·P(T >= |t|), or one-sided
("greater": P(T >= t), H1 mean(a) > mean(b); "less": P(T <= t)).

Across evaluation pairs, for two models scored on the *same* pairs with per-pair correctness
(or any per-pair score) cᵃ, cᵇ and dᵢ = cᵃᵢ − cᵇᵢ, δ = mean(d) (accuracy difference):
- ``paired_bootstrap``: resample pairs with replacement (jointly for both models), δ*_b =
  mean(d[idx_b]); percentile CI of δ; two-sided p = (1 + #{|δ*_b − δ| >= |δ|}) / (B + 1)
  (the centred bootstrap distribution as the null);
- ``permutation_test``: paired sign-flip test — under H0 the two models' results on a pair are
  exchangeable, so each dᵢ keeps or flips its sign with probability 1/2; p = (1 + #{|Σ sᵢdᵢ| >=
  |Σ dᵢ|}) / (R + 1). For 0/1 correctness this is a Monte-Carlo McNemar test:
- ``mcnemar_exact``: exact two-sided binomial test on the discordant pairs
  (n₁₀: a right & b wrong, n₀₁: a wrong & b right), p = min(1, 2·P(Bin(n₁₀+n₀₁, ½) <= min)).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from scipy import stats

__all__ = [
    "PairedTest",
    "TTest",
    "compare_runs",
    "mcnemar_exact",
    "paired_bootstrap",
    "permutation_test",
    "ttest_ind",
    "ttest_rel",
]

_ALTERNATIVES = ("two-sided", "greater", "less")


class TTest(NamedTuple):
    """statistic t, pvalue, df, mean_diff = mean(a) − mean(b), ci_low/ci_high: the
    ``confidence`` interval of mean_diff from the same t distribution; test: "student",
    "welch" or "paired"."""

    statistic: float
    pvalue: float
    df: float
    mean_diff: float
    ci_low: float
    ci_high: float
    test: str


def _vec(x: Any, name: str) -> np.ndarray:
    v = np.asarray(x, np.float64).ravel()
    if v.size < 2:
        raise ValueError(f"{name} needs at least 2 values, got {v.size}")
    return v


def _t_result(diff: float, se: float, df: float, alternative: str, confidence: float,
              test: str) -> TTest:
    if alternative not in _ALTERNATIVES:
        raise ValueError(f"alternative={alternative!r}; valid: {', '.join(_ALTERNATIVES)}")
    with np.errstate(divide="ignore", invalid="ignore"):
        t = float(np.divide(diff, se))
    if alternative == "two-sided":
        p = float(2.0 * stats.t.sf(abs(t), df)) if not math.isnan(t) else math.nan
    elif alternative == "greater":
        p = float(stats.t.sf(t, df))
    else:
        p = float(stats.t.cdf(t, df))
    h = float(stats.t.ppf((1.0 + confidence) / 2.0, df) * se)
    return TTest(t, min(p, 1.0), float(df), float(diff), diff - h, diff + h, test)


def ttest_ind(a: Any, b: Any, *, equal_var: bool = True, alternative: str = "two-sided",
              confidence: float = 0.95) -> TTest:
    """Unpaired two-sample t-test (Student if ``equal_var``, else Welch); module docstring.

    Equal to ``scipy.stats.ttest_ind(a, b, equal_var=...)``. With zero variance in both
    samples t is ±inf (p = 0) or NaN (equal means).
    """
    a, b = _vec(a, "a"), _vec(b, "b")
    na, nb = a.size, b.size
    va, vb = np.var(a, ddof=1), np.var(b, ddof=1)
    if equal_var:
        df = na + nb - 2
        sp2 = ((na - 1) * va + (nb - 1) * vb) / df
        se = math.sqrt(sp2 * (1.0 / na + 1.0 / nb))
        test = "student"
    else:
        qa, qb = va / na, vb / nb
        se = math.sqrt(qa + qb)
        with np.errstate(divide="ignore", invalid="ignore"):
            df = float(np.divide((qa + qb) ** 2, qa**2 / (na - 1) + qb**2 / (nb - 1)))
        test = "welch"
    return _t_result(float(a.mean() - b.mean()), se, df, alternative, confidence, test)


def ttest_rel(a: Any, b: Any, *, alternative: str = "two-sided", confidence: float = 0.95) -> TTest:
    """Paired t-test on aᵢ − bᵢ (aᵢ, bᵢ: runs with the same seed); equals
    ``scipy.stats.ttest_rel``."""
    a, b = _vec(a, "a"), _vec(b, "b")
    if a.size != b.size:
        raise ValueError(f"paired samples differ in size: {a.size} vs {b.size}")
    d = a - b
    se = float(np.std(d, ddof=1) / math.sqrt(d.size))
    return _t_result(float(d.mean()), se, d.size - 1, alternative, confidence, "paired")


def compare_runs(a: Any, b: Any, *, seeds_a: Any = None, seeds_b: Any = None,
                 alternative: str = "two-sided", confidence: float = 0.95) -> TTest:
    """Per-seed results of two configurations: a paired t-test when both carry the same set of
    seeds (matched by seed), else paper B's unpaired Student test."""
    if seeds_a is not None and seeds_b is not None:
        sa, sb = list(np.asarray(seeds_a).ravel()), list(np.asarray(seeds_b).ravel())
        if len(set(sa)) == len(sa) == len(sb) and set(sa) == set(sb):
            a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
            pos = {s: i for i, s in enumerate(sb)}
            return ttest_rel(a, b[[pos[s] for s in sa]], alternative=alternative,
                             confidence=confidence)
    return ttest_ind(a, b, equal_var=True, alternative=alternative, confidence=confidence)


# --------------------------------------------------------------------------------------------
# per-pair comparisons of two models on the same pairs
# --------------------------------------------------------------------------------------------


class PairedTest(NamedTuple):
    """diff = mean(a) − mean(b) over pairs; pvalue (two-sided); ci_low/ci_high (bootstrap only,
    NaN otherwise); n = number of pairs; resamples: B or R (0 for exact tests)."""

    diff: float
    pvalue: float
    ci_low: float
    ci_high: float
    n: int
    resamples: int


def _diffs(a: Any, b: Any) -> np.ndarray:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.size != b.size or a.size == 0:
        raise ValueError(f"need two equal-length non-empty arrays, got {a.size} and {b.size}")
    return a - b


def _rows_per_chunk(n: int) -> int:
    return max(1, (1 << 22) // max(n, 1))  # ~32 MB of int64 indices per chunk


def paired_bootstrap(correct_a: Any, correct_b: Any, *, n_boot: int = 10000, seed: int = 0,
                     confidence: float = 0.95) -> PairedTest:
    """Paired bootstrap over pairs of the difference in mean per-pair correctness (module
    docstring). Deterministic in ``seed``."""
    d = _diffs(correct_a, correct_b)
    delta = float(d.mean())
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    step = _rows_per_chunk(d.size)
    for s in range(0, n_boot, step):
        m = min(step, n_boot - s)
        reps[s : s + m] = d[rng.integers(0, d.size, (m, d.size))].mean(axis=1)
    a = (1.0 - confidence) / 2.0
    low, high = np.quantile(reps, [a, 1.0 - a])
    extreme = np.abs(reps - delta) >= abs(delta) - 1e-12 * max(1.0, abs(delta))
    p = (1.0 + float(np.sum(extreme))) / (n_boot + 1.0)
    return PairedTest(delta, min(p, 1.0), float(low), float(high), int(d.size), n_boot)


def permutation_test(correct_a: Any, correct_b: Any, *, n_perm: int = 10000,
                     seed: int = 0) -> PairedTest:
    """Paired sign-flip permutation test of mean(a) = mean(b) (module docstring).
    Only pairs with dᵢ ≠ 0 are flipped (the others add 0 either way)."""
    d = _diffs(correct_a, correct_b)
    delta = float(d.mean())
    nz = d[d != 0]
    if nz.size == 0:
        return PairedTest(delta, 1.0, math.nan, math.nan, int(d.size), n_perm)
    obs = abs(float(nz.sum()))
    rng = np.random.default_rng(seed)
    hits = 0
    step = _rows_per_chunk(nz.size)
    for s in range(0, n_perm, step):
        m = min(step, n_perm - s)
        signs = rng.integers(0, 2, (m, nz.size)) * 2 - 1
        hits += int(np.sum(np.abs(signs @ nz) >= obs - 1e-9 * max(1.0, obs)))
    p = (1.0 + hits) / (n_perm + 1.0)
    return PairedTest(delta, min(p, 1.0), math.nan, math.nan, int(d.size), n_perm)


def mcnemar_exact(correct_a: Any, correct_b: Any) -> dict[str, Any]:
    """Exact McNemar test on boolean per-pair correctness of two models on the same pairs.

    Returns:
      {"n10": a right & b wrong, "n01": a wrong & b right, "pvalue": two-sided exact binomial
       p-value, "diff": mean(a) − mean(b)}.
    """
    a, b = np.asarray(correct_a, bool).ravel(), np.asarray(correct_b, bool).ravel()
    if a.size != b.size or a.size == 0:
        raise ValueError(f"need two equal-length non-empty arrays, got {a.size} and {b.size}")
    n10, n01 = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n = n10 + n01
    p = 1.0 if n == 0 else min(1.0, 2.0 * float(stats.binom.cdf(min(n10, n01), n, 0.5)))
    return {"n10": n10, "n01": n01, "pvalue": p, "diff": (n10 - n01) / a.size}
