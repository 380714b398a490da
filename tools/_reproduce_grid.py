"""What `tools/reproduce.py` trains and how it tabulates it: runs, paper tables, sizes, costs.

A *run* is one `python -m lowlight.main` experiment (a config file + its arguments); a *table*
lists rows, each row pointing at a run, and the metrics (keys of the run's metrics.jsonl) that
are its columns. Tables share runs: paper B's "+ photometric augmentation" row of Table 6 is the
"no masking" row of Table 8, the "none" row of Table 9 and iResNet-100 + ArcFace of the backbone
× loss grid (the configs are identical apart from their `exp` label; tests/test_reproduce.py
checks it), so it is trained once per seed.

Runs marked `shared` (paper B's pretrained relighting net and skin segmenters) are trained once,
with seed 0, and feed every seed's recognition runs: the seeds vary the recognition training,
as a lab reusing one pretrained module would; their own tables therefore have n = 1.
"""

from __future__ import annotations

import dataclasses

SIZES = ("tiny", "cpu", "paper")


@dataclasses.dataclass(frozen=True)
class Dep:
    """A run this run needs: passed as config argument `arg=<that run's workdir>`.

    `tiny_override`: at tiny size paper_b.py (scale=smoke) drops pretrained-module paths; this
    `--config.<key>=<workdir>` puts the dependency back so tiny runs exercise the whole chain.
    """

    arg: str
    run: str
    tiny_override: str = ""


@dataclasses.dataclass(frozen=True)
class Run:
    key: str
    config: str            # file under configs/
    arg: str               # the part after the colon (size and dependencies are added)
    family: str            # cost / step-budget family (COSTS, STEPS)
    deps: tuple[Dep, ...] = ()
    shared: bool = False   # trained once (seed 0) for every seed
    select: str = "final"  # "final": last checkpoint; "best": early stopping's best step
    train: bool = True     # False: lowlight.main evaluates without training (routed)
    paper_a_data: bool = False  # takes data=utkface,root=... with --utkface


@dataclasses.dataclass(frozen=True)
class Metric:
    key: str               # metrics.jsonl key; "{x}" is filled from Row.fill
    label: str
    better: str = "max"    # "max" | "min"
    digits: int = 3


@dataclasses.dataclass(frozen=True)
class Row:
    label: str
    run: str
    paper: str = ""        # what the paper reports for this row (text)
    fill: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class Table:
    key: str
    title: str
    rows: tuple[Row, ...]
    metrics: tuple[Metric, ...]
    baseline: str | None = None   # row label the t-tests compare against
    note: str = ""


# ------------------------------------------------------------------------------ runs
def _b(key, exp, *deps):
    return Run(key, "paper_b.py", exp, "recognition", deps=tuple(deps))


_RELIGHT = Dep("relight_from", "relight", "modules.relight.init_from")
_UNET = Dep("unet_from", "skin_unet", "modules.mask.init_from")
_CNN3 = Dep("cnn3_from", "skin_cnn3", "modules.mask.init_from")


def _a(key, train, attention):
    return Run(key, "paper_a.py", f"train={train},attention={attention}", "attributes",
               select="best", paper_a_data=True)


RUNS: dict[str, Run] = {r.key: r for r in (
    Run("relight", "relight.py", "", "relight", shared=True),
    Run("skin_unet", "skin_seg.py", "model=unet", "skin_seg", shared=True),
    Run("skin_cnn3", "skin_seg.py", "model=seg_cnn3", "skin_seg", shared=True),
    _b("b_baseline", "exp=baseline"),
    _b("b_aug", "exp=aug"),
    _b("b_relight", "exp=relight", _RELIGHT),
    _b("b_full", "exp=full", _RELIGHT, _UNET),
    _b("b_mask_se", "exp=mask_se"),
    _b("b_mask_cbam", "exp=mask_cbam"),
    _b("b_mask_unet", "exp=mask_unet", _UNET),
    _b("b_seg_ycbcr", "exp=seg_ycbcr"),
    _b("b_seg_cnn3", "exp=seg_cnn3", _CNN3),
    # Table 6(b) trains every backbone × loss cell with all modules (= b_full for r100+arcface)
    *(_b(f"b_{bb}_{loss}", f"exp=grid,backbone={bb},loss={loss},modules=full", _RELIGHT, _UNET)
      for bb in ("r100", "vit_b") for loss in ("arcface", "adaface", "magface")
      if (bb, loss) != ("r100", "arcface")),  # = b_full
    Run("a_light", "paper_a.py", "exp=lighting,labels=binary", "lighting", paper_a_data=True),
    Run("a_light4", "paper_a.py", "exp=lighting,labels=groups", "lighting", paper_a_data=True),
    _a("a_clean_se", "clean", "se"),
    _a("a_dist_se", "distortion", "se"),
    _a("a_nat_se", "natural", "se"),
    _a("a_nat_none", "natural", "none"),
    _a("a_nat_cbam", "natural", "cbam"),
    Run("a_routed", "paper_a.py", "exp=routed", "routed", train=False, paper_a_data=True,
        deps=(Dep("lighting_from", "a_light"), Dep("normal_from", "a_clean_se"),
              Dep("low_from", "a_dist_se"))),
)}

