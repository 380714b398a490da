"""lowlight.eval.verification against an independent plain-numpy transcription of insightface's
10-fold protocol, sklearn's ROC functions, and hand-checkable cases."""

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from lowlight.eval import verification as ver

# --------------------------------------------------------------------------------------------
# independent reference: insightface verification.py, written out with plain loops
# --------------------------------------------------------------------------------------------


def _ref_calc(threshold, dist, issame):
    predict = dist < threshold
    tp = np.sum(predict & issame)
    tn = np.sum(~predict & ~issame)
    return float(tp + tn) / dist.size


def _ref_val_far(threshold, dist, issame):
    predict = dist < threshold
    return np.sum(predict & issame) / np.sum(issame), np.sum(predict & ~issame) / np.sum(~issame)


def _ref_slinear(x, y, x0):
    # old interp1d(kind='slinear'): stable sort; interval starts at the LAST x <= x0
    o = np.argsort(x, kind="stable")
    x, y = x[o], y[o]
    j = min(int(np.searchsorted(x, x0, side="right")) - 1, len(x) - 2)
    return y[j] + (x0 - x[j]) * (y[j + 1] - y[j]) / (x[j + 1] - x[j])


def ref_insightface(emb1, emb2, issame, nfolds=10):
    e1 = emb1 / np.linalg.norm(emb1, axis=1, keepdims=True)
    e2 = emb2 / np.linalg.norm(emb2, axis=1, keepdims=True)
    dist = np.sum(np.square(e1 - e2), 1)
    n = len(issame)
    test_sets = np.array_split(np.arange(n), nfolds)  # contiguous, first n % k folds one larger
    acc, val, far = [], [], []
    for test in test_sets:
        train = np.setdiff1d(np.arange(n), test)
        thresholds = np.arange(0, 4, 0.01)
        acc_train = np.array([_ref_calc(t, dist[train], issame[train]) for t in thresholds])
        best = np.argmax(acc_train)
        acc.append(_ref_calc(thresholds[best], dist[test], issame[test]))

        thresholds = np.arange(0, 4, 0.001)
        far_train = np.array([_ref_val_far(t, dist[train], issame[train])[1] for t in thresholds])
        thr = _ref_slinear(far_train, thresholds, 1e-3) if far_train.max() >= 1e-3 else 0.0
        v, f = _ref_val_far(thr, dist[test], issame[test])
        val.append(v)
        far.append(f)
    return dict(
        acc=np.mean(acc),
        acc_std=np.std(acc),
        val=np.mean(val),
        val_std=np.std(val),
        far=np.mean(far),
        folds=np.array(acc),
    )


def pairs_with_cosines(cosines):
    """2-D unit embeddings whose pair cosines are exactly as given (up to rounding)."""
    c = np.asarray(cosines, np.float64)
    e1 = np.tile([1.0, 0.0], (c.size, 1))
    e2 = np.stack([c, np.sqrt(1 - c**2)], axis=1)
    return e1, e2


