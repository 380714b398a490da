"""tools/reproduce.py: the plan (shared runs, dependencies, budgets), the scheduler, the
statistics over seeds (against scipy), and one tiny end-to-end reproduction in a subprocess."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from tests.helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
import _reproduce_grid as grid  # noqa: E402
import _reproduce_tables as tables_lib  # noqa: E402
import reproduce  # noqa: E402


def _config(name, arg):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg).to_dict()


# ------------------------------------------------------------------------------ the plan
@pytest.mark.parametrize("scale", ["smoke", "cpu", "full"])
def test_rows_sharing_a_run_have_identical_configs(scale):
    """b_aug stands for Table 8's "no masking" and Table 9's "none", b_full for the grid's
    iResNet-100 + ArcFace cell (Table 6(b) trains every cell with all modules): those
    experiments must be the same config apart from their label."""
    deps = "relight_from=/r,unet_from=/u"
    for ref_arg, args in (("exp=aug", ("exp=mask_none", "exp=seg_none",
                                       "exp=grid,backbone=r100,loss=arcface,modules=aug")),
                          (f"exp=full,{deps}", (f"exp=grid,backbone=r100,loss=arcface,"
                                                f"modules=full,{deps}",))):
        ref = _config("paper_b.py", f"{ref_arg},scale={scale}")
        for arg in args:
            other = _config("paper_b.py", f"{arg},scale={scale}")
            assert {k: v for k, v in other.items() if k != "exp"} == \
                   {k: v for k, v in ref.items() if k != "exp"}, arg


def test_grid_with_all_modules_loads_the_given_module_runs_at_every_scale():
    for scale in ("smoke", "cpu"):
        c = _config("paper_b.py", f"exp=grid,backbone=vit_b,loss=magface,modules=full,"
                                  f"relight_from=/r,unet_from=/u,scale={scale}")
        assert c["modules"]["relight"]["enabled"] and c["modules"]["relight"]["init_from"] == "/r"
        assert c["modules"]["mask"]["source"] == "segmenter"
        assert c["modules"]["mask"]["init_from"] == "/u"
    # at smoke size the default paths (which a smoke run has not trained) are dropped
    c = _config("paper_b.py", "exp=full,scale=smoke")
    assert c["modules"]["relight"]["init_from"] == c["modules"]["mask"]["init_from"] == ""
    c = _config("paper_b.py", "exp=grid,modules=aug,scale=cpu")
    assert not c["modules"]["relight"]["enabled"] and c["modules"]["mask"]["source"] != "segmenter"


def test_cpu_plan_shares_runs_orders_dependencies_and_fits_the_budget(tmp_path):
    out = str(tmp_path)
    jobs = reproduce.build_plan(grid.DEFAULT_GRIDS["cpu"], "cpu", [0, 1, 2], out)
    ids = [j.id for j in jobs]
    assert len(ids) == len(set(ids))
    pos = {j: i for i, j in enumerate(ids)}
    for j in jobs:
        assert all(pos[d] < pos[j.id] for d in j.deps), j.id
    # the augmentation run serves three tables, once per seed; modules once, seed 0
    assert [j.id for j in jobs if j.run.key == "b_aug"] == ["b_aug/s0", "b_aug/s1", "b_aug/s2"]
    assert [j.id for j in jobs if j.run.key in ("relight", "skin_unet")] == \
           ["relight/s0", "skin_unet/s0"]
    by_id = {j.id: j for j in jobs}
    full = " ".join(by_id["b_full/s2"].command)
    assert f"relight_from={out}/runs/relight/s0" in full
    assert f"unet_from={out}/runs/skin_unet/s0" in full
    assert "--config.seed=2" in full and "--config.total_steps=150" in full
    assert "freeze_steps=37" in full and "--config.optim.warmup_steps=30" in full
    routed = " ".join(by_id["a_routed/s1"].command)
    for dep in ("lighting_from=%s/runs/a_light/s1", "normal_from=%s/runs/a_clean_se/s1",
                "low_from=%s/runs/a_dist_se/s1"):
        assert dep % out in routed
    assert "total_steps" not in routed  # no training
    assert by_id["a_routed/s1"].deps == ("a_light/s1", "a_clean_se/s1", "a_dist_se/s1")
    # the default cpu grids at 3 seeds: about an hour by the cost model
    assert 50 < sum(j.estimate for j in jobs) / 60 < 75
    assert not any(j.run.key.startswith("b_vit") for j in jobs)  # backbone_loss is opt-in


def test_tiny_plan_keeps_pretrained_modules_and_utkface_reaches_paper_a(tmp_path):
    jobs = {j.id: j for j in reproduce.build_plan(["b_table6", "a_tables"], "tiny", [0], "/o",
                                                  utkface="/data/utk")}
    cmd = jobs["b_full/s0"].command
    assert "--config.modules.relight.init_from=/o/runs/relight/s0" in cmd
    assert "--config.modules.mask.init_from=/o/runs/skin_unet/s0" in cmd
    assert "--config.total_steps=2" in cmd and "--config.eval_every=2" in cmd
    assert "data=utkface,root=/data/utk" in jobs["a_nat_se/s0"].command[3]
    assert "data=utkface" not in jobs["b_full/s0"].command[3]
    assert jobs["a_nat_se/s0"].command[3].startswith(
        "--config=configs/paper_a.py:train=natural,attention=se,scale=smoke")


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, capsys):
    out = tmp_path / "r"
    assert reproduce.main(["--size=cpu", "--seeds=3", f"--out={out}", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "plan: 54 runs" in text and "estimated" in text and "lowlight.main" in text
    assert not out.exists()
    with pytest.raises(SystemExit):
        reproduce.main(["--only=b_table7", "--dry-run"])


def test_real_data_reaches_paper_b_recognition_runs_and_their_tables(tmp_path, capsys):
    """--rec / --val-targets: paper B's recognition runs train on the pack and evaluate on its
    pair sets (config arguments of lowlight.recipes.real_data), the pretrained modules and
    paper A stay synthetic, and the recognition tables report the first set."""
    pack = tmp_path / "ms1m"
    pack.mkdir()
    for f in ("train.rec", "train.idx", "lfw.bin", "cfp_fp.bin"):
        (pack / f).write_bytes(b"")
    jobs = {j.id: j for j in reproduce.build_plan(
        ["b_table6", "a_lighting"], "cpu", [0], "/o", rec=str(pack), val_targets="lfw+cfp_fp")}
    arg = jobs["b_full/s0"].command[3]
    assert f"data=recordio,root={pack},val_targets=lfw+cfp_fp," in arg
    for other in ("relight/s0", "skin_unet/s0", "a_light/s0"):
        assert "recordio" not in " ".join(jobs[other].command)
    t6, light = grid.tables(["b_table6", "a_lighting"], "lfw")
    assert [m.key for m in t6.metrics] == ["lfw/acc", "lfw_illum/acc", "lfw_illum/auc",
                                           "lfw_illum/eer", "lfw_illum/tpr@fpr=1e-2"]
    assert t6.metrics[1].label == "lfw + protocol acc" and t6.note.startswith("Real data")
    assert light == grid.TABLES["a_lighting"][0]  # not a recognition table: unchanged
    assert [m.key for m in grid.tables(["b_modules"], "lfw")[0].metrics][0] == \
        "synth_val/{m}/psnr"  # the relighting net's own table stays synthetic
    out = tmp_path / "r"
    assert reproduce.main(["--size=cpu", "--only=b_table6", f"--out={out}", f"--rec={pack}",
                           "--val-targets=lfw", "--dry-run"]) == 0
    assert f"root={pack}" in capsys.readouterr().out
    for bad in ([f"--rec={tmp_path}"], ["--val-targets=lfw"],
                [f"--rec={pack}", "--val-targets=agedb_30"]):
        with pytest.raises(SystemExit):
            reproduce.main(["--size=cpu", "--dry-run", *bad])


# ------------------------------------------------------------------------------ scheduler
def _job(key, seed=0, deps=()):
    run = grid.Run(key, "x.py", "", "lighting")
    return reproduce.Job(f"{key}/s{seed}", run, seed, f"/w/{key}", ("py",), tuple(deps), 1, 1.0)


@pytest.mark.parametrize("parallel", [1, 3])
def test_scheduler_runs_dependencies_first_and_skips_dependants_of_failures(parallel):
    jobs = [_job("a"), _job("b", deps=["a/s0"]), _job("bad"), _job("c", deps=["b/s0", "bad/s0"]),
            _job("d", deps=["b/s0"]), _job("e")]
    started = []

    def run_one(job):
        started.append(job.id)
        if job.id == "bad/s0":
            return {"status": "failed", "error": "boom"}
        if job.id == "e/s0":
            raise RuntimeError("crashed")
        return {"status": "ok"}

    res = reproduce.run_jobs(jobs, run_one, parallel=parallel)
    assert {k: v["status"] for k, v in res.items()} == {
        "a/s0": "ok", "b/s0": "ok", "bad/s0": "failed", "c/s0": "skipped", "d/s0": "ok",
        "e/s0": "failed"}
    assert started.index("a/s0") < started.index("b/s0") < started.index("d/s0")
    assert "c/s0" not in started and "bad/s0" in res["c/s0"]["error"]
    # resuming: dependencies finished in an earlier invocation count as done
    started.clear()
    res = reproduce.run_jobs(jobs[1:2], run_one, parallel=parallel,
                             finished_before={"a/s0": {"status": "ok"}})
    assert started == ["b/s0"] and res["b/s0"]["status"] == "ok" and "a/s0" in res


# ------------------------------------------------------------------------------ statistics
def _write_run(workdir, step, values, evaluate=True):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": step, "train/loss": 1.0}) + "\n")
        f.write(json.dumps({"step": step - 1, "m/acc": -5.0}) + "\n")  # an earlier evaluation
        train_vals = {k: (v + 100 if evaluate else v) for k, v in values.items()}
        f.write(json.dumps({"step": step, **train_vals}) + "\n")
        if evaluate:  # lowlight.evaluate's record wins
            f.write(json.dumps({"step": step, "source": "evaluate", **values}) + "\n")


def test_aggregate_equals_eq18_and_scipy_t_tests(tmp_path):
    base = {"m/acc": [0.90, 0.92, 0.91], "m/eer": [0.10, 0.12, 0.11]}
    new = {"m/acc": [0.95, 0.97, 0.93], "m/eer": [0.08, float("nan"), 0.07]}
    jobs_by_run, status = {}, {}
    for run, vals in (("base", base), ("new", new), ("gone", base)):
        for seed in range(3):
            wd = str(tmp_path / run / f"s{seed}")
            _write_run(wd, 10, {k: v[seed] for k, v in vals.items()}, evaluate=seed != 1)
            job = _job(run, seed)
            job = reproduce.Job(job.id, job.run, seed, wd, (), (), 1, 1.0)
            jobs_by_run.setdefault(run, []).append(job)
            status[job.id] = "failed" if run == "gone" else "ok"
    table = grid.Table("t", "T", (grid.Row("base", "base"), grid.Row("new", "new"),
                                  grid.Row("gone", "gone")),
                       (grid.Metric("m/acc", "acc"), grid.Metric("m/eer", "eer", "min")),
                       baseline="base")
    for test in ("welch", "student", "paired"):
        out = tables_lib.aggregate([table], jobs_by_run, status, test)["t"]["rows"]
        b, n = out["base"]["stats"]["m/acc"], out["new"]["stats"]["m/acc"]
        # seeds 0, 2: the evaluate record overrides the training-time one (written +100);
        # seed 1 has no evaluate record: its last training-time evaluation is used
        a_vals = base["m/acc"]
        assert b["values"] == pytest.approx(a_vals)
        assert b["mean"] == pytest.approx(np.mean(a_vals))
        assert b["half_width"] == pytest.approx(1.96 * np.std(a_vals, ddof=1) / math.sqrt(3))
        new_vals = new["m/acc"]
        ref = (stats.ttest_rel(new_vals, a_vals) if test == "paired" else
               stats.ttest_ind(new_vals, a_vals, equal_var=test == "student"))
        assert n["ttest"]["t"] == pytest.approx(ref.statistic)
        assert n["ttest"]["p"] == pytest.approx(ref.pvalue)
        assert b["ttest"] is None
    eer = out["new"]["stats"]["m/eer"]
    assert eer["n"] == 2 and eer["seeds"] == [0, 2] and eer["mean"] == pytest.approx(0.075)
    gone = out["gone"]["stats"]["m/acc"]
    assert gone["n"] == 0 and math.isnan(gone["mean"]) and gone["ttest"] is None
    assert tables_lib.fmt_cell(gone, 3, out["gone"]["runs"]) == "failed"
    cell = tables_lib.fmt_cell(eer, 3, out["new"]["runs"])
    assert cell.startswith(f"0.075 ± {1.96 * np.std([0.08, 0.07], ddof=1) / math.sqrt(2):.3f}"
                           " (n=2) (p=")
    path = str(tmp_path / "summary.json")
    tables_lib.write_summary(path, {"x": float("nan")}, {"t": {"rows": out}}, {})
    text = open(path).read()
    assert "NaN" not in text and json.loads(text)["x"] is None


# ------------------------------------------------------------------------------ end to end
def _figures(workdir):
    """The evaluated step's metrics, read straight from metrics.jsonl."""
    recs = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    step = [r for r in recs if r.get("source") == "evaluate"][-1]["step"]
    out = {}
    for r in recs:
        if r["step"] == step:
            out.update(r)
    return out