# ------------------------------------------------------------------------------ tables
_VER = (Metric("synth_clean/acc", "clean acc"), Metric("synth_val/acc", "mixed-light acc"),
        Metric("synth_illum/acc", "protocol acc"), Metric("synth_illum/auc", "protocol AUC"),
        Metric("synth_illum/eer", "protocol EER", "min"),
        Metric("synth_illum/tpr@fpr=1e-2", "protocol TPR@FPR=1e-2"))


def _attr_metrics(test):
    return (Metric(f"{test}/age_mae", "age MAE", "min", 2),
            Metric(f"{test}/gender_acc", "gender acc"),
            Metric(f"{test}/ethnicity_acc", "ethnicity acc"),
            Metric(f"{test}/low/age_mae", "age MAE (low light)", "min", 2))


_A_ROWS = {
    "clean": Row("trained on clean (UTKFace stand-in), SE", "a_clean_se"),
    "dist": Row("trained on DistortionFace, SE", "a_dist_se"),
    "nat": Row("trained on NaturalFace, SE", "a_nat_se"),
    "routed": Row("routed: lighting CNN → clean / DistortionFace model", "a_routed"),
    "none": Row("trained on NaturalFace, no attention", "a_nat_none"),
    "cbam": Row("trained on NaturalFace, CBAM", "a_nat_cbam"),
}
_A_PAPER = {  # paper A Tables 1 / 2: age MAE / gender % / ethnicity %
    "table1": {"clean": "22.20 / 53.25 / 47.47", "dist": "7.11 / 86.17 / 69.39",
               "nat": "6.80 / 87.06 / 72.09", "routed": "7.11 / 86.17 / 69.39"},
    "table2": {"clean": "14.05 / 72.34 / 62.06", "dist": "11.23 / 76.56 / 56.83",
               "nat": "5.96 / 89.12 / 73.78", "routed": "6.37 / 88.11 / 71.67",
               "none": "6.50 / 86.89 / 72.47", "cbam": "6.21 / 88.62 / 73.90"},
}


def _a_rows(table):
    return tuple(dataclasses.replace(_A_ROWS[k], paper=p) for k, p in _A_PAPER[table].items())


_B_NOTE = ("Columns: held-out synthetic people under normal light (clean), the world's mixed "
           "light, and paper B's illumination protocol (its custom illumination dataset's "
           "stand-in); TPR@FPR=1e-2 from `lowlight.evaluate` (1e-4 needs more than the ~500 "
           "negative pairs of a CPU-size set).")

