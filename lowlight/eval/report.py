"""Sections of an evaluation report (issue 7 §1–3): Markdown, PNGs (``lowlight.eval.plots``)
and scalars. ``lowlight.evaluate`` assembles them into ``DIR/eval/<step>/report.md``.

Recognition — given verification evaluators after ``run()``
(``lowlight.eval.evaluators.PairVerification`` subclasses, or any object with the same
attributes: per pair ``last_scores``, ``issame``, ``pair_conditions``, ``idx1``, ``idx2``; per
cached image ``identity``, ``gender``, ``ethnicity`` — each may be None, which skips
identification / fairness for that set — and ``last_embeddings``), ``recognition_report`` writes
the plots into a directory and returns the Markdown sections that link them plus a flat dict of
scalar metrics:

- per lighting condition (the pair's condition is its probe image's, paper B §4.2): AUC with a
  95% stratified bootstrap CI, EER, TPR@FPR=1e-2/1e-3 marked not reachable ("n/r", NaN in the
  metrics) when the condition has fewer than 1/FPR negative pairs, TNR (paper B §4.3);
- demographic differentials (``lowlight.eval.fairness``): TPR and FAR per ethnicity and per
  gender at the global FAR=1e-2 threshold and at the EER threshold, set once on all pairs, with
  max−min gaps and max/min ratios; pairs whose two images differ in group are cross-group
  (shown on their own, never counted in a group);
- identification on the evaluator's own images (``lowlight.eval.identification``): one gallery
  image per enrolled identity, the rest probes, ``UNKNOWN_FRACTION`` of identities never
  enrolled (their images are non-mated probes); closed-set CMC rank-1 / rank-5 and open-set
  DIR@FPIR=1e-1;
- plots: DET (probit axes), CMC curves, TPR@FPR per condition (bars).

Metric keys, each prefixed by ``<evaluator name>/``:
  condition/<c>/{auc, auc_ci_low, auc_ci_high, eer, tpr@fpr=1e-2, tpr@fpr=1e-3,
      tnr@fpr=1e-2, tnr@fpr=1e-3}; tpr@fpr=1e-2, tpr@fpr=1e-2/reachable, tnr@fpr=1e-2 (all pairs)
  fairness/threshold@<op>, fairness/global_{tpr,far}@<op>,
  fairness/{tpr,far}_{gap,ratio}_<attr>@<op>, fairness/{tpr,far}_<attr>=<group>@<op>
      with <op> in far=1e-2, eer; <attr> in ethnicity, gender; <group> a label name or
      cross_group (FAR only: positive pairs are always within one identity's groups)
  cmc_rank1, cmc_rank5, dir@fpir=1e-1, dir@fpir=1e-1/reachable,
  identification/{num_gallery, num_mated, num_nonmated}

Attributes (paper A) and classifiers, from raw predictions (so a report can be rebuilt from
``predictions.npz`` without the model):
- ``attribute_section``: age MAE, gender and ethnicity accuracy overall and per lighting
  condition, age MAE per age band × condition, the ethnicity confusion matrix (table + PNG);
- ``classifier_section`` (the lighting CNN, and the router of paper A's method 2): accuracy and
  mean confidence per condition, confusion matrix, reliability diagram with ECE / MCE.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lowlight.eval import fairness, identification, plots, roc_stats

__all__ = ["attribute_section", "attribute_table", "classifier_section", "condition_table",
           "fairness_tables", "identification_summary", "plot_cmc", "plot_det",
           "plot_tpr_by_condition", "recognition_report"]

FPR_TARGETS: tuple[float, ...] = (1e-2, 1e-3)
FAIRNESS_FAR = 1e-2
CMC_RANKS: tuple[int, ...] = (1, 5)
CMC_MAX_RANK = 20
FPIR = 1e-1
UNKNOWN_FRACTION = 0.2
N_BOOT = 200
ALL = "all"

_LABEL_NAMES = {"ethnicity": fairness.ETHNICITY_NAMES, "gender": fairness.GENDER_NAMES}


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    v = float(v)
    if math.isnan(v):
        return "–"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    return f"{v:.{digits}f}"


# --------------------------------------------------------------------------------------------
# per lighting condition
# --------------------------------------------------------------------------------------------


def _condition_row(scores: np.ndarray, issame: np.ndarray, n_boot: int, seed: int) -> dict:
    row: dict[str, Any] = {"pairs": int(issame.size), "pos": int(issame.sum()),
                           "neg": int((~issame).sum())}
    keys = ["auc", "auc_ci_low", "auc_ci_high", "eer"]
    for x in FPR_TARGETS:
        k = roc_stats.fpr_key(x)
        keys += [f"tpr@fpr={k}", f"tnr@fpr={k}"]
    if row["pos"] == 0 or row["neg"] == 0:  # no ROC without both classes
        row.update({k: math.nan for k in keys})
        row.update({f"tpr@fpr={roc_stats.fpr_key(x)}/reachable": False for x in FPR_TARGETS})
        return row
    ci = roc_stats.bootstrap_ci(scores, issame, ("auc", "eer"), n_boot=n_boot, seed=seed)
    row.update(auc=ci["auc"].value, auc_ci_low=ci["auc"].low, auc_ci_high=ci["auc"].high,
               eer=ci["eer"].value)
    fm = roc_stats.fpr_metrics(scores, issame, FPR_TARGETS)
    row.update({k: v for k, v in fm.items() if not k.startswith("threshold")})
    return row


def condition_table(ev: Any, *, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, dict]:
    """{condition: row} for the evaluator's pairs, "all" first, then conditions in
    ``lowlight.data.conditions`` order. Row keys: pairs, pos, neg, auc, auc_ci_low,
    auc_ci_high, eer, tpr@fpr=x, tpr@fpr=x/reachable, tnr@fpr=x (x in FPR_TARGETS; NaN where
    a class is missing or the FPR is not reachable)."""
    scores = np.asarray(ev.last_scores, np.float64)
    issame = np.asarray(ev.issame, bool)
    out = {ALL: _condition_row(scores, issame, n_boot, seed)}
    out.update(roc_stats.per_condition(lambda s, y: _condition_row(s, y, n_boot, seed),
                                       np.asarray(ev.pair_conditions), scores, issame))
    return out


def _condition_metrics(name: str, table: Mapping[str, dict]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    k2 = roc_stats.fpr_key(1e-2)
    overall = table[ALL]
    out[f"{name}/tpr@fpr={k2}"] = overall[f"tpr@fpr={k2}"]
    out[f"{name}/tpr@fpr={k2}/reachable"] = overall[f"tpr@fpr={k2}/reachable"]
    out[f"{name}/tnr@fpr={k2}"] = overall[f"tnr@fpr={k2}"]
    for c, row in table.items():
        if c == ALL:
            continue
        for k, v in row.items():
            if k not in ("pairs", "pos", "neg") and not k.endswith("/reachable"):
                out[f"{name}/condition/{c}/{k}"] = v
    return out


def _condition_markdown(name: str, table: Mapping[str, dict]) -> list[str]:
    fk = [roc_stats.fpr_key(x) for x in FPR_TARGETS]
    head = (["condition", "pairs (+/−)", "AUC [95% CI]", "EER"]
            + [f"TPR@FPR={k}" for k in fk] + [f"TNR@FPR={k}" for k in fk])
    lines = [f"### {name}", "", "| " + " | ".join(head) + " |",
             "|---|" + "---:|" * (len(head) - 1)]
    for c, r in table.items():
        cells = [f"**{c}**" if c == ALL else str(c), f"{r['pairs']} ({r['pos']}/{r['neg']})",
                 f"{_fmt(r['auc'])} [{_fmt(r['auc_ci_low'])}, {_fmt(r['auc_ci_high'])}]",
                 _fmt(r["eer"])]
        for k in fk:
            v = r[f"tpr@fpr={k}"]
            reachable = r[f"tpr@fpr={k}/reachable"]
            cells.append("n/r" if (r["pos"] and r["neg"] and not reachable) else _fmt(v))
        cells += [_fmt(r[f"tnr@fpr={k}"]) for k in fk]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# --------------------------------------------------------------------------------------------
# fairness
# --------------------------------------------------------------------------------------------


def _named(labels: np.ndarray, attr: str) -> np.ndarray:
    names = _LABEL_NAMES.get(attr)
    if names is None:
        return labels.astype(str)
    return np.asarray([names[i] if 0 <= i < len(names) else str(i) for i in labels.tolist()])


def fairness_tables(ev: Any, *, far: float = FAIRNESS_FAR,
                    attributes: Sequence[str] = ("ethnicity", "gender")) -> dict[str, dict]:
    """{attribute: ``fairness.fairness_report``} over the evaluator's pairs, groups given per
    side ((N, 2): a pair whose images differ in group is cross-group), operating points
    "far=<far>" and "eer" set on all pairs."""
    out = {}
    for attr in attributes:
        if getattr(ev, attr, None) is None:  # a real pair set without demographic labels
            continue
        lab = _named(np.asarray(getattr(ev, attr)), attr)
        groups = np.stack([lab[np.asarray(ev.idx1)], lab[np.asarray(ev.idx2)]], axis=1)
        out[attr] = fairness.fairness_report(ev.last_scores, ev.issame, groups, fars=(far,),
                                             eer=True)
    return out


def _fairness_metrics(name: str, tables: Mapping[str, dict]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attr, rep in tables.items():
        for op, entry in rep.items():
            # thresholds and global rates do not depend on the attribute; written once each
            out[f"{name}/fairness/threshold@{op}"] = entry["threshold"]
            out[f"{name}/fairness/global_tpr@{op}"] = entry["global"]["tpr"]
            out[f"{name}/fairness/global_far@{op}"] = entry["global"]["far"]
            for rate in ("tpr", "far"):
                out[f"{name}/fairness/{rate}_gap_{attr}@{op}"] = entry[f"{rate}_gap"]
                out[f"{name}/fairness/{rate}_ratio_{attr}@{op}"] = entry[f"{rate}_ratio"]
                for g, r in entry["groups"].items():
                    out[f"{name}/fairness/{rate}_{attr}={g}@{op}"] = r[rate]
            if "cross_group" in entry:
                out[f"{name}/fairness/far_{attr}={fairness.CROSS_GROUP}@{op}"] = (
                    entry["cross_group"]["far"])
    return out


def _pairs_cell(r: Mapping[str, Any]) -> str:
    return f"{r['num_pos'] + r['num_neg']} ({r['num_pos']}/{r['num_neg']})"


def _threshold_note(op: str, entry: Mapping[str, Any]) -> str:
    g = entry["global"]
    note = (f"{op} → {_fmt(entry['threshold'])} (global TPR {_fmt(g['tpr'])}, "
            f"FAR {_fmt(g['far'])}")
    if op.startswith("far=") and g["num_neg"] and 1.0 / g["num_neg"] > float(op[4:]):
        note += f"; target not reachable with {g['num_neg']} negative pairs"
    return note + ")"


def _fairness_markdown(name: str, tables: Mapping[str, dict]) -> list[str]:
    lines: list[str] = []
    for attr, rep in tables.items():
        ops = list(rep)
        head = ["group", "pairs (+/−)"] + [f"{r} @{op}" for op in ops for r in ("TPR", "FAR")]
        lines += ["", f"### {name} — {attr}", "",
                  "thresholds: " + ", ".join(_threshold_note(op, rep[op]) for op in ops), "",
                  "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        first = rep[ops[0]]
        for g, r0 in first["groups"].items():  # the same groups at every operating point
            cells = [str(g), _pairs_cell(r0)]
            for op in ops:
                r = rep[op]["groups"][g]
                cells += [_fmt(r["tpr"]), _fmt(r["far"])]
            lines.append("| " + " | ".join(cells) + " |")
        if "cross_group" in first:
            cells = ["cross-group", _pairs_cell(first["cross_group"])]
            for op in ops:
                c = rep[op]["cross_group"]
                cells += [_fmt(c["tpr"]), _fmt(c["far"])]
            lines.append("| " + " | ".join(cells) + " |")
        for kind, label in (("gap", "gap (max − min)"), ("ratio", "ratio (max / min)")):
            cells = [f"**{label}**", ""]
            for op in ops:
                cells += [_fmt(rep[op][f"tpr_{kind}"]), _fmt(rep[op][f"far_{kind}"])]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


# --------------------------------------------------------------------------------------------
# identification
# --------------------------------------------------------------------------------------------


def identification_summary(ev: Any, *, seed: int = 0, unknown_fraction: float = UNKNOWN_FRACTION,
                           ranks: Sequence[int] = CMC_RANKS, fpir: float = FPIR,
                           max_rank: int = CMC_MAX_RANK) -> dict[str, Any]:
    """CMC and DIR@FPIR on the evaluator's images: ``identification.split_gallery_probe`` of
    its identities (one gallery image per enrolled identity, ``unknown_fraction`` of identities
    held out as non-mated probes), then ``identification.evaluate`` on ``last_embeddings``.

    Returns ``identification.evaluate``'s dict plus "num_gallery" and "gallery_ids"; every
    rate NaN when there are no probes.
    """
    emb = np.asarray(ev.last_embeddings, np.float32)
    ids = np.asarray(ev.identity)
    split = identification.split_gallery_probe(ids, seed, gallery_per_id=1,
                                               unknown_fraction=unknown_fraction)
    base = {"num_gallery": int(split.gallery.size),
            "gallery_ids": int(np.unique(ids[split.gallery]).size)}
    if split.probe.size == 0 or split.gallery.size == 0:
        key = roc_stats.fpr_key(fpir)
        return {**base, **{f"rank-{r}": math.nan for r in ranks}, "cmc": np.zeros(0),
                "num_mated": 0, "num_unmated_ignored": 0, "num_nonmated": 0,
                f"dir@fpir={key}": math.nan, f"dir@fpir={key}/reachable": False}
    res = identification.evaluate(emb[split.probe], ids[split.probe], emb[split.gallery],
                                  ids[split.gallery], ranks=ranks, fpir_targets=(fpir,),
                                  max_rank=max(max_rank, *ranks))
    return {**base, **res}


def _identification_metrics(name: str, res: Mapping[str, Any], fpir: float = FPIR) -> dict:
    key = roc_stats.fpr_key(fpir)
    out = {f"{name}/cmc_rank{r}": res[f"rank-{r}"] for r in CMC_RANKS if f"rank-{r}" in res}
    out[f"{name}/dir@fpir={key}"] = res[f"dir@fpir={key}"]
    out[f"{name}/dir@fpir={key}/reachable"] = res[f"dir@fpir={key}/reachable"]
    out[f"{name}/identification/num_gallery"] = res["num_gallery"]
    out[f"{name}/identification/num_mated"] = res["num_mated"]
    out[f"{name}/identification/num_nonmated"] = res["num_nonmated"]
    return out


# --------------------------------------------------------------------------------------------
# plots (drawn by lowlight.eval.plots; these names stay for callers of the report API)
# --------------------------------------------------------------------------------------------


def plot_det(path: str, pairs: Mapping[str, tuple[Any, Any]]) -> None:
    """DET curves (FAR vs FRR on probit axes) of {name: (scores, issame)}."""
    plots.det(path, pairs)


def plot_cmc(path: str, curves: Mapping[str, Any]) -> None:
    """CMC curves {name: (max_rank,) identification rate at rank 1..max_rank}."""
    plots.cmc(path, curves)


def plot_tpr_by_condition(path: str, tables: Mapping[str, Mapping[str, dict]]) -> None:
    """TPR at each of FPR_TARGETS per condition (bars), one panel per evaluator."""
    plots.tpr_by_condition(path, tables, FPR_TARGETS)


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------


def recognition_report(evaluators: Mapping[str, Any], out_dir: str, *, n_boot: int = N_BOOT,
                       seed: int = 0, plots: bool = True) -> tuple[str, dict[str, Any]]:
    """Sections of the recognition report for evaluators that have been ``run()``.

    Args:
      evaluators: {name: evaluator} (module docstring for the attributes used).
      out_dir: where the PNGs go (det.png, cmc.png, tpr_by_condition.png); the Markdown links
        them by file name, so it belongs in the same directory.
      n_boot, seed: bootstrap replicates and seed of the per-condition CIs; ``seed`` also
        fixes the gallery / probe split.
      plots: write the PNGs (and link them).

    Returns:
      (Markdown text, {metric: scalar}) with the keys of the module docstring.
    """
    evs = {n: ev for n, ev in evaluators.items() if getattr(ev, "last_scores", None) is not None}
    metrics: dict[str, Any] = {}
    cond_tables, fair_tables, ident = {}, {}, {}
    for name, ev in evs.items():
        cond_tables[name] = condition_table(ev, n_boot=n_boot, seed=seed)
        metrics.update(_condition_metrics(name, cond_tables[name]))
        fair_tables[name] = fairness_tables(ev)
        metrics.update(_fairness_metrics(name, fair_tables[name]))
        if getattr(ev, "identity", None) is not None:
            ident[name] = identification_summary(ev, seed=seed)
            metrics.update(_identification_metrics(name, ident[name]))

    lines = ["## Verification per lighting condition (pair condition = probe image's)", "",
             f"AUC with a 95% stratified bootstrap CI over pairs ({n_boot} replicates, seed "
             f"{seed}). TPR@FPR=x is the largest TPR with FPR <= x; n/r = not reachable (fewer "
             "than 1/x negative pairs); TNR@FPR=x = 1 − FPR at that operating point.", ""]
    for name, table in cond_tables.items():
        lines += _condition_markdown(name, table) + [""]
    if plots and evs:
        plot_tpr_by_condition(os.path.join(out_dir, "tpr_by_condition.png"), cond_tables)
        plot_det(os.path.join(out_dir, "det.png"),
                 {n: (ev.last_scores, ev.issame) for n, ev in evs.items()})
        lines += ["![TPR@FPR per condition](tpr_by_condition.png)", "", "![DET](det.png)", ""]

    lines += ["## Fairness: demographic differentials", "",
              f"One global threshold per operating point, set on all pairs of the set (FAR = "
              f"{roc_stats.fpr_key(FAIRNESS_FAR)}, and the EER point); TPR and FAR per group on "
              "within-group pairs. Pairs whose two images differ in group are cross-group: "
              "they calibrate the thresholds but count in no group, gap or ratio."]
    for name, tables in fair_tables.items():
        lines += _fairness_markdown(name, tables) if tables else [
            "", f"### {name}", "", "No gender / ethnicity labels in this set: not measured."]

    fk = roc_stats.fpr_key(FPIR)
    lines += ["", "## Identification", "",
              f"Gallery: one image per enrolled identity; {UNKNOWN_FRACTION:.0%} of identities "
              "are never enrolled (their images are non-mated probes); every other image is a "
              f"mated probe. DIR@FPIR={fk} at rank 1.", "",
              "| set | gallery | mated probes | non-mated probes | CMC rank-1 | CMC rank-5 | "
              f"DIR@FPIR={fk} |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in ident.items():
        d = r[f"dir@fpir={fk}"]
        reach = r[f"dir@fpir={fk}/reachable"]
        lines.append(f"| {name} | {r['num_gallery']} | {r['num_mated']} | {r['num_nonmated']} | "
                     f"{_fmt(r.get('rank-1'))} | {_fmt(r.get('rank-5'))} | "
                     f"{_fmt(d) if reach or math.isnan(d) else _fmt(d) + ' (n/r)'} |")
    for name in evs:
        if name not in ident:
            lines.append(f"| {name} | – | – | – | no identity labels (e.g. an insightface "
                         ".bin): not measured | | |")
    if plots and ident:
        plot_cmc(os.path.join(out_dir, "cmc.png"), {n: r["cmc"] for n, r in ident.items()})
        lines += ["", "![CMC](cmc.png)"]
    return "\n".join(lines) + "\n", metrics


# --------------------------------------------------------------------------------------------
# attributes (paper A) and classifiers (the lighting CNN): sections from raw predictions
# --------------------------------------------------------------------------------------------

ETHNICITY_NAMES = tuple(fairness.ETHNICITY_NAMES)
GENDER_NAMES = tuple(fairness.GENDER_NAMES)
RELIABILITY_BINS = 10


def _conditions_in_order(conditions: np.ndarray) -> list[str]:
    from lowlight.data import conditions as cond_lib

    present = list(dict.fromkeys(conditions.tolist()))
    return ([c for c in cond_lib.CONDITIONS if c in present]
            + sorted(c for c in present if c not in cond_lib.CONDITIONS))


def _band_key(lo: int, hi: int) -> str:
    return f"{lo}-{hi}"


def attribute_table(pred: Mapping[str, Any], targets: Mapping[str, Any], conditions: Any, *,
                    bands: Sequence[tuple[int, int]]) -> dict[str, dict[str, Any]]:
    """Paper A's metrics from raw predictions, overall ("all") and per lighting condition.

    Args:
      pred: "age" (N,) years, "gender" (N,) 0/1, "ethnicity" (N,) class ids (predicted labels).
      targets: the same keys, true values.
      conditions: (N,) condition tag per image.
      bands: inclusive (lo, hi) age bands in years.

    Returns:
      {"all" | condition: {"n", "age_mae", "gender_acc", "ethnicity_acc", "bands": {"lo-hi":
      {"n", "age_mae"}}}}; empty bands have n 0 and NaN MAE.
    """
    conds = np.asarray([str(c) for c in np.asarray(conditions).ravel()])
    age_t = np.asarray(targets["age"], np.float64)
    err = np.abs(np.asarray(pred["age"], np.float64) - age_t)
    g_ok = np.asarray(pred["gender"]).astype(np.int64) == np.asarray(targets["gender"], np.int64)
    e_ok = (np.asarray(pred["ethnicity"]).astype(np.int64)
            == np.asarray(targets["ethnicity"], np.int64))
    if not (conds.size == err.size == g_ok.size == e_ok.size):
        raise ValueError(f"attribute_table: predictions ({err.size}), targets and conditions "
                         f"({conds.size}) differ in length")

    def row(sel):
        out = {"n": int(sel.sum()), "age_mae": float(err[sel].mean()) if sel.any() else math.nan,
               "gender_acc": float(g_ok[sel].mean()) if sel.any() else math.nan,
               "ethnicity_acc": float(e_ok[sel].mean()) if sel.any() else math.nan, "bands": {}}
        for lo, hi in bands:
            b = sel & (age_t >= lo) & (age_t <= hi)
            out["bands"][_band_key(lo, hi)] = {
                "n": int(b.sum()), "age_mae": float(err[b].mean()) if b.any() else math.nan}
        return out

    table = {ALL: row(np.ones(conds.size, bool))}
    for c in _conditions_in_order(conds):
        table[c] = row(conds == c)
    return table


def attribute_section(name: str, pred: Mapping[str, Any], targets: Mapping[str, Any],
                      conditions: Any, out_dir: str, *, bands: Sequence[tuple[int, int]],
                      plots_: bool = True) -> tuple[str, dict[str, Any]]:
    """Markdown + scalars of one attribute evaluator: per-condition table, age MAE per band
    and condition, the ethnicity confusion matrix (``confusion_ethnicity_<name>.png``).

    Scalars (prefixed ``<name>/``): ``<condition>/age_mae_<lo>-<hi>`` (the evaluator itself
    reports the overall and per-condition MAE / accuracies and the overall per-band MAE).
    """
    table = attribute_table(pred, targets, conditions, bands=bands)
    metrics: dict[str, Any] = {}
    for c, r in table.items():
        if c == ALL:
            continue
        for band, b in r["bands"].items():
            if b["n"]:
                metrics[f"{name}/{c}/age_mae_{band}"] = b["age_mae"]
    cols = list(table)
    lines = [f"### {name}", "", "| condition | images | age MAE (years) | gender acc | "
             "ethnicity acc |", "|---|---:|---:|---:|---:|"]
    for c, r in table.items():
        lines.append(f"| {'**all**' if c == ALL else c} | {r['n']} | {_fmt(r['age_mae'], 2)} | "
                     f"{_fmt(r['gender_acc'], 3)} | {_fmt(r['ethnicity_acc'], 3)} |")
    lines += ["", "Age MAE (years) per age band — images in brackets:", "",
              "| age band | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for lo, hi in bands:
        k = _band_key(lo, hi)
        cells = [f"{_fmt(table[c]['bands'][k]['age_mae'], 2)} ({table[c]['bands'][k]['n']})"
                 for c in cols]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    counts = plots.confusion_counts(targets["ethnicity"], pred["ethnicity"], len(ETHNICITY_NAMES))
    lines += ["", "Ethnicity confusion (rows true, columns predicted):", "",
              "| true \\ predicted | " + " | ".join(ETHNICITY_NAMES) + " |",
              "|---|" + "---:|" * len(ETHNICITY_NAMES)]
    lines += [f"| {n} | " + " | ".join(str(v) for v in r) + " |"
              for n, r in zip(ETHNICITY_NAMES, counts)]
    if plots_:
        png = f"confusion_ethnicity_{name}.png"
        plots.confusion(os.path.join(out_dir, png), targets["ethnicity"], pred["ethnicity"],
                        ETHNICITY_NAMES, title=f"{name}: ethnicity")
        lines += ["", f"![{name} ethnicity confusion]({png})"]
    return "\n".join(lines) + "\n", metrics


def classifier_section(name: str, probs: Any, labels: Any, conditions: Any,
                       class_names: Sequence[str], out_dir: str, *, n_bins: int = RELIABILITY_BINS,
                       plots_: bool = True, title: str = "") -> tuple[str, dict[str, Any]]:
    """Markdown + scalars of a classifier (the lighting CNN): accuracy and mean top-1
    confidence per condition, the confusion matrix (``confusion_<name>.png``) and the
    reliability diagram with its ECE (``reliability_<name>.png``, ``plots.calibration``).

    Scalars (prefixed ``<name>/``): ``ece``, ``mce``, ``mean_confidence``, ``top1_acc``.
    """
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels, np.int64).ravel()
    conds = np.asarray([str(c) for c in np.asarray(conditions).ravel()])
    if probs.ndim != 2 or probs.shape[0] != labels.size or conds.size != labels.size:
        raise ValueError(f"classifier_section: probs {probs.shape}, labels {labels.shape} and "
                         f"conditions {conds.shape} do not describe the same N images")
    pred = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    correct = pred == labels
    cal = plots.calibration(conf, correct, n_bins)
    metrics = {f"{name}/ece": cal["ece"], f"{name}/mce": cal["mce"],
               f"{name}/mean_confidence": float(conf.mean()),
               f"{name}/top1_acc": float(correct.mean())}
    lines = [f"### {title or name}", "",
             f"ECE {cal['ece']:.4f} (MCE {cal['mce']:.4f}; {n_bins} equal-width bins of the "
             "top-1 softmax confidence)", "",
             "| condition | images | accuracy | mean confidence |", "|---|---:|---:|---:|",
             f"| **all** | {labels.size} | {correct.mean():.4f} | {conf.mean():.4f} |"]
    for c in _conditions_in_order(conds):
        sel = conds == c
        lines.append(f"| {c} | {int(sel.sum())} | {correct[sel].mean():.4f} | "
                     f"{conf[sel].mean():.4f} |")
    counts = plots.confusion_counts(labels, pred, len(class_names))
    lines += ["", "| true \\ predicted | " + " | ".join(class_names) + " |",
              "|---|" + "---:|" * len(class_names)]
    lines += [f"| {n} | " + " | ".join(str(v) for v in r) + " |"
              for n, r in zip(class_names, counts)]
    if plots_:
        plots.confusion(os.path.join(out_dir, f"confusion_{name}.png"), labels, pred, class_names,
                        title=title or name)
        plots.reliability(os.path.join(out_dir, f"reliability_{name}.png"), conf, correct,
                          n_bins=n_bins, title=title or name)
        lines += ["", f"![{name} confusion](confusion_{name}.png) "
                      f"![{name} reliability](reliability_{name}.png)"]
    return "\n".join(lines) + "\n", metrics
