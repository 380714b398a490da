"""Skin segmentation (paper B §3.3, eqs. 4-6, §4.5.4): models, loss, YCbCr baseline, metrics."""

from __future__ import annotations

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowlight import models
from lowlight.data import normalize
from lowlight.data.skin_color import ycbcr_skin_mask
from lowlight.data.synthetic import SynthFaces
from lowlight.eval import segmentation_metrics as sm
from lowlight.losses import segmentation as seg_loss
from lowlight.models import layers as L
from lowlight.models import unet as U


# Threefry keys make XLA:CPU spend ~10 s compiling a U-Net init; "rbg" keys take ~1 s.
def _key(seed):
    return jax.random.key(seed, impl="rbg")



# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
def unet_param_formula(features, in_ch=3, upsample="transpose"):
    """Independent count: blocks (bias-free convs, 2 BNs), up-convs, 1x1 head."""
    def block(cin, c):
        return 9 * cin * c + 9 * c * c + 2 * (2 * c)

    n, cin = 0, in_ch
    for c in features:  # encoder levels and the bottleneck
        n += block(cin, c)
        cin = c
    for k in reversed(range(len(features) - 1)):
        c, below = features[k], features[k + 1]
        n += (4 * below * c + c) if upsample == "transpose" else (below * c + c)
        n += block(2 * c, c)  # skip (c) concatenated with upsampled (c)
    return n + features[0] + 1


def test_unet_param_count_default_and_classic():
    n = L.count_params(L.param_shapes(models.create("unet"), 112)["params"])
    assert n == 7_700_161
    assert n == unet_param_formula((64, 128, 256, 512))
    classic = L.count_params(L.param_shapes(U.unet(features=U.CLASSIC_FEATURES), 112)["params"])
    assert classic == 31_037_633 == unet_param_formula(U.CLASSIC_FEATURES)
    bil = L.count_params(L.param_shapes(U.unet(upsample="bilinear"), 112)["params"])
    assert bil == 7_184_065 == unet_param_formula((64, 128, 256, 512), upsample="bilinear")
    # width multiplier scales every level
    assert U.unet(width=0.125).features == (8, 16, 32, 64)


@pytest.mark.parametrize("size", [32, 112])
def test_unet_shapes(size):
    model = models.create("unet")
    variables = L.param_shapes(model, size, batch=2)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    mask, aux = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert mask.shape == (2, size, size) and mask.dtype == jnp.float32
    assert aux["logits"].shape == (2, size, size)
    assert set(variables) == {"params", "batch_stats"}


