"""The training loop every task shares: restore-or-init, step, log, evaluate, checkpoint,
preemption. Task files (train.py, train_supervised.py) build the jitted step, the data iterator
and the evaluation function; `run` drives them.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import jax
import numpy as np
from absl import logging

from lowlight import checkpoint as ckpt_lib
from lowlight import parallel
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


def restore_or_init(config, workdir, init, abstract, shardings, data_iter, post_init=None):
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
    if post_init is not None:  # e.g. pretrained sub-modules (relight net, U-Net)
        state = post_init(state)
    init_from = config.get("init_from", "")
    if init_from:
        params, batch_stats, step = ckpt_lib.load_weights(init_from)
        state = state.replace(params=_take_matching(state.params, params, "params"),
                              batch_stats=_take_matching(state.batch_stats, batch_stats,
                                                         "batch_stats"))
        logging.info("initialised weights from %s step %d (config.init_from)", init_from, step)
        return ckpt, state, "init_from"
    return ckpt, state, "scratch"


def _take_matching(fresh, loaded, what: str):
    """`fresh` with each top-level entry replaced by `loaded`'s where the two trees have the same
    structure and shapes, placed on `fresh`'s shardings. Only weights move (no optimizer state,
    step or rng), so a pretrained or converted backbone fine-tunes on another dataset: e.g. the
    Partial FC `centers` of a different number of identities stay freshly initialised. What is
    kept fresh is logged by name; a run whose weights match nothing is refused."""
    if not isinstance(fresh, dict) or not fresh:
        return fresh
    loaded = loaded or {}
    out, taken, kept = dict(fresh), [], []
    for key, value in fresh.items():
        other = loaded.get(key)
        same = other is not None and jax.tree.structure(other) == jax.tree.structure(value) and all(
            tuple(a.shape) == tuple(b.shape)
            for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(value)))
        if same:
            out[key] = jax.tree.map(
                lambda a, b: jax.device_put(np.asarray(a, b.dtype), b.sharding), other, value)
            taken.append(key)
        else:
            kept.append(key)
    if kept:
        logging.warning("init_from: %s %s kept freshly initialised (absent or other shapes)",
                        what, kept)
    if what == "params" and not taken:
        raise ValueError(f"init_from: none of the {what} {sorted(fresh)} match the checkpoint's "
                         f"{sorted(loaded)}")
    return out


def _early_stopper(config, workdir):
    """Paper A's early stopping on a validation metric (`config.early_stopping`), resumable."""
    es = config.get("early_stopping", None)
    if not es or not es.get("metric"):
        return None
    from lowlight.losses.multitask import EarlyStopping

    path = os.path.join(workdir, "early_stopping.json")
    if os.path.exists(path):
        import json

        with open(path) as f:
            return EarlyStopping.from_state_dict(json.load(f))
    return EarlyStopping(patience=es.patience, min_delta=es.get("min_delta", 0.0),
                         mode=es.get("mode", "min"))


def _save_stopper(stopper, workdir):
    if jax.process_index() != 0:
        return
    import json

    path = os.path.join(workdir, "early_stopping.json")
    with open(path + ".tmp", "w") as f:
        json.dump(stopper.state_dict(), f)
    os.replace(path + ".tmp", path)


def run(config, workdir: str, *, mesh, init, abstract, shardings, step_fn, data_iter,
        evaluate: Callable | None = None, postfix: tuple[str, ...] = ("loss",),
        post_init: Callable | None = None) -> dict:
    """Runs `step_fn(state, global_batch) -> (state, metrics)` from the restored (or fresh)
    state to `config.total_steps` (or `config.stop_after`); returns the last logged metrics.

    `evaluate(state) -> {name: value}` runs every `config.eval_every` steps and at the end.
    `metrics["loss"]` is checked for NaN/Inf at every log step. `post_init(state) -> state` runs
    once after a from-scratch init (not on resume).
    """
    ckpt, state, origin = restore_or_init(config, workdir, init, abstract, shardings, data_iter,
                                          post_init)
    start = int(jax.device_get(state.step))
    logging.info("starting at step %d (%s)", start, origin)
    writer = MetricWriter(workdir)
    stopper = _early_stopper(config, workdir)
    # ----------------------------------------------------------------- loop
    total = config.total_steps
    stop = min(total, config.get("stop_after", 0) or total)
    if stopper is not None and stopper.should_stop:
        logging.warning("this run already stopped early (best step %s); nothing to do",
                        stopper.best_step)
        stop = start
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
                if m.get("nonfinite", 0) > config.get("max_nonfinite", 10) or (
                        "nonfinite" not in m and not np.isfinite(m["loss"])):
                    raise FloatingPointError(
                        f"loss is {m['loss']} at step {done} and {int(m.get('nonfinite', 0))} "
                        f"updates were skipped as non-finite (config.max_nonfinite="
                        f"{config.get('max_nonfinite', 10)}); stopping. The last checkpoint "
                        f"(step {ckpt.latest_step()}) in {ckpt.directory} is unaffected; lower "
                        "optim.lr, enable optim.clip_norm, or check the data")
                dt = time.time() - t0
                rate = (done - n0) * config.batch_size / max(dt, 1e-9)
                t0, n0 = time.time(), done
                rec = {f"train/{k}": float(v) for k, v in m.items()}
                rec["train/images_per_sec"] = rate
                last.update(writer.write(done, rec))
                if progress is not None:
                    progress.set_postfix(img_s=f"{rate:.0f}",
                                         **{k: f"{m[k]:.3f}" for k in postfix if k in m})
            eval_metrics = None
            if evaluate is not None and (done % config.eval_every == 0 or done == stop):
                eval_metrics = evaluate(state)
                last.update(writer.write(done, eval_metrics))
                shown = dict(list(eval_metrics.items())[:8])
                logging.info("step %d: %s%s", done, {k: round(float(v), 4)
                                                     for k, v in shown.items()},
                             " ..." if len(eval_metrics) > len(shown) else "")
            early = False
            if stopper is not None and eval_metrics is not None:
                key = config.early_stopping.metric
                if key not in eval_metrics:
                    raise KeyError(f"early_stopping.metric {key!r} is not an evaluation metric; "
                                   f"available: {', '.join(sorted(eval_metrics))}")
                early = stopper.update(float(eval_metrics[key]), step=done)
                _save_stopper(stopper, workdir)
                if early:
                    logging.warning("early stopping at step %d: %s has not improved for %d "
                                    "evaluations (best %.5g at step %s)", done, key,
                                    stopper.patience, stopper.best, stopper.best_step)
                    last.update(writer.write(done, {"early_stopped": 1.0,
                                                    "best_step": float(stopper.best_step)}))
            force = done == stop or preempt.requested or early
            saved = ckpt.save(done, state, data_iter, metrics=eval_metrics, force=force)
            if early:
                break
            if preempt.requested or ckpt.reached_preemption(done):
                if not saved:  # (the signal may arrive after `force` was computed)
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
