"""Training of the single-model supervised tasks on the synthetic world's ground truth.

Tasks (config.task):
  relight   — paper B §3.4: degraded face → the same face under canonical light, L1 + SSIM.
  skin_seg  — paper B §3.3: face → skin mask, BCE + Dice + TV + area prior (eqs. 4–6).

Each task is a `TaskSpec`: which source keys a batch needs, how to turn a batch into model input
and targets (on device, inside the jitted step), the loss, and an evaluator that compares the
model with the classic baselines per lighting condition. The loop (restore, log, evaluate,
checkpoint, preemption) is `lowlight.loop.run`, shared with recognition training.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from lowlight import loop, models, optim, parallel
from lowlight.data import pipeline
from lowlight.data.normalize import MEAN, STD
from lowlight.steps import TrainState, guard_nonfinite


# ------------------------------------------------------------------------------ task specs
@dataclasses.dataclass(frozen=True)
class TaskSpec:
    keys: tuple[str, ...]  # source keys a batch needs
    prepare: Callable      # (batch, key, cfg) -> (x, targets)
    loss: Callable         # (outputs, aux, targets, cfg) -> (loss, metrics)
    evaluator: Callable    # (name, eval_cfg, model, task_cfg) -> obj with run(variables) -> dict
    transform: Callable | None = None  # task_cfg -> per-batch numpy transform (e.g. labels)


def _to_input(x01):
    return (x01 - MEAN) / STD


def _relight_prepare(batch, key, cfg):
    """Input: the rendered face (any condition), optionally re-degraded on device by paper B's
    protocol ops (so the net also learns to undo gamma/contrast/directional masks); target: the
    canonical-light render."""
    x = batch["image"].astype(jnp.float32) / 255.0
    p = cfg.get("protocol_p", 0.0)
    if p > 0:
        from lowlight.data import illumination_jax as ij

        k_apply, k_sel = jax.random.split(key)
        degraded, _ = ij.apply_protocol(k_apply, x)
        use = jax.random.uniform(k_sel, (x.shape[0], 1, 1, 1)) < p
        x = jnp.where(use, degraded, x)
    return _to_input(x), {"target": batch["canonical"].astype(jnp.float32) / 255.0}


def _relight_loss(out, aux, targets, cfg):
    from lowlight.losses.reconstruction import l1_ssim_terms

    del aux
    pred = jnp.clip(out * STD + MEAN, 0.0, 1.0)
    terms = l1_ssim_terms(pred, targets["target"], alpha=cfg.get("ssim_alpha", 0.84))
    return terms["loss"], {"l1": terms["l1"], "ssim": terms["ssim"]}


def _seg_prepare(batch, key, cfg):
    x = batch["image"].astype(jnp.float32) / 255.0
    aug = cfg.get("augment", {})
    if aug and aug.get("enabled", False):
        from lowlight.data.illumination_jax import photometric_augment

        x = photometric_augment(key, x, **{k: (tuple(v) if isinstance(v, list) else v)
                                           for k, v in aug.items() if k != "enabled"})
    return _to_input(x), {"mask": batch["skin_mask"].astype(jnp.float32)}


def _seg_loss(out, aux, targets, cfg):
    from lowlight.losses.segmentation import segmentation_loss

    total, parts = segmentation_loss(out, targets["mask"], logits=aux.get("logits"),
                                     lambda_tv=cfg.get("lambda_tv", 0.01),
                                     lambda_area=cfg.get("lambda_area", 0.005),
                                     tv_reduction=cfg.get("tv_reduction", "sum"))
    pred = out >= 0.5
    tgt = targets["mask"] >= 0.5
    inter = jnp.sum(pred & tgt, axis=(1, 2))
    union = jnp.sum(pred | tgt, axis=(1, 2))
    iou = jnp.mean(jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0))
    return total, {**{k: v for k, v in parts.items() if k != "total"}, "iou": iou}


def _eval_set(cfg):
    from lowlight.data.synthetic import SynthFaces

    src = SynthFaces(seed=cfg.seed, num_identities=cfg.num_identities,
                     images_per_identity=cfg.images_per_identity, size=cfg.size)
    n = min(len(src), cfg.get("num_images", len(src)))
    return src.render_batch(np.arange(n))


class _ModelFn:
    """Jitted eval-mode forward of a dense model on uint8 batches (one compile per shape)."""

    def __init__(self, model):
        self._apply = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])

    def __call__(self, variables, images_uint8):
        x = _to_input(jnp.asarray(images_uint8, jnp.float32) / 255.0)
        return jax.tree.map(np.asarray, self._apply(variables, x))


class RelightEvaluator:
    """PSNR / SSIM / illumination uniformity per condition: the net vs none/gamma/clahe/msr."""

    def __init__(self, name, cfg, model, task_cfg=None):
        del task_cfg
        self.name, self.cfg = name, cfg
        data = _eval_set(cfg)
        self.pairs = {}
        for c in sorted(set(data["condition"].tolist())):
            sel = data["condition"] == c
            self.pairs[c] = {"image": data["image"][sel], "target": data["canonical"][sel],
                             "skin_mask": data["skin_mask"][sel]}
        self.fn = _ModelFn(model)
        self.last_table = None

    def run(self, variables) -> dict:
        from lowlight.eval import relight_metrics as rm

        def relight(images):
            out = self.fn(variables, images) * STD + MEAN
            return np.rint(np.clip(out, 0, 1) * 255).astype(np.uint8)

        baselines = () if self.cfg.get("skip_baselines", False) else rm.BASELINES
        table = rm.evaluate_relighting(self.pairs, {"relight": relight}, baselines=baselines)
        self.last_table = (table, rm.to_markdown(table))
        out = {}
        for method, rows in table.items():
            for metric in ("psnr", "ssim", "uniformity_gain"):
                vals = [r[metric] for r in rows.values() if np.isfinite(r[metric])]
                out[f"{self.name}/{method}/{metric}"] = float(np.mean(vals)) if vals else math.nan
        for c, r in table["relight"].items():
            out[f"{self.name}/relight/{c}/psnr"] = r["psnr"]
            out[f"{self.name}/relight/{c}/ssim"] = r["ssim"]
        return out


class SegEvaluator:
    """IoU / Dice per condition: the model vs YCbCr thresholding (Chai & Ngan)."""

    def __init__(self, name, cfg, model, task_cfg=None):
        del task_cfg
        self.name, self.cfg = name, cfg
        data = _eval_set(cfg)
        self.images, self.masks = data["image"], data["skin_mask"]
        self.conditions = data["condition"]
        self.fn = _ModelFn(model)
        self.last_table = None

    def run(self, variables) -> dict:
        from lowlight.data.skin_color import ycbcr_skin_mask
        from lowlight.eval import segmentation_metrics as sm

        segs = {"model": lambda im: self.fn(variables, im), "ycbcr": ycbcr_skin_mask}
        table = sm.evaluate_segmenters(self.images, self.masks, self.conditions, segs)
        self.last_table = (table, sm.to_markdown(table))
        out = {}
        for seg, rows in table.items():
            for c, r in rows.items():
                out[f"{self.name}/{seg}/{c}/iou"] = r["iou"]
                out[f"{self.name}/{seg}/{c}/dice"] = r["dice"]
        return out


TASKS: dict[str, TaskSpec] = {
    "relight": TaskSpec(("image", "canonical"), _relight_prepare, _relight_loss, RelightEvaluator),
    "skin_seg": TaskSpec(("image", "skin_mask"), _seg_prepare, _seg_loss, SegEvaluator),
}


def task_spec(name: str) -> TaskSpec:
    """The TaskSpec of `name` (paper A's tasks live in lowlight.attributes)."""
    if name in TASKS:
        return TASKS[name]
    from lowlight import attributes

    if name in attributes.TASKS:
        return attributes.TASKS[name]
    raise ValueError(f"unknown supervised task {name!r}; valid: "
                     f"{', '.join([*TASKS, *attributes.TASKS])}")


# ------------------------------------------------------------------------------ steps
def init_state(rng, *, model, tx, image_size: int) -> TrainState:
    k_model, k_state = jax.random.split(rng)
    x = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
    variables = model.init({"params": k_model, "dropout": k_model}, x, train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      extras={"nonfinite": jnp.zeros((), jnp.int32)}, rng=k_state)


def train_step(state, batch, *, model, tx, sched, spec: TaskSpec, task_cfg):
    rng = jax.random.fold_in(state.rng, state.step)
    k_prep, k_drop = jax.random.split(rng)
    x, targets = spec.prepare(batch, k_prep, task_cfg)

    def loss_fn(params):
        (out, aux), new_vars = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, x, train=True,
            mutable=["batch_stats"], rngs={"dropout": k_drop})
        loss, metrics = spec.loss(out, aux, targets, task_cfg)
        return loss, (metrics, new_vars.get("batch_stats", {}))

    (loss, (metrics, new_bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": sched(state.step),
               **metrics}
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_bs,
                              opt_state=opt_state)
    return guard_nonfinite(new_state, state, loss, grads, updates, metrics)


