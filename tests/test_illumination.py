"""Tests for lowlight.data.illumination (numpy) and lowlight.data.illumination_jax (JAX)."""

import collections
import functools
import math
import pickle

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowlight.data import conditions as cond
from lowlight.data import illumination as il
from lowlight.data import illumination_jax as ij

U8 = 1.0 / 255.0


class ListSource:
    """Picklable random-access source: deterministic small uint8 images and labels."""

    def __init__(self, n, size=8, condition=None, constant=None):
        self.n, self.size, self.cond, self.constant = n, size, condition, constant

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self.constant is not None:
            image = np.full((self.size, self.size, 3), self.constant, np.uint8)
        else:
            rng = np.random.default_rng(1000 + i)
            image = rng.integers(40, 220, (self.size, self.size, 3)).astype(np.uint8)
        item = {"image": image, "label": i}
        if self.cond is not None:
            item["condition"] = self.cond
        return item


def _images(n=3, size=16, seed=0, lo=0, hi=256):
    """uint8 batch and its float32 [0, 1] version."""
    x = np.random.default_rng(seed).integers(lo, hi, (n, size, size, 3)).astype(np.uint8)
    return x, x.astype(np.float32) / 255.0


def _dark(size=64, seed=0):
    rng = np.random.default_rng(seed)
    ramp = np.linspace(5, 60, size)[None, :, None] * np.ones((size, 1, 3))
    return np.clip(ramp + rng.normal(0, 4, (size, size, 3)), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------
# Golden values of the numpy ops
# ------------------------------------------------------------------------------------------


def test_gamma_golden():
    x = np.array([0.0, 0.25, 0.5, 1.0], np.float32)[:, None, None].repeat(3, -1).reshape(2, 2, 3)
    np.testing.assert_allclose(il.gamma(x, 2.0), x**2, atol=1e-7)
    np.testing.assert_allclose(il.gamma(x, 0.5), np.sqrt(x), atol=1e-7)
    u = np.full((2, 2, 3), 64, np.uint8)
    expected = round(255 * (64 / 255) ** 1.8)
    assert expected == 21
    assert np.all(il.gamma(u, 1.8) == expected) and il.gamma(u, 1.8).dtype == np.uint8
    assert il.gamma(u, 0.3).mean() > 64  # g < 1 brightens


def test_contrast_golden():
    for f in (0.5, 2.0):
        const = np.full((1, 4, 4, 3), 0.3, np.float32)
        np.testing.assert_allclose(il.contrast(const, f), const, atol=1e-7)
    x = np.zeros((4, 4, 3), np.float32)
    x[:2], x[2:] = 0.2, 0.6  # mean 0.4 in every channel
    y = il.contrast(x, 2.0)
    np.testing.assert_allclose(y[:2], 0.0, atol=1e-6)
    np.testing.assert_allclose(y[2:], 0.8, atol=1e-6)
    np.testing.assert_allclose(il.contrast(x, 0.5)[:2], 0.3, atol=1e-6)


def test_brightness_reduce_and_noise_golden():
    u = np.full((4, 4, 3), 200, np.uint8)
    assert np.all(il.reduce_brightness(u, 0.5) == 100)
    assert np.all(il.brightness(u, 0.1) == round(255 * (200 / 255 + 0.1)))
    x = np.full((64, 64, 3), 0.5, np.float32)
    noise = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    np.testing.assert_allclose(il.add_noise(x, 0.05, noise=noise), np.clip(x + 0.05 * noise, 0, 1),
                               atol=1e-7)
    d = il.add_noise(x, 0.04, np.random.default_rng(1)) - x
    assert abs(d.std() - 0.04) < 0.004 and abs(d.mean()) < 0.004


def test_sepia_golden():
    px = np.array([[[0.2, 0.4, 0.6]]], np.float32)
    full = np.array([0.393 * 0.2 + 0.769 * 0.4 + 0.189 * 0.6,
                     0.349 * 0.2 + 0.686 * 0.4 + 0.168 * 0.6,
                     0.272 * 0.2 + 0.534 * 0.4 + 0.131 * 0.6])
    np.testing.assert_allclose(il.sepia(px, 1.0)[0, 0], [0.4996, 0.445, 0.3466], atol=1e-6)
    np.testing.assert_allclose(il.sepia(px, 1.0)[0, 0], full, atol=1e-6)
    np.testing.assert_allclose(il.sepia(px, 0.5)[0, 0], 0.5 * px[0, 0] + 0.5 * full, atol=1e-6)
    np.testing.assert_allclose(il.sepia(px, 0.0), px)
    u = np.array([[[50, 100, 150]]], np.uint8)
    assert il.sepia(u).tolist() == [[[125, 111, 87]]]
    assert il.sepia(np.full((1, 1, 3), 255, np.uint8)).tolist() == [[[255, 255, 239]]]


def test_directional_light_golden():
    x = np.full((32, 32, 3), 0.5, np.float32)
    left = il.directional_light(x, "left", 0.5)
    assert left[:, :16].mean() > 0.55 > 0.45 > left[:, 16:].mean()
    # Pixel (row 16, col 0) by hand: centre (0, 0.5), pixel centre (0.5/32, 16.5/32).
    d = math.hypot(0.5 / 32, 16.5 / 32 - 0.5)
    np.testing.assert_allclose(left[16, 0], 0.5 * (0.5 + 2 * 0.5 * (1 - d)), atol=1e-6)
    d = math.hypot(31.5 / 32, 16.5 / 32 - 0.5)  # far edge: m ~ 0, gain ~ 1 - strength
    np.testing.assert_allclose(left[16, 31], 0.5 * (0.5 + 2 * 0.5 * (1 - d)), atol=1e-6)
    np.testing.assert_allclose(left[0, 31], 0.5 * 0.5, atol=1e-6)  # far corner: beyond radius
    np.testing.assert_allclose(il.directional_light(x, "right", 0.5), left[:, ::-1], atol=1e-6)
    top = il.directional_light(x, "top", 0.5)
    assert top[:16].mean() > top[16:].mean()
    np.testing.assert_allclose(il.directional_light(x, "bottom", 0.5), top[::-1], atol=1e-6)
    np.testing.assert_allclose(top, np.swapaxes(left, 0, 1), atol=1e-6)
    np.testing.assert_allclose(il.directional_light(x, 2, 0.0), x)
    u = np.full((2, 8, 8, 3), 100, np.uint8)
    y = il.directional_light(u, "left", 0.8)
    assert y.dtype == np.uint8 and y.shape == u.shape and y[:, :, 0].mean() > y[:, :, -1].mean()


def test_color_temperature_model():
    grey = np.full((2, 2, 3), 0.5, np.float32)
    warm = il.color_temperature(grey, 3000.0)[0, 0]
    cool = il.color_temperature(grey, 9000.0)[0, 0]
    assert warm[0] > warm[1] > warm[2]  # warm: more red, less blue
    assert cool[2] > cool[0]
    for rgb in (warm, cool):  # grey keeps its Rec.601 luma
        np.testing.assert_allclose(rgb @ il.LUMA_601, 0.5, atol=1e-5)
    np.testing.assert_allclose(il.color_temperature(grey, 6500.0), grey, atol=1e-6)
    gains = il.kelvin_to_rgb_gains(np.array([2000.0, 4000.0, 6000.0]))
    assert np.all(np.diff(gains[:, 0]) < 0) and np.all(np.diff(gains[:, 2]) > 0)


def test_mixed_is_composition_and_dominant_rule():
    _, x = _images(1, 8)
    y = il.mixed(x, gamma=1.4, contrast=0.7, direction="top", strength=0.5)
    ref = il.directional_light(il.contrast(il.gamma(x, 1.4), 0.7), "top", 0.5)
    np.testing.assert_allclose(y, ref, atol=1e-6)
    np.testing.assert_allclose(il.mixed(x), x, atol=1e-7)
    dc = il.dominant_condition
    assert dc(gamma=1.5) == "low" and dc(gamma=0.5, contrast=0.6) == "over"
    assert dc(contrast=0.7) == "low" and dc(contrast=1.5) == "over" and dc() == "normal"
    assert dc(gamma=1.7, direction="right", strength=0.3) == "side_right"
    assert dc(gamma=1.7, direction="right", strength=0.0) == "low"


# ------------------------------------------------------------------------------------------
# Paper A: simulate module and datasets
# ------------------------------------------------------------------------------------------


def test_simulate_params_in_ranges():
    rng = np.random.default_rng(0)
    draws = [il.sample_simulate_params(rng) for _ in range(500)]
    for name, (lo, hi) in il.SIMULATE_RANGES.items():
        v = np.array([d[name] for d in draws])
        assert v.min() >= lo and v.max() <= hi and v.max() - v.min() > 0.8 * (hi - lo)
    d = il.sample_simulate_params(rng, brightness=0.5, noise_sigma=(0.0, 0.001))
    assert d["brightness"] == 0.5 and d["noise_sigma"] <= 0.001
    with pytest.raises(TypeError, match="noise_level"):
        il.sample_simulate_params(rng, noise_level=0.1)
    with pytest.raises(ValueError, match="brightness"):
        il.sample_simulate_params(rng, brightness=(0.5, 1.5))


def test_simulate_low_light():
    x = np.full((3, 16, 16, 3), 150, np.uint8)
    y, params = il.simulate_low_light(x, np.random.default_rng(0), return_params=True)
    assert y.shape == x.shape and y.dtype == np.uint8 and len(params) == 3
    assert len({p["brightness"] for p in params}) == 3  # one draw per image
    for yi, p in zip(y, params, strict=True):
        assert abs(yi.mean() / 255 - 150 / 255 * p["brightness"]) < 0.05
    assert y.mean() < 0.65 * 150
    # The composite equals its parts with the drawn parameters and the same noise.
    _, xf = _images(1, 8)
    noise = np.random.default_rng(3).standard_normal(xf.shape).astype(np.float32)
    ref = il.add_noise(il.reduce_brightness(il.sepia(xf, 0.4), 0.3), 0.02, noise=noise)
    got = il.apply_simulate(xf, brightness=0.3, sepia_strength=0.4, noise_sigma=0.02, noise=noise)
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_distortion_face_all_simulated_and_deterministic():
    src = ListSource(40)
    ds = il.DistortionFace(src, seed=3)
    assert len(ds) == 40
    items = [ds[i] for i in range(40)]
    assert all(it["simulated"] is True and it["condition"] == cond.LOW for it in items)
    assert all(it["label"] == i for i, it in enumerate(items))
    assert all(it["image"].mean() < src[i]["image"].mean() for i, it in enumerate(items))
    again = il.DistortionFace(ListSource(40), seed=3)
    clone = pickle.loads(pickle.dumps(ds))
    for i in (0, 7, 39):
        np.testing.assert_array_equal(again[i]["image"], items[i]["image"])
        np.testing.assert_array_equal(clone[i]["image"], items[i]["image"])
    np.testing.assert_array_equal(ds[-1]["image"], items[39]["image"])
    other = il.DistortionFace(src, seed=4)
    assert not np.array_equal(other[0]["image"], items[0]["image"])
    fixed = il.DistortionFace(src, brightness=1.0, sepia_strength=0.0, noise_sigma=0.0)
    np.testing.assert_array_equal(fixed[5]["image"], src[5]["image"])
    with pytest.raises(IndexError):
        ds[40]


def test_natural_face_exactly_half():
    ds = il.NaturalFace(ListSource(1000, size=4, condition=cond.SIDE_LEFT), seed=0)
    items = [ds[i] for i in range(1000)]
    flags = np.array([it["simulated"] for it in items])
    assert flags.sum() == 500
    for it in items:
        assert it["condition"] == (cond.LOW if it["simulated"] else cond.SIDE_LEFT)
    src = ds.source
    plain = [i for i in range(1000) if not flags[i]][:5]
    for i in plain:
        np.testing.assert_array_equal(items[i]["image"], src[i]["image"])
    assert not np.array_equal(items[int(np.argmax(flags))]["image"],
                              src[int(np.argmax(flags))]["image"])
    # Same half in another instance and after pickling; another seed picks another half.
    again = il.NaturalFace(ListSource(1000, size=4, condition=cond.SIDE_LEFT), seed=0)
    clone = pickle.loads(pickle.dumps(ds))
    assert [again.is_simulated(i) for i in range(1000)] == flags.tolist()
    assert [clone.is_simulated(i) for i in range(1000)] == flags.tolist()
    for i in range(0, 1000, 97):
        np.testing.assert_array_equal(clone[i]["image"], items[i]["image"])
    other = [il.NaturalFace(src, seed=1).is_simulated(i) for i in range(1000)]
    assert sum(other) == 500 and other != flags.tolist()
    odd = il.NaturalFace(ListSource(7), seed=0)
    assert sum(odd[i]["simulated"] for i in range(7)) == 3
    assert {odd[i]["condition"] for i in range(7)} == {cond.LOW, cond.NORMAL}


# ------------------------------------------------------------------------------------------
# Paper B: protocol
# ------------------------------------------------------------------------------------------


def test_protocol_params_in_paper_ranges():
    rng = np.random.default_rng(0)
    by_cond = collections.defaultdict(list)
    for name in (cond.LOW, cond.OVER, *cond.SIDE_CONDITIONS):
        for _ in range(300):
            p = il.sample_condition_params(name, rng)
            assert 0.3 <= p["gamma"] <= 1.8 and 0.5 <= p["contrast"] <= 2.0
            assert il.dominant_condition(**p) == name
            by_cond[name].append(p)
    low_g = [p["gamma"] for p in by_cond[cond.LOW]]
    over_g = [p["gamma"] for p in by_cond[cond.OVER]]
    assert min(low_g) > 1.0 and max(over_g) < 1.0
    assert 0.3 < np.mean([p["contrast"] != 1.0 for p in by_cond[cond.LOW]]) < 0.7
    strengths = [p["strength"] for p in by_cond[cond.SIDE_TOP]]
    assert 0.4 <= min(strengths) and max(strengths) <= 0.8
    assert {p["direction"] for p in by_cond[cond.SIDE_TOP]} == {"top"}
    with pytest.raises(ValueError, match="condition"):
        il.sample_condition_params(cond.NORMAL, rng)


def test_apply_protocol_mix():
    rng = np.random.default_rng(0)
    x = np.full((2, 2, 3), 128, np.uint8)
    tags = [il.apply_protocol(x, rng)[1] for _ in range(2000)]
    groups = collections.Counter(cond.group(t) for t in tags)
    for g, frac in zip(("low", "side", "over"), il.PAPER_B_MIX, strict=True):
        assert abs(groups[g] / 2000 - frac) < 0.04
    sides = collections.Counter(t for t in tags if t in cond.SIDE_CONDITIONS)
    assert set(sides) == set(cond.SIDE_CONDITIONS)
    assert all(abs(c / groups["side"] - 0.25) < 0.06 for c in sides.values())
    y, name, params = il.apply_protocol(x, np.random.default_rng(5), return_params=True)
    np.testing.assert_array_equal(y, il.mixed(x, **params))
    assert il.dominant_condition(**params) == name
    with pytest.raises(ValueError, match="mix"):
        il.apply_protocol(x, rng, mix=(0.5, 0.5, 0.5))


def test_illumination_protocol_exact_mix_and_tags():
    src = ListSource(1000, size=8, constant=128)
    ds = il.IlluminationProtocol(src, seed=0)
    items = [ds[i] for i in range(1000)]
    tags = collections.Counter(it["condition"] for it in items)
    assert tags == {cond.LOW: 300, cond.OVER: 300, cond.SIDE_LEFT: 100, cond.SIDE_RIGHT: 100,
                    cond.SIDE_TOP: 100, cond.SIDE_BOTTOM: 100}
    assert all(cond.check(t) for t in tags)
    # The tag describes the image: dark for low, bright for over, lit side for side-light.
    for it in items:
        im, t = it["image"].astype(float), it["condition"]
        if t == cond.LOW:
            assert im.mean() < 128 - 10
        elif t == cond.OVER:
            assert im.mean() > 128 + 10
        elif t == cond.SIDE_LEFT:
            assert im[:, :4].mean() > im[:, 4:].mean() + 10
        elif t == cond.SIDE_RIGHT:
            assert im[:, 4:].mean() > im[:, :4].mean() + 10
        elif t == cond.SIDE_TOP:
            assert im[:4].mean() > im[4:].mean() + 10
        else:
            assert im[4:].mean() > im[:4].mean() + 10
    assert [ds.condition(i) for i in range(1000)] == [it["condition"] for it in items]
    # Deterministic across instances and pickling; the seed changes the assignment.
    again = il.IlluminationProtocol(ListSource(1000, size=8, constant=128), seed=0)
    clone = pickle.loads(pickle.dumps(ds))
    for i in range(0, 1000, 37):
        for other in (again, clone):
            assert other[i]["condition"] == items[i]["condition"]
            np.testing.assert_array_equal(other[i]["image"], items[i]["image"])
    reseeded = il.IlluminationProtocol(src, seed=1)
    assert [reseeded.condition(i) for i in range(1000)] != [ds.condition(i) for i in range(1000)]
    small = il.IlluminationProtocol(ListSource(7), mix=(0.5, 0.5, 0.0))
    assert collections.Counter(cond.group(small.condition(i)) for i in range(7)) == {
        "low": 4, "side": 3}  # largest remainder, ties to the first bucket
    assert il.exact_counts(1000, il.PAPER_B_MIX).tolist() == [300, 400, 300]
    assert il.exact_counts(10, [1 / 3] * 3).sum() == 10


def test_wrapper_errors():
    with pytest.raises(TypeError, match="source"):
        il.DistortionFace(42)
    with pytest.raises(ValueError, match="seed"):
        il.NaturalFace(ListSource(3), seed=-1)
    with pytest.raises(TypeError, match="'image'"):
        il.IlluminationProtocol([{"img": 0}])[0]
    with pytest.raises(ValueError, match="mix"):
        il.IlluminationProtocol(ListSource(3), mix=(0.3, 0.3))
    dusk = il.NaturalFace(ListSource(2, condition="dusk"))
    plain = next(i for i in range(2) if not dusk.is_simulated(i))
    with pytest.raises(ValueError, match="unknown lighting condition"):
        dusk[plain]


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------


def test_numpy_validation_messages():
    good = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match=r"image: expected .*\(H, W, 3\)"):
        il.gamma(np.zeros((4, 4), np.uint8), 1.0)
    with pytest.raises(TypeError, match="image: .*int32"):
        il.contrast(np.zeros((4, 4, 3), np.int32), 1.0)
    with pytest.raises(ValueError, match=r"image: .*\[0, 1\]"):
        il.sepia(np.full((4, 4, 3), 2.0, np.float32))
    with pytest.raises(TypeError, match="numpy array"):
        il.gamma([[0, 0, 0]], 1.0)
    with pytest.raises(ValueError, match="g: "):
        il.gamma(good, 0.0)
    with pytest.raises(ValueError, match="strength"):
        il.directional_light(good, "left", 1.5)
    with pytest.raises(ValueError, match="direction"):
        il.directional_light(good, "up", 0.5)
    with pytest.raises(TypeError, match="rng"):
        il.add_noise(good, 0.1, rng=None)
    with pytest.raises(ValueError, match="noise: expected shape"):
        il.add_noise(good, 0.1, noise=np.zeros((2, 2, 3)))
    with pytest.raises(TypeError, match="uint8"):
        il.clahe(good.astype(np.float32))
    with pytest.raises(ValueError, match="tile_grid"):
        il.clahe(good, tile_grid=(0, 8))
    with pytest.raises(ValueError, match="apply_protocol takes one image"):
        il.apply_protocol(good[None], np.random.default_rng(0))
    with pytest.raises(ValueError, match="low_gamma"):
        il.ProtocolSpec(low_gamma=(0.9, 1.5))


