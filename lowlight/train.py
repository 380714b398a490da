"""`train_and_evaluate(config, workdir)`: the recognition training loop (task 'recognition').

Sections: setup (mesh, data, model) → shapes first (eval_shape → shardings → jitted init or
restore) → the loop (step, log, evaluate, checkpoint, preemption) → shutdown. Everything the
loop computes lives in `steps.py`; this file only orchestrates.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from absl import logging

from lowlight import checkpoint as ckpt_lib
from lowlight import loop, models, optim, parallel, steps
from lowlight.data import pipeline
from lowlight.eval import evaluators as eval_lib
from lowlight.losses import partial_fc as pfc
from lowlight.models.face_embedder import FaceEmbedder


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


def build_model(config) -> FaceEmbedder:
    """The recognition forward of `config`: backbone + the enabled paper-B modules."""
    mods = config.get("modules", {}) or {}
    kwargs = dict(config.model.get("kwargs", {}) or {})
    mask_cfg = mods.get("mask", {}) or {}
    source = mask_cfg.get("source", "none")
    attention = mask_cfg.get("attention", "none")
    is_vit = config.model.name.startswith("vit")
    if source != "none" and not is_vit:
        kwargs.setdefault("mask_stage", mask_cfg.get("stage", 1))
        kwargs.setdefault("mask_alpha_init", mask_cfg.get("alpha_init", 0.7))
    if attention != "none":
        if is_vit:
            raise ValueError("modules.mask.attention (SE/CBAM) applies to iResNet backbones only")
        kwargs.setdefault("attention", attention)
        kwargs.setdefault("attention_stage", mask_cfg.get("stage", 1))
    backbone = models.create(config.model.name, **kwargs)
    relight = segmenter = None
    rcfg = mods.get("relight", {}) or {}
    if rcfg.get("enabled", False):
        relight = models.create("relight", **dict(rcfg.get("kwargs", {}) or {}))
    if source == "segmenter":
        segmenter = models.create(mask_cfg.get("model", "unet"),
                                  **dict(mask_cfg.get("kwargs", {}) or {}))
    return FaceEmbedder(backbone, relight=relight, segmenter=segmenter, mask_source=source,
                        relight_train=rcfg.get("train", False), relight_eval=rcfg.get("eval", True))


def freeze_steps(config) -> dict:
    """{"relight": N, "segmenter": M}: pretrained parts stay fixed for their first N / M steps."""
    mods = config.get("modules", {}) or {}
    out = {}
    if (mods.get("relight", {}) or {}).get("enabled", False):
        out["relight"] = int(mods.relight.get("freeze_steps", 0))
    if (mods.get("mask", {}) or {}).get("source", "none") == "segmenter":
        out["segmenter"] = int(mods.mask.get("freeze_steps", 0))
    return out


def load_pretrained_modules(config, state):
    """Puts the weights of the configured pretrained runs into the relight/segmenter subtrees."""
    mods = config.get("modules", {}) or {}
    sources = {"relight": (mods.get("relight", {}) or {}).get("init_from", ""),
               "segmenter": (mods.get("mask", {}) or {}).get("init_from", "")}
    params, stats = dict(state.params), dict(state.batch_stats)
    for name, path in sources.items():
        if not path or name not in params:
            continue
        p, bs, step = ckpt_lib.load_weights(path)
        want = jax.tree.structure(params[name])
        if jax.tree.structure(p) != want:
            raise ValueError(f"modules: checkpoint {path!r} (step {step}) does not fit the "
                             f"configured {name} model (different architecture or kwargs)")
        put = lambda new, old: jax.device_put(jnp.asarray(new, old.dtype), old.sharding)
        params[name] = jax.tree.map(put, p, params[name])
        stats[name] = jax.tree.map(put, bs, stats[name]) if stats.get(name) else stats.get(name)
        logging.info("modules: %s initialised from %s (step %d)", name, path, step)
    return state.replace(params=params, batch_stats=stats)


def setup(config, mesh):
    """Model, optimizer, schedule, init function and the abstract state (shapes only)."""
    model = build_model(config)
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


def _check_num_classes(source, num_identities: int) -> None:
    """Labels ≥ data.num_identities would fall outside the class centres and be excluded from
    the loss; refuse that at start instead of training on part of the data unnoticed."""
    inner = getattr(source, "source", source)
    n = getattr(inner, "num_classes", None)
    if n is not None and int(n) > num_identities:
        from lowlight.config_lib import ConfigError

        raise ConfigError(f"config.data.num_identities={num_identities} but the dataset has "
                          f"{int(n)} identities; set --config.data.num_identities={int(n)}")


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains a face-embedding model as `config` says; returns the last logged metrics."""
    # ----------------------------------------------------------------- setup
    n_dev = config.get("num_devices", 0) or jax.device_count()
    mesh = parallel.make_mesh(config.get("model_parallel", 1), devices=jax.devices()[:n_dev])
    class_axes = tuple(config.partial_fc.class_axes)
    source = pipeline.make_source(config.data)
    _check_num_classes(source, config.data.num_identities)
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

    step_fn = jax.jit(
        functools.partial(steps.train_step, model=model, tx=tx, sched=sched,
                          loss_cfg=config.loss, pfc_cfg=config.partial_fc,
                          augment=config.get("augment"), mesh=mesh,
                          num_classes=config.data.num_identities,
                          freeze_steps=freeze_steps(config)),
        in_shardings=(shardings, parallel.batch_sharding(mesh)),
        out_shardings=(shardings, parallel.replicated(mesh)),
        donate_argnums=0)
    evaluators = eval_lib.build(config.get("evals"))
    embed = eval_lib.make_embed_fn(model, mesh, batch_size=config.get("eval_batch_size", 256))

    def run_evals(st) -> dict:
        out = {}
        for ev in evaluators.values():
            params = {k: v for k, v in st.params.items() if k != "centers"}
            out.update(ev.run(lambda im, p=params: embed(p, st.batch_stats, im)))
        return out

    return loop.run(config, workdir, mesh=mesh, init=init, abstract=abstract,
                    shardings=shardings, step_fn=step_fn, data_iter=data_iter,
                    evaluate=run_evals if evaluators else None, postfix=("loss", "acc"),
                    post_init=functools.partial(load_pretrained_modules, config))
