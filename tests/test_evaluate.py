"""`python -m lowlight.evaluate`: checkpoint evaluation with the training loop's evaluators."""

import os

import numpy as np
import pytest

from lowlight import evaluate as ll_eval
from lowlight import main as ll_main
from lowlight.metric_writer import read_metrics
from tests.helpers import load_config


def test_evaluate_matches_in_training_evaluation_and_writes_a_report(tmp_path):
    wd = str(tmp_path / "rec")
    c = load_config("vit_magface", "smoke", total_steps=2, eval_every=2, ckpt_every=1)
    ll_main.run(c, wd)
    trained = [r for r in read_metrics(wd) if "synth_val/acc" in r][-1]
    res = ll_eval.evaluate(wd)  # latest = step 2
    assert res["step"] == 2
    for key in ("synth_val/acc", "synth_val/auc", "synth_illum/eer", "synth_clean/acc"):
        np.testing.assert_allclose(res[key], trained[key], atol=1e-6)
    last = read_metrics(wd)[-1]
    assert last["source"] == "evaluate" and last["step"] == 2
    out = os.path.join(wd, "eval", "2")
    assert {"report.md", "roc.png", "scores.npz"} <= set(os.listdir(out))
    scores = np.load(os.path.join(out, "scores.npz"))
    assert scores["synth_val/scores"].shape == scores["synth_val/issame"].shape
    assert "per lighting condition" in open(os.path.join(out, "report.md")).read()
    assert ll_eval.evaluate(wd, step=1)["step"] == 1


def test_follow_evaluates_every_checkpoint_of_a_supervised_run(tmp_path):
    wd = str(tmp_path / "relight")
    ll_main.run(load_config("relight", "smoke", ckpt_every=1, keep_ckpts=5), wd)
    done = ll_eval.follow(wd, poll=0.01, timeout=5)
    assert done == [1, 2, 3]
    recs = [r for r in read_metrics(wd) if r.get("source") == "evaluate"]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(np.isfinite(r["synth_val/relight/psnr"]) for r in recs)
    assert "psnr" in open(os.path.join(wd, "eval", "3", "report.md")).read()


# ---------------------------------------------------------------------------------------------
# non-recognition tasks: runs whose checkpoint holds freshly initialised weights (the report
# logic does not care whether a model is trained; skipping training keeps these tests fast)
# ---------------------------------------------------------------------------------------------


def _fake_run(workdir, config, seed=0, step=1):
    """config.json + a checkpoint of `config.model` with random weights (fan-in scaled
    kernels, unit BatchNorm scales and variances), as a trained run of `config` would leave
    them. The weights are drawn in numpy on `jax.eval_shape` of the init: compiling a
    MobileNetV2 init costs ~20-40 s on a 2-core CPU, this well under one."""
    import jax
    import orbax.checkpoint as ocp

    from lowlight import config_lib, models

    config_lib.write_or_check(config, workdir)
    model = models.create(config.model.name, **dict(config.model.kwargs))
    x = np.zeros((2, config.data.size, config.data.size, 3), np.float32)
    shapes = jax.eval_shape(lambda k: model.init({"params": k, "dropout": k}, x, train=False),
                            jax.random.key(0))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name in ("scale", "var"):
            return np.ones(leaf.shape, leaf.dtype)
        if name == "mean":
            return np.zeros(leaf.shape, leaf.dtype)
        std = 1.0 / np.sqrt(max(1, int(np.prod(leaf.shape[:-1])))) if name == "kernel" else 0.05
        return (rng.normal(size=leaf.shape) * std).astype(leaf.dtype)

    variables = jax.tree_util.tree_map_with_path(fill, shapes)
    state = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(workdir, "checkpoints", str(step), "state"), state)
    ckpt.wait_until_finished()
    ckpt.close()
    return workdir


