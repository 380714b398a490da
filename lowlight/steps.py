"""Pure step functions and the train state for recognition training (paper B §3.5–3.8).

Everything here is a module-level function of (state, batch) plus static arguments bound with
`functools.partial`; `train.py` jits them once with explicit shardings. RNG for a step is
`fold_in(state.rng, state.step)`, so a resumed run draws the same randomness it would have drawn
without the interruption.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from lowlight.data.normalize import MEAN, STD
from lowlight.losses import ADAFACE_INIT_STATS, margin_fn
from lowlight.losses import partial_fc as pfc


@flax.struct.dataclass
class TrainState:
    """The whole mutable training state (a pytree; what checkpoints hold).

    params: {"backbone": backbone params, "centers": (C, D) Partial FC class centres}.
    extras: task extras, e.g. {"adaface_stats": (mean, std)} (AdaFace's feature-norm EMA).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    extras: Any
    rng: jax.Array


def init_variables(rng, *, model, num_classes: int, embed_dim: int, image_size: int,
                   class_multiple: int = 1):
    """(params, batch_stats): the FaceEmbedder's parts + Partial FC centres (rows padded)."""
    k_model, k_centers = jax.random.split(rng)
    x = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
    params, batch_stats = model.init(k_model, x)
    params["centers"] = pfc.init_centers(k_centers, num_classes, embed_dim,
                                         multiple_of=class_multiple)
    return params, batch_stats


def init_state(rng, *, model, tx, num_classes: int, embed_dim: int, image_size: int,
               loss_name: str, class_multiple: int = 1) -> TrainState:
    """Initial state. Call under `jax.eval_shape` first (shapes), then jit with out_shardings."""
    k_vars, k_state = jax.random.split(rng)
    params, batch_stats = init_variables(k_vars, model=model, num_classes=num_classes,
                                         embed_dim=embed_dim, image_size=image_size,
                                         class_multiple=class_multiple)
    extras = {"nonfinite": jnp.zeros((), jnp.int32)}
    if loss_name == "adaface":
        extras["adaface_stats"] = tuple(jnp.asarray(v, jnp.float32) for v in ADAFACE_INIT_STATS)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params), extras=extras, rng=k_state)


def images_to_input(images_uint8, key=None, augment=None):
    """uint8 NHWC -> model input in [-1, 1], with on-device photometric augmentation if asked.

    Augmentation (paper B §3.2: brightness, contrast, gamma, colour temperature) runs here, inside
    the jitted step, so it costs device time, not Python time.
    """
    x = images_uint8.astype(jnp.float32) / 255.0
    if augment is not None and augment.get("enabled", False):
        from lowlight.data.illumination_jax import photometric_augment

        opts = {k: (tuple(v) if isinstance(v, list) else v)
                for k, v in augment.items() if k != "enabled"}
        x = photometric_augment(key, x, **opts)
    return (x - MEAN) / STD


def _frozen_parts(params, step, freeze_steps):
    """Subtree names whose updates are zeroed at `step` (pretrained parts, paper B §3.9)."""
    return {name: step < n for name, n in (freeze_steps or {}).items() if name in params}


