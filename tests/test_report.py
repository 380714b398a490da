"""lowlight.eval.report: the recognition report sections, on embeddings whose answers are known,
and wired into `python -m lowlight.evaluate` end to end."""

import math
import os
import types

import ml_collections
import numpy as np
import pytest

from lowlight.eval import evaluators as eval_lib
from lowlight.eval import report, verification

PNGS = ("det.png", "cmc.png", "tpr_by_condition.png")


def _toy(emb_kind: str, *, n_id=30, ipi=4, n_neg=600, seed=0):
    """A SynthVerification-like object: n_id people x ipi images, every same-person pair of
    consecutive images as positives, n_neg random different-person negatives; ethnicity =
    id % 5, gender = id % 2, image conditions cycling normal / low / over."""
    rng = np.random.default_rng(seed)
    identity = np.repeat(np.arange(n_id), ipi)
    n = identity.size
    a = np.arange(n)[np.arange(n) % ipi != ipi - 1]
    x, y = rng.integers(0, n, (2, 4 * n_neg))
    x, y = x[identity[x] != identity[y]][:n_neg], y[identity[x] != identity[y]][:n_neg]
    i1, i2 = np.r_[a, x], np.r_[a + 1, y]
    if emb_kind == "perfect":
        emb = np.eye(n_id, dtype=np.float32)[identity]
    else:
        emb = rng.normal(size=(n, 32)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    conditions = np.array(["normal", "low", "over"])[np.arange(n) % 3]
    return types.SimpleNamespace(
        name="toy", idx1=i1, idx2=i2, issame=identity[i1] == identity[i2],
        pair_conditions=conditions[i2], identity=identity, gender=identity % 2,
        ethnicity=identity % 5, last_embeddings=emb, last_scores=np.sum(emb[i1] * emb[i2], 1))


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 1000


def test_perfect_embeddings_give_perfect_answers_and_write_plots(tmp_path):
    text, m = report.recognition_report({"toy": _toy("perfect")}, str(tmp_path))
    for f in PNGS:
        assert _is_png(tmp_path / f) and f"]({f})" in text
    for section in ("per lighting condition", "## Fairness", "## Identification"):
        assert section in text
    # identification: one-hot embeddings find every enrolled person, reject every stranger
    assert m["toy/cmc_rank1"] == 1.0 and m["toy/cmc_rank5"] == 1.0
    assert m["toy/dir@fpir=1e-1"] == 1.0 and m["toy/dir@fpir=1e-1/reachable"]
    assert m["toy/identification/num_gallery"] == 24  # 30 people, 20% never enrolled
    assert m["toy/identification/num_nonmated"] == 6 * 4
    assert m["toy/identification/num_mated"] == 24 * 3
    for c in ("normal", "low", "over"):
        assert m[f"toy/condition/{c}/auc"] == 1.0
        assert m[f"toy/condition/{c}/auc_ci_low"] == m[f"toy/condition/{c}/auc_ci_high"] == 1.0
        assert m[f"toy/condition/{c}/eer"] == 0.0
        assert m[f"toy/condition/{c}/tpr@fpr=1e-2"] == 1.0  # >= 100 negatives each
        assert math.isnan(m[f"toy/condition/{c}/tpr@fpr=1e-3"])  # < 1000 negatives: n/r
    assert "n/r" in text
    assert m["toy/tpr@fpr=1e-2"] == 1.0 and m["toy/tpr@fpr=1e-2/reachable"]
    for attr in ("ethnicity", "gender"):
        for op in ("far=1e-2", "eer"):
            assert m[f"toy/fairness/tpr_gap_{attr}@{op}"] == 0.0
            assert m[f"toy/fairness/far_gap_{attr}@{op}"] == 0.0
            assert m[f"toy/fairness/tpr_ratio_{attr}@{op}"] == 1.0
    assert m["toy/fairness/tpr_ethnicity=Black@far=1e-2"] == 1.0
    assert m["toy/fairness/far_gender=cross_group@eer"] == 0.0
    assert all(k.startswith("toy/") for k in m)
    assert all(np.isscalar(v) for v in m.values())


def test_random_embeddings_are_at_chance(tmp_path):
    text, m = report.recognition_report({"toy": _toy("random", n_neg=1200)}, str(tmp_path),
                                        plots=False)
    assert not any(os.path.exists(tmp_path / f) for f in PNGS)
    assert "](det.png)" not in text
    table = report.condition_table(_toy("random", n_neg=1200))
    assert abs(table["all"]["auc"] - 0.5) < 0.1
    assert table["all"]["auc_ci_low"] < table["all"]["auc"] < table["all"]["auc_ci_high"]
    assert table["all"]["tpr@fpr=1e-3/reachable"]  # 1200 negatives
    assert m["toy/cmc_rank1"] < 0.25  # chance is 1/24
    assert m["toy/cmc_rank1"] <= m["toy/cmc_rank5"] <= 1.0


def test_fairness_tables_measure_a_planted_differential():
    """White positives score 0.9, Black positives 0.6; 50 White-White impostors score 0.7 and 5
    cross-group impostors 0.95 (under 1% of all negatives). At global FAR <= 1e-2 the threshold
    is 0.9: White TPR 1, Black TPR 0. At the EER point (0.6) both TPRs are 1 and only White
    impostors are accepted; cross-group impostors count in no group."""
    ev = _toy("perfect", n_id=40, ipi=2, n_neg=1000, seed=1)
    ev.ethnicity = (ev.identity >= 20).astype(int)  # 0 White, 1 Black
    ev.gender = np.zeros_like(ev.identity)
    e1, e2 = ev.ethnicity[ev.idx1], ev.ethnicity[ev.idx2]
    scores = np.where(ev.issame, np.where(e1 == 0, 0.9, 0.6), 0.0)
    ww = np.flatnonzero(~ev.issame & (e1 == 0) & (e2 == 0))
    cross = np.flatnonzero(e1 != e2)
    scores[ww[:50]] = 0.7
    scores[cross[:5]] = 0.95
    ev.last_scores = scores
    _, m = report.recognition_report({"fair": ev}, "", plots=False)
    k = "fair/fairness/"
    assert m[k + "threshold@far=1e-2"] == 0.9 and m[k + "threshold@eer"] == 0.6
    assert m[k + "tpr_ethnicity=White@far=1e-2"] == 1.0
    assert m[k + "tpr_ethnicity=Black@far=1e-2"] == 0.0
    assert m[k + "tpr_gap_ethnicity@far=1e-2"] == 1.0
    assert m[k + "tpr_ratio_ethnicity@far=1e-2"] == math.inf
    assert m[k + "far_gap_ethnicity@far=1e-2"] == 0.0
    assert m[k + "far_ethnicity=cross_group@far=1e-2"] == pytest.approx(5 / cross.size)
    assert m[k + "tpr_gap_ethnicity@eer"] == 0.0
    assert m[k + "far_ethnicity=White@eer"] == pytest.approx(50 / ww.size)
    assert m[k + "far_gap_ethnicity@eer"] == pytest.approx(50 / ww.size)
    assert m[k + "tpr_gap_gender@far=1e-2"] == 0.0  # one gender: nothing to compare
    assert m[k + "global_far@far=1e-2"] <= 1e-2


def test_synth_verification_keeps_labels_embeddings_and_adds_keys(tmp_path):
    cfg = ml_collections.ConfigDict(dict(type="synth_verification", seed=10_001,
                                         num_identities=8, images_per_identity=3, size=32,
                                         num_pairs=40, lighting="mixed"))
    ev = eval_lib.SynthVerification("sv", cfg)
    n = len(ev.images)
    assert ev.identity.shape == ev.gender.shape == ev.ethnicity.shape == (n,)
    np.testing.assert_array_equal(ev.identity[ev.idx1] == ev.identity[ev.idx2], ev.issame)
    for i in np.unique(ev.identity):  # demographics are a person's, not an image's
        mine = ev.identity == i
        assert len(set(ev.gender[mine])) == len(set(ev.ethnicity[mine])) == 1

    def embed(images):
        assert len(images) == n
        return 3.0 * np.eye(8, dtype=np.float32)[ev.identity]  # not unit norm on purpose

    out = ev.run(embed)
    res = verification.evaluate(embed(ev.images)[ev.idx1], embed(ev.images)[ev.idx2], ev.issame)
    old = {f"sv/{k}" for k, v in res.items() if np.isscalar(v)} | {"sv/raw_pixel_acc"}
    assert set(out) == old | {"sv/auc_ci_low", "sv/auc_ci_high", "sv/tnr@fpr=1e-3"}
    assert out["sv/auc"] == out["sv/auc_ci_low"] == out["sv/auc_ci_high"] == 1.0
    assert out["sv/tnr@fpr=1e-3"] == 1.0
    np.testing.assert_allclose(np.linalg.norm(ev.last_embeddings, axis=1), 1.0, rtol=1e-6)
    _, m = report.recognition_report({"sv": ev}, str(tmp_path), plots=False)
    assert m["sv/cmc_rank1"] == 1.0


def test_evaluate_writes_the_new_sections_and_metrics(tmp_path):
    from lowlight import evaluate as ll_eval
    from lowlight import main as ll_main
    from lowlight.metric_writer import read_metrics
    from tests.helpers import load_config

    wd = str(tmp_path / "rec")
    ll_main.run(load_config("vit_magface", "smoke", total_steps=2, eval_every=2), wd)
    trained = [r for r in read_metrics(wd) if "synth_val/acc" in r][-1]
    assert "synth_val/auc_ci_low" in trained and "synth_val/tnr@fpr=1e-3" in trained
    res = ll_eval.evaluate(wd)
    out = os.path.join(wd, "eval", "2")
    assert {"report.md", "roc.png", "scores.npz", *PNGS} <= set(os.listdir(out))
    text = open(os.path.join(out, "report.md")).read()
    for s in ("per lighting condition", "AUC [95% CI]", "## Fairness", "synth_val — ethnicity",
              "synth_val — gender", "## Identification", "](det.png)", "](cmc.png)",
              "](tpr_by_condition.png)", "](roc.png)"):
        assert s in text, s
    last = read_metrics(wd)[-1]
    assert last["source"] == "evaluate"
    for name in ("synth_val", "synth_illum", "synth_clean"):
        for key in ("cmc_rank1", "cmc_rank5", "dir@fpir=1e-1", "auc_ci_low", "auc_ci_high",
                    "tnr@fpr=1e-3", "fairness/tpr_gap_ethnicity@far=1e-2",
                    "fairness/far_gap_gender@eer"):
            assert f"{name}/{key}" in last and f"{name}/{key}" in res
        assert 0.0 <= last[f"{name}/cmc_rank1"] <= last[f"{name}/cmc_rank5"] <= 1.0
    assert "synth_clean/condition/normal/auc" in last
    np.testing.assert_allclose(last["synth_val/auc_ci_low"], trained["synth_val/auc_ci_low"],
                               atol=1e-6)
