"""Checkpoint-based evaluation: `python -m lowlight.evaluate --workdir=DIR [--step=N] [--follow]`.

Rebuilds the run's model and evaluators from `DIR/config.json` (the same evaluator classes the
training loop uses, so numbers are comparable), loads the weights of the latest (or `--step`)
checkpoint, appends the metrics to `DIR/metrics.jsonl` (with `"step"` and `"source":
"evaluate"`), and writes `DIR/eval/<step>/report.md` with what each task needs to be judged:

  recognition   raw scores (`scores.npz`: per-pair cosine scores, labels, conditions), ROC; via
                `lowlight.eval.report` the per-condition table with bootstrap CIs, fairness,
                identification (CMC, DIR@FPIR), DET / CMC / TPR-per-condition plots
  attributes    per lighting condition: age MAE (and per age band), gender and ethnicity
                accuracy; ethnicity confusion matrix (PNG); raw predictions (`predictions.npz`)
  lighting      accuracy per condition, confusion matrix and reliability diagram with ECE of the
                softmax confidence (PNGs); logits in `predictions.npz`
  attributes_routed  paper A's method 2 re-run from its config (no checkpoint of its own; step
                0): the routed attribute sections plus the router's own classifier section
  relight       PSNR / SSIM / uniformity tables vs gamma, CLAHE, MSR; a sample grid (input /
                relit / target per condition)
  skin_seg      IoU / Dice tables vs YCbCr; a sample grid (input / predicted mask / target /
                YCbCr per condition)

`--val_targets=lfw+cfp_fp --root=/data/ms1m` (recognition) evaluates on real pair sets instead of
the run's own evaluators — insightface `.bin` files or LFW's pairs.txt (`--lfw_images`), each as
stored and through paper B's illumination protocol (`lfw/...`, `lfw_illum/...`): the way to put a
converted insightface model or a run trained elsewhere on the sets the papers report.

Scalars of the report sections (e.g. "synth_val/cmc_rank1", "val/ece") go into metrics.jsonl
with the evaluators' metrics. `--follow` keeps evaluating each new checkpoint as a running job
writes it, until the run's final step (or its early stop) has been evaluated, or `--timeout`
seconds pass without a new checkpoint.
"""

from __future__ import annotations

import json
import os
import time

import ml_collections
import numpy as np
from absl import app, flags, logging

SUPERVISED = ("relight", "skin_seg", "attributes", "lighting")
#: Sample-grid rows per lighting condition (relight, skin_seg).
SAMPLES_PER_CONDITION = 2
#: Class names of the lighting classifier per `task_cfg.labels` (binary: paper A's simulated
#: low light vs untouched; groups: `lowlight.data.conditions.GROUPS`).
LIGHTING_CLASSES = {"binary": ("normal", "low (simulated)"),
                    "groups": ("normal", "low", "side", "over")}


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir!r} is not a lowlight run: no config.json")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


# ------------------------------------------------------------------------------ recognition
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


# ------------------------------------------------------------------------------ supervised
def _load_run(model_cfg, workdir, step=None):
    """(model, variables, step) of `workdir`'s checkpoint for the model `model_cfg` describes."""
    from lowlight import checkpoint as ckpt_lib
    from lowlight import models

    model = models.create(model_cfg["name"], **dict(model_cfg.get("kwargs", {}) or {}))
    params, batch_stats, step = ckpt_lib.load_weights(workdir, step)
    return model, {"params": params, "batch_stats": batch_stats}, step


def _batched(fn, images, batch_size=256):
    return np.concatenate([np.asarray(fn(images[i:i + batch_size]))
                           for i in range(0, len(images), batch_size)])


def _softmax(logits):
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _attribute_outputs(name, ev, out, age_scale, out_dir):
    """Report section and raw arrays of one attribute evaluator's model outputs `out`."""
    import jax.numpy as jnp

    from lowlight.attributes import AGE_BANDS
    from lowlight.eval import report
    from lowlight.losses.multitask import predict

    pred = {k: np.asarray(v) for k, v in
            predict({k: jnp.asarray(v) for k, v in out.items()}, age_scale=age_scale).items()}
    md, extra = report.attribute_section(name, pred, ev.targets, ev.conditions, out_dir,
                                         bands=AGE_BANDS)
    arrays = {f"{name}/age_pred": pred["age"], f"{name}/gender_pred": pred["gender"],
              f"{name}/female_prob": pred["female_prob"],
              f"{name}/gender_logit": np.asarray(out["gender_logit"]),
              f"{name}/ethnicity_pred": pred["ethnicity"],
              f"{name}/ethnicity_logits": np.asarray(out["ethnicity_logits"]),
              f"{name}/conditions": np.asarray(ev.conditions)}
    arrays.update({f"{name}/{k}": np.asarray(v) for k, v in ev.targets.items()})
    return md, extra, arrays


