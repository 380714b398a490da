"""roc_stats, significance, fairness and efficiency against sklearn / scipy and hand-made cases."""

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

from lowlight.eval import efficiency, fairness, roc_stats, significance, verification


def _pairs(n_pos, n_neg, seed=0, sep=1.5, decimals=None):
    rng = np.random.default_rng(seed)
    s = np.r_[rng.normal(sep, 1.0, n_pos), rng.normal(0.0, 1.0, n_neg)]
    if decimals is not None:
        s = np.round(s, decimals)  # ties
    y = np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)]
    perm = rng.permutation(s.size)
    return s[perm], y[perm]


# --------------------------------------------------------------------------------------------
# ROC metrics, DET, operating points
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decimals", [None, 1])
def test_auc_equals_sklearn(decimals):
    s, y = _pairs(300, 700, seed=1, decimals=decimals)
    want = roc_auc_score(y, s)
    assert roc_stats.roc_auc(roc_stats.Roc.from_scores(s, y)) == pytest.approx(want, abs=1e-12)
    ci = roc_stats.bootstrap_ci(s, y, ["auc"], n_boot=5)["auc"]
    assert ci.value == pytest.approx(want, abs=1e-12)


def test_det_points_equal_sklearn_roc():
    s, y = _pairs(200, 300, seed=2, decimals=1)
    fpr, fnr, thr = roc_stats.det_curve(s, y)
    sk_fpr, sk_tpr, sk_thr = roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-15)
    np.testing.assert_allclose(fnr, 1.0 - sk_tpr, atol=1e-15)
    np.testing.assert_array_equal(thr, sk_thr)


def test_roc_points_equal_verification_roc():
    s, y = _pairs(120, 80, seed=3, decimals=1)
    r = roc_stats.Roc.from_scores(s, y)
    fpr, tpr, thr = verification.roc(s, y)
    np.testing.assert_array_equal(r.thresholds, thr)
    np.testing.assert_allclose(r.fpr, fpr, atol=1e-15)
    np.testing.assert_allclose(r.tpr, tpr, atol=1e-15)
    assert (r.num_pos, r.num_neg) == (120, 80)


def test_probit_and_det_axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert roc_stats.probit(0.5) == pytest.approx(0.0)
    assert roc_stats.probit(0.975) == pytest.approx(1.959964, abs=1e-6)
    assert np.all(np.isfinite(roc_stats.probit([0.0, 1.0])))
    fig, ax = plt.subplots()
    s, y = _pairs(50, 50)
    fpr, fnr, _ = roc_stats.det_curve(s, y)
    ax.plot(roc_stats.probit(fpr), roc_stats.probit(fnr))
    roc_stats.det_axes(ax, ticks=(0.01, 0.1, 0.5))
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "10", "50"]
    plt.close(fig)


# Hand case: positives 0.9 0.8 0.7 0.3, negatives 0.6 0.4 0.2 0.1.
HAND_S = np.array([0.9, 0.8, 0.7, 0.3, 0.6, 0.4, 0.2, 0.1])
HAND_Y = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)


