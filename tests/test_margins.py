"""Golden values for lowlight.losses.margins against float64 numpy transcriptions of the official
code (insightface arcface_torch losses.py / original ArcFace, AdaFace head.py, MagFace
models/magface.py), written here independently of the implementation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowlight.losses import margins

S = 64.0

# --------------------------------------------------------------------------------------------
# numpy references (float64), transcribed from the official PyTorch code
# --------------------------------------------------------------------------------------------


def ref_arcface_torch(cos, labels, s=64.0, m=0.5):
    """arcface_torch CombinedMarginLoss (m1=1, m3=0): in-place arccos, +m on target, cos."""
    logits = np.clip(np.array(cos, np.float64), -1, 1)  # partial_fc clamps before the margin
    index = np.where(labels != -1)[0]
    logits = np.arccos(logits)
    logits[index, labels[index]] += m
    return np.cos(logits) * s


def ref_arcface_original(cos, labels, s=64.0, m=0.5, easy_margin=False):
    """Original insightface ArcFace: cos_m/sin_m product form with th/mm fallback."""
    logits = np.array(cos, np.float64)
    index = np.where(labels != -1)[0]
    target = logits[index, labels[index]]
    sin_theta = np.sqrt(1.0 - target**2)
    cos_theta_m = target * math.cos(m) - sin_theta * math.sin(m)
    if easy_margin:
        final = np.where(target > 0, cos_theta_m, target)
    else:
        final = np.where(
            target > math.cos(math.pi - m), cos_theta_m, target - math.sin(math.pi - m) * m
        )
    logits[index, labels[index]] = final
    return logits * s


def ref_cosface(cos, labels, s=64.0, m=0.4):
    logits = np.array(cos, np.float64)
    index = np.where(labels != -1)[0]
    logits[index, labels[index]] -= m
    return logits * s


def ref_adaface(cos, norms, labels, batch_mean, batch_std, s=64.0, m=0.4, h=0.333, t_alpha=0.01):
    eps = 1e-3
    cosine = np.clip(np.array(cos, np.float64), -1 + eps, 1 - eps)
    safe_norms = np.clip(np.array(norms, np.float64).reshape(-1, 1), 0.001, 100)
    mean = safe_norms.mean()
    std = safe_norms.std(ddof=1)  # torch.Tensor.std is unbiased
    batch_mean = mean * t_alpha + (1 - t_alpha) * batch_mean
    batch_std = std * t_alpha + (1 - t_alpha) * batch_std
    margin_scaler = (safe_norms - batch_mean) / (batch_std + eps)
    margin_scaler = np.clip(margin_scaler * h, -1, 1)
    m_arc = np.zeros_like(cosine)
    rows = np.where(labels != -1)[0]
    m_arc[rows, labels[rows]] = 1.0
    g_angular = m * margin_scaler * -1
    m_arc = m_arc * g_angular
    theta = np.arccos(cosine)
    theta_m = np.clip(theta + m_arc, eps, math.pi - eps)
    cosine = np.cos(theta_m)
    m_cos = np.zeros_like(cosine)
    m_cos[rows, labels[rows]] = 1.0
    g_add = m + m * margin_scaler
    cosine = cosine - m_cos * g_add
    return cosine * s, (batch_mean, batch_std)


def ref_magface(
    cos, norms, labels, s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, easy_margin=True
):
    x_norm = np.clip(np.array(norms, np.float64).reshape(-1, 1), l_a, u_a)
    ada_margin = (u_m - l_m) / (u_a - l_a) * (x_norm - l_a) + l_m
    cos_m, sin_m = np.cos(ada_margin), np.sin(ada_margin)
    cos_theta = np.clip(np.array(cos, np.float64), -1, 1)
    sin_theta = np.sqrt(1.0 - cos_theta**2)
    cos_theta_m = cos_theta * cos_m - sin_theta * sin_m
    if easy_margin:
        cos_theta_m = np.where(cos_theta > 0, cos_theta_m, cos_theta)
    else:
        mm = np.sin(math.pi - ada_margin) * ada_margin
        threshold = np.cos(math.pi - ada_margin)
        cos_theta_m = np.where(cos_theta > threshold, cos_theta_m, cos_theta - mm)
    one_hot = np.zeros_like(cos_theta)
    rows = np.where(labels != -1)[0]
    one_hot[rows, labels[rows]] = 1.0
    output = one_hot * s * cos_theta_m + (1.0 - one_hot) * s * cos_theta
    g = 1 / (u_a**2) * x_norm[:, 0] + 1 / x_norm[:, 0]
    return output, g


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# --------------------------------------------------------------------------------------------
# a hard case: target cosines near ±1, θ+m>π, negative, label -1; norms outside clamp ranges
# --------------------------------------------------------------------------------------------

TARGETS = np.array([0.9999, -0.9999, -0.95, -0.3, 0.2, 0.7, 0.5, -0.5])
LABELS = np.array([0, 3, 1, 4, 2, -1, 4, 0])
NORMS = np.array([0.0005, 5.0, 23.0, 150.0, 60.0, 110.0, 9.0, 35.0])


def hard_case(dtype=np.float32):
    rng = np.random.default_rng(0)
    cos = rng.uniform(-0.8, 0.8, size=(8, 5))
    rows = np.where(LABELS >= 0)[0]
    cos[rows, LABELS[rows]] = TARGETS[rows]
    cos[5, 2] = 0.99995  # a non-target near 1 in the label -1 row
    # Round to the working dtype first so the references see the same inputs.
    cos = cos.astype(dtype)
    return cos, LABELS.copy(), NORMS.astype(dtype)


@pytest.fixture(params=["float32", "float64"])
def precision(request):
    if request.param == "float64":
        with jax.enable_x64(True):
            yield np.float64, dict(rtol=1e-10, atol=1e-9)
    else:
        yield np.float32, dict(rtol=2e-5, atol=3e-4)


# --------------------------------------------------------------------------------------------
# forward values
# --------------------------------------------------------------------------------------------


def test_arcface_default_matches_arcface_torch(precision):
    dtype, tol = precision
    cos, labels, _ = hard_case(dtype)
    got = np.asarray(jax.jit(margins.arcface)(cos, labels))
    assert got.dtype == dtype
    np.testing.assert_allclose(got, ref_arcface_torch(cos, labels), **tol)
    # θ + m > π has no fallback by default: cos(θ + m) rises again.
    theta = math.acos(float(cos[2, 1]))
    assert theta + 0.5 > math.pi
    np.testing.assert_allclose(got[2, 1], S * math.cos(theta + 0.5), rtol=1e-5)
    # label -1 row: plain s·cos, even its near-1 entry.
    np.testing.assert_allclose(got[5], S * cos[5].astype(np.float64), **tol)


def test_arcface_fallback_and_easy_margin_match_original(precision):
    dtype, tol = precision
    cos, labels, _ = hard_case(dtype)
    for kw, ref_kw in [
        (dict(fallback=True), {}),
        (dict(easy_margin=True), dict(easy_margin=True)),
        (dict(easy_margin=True, fallback=True), dict(easy_margin=True)),
    ]:
        for st in (True, False):
            got = np.asarray(margins.arcface(cos, labels, straight_through=st, **kw))
            np.testing.assert_allclose(got, ref_arcface_original(cos, labels, **ref_kw), **tol)
    got = np.asarray(margins.arcface(cos, labels, fallback=True))
    np.testing.assert_allclose(got[2, 1], S * (cos[2, 1] - math.sin(0.5) * 0.5), rtol=1e-5)


def test_arcface_clip_at_exactly_one_is_bounded():
    cos = np.array([[1.0, 0.1], [0.2, -1.0]], np.float32)
    labels = np.array([0, 1])
    got = np.asarray(margins.arcface(cos, labels))
    ref = ref_arcface_torch(cos, labels)
    assert np.all(np.isfinite(got))
    # Documented: the 1e-7 clip moves θ by at most arccos(1 - 1e-7) ≈ 4.5e-4 rad.
    np.testing.assert_allclose(got, ref, atol=S * 5e-4)
    g = jax.grad(lambda c: margins.arcface(c, labels, straight_through=False).sum())(cos)
    assert np.all(np.isfinite(np.asarray(g)))


def test_arcface_paper_defaults():
    cos = np.array([[0.6, 0.1]], np.float32)
    got = np.asarray(margins.arcface(cos, np.array([0])))
    np.testing.assert_allclose(got[0, 0], 64 * math.cos(math.acos(0.6) + 0.5), rtol=1e-5)


def test_cosface(precision):
    dtype, tol = precision
    cos, labels, _ = hard_case(dtype)
    got = np.asarray(jax.jit(margins.cosface)(cos, labels))
    np.testing.assert_allclose(got, ref_cosface(cos, labels), **tol)
    got = np.asarray(margins.cosface(cos, labels, s=30.0, m=0.35))
    np.testing.assert_allclose(got, ref_cosface(cos, labels, s=30.0, m=0.35), **tol)


def test_adaface_matches_head_py(precision):
    dtype, tol = precision
    cos, labels, norms = hard_case(dtype)
    stats = margins.ADAFACE_INITIAL_STATS
    assert stats == (20.0, 100.0)
    fn = jax.jit(margins.adaface)
    for t_alpha, h in [(0.01, 0.333), (1.0, 0.333), (0.5, 1.0)]:
        logits, new = fn(cos, norms, labels, stats, t_alpha=t_alpha, h=h)
        ref, ref_stats = ref_adaface(cos, norms, labels, *stats, t_alpha=t_alpha, h=h)
        np.testing.assert_allclose(np.asarray(logits), ref, **tol)
        np.testing.assert_allclose([float(new[0]), float(new[1])], ref_stats, rtol=1e-6)
    # Whole-matrix θ clip: the label -1 row's near-1 entry is *not* s·cos.
    logits, _ = fn(cos, norms, labels, stats)
    expected = S * math.cos(max(math.acos(min(float(cos[5, 2]), 1 - 1e-3)), 1e-3))
    np.testing.assert_allclose(float(logits[5, 2]), expected, rtol=1e-6)
    assert abs(float(logits[5, 2]) - S * float(cos[5, 2])) > 1e-3


def test_adaface_stats_update_ddof1_and_chaining():
    rng = np.random.default_rng(1)
    norms = rng.uniform(5, 60, size=(16,))
    cos = rng.uniform(-1, 1, size=(16, 7)).astype(np.float32)
    labels = rng.integers(0, 7, size=16)
    stats = margins.ADAFACE_INITIAL_STATS
    np_mean, np_std = stats
    for _ in range(3):
        _, stats = margins.adaface(cos, norms, labels, stats, t_alpha=0.01)
        np_mean = 0.01 * norms.mean() + 0.99 * np_mean
        np_std = 0.01 * norms.std(ddof=1) + 0.99 * np_std
    np.testing.assert_allclose([float(stats[0]), float(stats[1])], [np_mean, np_std], rtol=1e-5)
    _, (_, std1) = margins.adaface(cos, norms, labels, (0.0, 0.0), t_alpha=1.0)
    np.testing.assert_allclose(float(std1), norms.std(ddof=1), rtol=1e-5)
    assert not np.isclose(float(std1), norms.std(ddof=0), rtol=1e-3)


def test_magface_matches_official(precision):
    dtype, tol = precision
    cos, labels, norms = hard_case(dtype)
    norms = norms * 2  # spread over and beyond [10, 110]
    for easy in (True, False):
        logits, g = jax.jit(margins.magface, static_argnames="easy_margin")(
            cos, norms, labels, easy_margin=easy
        )
        ref, ref_g = ref_magface(cos, norms, labels, easy_margin=easy)
        np.testing.assert_allclose(np.asarray(logits), ref, **tol)
        np.testing.assert_allclose(np.asarray(g), ref_g, rtol=1e-6)
    assert g.shape == (8,)
    # norms clamped: below l_a behaves as l_a, above u_a as u_a
    _, g = margins.magface(cos, np.array([1.0, 10.0, 500.0, 110.0, 50, 50, 50, 50]), labels)
    assert float(g[0]) == pytest.approx(float(g[1])) and float(g[2]) == pytest.approx(float(g[3]))
    assert margins.MAGFACE_LAMBDA_G == 35.0
    assert margins.magface_min_lambda_g() == pytest.approx(
        64 * 0.35 / 100 * 110**2 * 10**2 / (110**2 - 10**2)
    )
    assert margins.magface_min_lambda_g() < margins.MAGFACE_LAMBDA_G


def test_magface_exact_plus_minus_one():
    cos = np.array([[1.0, -1.0, 0.3], [-1.0, 1.0, 0.0]], np.float32)
    labels = np.array([0, 0])
    norms = np.array([50.0, 50.0], np.float32)
    logits, _ = margins.magface(cos, norms, labels)
    np.testing.assert_allclose(
        np.asarray(logits), ref_magface(cos, norms, labels)[0], rtol=1e-5, atol=1e-4
    )
    gc, gn = jax.grad(lambda c, n: margins.magface(c, n, labels)[0].sum(), argnums=(0, 1))(
        cos, norms
    )
    assert np.all(np.isfinite(np.asarray(gc))) and np.all(np.isfinite(np.asarray(gn)))


# --------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------


def test_arcface_straight_through_gradient():
    cos, labels, _ = hard_case(np.float32)
    ce = lambda c, st: margins.softmax_cross_entropy(
        margins.arcface(c, labels, straight_through=st), labels
    )
    grad_st = np.asarray(jax.grad(ce)(cos, True), np.float64)
    logits = ref_arcface_torch(cos, labels)
    onehot = np.zeros_like(logits)
    valid = labels >= 0
    onehot[np.where(valid)[0], labels[valid]] = 1
    expected = S * (np_softmax(logits) - onehot) * valid[:, None] / valid.sum()
    np.testing.assert_allclose(grad_st, expected, rtol=1e-4, atol=1e-6)

    grad_exact = np.asarray(jax.grad(ce)(cos, False), np.float64)
    # exact: d s·cos(θ+m)/d cos = s·sin(θ+m)/sin θ on the target column
    rows = np.where(valid)[0]
    c = cos[rows, labels[rows]].astype(np.float64)
    theta = np.arccos(c)
    factor = np.ones_like(expected)
    factor[rows, labels[rows]] = np.sin(theta + 0.5) / np.sin(theta)
    np.testing.assert_allclose(grad_exact, expected * factor, rtol=2e-3, atol=1e-6)
    # same off-target, different on target
    off = onehot == 0
    np.testing.assert_allclose(grad_exact[off], grad_st[off], rtol=1e-5, atol=1e-7)
    assert np.max(np.abs(grad_exact - grad_st)) > 1e-2


def test_adaface_no_gradient_through_norms():
    cos, labels, norms = hard_case(np.float32)
    w = np.random.default_rng(2).normal(size=cos.shape).astype(np.float32)
    f = lambda c, n: jnp.sum(w * margins.adaface(c, n, labels, margins.ADAFACE_INITIAL_STATS)[0])
    gc, gn = jax.grad(f, argnums=(0, 1))(cos, norms)
    np.testing.assert_array_equal(np.asarray(gn), 0.0)
    assert np.abs(np.asarray(gc)).sum() > 0


def test_magface_gradient_flows_through_norms():
    with jax.enable_x64(True):
        cos, labels, _ = hard_case(np.float64)
        norms = np.array([5.0, 20.0, 30.0, 45.0, 60.0, 70.0, 120.0, 90.0])
        w = np.random.default_rng(3).normal(size=cos.shape)

        def f(n):
            logits, g = margins.magface(cos, n, labels)
            return jnp.sum(w * logits) + margins.MAGFACE_LAMBDA_G * jnp.mean(g)

        grad = np.asarray(jax.grad(f)(norms))
        eps = 1e-5  # f is O(100): central differences carry ~1e-9 of rounding noise
        num = np.array([(f(norms + eps * e) - f(norms - eps * e)) / (2 * eps) for e in np.eye(8)])
        np.testing.assert_allclose(grad, num, rtol=1e-5, atol=1e-7)
        assert grad[0] == 0 and grad[6] == 0  # outside [l_a, u_a]: clamped, no gradient
        assert np.all(grad[1:6] != 0)


# --------------------------------------------------------------------------------------------
# cross-entropy, shapes, sharding
# --------------------------------------------------------------------------------------------


def test_softmax_cross_entropy_label_minus_one():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(5, 6)) * 3
    labels = np.array([1, -1, 5, 0, -1])
    per_row = np.asarray(margins.softmax_cross_entropy(logits, labels, reduction="none"))
    logp = np.log(np_softmax(logits))
    expected = np.array([-logp[0, 1], 0.0, -logp[2, 5], -logp[3, 0], 0.0])
    np.testing.assert_allclose(per_row, expected, rtol=1e-5)
    mean = float(margins.softmax_cross_entropy(logits, labels))
    np.testing.assert_allclose(mean, expected.sum() / 3, rtol=1e-5)
    assert float(margins.softmax_cross_entropy(logits, -np.ones(5, int))) == 0.0
    g = jax.grad(lambda x: margins.softmax_cross_entropy(x, labels))(logits.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(g)[[1, 4]], 0.0)
    with pytest.raises(ValueError):
        margins.softmax_cross_entropy(logits, labels, reduction="sum")


def test_shapes_bf16_and_single_column():
    cos = jnp.asarray([[0.3], [0.1]], jnp.bfloat16)
    labels = jnp.asarray([0, -1])
    for out in (
        margins.arcface(cos, labels),
        margins.cosface(cos, labels),
        margins.adaface(cos, jnp.ones(2) * 20, labels, (20.0, 100.0))[0],
        margins.magface(cos, jnp.ones(2) * 20, labels)[0],
    ):
        assert out.shape == (2, 1) and out.dtype == jnp.float32
    np.testing.assert_allclose(
        float(margins.arcface(cos, labels)[1, 0]), S * float(cos[1, 0]), rtol=1e-6
    )


def test_sharded_columns_match_unsharded():
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    devices = np.array(jax.devices()[:8]).reshape(2, 4)
    mesh = Mesh(devices, ("data", "model"))
    rng = np.random.default_rng(5)
    cos = rng.uniform(-1, 1, size=(4, 16)).astype(np.float32)
    labels = np.array([3, 15, -1, 8])
    norms = rng.uniform(10, 40, size=(4,)).astype(np.float32)
    cos_s = jax.device_put(cos, NamedSharding(mesh, P("data", "model")))
    lab_s = jax.device_put(labels, NamedSharding(mesh, P("data")))
    norms_s = jax.device_put(norms, NamedSharding(mesh, P("data")))
    np.testing.assert_allclose(
        np.asarray(jax.jit(margins.arcface)(cos_s, lab_s)),
        np.asarray(margins.arcface(cos, labels)),
        rtol=1e-6,
    )
    a, st = jax.jit(margins.adaface)(cos_s, norms_s, lab_s, (20.0, 100.0))
    b, st_ref = margins.adaface(cos, norms, labels, (20.0, 100.0))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(st[1]), float(st_ref[1]), rtol=1e-6)
