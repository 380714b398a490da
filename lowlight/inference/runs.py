"""Trained runs as inference stages: load, check, and run one jitted batch at a time.

A run directory (the `--workdir` of `python -m lowlight.main`) holds `config.json` and orbax
checkpoints. `load_run` checks that it is a run of the task the caller expects, rebuilds the model
from the config exactly as training built it (`train.build_model` for recognition, so a relighting
net or skin segmenter trained into the embedder comes with it), loads the latest checkpoint from
any device topology (`checkpoint.load_weights`) and checks that the weights fit that model — a
wrong directory fails here, with a message naming it, not deep inside flax.

`Stage` is a model's eval-mode forward with the input convention its task trained with
(`data.normalize`: uint8 → [-1, 1], on device) as one `jax.jit` call at a fixed batch size.
Inputs are padded to that size, so a stage compiles once whatever the number of faces; the
batch is split over the stage's devices (`parallel.batch_sharding`), weights are replicated.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lowlight import parallel
from lowlight.data.normalize import MEAN, STD, to_model_input
from lowlight.inference.errors import RunError

#: Pipeline role → the `config.task` values a run must have to fill it.
ROLES: dict[str, tuple[str, ...]] = {
    "recognition": ("recognition",),
    "attributes": ("attributes",),
    "lighting": ("lighting",),
    "relight": ("relight",),
    "skin": ("skin_seg",),
}


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """A trained run ready for inference.

    Attributes:
      role: the pipeline role it fills (a key of `ROLES`).
      workdir: the run directory.
      config: its config.json.
      step: the checkpoint step loaded.
      model: `FaceEmbedder` (recognition) or a flax module (every other task).
      variables: {"params", "batch_stats"} as host numpy trees (Partial FC centres dropped).
    """

    role: str
    workdir: str
    config: ml_collections.ConfigDict
    step: int
    model: Any
    variables: dict

    @property
    def size(self) -> int:
        """Side of the square faces the run trained on (config.data.size)."""
        return int(self.config.data.size)

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the weights (names, shapes, dtypes, bytes): equal fingerprints mean equal
        models, wherever the run directory lives. Galleries record it to refuse mixing
        embeddings of different models."""
        h = hashlib.sha256()
        for path, leaf in sorted(_flat(self.variables).items()):
            a = np.ascontiguousarray(leaf)
            h.update(f"{path}:{a.dtype.str}:{a.shape};".encode())
            h.update(a.tobytes())
        return h.hexdigest()

    def describe(self) -> dict:
        return {"workdir": os.path.abspath(self.workdir), "task": self.config.task,
                "model": self.config.model.name, "step": self.step, "size": self.size}


def _flat(tree) -> dict[str, Any]:
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def read_config(workdir: str, role: str) -> ml_collections.ConfigDict:
    """`workdir/config.json`, or a RunError naming the directory and what a run holds."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isdir(workdir):
        raise RunError(f"{role} run {workdir!r}: no such directory; expected the --workdir of a "
                       "`python -m lowlight.main` run (config.json + checkpoints/)")
    if not os.path.isfile(path):
        raise RunError(f"{role} run {workdir!r}: no config.json; expected the --workdir of a "
                       "`python -m lowlight.main` run (config.json + checkpoints/)")
    try:
        with open(path) as f:
            return ml_collections.ConfigDict(json.load(f))
    except (OSError, ValueError) as e:
        raise RunError(f"{role} run {workdir!r}: cannot read config.json ({e})") from None


def latest_step(workdir: str) -> int | None:
    """The newest complete checkpoint step of a run (None if there is none)."""
    d = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(d):
        return None
    steps = [int(s) for s in os.listdir(d) if s.isdigit() and os.path.isdir(os.path.join(d, s,
                                                                                       "state"))]
    return max(steps) if steps else None


def build_model(config, role: str):
    """The inference model of a run's config (as its training built it)."""
    try:
        if config.task == "recognition":
            from lowlight.train import build_model as build_embedder

            return build_embedder(config)
        from lowlight import models

        return models.create(config.model.name, **dict(config.model.get("kwargs", {}) or {}))
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise RunError(f"{role} run: its config.json does not describe a model lowlight can "
                       f"build ({type(e).__name__}: {e})") from None


