"""Optimizer factory: optax transformations from `config.optim` and `config.schedule`.

Paper B names both SGD (§4.1.3: momentum 0.9, lr 0.1 with cosine decay, weight decay 5e-4,
batch 512 — the insightface arcface_torch recipe for iResNets) and AdamW with cosine decay (§3.9,
the arcface_torch recipe for ViTs). Both are here; each config picks one and says why.

Parameter selection is by regular expressions over '/'-joined parameter paths
(e.g. 'backbone/stage1_block0/conv1/kernel', 'centers'):
  * `optim.wd_exclude`: parameters that get no weight decay (e.g. r'(bias|scale)$' for norms);
  * `optim.freeze`: parameters that get no update at all (later issues freeze a backbone while a
    head trains, or the U-Net while the recogniser trains).
"""

from __future__ import annotations

import re

import jax
import optax

from lowlight.config_lib import ConfigError


def path_str(path) -> str:
    """'/'-joined string of a jax key path (DictKey / GetAttrKey / SequenceKey)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return "/".join(parts)


def path_mask(params, patterns) -> object:
    """Pytree of bools: True where the parameter path matches any regex in `patterns`."""
    regs = [re.compile(p) for p in patterns or ()]
    return jax.tree_util.tree_map_with_path(
        lambda p, _: any(r.search(path_str(p)) for r in regs), params
    )


def make_schedule(cfg, total_steps: int) -> optax.Schedule:
    """Learning-rate schedule: linear warmup then cosine / polynomial / constant."""
    lr = cfg.lr
    warmup = int(cfg.get("warmup_steps", 0))
    if warmup >= total_steps and total_steps > 0:
        warmup = max(0, total_steps // 10)
    decay_steps = max(1, total_steps - warmup)
    kind = cfg.get("schedule", "cosine")
    init = lr * cfg.get("warmup_init", 0.0)
    end = lr * cfg.get("end_factor", 0.0)
    if kind == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
    elif kind == "poly":  # arcface_torch's PolyScheduler (power 2)
        main = optax.polynomial_schedule(lr, end, power=2, transition_steps=decay_steps)
    elif kind == "constant":
        main = optax.constant_schedule(lr)
    else:
        raise ConfigError(f"unknown schedule {kind!r}; valid: cosine, poly, constant")
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(init, lr, warmup), main], [warmup])


def make_tx(cfg, params, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Builds the optax transformation for `params` from the optimizer config `cfg`."""
    sched = make_schedule(cfg, total_steps)
    wd_mask = jax.tree.map(lambda x: not x, path_mask(params, cfg.get("wd_exclude", ())))
    name = cfg.name
    parts = []
    if cfg.get("clip_norm", 0.0):
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    if name == "sgd":
        # torch.optim.SGD semantics: decay added to the gradient before momentum.
        if cfg.weight_decay:
            parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=wd_mask))
        parts.append(optax.sgd(sched, momentum=cfg.get("momentum", 0.9),
                               nesterov=cfg.get("nesterov", False)))
    elif name == "adamw":
        parts.append(optax.adamw(sched, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999),
                                 eps=cfg.get("eps", 1e-8), weight_decay=cfg.weight_decay,
                                 mask=wd_mask))
    elif name == "adam":
        parts.append(optax.adam(sched, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999),
                                eps=cfg.get("eps", 1e-8)))
    else:
        raise ConfigError(f"unknown optimizer (config.optim.name) {name!r}; "
                          "valid: sgd, adamw, adam")
    tx = optax.chain(*parts)
    freeze = path_mask(params, cfg.get("freeze", ()))
    if any(jax.tree.leaves(freeze)):
        labels = jax.tree.map(lambda f: "frozen" if f else "train", freeze)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, sched