def test_jax_validation_messages():
    _, x = _images(2, 8)
    with pytest.raises(TypeError, match="images: .*float"):
        ij.gamma(jnp.zeros((2, 4, 4, 3), jnp.uint8), 1.0)
    with pytest.raises(ValueError, match=r"images: expected .*\(N, H, W, 3\)"):
        ij.gamma(x[0], 1.0)
    with pytest.raises(ValueError, match=r"images: values must lie in \[0, 1\]"):
        ij.contrast(x * 3, 1.0)
    with pytest.raises(ValueError, match=r"g: expected a scalar or shape \(2,\)"):
        ij.gamma(x, jnp.ones(3))
    with pytest.raises(ValueError, match="strength"):
        ij.directional_light(x, 0, jnp.array([0.5, 1.5]))
    with pytest.raises(ValueError, match="direction"):
        ij.directional_light(x, jnp.array([0, 4]), 0.5)
    with pytest.raises(ValueError, match="gamma"):
        ij.photometric_augment(jax.random.key(0), x, gamma=(-1.0, 1.0))
    with pytest.raises(KeyError, match="gama"):
        ij.photometric_augment_from_config(jax.random.key(0), x, {"gama": (0.5, 1.0)})


# ------------------------------------------------------------------------------------------
# Enhancement baselines
# ------------------------------------------------------------------------------------------


