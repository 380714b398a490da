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
    # smoke / cpu scale: age in 20-year units, weight 1 (configs/paper_a.py, "age" argument)
    assert cfg["task_cfg"]["loss_weights"] == {"age": 1.0, "gender": 1.0, "ethnicity": 1.0}
    assert cfg["task_cfg"]["age_scale"] == 0.05 and cfg["model"]["kwargs"]["age_bias_init"] == 2.0
    assert cfg["model"]["kwargs"]["attention"] == "cbam"
    assert os.path.exists(os.path.join(wd, "eval", "3", "test_natural.md"))


@pytest.mark.parametrize("arg,scale,w,bias", [
    ("scale=full", 1.0, 0.1, 40.0),            # paper A: raw years, MSE weight 0.1
    ("scale=cpu", 0.05, 1.0, 2.0),
    ("scale=cpu,age=years", 1.0, 0.1, 40.0),
    ("scale=full,age=scaled", 0.05, 1.0, 2.0),
])
def test_age_units_follow_the_age_argument(arg, scale, w, bias):
    c = _config(arg)
    assert c.task_cfg.age_scale == scale and c.task_cfg.loss_weights.age == w
    assert c.model.kwargs.age_bias_init == bias


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
    # the routed config scores in years while the expert regressed age/20: outputs are converted
    r = _config(f"smoke,exp=routed,age=years,lighting_from={wd_l},normal_from={wd_a},"
                f"low_from={wd_a}")
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


def test_best_step_reads_metrics_and_existing_checkpoints(tmp_path):
    from lowlight.attributes import best_step

    wd = tmp_path / "run"
    for s in (2, 4, 6):
        (wd / "checkpoints" / str(s)).mkdir(parents=True)
    recs = [{"step": 1, "val/loss": 0.1},  # best, but its checkpoint is gone
            {"step": 2, "val/loss": 0.5}, {"step": 4, "val/loss": 0.3},
            {"step": 6, "val/loss": float("nan")}, {"step": 6, "train/loss": 0.0}]
    (wd / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert best_step(str(wd), "val/loss", "min") == 4
    assert best_step(str(wd), "val/loss", "max") == 2
    assert best_step(str(wd), "val/acc", "max") is None
    assert best_step(str(wd), "", "min") is None