TABLES: dict[str, tuple[Table, ...]] = {
    "a_tables": (
        Table("a_table1", "Paper A Table 1 — attributes tested on DistortionFace",
              _a_rows("table1"), _attr_metrics("test_distortion"),
              baseline=_A_ROWS["clean"].label,
              note="Test metrics at the early-stopping step (best validation loss); paper "
                   "column: age MAE / gender % / ethnicity % on real UTKFace."),
        Table("a_table2", "Paper A Table 2 — attributes tested on NaturalFace",
              _a_rows("table2"), _attr_metrics("test_natural"),
              baseline=_A_ROWS["clean"].label,
              note="As Table 1; NaturalFace is half simulated low light, half untouched."),
    ),
    "a_lighting": (
        Table("a_lighting", "Paper A lighting classifier (binary: paper 99.33%; 4-class: "
                            "paper A's further work)",
              (Row("binary: simulated low light vs normal", "a_light", "99.33% acc"),
               Row("4 classes: normal / low / side / over", "a_light4")),
              (Metric("val/acc", "val acc"), Metric("val/ece", "ECE", "min", 4),
               Metric("val/normal/acc", "normal acc"), Metric("val/low/acc", "low acc"),
               Metric("val/side_left/acc", "side-left acc"), Metric("val/over/acc", "over acc")),
              note="ECE of the top-1 softmax confidence (10 bins) from `lowlight.evaluate`."),
    ),
    "b_table6": (
        Table("b_table6", "Paper B Table 6(a) — ablation, modules added row by row",
              (Row("baseline (no modules)", "b_baseline", "98.7 / 92.1 / 92.4 / 1.1"),
               Row("+ photometric augmentation", "b_aug", "99.1 / 94.0 / 93.8 / 0.9"),
               Row("+ neural relighting (inference)", "b_relight", "99.3 / 94.8 / 94.5 / 0.8"),
               Row("+ U-Net mask (full)", "b_full", "99.5 / 95.0 / 95.2 / 0.7")),
              _VER, baseline="baseline (no modules)",
              note=_B_NOTE + " Paper column: LFW acc / CFP-FP TPR@1e-4 / AgeDB-30 acc / EER "
                             "(%), iResNet-100 + ArcFace on MS1M."),
    ),
    "b_table8": (
        Table("b_table8", "Paper B Table 8 — mask-guided modulation vs attention",
              (Row("no masking", "b_aug", "88.2"), Row("SE", "b_mask_se", "90.1"),
               Row("CBAM", "b_mask_cbam", "91.4"), Row("U-Net mask", "b_mask_unet", "94.8")),
              (Metric("synth_illum/tpr@fpr=1e-2", "protocol TPR@FPR=1e-2"),
               Metric("synth_illum/auc", "protocol AUC"), Metric("synth_illum/acc",
                                                                 "protocol acc"),
               Metric("synth_val/acc", "mixed-light acc")),
              baseline="no masking",
              note=_B_NOTE + " Paper column: TPR (%) at FPR 1e-4 on the illumination set."),
    ),
    "b_table9": (
        Table("b_table9", "Paper B Table 9 — source of the skin mask",
              (Row("none", "b_aug", "98.0"), Row("YCbCr threshold", "b_seg_ycbcr", "98.3"),
               Row("simple CNN (3 conv)", "b_seg_cnn3", "98.9"),
               Row("U-Net", "b_mask_unet", "99.5")),
              (Metric("synth_illum/cmc_rank1", "protocol rank-1"),
               Metric("synth_val/cmc_rank1", "mixed-light rank-1"),
               Metric("synth_illum/acc", "protocol acc")),
              baseline="none",
              note="Rank-1: closed-set identification on the evaluation set's own images (one "
                   "gallery image per enrolled identity), from `lowlight.evaluate`. Paper "
                   "column: rank-1 (%)."),
    ),
    "backbone_loss": (
        Table("backbone_loss", "Paper B backbone × loss (Tables 4, 6(b), 7)",
              tuple(Row(f"{bl} + {ll}", "b_full" if (b, loss) == ("r100", "arcface")
                        else f"b_{b}_{loss}", paper)
                    for (b, bl) in (("r100", "iResNet-100"), ("vit_b", "ViT-B"))
                    for loss, ll, paper in (
                        ("arcface", "ArcFace", "illum. AUC 94.20" if b == "r100" else ""),
                        ("adaface", "AdaFace", "illum. AUC 95.10" if b == "r100" else ""),
                        ("magface", "MagFace", "99.6 / 95.1 / 96.1 / 0.6" if b == "r100"
                         else "99.8 / 95.0 / 96.9 / 0.7"))),
              _VER, baseline="iResNet-100 + ArcFace",
              note=_B_NOTE + " At cpu / tiny size every iResNet depth is iResNet-18 at quarter "
                             "width and the ViT is 4 (1) layers wide 128 (32): the grid compares "
                             "losses and the two backbone families, not depths. Every cell trains "
                             "with all modules (augmentation, relighting, U-Net mask), as paper "
                             "B's Table 6(b) does: `exp=grid,modules=full`."),
    ),
    "b_modules": (
        Table("b_relight", "Paper B relighting net vs classic enhancement (held-out faces)",
              tuple(Row(label, "relight", fill=(("m", m),)) for m, label in (
                  ("none", "input (none)"), ("gamma", "gamma"), ("clahe", "CLAHE"),
                  ("msr", "multi-scale retinex"), ("relight", "relighting net"))),
              (Metric("synth_val/{m}/psnr", "PSNR (dB)", digits=2),
               Metric("synth_val/{m}/ssim", "SSIM"),
               Metric("synth_val/{m}/uniformity_gain", "uniformity gain", digits=2)),
              note="Means over the lighting conditions; one shared run (seed 0)."),
        Table("b_skin", "Paper B skin segmentation (held-out faces)",
              (Row("U-Net", "skin_unet", fill=(("s", "model"),)),
               Row("YCbCr thresholds", "skin_unet", fill=(("s", "ycbcr"),)),
               Row("3-conv CNN", "skin_cnn3", fill=(("s", "model"),))),
              (Metric("synth_val/{s}/all/iou", "IoU"), Metric("synth_val/{s}/all/dice", "Dice"),
               Metric("synth_val/{s}/low/iou", "IoU (low light)"),
               Metric("synth_val/{s}/side_left/iou", "IoU (side light)")),
              note="One shared run per segmenter (seed 0)."),
    ),
}