def test_operating_points_hand_case():
    # accept >= 0.5: positives 0.9 0.8 0.7 accepted, negative 0.6 accepted
    op = roc_stats.operating_point(HAND_S, HAND_Y, 0.5)
    assert (op["tpr"], op["fpr"], op["tnr"], op["fnr"], op["acc"]) == (0.75, 0.25, 0.75, 0.25, 0.75)
    r = roc_stats.Roc.from_scores(HAND_S, HAND_Y)
    assert roc_stats.accuracy_at(0.5)(r) == 0.75
    assert roc_stats.accuracy_at(0.65)(r) == 7 / 8  # 3 pos + 4 neg right
    # FPR 0 allowed: lowest threshold with no negative accepted is 0.7 (TPR 3/4)
    assert roc_stats.threshold_at_fpr(HAND_S, HAND_Y, 0.0) == 0.7
    # FPR <= 1/4: one negative may pass; 0.4 would let two in, so 0.6 (TPR still 3/4)
    assert roc_stats.threshold_at_fpr(HAND_S, HAND_Y, 0.25) == 0.6
    assert roc_stats.threshold_at_fpr(HAND_S, HAND_Y, 0.5) == 0.3  # all positives, 2 negatives
    # EER 0.25 (FPR = FNR = 1/4 on the segment 0.7 -> 0.6); max(FPR, FNR) = 1/4 at 0.7 and 0.6,
    # highest threshold wins
    assert roc_stats.eer_threshold(HAND_S, HAND_Y) == 0.7
    assert roc_stats.roc_eer(r) == pytest.approx(0.25)
    m = roc_stats.fpr_metrics(HAND_S, HAND_Y, targets=(0.25, 0.1))
    assert m["tpr@fpr=2.5e-1"] == 0.75 and m["tnr@fpr=2.5e-1"] == 0.75
    assert m["threshold@fpr=2.5e-1"] == 0.6
    assert math.isnan(m["tpr@fpr=1e-1"]) and m["tpr@fpr=1e-1/reachable"] is False


def test_fpr_key():
    assert [roc_stats.fpr_key(x) for x in (1e-3, 1e-6, 5e-4, 0.01, 0.25)] == [
        "1e-3", "1e-6", "5e-4", "1e-2", "2.5e-1"]