def _abstract_variables(model, config) -> dict:
    size = int(config.data.size)
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    if config.task == "recognition":
        params, stats = jax.eval_shape(lambda k: model.init(k, x), jax.random.key(0))
    else:
        v = jax.eval_shape(lambda k: model.init({"params": k, "dropout": k}, x, train=False),
                           jax.random.key(0))
        params, stats = v["params"], v.get("batch_stats", {})
    return {"params": params, "batch_stats": stats}


def _check_fits(loaded: dict, abstract: dict, where: str) -> None:
    have, want = _flat(loaded), _flat(abstract)
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if missing or extra:
        parts = ([f"missing {', '.join(missing[:3])}"] if missing else []) + (
            [f"unexpected {', '.join(extra[:3])}"] if extra else [])
        raise RunError(f"{where} does not fit the model its config.json describes "
                       f"({'; '.join(parts)})")
    for k in sorted(want):
        if tuple(np.shape(have[k])) != tuple(want[k].shape):
            raise RunError(f"{where} does not fit the model its config.json describes ({k}: "
                           f"checkpoint {tuple(np.shape(have[k]))}, model {tuple(want[k].shape)})")


def load_run(workdir: str, role: str, step: int | None = None) -> Run:
    """Loads a trained run for `role` (a key of `ROLES`); RunError if it cannot serve it."""
    from lowlight import checkpoint as ckpt_lib

    if role not in ROLES:
        raise ValueError(f"role {role!r}; valid: {', '.join(ROLES)}")
    config = read_config(workdir, role)
    task = config.get("task")
    if task not in ROLES[role]:
        raise RunError(f"{role} run {workdir!r} is a {task!r} run; expected a "
                       f"{' or '.join(repr(t) for t in ROLES[role])} run")
    model = build_model(config, f"{role} run {workdir!r}")
    try:
        params, batch_stats, step = ckpt_lib.load_weights(workdir, step)
    except FileNotFoundError as e:
        raise RunError(f"{role} run {workdir!r}: {e}; expected orbax checkpoints under "
                       "checkpoints/<step>/state (train it first)") from None
    except Exception as e:  # orbax raises many kinds on damaged files
        raise RunError(f"{role} run {workdir!r}: cannot read its checkpoint ({type(e).__name__}:"
                       f" {e})") from None
    params = {k: v for k, v in params.items() if k != "centers"}  # Partial FC: training only
    variables = {"params": params, "batch_stats": batch_stats or {}}
    where = f"{role} run {workdir!r}: checkpoint step {step}"
    _check_fits(variables, _abstract_variables(model, config), where)
    return Run(role, workdir, config, int(step), model, variables)


# ------------------------------------------------------------------------------ forwards
# Pure functions of (variables, uint8 images (B, S, S, 3)) -> dict of (B, ...) arrays.
def _embed(variables, images, *, model, flip: bool):
    from lowlight.steps import embed_step

    return {"embedding": embed_step(variables["params"], variables["batch_stats"], images,
                                    model=model, flip=flip)}


def _logits_probs(variables, images, *, model):
    logits, _ = model.apply(variables, to_model_input(images, jnp), train=False)
    return {"probs": jax.nn.softmax(logits.astype(jnp.float32), axis=-1)}


def _attributes(variables, images, *, model, age_scale: float):
    from lowlight.losses.multitask import predict

    out, _ = model.apply(variables, to_model_input(images, jnp), train=False)
    return predict(out, age_scale=age_scale)


def _relight(variables, images, *, model):
    out, _ = model.apply(variables, to_model_input(images, jnp), train=False)
    # back to uint8 exactly as RelightEvaluator scores it
    return {"image": jnp.rint(jnp.clip(out * STD + MEAN, 0.0, 1.0) * 255.0).astype(jnp.uint8)}


def _skin(variables, images, *, model):
    mask, _ = model.apply(variables, to_model_input(images, jnp), train=False)
    return {"mask": mask.astype(jnp.float32)}


def forward_for(run: Run, *, flip: bool = True) -> Callable:
    """The stage function of a run: what its task's evaluator computes, batched."""
    task = run.config.task
    if task == "recognition":
        return functools.partial(_embed, model=run.model, flip=flip)
    if task == "lighting":
        return functools.partial(_logits_probs, model=run.model)
    if task == "attributes":
        age_scale = float((run.config.get("task_cfg", {}) or {}).get("age_scale", 1.0))
        return functools.partial(_attributes, model=run.model, age_scale=age_scale)
    if task == "relight":
        return functools.partial(_relight, model=run.model)
    if task == "skin_seg":
        return functools.partial(_skin, model=run.model)
    raise RunError(f"{run.role} run {run.workdir!r}: task {task!r} has no inference stage")


