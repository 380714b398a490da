"""Paper A's tasks end to end on the smoke config: attributes (with DistortionFace /
NaturalFace test sets and per-condition metrics), the lighting classifier, early stopping."""

import json
import os

import numpy as np
import pytest

from lowlight import main as ll_main
from lowlight.metric_writer import read_metrics
from tests.helpers import load_config


def _config(arg, **overrides):
    return load_config("paper_a", arg, **overrides)


def test_attribute_run_reports_paper_a_metrics_per_test_set(tmp_path):
    wd = str(tmp_path / "attr")
    last = ll_main.run(_config("smoke,train=distortion,attention=cbam"), wd)
    for test in ("test_distortion", "test_natural"):
        for m in ("age_mae", "gender_acc", "ethnicity_acc", "loss"):
            assert np.isfinite(last[f"{test}/{m}"])
    # DistortionFace: every image simulated (tagged low); NaturalFace: both kinds present.
    assert "test_distortion/low/age_mae" in last and "test_distortion/normal/age_mae" not in last
    assert "test_natural/low/age_mae" in last and "test_natural/normal/age_mae" in last
    assert 0.0 <= last["test_natural/gender_acc"] <= 1.0
    assert any(k.startswith("test_natural/age_mae_") and k.endswith("-49") for k in last)
    cfg = json.load(open(os.path.join(wd, "config.json")))
    assert cfg["task_cfg"]["loss_weights"] == {"age": 0.1, "gender": 1.0, "ethnicity": 1.0}
    assert cfg["model"]["kwargs"]["attention"] == "cbam"
    assert os.path.exists(os.path.join(wd, "eval", "3", "test_natural.md"))


def test_early_stopping_stops_and_stays_stopped(tmp_path):
    wd = str(tmp_path / "es")
    # min_delta huge: no evaluation after the first counts as an improvement
    c = _config("smoke", total_steps=50, eval_every=1, ckpt_every=1, **{
        "early_stopping.patience": 2, "early_stopping.min_delta": 1e9})
    c.evals = {"val": c.evals.val}
    ll_main.run(c, wd)
    recs = read_metrics(wd)
    train_steps = [r["step"] for r in recs if "train/loss" in r]
    assert max(train_steps) == 3  # evals at 1 (best), 2, 3 -> two without improvement
    assert any(r.get("early_stopped") == 1.0 and r["best_step"] == 1 for r in recs)
    state = json.load(open(os.path.join(wd, "early_stopping.json")))
    assert state["best_step"] == 1
    ll_main.run(c, wd)  # resuming a run that stopped early does nothing
    assert max(r["step"] for r in read_metrics(wd) if "train/loss" in r) == 3


@pytest.mark.parametrize("labels,classes", [("binary", 2), ("groups", 4)])
def test_lighting_classifier_runs(tmp_path, labels, classes):
    wd = str(tmp_path / labels)
    last = ll_main.run(_config(f"smoke,exp=lighting,labels={labels}"), wd)
    assert 0.0 <= last["val/acc"] <= 1.0
    cfg = json.load(open(os.path.join(wd, "config.json")))
    assert cfg["model"]["kwargs"]["num_classes"] == classes


def test_routed_method_uses_the_classifier_and_the_experts(tmp_path):
    """Paper A method 2 as one model. With the same attribute run as both experts, the routed
    predictions must equal that model's own, whatever the routing."""
    wd_l, wd_a, wd_r = (str(tmp_path / n) for n in ("light", "attr", "routed"))
    ll_main.run(_config("smoke,exp=lighting,labels=binary"), wd_l)
    c = _config("smoke,train=natural")
    c.evals = {"val": c.evals.val, "test_natural": c.evals.test_natural}
    own = ll_main.run(c, wd_a)
    r = _config(f"smoke,exp=routed,lighting_from={wd_l},normal_from={wd_a},low_from={wd_a}")
    r.evals = {"test_natural": r.evals.test_natural}
    res = ll_main.run(r, wd_r)
    for m in ("age_mae", "gender_acc", "ethnicity_acc"):
        np.testing.assert_allclose(res[f"test_natural/{m}"], own[f"test_natural/{m}"],
                                   rtol=1e-5)
    assert res["test_natural/routed_to_0"] + res["test_natural/routed_to_1"] == 1.0
    assert 0.0 <= res["test_natural/lighting_acc"] <= 1.0
    assert os.path.exists(os.path.join(wd_r, "eval", "0", "routed.md"))
    with pytest.raises(FileNotFoundError, match="not a lowlight run"):
        ll_main.run(_config(f"smoke,exp=routed,lighting_from={tmp_path}/nope"),
                    str(tmp_path / "bad"))