def _ece(conf, correct, n_bins=10):
    """Guo et al.'s ECE bin by bin, independently of lowlight.eval.plots."""
    total = 0.0
    for m in range(n_bins):
        lo, hi = m / n_bins, (m + 1) / n_bins
        sel = [(lo < c <= hi) or (m == 0 and c == 0) for c in conf]
        sel = np.asarray(sel)
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return total


def test_attribute_report_per_condition_from_raw_predictions(tmp_path):
    from lowlight.attributes import AGE_BANDS

    c = load_config("paper_a", "smoke,train=natural")
    del c.evals["val"]
    wd = _fake_run(str(tmp_path / "attr"), c)
    res = ll_eval.evaluate(wd)
    out = os.path.join(wd, "eval", "1")
    assert {"report.md", "predictions.npz", "confusion_ethnicity_test_natural.png",
            "confusion_ethnicity_test_distortion.png"} <= set(os.listdir(out))
    p = np.load(os.path.join(out, "predictions.npz"))
    conds = p["test_natural/conditions"]
    assert set(conds.tolist()) == {"normal", "low"}  # NaturalFace: half simulated
    err = np.abs(p["test_natural/age_pred"] - p["test_natural/age"])
    # gender: female iff the logit > 0 (lowlight.losses.multitask.predict)
    gender_pred = (p["test_natural/gender_logit"] > 0).astype(int)
    eth_pred = p["test_natural/ethnicity_logits"].argmax(1)
    np.testing.assert_array_equal(gender_pred, p["test_natural/gender_pred"])
    np.testing.assert_array_equal(eth_pred, p["test_natural/ethnicity_pred"])
    for cond in ("normal", "low"):
        sel = conds == cond
        np.testing.assert_allclose(res[f"test_natural/{cond}/age_mae"], err[sel].mean(),
                                   rtol=1e-5)
        np.testing.assert_allclose(res[f"test_natural/{cond}/gender_acc"],
                                   np.mean(gender_pred[sel] == p["test_natural/gender"][sel]))
        np.testing.assert_allclose(res[f"test_natural/{cond}/ethnicity_acc"],
                                   np.mean(eth_pred[sel] == p["test_natural/ethnicity"][sel]))
        for lo, hi in AGE_BANDS:
            band = sel & (p["test_natural/age"] >= lo) & (p["test_natural/age"] <= hi)
            key = f"test_natural/{cond}/age_mae_{lo}-{hi}"
            assert (key in res) == band.any()
            if band.any():
                np.testing.assert_allclose(res[key], err[band].mean(), rtol=1e-5)
    text = open(os.path.join(out, "report.md")).read()
    for s in ("### test_natural", "| low |", "per age band", "Ethnicity confusion",
              "](confusion_ethnicity_test_natural.png)"):
        assert s in text, s
    counts = np.zeros((5, 5), int)
    np.add.at(counts, (p["test_natural/ethnicity"], eth_pred), 1)
    assert "| White | " + " | ".join(map(str, counts[0])) + " |" in text


