"""Aggregation over seeds for `tools/reproduce.py`: per-run figures → mean ± 95% CI, t-tests
against the baseline row, `tables.md`, `summary.json` and bar plots.

Statistics, per table row and metric, over the n seeds whose run produced a finite value:
  mean ± half_width with half_width = 1.96·s/√n (paper B eq. 18), s the sample standard
  deviation (ddof = 1; `lowlight.eval.roc_stats.mean_ci`); no interval when n < 2.
  Each non-baseline row is compared with the table's baseline row by a two-sided unpaired
  two-sample t-test (`lowlight.eval.significance`): Welch's by default (unequal variances),
  Student's (paper B §4.4's test) or a paired test by seed on request.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lowlight.eval import roc_stats, significance

TESTS = ("welch", "student", "paired")


# ------------------------------------------------------------------------------ reading
def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_figures(workdir: str) -> tuple[int | None, dict[str, Any]]:
    """(step, {metric: value}) of a finished run: every record of `metrics.jsonl` at the step of
    its last `lowlight.evaluate` record (the evaluated checkpoint: the final one, or the early-
    stopping best), merged in file order so the evaluation's values win. Without an evaluate
    record, the last step that has evaluation metrics. (None, {}) if there is none."""
    recs = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    evals = [r for r in recs if r.get("source") == "evaluate"]
    if evals:
        step = evals[-1]["step"]
    else:
        steps = [r["step"] for r in recs
                 if any(not k.startswith("train/") and k not in ("step", "time") for k in r)]
        if not steps:
            return None, {}
        step = max(steps)
    merged: dict[str, Any] = {}
    for r in recs:
        if r["step"] == step:
            merged.update(r)
    return step, merged


def metric_key(metric_key_template: str, fill: Sequence[tuple[str, str]]) -> str:
    return metric_key_template.format(**dict(fill)) if fill else metric_key_template


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


# ------------------------------------------------------------------------------ statistics
def seed_stats(values: Sequence[float], seeds: Sequence[int]) -> dict[str, Any]:
    """Mean, std (ddof=1), eq. 18 half-width and interval over the finite values."""
    pairs = [(s, float(v)) for s, v in zip(seeds, values) if _finite(v)]
    vals = [v for _, v in pairs]
    out = {"n": len(vals), "values": vals, "seeds": [s for s, _ in pairs],
           "mean": float(np.mean(vals)) if vals else math.nan,
           "std": math.nan, "half_width": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    if len(vals) >= 2:
        mean, half = roc_stats.mean_ci(vals, z=1.96, ddof=1)
        out.update(std=float(np.std(vals, ddof=1)), half_width=half, ci_low=mean - half,
                   ci_high=mean + half)
    return out


def compare(row: Mapping[str, Any], base: Mapping[str, Any], test: str) -> dict | None:
    """t-test of a row's per-seed values against the baseline's; None if either has < 2."""
    if row["n"] < 2 or base["n"] < 2:
        return None
    if test == "paired":
        common = sorted(set(row["seeds"]) & set(base["seeds"]))
        if len(common) < 2:
            return None
        a = [row["values"][row["seeds"].index(s)] for s in common]
        b = [base["values"][base["seeds"].index(s)] for s in common]
        r = significance.ttest_rel(a, b)
    else:
        r = significance.ttest_ind(row["values"], base["values"], equal_var=test == "student")
    return {"test": r.test, "t": r.statistic, "p": r.pvalue, "df": r.df, "diff": r.mean_diff}


def aggregate(tables: Sequence[Any], jobs_by_run: Mapping[str, Sequence[Any]],
              status: Mapping[str, str], test: str = "welch") -> dict[str, Any]:
    """{table key: {...}} for `tables` (`_reproduce_grid.Table`), reading each row's runs.

    Args:
      jobs_by_run: run key -> its jobs (objects with `id`, `seed`, `workdir`).
      status: job id -> "ok" | "failed" | "skipped" | "not run" (missing = not run).
      test: "welch" | "student" | "paired".
    """
    if test not in TESTS:
        raise ValueError(f"test={test!r}; valid: {', '.join(TESTS)}")
    out = {}
    for table in tables:
        rows = {}
        for row in table.rows:
            runs = []
            for job in jobs_by_run.get(row.run, ()):
                st = status.get(job.id, "not run")
                step, figs = run_figures(job.workdir) if st == "ok" else (None, {})
                keys = {m.key: metric_key(m.key, row.fill) for m in table.metrics}
                values = {k: figs.get(key) for k, key in keys.items()}
                runs.append({"job": job.id, "seed": job.seed, "workdir": job.workdir,
                             "status": st, "step": step,
                             "values": {k: (v if _finite(v) else None) for k, v in
                                        values.items()},
                             # operating points the set is too small to measure (e.g. TPR at
                             # FPR 1e-2 with < 100 negative pairs): "<key>/reachable" false
                             "unreachable": [k for k, key in keys.items()
                                             if figs.get(f"{key}/reachable") is False]})
            stats = {}
            for m in table.metrics:
                ok = [r for r in runs if r["status"] == "ok"]
                stats[m.key] = seed_stats([r["values"][m.key] if r["values"][m.key] is not None
                                           else math.nan for r in ok], [r["seed"] for r in ok])
            rows[row.label] = {"run": row.run, "paper": row.paper, "runs": runs, "stats": stats}
        if table.baseline is not None and table.baseline in rows:
            base = rows[table.baseline]["stats"]
            for label, r in rows.items():
                for m in table.metrics:
                    r["stats"][m.key]["ttest"] = (None if label == table.baseline else
                                                  compare(r["stats"][m.key], base[m.key], test))
        out[table.key] = {"title": table.title, "note": table.note, "baseline": table.baseline,
                          "metrics": [{"key": m.key, "label": m.label, "better": m.better,
                                       "digits": m.digits} for m in table.metrics],
                          "rows": rows}
    return out


# ------------------------------------------------------------------------------ output
def fmt_cell(st: Mapping[str, Any], digits: int, runs: Sequence[Mapping] = (),
             key: str = "") -> str:
    """"mean ± half" (n ≥ 2), "mean" (n = 1), "–" (no value; "failed" when every run failed,
    "n/r" when every run's set was too small to reach the operating point `key` measures);
    " (n=k)" when fewer seeds than runs contributed; ", p=…" (bold when < 0.05) vs baseline."""
    if st["n"] == 0:
        if runs and all(r["status"] == "failed" for r in runs):
            return "failed"
        return "n/r" if runs and all(key in r.get("unreachable", ()) for r in runs) else "–"
    text = f"{st['mean']:.{digits}f}"
    if st["n"] >= 2:
        text += f" ± {st['half_width']:.{digits}f}"
    if runs and st["n"] < len(runs):
        text += f" (n={st['n']})"
    t = st.get("ttest")
    if t is not None and not math.isnan(t["p"]):
        p = f"p={t['p']:.3f}" if t["p"] >= 0.001 else "p<0.001"
        text += f" ({'**' + p + '**' if t['p'] < 0.05 else p})"
    return text


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None  # strict JSON: NaN / inf become null
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    return x


def write_summary(path: str, header: Mapping[str, Any], tables: Mapping[str, Any],
                  jobs: Mapping[str, Any]) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(_jsonable({**header, "tables": tables, "runs": jobs}), f, indent=1,
                  allow_nan=False)
    os.replace(path + ".tmp", path)


def write_plots(out_dir: str, tables: Mapping[str, Any]) -> dict[str, str]:
    """One PNG per table (a panel per metric); returns {table key: file name}."""
    from lowlight.eval import plots

    os.makedirs(out_dir, exist_ok=True)
    files = {}
    for key, t in tables.items():
        panels = {}
        for m in t["metrics"]:
            arrow = "↓" if m["better"] == "min" else "↑"
            panels[f"{m['label']} {arrow}"] = {
                label: {"mean": r["stats"][m["key"]]["mean"],
                        "half_width": r["stats"][m["key"]]["half_width"],
                        "values": r["stats"][m["key"]]["values"]}
                for label, r in t["rows"].items()}
        name = f"{key}.png"
        plots.bars_with_ci(os.path.join(out_dir, name), panels, title=t["title"])
        files[key] = name
    return files


def markdown(header: Mapping[str, Any], tables: Mapping[str, Any],
             plot_files: Mapping[str, str], plot_dir: str = "plots") -> str:
    h = header
    test_name = {"welch": "Welch's unpaired two-sample t-test (unequal variances)",
                 "student": "Student's unpaired two-sample t-test (pooled variance; paper B "
                            "§4.4)",
                 "paired": "paired t-test over the seeds both rows share"}[h["test"]]
    lines = [f"# Reproduced tables — size `{h['size']}`, seeds {h['seeds']}", "",
             "```", h["command"], "```", "",
             f"git commit `{h['commit']}` · {h['date']} · {h['machine']}", "",
             *([f"Real data: {', '.join(f'{k} `{v}`' for k, v in h['data'].items() if v)}.", ""]
               if any((h.get("data") or {}).values()) else []),
             f"Each cell: mean ± 95% CI half-width over the seeds, 1.96·s/√n (paper B eq. 18; s "
             f"the sample standard deviation, ddof = 1 — with n = {len(h['seeds'])} seeds a "
             "Student-t interval would be wider). p: " + test_name + " of the row against the "
             "table's baseline row (two-sided; bold when p < 0.05, uncorrected for the number "
             "of comparisons). (n=k): only k seeds gave a finite value; n/r: the operating "
             "point is not reachable with this many pairs. Budgets: "
             + h["budget"] + ".", ""]
    for key, t in tables.items():
        ms = t["metrics"]
        has_paper = any(r["paper"] for r in t["rows"].values())
        head = ["row"] + (["paper"] if has_paper else []) + [
            m["label"] + (" ↓" if m["better"] == "min" else "") for m in ms]
        lines += [f"## {t['title']}", ""]
        if t["baseline"]:
            lines += [f"Baseline row: {t['baseline']}.", ""]
        if t["note"]:
            lines += [t["note"], ""]
        lines += ["| " + " | ".join(head) + " |",
                  "|---|" + ("---|" if has_paper else "") + "---:|" * len(ms)]
        for label, r in t["rows"].items():
            cells = [label] + ([r["paper"]] if has_paper else [])
            cells += [fmt_cell(r["stats"][m["key"]], m["digits"], r["runs"], m["key"])
                      for m in ms]
            lines.append("| " + " | ".join(cells) + " |")
        if key in plot_files:
            lines += ["", f"![{t['title']}]({plot_dir}/{plot_files[key]})"]
        lines.append("")
    lines += ["## Appendix: per-run figures", ""]
    for t in tables.values():
        ms = t["metrics"]
        lines += [f"### {t['title']}", "",
                  "| row | seed | run | step | " + " | ".join(m["label"] for m in ms) + " |",
                  "|---|---:|---|---:|" + "---:|" * len(ms)]
        for label, r in t["rows"].items():
            for run in r["runs"]:
                vals = [("–" if run["values"][m["key"]] is None
                         else f"{run['values'][m['key']]:.{m['digits'] + 1}f}") for m in ms]
                where = os.path.relpath(run["workdir"], h["out"])
                state = "" if run["status"] == "ok" else f" ({run['status']})"
                lines.append(f"| {label} | {run['seed']} | `{where}`{state} | "
                             f"{run['step'] if run['step'] is not None else '–'} | "
                             + " | ".join(vals) + " |")
        lines.append("")
    return "\n".join(lines)