def _attributes(name, ev, variables, config, out_dir):
    out = ev.outputs(variables)
    metrics = ev.score(out)
    age_scale = config.get("task_cfg", {}).get("age_scale", 1.0)
    md, extra, arrays = _attribute_outputs(name, ev, out, age_scale, out_dir)
    return metrics, extra, md, arrays


def _lighting(name, ev, variables, config, out_dir):
    from lowlight.eval import report

    metrics = ev.run(variables)
    logits = _batched(lambda x: ev.fn(variables, x), ev.images)
    mode = config.get("task_cfg", {}).get("labels", "binary")
    md, extra = report.classifier_section(name, _softmax(logits), ev.labels, ev.conditions,
                                          LIGHTING_CLASSES[mode], out_dir,
                                          title=f"{name}: lighting classifier ({mode})")
    arrays = {f"{name}/logits": logits, f"{name}/labels": np.asarray(ev.labels),
              f"{name}/conditions": np.asarray(ev.conditions)}
    return metrics, extra, md, arrays


def _first_per_condition(conditions, k=SAMPLES_PER_CONDITION):
    """Indices of the first `k` items of each condition, in `conditions.CONDITIONS` order."""
    from lowlight.data import conditions as cond_lib

    conditions = np.asarray([str(c) for c in conditions])
    order = [c for c in cond_lib.CONDITIONS if c in set(conditions.tolist())]
    return np.concatenate([np.flatnonzero(conditions == c)[:k] for c in order]).astype(int)


def _relight(name, ev, variables, config, out_dir):
    from lowlight.data import conditions as cond_lib
    from lowlight.data.normalize import MEAN, STD
    from lowlight.eval import plots

    metrics = ev.run(variables)
    order = [c for c in cond_lib.CONDITIONS if c in ev.pairs]
    order += sorted(c for c in ev.pairs if c not in order)
    conds = [c for c in order for _ in range(min(SAMPLES_PER_CONDITION,
                                                 len(ev.pairs[c]["image"])))]
    take = lambda key: np.concatenate([ev.pairs[c][key][:SAMPLES_PER_CONDITION]
                                       for c in order])
    images = take("image")
    relit = np.rint(np.clip(ev.fn(variables, images) * STD + MEAN, 0, 1) * 255).astype(np.uint8)
    png = f"samples_{name}.png"
    plots.image_grid(os.path.join(out_dir, png),
                     {"input": images, "relit": relit, "target": take("target")},
                     row_labels=conds, title=f"{name}: relighting samples")
    md = f"{ev.last_table[1].rstrip()}\n\n![{name} samples]({png})\n"
    return metrics, {}, md, {}


def _skin_seg(name, ev, variables, config, out_dir):
    from lowlight.data.skin_color import ycbcr_skin_mask
    from lowlight.eval import plots

    metrics = ev.run(variables)
    idx = _first_per_condition(ev.conditions)
    images = ev.images[idx]
    png = f"samples_{name}.png"
    plots.image_grid(os.path.join(out_dir, png),
                     {"input": images, "predicted": np.asarray(ev.fn(variables, images)),
                      "target": ev.masks[idx],
                      "YCbCr": np.asarray(ycbcr_skin_mask(images), np.float32)},
                     row_labels=[str(c) for c in np.asarray(ev.conditions)[idx]],
                     title=f"{name}: skin masks")
    md = f"{ev.last_table[1].rstrip()}\n\n![{name} samples]({png})\n"
    return metrics, {}, md, {}


_SECTIONS = {"attributes": _attributes, "lighting": _lighting, "relight": _relight,
             "skin_seg": _skin_seg}


def _supervised(config, variables, model, out_dir):
    """(metrics, extra scalars, Markdown sections, arrays) of a supervised task's evaluators."""
    from lowlight.train_supervised import task_spec

    spec = task_spec(config.task)
    metrics, extra, sections, arrays = {}, {}, [], {}
    for name, cfg in (config.get("evals") or {}).items():
        ev = spec.evaluator(name, cfg, model, config.get("task_cfg", {}))
        m, e, md, arr = _SECTIONS[config.task](name, ev, variables, config, out_dir)
        metrics.update(m)
        extra.update(e)
        sections.append(md)
        arrays.update(arr)
    return metrics, extra, "\n".join(sections), arrays


