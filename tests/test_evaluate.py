"""`python -m lowlight.evaluate`: checkpoint evaluation with the training loop's evaluators."""

import os

import numpy as np

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