# ------------------------------------------------------------------------------ entry
def train_and_evaluate(config, workdir: str) -> dict:
    """Trains the model of a supervised task (`config.task` in TASKS)."""
    spec = task_spec(config.task)
    n_dev = config.get("num_devices", 0) or jax.device_count()
    mesh = parallel.make_mesh(1, devices=jax.devices()[:n_dev])
    model = models.create(config.model.name, **dict(config.model.get("kwargs", {}) or {}))
    abstract_params = jax.eval_shape(
        lambda k: model.init({"params": k}, jnp.zeros((1, config.data.size, config.data.size, 3)),
                             train=False)["params"], jax.random.key(0))
    tx, sched = optim.make_tx(config.optim, abstract_params, config.total_steps)
    init = functools.partial(init_state, model=model, tx=tx, image_size=config.data.size)
    abstract = jax.eval_shape(init, jax.random.key(config.seed))
    shardings = jax.tree.map(lambda _: parallel.replicated(mesh), abstract)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params))
    logging.info("task %s, model %s: %s params; mesh %s", config.task, config.model.name,
                 f"{n_params:,}", dict(mesh.shape))
    source = pipeline.make_source(config.data)
    task_cfg = config.get("task_cfg", {})
    data_iter = pipeline.batch_iterator(
        source, batch_size=config.batch_size, seed=config.seed, keys=spec.keys,
        num_workers=config.get("num_workers", 0),
        transform=spec.transform(task_cfg) if spec.transform else None)
    step_fn = jax.jit(
        functools.partial(train_step, model=model, tx=tx, sched=sched, spec=spec,
                          task_cfg=task_cfg),
        in_shardings=(shardings, parallel.batch_sharding(mesh)),
        out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
    evaluators = {name: spec.evaluator(name, cfg, model, task_cfg)
                  for name, cfg in (config.get("evals") or {}).items()}

    def evaluate(state):
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        out = {}
        for name, ev in evaluators.items():
            out.update(ev.run(variables))
            if ev.last_table is not None and jax.process_index() == 0:
                d = os.path.join(workdir, "eval", str(int(jax.device_get(state.step))))
                os.makedirs(d, exist_ok=True)
                with open(os.path.join(d, f"{name}.md"), "w") as f:
                    f.write(ev.last_table[1])
        return out

    return loop.run(config, workdir, mesh=mesh, init=init, abstract=abstract,
                    shardings=shardings, step_fn=step_fn, data_iter=data_iter,
                    evaluate=evaluate if evaluators else None, postfix=("loss",))
