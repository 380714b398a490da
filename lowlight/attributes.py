"""Paper A's tasks: facial attributes under low light and the lighting classifier.

  attributes — MobileNetV2 (+SE / CBAM / none) → age (MSE), gender (BCE), ethnicity (CE), loss
               weights 0.1 / 1.0 / 1.0, Adam lr 1e-4, early stopping on validation loss
               (paper A, "Proposed method" and "Experiments").
  lighting   — a small CNN: low-light vs normal (paper A: 99.33%), or normal / low / side / over
               (the multi-class variant paper A names as further work).

Data variants (`config.data.variant`), paper A's datasets: clean (UTKFace itself — here the
synthetic world under normal light), distortion (DistortionFace: every image through the
simulate module), natural (NaturalFace: a deterministic half simulated). Held-out people are
evaluated per lighting condition; the cross-domain grid (train on {clean, distortion, natural} ×
test on {distortion, natural}) is a set of evaluators on one run (configs/paper_a.py).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lowlight.data import conditions as cond
from lowlight.train_supervised import TaskSpec, _ModelFn, _to_input

#: Age bands for per-band MAE (years, inclusive): where age regressors typically fail differs
#: between children, adults and the elderly, which one overall MAE hides.
AGE_BANDS = ((0, 9), (10, 19), (20, 29), (30, 39), (40, 49), (50, 59), (60, 69), (70, 116))


# ------------------------------------------------------------------------------ data
class LightingLabels:
    """Per-batch numpy transform adding `label` for the lighting classifier (picklable).

    binary: 1 if the image went through paper A's simulate module (`simulated`), else 0.
    groups: the coarse group of the rendered condition (normal / low / side / over).
    """

    def __init__(self, mode: str):
        if mode not in ("binary", "groups"):
            raise ValueError(f"lighting label mode {mode!r}; valid: binary, groups")
        self.mode = mode

    def __call__(self, batch):
        batch = dict(batch)
        if self.mode == "binary":
            batch["label"] = np.asarray(batch["simulated"], np.int32)
        else:
            batch["label"] = np.array([cond.group_index(str(c)) for c in batch["condition"]],
                                      np.int32)
        return batch


def read_items(source, n: int) -> dict[str, np.ndarray]:
    """The first `n` items of a source as stacked arrays (render_batch when available)."""
    n = min(n, len(source))
    if hasattr(source, "render_batch"):
        return dict(source.render_batch(np.arange(n)))
    items = [source[i] for i in range(n)]
    return {k: np.stack([np.asarray(it[k]) for it in items]) for k in items[0]}


# ------------------------------------------------------------------------------ attributes
def _attr_prepare(batch, key, cfg):
    del key, cfg
    x = _to_input(batch["image"].astype(jnp.float32) / 255.0)
    return x, {k: batch[k] for k in ("age", "gender", "ethnicity")}


def _attr_loss(out, aux, targets, cfg):
    from lowlight.losses.multitask import attribute_loss, attribute_metrics

    del aux
    w = cfg.get("loss_weights", {}) or {}
    kw = dict(w_age=w.get("age", 0.1), w_gender=w.get("gender", 1.0),
              w_ethnicity=w.get("ethnicity", 1.0), age_scale=cfg.get("age_scale", 1.0))
    total, parts = attribute_loss(out, targets, **kw)
    metrics = attribute_metrics(out, targets, age_scale=kw["age_scale"])
    return total, {**{k: v for k, v in parts.items() if k != "total"}, **metrics}


class AttributeEvaluator:
    """Age MAE, gender / ethnicity accuracy (overall and per lighting condition), validation
    loss (for early stopping) and the ethnicity confusion matrix, on held-out people."""

    def __init__(self, name, cfg, model, task_cfg=None):
        from lowlight.data import pipeline

        self.name, self.cfg, self.task_cfg = name, cfg, dict(task_cfg or {})
        data = read_items(pipeline.make_source(cfg.data), cfg.get("num_images", 512))
        self.images = data["image"]
        self.targets = {k: np.asarray(data[k]) for k in ("age", "gender", "ethnicity")}
        self.conditions = np.asarray([str(c) for c in data.get(
            "condition", ["normal"] * len(self.images))])
        self.fn = _ModelFn(model)
        self.last_table = None

    def outputs(self, variables, batch_size: int = 128) -> dict[str, np.ndarray]:
        outs = [self.fn(variables, self.images[i:i + batch_size])
                for i in range(0, len(self.images), batch_size)]
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

    def run(self, variables) -> dict:
        out = self.outputs(variables)
        return self.score(out)

    def score(self, out) -> dict:
        from lowlight.losses.multitask import attribute_loss, attribute_metrics, predict

        age_scale = self.task_cfg.get("age_scale", 1.0)
        w = self.task_cfg.get("loss_weights", {}) or {}
        jo = {k: jnp.asarray(v) for k, v in out.items()}
        jt = {k: jnp.asarray(v) for k, v in self.targets.items()}
        loss, _ = attribute_loss(jo, jt, w_age=w.get("age", 0.1), w_gender=w.get("gender", 1.0),
                                 w_ethnicity=w.get("ethnicity", 1.0), age_scale=age_scale)
        res = {f"{self.name}/loss": float(loss)}
        res.update({f"{self.name}/{k}": float(v) for k, v in
                    attribute_metrics(jo, jt, age_scale=age_scale).items()})
        for c in [c for c in cond.CONDITIONS if c in set(self.conditions.tolist())]:
            sel = self.conditions == c
            m = attribute_metrics({k: v[sel] for k, v in jo.items()},
                                  {k: v[sel] for k, v in jt.items()}, age_scale=age_scale)
            res.update({f"{self.name}/{c}/{k}": float(v) for k, v in m.items()})
        pred = predict(jo, age_scale=age_scale)
        err = np.abs(np.asarray(pred["age"]) - self.targets["age"])
        for lo, hi in AGE_BANDS:
            sel = (self.targets["age"] >= lo) & (self.targets["age"] <= hi)
            if sel.any():
                res[f"{self.name}/age_mae_{lo}-{hi}"] = float(err[sel].mean())
        eth = np.asarray(pred["ethnicity"])
        conf = np.zeros((5, 5), np.int64)
        np.add.at(conf, (self.targets["ethnicity"], eth), 1)
        names = ["White", "Black", "Asian", "Indian", "Others"]
        lines = ["| true \\ predicted | " + " | ".join(names) + " |",
                 "|---|" + "---:|" * 5]
        lines += [f"| {n} | " + " | ".join(str(v) for v in row) + " |"
                  for n, row in zip(names, conf)]
        table = "\n".join([f"# {self.name}", "", "Ethnicity confusion matrix", ""] + lines) + "\n"
        self.last_table = (conf, table)
        return res


# ------------------------------------------------------------------------------ lighting
def _light_prepare(batch, key, cfg):
    del key, cfg
    return _to_input(batch["image"].astype(jnp.float32) / 255.0), {"label": batch["label"]}


def _light_loss(out, aux, targets, cfg):
    del aux, cfg
    labels = targets["label"].astype(jnp.int32)
    logp = jax.nn.log_softmax(out.astype(jnp.float32))
    loss = -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))
    return loss, {"acc": jnp.mean(jnp.argmax(out, -1) == labels)}


class LightingEvaluator:
    """Accuracy (overall, per rendered condition) and the confusion matrix of the classifier."""

    def __init__(self, name, cfg, model, task_cfg=None):
        from lowlight.data import pipeline

        self.name, self.cfg = name, cfg
        mode = (task_cfg or {}).get("labels", "binary")
        data = read_items(pipeline.make_source(cfg.data), cfg.get("num_images", 512))
        data = LightingLabels(mode)(data)
        self.images, self.labels = data["image"], np.asarray(data["label"])
        self.conditions = np.asarray([str(c) for c in data["condition"]])
        self.fn = _ModelFn(model)
        self.last_table = None

    def predict(self, variables, batch_size: int = 256) -> np.ndarray:
        return np.concatenate([np.argmax(self.fn(variables, self.images[i:i + batch_size]), -1)
                               for i in range(0, len(self.images), batch_size)])

    def run(self, variables) -> dict:
        pred = self.predict(variables)
        res = {f"{self.name}/acc": float(np.mean(pred == self.labels))}
        res[f"{self.name}/loss"] = 1.0 - res[f"{self.name}/acc"]
        for c in [c for c in cond.CONDITIONS if c in set(self.conditions.tolist())]:
            sel = self.conditions == c
            res[f"{self.name}/{c}/acc"] = float(np.mean(pred[sel] == self.labels[sel]))
        k = int(max(self.labels.max(), pred.max())) + 1
        conf = np.zeros((k, k), np.int64)
        np.add.at(conf, (self.labels, pred), 1)
        self.last_table = (conf, f"# {self.name}\n\nconfusion (rows true, cols predicted)\n\n"
                                 + "\n".join(" ".join(f"{v:6d}" for v in r) for r in conf) + "\n")
        return res


TASKS = {
    "attributes": TaskSpec(("image", "age", "gender", "ethnicity"), _attr_prepare, _attr_loss,
                           AttributeEvaluator),
    "lighting": TaskSpec(("image", "simulated", "condition"), _light_prepare, _light_loss,
                         LightingEvaluator,
                         transform=lambda cfg: LightingLabels(cfg.get("labels", "binary"))),
}


def write_table(workdir: str, step: int, name: str, text: str) -> None:
    d = os.path.join(workdir, "eval", str(step))
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"{name}.md"), "w") as f:
        f.write(text)


# ------------------------------------------------------------------------------ routing
def best_step(workdir: str, metric: str, mode: str = "min") -> int | None:
    """The evaluated step with the best `metric` in `workdir/metrics.jsonl` whose checkpoint still
    exists (the checkpointer keeps the best one), or None when there is no such step — early
    stopping's answer to "which weights": the routed method must use each expert's best model,
    not whatever the run wrote last."""
    import json

    from lowlight import checkpoint as ckpt_lib

    path = os.path.join(workdir, "metrics.jsonl")
    if not metric or not os.path.exists(path):
        return None
    directory = ckpt_lib.find_checkpoint_dir(workdir)
    have = {int(d) for d in os.listdir(directory) if d.isdigit()}
    scored = []
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if metric in rec and int(rec["step"]) in have and np.isfinite(rec[metric]):
                scored.append((rec[metric] if mode == "min" else -rec[metric], int(rec["step"])))
    return min(scored)[1] if scored else None


def _load_run(workdir: str, *, best: bool = False):
    """(model, variables, config dict) of a finished run, from its config.json + checkpoint (the
    best one by the run's `best_metric` when `best`, else the latest)."""
    import json

    from lowlight import checkpoint as ckpt_lib
    from lowlight import models

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"routing: {workdir!r} is not a lowlight run (no config.json)")
    with open(path) as f:
        cfg = json.load(f)
    model = models.create(cfg["model"]["name"], **cfg["model"].get("kwargs", {}))
    step = (best_step(workdir, cfg.get("best_metric", ""), cfg.get("best_mode", "max"))
            if best else None)
    params, batch_stats, _ = ckpt_lib.load_weights(workdir, step)
    return model, {"params": params, "batch_stats": batch_stats}, cfg