def test_clahe_matches_opencv_and_brightens():
    dark = _dark()
    out = il.clahe(dark)
    lab = cv2.cvtColor(dark, cv2.COLOR_RGB2LAB)
    lab[..., 0] = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(lab[..., 0].copy())
    np.testing.assert_array_equal(out, cv2.cvtColor(lab, cv2.COLOR_LAB2RGB))
    assert out.dtype == np.uint8 and out.mean() > dark.mean() + 10
    batch = il.clahe(np.stack([dark, dark[::-1]]), clip_limit=3.0, tile_grid=(4, 4))
    np.testing.assert_array_equal(batch[1], il.clahe(dark[::-1], 3.0, (4, 4)))


def test_gamma_correct():
    dark = _dark()
    auto = il.gamma_correct(dark)
    assert abs(auto.mean() - 127.5) < abs(dark.mean() - 127.5) - 30
    levels = np.rint(255 * (np.arange(256) / 255) ** 2.0).astype(np.uint8)
    np.testing.assert_array_equal(il.gamma_correct(dark, 2.0), levels[dark])
    quarter = np.zeros((2, 2, 3), np.uint8)
    quarter[0], quarter[1] = 0, 127  # mean 63.5 / 255 ~ 0.249 -> gamma ~ 0.5
    g = math.log(0.5) / math.log(63.5 / 255)
    assert abs(g - 0.5) < 0.01
    assert il.gamma_correct(quarter)[1, 0, 0] == round(255 * (127 / 255) ** g)


