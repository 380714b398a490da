"""Relighting network (paper B §3.4), its L1 + SSIM loss, and the relighting metrics."""

import math

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from skimage.metrics import structural_similarity

from lowlight import models
from lowlight.data import normalize
from lowlight.data.synthetic import SynthFaces
from lowlight.eval import relight_metrics as rm
from lowlight.losses import reconstruction as rec
from lowlight.models import relight as rl
from lowlight.models.layers import count_params, param_shapes

PAPER_B_PARAMS = 1_185_814  # width 208: 27·208² + 85·208 + 6


def _smooth(rng, shape, sigma=2.0):
    """A random smooth image in [0, 1] (float64), i.e. something with image-like structure."""
    x = cv2.GaussianBlur(rng.random(shape).astype(np.float32), (0, 0), sigma)
    return ((x - x.min()) / (x.max() - x.min())).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def test_default_parameter_count_matches_paper():
    n = count_params(param_shapes(rl.relight(), image_size=32)["params"])
    assert n == PAPER_B_PARAMS == rl.num_params(rl.DEFAULT_WIDTH)
    assert 1_100_000 <= n <= 1_300_000  # paper B §3.4: "approximately 1.2 M"
    small = count_params(param_shapes(rl.relight(width=16), image_size=32)["params"])
    assert small == rl.num_params(16)


def test_registry_and_shapes():
    model = models.create("relight", width=8)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 48, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), x, train=False)
    assert set(variables) == {"params"}  # no BatchNorm: nothing in batch_stats
    y, aux = model.apply(variables, x, train=False)
    assert y.shape == x.shape and y.dtype == jnp.float32
    assert aux["gain"].shape == aux["offset"].shape == x.shape
    # Zero-initialised head: the untrained network is the identity.
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-6)

    # 112x112 with the paper-size model, shapes only.
    big = rl.relight()
    xs = jax.ShapeDtypeStruct((1, 112, 112, 3), jnp.float32)
    shapes = param_shapes(big, image_size=112)
    out, aux = jax.eval_shape(lambda v, x: big.apply(v, x, train=False), shapes, xs)
    assert out.shape == (1, 112, 112, 3) and aux["gain"].shape == (1, 112, 112, 3)


def test_output_range_and_gain_bound():
    model = rl.relight(width=8, max_gain=4.0)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), x, train=False)
    # Make the head large and random so the raw prediction leaves [0, 1] in both directions.
    kernel = variables["params"]["conv_out"]["kernel"]
    variables["params"]["conv_out"]["kernel"] = 5.0 * jax.random.normal(
        jax.random.key(2), kernel.shape)
    y, aux = model.apply(variables, x, train=True)
    y = np.asarray(y)
    assert y.min() >= -1.0 and y.max() <= 1.0
    assert (y == -1.0).any() and (y == 1.0).any()  # it did need clipping
    gain = np.asarray(aux["gain"])
    assert gain.min() >= 1 / 4.0 - 1e-5 and gain.max() <= 4.0 + 1e-5


def test_uint8_relighter_round_trip():
    model = rl.relight(width=8)
    images = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    variables = model.init(jax.random.key(0), normalize.to_model_input(images), train=False)
    fn = rl.uint8_relighter(model, variables)
    np.testing.assert_array_equal(fn(images), images)  # identity at init, exact in uint8
    np.testing.assert_array_equal(fn(images[0]), images[0])


# ---------------------------------------------------------------------------------------------
# SSIM and loss
# ---------------------------------------------------------------------------------------------