def train_step(state: TrainState, batch, *, model, tx, sched, loss_cfg, pfc_cfg, augment,
               num_classes: int, freeze_steps=None, mesh=None):
    """One optimisation step of [relight → mask →] backbone + margin head with Partial FC.

    `model` is a `FaceEmbedder`; `freeze_steps` {"relight": N, "segmenter": M} keeps those
    pretrained parts fixed (zero update, optimizer state untouched) for their first N / M steps.
    Returns (new_state, metrics) where metrics are scalars (replicated jax arrays).
    """
    rng = jax.random.fold_in(state.rng, state.step)
    k_aug, k_drop, k_pfc = jax.random.split(rng, 3)
    x = images_to_input(batch["image"], k_aug, augment)
    labels = batch["label"].astype(jnp.int32)
    adaface_stats = state.extras.get("adaface_stats")

    def loss_fn(params):
        emb, aux, new_bs = model.apply(params, state.batch_stats, x, train=True,
                                       rngs={"dropout": k_drop})
        emb = emb.astype(jnp.float32)  # margin + softmax math in fp32 whatever the compute dtype
        norms = aux["norm"].astype(jnp.float32)
        mfn = margin_fn(loss_cfg, norms=norms, stats=adaface_stats)
        loss, pfc_aux = pfc.partial_fc_loss(
            emb, labels, params["centers"], key=k_pfc, sample_rate=pfc_cfg.sample_rate,
            margin_fn=mfn, mesh=mesh, class_axes=tuple(pfc_cfg.class_axes),
            num_classes=num_classes)
        margin_aux = pfc_aux.get("margin_aux", {}) or {}
        total = loss
        if loss_cfg.name == "magface":
            total = loss + loss_cfg.lambda_g * jnp.mean(margin_aux["g"])
        return total, (loss, new_bs, pfc_aux, norms)

    grads, (ce, new_bs, pfc_aux, norms) = jax.grad(loss_fn, has_aux=True)(state.params)
    frozen = _frozen_parts(state.params, state.step, freeze_steps)
    for name, is_frozen in frozen.items():
        grads[name] = jax.tree.map(lambda g, f=is_frozen: jnp.where(f, 0.0, g), grads[name])
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    for name, is_frozen in frozen.items():
        updates[name] = jax.tree.map(lambda u, f=is_frozen: jnp.where(f, 0.0, u), updates[name])
        # keep the optimizer's slots for a frozen part as they were (no decay/momentum drift)
        opt_state = _select_subtree(opt_state, state.opt_state, name, is_frozen)
    params = optax.apply_updates(state.params, updates)
    extras = dict(state.extras)
    margin_aux = pfc_aux.get("margin_aux", {}) or {}
    if "stats" in margin_aux:
        extras["adaface_stats"] = tuple(jnp.asarray(v, jnp.float32) for v in margin_aux["stats"])
    metrics = {
        "loss": ce,
        "acc": pfc_aux["accuracy"],
        "norm_mean": jnp.mean(norms),
        "grad_norm": optax.tree.norm(grads),
        "lr": sched(state.step),
        "dropped_positives": jnp.asarray(pfc_aux.get("dropped_positives", 0), jnp.float32),
    }
    if "g" in margin_aux:
        metrics["magface_g"] = jnp.mean(margin_aux["g"])
    if "adaface_stats" in extras:
        metrics["adaface_norm_mean"], metrics["adaface_norm_std"] = extras["adaface_stats"]
    backbone_params = params["backbone"]
    for path, leaf in jax.tree_util.tree_leaves_with_path(backbone_params):
        if getattr(path[-1], "key", None) == "alpha":  # mask-modulation α (paper B eq. 2)
            metrics["mask_alpha"] = jnp.mean(leaf)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_bs,
                              opt_state=opt_state, extras=extras)
    return guard_nonfinite(new_state, state, ce, grads, updates, metrics)


def guard_nonfinite(new_state: TrainState, state: TrainState, loss, grads, updates, metrics):
    """Skips an update whose loss, gradients or updates are not finite: the state stays as it
    was (but the step advances, so the data stream and RNG move on) and `extras["nonfinite"]`
    counts it. The loop stops once the count exceeds `config.max_nonfinite`."""
    finite = (jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
              & jnp.isfinite(optax.tree.norm(updates)))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    extras = keep(new_state.extras, state.extras)
    extras["nonfinite"] = state.extras["nonfinite"] + (1 - finite.astype(jnp.int32))
    guarded = new_state.replace(params=keep(new_state.params, state.params),
                                batch_stats=keep(new_state.batch_stats, state.batch_stats),
                                opt_state=keep(new_state.opt_state, state.opt_state),
                                extras=extras)
    metrics = dict(metrics, nonfinite=extras["nonfinite"].astype(jnp.float32))
    return guarded, metrics


def _select_subtree(new_opt_state, old_opt_state, name, keep_old):
    """In optimizer state pytrees, leaves under a dict key `name` come from the old state when
    `keep_old` is true (optax states mirror the params tree, so the key appears there too)."""

    def pick(path, new, old):
        if any(getattr(k, "key", None) == name for k in path):
            return jnp.where(keep_old, old, new)
        return new

    return jax.tree_util.tree_map_with_path(pick, new_opt_state, old_opt_state)


def embed_step(params, batch_stats, images_uint8, *, model, flip: bool = True):
    """Unit-norm embeddings (B, D) of uint8 faces through the whole FaceEmbedder (relight and
    mask included when configured); flip=True sums image + mirror embeddings (insightface)."""
    x = images_to_input(images_uint8)
    emb, _, _ = model.apply(params, batch_stats, x, train=False)
    if flip:
        emb_f, _, _ = model.apply(params, batch_stats, x[:, :, ::-1, :], train=False)
        emb = emb + emb_f
    emb = emb.astype(jnp.float32)
    return emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