_SYNTH_SETS = (("synth_clean/", ""), ("synth_val/", ""), ("synth_illum/", "_illum"))


def tables(grids, target: str = "") -> list[Table]:
    """The tables of `grids`; with `target` (the first `--val-targets` pair set, e.g. "lfw"),
    paper B's recognition tables report that real set instead of the synthetic ones: the clean
    and mixed-light columns become `<target>/...` as stored (one column: a real set has one
    lighting, its own) and the protocol columns `<target>_illum/...` (the set's probes through
    the illumination protocol, `lowlight.recipes.real_data`). Module tables stay synthetic."""
    out = [t for g in grids for t in TABLES[g]]
    if not target:
        return out
    from lowlight.recipes import pair_set_name

    name = pair_set_name(target)
    real = []
    for t in out:
        if not all(RUNS[r.run].family == "recognition" for r in t.rows):
            real.append(t)
            continue
        metrics, seen = [], set()
        for m in t.metrics:
            prefix, suffix = next((p, x) for p, x in _SYNTH_SETS if m.key.startswith(p))
            key = f"{name}{suffix}/{m.key[len(prefix):]}"
            if key in seen:
                continue
            seen.add(key)
            base = m.label
            for word in ("clean ", "mixed-light ", "protocol "):
                base = base.replace(word, "")
            metrics.append(dataclasses.replace(
                m, key=key, label=f"{name}{' + protocol' if suffix else ''} {base}"))
        rest = t.note.replace(_B_NOTE, "").strip()
        real.append(dataclasses.replace(
            t, metrics=tuple(metrics),
            note=f"Real data: columns from `{name}` as stored and `{name}_illum` (its probes "
                 f"through paper B's illumination protocol). {rest}".strip()))
    return real


GRIDS = tuple(TABLES)
DEFAULT_GRIDS = {
    "tiny": GRIDS,
    "paper": GRIDS,
    # 3 seeds in about an hour on 2 cores: the backbone × loss grid adds 15 runs and, at this
    # size, compares one narrowed iResNet with one narrowed ViT — opt in with --only.
    "cpu": tuple(g for g in GRIDS if g != "backbone_loss"),
}

# ------------------------------------------------------------------------------ sizes
#: config `scale` argument per size
SCALE = {"tiny": "smoke", "cpu": "cpu", "paper": "full"}
#: total_steps per family and size (None: the config's own, i.e. the papers' schedule)
STEPS = {
    "tiny": dict(recognition=2, attributes=2, lighting=2, relight=2, skin_seg=2),
    "cpu": dict(recognition=150, attributes=150, lighting=150, relight=200, skin_seg=200),
    "paper": dict(recognition=None, attributes=None, lighting=None, relight=None,
                  skin_seg=None),
}
#: Cost model of one run on an otherwise idle 2-core CPU, seconds: start-up + the config's own
#: evaluations (with a warm compilation cache), seconds per training step, and the
#: `lowlight.evaluate` pass. Per-step figures from the README / docs/results.md timings (main job
#: 1,200 steps in 6 min; relight 600 in 5.5 min; U-Net 600 in 9.7 min); the rest from
#: reproduce-sized runs of b_baseline, a_nat_se and a_light at cpu size (CPU seconds measured
#: under load, scaled to the idle per-step figures). Only the plan's estimate uses them, and the
#: progress lines rescale it by the times observed.
COSTS = {
    "recognition": dict(overhead=20.0, per_step=0.30, evaluate=13.0),
    "attributes": dict(overhead=25.0, per_step=0.20, evaluate=18.0),
    "lighting": dict(overhead=10.0, per_step=0.10, evaluate=6.0),
    "relight": dict(overhead=30.0, per_step=0.50, evaluate=15.0),
    "skin_seg": dict(overhead=35.0, per_step=0.90, evaluate=20.0),
    "routed": dict(overhead=25.0, per_step=0.0, evaluate=25.0),
}