def test_multi_scale_retinex():
    dark = _dark()
    out = il.multi_scale_retinex(dark)
    assert out.shape == dark.shape and out.dtype == np.uint8
    assert out.mean() > dark.mean() + 30
    assert out.min() == 0 and out.max() == 255  # the stretch spans the range
    const = np.full((16, 16, 3), 40, np.uint8)
    np.testing.assert_array_equal(il.multi_scale_retinex(const), const)
    batch = il.multi_scale_retinex(np.stack([dark, dark]), sigmas=(5.0,))
    np.testing.assert_array_equal(batch[0], il.multi_scale_retinex(dark, sigmas=(5.0,)))


def test_enhancer_registry():
    assert set(il.ENHANCERS) == {"none", "clahe", "gamma", "msr"}
    x = np.stack([_dark(32), _dark(32, seed=1)])
    for name, fn in il.ENHANCERS.items():
        y = fn(x)
        assert y.shape == x.shape and y.dtype == np.uint8, name
    np.testing.assert_array_equal(il.ENHANCERS["none"](x), x)


# ------------------------------------------------------------------------------------------
# numpy / JAX agreement, per-example parameters, jit
# ------------------------------------------------------------------------------------------

_AGREEMENT = [
    # (numpy op, JAX op, per-example parameters)
    (il.gamma, ij.gamma, [0.3, 1.0, 1.8]),
    (il.contrast, ij.contrast, [0.5, 1.3, 2.0]),
    (il.brightness, ij.brightness, [-0.2, 0.0, 0.15]),
    (il.color_temperature, ij.color_temperature, [3000.0, 6500.0, 9500.0]),
    (il.reduce_brightness, ij.reduce_brightness, [0.2, 0.5, 1.0]),
    (il.sepia, ij.sepia, [0.0, 0.5, 1.0]),
]