def _routed(config, out_dir):
    """Paper A's method 2 from the run's config: the lighting classifier routes every test face
    to an expert (`config.routing`); metrics exactly as `lowlight.attributes.run_routed` logs
    them (the same `route_and_score`: best checkpoints, age units converted), plus the attribute
    sections and the router's classifier section (truth: simulated low light for a binary
    router, the condition's group for a 4-class one)."""
    from lowlight.attributes import AttributeEvaluator, load_router, route_and_score
    from lowlight.data import conditions as cond_lib
    from lowlight.eval import report

    router = load_router(config.routing)
    n_classes = router.n_classes
    age_scale = config.get("task_cfg", {}).get("age_scale", 1.0)
    metrics, extra, sections, arrays = {}, {}, [], {}
    for name, ev_cfg in config.evals.items():
        ev = AttributeEvaluator(name, ev_cfg, router.experts[0][0], config.get("task_cfg", {}))
        m, routed, logits = route_and_score(ev, router)
        probs = _softmax(logits)
        route = probs.argmax(axis=1)
        metrics.update(m)
        md, e, arr = _attribute_outputs(name, ev, routed, age_scale, out_dir)
        if n_classes == 2:
            truth = (np.asarray(ev.conditions) == cond_lib.LOW).astype(int)
        else:
            truth = np.asarray([cond_lib.group_index(str(c)) for c in ev.conditions])
        names = LIGHTING_CLASSES["binary" if n_classes == 2 else "groups"]
        md_r, e_r = report.classifier_section(f"{name}_router", probs, truth, ev.conditions,
                                              names, out_dir, title=f"{name}: router")
        arr.update({f"{name}/route": route, f"{name}/router_probs": probs})
        extra.update({**e, **e_r})
        sections += [md, md_r]
        arrays.update(arr)
    return metrics, extra, "\n".join(sections), arrays


# ------------------------------------------------------------------------------ report
def _report(config, step, metrics, raw, sections: str = "") -> str:
    """The report: the evaluators' metrics, the ROC plot, then `sections` (the task sections
    of `lowlight.eval.report`, whose scalars are not repeated in the top table)."""
    lines = [f"# Evaluation of `{config.task}` at step {step}", "",
             f"model `{config.get('model', {}).get('name', '(routed experts)')}`", "",
             "| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items())
              if isinstance(v, int | float) and not isinstance(v, bool)]
    if raw:
        lines += ["", "![ROC](roc.png)"]
    if sections:
        lines += ["", sections.rstrip("\n")]
    return "\n".join(lines) + "\n"


def with_pair_sets(config, val_targets: str, root: str = "", lfw_images: str = ""):
    """`config` with its evaluation sets replaced by real pair sets (`lowlight.recipes.real_data`
    syntax: 'lfw+cfp_fp' looked up as <root>/<name>.bin, or paths; an LFW pairs.txt with
    `lfw_images`), each as stored and through the illumination protocol. For evaluating a run
    trained elsewhere — e.g. a converted insightface model — on the sets a paper reports."""
    from lowlight import recipes
    from lowlight.config_lib import ConfigError

    if config.task != "recognition":
        raise ConfigError(f"--val_targets applies to recognition runs; this run's task is "
                          f"{config.task!r}")
    args = ml_collections.ConfigDict(dict(recipes.REAL_DATA_ARGS, root=root,
                                          val_targets=val_targets, lfw_images=lfw_images))
    return recipes.real_data(config, args)


