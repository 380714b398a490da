"""Losses: margin softmax heads (margins.py), Partial FC (partial_fc.py) and their glue.

`margin_fn(cfg, norms, stats)` binds a loss config (and the per-batch extras AdaFace and MagFace
need) into the `(cos, labels) -> (logits, aux)` callable that Partial FC applies after sampling.
"""

from __future__ import annotations

#: Loss names `config.loss.name` may take.
LOSSES: tuple[str, ...] = ("arcface", "cosface", "adaface", "magface")

#: AdaFace's initial (batch_mean, batch_std) of feature norms (official head.py).
ADAFACE_INIT_STATS = (20.0, 100.0)


def margin_fn(cfg, norms=None, stats=None):
    """Returns `fn(cos, labels) -> (logits, aux)` for the loss named `cfg.name`.

    aux: {} for ArcFace/CosFace; {"stats": new (mean, std)} for AdaFace; {"g": (B,)} for MagFace.
    """
    from lowlight.losses import margins

    name = cfg.name
    if name == "arcface":
        def fn(cos, labels):
            return margins.arcface(cos, labels, s=cfg.s, m=cfg.m,
                                   straight_through=cfg.get("straight_through", True),
                                   easy_margin=cfg.get("easy_margin", False),
                                   fallback=cfg.get("fallback", False)), {}
    elif name == "cosface":
        def fn(cos, labels):
            return margins.cosface(cos, labels, s=cfg.s, m=cfg.m), {}
    elif name == "adaface":
        def fn(cos, labels):
            logits, new_stats = margins.adaface(cos, norms, labels, stats, s=cfg.s, m=cfg.m,
                                                h=cfg.get("h", 0.333),
                                                t_alpha=cfg.get("t_alpha", 0.01))
            return logits, {"stats": new_stats}
    elif name == "magface":
        def fn(cos, labels):
            logits, g = margins.magface(cos, norms, labels, s=cfg.s, l_a=cfg.l_a, u_a=cfg.u_a,
                                        l_m=cfg.l_m, u_m=cfg.u_m,
                                        easy_margin=cfg.get("easy_margin", True))
            return logits, {"g": g}
    else:
        raise ValueError(f"unknown loss (config.loss.name) {name!r}; valid: {', '.join(LOSSES)}")
    return fn
