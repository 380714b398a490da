"""lowlight.eval.plots: files are written at their stated pixel size and show the numbers they
return; the calibration (ECE) and confusion numbers against independent computations."""

import math

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import confusion_matrix

from lowlight.eval import plots


def _png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def _ece_loop(conf, correct, n_bins):
    """Guo et al. 2017 written out bin by bin: B_m = ((m-1)/M, m/M], B_1 also holds 0."""
    total, n = 0.0, len(conf)
    for m in range(1, n_bins + 1):
        lo, hi = (m - 1) / n_bins, m / n_bins
        members = [i for i in range(n) if (lo < conf[i] <= hi) or (m == 1 and conf[i] == 0.0)]
        if members:
            acc = sum(correct[i] for i in members) / len(members)
            avg = sum(conf[i] for i in members) / len(members)
            total += len(members) / n * abs(acc - avg)
    return total


def test_ece_golden_hand_computed():
    # bins of width 0.25: {0.1, 0.2} -> bin 1 (acc 1/2, conf 0.15); {0.5} -> bin 2 (boundary 0.5
    # belongs to (0.25, 0.5]); {0.7, 0.75} -> bin 3; {1.0} -> bin 4.
    conf = [0.1, 0.2, 0.5, 0.7, 0.75, 1.0]
    correct = [1, 0, 0, 1, 1, 1]
    cal = plots.calibration(conf, correct, n_bins=4)
    expected = (2 / 6 * abs(0.5 - 0.15) + 1 / 6 * abs(0 - 0.5) + 2 / 6 * abs(1 - 0.725)
                + 1 / 6 * abs(1 - 1.0))
    assert cal["ece"] == pytest.approx(expected, abs=1e-12)
    np.testing.assert_array_equal(cal["count"], [2, 1, 2, 1])
    assert cal["mce"] == pytest.approx(0.5)


@pytest.mark.parametrize("n_bins", [5, 10, 15])
def test_ece_matches_a_bin_by_bin_computation(n_bins):
    rng = np.random.default_rng(n_bins)
    conf = rng.uniform(0.2, 1.0, 500)
    conf[:20] = np.round(conf[:20] * n_bins) / n_bins  # values exactly on bin edges
    correct = (rng.uniform(size=500) < conf ** 2).astype(int)  # over-confident model
    cal = plots.calibration(conf, correct, n_bins)
    assert cal["ece"] == pytest.approx(_ece_loop(conf.tolist(), correct.tolist(), n_bins),
                                       abs=1e-12)
    assert cal["count"].sum() == 500
    assert cal["ece"] > 0.05  # conf² accuracy is clearly miscalibrated


def test_ece_of_a_calibrated_classifier_is_small_and_bad_input_fails():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0, 1, 200_000)
    correct = rng.uniform(size=conf.size) < conf
    assert plots.calibration(conf, correct, 10)["ece"] < 0.01
    with pytest.raises(ValueError, match="probabilities"):
        plots.calibration([0.5, 1.5], [1, 0])
    with pytest.raises(ValueError, match="equal-length"):
        plots.calibration([0.5], [1, 0])


def test_reliability_png_and_returned_numbers(tmp_path):
    rng = np.random.default_rng(1)
    conf = rng.uniform(0.5, 1.0, 300)
    correct = rng.uniform(size=300) < 0.7
    path = str(tmp_path / "rel.png")
    cal = plots.reliability(path, conf, correct, n_bins=10, title="t")
    assert _png(path).shape == (560, 480, 3)
    assert cal["ece"] == pytest.approx(_ece_loop(conf.tolist(), correct.tolist(), 10))


def test_confusion_counts_match_sklearn_and_png_size(tmp_path):
    rng = np.random.default_rng(2)
    y = rng.integers(0, 5, 400)
    p = np.where(rng.uniform(size=400) < 0.6, y, rng.integers(0, 5, 400))
    p[y == 3] = 0  # a class never predicted, one predicted for it
    path = str(tmp_path / "conf.png")
    counts = plots.confusion(path, y, p, ["a", "b", "c", "d", "e"], title="x")
    np.testing.assert_array_equal(counts, confusion_matrix(y, p, labels=range(5)))
    side = max(360, 80 + 70 * 5)
    assert _png(path).shape == (side, side + 90, 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        plots.confusion_counts([0, 5], [0, 1], 5)


def test_image_grid_places_the_mosaic_pixel_for_pixel(tmp_path):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (3, 8, 10, 3), dtype=np.uint8)
    masks = rng.uniform(size=(3, 8, 10)).astype(np.float32)
    path = str(tmp_path / "grid.png")
    mosaic = plots.image_grid(path, {"input": images, "mask": masks}, row_labels=["a", "b", "c"],
                              scale=2, pad=2, title="samples")
    assert mosaic.shape == (3 * (16 + 2) + 2, 2 * (20 + 2) + 2, 3)
    # cell (row 1, column "mask"): the mask upscaled 2x, grey
    cell = mosaic[2 + 18:2 + 18 + 16, 2 + 22:2 + 22 + 20]
    want = np.rint(masks[1] * 255).astype(np.uint8).repeat(2, 0).repeat(2, 1)
    np.testing.assert_array_equal(cell, np.repeat(want[..., None], 3, -1))
    np.testing.assert_array_equal(mosaic[2:18, 2:22], images[0].repeat(2, 0).repeat(2, 1))
    png = _png(path)
    assert png.shape == (mosaic.shape[0] + 44, mosaic.shape[1] + 90, 3)
    np.testing.assert_array_equal(png[-mosaic.shape[0]:, -mosaic.shape[1]:], mosaic)
    with pytest.raises(ValueError, match="differ in shape"):
        plots.image_grid(path, {"a": images, "b": masks[:2]})


def test_bars_with_ci_and_curves_write_pngs_of_the_stated_size(tmp_path):
    panels = {"acc": {"base": {"mean": 0.9, "half_width": 0.01, "values": [0.89, 0.91]},
                      "new": {"mean": 0.95, "half_width": math.nan, "values": [0.95]}},
              "eer": {"base": {"mean": 0.1, "half_width": 0.02, "values": [0.09, 0.11]},
                      "new": {"mean": math.nan, "half_width": math.nan, "values": []}},
              "auc": {"base": {"mean": 0.97, "half_width": 0.0, "values": [0.97, 0.97]}}}
    path = str(tmp_path / "bars.png")
    plots.bars_with_ci(path, panels, title="t", panel_px=(300, 200))
    assert _png(path).shape == (2 * 200 + 30, 2 * 300, 3)
    rng = np.random.default_rng(4)
    scores = rng.normal(size=200)
    issame = rng.uniform(size=200) < 0.5
    scores[issame] += 1.5
    for fn in (plots.roc, plots.det):
        p = str(tmp_path / f"{fn.__name__}.png")
        fn(p, {"x": (scores, issame)})
        assert _png(p).shape == (440, 550, 3)
    plots.cmc(str(tmp_path / "cmc.png"), {"x": np.linspace(0.5, 1, 20)})
    assert _png(str(tmp_path / "cmc.png")).shape == (440, 550, 3)