def evaluate(workdir: str, step: int | None = None, *, val_targets: str = "", root: str = "",
             lfw_images: str = "") -> dict:
    """Evaluates one checkpoint of the run in `workdir`; returns the metrics (also written).
    With `val_targets`, on those real pair sets instead of the run's own evaluators
    (`with_pair_sets`)."""
    from lowlight.eval import plots
    from lowlight.metric_writer import MetricWriter

    config = load_config(workdir)
    if val_targets:
        config = with_pair_sets(config, val_targets, root, lfw_images)
    raw, arrays, sections, extra = {}, {}, "", {}
    if config.task == "recognition":
        step, metrics, raw, evaluators = _recognition(config, workdir, step)
        out_dir = os.path.join(workdir, "eval", str(step))
        os.makedirs(out_dir, exist_ok=True)
        np.savez(os.path.join(out_dir, "scores.npz"),
                 **{f"{n}/{k}": v for n, r in raw.items() for k, v in r.items()})
        plots.roc(os.path.join(out_dir, "roc.png"),
                  {n: (r["scores"], r["issame"]) for n, r in raw.items()})
        from lowlight.eval import report as report_lib

        sections, extra = report_lib.recognition_report(evaluators, out_dir)
    elif config.task in SUPERVISED:
        model, variables, step = _load_run(config.model, workdir, step)
        out_dir = os.path.join(workdir, "eval", str(step))
        os.makedirs(out_dir, exist_ok=True)
        metrics, extra, sections, arrays = _supervised(config, variables, model, out_dir)
    elif config.task == "attributes_routed":
        step = 0  # no checkpoint: the experts' and the classifier's are loaded
        out_dir = os.path.join(workdir, "eval", "0")
        os.makedirs(out_dir, exist_ok=True)
        metrics, extra, sections, arrays = _routed(config, out_dir)
    else:
        raise ValueError(f"task {config.task!r} has no checkpoints to evaluate")
    if arrays:
        np.savez(os.path.join(out_dir, "predictions.npz"), **arrays)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(_report(config, step, metrics, raw, sections))
    metrics = {**metrics, **extra}
    writer = MetricWriter(workdir, tensorboard=False)
    writer.write(step, {**metrics, "source": "evaluate"})
    writer.close()
    logging.info("evaluated %s step %d: report in %s", workdir, step, out_dir)
    return {"step": step, **metrics}


def _stopped_early(workdir: str) -> bool:
    path = os.path.join(workdir, "early_stopping.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        state = json.load(f)
    return int(state.get("wait", 0)) >= int(state.get("patience", 1 << 30))


def follow(workdir: str, *, poll: float, timeout: float, **sets: str) -> list[int]:
    """Evaluates every checkpoint not yet evaluated, as they appear, until the final step (or,
    for a run that stopped early, until its last checkpoint). `sets`: `evaluate`'s
    val_targets / root / lfw_images."""
    from lowlight import checkpoint as ckpt_lib

    config = load_config(workdir)
    if config.task == "attributes_routed":
        raise ValueError(f"{workdir!r} is a routed run (no checkpoints of its own): evaluate it "
                         "once without --follow")
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
            evaluate(workdir, s, **sets)
            done.append(s)
            idle_since = time.time()
        if done and (max(done) >= final or (not new and _stopped_early(workdir))):
            return done
        if time.time() - idle_since > timeout:
            logging.warning("no new checkpoint for %.0f s; stopping", timeout)
            return done
        time.sleep(poll)


def _cli():
    from lowlight import cpu_malloc
    from lowlight.config_lib import ConfigError

    cpu_malloc.apply()  # before jax starts XLA's threads (lowlight/cpu_malloc.py says why)

    # Flags are defined only when run as a program, so importing this module next to
    # lowlight.main (which also has --workdir) in one process does not clash.
    workdir = flags.DEFINE_string("workdir", None, "Run directory (config.json, checkpoints/).")
    step = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
    follow_ = flags.DEFINE_bool("follow", False, "Evaluate each new checkpoint as it appears.")
    poll = flags.DEFINE_float("poll", 30.0, "--follow: seconds between checks.")
    timeout = flags.DEFINE_float("timeout", 3600.0, "--follow: give up after this long idle.")
    targets = flags.DEFINE_string(
        "val_targets", "", "Recognition: evaluate on these pair sets instead of the run's own "
        "('+'-separated: names looked up as <--root>/<name>.bin, .bin paths, or an LFW pairs.txt "
        "with --lfw_images), each as stored and through the illumination protocol.")
    root = flags.DEFINE_string("root", "", "--val_targets: folder of the named .bin files.")
    lfw_images = flags.DEFINE_string("lfw_images", "", "--val_targets: LFW's image folder.")

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        if not workdir.value:
            raise app.UsageError("--workdir is required")
        sets = dict(val_targets=targets.value, root=root.value, lfw_images=lfw_images.value)
        try:
            if follow_.value:
                follow(workdir.value, poll=poll.value, timeout=timeout.value, **sets)
            else:
                evaluate(workdir.value, step.value, **sets)
        except ConfigError as e:  # one line, as lowlight.main prints start-up mistakes
            raise app.UsageError(str(e)) from None

    app.run(main)


if __name__ == "__main__":
    _cli()