class _Traces:
    count = 0


#: (forward repr, devices, batch size) → (jitted forward, its trace counter). Runs with the same
#: architecture (paper A's experts: one MobileNetV2 per lighting condition) share one compiled
#: executable; only their weights differ.
_JITTED: dict[tuple, tuple[Callable, _Traces]] = {}


class Stage:
    """One run's forward as a single jitted call per fixed-size batch.

    Args:
      run: the loaded run.
      batch_size: faces per call (rounded up to a multiple of the device count); fewer are
        padded by repeating the last face, so every call has the same shape.
      num_devices: local devices the batch is split over (0 = all).
      flip: recognition only — add the mirrored face's embedding (insightface's test-time flip,
        what `lowlight.evaluate` and the calibration use).
    """

    def __init__(self, run: Run, *, batch_size: int = 16, num_devices: int = 1,
                 flip: bool = True):
        local = jax.local_devices()
        n = len(local) if num_devices <= 0 else num_devices
        if n > len(local):
            raise ValueError(f"num_devices={num_devices} but only {len(local)} local devices")
        self.run, self.size = run, run.size
        mesh = parallel.make_mesh(1, devices=local[:n])
        self.batch_size = math.ceil(max(1, batch_size) / n) * n
        self._rep, self._bsh = parallel.replicated(mesh), parallel.batch_sharding(mesh)
        self.variables = jax.device_put(run.variables, self._rep)
        forward = forward_for(run, flip=flip)
        key = (repr(forward), tuple(d.id for d in local[:n]), self.batch_size)
        if key not in _JITTED:
            traces = _Traces()

            def traced(variables, images):
                traces.count += 1  # runs at trace time only
                return forward(variables, images)

            _JITTED[key] = (jax.jit(traced, in_shardings=(self._rep, self._bsh),
                                    out_shardings=self._bsh), traces)
        self._fn, self._traces = _JITTED[key]
        self._out_struct = jax.eval_shape(
            forward, run.variables,
            jax.ShapeDtypeStruct((1, self.size, self.size, 3), jnp.uint8))

    @property
    def traces(self) -> int:
        """How often this stage's forward was traced (= compiled); stays 1 in use."""
        return self._traces.count

    def output_shape(self, name: str) -> tuple[int, ...]:
        """Shape of one face's output `name` (e.g. "embedding" → (D,))."""
        return tuple(self._out_struct[name].shape[1:])

    def __call__(self, images) -> dict[str, np.ndarray]:
        """uint8 (N, S, S, 3) faces → {name: (N, ...) numpy}; S is the run's size."""
        images = np.asarray(images)
        want = (self.size, self.size, 3)
        if images.ndim != 4 or images.shape[1:] != want or images.dtype != np.uint8:
            raise ValueError(f"{self.run.role} stage: expected uint8 faces (N, {self.size}, "
                             f"{self.size}, 3), got {images.dtype} {images.shape}")
        n, b = len(images), self.batch_size
        if n == 0:
            return {k: np.zeros((0, *s.shape[1:]), s.dtype) for k, s in self._out_struct.items()}
        outs = []
        for i in range(0, n, b):
            chunk = images[i:i + b]
            real = len(chunk)
            if real < b:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - real, axis=0)])
            out = self._fn(self.variables, jax.device_put(chunk, self._bsh))
            outs.append({k: np.asarray(v)[:real] for k, v in out.items()})
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


_STAGES: dict[tuple, Stage] = {}


def stage(workdir: str, role: str, *, batch_size: int = 16, num_devices: int = 1,
          flip: bool = True) -> Stage:
    """The `Stage` of the latest checkpoint of `workdir`, shared within the process.

    Pipelines built repeatedly (a notebook, the tests, a server) reuse the loaded weights and
    compiled forward of a run as long as its newest checkpoint step is the same.
    """
    key = (role, os.path.realpath(workdir), latest_step(workdir), batch_size, num_devices, flip)
    if key[2] is None or key not in _STAGES:
        st = Stage(load_run(workdir, role), batch_size=batch_size, num_devices=num_devices,
                   flip=flip)
        _STAGES[key] = st
    return _STAGES[key]


def clear_cache() -> None:
    """Forgets every cached stage (frees their device memory once unreferenced)."""
    _STAGES.clear()