@pytest.mark.parametrize("np_op,jax_op,params", _AGREEMENT,
                         ids=[a[0].__name__ for a in _AGREEMENT])
def test_numpy_jax_agreement(np_op, jax_op, params):
    xu, xf = _images(3, 16)
    got = np.asarray(jax.jit(jax_op)(xf, jnp.asarray(params)))
    assert got.dtype == np.float32 and got.min() >= 0 and got.max() <= 1
    ref_f = np.stack([np_op(xf[i], p) for i, p in enumerate(params)])
    np.testing.assert_allclose(got, ref_f, atol=1e-5)
    ref_u = np.stack([np_op(xu[i], p) for i, p in enumerate(params)])
    np.testing.assert_allclose(got, ref_u / 255.0, atol=U8 / 2 + 1e-5)
    np.testing.assert_allclose(np.asarray(jax_op(xf, params[1])), np_op(xf, params[1]),
                               atol=1e-5)  # scalar parameter broadcasts over the batch


def test_numpy_jax_agreement_directional_mixed_noise():
    xu, xf = _images(4, 16)
    dirs, strength = np.array([0, 1, 2, 3]), np.array([0.2, 0.5, 0.8, 1.0], np.float32)
    got = np.asarray(jax.jit(ij.directional_light)(xf, dirs, strength))
    ref = np.stack([il.directional_light(xf[i], il.SIDE_DIRECTIONS[d], strength[i])
                    for i, d in enumerate(dirs)])
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ij.directional_light(xf, "bottom", 0.4)),
                               il.directional_light(xu, "bottom", 0.4) / 255.0, atol=U8)
    g, c = np.array([0.4, 1.0, 1.5, 1.8]), np.array([1.8, 0.6, 1.0, 0.5])
    got = np.asarray(ij.mixed(xf, gamma=g, contrast=c, direction=dirs, strength=strength))
    ref = np.stack([il.mixed(xf[i], gamma=g[i], contrast=c[i], direction=int(dirs[i]),
                             strength=strength[i]) for i in range(4)])
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ij.mixed(xf, gamma=g)),
                               np.stack([il.gamma(xf[i], g[i]) for i in range(4)]), atol=1e-5)
    key = jax.random.key(7)
    sigma = np.array([0.0, 0.01, 0.05, 0.1], np.float32)
    got = np.asarray(ij.add_noise(key, xf, sigma))
    noise = np.asarray(jax.random.normal(key, xf.shape, jnp.float32))
    ref = np.stack([il.add_noise(xf[i], sigma[i], noise=noise[i]) for i in range(4)])
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_array_equal(got, np.asarray(ij.add_noise(key, xf, sigma)))


