"""Checkpoint-based evaluation: `python -m lowlight.evaluate --workdir=DIR [--step=N] [--follow]`.

Rebuilds the run's model and evaluators from `DIR/config.json` (the same evaluator classes the
training loop uses, so numbers are comparable), loads the weights of the latest (or `--step`)
checkpoint, appends the metrics to `DIR/metrics.jsonl` (with `"step"` and `"source":
"evaluate"`), and writes `DIR/eval/<step>/`: `report.md`, raw scores (`scores.npz`: per-pair
cosine scores, labels and conditions of the verification sets) and plots (ROC per set). For
recognition runs `lowlight.eval.report` adds the per-condition table with bootstrap CIs, the
fairness tables, identification (CMC, DIR@FPIR) and the DET / CMC / TPR-per-condition plots;
its scalars (e.g. "synth_val/cmc_rank1") go into metrics.jsonl with the evaluators' metrics.
`--follow` keeps evaluating each new checkpoint as a running job writes it, until the run's
final step has been evaluated (or `--timeout` seconds pass without a new checkpoint).
"""

from __future__ import annotations

import json
import os
import time

import ml_collections
import numpy as np
from absl import app, flags, logging


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir!r} is not a lowlight run: no config.json")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def _recognition(config, workdir, step):
    import jax

    from lowlight import checkpoint as ckpt_lib
    from lowlight import parallel
    from lowlight.eval import evaluators as eval_lib
    from lowlight.train import build_model

    model = build_model(config)
    mesh = parallel.make_mesh(1)
    embed = eval_lib.make_embed_fn(model, mesh, batch_size=config.get("eval_batch_size", 256))
    params, batch_stats, step = ckpt_lib.load_weights(workdir, step)
    params = {k: v for k, v in params.items() if k != "centers"}
    rep = parallel.replicated(mesh)
    params, batch_stats = jax.device_put((params, batch_stats), rep)
    evaluators = eval_lib.build(config.get("evals"))
    metrics, raw = {}, {}
    for name, ev in evaluators.items():
        metrics.update(ev.run(lambda im: embed(params, batch_stats, im)))
        raw[name] = dict(scores=ev.last_scores, issame=ev.issame,
                         conditions=ev.pair_conditions)
    return step, metrics, raw, evaluators


def _supervised(config, workdir, step):
    from lowlight import checkpoint as ckpt_lib
    from lowlight import models
    from lowlight.train_supervised import task_spec

    spec = task_spec(config.task)
    model = models.create(config.model.name, **dict(config.model.get("kwargs", {}) or {}))
    params, batch_stats, step = ckpt_lib.load_weights(workdir, step)
    variables = {"params": params, "batch_stats": batch_stats}
    metrics, tables = {}, {}
    for name, cfg in (config.get("evals") or {}).items():
        ev = spec.evaluator(name, cfg, model, config.get("task_cfg", {}))
        metrics.update(ev.run(variables))
        if ev.last_table is not None:
            tables[name] = ev.last_table[1]
    return step, metrics, {}, tables


def _roc_plot(path, raw):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lowlight.eval import verification

    fig, ax = plt.subplots(figsize=(5, 4))
    for name, r in raw.items():
        fpr, tpr, _ = verification.roc(r["scores"], r["issame"])
        ax.plot(np.maximum(fpr, 1e-5), tpr, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC (cosine scores)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _report(config, step, metrics, raw, tables, sections: str = "") -> str:
    """The report: the evaluators' metrics, the ROC plot, then `sections` (the recognition
    sections of `lowlight.eval.report`, whose scalars are not repeated in the top table)."""
    lines = [f"# Evaluation of `{config.task}` at step {step}", "",
             f"model `{config.model.name}`", "", "| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items())
              if isinstance(v, int | float) and not isinstance(v, bool)]
    if raw:
        lines += ["", "![ROC](roc.png)"]
    if sections:
        lines += ["", sections.rstrip("\n")]
    for name, text in tables.items():
        lines += ["", f"## {name}", "", text]
    return "\n".join(lines) + "\n"


def evaluate(workdir: str, step: int | None = None) -> dict:
    """Evaluates one checkpoint of the run in `workdir`; returns the metrics (also written)."""
    from lowlight.metric_writer import MetricWriter

    config = load_config(workdir)
    evaluators, tables = {}, {}
    if config.task == "recognition":
        step, metrics, raw, evaluators = _recognition(config, workdir, step)
    elif config.task in ("relight", "skin_seg", "attributes", "lighting"):
        step, metrics, raw, tables = _supervised(config, workdir, step)
    else:
        raise ValueError(f"task {config.task!r} has no checkpoints to evaluate")
    out_dir = os.path.join(workdir, "eval", str(step))
    os.makedirs(out_dir, exist_ok=True)
    if raw:
        np.savez(os.path.join(out_dir, "scores.npz"),
                 **{f"{n}/{k}": v for n, r in raw.items() for k, v in r.items()})
        _roc_plot(os.path.join(out_dir, "roc.png"), raw)
    sections, extra = "", {}
    if evaluators:
        from lowlight.eval import report as report_lib

        sections, extra = report_lib.recognition_report(evaluators, out_dir)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(_report(config, step, metrics, raw, tables, sections))
    metrics = {**metrics, **extra}
    writer = MetricWriter(workdir, tensorboard=False)
    writer.write(step, {**metrics, "source": "evaluate"})
    writer.close()
    logging.info("evaluated %s step %d: report in %s", workdir, step, out_dir)
    return {"step": step, **metrics}


def follow(workdir: str, *, poll: float, timeout: float) -> list[int]:
    """Evaluates every checkpoint not yet evaluated, as they appear, until the final step."""
    from lowlight import checkpoint as ckpt_lib

    config = load_config(workdir)
    final = min(config.total_steps, config.get("stop_after", 0) or config.total_steps)
    done: list[int] = []
    idle_since = time.time()
    ckpt_dir = ckpt_lib.find_checkpoint_dir(workdir) if os.path.isdir(
        os.path.join(workdir, "checkpoints")) else None
    while True:
        if ckpt_dir is None and os.path.isdir(os.path.join(workdir, "checkpoints")):
            ckpt_dir = os.path.join(workdir, "checkpoints")
        steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) if ckpt_dir else []
        new = [s for s in steps if s not in done]
        for s in new:
            evaluate(workdir, s)
            done.append(s)
            idle_since = time.time()
        if done and max(done) >= final:
            return done
        if time.time() - idle_since > timeout:
            logging.warning("no new checkpoint for %.0f s; stopping", timeout)
            return done
        time.sleep(poll)


def _cli():
    # Flags are defined only when run as a program, so importing this module next to
    # lowlight.main (which also has --workdir) in one process does not clash.
    workdir = flags.DEFINE_string("workdir", None, "Run directory (config.json, checkpoints/).")
    step = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
    follow_ = flags.DEFINE_bool("follow", False, "Evaluate each new checkpoint as it appears.")
    poll = flags.DEFINE_float("poll", 30.0, "--follow: seconds between checks.")
    timeout = flags.DEFINE_float("timeout", 3600.0, "--follow: give up after this long idle.")

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        if not workdir.value:
            raise app.UsageError("--workdir is required")
        if follow_.value:
            follow(workdir.value, poll=poll.value, timeout=timeout.value)
        else:
            evaluate(workdir.value, step.value)

    app.run(main)


if __name__ == "__main__":
    _cli()