def test_unet_tiny_forward_in_unit_range_and_bn_modes():
    model = U.unet(features=(4, 8, 16))
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    v = jax.jit(lambda k, x: model.init(k, x, train=False))(_key(1), x)
    mask, aux = jax.jit(lambda v, x: model.apply(v, x, train=False))(v, x)
    assert mask.shape == (2, 32, 32)
    assert float(mask.min()) >= 0.0 and float(mask.max()) <= 1.0
    np.testing.assert_allclose(mask, jax.nn.sigmoid(aux["logits"]), rtol=1e-6)
    (mask_t, _), upd = jax.jit(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
    assert mask_t.shape == (2, 32, 32)
    before = jax.tree_util.tree_leaves(v["batch_stats"])
    after = jax.tree_util.tree_leaves(upd["batch_stats"])
    assert any(not np.allclose(a, b) for a, b in zip(before, after))


def test_unet_invalid_input_size():
    with pytest.raises(ValueError, match="divisible by 8"):
        jax.eval_shape(lambda x: U.unet().init(jax.random.key(0), x, train=False),
                       jax.ShapeDtypeStruct((1, 36, 36, 3), jnp.float32))
    with pytest.raises(ValueError, match="divisible by 16"):
        jax.eval_shape(lambda x: U.unet(features=U.CLASSIC_FEATURES).init(
            jax.random.key(0), x, train=False), jax.ShapeDtypeStruct((1, 40, 40, 3), jnp.float32))
    with pytest.raises(ValueError, match="upsample"):
        U.unet(upsample="nearest")


def test_seg_cnn3_count_and_shape():
    model = models.create("seg_cnn3")
    variables = L.param_shapes(model, 112)
    # 3x3x3->32 + bias, 3x3x32->32 + bias, 1x1x32->1 + bias
    assert L.count_params(variables["params"]) == (27 * 32 + 32) + (288 * 32 + 32) + (32 + 1)
    assert L.count_params(variables["params"]) == 10_177
    x = jnp.zeros((1, 30, 30, 3))  # any size works (no pooling)
    v = jax.jit(lambda k, x: model.init(k, x, train=False))(_key(0), x)
    mask, aux = model.apply(v, x, train=True)
    assert mask.shape == aux["logits"].shape == (1, 30, 30)


# --------------------------------------------------------------------------------------------
# Loss (paper B eqs. 4-6), golden values from an independent numpy implementation
# --------------------------------------------------------------------------------------------
def np_seg_loss(p, t, z=None, eps=1.0, lam_tv=0.01, lam_area=0.005, alpha=0.6, tv_mean=False):
    p, t = p.astype(np.float64), t.astype(np.float64)
    if z is not None:
        z = z.astype(np.float64)
        logp, log1mp = -np.log1p(np.exp(-z)), -np.log1p(np.exp(z))
    else:
        pc = np.clip(p, 1e-6, 1 - 1e-6)
        logp, log1mp = np.log(pc), np.log(1 - pc)
    bce = np.mean(-(t * logp + (1 - t) * log1mp))
    dices = []
    tvs = []
    areas = []
    for pi, ti in zip(p, t):
        dices.append(1 - (2 * (pi * ti).sum() + eps) / (pi.sum() + ti.sum() + eps))
        tv = 0.0
        h, w = pi.shape
        for i in range(h):
            for j in range(w):
                if i + 1 < h:
                    tv += (pi[i + 1, j] - pi[i, j]) ** 2
                if j + 1 < w:
                    tv += (pi[i, j + 1] - pi[i, j]) ** 2
        tvs.append(tv / (h * w) if tv_mean else tv)
        areas.append((pi.mean() - alpha) ** 2)
    d, tv, a = np.mean(dices), np.mean(tvs), np.mean(areas)
    return bce + d + lam_tv * tv + lam_area * a, dict(bce=bce, dice=d, tv=tv, area=a)


def test_loss_golden_from_probabilities():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, (2, 4, 5)).astype(np.float32)
    t = (rng.uniform(0, 1, (2, 4, 5)) > 0.5).astype(np.float32)
    t[1, 0, 0] = 0.3  # soft targets are allowed
    total, parts = seg_loss.segmentation_loss(p, t)
    ref_total, ref = np_seg_loss(p, t)
    for k in ("bce", "dice", "tv", "area"):
        np.testing.assert_allclose(parts[k], ref[k], rtol=1e-5, err_msg=k)
    np.testing.assert_allclose(total, ref_total, rtol=1e-5)
    np.testing.assert_allclose(parts["total"], total)
    # the "mean" TV reduction divides by H*W
    _, parts_m = seg_loss.segmentation_loss(p, t, tv_reduction="mean")
    np.testing.assert_allclose(parts_m["tv"], np_seg_loss(p, t, tv_mean=True)[1]["tv"], rtol=1e-5)
    # custom weights and prior
    total_c, _ = seg_loss.segmentation_loss(p, t, lambda_tv=0.5, lambda_area=2.0, area_prior=0.3)
    np.testing.assert_allclose(total_c, np_seg_loss(p, t, lam_tv=0.5, lam_area=2.0,
                                                    alpha=0.3)[0], rtol=1e-5)
    # a trailing channel of 1 is accepted
    np.testing.assert_allclose(seg_loss.segmentation_loss(p[..., None], t[..., None])[0], total)


