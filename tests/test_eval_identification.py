"""lowlight.eval.identification against hand-made cases and brute-force numpy references."""

import functools
import math

import jax
import jax.extend
import numpy as np
import pytest

from lowlight.eval import identification as idn
from lowlight.eval import search


def _ref_topk(p, g, k):
    """Full matrix in float64; order by (score desc, gallery index asc)."""
    full = p.astype(np.float64) @ g.astype(np.float64).T
    cols = np.broadcast_to(np.arange(g.shape[0]), full.shape)
    order = np.lexsort((cols, -full), axis=1)[:, :k]
    return np.take_along_axis(full, order, 1), order


def _ref_identities(p, g, labels, k, normalize=True):
    """Identity score = max over templates; order by (score desc, first best template index)."""
    if normalize:
        p = p / np.linalg.norm(p, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
    full = p.astype(np.float64) @ g.astype(np.float64).T
    ids = np.unique(labels)
    out_s, out_l = [], []
    for row in full:
        best = []
        for i in ids:
            top = row[labels == i].max()
            best.append((-top, np.flatnonzero((labels == i) & (row == top))[0], i))
        best.sort()
        out_s.append([-b[0] for b in best[:k]])
        out_l.append([b[2] for b in best[:k]])
    return np.array(out_s), np.array(out_l)


def _ints(shape, seed):
    # small integers: every dot product is exact in float32, so block sizes cannot change a
    # single bit, and there are many ties to exercise the tie order
    return np.random.default_rng(seed).integers(-2, 3, shape).astype(np.float32)


@pytest.mark.parametrize("probe_batch,gallery_chunk", [(8, 128), (37, 7), (5, 1000), (64, 4096)])
def test_chunked_topk_equals_full_matrix_exactly(probe_batch, gallery_chunk):
    p, g = _ints((37, 12), 0), _ints((1001, 12), 1)  # 1001: not divisible by any chunk
    s, i = idn.topk_similarity(p, g, 10, normalize=False, probe_batch=probe_batch,
                               gallery_chunk=gallery_chunk)
    ref_s, ref_i = _ref_topk(p, g, 10)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_array_equal(s, ref_s.astype(np.float32))
    # and the same as lax.top_k over the whole matrix at once
    full_s, full_i = jax.lax.top_k(p @ g.T, 10)
    np.testing.assert_array_equal(i, np.asarray(full_i))


def test_topk_random_float_data_matches_numpy():
    rng = np.random.default_rng(2)
    p, g = rng.standard_normal((23, 32)), rng.standard_normal((777, 32))
    s, i = idn.topk_similarity(p, g, 5, probe_batch=16, gallery_chunk=100)
    pn = p / np.linalg.norm(p, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    ref_s, ref_i = _ref_topk(pn, gn, 5)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(s, ref_s, atol=1e-5)
    # k larger than the gallery is clamped
    s2, i2 = idn.topk_similarity(p[:3], g[:4], 9)
    assert s2.shape == (3, 4) and sorted(i2[0]) == [0, 1, 2, 3]


def test_no_probe_by_gallery_matrix_is_formed():
    pb, gsize, chunk = 8, 1000, 64
    jaxpr = jax.make_jaxpr(functools.partial(search._exact_block, k=5, chunk=chunk))(
        np.zeros((pb, 4), np.float32), np.zeros((gsize, 4), np.float32),
        np.ones((gsize, 1), np.float32))
    shapes = set()

    def walk(jx):
        for eqn in jx.eqns:
            for v in eqn.outvars:
                shapes.add(tuple(getattr(v.aval, "shape", ())))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    assert (pb, chunk) in shapes
    assert not any(len(s) == 2 and s[0] == pb and s[1] > chunk + 5 for s in shapes)


@pytest.mark.parametrize("gallery_chunk", [13, 5000])
def test_rank_identities_multi_template_exact(gallery_chunk):
    rng = np.random.default_rng(3)
    p, g = _ints((19, 10), 4), _ints((301, 10), 5)
    labels = rng.integers(0, 60, 301)  # up to ~12 templates per identity, many ties
    s, lab = idn.rank_identities(p, g, labels, 7, normalize=False, probe_batch=8,
                                 gallery_chunk=gallery_chunk)
    ref_s, ref_l = _ref_identities(p, g, labels, 7, normalize=False)
    np.testing.assert_array_equal(lab, ref_l)
    np.testing.assert_array_equal(s, ref_s.astype(np.float32))


def test_cmc_hand_case():
    # gallery: identity "a" = e0, "b" = e1, "c" = e2 (string labels work)
    g = np.eye(3)
    gl = np.array(["a", "b", "c"])
    probes = np.array([
        [0.9, 0.1, 0.0],  # a: rank 1
        [0.5, 0.1, 0.8],  # a: c 0.8 > a 0.5 -> rank 2
        [0.5, 0.7, 0.6],  # a: b > c > a -> rank 3
        [0.0, 1.0, 0.2],  # b: rank 1
        [0.3, 0.2, 0.1],  # "z": not enrolled, ignored by closed-set CMC
    ])
    pl = np.array(["a", "a", "a", "b", "z"])
    out = idn.cmc(probes, pl, g, gl, ranks=(1, 2, 5))
    assert out["rank-1"] == 0.5 and out["rank-2"] == 0.75 and out["rank-5"] == 1.0
    np.testing.assert_array_equal(out["cmc"], [0.5, 0.75, 1.0, 1.0, 1.0])
    assert out["num_mated"] == 4 and out["num_unmated_ignored"] == 1


def test_cmc_random_against_brute_force():
    rng = np.random.default_rng(6)
    n_id, dim = 40, 16
    centres = rng.standard_normal((n_id, dim))
    gl = np.repeat(np.arange(n_id), 3)[:-2]  # 118 templates, 1-3 per identity
    g = centres[gl] + 1.2 * rng.standard_normal((gl.size, dim))
    pl = rng.integers(0, n_id, 150)
    p = centres[pl] + 1.2 * rng.standard_normal((150, dim))
    out = idn.cmc(p, pl, g, gl, ranks=(1, 5), max_rank=10, probe_batch=32, gallery_chunk=50)
    pn = p / np.linalg.norm(p, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    sim = pn @ gn.T
    per_id = np.stack([sim[:, gl == i].max(1) for i in range(n_id)], 1)
    true = per_id[np.arange(150), pl]
    rank = 1 + np.sum(per_id > true[:, None], axis=1)
    want = [np.mean(rank <= r) for r in range(1, 11)]
    np.testing.assert_allclose(out["cmc"], want)
    assert out["rank-1"] == want[0] and out["rank-5"] == want[4]
    assert 0.2 < out["rank-1"] < out["rank-5"] < 1.0  # a non-trivial case


def test_dir_at_fpir_hand_case():
    # non-mated best scores; FPIR <= 0.2 over 10 non-mated probes allows 2 false positives:
    # tau = 3rd highest = 0.7 (candidates returned when score > 0.7)
    nonmated = [0.95, 0.9, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]
    ranks = [1, 1, 1, 2, 1, np.inf]
    scores = [0.99, 0.8, 0.7, 0.9, 0.71, -np.inf]
    d, tau = idn.dir_at_fpir(ranks, scores, nonmated, 0.2)
    assert tau == 0.7
    assert d == pytest.approx(3 / 6)  # 0.99, 0.8, 0.71 at rank 1 and > 0.7
    d2, _ = idn.dir_at_fpir(ranks, scores, nonmated, 0.2, rank=2)
    assert d2 == pytest.approx(4 / 6)  # + the rank-2 probe at 0.9
    assert idn.dir_at_fpir(ranks, scores, nonmated, 0.0)[1] == 0.95  # FPIR 0: above the max
    d3, tau3 = idn.dir_at_fpir(ranks, scores, nonmated, 1.0)
    assert tau3 == -math.inf and d3 == pytest.approx(4 / 6)  # everything returned, rank 1
    assert idn.dir_at_fpir(ranks, scores, nonmated, 0.3)[1] == 0.6


def test_evaluate_open_set_hand_case():
    g = np.eye(4)
    gl = np.array([10, 11, 12, 13])
    # mated: id 10 at 0.9 (rank 1), id 11 at 0.6 (rank 1), id 12 rank 2
    # non-mated: best scores (normalised) differ
    probes = np.array([
        [0.9, 0.1, 0.0, 0.0],
        [0.0, 0.8, 0.6, 0.0],
        [0.0, 0.8, 0.6, 0.0],
        [0.0, 0.0, 0.0, 1.0],
        [1.0, 1.0, 0.0, 0.0],
    ])
    pl = np.array([10, 11, 12, 99, 98])
    out = idn.evaluate(probes, pl, g, gl, ranks=(1,), fpir_targets=(0.5, 0.1))
    assert out["num_mated"] == 3 and out["num_nonmated"] == 2
    # FPIR <= 0.5 of 2: one false positive allowed -> tau = second highest = 1/sqrt2
    assert out["threshold@fpir=5e-1"] == pytest.approx(1 / math.sqrt(2), rel=1e-6)
    # mated rank-1 scores: 0.9/|.| = 0.9939, 0.8; above 0.7071 both; the third is rank 2
    assert out["dir@fpir=5e-1"] == pytest.approx(2 / 3)
    assert out["fnir@fpir=5e-1"] == pytest.approx(1 / 3)
    assert out["dir@fpir=5e-1/reachable"] is True
    assert out["dir@fpir=1e-1/reachable"] is False  # 2 non-mated probes cannot measure 0.1
    assert out["threshold@fpir=1e-1"] == pytest.approx(1.0)  # FPIR 0: above the best
    assert out["dir@fpir=1e-1"] == 0.0
    assert out["rank-1"] == pytest.approx(2 / 3)


def test_split_gallery_probe():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 50, 600)
    sp = idn.split_gallery_probe(labels, 3, gallery_per_id=2, unknown_fraction=0.2)
    assert np.intersect1d(sp.gallery, sp.probe).size == 0
    np.testing.assert_array_equal(np.sort(np.r_[sp.gallery, sp.probe]), np.arange(600))
    ids, counts = np.unique(labels, return_counts=True)
    enrolled, per = np.unique(labels[sp.gallery], return_counts=True)
    assert ids.size - enrolled.size == round(0.2 * ids.size)
    np.testing.assert_array_equal(per, np.minimum(2, counts[np.isin(ids, enrolled)]))
    np.testing.assert_array_equal(sp.probe_mated, np.isin(labels[sp.probe], enrolled))
    assert (~sp.probe_mated).sum() == np.sum(~np.isin(labels, enrolled))
    again = idn.split_gallery_probe(labels, 3, gallery_per_id=2, unknown_fraction=0.2)
    np.testing.assert_array_equal(again.gallery, sp.gallery)
    other = idn.split_gallery_probe(labels, 4, gallery_per_id=2, unknown_fraction=0.2)
    assert not np.array_equal(other.gallery, sp.gallery)
    closed = idn.split_gallery_probe(labels, 0)
    assert closed.probe_mated.all() and np.unique(labels[closed.gallery]).size == ids.size


def test_evaluate_with_split_end_to_end():
    rng = np.random.default_rng(8)
    n_id = 30
    centres = rng.standard_normal((n_id, 8)) * 3
    labels = np.repeat(np.arange(n_id), 5)
    emb = centres[labels] + rng.standard_normal((labels.size, 8))
    sp = idn.split_gallery_probe(labels, 0, unknown_fraction=0.3)
    out = idn.evaluate(emb[sp.probe], labels[sp.probe], emb[sp.gallery], labels[sp.gallery],
                       fpir_targets=(0.1,), gallery_chunk=16, probe_batch=32)
    assert out["num_mated"] == int(sp.probe_mated.sum())
    assert out["num_nonmated"] == int((~sp.probe_mated).sum())
    assert out["rank-1"] > 0.8 and out["dir@fpir=1e-1"] <= out["rank-1"]
    assert out["dir@fpir=1e-1/reachable"] is True


@pytest.mark.parametrize("block", [1, 4, 8, 16])
def test_blocked_topk_equals_lax_top_k_with_ties(block):
    """Values and indices, ties by lower index, on integer scores with many ties (k up to
    64 // block: a later run with a larger maximum must not put its members before an
    earlier run's equal ones)."""
    rng = np.random.default_rng(11)
    scores = jax.numpy.asarray(rng.integers(0, 6, (7, 64)).astype(np.float32))
    for k in sorted({1, 3, 4, 64 // block // 2, 64 // block}):
        v, i = idn.blocked_topk(scores, k, block)
        rv, ri = jax.lax.top_k(scores, k)
        np.testing.assert_array_equal(np.asarray(v), np.asarray(rv))
        np.testing.assert_array_equal(np.asarray(i), np.asarray(ri))