class Router(NamedTuple):
    """Paper A's method 2: a lighting classifier and one attribute expert per class."""

    light_fn: Any
    light_vars: dict
    n_classes: int
    experts: dict  # classifier class -> (model, variables, config dict)


def load_router(routing) -> Router:
    """The classifier (latest checkpoint) and experts (best-validation checkpoint each) named
    by `config.routing`; every classifier class must have an expert."""
    light_model, light_vars, light_cfg = _load_run(routing.lighting_from)
    experts = {int(k): _load_run(v, best=True) for k, v in routing.experts.items()}
    n_classes = int(light_cfg["model"]["kwargs"].get("num_classes", 2))
    missing = [c for c in range(n_classes) if c not in experts]
    if missing:
        raise ValueError(f"routing.experts has no model for classifier classes {missing}; "
                         f"the classifier in {routing.lighting_from} has {n_classes} classes")
    return Router(_ModelFn(light_model), light_vars, n_classes, experts)


def route_and_score(ev: AttributeEvaluator, router: Router):
    """Routes every face of `ev` to its expert and scores the mixed predictions.

    Returns (metrics, routed outputs in `ev`'s age units, router logits (N, classes)). The
    metrics add `<name>/lighting_acc` (router's "low" vs the simulated low-light label) and
    `<name>/routed_to_<c>` (fraction sent to each expert)."""
    logits = np.concatenate([np.asarray(router.light_fn(router.light_vars, ev.images[i:i + 256]))
                             for i in range(0, len(ev.images), 256)])
    route = np.argmax(logits, -1)
    outs = {c: AttributeEvaluator.outputs(_with_fn(ev, m), v)
            for c, (m, v, _) in router.experts.items()}
    # experts may regress age in different units (task_cfg.age_scale): bring each to the
    # units `ev.score` reads (the evaluating config's age_scale) before mixing them
    target = ev.task_cfg.get("age_scale", 1.0)
    for c, (_, _, cfg_c) in router.experts.items():
        own = (cfg_c.get("task_cfg") or {}).get("age_scale", 1.0)
        outs[c]["age"] = outs[c]["age"] * (target / own)
    first = next(iter(outs.values()))
    routed = {k: np.stack([outs[int(r)][k][i] for i, r in enumerate(route)]) for k in first}
    res = ev.score(routed)
    truth = (np.asarray(ev.conditions) == cond.LOW).astype(int)
    res[f"{ev.name}/lighting_acc"] = float(np.mean((route > 0).astype(int) == truth))
    for c in router.experts:
        res[f"{ev.name}/routed_to_{c}"] = float(np.mean(route == c))
    return res, routed, logits