def test_lighting_report_confusion_and_reliability(tmp_path):
    c = load_config("paper_a", "smoke,exp=lighting,labels=groups")
    wd = _fake_run(str(tmp_path / "light"), c, seed=3)
    res = ll_eval.evaluate(wd)
    out = os.path.join(wd, "eval", "1")
    assert {"confusion_val.png", "reliability_val.png", "predictions.npz"} <= set(os.listdir(out))
    p = np.load(os.path.join(out, "predictions.npz"))
    z = p["val/logits"].astype(np.float64)
    probs = np.exp(z - z.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    correct = probs.argmax(1) == p["val/labels"]
    assert res["val/acc"] == res["val/top1_acc"] == pytest.approx(correct.mean())
    assert res["val/ece"] == pytest.approx(_ece(probs.max(1), correct), abs=1e-9)
    text = open(os.path.join(out, "report.md")).read()
    assert f"ECE {res['val/ece']:.4f}" in text and "| side |" in text
    assert "](reliability_val.png)" in text and "](confusion_val.png)" in text


def test_routed_report_equals_its_expert_when_both_experts_are_one_model(tmp_path):
    light = _fake_run(str(tmp_path / "light"), load_config("paper_a", "smoke,exp=lighting"))
    c = load_config("paper_a", "smoke,train=distortion")
    c.evals = {"test_natural": c.evals.test_natural}
    attr = _fake_run(str(tmp_path / "attr"), c, seed=1)
    own = ll_eval.evaluate(attr)
    r = load_config("paper_a", f"smoke,exp=routed,lighting_from={light},normal_from={attr},"
                               f"low_from={attr}")
    r.evals = {"test_natural": r.evals.test_natural}
    from lowlight import config_lib

    wd = str(tmp_path / "routed")
    config_lib.write_or_check(r, wd)
    res = ll_eval.evaluate(wd)
    assert res["step"] == 0
    for m in ("age_mae", "gender_acc", "ethnicity_acc", "low/age_mae", "normal/gender_acc"):
        np.testing.assert_allclose(res[f"test_natural/{m}"], own[f"test_natural/{m}"],
                                   rtol=1e-5)
    assert res["test_natural/routed_to_0"] + res["test_natural/routed_to_1"] == 1.0
    p = np.load(os.path.join(wd, "eval", "0", "predictions.npz"))
    truth = (p["test_natural/conditions"] == "low").astype(int)
    assert res["test_natural/lighting_acc"] == pytest.approx(
        np.mean(p["test_natural/route"] == truth))
    text = open(os.path.join(wd, "eval", "0", "report.md")).read()
    assert "test_natural: router" in text and "](reliability_test_natural_router.png)" in text
    with pytest.raises(ValueError, match="routed run"):
        ll_eval.follow(wd, poll=0.01, timeout=1)
    # the report's metrics are the ones the routed task itself logs (one shared routing code)
    from lowlight.attributes import run_routed

    logged = run_routed(r, str(tmp_path / "routed_task"))
    for k, v in logged.items():
        np.testing.assert_allclose(res[k], v, rtol=1e-6, err_msg=k)


@pytest.mark.parametrize("name", ["relight", "skin_seg"])
def test_relight_and_skin_seg_reports_link_sample_grids(tmp_path, name):
    from PIL import Image

    c = load_config(name, "smoke")
    wd = _fake_run(str(tmp_path / name), c)
    ll_eval.evaluate(wd)
    out = os.path.join(wd, "eval", "1")
    text = open(os.path.join(out, "report.md")).read()
    assert "](samples_synth_val.png)" in text
    img = np.asarray(Image.open(os.path.join(out, "samples_synth_val.png")))
    n_cols = 3 if name == "relight" else 4
    size = c.data.size
    # one row per sample: SAMPLES_PER_CONDITION of each condition present (at most 7)
    rows = (img.shape[0] - 44 - 2) // (2 * size + 2)
    assert img.shape[1] == 90 + n_cols * (2 * size + 2) + 2
    assert 2 <= rows <= 7 * ll_eval.SAMPLES_PER_CONDITION
    assert img.shape[0] == 44 + rows * (2 * size + 2) + 2


def test_follow_stops_after_the_last_checkpoint_of_an_early_stopped_run(tmp_path):
    """A run that stopped early never reaches total_steps: --follow must not wait for it."""
    import json
    import time

    c = load_config("paper_a", "smoke,exp=lighting", total_steps=1000)
    wd = _fake_run(str(tmp_path / "light"), c, step=1)
    _fake_run(wd, c, step=2)
    with open(os.path.join(wd, "early_stopping.json"), "w") as f:
        json.dump({"patience": 1, "min_delta": 0.0, "mode": "min", "best": 0.1,
                   "best_step": 1, "wait": 1, "num_updates": 2}, f)
    t0 = time.time()
    assert ll_eval.follow(wd, poll=0.01, timeout=300) == [1, 2]
    assert time.time() - t0 < 150  # the idle timeout (300 s) was not what ended it