def test_jax_simulate_low_light_matches_numpy():
    xu, xf = _images(4, 16)
    y, p = jax.jit(functools.partial(ij.simulate_low_light, return_params=True))(
        jax.random.key(1), xf)
    assert y.shape == xf.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    for name, (lo, hi) in il.SIMULATE_RANGES.items():
        v = np.asarray(p[name])
        assert v.shape == (4,) and len(set(v.tolist())) == 4 and v.min() >= lo and v.max() <= hi
    noise = np.asarray(p["noise"])
    ref = np.stack([il.apply_simulate(xf[i], brightness=float(p["brightness"][i]),
                                      sepia_strength=float(p["sepia_strength"][i]),
                                      noise_sigma=float(p["noise_sigma"][i]), noise=noise[i])
                    for i in range(4)])
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ij.simulate_low_light(jax.random.key(1), xf)),
                               np.asarray(y), atol=1e-6)  # eager == jit, same key
    assert float(y.mean()) < 0.7 * xf.mean()


def test_jax_apply_protocol():
    x = jnp.full((2000, 2, 2, 3), 0.5, jnp.float32)
    protocol = jax.jit(functools.partial(ij.apply_protocol, return_params=True))
    y, ids, p = protocol(jax.random.key(0), x)
    ids, p = np.asarray(ids), {k: np.asarray(v) for k, v in p.items()}
    names = [cond.CONDITIONS[i] for i in ids]
    groups = collections.Counter(cond.group(n) for n in names)
    for g, frac in zip(("low", "side", "over"), il.PAPER_B_MIX, strict=True):
        assert abs(groups[g] / 2000 - frac) < 0.04
    assert set(names) == set(cond.CONDITIONS) - {cond.NORMAL}
    assert p["gamma"].min() >= 0.3 and p["gamma"].max() <= 1.8
    assert p["contrast"].min() >= 0.5 and p["contrast"].max() <= 2.0
    for i in range(0, 2000, 7):
        kw = {k: float(p[k][i]) for k in ("gamma", "contrast", "strength")}
        assert il.dominant_condition(direction=int(p["direction"][i]), **kw) == names[i]
    ref = jax.jit(ij.mixed)(x, **p)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=1e-6)