def run_routed(config, workdir: str) -> dict:
    """Paper A's method 2, evaluated as one model: the lighting classifier labels each test face
    and sends it to the attribute model trained for that condition (`config.routing.experts`:
    class index of the classifier → that model's run directory). Writes metrics.jsonl (step 0)
    and a Markdown table; no training."""
    from lowlight.metric_writer import MetricWriter

    router = load_router(config.routing)
    writer = MetricWriter(workdir)
    results, lines = {}, ["| test set | routed age MAE | gender acc | ethnicity acc | "
                          "classifier acc (simulated = low) |", "|---|---:|---:|---:|---:|"]
    for name, ev_cfg in config.evals.items():
        ev = AttributeEvaluator(name, ev_cfg, router.experts[0][0], config.get("task_cfg", {}))
        res, _, _ = route_and_score(ev, router)
        results.update(res)
        lines.append(f"| {name} | {res[f'{name}/age_mae']:.2f} | {res[f'{name}/gender_acc']:.3f}"
                     f" | {res[f'{name}/ethnicity_acc']:.3f} | {res[f'{name}/lighting_acc']:.3f} |")
    writer.write(0, results)
    writer.close()
    if jax.process_index() == 0:
        write_table(workdir, 0, "routed", "# Routed attributes (paper A method 2)\n\n"
                    + "\n".join(lines) + "\n")
    return results


def _with_fn(ev: AttributeEvaluator, model) -> AttributeEvaluator:
    """A shallow copy of `ev` whose forward pass is `model`'s (same cached images)."""
    import copy

    other = copy.copy(ev)
    other.fn = _ModelFn(model)
    return other