def test_tiny_reproduction_end_to_end(tmp_path):
    out = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as users
    cmd = [sys.executable, os.path.join(ROOT, "tools", "reproduce.py"), "--size=tiny",
           "--seeds=2", "--only=a_lighting", f"--out={out}", "--jobs=2"]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[  4/4] ok" in proc.stdout
    summary = json.load(open(out / "summary.json"))
    md = open(out / "tables.md").read()
    assert summary["size"] == "tiny" and summary["seeds"] == [0, 1]
    assert "--only=a_lighting" in md.splitlines()[3] and "git commit `" in md
    rows = summary["tables"]["a_lighting"]["rows"]
    for label, run in (("binary: simulated low light vs normal", "a_light"),
                       ("4 classes: normal / low / side / over", "a_light4")):
        for key, digits in (("val/acc", 3), ("val/ece", 4)):
            vals = [_figures(str(out / "runs" / run / f"s{s}"))[key] for s in (0, 1)]
            st = rows[label]["stats"][key]
            assert st["values"] == pytest.approx(vals)
            assert st["mean"] == pytest.approx(np.mean(vals))
            assert st["half_width"] == pytest.approx(1.96 * np.std(vals, ddof=1) / math.sqrt(2))
            assert (f"{np.mean(vals):.{digits}f} ± "
                    f"{1.96 * np.std(vals, ddof=1) / math.sqrt(2):.{digits}f}") in md
        assert os.path.exists(out / "runs" / run / "s1" / "eval" / "2" / "reliability_val.png")
    assert "](plots/a_lighting.png)" in md and (out / "plots" / "a_lighting.png").exists()
    assert "## Appendix: per-run figures" in md and "`runs/a_light4/s1`" in md
    # the same command again is refused; with --resume nothing is retrained
    again = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr
    lines = sum(1 for _ in open(out / "runs" / "a_light" / "s0" / "metrics.jsonl"))
    resumed = subprocess.run(cmd + ["--resume"], cwd=str(tmp_path), env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "(0 to run, 4 already finished)" in resumed.stdout
    assert sum(1 for _ in open(out / "runs" / "a_light" / "s0" / "metrics.jsonl")) == lines
    assert json.load(open(out / "summary.json"))["tables"] == summary["tables"]