def test_ssim_identical_is_one():
    a = _smooth(np.random.default_rng(0), (32, 32, 3)).astype(np.float32)
    assert float(rec.ssim(a, a)) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_ssim_matches_skimage(seed):
    rng = np.random.default_rng(seed)
    a = _smooth(rng, (40, 48, 3))
    noise = cv2.GaussianBlur(rng.standard_normal((40, 48, 3)).astype(np.float32), (0, 0), 1.0)
    b = np.clip(0.8 * a + 0.1 + 0.15 * noise, 0.0, 1.0)
    # skimage with a Gaussian window discards a 5-pixel border, our 'valid' filtering as well:
    # the two conventions agree, so the full-image means are compared directly.
    ref = structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False, data_range=1.0, channel_axis=-1)
    ours = float(rec.ssim(a.astype(np.float32), b.astype(np.float32)))
    assert 0.2 < ref < 0.99  # a non-trivial case
    assert ours == pytest.approx(ref, abs=1e-5)
    # uint8 range
    ref255 = structural_similarity(a * 255, b * 255, gaussian_weights=True, sigma=1.5,
                                   use_sample_covariance=False, data_range=255.0,
                                   channel_axis=-1)
    ours255 = float(rec.ssim((a * 255).astype(np.float32), (b * 255).astype(np.float32),
                             max_val=255.0))
    assert ours255 == pytest.approx(ref255, abs=1e-5)
    # batched == per image
    batch = rec.ssim(np.stack([a, b]).astype(np.float32), np.stack([b, a]).astype(np.float32))
    np.testing.assert_allclose(np.asarray(batch), [ours, ours], atol=1e-6)


def test_ssim_rejects_tiny_images():
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        rec.ssim(np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 3), np.float32))