def test_loss_golden_from_logits():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 3, (3, 6, 4)).astype(np.float32)
    z[0, 0, 0], z[0, 0, 1] = 40.0, -40.0  # saturated pixels
    t = (rng.uniform(0, 1, z.shape) > 0.4).astype(np.float32)
    p = 1 / (1 + np.exp(-z.astype(np.float64)))
    total, parts = seg_loss.segmentation_loss(jnp.asarray(p, jnp.float32), t, logits=z)
    ref_total, ref = np_seg_loss(p, t, z=z)
    for k in ("bce", "dice", "tv", "area"):
        np.testing.assert_allclose(parts[k], ref[k], rtol=1e-5, err_msg=k)
    np.testing.assert_allclose(total, ref_total, rtol=1e-5)
    # pred_mask may be omitted when logits are given
    np.testing.assert_allclose(seg_loss.segmentation_loss(None, t, logits=z)[0], total, rtol=1e-6)


def test_dice_zero_for_perfect_prediction():
    t = np.zeros((2, 8, 8), np.float32)
    t[0, 2:6, 2:6] = 1.0
    t[1, :3, :] = 1.0
    _, parts = seg_loss.segmentation_loss(t, t)
    assert abs(float(parts["dice"])) < 1e-6
    # and a clearly wrong prediction has a large Dice loss
    _, bad = seg_loss.segmentation_loss(1.0 - t, t)
    assert float(bad["dice"]) > 0.9
    # an empty target with an empty prediction is perfect too (eps = 1 avoids 0/0)
    _, empty = seg_loss.segmentation_loss(np.zeros_like(t), np.zeros_like(t))
    assert abs(float(empty["dice"])) < 1e-6


def test_gradients_finite_with_extreme_logits():
    t = jnp.asarray(np.random.default_rng(2).uniform(0, 1, (2, 8, 8)) > 0.5, jnp.float32)
    z = jnp.where(t > 0, -1e4, 1e4)  # confidently wrong everywhere

    def f(z):
        return seg_loss.segmentation_loss(jax.nn.sigmoid(z), t, logits=z)[0]

    value, g = jax.value_and_grad(f)(z)
    assert np.isfinite(float(value)) and bool(jnp.all(jnp.isfinite(g)))
    # BCE from logits keeps a gradient of -(t - sigmoid(z)) / N = +-1/N even when saturated
    np.testing.assert_allclose(jnp.abs(g).max(), 1.0 / t.size, rtol=1e-3)
    # the probability path with exact 0/1 predictions stays finite (clipping)
    gp = jax.grad(lambda p: seg_loss.segmentation_loss(p, t)[0])(1.0 - t)
    assert bool(jnp.all(jnp.isfinite(gp)))


def test_loss_shape_errors():
    with pytest.raises(ValueError, match="shape"):
        seg_loss.segmentation_loss(np.zeros((1, 4, 4)), np.zeros((1, 4, 5)))
    with pytest.raises(ValueError, match="tv_reduction"):
        seg_loss.segmentation_loss(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)), tv_reduction="max")