def test_photometric_augment():
    key = jax.random.key(0)
    _, x = _images(8, 16)
    aug = jax.jit(functools.partial(ij.photometric_augment, return_params=True))
    y, p = aug(key, x)
    assert y.shape == x.shape and y.dtype == jnp.float32
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    y2, _ = aug(key, x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y2))  # same key -> same output
    y3, _ = aug(jax.random.key(1), x)
    assert not np.allclose(np.asarray(y), np.asarray(y3))
    np.testing.assert_allclose(np.asarray(ij.photometric_augment(key, x)), np.asarray(y),
                               atol=1e-6)  # jit == eager
    # Everything disabled (or p = 0) is the identity, bit for bit.
    off = dict(brightness=None, contrast=None, gamma=None, color_temperature=None)
    np.testing.assert_array_equal(np.asarray(ij.photometric_augment(key, x, **off)), x)
    np.testing.assert_array_equal(np.asarray(ij.photometric_augment(key, x, p=0.0)), x)
    # One component enabled with p = 1 is exactly that op with the drawn per-example parameters.
    only_gamma = {**off, "gamma": (0.3, 1.8)}
    yg, pg = ij.photometric_augment(key, x, p=1.0, return_params=True, **only_gamma)
    assert len(set(np.asarray(pg["gamma"]).tolist())) == 8
    np.testing.assert_array_equal(np.asarray(pg["contrast"]), 1.0)
    np.testing.assert_allclose(np.asarray(yg), np.asarray(ij.gamma(x, pg["gamma"])), atol=1e-6)
    only_temp = {**off, "color_temperature": (3000.0, 9000.0)}
    yt, pt = ij.photometric_augment(key, x, p=1.0, return_params=True, **only_temp)
    ref = np.stack([il.color_temperature(x[i], float(pt["color_temperature"][i]))
                    for i in range(8)])
    np.testing.assert_allclose(np.asarray(yt), ref, atol=1e-5)


