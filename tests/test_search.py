"""lowlight.eval.search: the bfloat16 screen's error bound, and screened search equal to the
float32 pass (which tests/test_eval_identification.py checks against float64 numpy)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowlight.eval import search


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _screen_vs_exact(q, g, normalize):
    """(|screen score - float64 score|, delta) for every (probe, gallery) pair."""
    index = search.index_gallery(g, normalize=normalize)
    qn = np.asarray(q / search._row_norms(q)) if normalize else q
    gn = np.asarray(g / index.norms) if normalize else g
    approx = np.asarray(jax.lax.dot_general(jnp.asarray(qn, jnp.bfloat16), index.screen,
                                            (((1,), (1,)), ((), ())),
                                            preferred_element_type=jnp.float32))
    exact = qn.astype(np.float64) @ gn.astype(np.float64).T
    delta = np.asarray(search._delta(jnp.asarray(qn), index.err_norm, index.screen_norm))
    return np.abs(approx - exact), delta[:, None]


def test_bf16_conversion_rounds_to_nearest():
    """The bound's E = 2^-8 |g| assumes round-to-nearest (truncation errs up to 2^-7): values
    just above a rounding midpoint must round up, just below it down."""
    one_ulp = 2.0**-7  # bf16 spacing in [1, 2)
    for frac, up in ((0.5 + 2.0**-12, True), (0.5 - 2.0**-12, False)):
        x = np.float32(1.0 + frac * one_ulp) * np.float32([1.0, -2.0, 2.0**-20, 2.0**30])
        y = np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))
        assert np.all(np.abs(y - x) <= 2.0**-8 * np.abs(x))
        assert np.all((np.abs(y) > np.abs(x)) == up)


@pytest.mark.parametrize("normalize", [True, False])
def test_screen_error_is_within_the_certificate_bound(normalize):
    rng = np.random.default_rng(0)
    d = 512
    q = rng.standard_normal((16, d)).astype(np.float32) * (1.0 if normalize else 3.0)
    g = rng.standard_normal((300, d)).astype(np.float32)
    # adversarial rows: every component just below a bf16 rounding midpoint and of one sign,
    # so all rounding errors add up (the case Cauchy-Schwarz in the bound is tight for)
    mid = np.float32(1.0 + 2.0**-8 - 2.0**-20)
    g[:4] = mid * rng.choice([1.0, 2.0, 0.5], (4, d))
    q[:4] = mid * rng.choice([1.0, 2.0, 0.5], (4, d))
    err, delta = _screen_vs_exact(q, g, normalize)
    assert np.all(err <= delta)
    # and not vacuous: the adversarial pairs use a good part of it (random ones ~ 1/30)
    assert (err[:4, :4] / delta[:4]).max() > 0.2
    # ~ 2 bf16 unit roundoffs (2^-8 each) relative to |q| max|g|
    scale = np.linalg.norm(q, axis=1) * np.linalg.norm(g, axis=1).max() if not normalize else 1.0
    assert (delta[:, 0] / scale < 0.01).all()


@pytest.mark.parametrize("normalize", [True, False])
def test_screened_search_equals_float32_pass_and_is_mostly_certified(normalize):
    rng = np.random.default_rng(1)
    p, g = rng.standard_normal((70, 64)), rng.standard_normal((20_000, 64))
    kw = dict(normalize=normalize, probe_batch=32, gallery_chunk=4096)
    stats = {}
    s, i = search.topk_similarity(p, g, 10, screen=True, stats=stats, **kw)
    rs, ri = search.topk_similarity(p, g, 10, screen=False, **kw)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_allclose(s, rs, rtol=1e-6, atol=2e-6)
    assert stats["screened"] == 70
    # the screen path itself answers most rows (64-d random data is harder than 512-d faces)
    assert stats["fallback"] <= 14, stats


def test_rows_the_screen_cannot_order_fall_back_to_the_exact_pass():
    """200 gallery rows equal in bfloat16 but not in float32: the screen cannot tell which is
    best and keeps the first 64 (lowest indices); the true best is row 150. The certificate
    must reject the screen's answer, and the float32 pass must find row 150."""
    rng = np.random.default_rng(2)
    d = 32
    base = _unit(rng.standard_normal((1, d)))[0]
    base = np.asarray(jnp.asarray(base).astype(jnp.bfloat16).astype(jnp.float32))
    g = np.tile(base, (300, 1))
    g[200:] = -base  # far away
    bump = np.zeros(d, np.float32)
    j = int(np.argmax(np.abs(base)))
    bump[j] = np.sign(base[j]) * np.abs(base[j]) * 2.0**-12  # below bf16 resolution
    g[150] += bump
    q = base[None, :].copy()
    stats = {}
    s, i = search.topk_similarity(q, g, 1, normalize=False, screen=True, stats=stats)
    assert i[0, 0] == 150 and stats["fallback"] == 1
    # the screen alone would have answered row 0 (rejected by the certificate)
    index = search.index_gallery(g, normalize=False)
    _, si, ok = search._screened_block(jnp.asarray(q), index.screen, index.gallery, None,
                                       index.err_norm, index.screen_norm, k=1, kk=64, chunk=300)
    assert int(si[0, 0]) != 150 and not bool(ok[0])


def test_integer_ties_stay_in_gallery_order_when_screened():
    # small integers: exact in bf16 and float32, many ties; the order must be by index
    rng = np.random.default_rng(3)
    p = rng.integers(-2, 3, (9, 12)).astype(np.float32)
    g = rng.integers(-2, 3, (3001, 12)).astype(np.float32)
    s, i = search.topk_similarity(p, g, 7, normalize=False, screen=True, gallery_chunk=512)
    full_s, full_i = jax.lax.top_k(p @ g.T, 7)
    np.testing.assert_array_equal(i, np.asarray(full_i))
    np.testing.assert_array_equal(s, np.asarray(full_s))


def test_rank_identities_screened_equals_exact():
    rng = np.random.default_rng(4)
    g = rng.standard_normal((6000, 48)).astype(np.float32)
    labels = rng.integers(0, 1500, 6000)
    p = g[:40] + 0.3 * rng.standard_normal((40, 48)).astype(np.float32)
    a = search.rank_identities(p, g, labels, 5, screen=True, gallery_chunk=2048)
    b = search.rank_identities(p, g, labels, 5, screen=False, gallery_chunk=2048)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(a[0], b[0], atol=2e-6)
    assert (a[1][:, 0] == labels[:40]).mean() > 0.9


def test_search_index_is_reused_and_checked():
    rng = np.random.default_rng(5)
    g = rng.standard_normal((5000, 32)).astype(np.float32)
    p = rng.standard_normal((10, 32)).astype(np.float32)
    index = search.index_gallery(g, normalize=True)
    assert index.screen.dtype == jnp.bfloat16 and index.screen.shape == g.shape
    assert index.err_norm == pytest.approx(2.0**-8) and index.normalize
    assert index.screen_norm == pytest.approx(1.0 + 2.0**-8)
    a = search.topk_similarity(p, index, 5, screen=True)
    b = search.topk_similarity(p, g, 5, screen=False)
    np.testing.assert_array_equal(a[1], b[1])
    with pytest.raises(ValueError, match="normalize=True.*normalize=False"):
        search.topk_similarity(p, index, 5, normalize=False)
    with pytest.raises(ValueError, match=r"\(G, D\)"):
        search.index_gallery(g[0])