# --------------------------------------------------------------------------------------------
# YCbCr thresholding (Chai & Ngan 1999)
# --------------------------------------------------------------------------------------------
def bt601(rgb):
    r, g, b = (np.asarray(rgb, np.float64)[..., i] for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    return y, 0.713 * (r - y) + 128, 0.564 * (b - y) + 128  # Y, Cr, Cb


def test_ycbcr_known_colours():
    skin, blue = (224, 172, 140), (0, 0, 255)
    _, cr, cb = bt601(skin)
    assert 133 + 2 < cr < 173 - 2 and 77 + 2 < cb < 127 - 2  # 156.6, 103.2: well inside
    _, cr_b, cb_b = bt601(blue)
    assert not 133 <= cr_b <= 173 and not 77 <= cb_b <= 127
    # Cr in range but Cb too high (a pinkish purple); Cb in range but Cr too low (sage green)
    purple, grey = (200, 120, 200), (120, 160, 100)
    _, cr_p, cb_p = bt601(purple)
    assert 135 < cr_p < 171 and cb_p > 129
    _, cr_g, cb_g = bt601(grey)
    assert cr_g < 131 and 79 < cb_g < 125
    img = np.array([[skin, blue], [purple, grey]], np.uint8)
    mask = ycbcr_skin_mask(img)
    assert mask.dtype == np.float32 and mask.shape == (2, 2)
    np.testing.assert_array_equal(mask, [[1, 0], [0, 0]])


def test_ycbcr_boundaries_and_batching():
    # every 3rd RGB value: OpenCV's fixed-point result is within 1 of the float BT.601 formula
    v = np.arange(0, 256, 3, dtype=np.uint8)
    grid = np.stack(np.meshgrid(v, v, v, indexing="ij"), -1).reshape(len(v), -1, 3)
    ycrcb = cv2.cvtColor(grid, cv2.COLOR_RGB2YCrCb).astype(int)
    _, cr_f, cb_f = bt601(grid)
    assert np.abs(ycrcb[..., 1] - cr_f).max() <= 1.0 and np.abs(ycrcb[..., 2] - cb_f).max() <= 1.0
    cr, cb = ycrcb[..., 1], ycrcb[..., 2]
    mask = ycbcr_skin_mask(grid)
    np.testing.assert_array_equal(mask, (cr >= 133) & (cr <= 173) & (cb >= 77) & (cb <= 127))
    # the bounds are inclusive, and one step outside is rejected
    cb_ok, cr_ok = (cb >= 77) & (cb <= 127), (cr >= 133) & (cr <= 173)
    for value, expect in ((133, 1), (173, 1), (132, 0), (174, 0)):
        sel = (cr == value) & cb_ok
        assert sel.any(), value
        assert np.all(mask[sel] == expect), value
    for value, expect in ((77, 1), (127, 1), (76, 0), (128, 0)):
        sel = (cb == value) & cr_ok
        assert sel.any(), value
        assert np.all(mask[sel] == expect), value
    # batched (B, H, W, 3) equals per image
    batch = grid[:6, :40].reshape(3, 2, 40, 3)
    out = ycbcr_skin_mask(batch)
    assert out.shape == (3, 2, 40)
    for i in range(3):
        np.testing.assert_array_equal(out[i], ycbcr_skin_mask(batch[i]))
    with pytest.raises(ValueError, match="uint8"):
        ycbcr_skin_mask(batch.astype(np.float32))


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
def test_iou_dice_golden():
    pred = np.zeros((3, 4, 4), np.float32)
    target = np.zeros((3, 4, 4), np.float32)
    pred[0, 0, 0:3] = [0.9, 0.5, 0.7]  # 3 pixels (0.5 counts: >= threshold)
    pred[0, 1, 1] = 0.49  # below threshold
    target[0, 0, 1:3] = 1.0
    target[0, 1, 0:2] = [1.0, 0.6]  # 4 target pixels, overlap 2
    # image 1: both empty -> 1; image 2: prediction everywhere, target one pixel
    pred[2] = 1.0
    target[2, 3, 3] = 1.0
    np.testing.assert_allclose(sm.iou(pred, target, per_image=True), [2 / 5, 1.0, 1 / 16])
    np.testing.assert_allclose(sm.dice(pred, target, per_image=True), [4 / 7, 1.0, 2 / 17])
    assert sm.iou(pred, target) == pytest.approx((2 / 5 + 1 + 1 / 16) / 3)
    assert sm.dice(pred, target) == pytest.approx((4 / 7 + 1 + 2 / 17) / 3)
    assert sm.iou(pred[0], target[0]) == pytest.approx(0.4)  # (H, W) input
    # at 0.6 both sides change: pred {0.9, 0.7}, target keeps its 0.6 pixel -> overlap 1 of 5
    assert sm.iou(pred[0], target[0], threshold=0.6) == pytest.approx(1 / 5)


def test_evaluate_segmenters_and_markdown():
    rng = np.random.default_rng(0)
    masks = (rng.uniform(0, 1, (5, 8, 8)) > 0.5).astype(np.float32)
    images = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    conditions = ["low", "normal", "low", "over", "normal"]
    lookup = {images[i].tobytes(): masks[i] for i in range(5)}

    def oracle(batch):
        return np.stack([lookup[b.tobytes()] for b in batch])

    def allskin(batch):
        return np.full(batch.shape[:3], 0.5, np.float32)

    table = sm.evaluate_segmenters(images, masks, conditions,
                                   {"oracle": oracle, "half": allskin}, batch_size=2)
    assert list(table["oracle"]) == ["normal", "low", "over", "all"]
    assert table["oracle"]["all"] == {"iou": 1.0, "dice": 1.0, "n": 5}
    assert table["oracle"]["low"]["n"] == 2
    frac = masks.mean(axis=(1, 2))
    assert table["half"]["low"]["iou"] == pytest.approx(frac[[0, 2]].mean())
    assert table["half"]["all"]["dice"] == pytest.approx(np.mean(2 * frac / (1 + frac)))
    md = sm.to_markdown(table)
    lines = md.splitlines()
    assert lines[0].startswith("| segmenter (IoU / Dice) | normal | low | over | all |")
    assert lines[2].startswith("| oracle | 1.000 / 1.000 |")
    assert len(lines) == 4


# --------------------------------------------------------------------------------------------
# End to end: a tiny U-Net learns skin on 32x32 synthetic faces
# --------------------------------------------------------------------------------------------
def test_tiny_unet_learns_skin():
    ds = SynthFaces(seed=3, num_identities=48, images_per_identity=2, size=32)
    train, test = ds.render_batch(range(64)), ds.render_batch(range(64, 96))
    x, y = normalize.to_model_input(train["image"]), train["skin_mask"]
    model = U.unet(features=(8, 16, 32))  # two poolings, widths 1/8 of the paper's
    variables = jax.jit(lambda k, x: model.init(k, x, train=False))(_key(0), x[:2])
    params, stats = variables["params"], variables["batch_stats"]
    tx = optax.adam(1e-2)
    opt = tx.init(params)

    @jax.jit
    def step(params, stats, opt, xb, yb):
        def loss_fn(p):
            (mask, aux), upd = model.apply({"params": p, "batch_stats": stats}, xb, train=True,
                                           mutable=["batch_stats"])
            loss, _ = seg_loss.segmentation_loss(mask, yb, logits=aux["logits"])
            return loss, upd["batch_stats"]

        (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), stats, opt, loss

    rng = np.random.default_rng(0)
    losses = []
    for _ in range(40):
        idx = rng.choice(len(x), 8, replace=False)
        params, stats, opt, loss = step(params, stats, opt, x[idx], y[idx])
        losses.append(float(loss))
    assert np.mean(losses[-5:]) < 0.6 * losses[0], losses

    predict = jax.jit(lambda xb: model.apply({"params": params, "batch_stats": stats}, xb,
                                             train=False)[0])
    segmenters = {
        "unet": lambda b: np.asarray(predict(normalize.to_model_input(b))),
        "half": lambda b: np.full(b.shape[:3], 0.5, np.float32),  # = all skin at >= 0.5
        "ycbcr": ycbcr_skin_mask,
    }
    table = sm.evaluate_segmenters(test["image"], test["skin_mask"], test["condition"],
                                   segmenters, batch_size=32)
    assert table["unet"]["all"]["iou"] > table["half"]["all"]["iou"] + 0.15, sm.to_markdown(table)
    assert table["unet"]["all"]["n"] == 32