def test_tpr_at_1e6_with_a_million_negatives_and_marker_without():
    rng = np.random.default_rng(3)
    neg = rng.uniform(0.0, 1.0, 1_000_000)
    pos = rng.uniform(0.9, 1.1, 1000)
    s, y = np.r_[pos, neg], np.r_[np.ones(1000, bool), np.zeros(neg.size, bool)]
    m = roc_stats.fpr_metrics(s, y, targets=(1e-6, 1e-7))
    # FPR <= 1e-6 allows one false accept: accept everything above the 2nd highest negative
    second = np.sort(neg)[-2]
    assert m["tpr@fpr=1e-6/reachable"] is True
    assert m["tpr@fpr=1e-6"] == np.mean(pos > second)
    assert m["tnr@fpr=1e-6"] == 1.0 - 1e-6
    assert math.isnan(m["tpr@fpr=1e-7"]) and m["tpr@fpr=1e-7"] is roc_stats.NOT_REACHABLE
    # the same value as verification's definition when reachable
    fpr, tpr, _ = verification.roc(s, y)
    assert m["tpr@fpr=1e-6"] == verification.tpr_at_fpr(fpr, tpr, 1e-6)
    # too few negatives for 1e-6
    s2, y2 = _pairs(100, 999_999 // 1000)
    assert math.isnan(roc_stats.fpr_metrics(s2, y2)["tpr@fpr=1e-6"])


def test_tnr_at_matches_counts():
    s, y = _pairs(500, 2000, seed=4, sep=1.0)
    for x in (1e-3, 1.25e-3, 0.0123, 0.1234):  # not all multiples of 1/N_neg
        t = roc_stats.threshold_at_fpr(s, y, x)
        tnr = roc_stats.tnr_at(x)(roc_stats.Roc.from_scores(s, y))
        assert tnr == 1.0 - np.sum(s[~y] >= t) / np.sum(~y)
        assert tnr == 1.0 - math.floor(x * 2000) / 2000  # continuous scores: budget spent
        assert roc_stats.fpr_metrics(s, y, [x])[f"tnr@fpr={roc_stats.fpr_key(x)}"] == tnr
        assert tnr >= 1.0 - x
        fpr, tpr, _ = verification.roc(s, y)
        assert roc_stats.operating_point(s, y, t)["tpr"] == verification.tpr_at_fpr(fpr, tpr, x)


# --------------------------------------------------------------------------------------------
# bootstrap
# --------------------------------------------------------------------------------------------


def test_bootstrap_replicates_equal_brute_force_resampling():
    s, y = _pairs(60, 140, seed=5, decimals=2)
    names = ["auc", "eer", "tpr@fpr=5e-2", "acc@thr=0.7"]
    out = roc_stats.bootstrap_ci(s, y, names, n_boot=25, seed=7, return_replicates=True)
    for b, idx in enumerate(roc_stats.resample_indices(s.size, 25, 7, strata=y)):
        sb, yb = s[idx], y[idx]
        assert sb.size == s.size and yb.sum() == y.sum()  # stratified
        fpr, tpr, _ = roc_curve(yb, sb, drop_intermediate=False)
        assert out["auc/replicates"][b] == pytest.approx(roc_auc_score(yb, sb), abs=1e-12)
        assert out["eer/replicates"][b] == pytest.approx(verification.eer(fpr, tpr), abs=1e-12)
        assert out["tpr@fpr=5e-2/replicates"][b] == pytest.approx(tpr[fpr <= 0.05].max())
        acc = np.mean((sb >= 0.7) == yb)
        assert out["acc@thr=0.7/replicates"][b] == pytest.approx(acc, abs=1e-12)


def test_bootstrap_ci_contains_estimate_shrinks_and_is_deterministic():
    small = roc_stats.bootstrap_ci(*_pairs(100, 100, seed=6, sep=1.0), ["auc", "eer"], n_boot=300)
    large = roc_stats.bootstrap_ci(*_pairs(2500, 2500, seed=6, sep=1.0), ["auc", "eer"], n_boot=300)
    for ci in (*small.values(), *large.values()):
        assert ci.low < ci.value < ci.high and ci.se > 0
    for k in ("auc", "eer"):
        # 25x the pairs: ~5x narrower
        assert (large[k].high - large[k].low) < 0.4 * (small[k].high - small[k].low)
    s, y = _pairs(100, 100, seed=6, sep=1.0)
    again = roc_stats.bootstrap_ci(s, y, ["auc", "eer"], n_boot=300)
    assert again == small
    other = roc_stats.bootstrap_ci(s, y, ["auc", "eer"], n_boot=300, seed=1)
    assert other["auc"].low != small["auc"].low
    # the true AUC of N(1,1) vs N(0,1) scores, Φ(1/√2) = 0.760, is inside the large-N interval
    assert large["auc"].low < stats.norm.cdf(1 / math.sqrt(2)) < large["auc"].high


def test_generic_bootstrap_equals_fast_path():
    s, y = _pairs(80, 120, seed=8)
    fast = roc_stats.bootstrap_ci(s, y, ["auc"], n_boot=50, seed=3)["auc"]
    slow = roc_stats.bootstrap(lambda a, b: roc_auc_score(b, a), s, y, n_boot=50, seed=3, strata=y)
    np.testing.assert_allclose(tuple(slow), tuple(fast), atol=1e-12)


def test_bootstrap_callable_metrics_and_unreachable():
    s, y = _pairs(50, 50, seed=9)
    out = roc_stats.bootstrap_ci(s, y, {"t": roc_stats.tpr_at(1e-3, mark_unreachable=True),
                                        "t0": roc_stats.tpr_at(1e-3)}, n_boot=20)
    assert math.isnan(out["t"].value) and math.isnan(out["t"].low)
    assert out["t0"].value == verification.tpr_at_fpr(*verification.roc(s, y)[:2], 1e-3)
    with pytest.raises(ValueError, match="unknown metric"):
        roc_stats.bootstrap_ci(s, y, ["f1"], n_boot=2)


# --------------------------------------------------------------------------------------------
# over seeds
# --------------------------------------------------------------------------------------------


def test_mean_ci_golden():
    m, h = roc_stats.mean_ci([1, 2, 3, 4, 5])
    assert m == 3.0
    assert h == pytest.approx(1.96 * math.sqrt(2.5) / math.sqrt(5))  # ddof=1: var 2.5
    _, h0 = roc_stats.mean_ci([1, 2, 3, 4, 5], ddof=0)
    assert h0 == pytest.approx(1.96 * math.sqrt(2.0) / math.sqrt(5))
    m, ht = roc_stats.mean_ci_t([1, 2, 3, 4, 5])
    assert ht == pytest.approx(2.7764451052 * math.sqrt(0.5))  # t_{0.975,4} · s/√n
    with pytest.raises(ValueError):
        roc_stats.mean_ci([1.0])


def test_mean_ci_reproduces_paper_b_table7_row():
    # ArcFace LFW: "99.65 ± 0.08 (99.58–99.72)": five runs with mean 99.65 and sample std 0.08
    z = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    runs = 99.65 + 0.08 * z / np.std(z, ddof=1)
    m, h = roc_stats.mean_ci(runs)
    assert (round(m - h, 2), round(m + h, 2)) == (99.58, 99.72)


def test_per_condition():
    s, y = _pairs(300, 300, seed=10)
    cond = np.array(["over", "low", "side_left", "normal", "side_top", "mystery"] * 100)
    out = roc_stats.per_condition(lambda a, b: roc_auc_score(b, a), cond, s, y)
    assert list(out) == ["normal", "low", "side_left", "side_top", "over", "mystery"]
    for c, v in out.items():
        assert v == pytest.approx(roc_auc_score(y[cond == c], s[cond == c]))
    coarse = roc_stats.per_condition(lambda a: a.size, cond[cond != "mystery"],
                                     s[cond != "mystery"], coarse=True)
    assert coarse == {"normal": 100, "low": 100, "side": 200, "over": 100}
    few = np.array(["low", "normal"])
    with pytest.raises(ValueError):
        roc_stats.per_condition(roc_stats.fpr_metrics, few, [0.1, 0.2], [True, False])
    nan = roc_stats.per_condition(roc_stats.fpr_metrics, few, [0.1, 0.2], [True, False],
                                  errors="nan")
    assert math.isnan(nan["low"]) and math.isnan(nan["normal"])


# --------------------------------------------------------------------------------------------
# significance
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("equal_var", [True, False])
@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_ttest_ind_equals_scipy(equal_var, alternative):
    rng = np.random.default_rng(11)
    a, b = rng.normal(99.6, 0.1, 5), rng.normal(99.5, 0.3, 7)
    got = significance.ttest_ind(a, b, equal_var=equal_var, alternative=alternative)
    want = stats.ttest_ind(a, b, equal_var=equal_var, alternative=alternative)
    assert got.statistic == pytest.approx(want.statistic, rel=1e-10)
    assert got.pvalue == pytest.approx(want.pvalue, rel=1e-9)
    assert got.df == pytest.approx(want.df, rel=1e-10)
    assert got.test == ("student" if equal_var else "welch")
    if alternative == "two-sided":
        ci = want.confidence_interval(0.95)
        assert (got.ci_low, got.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-10)


def test_ttest_rel_and_compare_runs():
    rng = np.random.default_rng(12)
    a = rng.normal(94.2, 0.3, 5)
    b = a + rng.normal(0.5, 0.1, 5)
    got, want = significance.ttest_rel(a, b), stats.ttest_rel(a, b)
    assert got.statistic == pytest.approx(want.statistic, rel=1e-10)
    assert got.pvalue == pytest.approx(want.pvalue, rel=1e-9)
    assert got.df == 4 and got.test == "paired"
    # same seeds in another order: matched by seed -> paired
    seeds = np.array([0, 1, 2, 3, 4])
    perm = np.array([3, 0, 4, 1, 2])
    r = significance.compare_runs(a, b[perm], seeds_a=seeds, seeds_b=seeds[perm])
    assert r.test == "paired" and r.statistic == pytest.approx(got.statistic)
    r = significance.compare_runs(a, b, seeds_a=seeds, seeds_b=seeds + 10)
    assert r.test == "student"
    assert r.pvalue == pytest.approx(stats.ttest_ind(a, b).pvalue, rel=1e-9)


def test_mcnemar_and_permutation_agree_with_binomial():
    # 600 pairs, 20 where only a is right and 10 where only b is: p = 0.099 (not tiny, so a
    # wrong null distribution shows)
    rng = np.random.default_rng(13)
    a = rng.random(600) < 0.90
    b = a.copy()
    right, wrong = rng.permutation(np.flatnonzero(a)), rng.permutation(np.flatnonzero(~a))
    b[right[:20]] = False
    b[wrong[:10]] = True
    mc = significance.mcnemar_exact(a, b)
    n10, n01 = int(np.sum(a & ~b)), int(np.sum(~a & b))
    assert (mc["n10"], mc["n01"]) == (n10, n01)
    assert (n10, n01) == (20, 10)
    assert mc["pvalue"] == pytest.approx(stats.binomtest(n10, n10 + n01, 0.5).pvalue, rel=1e-9)
    assert 0.05 < mc["pvalue"] < 0.15
    perm = significance.permutation_test(a, b, n_perm=20000, seed=0)
    assert perm.diff == pytest.approx(a.mean() - b.mean())
    assert abs(perm.pvalue - mc["pvalue"]) < 0.01
    assert significance.permutation_test(a, a).pvalue == 1.0


def test_paired_bootstrap():
    rng = np.random.default_rng(14)
    a = rng.random(2000) < 0.9
    b = a & (rng.random(2000) < 0.95)  # b loses ~5% of a's correct pairs
    r = significance.paired_bootstrap(a, b, n_boot=4000, seed=1)
    assert r == significance.paired_bootstrap(a, b, n_boot=4000, seed=1)
    d = a.astype(float) - b
    assert r.diff == pytest.approx(d.mean())
    assert r.ci_low < r.diff < r.ci_high
    half = 1.96 * d.std(ddof=1) / math.sqrt(d.size)  # normal approximation of the CI
    assert (r.ci_high - r.ci_low) / 2 == pytest.approx(half, rel=0.1)
    assert r.pvalue < 1e-3
    # c: as accurate as a (30 of a's right pairs wrong, 30 of its wrong pairs right): p = 1
    c = a.copy()
    c[np.flatnonzero(a)[:30]] = False
    c[np.flatnonzero(~a)[:30]] = True
    r = significance.paired_bootstrap(a, c, n_boot=500)
    assert r.diff == 0.0 and r.pvalue == 1.0 and r.ci_low < 0 < r.ci_high


# --------------------------------------------------------------------------------------------
# fairness
# --------------------------------------------------------------------------------------------


def _fair_case():
    """Group A: 100 positives (90 at 0.9, 10 at 0.05), 1000 negatives at 0.1.
    Group B: 100 positives (60 at 0.9, 40 at 0.05), 1000 negatives: 0.97, 0.96, 0.85, 997 at 0.1.
    Global FAR <= 1e-3 over 2000 negatives allows 2 false accepts -> threshold 0.9
    (the lowest score above 0.85): TPR_A 0.9, TPR_B 0.6, FAR_A 0, FAR_B 0.002."""
    s = np.r_[[0.9] * 90, [0.05] * 10, [0.1] * 1000,
              [0.9] * 60, [0.05] * 40, [0.97, 0.96, 0.85], [0.1] * 997]
    y = np.r_[np.ones(100), np.zeros(1000), np.ones(100), np.zeros(1000)].astype(bool)
    g = np.array(["A"] * 1100 + ["B"] * 1100)
    return s, y, g


def test_fairness_known_rates():
    s, y, g = _fair_case()
    rep = fairness.fairness_report(s, y, g, fars=(1e-3,), thresholds={"t=0.5": 0.5})
    p = rep["far=1e-3"]
    assert p["threshold"] == 0.9
    assert p["groups"]["A"] == {"tpr": 0.9, "frr": pytest.approx(0.1), "far": 0.0,
                                "num_pos": 100, "num_neg": 1000}
    assert (p["groups"]["B"]["tpr"], p["groups"]["B"]["far"]) == (0.6, 0.002)
    assert p["tpr_gap"] == pytest.approx(0.3) and p["tpr_ratio"] == pytest.approx(1.5)
    assert p["frr_ratio"] == pytest.approx(4.0)
    assert p["far_gap"] == 0.002 and p["far_ratio"] == math.inf
    assert (p["tpr_min_group"], p["far_max_group"]) == ("B", "B")
    assert p["global"]["far"] == 0.001 and p["global"]["tpr"] == 0.75
    q = rep["t=0.5"]  # accept >= 0.5: B's three high negatives
    assert q["groups"]["B"]["far"] == 0.003 and q["groups"]["A"]["far"] == 0.0
    assert rep["eer"]["threshold"] == roc_stats.eer_threshold(s, y)
    flat = fairness.to_metrics(rep)
    assert flat["fairness/far=1e-3/groups/B/tpr"] == 0.6
    assert flat["fairness/far=1e-3/tpr_gap"] == pytest.approx(0.3)


def test_fairness_cross_group_pairs():
    s, y, g = _fair_case()
    # 500 cross-group impostor pairs (sides A and B), 5 of them scoring 0.95
    s2 = np.r_[s, [0.95] * 5, [0.0] * 495]
    y2 = np.r_[y, np.zeros(500, bool)]
    g2 = np.c_[np.r_[g, ["A"] * 500], np.r_[g, ["B"] * 500]]
    within = fairness.fairness_report(s2, y2, g2, calibrate_on="within", eer=False)["far=1e-3"]
    assert within["threshold"] == 0.9
    assert within["groups"]["B"]["far"] == 0.002  # cross pairs not in any group
    cross = within["cross_group"]
    assert math.isnan(cross["tpr"]) and cross["far"] == 5 / 500
    assert (cross["num_pos"], cross["num_neg"]) == (0, 500)
    assert "cross_group" not in fairness.fairness_report(s, y, g)["eer"]
    # calibrated on all 2500 negatives: 2 false accepts allowed; 0.95 would let 7 in -> 0.96
    every = fairness.fairness_report(s2, y2, g2, eer=False)["far=1e-3"]
    assert every["threshold"] == 0.96
    assert every["groups"]["B"]["far"] == 0.002 and every["groups"]["A"]["tpr"] == 0.0
    assert every["cross_group"]["far"] == 0.0 and every["global"]["far"] == 2 / 2500


# --------------------------------------------------------------------------------------------
# efficiency
# --------------------------------------------------------------------------------------------


def test_efficiency_tiny_flax_model():
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.Dense(4)(x)  # 3*4 + 4 = 16
            x = nn.BatchNorm(use_running_average=not train)(x)  # scale, bias 8; mean, var 8
            return nn.Dense(2)(nn.relu(x))  # 4*2 + 2 = 10

    model = Tiny()
    x = jnp.ones((1, 3))
    variables = model.init(jax.random.key(0), x)
    fn = jax.jit(lambda v: model.apply(variables, v))
    out = efficiency.profile(fn, x, variables=variables, throughput_runs=5)
    assert out["params"] == 34 and efficiency.param_count(variables["params"]) == 34
    assert out["batch_stats"] == 8
    assert out["param_bytes"] == 34 * 4 and out["size_bytes"] == 42 * 4
    assert out["size_mib"] == pytest.approx(168 / 2**20)
    assert out["latency_runs"] == 200 and out["throughput_batch"] == 64
    for k in ("latency_ms_mean", "latency_ms_median", "latency_ms_p95", "throughput_per_s"):
        assert math.isfinite(out[k]) and out[k] > 0
    assert out["latency_ms_p95"] >= out["latency_ms_median"]
    bf16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), variables)
    assert efficiency.model_size(bf16)["size_bytes"] == 42 * 2