def test_l1_ssim_loss():
    rng = np.random.default_rng(4)
    a = np.stack([_smooth(rng, (32, 32, 3)) for _ in range(2)]).astype(np.float32)
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1).astype(np.float32)
    assert float(rec.l1_ssim_loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    loss = float(rec.l1_ssim_loss(a, b))
    # golden: alpha * (1 - SSIM) + (1 - alpha) * L1 with SSIM from skimage, L1 from numpy
    s = np.mean([structural_similarity(a[i].astype(np.float64), b[i].astype(np.float64),
                                       gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False, data_range=1.0,
                                       channel_axis=-1) for i in range(2)])
    l1 = np.mean(np.abs(a.astype(np.float64) - b))
    assert loss > 0.05
    assert loss == pytest.approx(rec.ALPHA * (1 - s) + (1 - rec.ALPHA) * l1, abs=1e-5)
    assert float(rec.l1_ssim_loss(a, b, alpha=0.0)) == pytest.approx(l1, abs=1e-6)
    terms = rec.l1_ssim_terms(a, b)
    assert float(terms["loss"]) == pytest.approx(loss, abs=1e-7)
    # gradient finite, also with flat (zero-variance) regions in both images
    flat = np.zeros_like(a)
    flat[:, :, 16:] = 1.0
    grad = jax.jit(jax.grad(rec.l1_ssim_loss))
    for p, t in ((b, a), (flat, flat), (flat * 0.5, flat)):
        g = np.asarray(grad(p, t))
        assert np.isfinite(g).all()
        if p is b:
            assert np.abs(g).max() > 0


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def test_psnr_golden():
    t = np.full((2, 16, 16, 3), 100, np.uint8)
    p = t + np.uint8(3)
    np.testing.assert_allclose(rm.psnr(p, t), [20 * math.log10(255 / 3)] * 2, rtol=1e-12)
    assert rm.psnr(p[0] / 255.0, t[0] / 255.0) == pytest.approx(20 * math.log10(255 / 3))
    assert rm.psnr(t[0], t[0]) == math.inf
    # one pixel-channel off by 16 in 16*16*3 values: MSE = 256 / 768
    q = t[0].copy()
    q[3, 4, 1] += 16
    assert rm.psnr(q, t[0]) == pytest.approx(10 * math.log10(255**2 * 768 / 256))


@pytest.fixture(scope="module")
def face64():
    item = SynthFaces(seed=3, num_identities=4, images_per_identity=1, size=64, noise=0.0)[0]
    return item["canonical"], item["skin_mask"]


def test_uniformity_orders_gradient_and_flat(face64):
    flat, mask = face64
    assert mask.sum() > 200  # a face-sized skin region
    # light from the right: luminance falls to a quarter towards the left edge
    ramp = np.linspace(0.25, 1.0, flat.shape[1], dtype=np.float32)[None, :, None]
    lit = np.rint(flat * ramp).astype(np.uint8)
    u_flat = rm.illumination_nonuniformity(flat, mask)
    u_lit = rm.illumination_nonuniformity(lit, mask)
    assert u_lit > 1.5 * u_flat  # the gradient-lit face is less uniform
    assert rm.uniformity_gain(lit, flat, mask) > 1.5  # relighting lit -> flat improves it
    assert rm.uniformity_gain(flat, lit, mask) < 1.0
    assert rm.uniformity_gain(lit, lit, mask) == pytest.approx(1.0)
    # exposure invariance: a uniformly dimmed face is as uniform as the original
    dim = np.rint(flat * 0.5).astype(np.uint8)
    assert rm.illumination_nonuniformity(dim, mask) == pytest.approx(u_flat, rel=0.05)
    # a constant image is perfectly uniform; batches give per-image values
    const = np.full_like(flat, 128)
    both = rm.illumination_nonuniformity(np.stack([const, lit]), np.stack([mask, mask]))
    np.testing.assert_allclose(both, [0.0, u_lit], atol=1e-6)
    assert math.isnan(rm.illumination_nonuniformity(flat, np.zeros_like(mask)))


# ---------------------------------------------------------------------------------------------
# Training and evaluation on the synthetic face world
# ---------------------------------------------------------------------------------------------

HARD = ("low", "side_left", "side_right", "over")


def test_tiny_training_lowers_loss():
    ds = SynthFaces(seed=0, num_identities=8, images_per_identity=2, size=32, conditions=HARD)
    batch = ds.render_batch(range(16))
    assert set(batch["condition"]) <= set(HARD)
    x = jnp.asarray(normalize.to_model_input(batch["image"]))
    y = jnp.asarray(batch["canonical"], jnp.float32) / 255.0
    model = rl.relight(width=16)
    params = model.init(jax.random.key(0), x[:1], train=False)["params"]
    tx = optax.adam(3e-3)

    def loss_fn(p):
        out, _ = model.apply({"params": p}, x, train=True)
        return rec.l1_ssim_loss((out + 1.0) / 2.0, y)

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    before = float(loss_fn(params))
    state = tx.init(params)
    for _ in range(30):
        params, state = step(params, state)
    after = float(loss_fn(params))
    assert np.isfinite(after)
    assert after < 0.8 * before, (before, after)


def test_evaluate_relighting_table():
    ds = SynthFaces(seed=1, num_identities=6, images_per_identity=1, size=32)
    pairs = {c: ds.render_batch(range(3), condition=c) for c in ("low", "side_left")}
    model = rl.relight(width=8)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    relight_fn = rl.uint8_relighter(model, variables)
    table = rm.evaluate_relighting(pairs, {"relight": relight_fn})
    assert list(table) == ["none", "clahe", "gamma", "msr", "relight"]
    for method, per_cond in table.items():
        assert set(per_cond) == set(pairs), method
        for c, metrics in per_cond.items():
            assert set(metrics) == set(rm.METRICS), (method, c)
            assert all(np.isfinite(v) for v in metrics.values()), (method, c, metrics)
    for c, p in pairs.items():
        none = table["none"][c]
        assert none["psnr"] == pytest.approx(float(np.mean(rm.psnr(p["image"], p["canonical"]))))
        assert none["ssim"] == pytest.approx(float(np.mean(rm.ssim(p["image"], p["canonical"]))))
        assert none["uniformity_gain"] == pytest.approx(1.0)
        assert none["uniformity_gain_std"] == pytest.approx(0.0, abs=1e-12)
        # the untrained network is the identity, so it scores exactly as `none`
        assert table["relight"][c] == pytest.approx(none)
    # gamma correction brightens the low-light faces towards the canonical exposure
    assert table["gamma"]["low"]["psnr"] > table["none"]["low"]["psnr"]
    md = rm.to_markdown(table)
    assert "### uniformity_gain" in md and "| relight |" in md and "side_left" in md
