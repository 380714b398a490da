"""`train_and_evaluate(config, workdir)`: the recognition training loop (task 'recognition').

Sections: setup (mesh, data, model) → shapes first (eval_shape → shardings → jitted init or
restore) → the loop (step, log, evaluate, checkpoint, preemption) → shutdown. Everything the
loop computes lives in `steps.py`; this file only orchestrates.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import time

import jax
import numpy as np
from absl import logging

from lowlight import checkpoint as ckpt_lib
from lowlight import models, optim, parallel, steps
from lowlight.data import pipeline
from lowlight.eval import evaluators as eval_lib
from lowlight.losses import partial_fc as pfc
from lowlight.metric_writer import MetricWriter


class _Preemption:
    """SIGTERM/SIGUSR1 (SLURM's pre-kill signals) → save a checkpoint at the next step and exit."""

    def __init__(self):
        self.requested = False
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. notebooks): rely on orbax's detection
                pass

    def _handle(self, signum, frame):
        del frame
        logging.warning("signal %d received: checkpointing and stopping", signum)
        self.requested = True

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def state_shardings(abstract_state, mesh, class_axes):
    """Partial FC centres (and their optimizer slots) split over `class_axes`; rest replicated."""
    centers_sh = pfc.centers_sharding(mesh, class_axes)
    rep = parallel.replicated(mesh)
    c_shape = abstract_state.params["centers"].shape

    def rule(path, leaf):
        p = optim.path_str(path)
        if "centers" in p and getattr(leaf, "shape", None) == c_shape:
            return centers_sh
        return rep

    return jax.tree_util.tree_map_with_path(rule, abstract_state)


def class_multiple(mesh, class_axes) -> int:
    """Rows of the centre matrix are padded to a multiple of lcm(class shards, 128), so a
    checkpoint restores on any device count that divides 128 (8 GPUs → 4, 1, 64, ...)."""
    return math.lcm(pfc.num_class_shards(mesh, class_axes), 128)


def setup(config, mesh):
    """Model, optimizer, schedule, init function and the abstract state (shapes only)."""
    model = models.create(config.model.name, **dict(config.model.get("kwargs", {}) or {}))
    dims = dict(model=model, num_classes=config.data.num_identities,
                embed_dim=config.model.get("kwargs", {}).get("embed_dim", 512),
                image_size=config.data.size,
                class_multiple=class_multiple(mesh, tuple(config.partial_fc.class_axes)))
    # Shapes first: the optimizer's masks need the parameter tree, not its values.
    abstract_params = jax.eval_shape(
        lambda k: steps.init_variables(k, **dims)[0], jax.random.key(0))
    tx, sched = optim.make_tx(config.optim, abstract_params, config.total_steps)
    init = functools.partial(steps.init_state, tx=tx, loss_name=config.loss.name, **dims)
    abstract = jax.eval_shape(init, jax.random.key(config.seed))
    return model, tx, sched, init, abstract


