"""Optimizer factory: schedules, torch-SGD semantics, weight-decay masks, frozen parameters."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from lowlight import optim
from lowlight.config_lib import ConfigError


def _cfg(**kw):
    base = dict(name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine",
                warmup_steps=0, clip_norm=0.0, wd_exclude=(), freeze=())
    base.update(kw)
    return ml_collections.ConfigDict(base)


PARAMS = {"backbone": {"conv": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))},
                       "bn": {"scale": jnp.ones((2,))}},
          "centers": jnp.ones((4, 2))}


def test_cosine_schedule_with_warmup_values():
    sched = optim.make_schedule(_cfg(warmup_steps=10), total_steps=110)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(5)), 0.05, rtol=1e-6)
    np.testing.assert_allclose(float(sched(10)), 0.1, rtol=1e-6)
    # halfway through the cosine part: lr/2
    np.testing.assert_allclose(float(sched(60)), 0.05, rtol=1e-5)
    np.testing.assert_allclose(float(sched(110)), 0.0, atol=1e-7)


def test_sgd_matches_torch_semantics_two_steps():
    """torch.optim.SGD(momentum=0.9, weight_decay=wd): g += wd*p; buf = 0.9*buf + g; p -= lr*buf."""
    cfg = _cfg(schedule="constant")
    tx, _ = optim.make_tx(cfg, PARAMS, total_steps=10)
    params, state = PARAMS, tx.init(PARAMS)
    p_ref, buf = 1.0, 0.0
    for g in (0.5, -0.25):
        grads = jax.tree.map(lambda x, g=g: jnp.full_like(x, g), params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        buf = 0.9 * buf + (g + 5e-4 * p_ref)
        p_ref = p_ref - 0.1 * buf
    np.testing.assert_allclose(np.asarray(params["centers"]), p_ref, rtol=1e-6)


def test_weight_decay_mask_and_freeze():
    cfg = _cfg(schedule="constant", wd_exclude=(r"(bias|scale)$",), freeze=(r"^backbone/conv",))
    tx, _ = optim.make_tx(cfg, PARAMS, total_steps=10)
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    updates, _ = tx.update(zeros, tx.init(PARAMS), PARAMS)
    # zero gradient: only weight decay moves parameters
    assert float(jnp.abs(updates["centers"]).max()) > 0        # decayed
    assert float(jnp.abs(updates["backbone"]["bn"]["scale"]).max()) == 0  # excluded from decay
    assert float(jnp.abs(updates["backbone"]["conv"]["kernel"]).max()) == 0  # frozen
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    assert float(jnp.abs(updates["backbone"]["conv"]["bias"]).max()) == 0  # frozen
    assert float(jnp.abs(updates["backbone"]["bn"]["scale"]).max()) > 0


def test_clip_and_adamw():
    cfg = _cfg(name="adamw", lr=1e-3, weight_decay=0.1, clip_norm=1.0, schedule="constant")
    tx, _ = optim.make_tx(cfg, PARAMS, total_steps=10)
    grads = jax.tree.map(lambda x: 1e6 * jnp.ones_like(x), PARAMS)
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    # adam's first step is ~lr*sign(g) (+ decoupled decay lr*wd*p), whatever the clipping
    np.testing.assert_allclose(np.asarray(updates["centers"]), -1e-3 * (1 + 0.1), rtol=1e-3)


@pytest.mark.parametrize("kw,match", [(dict(name="lamb"), "optimizer"),
                                      (dict(schedule="step"), "schedule")])
def test_unknown_names(kw, match):
    with pytest.raises(ConfigError, match=match):
        optim.make_tx(_cfg(**kw), PARAMS, total_steps=10)
