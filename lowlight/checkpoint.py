"""Orbax checkpointing: save on an interval and on preemption, keep latest-N + best, resume.

Layout: `workdir/checkpoints/<step>/{state, data}` — `state` is the train-state pytree
(StandardSave), `data` the grain iterator state, so a resumed run continues the same example
stream. Restores go into *abstract* targets that carry shardings (`jax.ShapeDtypeStruct` with
`.sharding`), so a run saved on 8 devices resumes on 4 (or on 1 CPU for evaluation).

Resume order (the caller's): workdir checkpoint > `config.resume` (another run's workdir or
checkpoint directory) > `config.init_from` (weights only) > scratch.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


def _best_fn(metric: str):
    def fn(metrics):
        return float(metrics[metric])
    return fn


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with lowlight's policies.

    Args:
      directory: where step folders go (created).
      every: save interval in steps (0 = only on preemption / at the end).
      keep: how many latest checkpoints to keep.
      best_metric: metric name (as logged, e.g. 'synth_val/acc') whose best `keep_best`
        checkpoints are also kept; '' disables.
      best_mode: 'max' or 'min'.
      async_save: write in a background thread (the next train steps overlap the write).
    """

    def __init__(self, directory: str, *, every: int = 1000, keep: int = 3,
                 best_metric: str = "", best_mode: str = "max", keep_best: int = 1,
                 async_save: bool = True, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        save_policies = [policies.PreemptionCheckpointingPolicy()]
        if every:
            save_policies.append(policies.FixedIntervalPolicy(every))
        keep_policies = [policies.LatestN(keep)]
        if best_metric:
            keep_policies.append(policies.BestN(
                get_metric_fn=_best_fn(best_metric), reverse=best_mode == "min", n=keep_best,
                keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.AnySavePolicy(save_policies),
            preservation_policy=policies.AnyPreservationPolicy(keep_policies),
            enable_async_checkpointing=async_save,
            read_only=read_only,
            create=not read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    # ---------------------------------------------------------------- queries
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    # ---------------------------------------------------------------- save
    def save(self, step: int, state, data_iter=None, *, metrics: dict | None = None,
             force: bool = False) -> bool:
        """Saves if the policies say so (or `force`). Returns whether a save started."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            import grain

            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        return self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics,
                                 force=force)

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()

    # ---------------------------------------------------------------- restore
    def restore(self, abstract_state, step: int | None = None, data_iter=None) -> tuple[Any, int]:
        """Restores `state` (and the iterator in place) at `step` (default latest).

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with shardings (from
        `jax.eval_shape` + the run's shardings): arrays come back laid out for *this* mesh.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None and self._has_item(step, "data"):
            import grain

            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"], step

    def _has_item(self, step: int, name: str) -> bool:
        return os.path.isdir(os.path.join(self.directory, str(step), name))


def abstract_with_shardings(tree, shardings):
    """`ShapeDtypeStruct`s of `tree` carrying `shardings` (a matching pytree)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def find_checkpoint_dir(path: str) -> str:
    """Accepts a run workdir or its checkpoints/ folder; returns the checkpoints folder."""
    cand = os.path.join(path, "checkpoints")
    if os.path.isdir(cand):
        return cand
    if os.path.isdir(path):
        return path
    raise FileNotFoundError(f"no checkpoints at {path!r} (expected a workdir or its checkpoints/)")


def load_weights(path: str, step: int | None = None) -> tuple[Any, Any, int]:
    """(params, batch_stats, step) of another run's checkpoint, as host numpy trees.

    `path` is a run workdir or its checkpoints/ folder. Used to start a module from its own
    pretrained run (a relighting net or U-Net inside recognition training, paper B §3.9) and by
    `lowlight.evaluate`, without knowing that run's optimizer or device topology: the target is
    built from the checkpoint's own metadata (shapes and dtypes), laid out on this process's
    first device, so a checkpoint written on 8 GPUs loads on a 1-CPU laptop.
    """
    directory = find_checkpoint_dir(path)
    steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit()
                   and os.path.isdir(os.path.join(directory, d, "state")))
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {directory}; have {steps}")
    item = os.path.join(directory, str(step), "state")
    checkpointer = ocp.StandardCheckpointer()
    meta = checkpointer.metadata(item)
    tree = getattr(meta, "item_metadata", meta)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    state = checkpointer.restore(item, target)
    checkpointer.close()
    get = (lambda k: state[k]) if isinstance(state, dict) else (lambda k: getattr(state, k))
    try:
        params, batch_stats = get("params"), get("batch_stats")
    except (KeyError, AttributeError):
        raise ValueError(f"checkpoint {item} has no params/batch_stats") from None
    to_np = lambda t: jax.tree.map(lambda x: np.asarray(jax.device_get(x)), t)
    return to_np(params), to_np(batch_stats or {}), step