def synthetic_pairs(n_pairs=603, dim=16, seed=0, noise=0.9):
    rng = np.random.default_rng(seed)
    issame = np.zeros(n_pairs, bool)
    issame[rng.permutation(n_pairs)[: n_pairs // 2]] = True
    e1 = rng.normal(size=(n_pairs, dim))
    other = rng.normal(size=(n_pairs, dim))
    e2 = np.where(issame[:, None], e1 + noise * rng.normal(size=(n_pairs, dim)), other)
    # arbitrary positive scales: evaluate must normalise
    return e1 * rng.uniform(0.5, 30, (n_pairs, 1)), e2 * rng.uniform(0.5, 30, (n_pairs, 1)), issame


# --------------------------------------------------------------------------------------------
# the insightface protocol
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_pairs,noise", [(603, 0.9), (600, 1.3)])
def test_kfold_matches_reference(n_pairs, noise):
    e1, e2, issame = synthetic_pairs(n_pairs, noise=noise)
    got = ver.evaluate(e1, e2, issame)
    ref = ref_insightface(e1, e2, issame)
    assert 0.6 < got["acc"] < 0.999  # a non-trivial case
    assert got["acc"] == pytest.approx(ref["acc"], abs=1e-12)
    assert got["acc_std"] == pytest.approx(ref["acc_std"], abs=1e-12)
    assert got["val@far=1e-3"] == pytest.approx(ref["val"], abs=1e-12)
    assert got["val_std"] == pytest.approx(ref["val_std"], abs=1e-12)
    assert got["far"] == pytest.approx(ref["far"], abs=1e-12)
    # std over folds is ddof=0
    assert got["acc_std"] == pytest.approx(np.std(ref["folds"]), abs=1e-12)
    assert got["acc_std"] != pytest.approx(np.std(ref["folds"], ddof=1), abs=1e-9)


def test_first_argmax_and_ddof0_by_hand():
    # 2 contiguous folds: A = [pos d=0.5, neg d=2.0, pos d=0.4], B = [pos d=1.0, neg d=3.0]
    d = np.array([0.5, 2.0, 0.4, 1.0, 3.0])
    e1, e2 = pairs_with_cosines(1 - d / 2)
    issame = np.array([True, False, True, True, False])
    r = ver.evaluate(e1, e2, issame, n_folds=2)
    # test A, thresholds tied on B over (1.0, 3.0]: first is 1.01, all of A right -> 1
    # test B, thresholds tied on A over (0.5, 2.0]: first is 0.51, B's positive missed -> 1/2
    # (the last tied thresholds, 3.0 and 2.0, would give 2/3 and 1)
    assert r["acc"] == pytest.approx(0.75)
    assert r["acc_std"] == pytest.approx(0.25)  # ddof=1 would give 0.354


def test_val_far_exactly_on_target_uses_last_tied_threshold():
    # Each training fold has exactly 1000 negatives, so FAR = 1/1000 == 1e-3 is hit exactly on a
    # run of thresholds; old interp1d('slinear') returns the LAST threshold of that run.
    rng = np.random.default_rng(5)
    blocks = []
    for _ in range(2):
        neg = np.r_[0.3, rng.uniform(1.0, 3.5, 999)]  # one close negative per fold
        pos = rng.uniform(0.05, 1.2, 100)
        blocks.append((np.r_[pos, neg], np.r_[np.ones(100, bool), np.zeros(1000, bool)]))
    d = np.concatenate([b[0] for b in blocks])
    issame = np.concatenate([b[1] for b in blocks])
    e1, e2 = pairs_with_cosines(1 - d / 2)
    got = ver.evaluate(e1, e2, issame, n_folds=2)
    ref = ref_insightface(e1, e2, issame, nfolds=2)
    assert got["val@far=1e-3"] == pytest.approx(ref["val"], abs=1e-12)
    assert got["far"] == pytest.approx(ref["far"], abs=1e-12)
    # the last threshold with FAR 1e-3 lies just below the second-closest negative (>= 1.0),
    # so every positive below 1.0 is accepted; the first one (0.301) would accept far fewer.
    assert got["val@far=1e-3"] > np.mean(d[issame] < 1.0) - 1e-9


def test_strict_less_than():
    # two positives at squared distance exactly 2.0 (= a grid threshold), one negative at 2.005:
    # with 'dist < t' no grid threshold separates them; with '<=' t=2.0 would.
    e1 = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    c = -0.0025
    e2 = np.array([[0.0, 1.0], [1.0, 0.0], [c, math.sqrt(1 - c * c)]])
    issame = np.array([True, True, False])
    assert np.sum((e1[0] - e2[0]) ** 2) == 2.0 and np.arange(0, 4, 0.01)[200] == 2.0
    r = ver.evaluate(e1, e2, issame, n_folds=1)
    assert r["acc"] == pytest.approx(2 / 3)


def test_val_threshold_zero_when_far_never_reaches_target():
    # positives identical (d = 0), negatives opposite (d = 4 > every threshold): FAR is always 0
    # on the training folds, so insightface uses threshold 0 and '0 < 0' accepts nothing.
    rng = np.random.default_rng(1)
    e1 = rng.normal(size=(40, 8))
    issame = np.arange(40) % 2 == 0
    e2 = np.where(issame[:, None], e1, -e1)
    r = ver.evaluate(e1, e2, issame)
    assert r["val@far=1e-3"] == 0.0 and r["far"] == 0.0 and r["val_std"] == 0.0
    assert r["acc"] == 1.0 and r["acc_std"] == 0.0


def test_perfectly_separable():
    rng = np.random.default_rng(2)
    e1 = np.eye(20)
    issame = np.arange(20) < 10
    e2 = np.where(issame[:, None], e1 * rng.uniform(1, 5, (20, 1)), np.roll(np.eye(20), 1, axis=1))
    r = ver.evaluate(e1, e2, issame)
    assert r["acc"] == 1.0 and r["acc_std"] == 0.0
    assert r["auc"] == 1.0 and r["eer"] == 0.0
    for x in ("1e-3", "1e-4", "1e-5"):
        assert r[f"tpr@fpr={x}"] == 1.0
        assert r[f"tpr@fpr={x}/reachable"] is False  # only 10 negatives
    assert r["num_pos"] == 10 and r["num_neg"] == 10
    assert r["best_threshold_acc"] == 1.0
    assert r["best_threshold"] == pytest.approx(1.0)


def test_identical_scores():
    e = np.tile([[0.6, 0.8]], (10, 1))
    issame = np.arange(10) % 2 == 0
    r = ver.evaluate(e, e * 3, issame, n_folds=5)
    assert r["auc"] == 0.5 and r["eer"] == 0.5
    assert r["tpr@fpr=1e-3"] == 0.0
    # all distances 0: threshold 0 rejects all, 0.01 accepts all; the tie goes to the first
    assert r["acc"] == pytest.approx(ref_insightface(e, e * 3, issame, nfolds=5)["acc"])


# --------------------------------------------------------------------------------------------
# ROC helpers
# --------------------------------------------------------------------------------------------

HAND_SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
HAND_SAME = np.array([1, 1, 0, 1, 0, 0], bool)


def test_roc_hand_case():
    fpr, tpr, thr = ver.roc(HAND_SCORES[::-1], HAND_SAME[::-1])  # order must not matter
    np.testing.assert_allclose(fpr, [0, 0, 0, 1 / 3, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 2 / 3, 1, 1, 1])
    assert np.isinf(thr[0]) and list(thr[1:]) == list(HAND_SCORES)
    assert ver.tpr_at_fpr(fpr, tpr, 0.0) == pytest.approx(2 / 3)
    assert ver.tpr_at_fpr(fpr, tpr, 0.3) == pytest.approx(2 / 3)
    assert ver.tpr_at_fpr(fpr, tpr, 1 / 3) == pytest.approx(1.0)  # FPR <= x, inclusive
    assert ver.eer(fpr, tpr) == pytest.approx(1 / 3)
    assert np.trapezoid(tpr, fpr) == pytest.approx(8 / 9)


def test_evaluate_hand_case_best_threshold():
    e1, e2 = pairs_with_cosines(HAND_SCORES)
    r = ver.evaluate(e1, e2, HAND_SAME, n_folds=2)
    assert r["auc"] == pytest.approx(8 / 9) and r["eer"] == pytest.approx(1 / 3)
    assert r["tpr@fpr=1e-3"] == pytest.approx(2 / 3)
    assert r["tpr@fpr=1e-3/reachable"] is False
    # accuracy at 0.9/0.8/0.7/0.6: 4/6, 5/6, 4/6, 5/6 -> first maximum, 0.8
    assert r["best_threshold"] == pytest.approx(0.8) and r["best_threshold_acc"] == pytest.approx(
        5 / 6
    )
    assert r["num_pos"] == 3 and r["num_neg"] == 3


def test_eer_interpolates_and_handles_vertical_segments():
    # ROC (0,0) -> (0.5,0) -> (0.5,1) -> (1,1): the crossing is on the vertical segment
    assert ver.eer(np.array([0, 0.5, 0.5, 1]), np.array([0, 0, 1, 1])) == pytest.approx(0.5)
    # (0,0) -> (0.2,0.6) -> (0.4,0.7) -> (1,1): 1-tpr-fpr = 1, 0.2, -0.1 -> crossing 2/3 along
    eer = ver.eer(np.array([0, 0.2, 0.4, 1]), np.array([0, 0.6, 0.7, 1]))
    assert eer == pytest.approx(0.2 + (0.2 / 0.3) * 0.2)


def test_roc_matches_sklearn_with_ties_and_reachability():
    rng = np.random.default_rng(3)
    num_neg, num_pos = 1000, 200
    issame = np.r_[np.zeros(num_neg, bool), np.ones(num_pos, bool)]
    scores = np.round(np.r_[rng.normal(0, 1, num_neg), rng.normal(2, 1, num_pos)], 1)  # ties
    fpr, tpr, thr = ver.roc(scores, issame)
    sk_fpr, sk_tpr, sk_thr = roc_curve(issame, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thr[1:], sk_thr[1:])
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(issame, scores), abs=1e-12)
    for x in (1e-3, 1e-4, 5e-3):
        assert ver.tpr_at_fpr(fpr, tpr, x) == pytest.approx(np.max(sk_tpr[sk_fpr <= x]))

    # through evaluate: cosines in [-1, 1]
    cos = np.tanh(scores / 3)
    e1, e2 = pairs_with_cosines(cos)
    r = ver.evaluate(e1, e2, issame)
    assert r["auc"] == pytest.approx(roc_auc_score(issame, cos), abs=1e-9)
    assert r["tpr@fpr=1e-3/reachable"] is True  # 1/1000 <= 1e-3
    assert r["tpr@fpr=1e-4/reachable"] is False and r["tpr@fpr=1e-5/reachable"] is False
    sk_fpr, sk_tpr, _ = roc_curve(issame, np.sum(e1 * e2, 1), drop_intermediate=False)
    assert r["tpr@fpr=1e-3"] == pytest.approx(np.max(sk_tpr[sk_fpr <= 1e-3]))
    assert r["tpr@fpr=1e-4"] == pytest.approx(np.max(sk_tpr[sk_fpr == 0]))


def test_api_keys_and_errors():
    e1, e2, issame = synthetic_pairs(100)
    r = ver.evaluate(e1, e2, issame)
    for k in (
        "acc",
        "acc_std",
        "val@far=1e-3",
        "val_std",
        "far",
        "auc",
        "eer",
        "tpr@fpr=1e-3",
        "tpr@fpr=1e-4",
        "tpr@fpr=1e-5",
        "best_threshold",
        "num_pos",
        "num_neg",
    ):
        assert k in r
    assert all(isinstance(v, (float, int, bool)) for v in r.values())
    with pytest.raises(ValueError):
        ver.evaluate(e1, e2, np.ones(100, bool))  # no negatives
    with pytest.raises(ValueError):
        ver.evaluate(e1, e2[:-1], issame)


# --------------------------------------------------------------------------------------------
# embedding helpers
# --------------------------------------------------------------------------------------------


def test_flip_tta_mirrors_width():
    images = np.arange(2 * 3 * 4 * 1, dtype=np.float32).reshape(2, 3, 4, 1)  # (B, H, W, C)
    embed = lambda im: im[:, 0, :, 0]  # first image row as the "embedding"
    out = ver.flip_tta(embed, images)
    np.testing.assert_array_equal(out, images[:, 0, :, 0] + images[:, 0, ::-1, 0])
    import jax.numpy as jnp

    out_j = ver.flip_tta(embed, jnp.asarray(images))
    np.testing.assert_array_equal(np.asarray(out_j), out)


def test_pair_embeddings():
    embs = np.arange(12).reshape(6, 2)
    a, b = ver.pair_embeddings(embs)
    np.testing.assert_array_equal(a, embs[[0, 2, 4]])
    np.testing.assert_array_equal(b, embs[[1, 3, 5]])
    a, b = ver.pair_embeddings(embs, [5, 0], [1, 1])
    np.testing.assert_array_equal(a, embs[[5, 0]])
    np.testing.assert_array_equal(b, embs[[1, 1]])
    with pytest.raises(ValueError):
        ver.pair_embeddings(embs, [0])