def _restore_or_init(config, workdir, init, abstract, shardings, data_iter):
    ckpt = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), every=config.ckpt_every,
        keep=config.get("keep_ckpts", 3), best_metric=config.get("best_metric", ""),
        best_mode=config.get("best_mode", "max"))
    target = ckpt_lib.abstract_with_shardings(abstract, shardings)
    if ckpt.latest_step() is not None:
        state, step = ckpt.restore(target, data_iter=data_iter)
        logging.info("resumed from %s at step %d", ckpt.directory, step)
        return ckpt, state, "workdir"
    resume = config.get("resume", "")
    if resume and resume != "force":
        other = ckpt_lib.Checkpointer(ckpt_lib.find_checkpoint_dir(resume), read_only=True)
        state, step = other.restore(target, data_iter=data_iter)
        logging.info("resumed from %s at step %d (config.resume)", resume, step)
        return ckpt, state, "resume"
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(config.seed))
    init_from = config.get("init_from", "")
    if init_from:
        other = ckpt_lib.Checkpointer(ckpt_lib.find_checkpoint_dir(init_from), read_only=True)
        loaded, step = other.restore(target)
        state = state.replace(params=loaded.params, batch_stats=loaded.batch_stats)
        logging.info("initialised weights from %s step %d (config.init_from)", init_from, step)
        return ckpt, state, "init_from"
    return ckpt, state, "scratch"


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains a face-embedding model as `config` says; returns the last logged metrics."""
    # ----------------------------------------------------------------- setup
    n_dev = config.get("num_devices", 0) or jax.device_count()
    mesh = parallel.make_mesh(config.get("model_parallel", 1), devices=jax.devices()[:n_dev])
    class_axes = tuple(config.partial_fc.class_axes)
    source = pipeline.make_source(config.data)
    model, tx, sched, init, abstract = setup(config, mesh)
    shardings = state_shardings(abstract, mesh, class_axes)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params["backbone"]))
    logging.info("model %s: %s backbone params; %d classes x %d-d centres; mesh %s",
                 config.model.name, f"{n_params:,}", config.data.num_identities,
                 abstract.params["centers"].shape[1], dict(mesh.shape))
    data_iter = pipeline.batch_iterator(
        source, batch_size=config.batch_size, seed=config.seed,
        keys=("image", "identity"), rename={"identity": "label"},
        num_workers=config.get("num_workers", 0))
    ckpt, state, origin = _restore_or_init(config, workdir, init, abstract, shardings, data_iter)
    start = int(jax.device_get(state.step))
    writer = MetricWriter(workdir)

    step_fn = jax.jit(
        functools.partial(steps.train_step, model=model, tx=tx, sched=sched,
                          loss_cfg=config.loss, pfc_cfg=config.partial_fc,
                          augment=config.get("augment"), mesh=mesh,
                          num_classes=config.data.num_identities),
        in_shardings=(shardings, parallel.batch_sharding(mesh)),
        out_shardings=(shardings, parallel.replicated(mesh)),
        donate_argnums=0)
    evaluators = eval_lib.build(config.get("evals"))
    embed = eval_lib.make_embed_fn(model, mesh, batch_size=config.get("eval_batch_size", 256))

    def run_evals(st) -> dict:
        out = {}
        for ev in evaluators.values():
            out.update(ev.run(lambda im: embed(st.params["backbone"], st.batch_stats, im)))
        return out

    # ----------------------------------------------------------------- loop
    total = config.total_steps
    stop = min(total, config.get("stop_after", 0) or total)
    preempt = _Preemption()
    last = {}
    progress = None
    if config.get("progress", True) and jax.process_index() == 0:
        from tqdm import tqdm

        progress = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)
    t0, n0 = time.time(), start
    try:
        for step in range(start, stop):
            batch = parallel.global_batch(next(data_iter), mesh)
            state, metrics = step_fn(state, batch)
            done = step + 1
            if progress is not None:
                progress.update(1)
            if done % config.log_every == 0 or done == stop or preempt.requested:
                m = jax.device_get(metrics)
                if not np.isfinite(m["loss"]):
                    raise FloatingPointError(
                        f"loss is {m['loss']} at step {done}; stopping. The last checkpoint "
                        f"(step {ckpt.latest_step()}) in {ckpt.directory} is unaffected; lower "
                        "optim.lr, enable optim.clip_norm, or check the data")
                dt = time.time() - t0
                rate = (done - n0) * config.batch_size / max(dt, 1e-9)
                t0, n0 = time.time(), done
                rec = {f"train/{k}": float(v) for k, v in m.items()}
                rec["train/images_per_sec"] = rate
                last.update(writer.write(done, rec))
                if progress is not None:
                    progress.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['acc']:.3f}",
                                         img_s=f"{rate:.0f}")
            eval_metrics = None
            if evaluators and (done % config.eval_every == 0 or done == stop):
                eval_metrics = run_evals(state)
                last.update(writer.write(done, eval_metrics))
                logging.info("step %d: %s", done, {k: round(float(v), 4)
                                                   for k, v in eval_metrics.items()})
            force = done == stop or preempt.requested
            ckpt.save(done, state, data_iter, metrics=eval_metrics, force=force)
            if preempt.requested or ckpt.reached_preemption(done):
                if not force:
                    ckpt.save(done, state, data_iter, force=True)
                logging.warning("preempted: checkpoint at step %d saved; exiting", done)
                break
    finally:
        if progress is not None:
            progress.close()
        preempt.restore()
        ckpt.close()
        writer.close()
    return last