def test_photometric_param_ranges():
    x = jnp.full((4000, 1, 1, 3), 0.5, jnp.float32)
    _, p = ij.photometric_augment(jax.random.key(3), x, p=1.0, return_params=True)
    g, c = np.asarray(p["gamma"]), np.asarray(p["contrast"])
    assert 0.3 <= g.min() < 0.35 and 1.75 < g.max() <= 1.8
    assert 0.5 <= c.min() < 0.55 and 1.9 < c.max() <= 2.0
    assert abs((c < 1.0).mean() - 0.5) < 0.03  # log-uniform: halving as likely as doubling
    b, t = np.asarray(p["brightness"]), np.asarray(p["color_temperature"])
    assert -0.2 <= b.min() and b.max() <= 0.2 and 4000 <= t.min() and t.max() <= 9000
    _, ph = ij.photometric_augment(jax.random.key(3), x, p=0.5, return_params=True)
    assert abs((np.asarray(ph["gamma"]) != 1.0).mean() - 0.5) < 0.03


def test_photometric_from_config():
    key = jax.random.key(2)
    _, x = _images(4, 8)
    cfg = {"gamma": [0.5, 1.5], "contrast": None, "p": 1.0}
    got = ij.photometric_augment_from_config(key, x, cfg)
    want = ij.photometric_augment(key, x, gamma=(0.5, 1.5), contrast=None, p=1.0)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
