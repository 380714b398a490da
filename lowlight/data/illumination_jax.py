"""JAX twins of the illumination ops, for on-device augmentation inside a jitted train step.

* Paper B §3.2 photometric training augmentation (brightness, contrast, gamma, colour
  temperature): `photometric_augment`, `photometric_augment_from_config`.
* Paper B §4.2 protocol ops and the protocol itself: `gamma`, `contrast`, `directional_light`,
  `mixed`, `apply_protocol` (i.i.d. draws from the mix, returning condition ids).
* Paper A's simulate module: `reduce_brightness`, `sepia`, `add_noise`, `apply_simulate`,
  `simulate_low_light`.

Every function takes a float batch (N, H, W, 3) in [0, 1] and returns float32 in [0, 1] (clipped
after each step). Parameters are per example: a scalar (broadcast) or an (N,) array. Random
functions draw per-example parameters from a PRNG key, so the same key gives the same output.
All are jittable; per-image work is `jax.vmap`-ed, and dm-pix provides gamma, contrast and
brightness. Conventions, default ranges and the maths shared with the numpy versions (radial
light mask, Kelvin gains, sepia matrix) live in `lowlight.data.illumination`; each op here agrees
with its numpy twin given the same parameters (tests/test_illumination.py checks it).

Value checks on images and parameters run only when they are concrete (eager calls); under `jit`
only shapes and dtypes are checked.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np

from lowlight.data import conditions as cond
from lowlight.data import illumination as il

#: Defaults of `photometric_augment` (paper B §3.2 names the components, §4.2 gives the gamma and
#: contrast ranges). brightness: additive delta in [0, 1] units; color_temperature: Kelvin;
#: p: per-example probability of applying each enabled component. brightness, colour
#: temperature and p are our choice (paper B gives no numbers): +-0.2 is a strong but not
#: saturating exposure shift, 4000-9000 K spans warm indoor to overcast daylight, and p = 0.5
#: gives each image two of the four changes on average and leaves 1/16 untouched.
PHOTOMETRIC_DEFAULTS: dict[str, Any] = {
    "brightness": (-0.2, 0.2),
    "contrast": il.PAPER_B_CONTRAST,
    "gamma": il.PAPER_B_GAMMA,
    "color_temperature": (4000.0, 9000.0),
    "p": 0.5,
}

_SIDE_IDS = np.array([cond.index(c) for c in cond.SIDE_CONDITIONS], np.int32)

# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _concrete(x: Any) -> np.ndarray | None:
    """numpy value of x, or None when x is traced (inside jit / vmap)."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def _check_images(images: Any, name: str = "images") -> jax.Array:
    shape = getattr(images, "shape", None)
    if shape is None or len(shape) != 4 or shape[-1] != 3 or 0 in shape:
        raise ValueError(f"{name}: expected a float batch of shape (N, H, W, 3) in [0, 1], got "
                         f"shape {shape} (add a batch axis with x[None] for one image)")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"{name}: expected a float batch in [0, 1], got dtype {images.dtype} "
                        f"(divide uint8 images by 255)")
    images = jnp.asarray(images, jnp.float32)
    if not isinstance(images, jax.core.Tracer):
        lo, hi = float(jnp.min(images)), float(jnp.max(images))
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1e-5 or hi > 1 + 1e-5:
            raise ValueError(f"{name}: values must lie in [0, 1], got [{lo}, {hi}]")
    return images


def _per_example(value: Any, n: int, name: str, lo: float = -math.inf, hi: float = math.inf,
                 *, lo_open: bool = False, dtype=jnp.float32) -> jax.Array:
    v = jnp.asarray(value, dtype)
    if v.ndim == 0:
        v = jnp.broadcast_to(v, (n,))
    elif v.shape != (n,):
        raise ValueError(f"{name}: expected a scalar or shape ({n},) (one per example), "
                         f"got shape {v.shape}")
    c = _concrete(v)
    if c is not None and (not np.all(np.isfinite(c)) or np.any(c < lo) or np.any(c > hi)
                          or (lo_open and np.any(c == lo))):
        bracket = "(" if lo_open else "["
        raise ValueError(f"{name}: expected values in {bracket}{lo}, {hi}], got {c}")
    return v


def _directions(direction: Any, n: int) -> jax.Array:
    if isinstance(direction, str):
        direction = il.direction_index(direction)
    return _per_example(direction, n, "direction", 0, len(il.SIDE_DIRECTIONS) - 1,
                        dtype=jnp.int32)


def _clip(x: jax.Array) -> jax.Array:
    return jnp.clip(x, 0.0, 1.0)


def _bcast(v: jax.Array) -> jax.Array:
    return v[:, None, None, None]


# ---------------------------------------------------------------------------------------------
# Deterministic ops (per-example parameters)
# ---------------------------------------------------------------------------------------------


def _directional_one(image: jax.Array, direction: jax.Array, strength: jax.Array) -> jax.Array:
    centre = jnp.asarray(il.LIGHT_CENTRES)[direction]
    m = il.radial_light_mask(image.shape[0], image.shape[1], centre, xp=jnp)
    return _clip(image * (1.0 - strength + 2.0 * strength * m)[..., None])


def gamma(images: jax.Array, g: Any) -> jax.Array:
    """out = in ** g per example (dm-pix adjust_gamma); g > 1 darkens. g: scalar or (N,), > 0."""
    images = _check_images(images)
    g = _per_example(g, images.shape[0], "g", 0.0, lo_open=True)
    return _clip(jax.vmap(pix.adjust_gamma)(images, g))


def contrast(images: jax.Array, factor: Any) -> jax.Array:
    """mean + factor * (in - mean) per example, per-channel spatial mean (dm-pix), clipped."""
    images = _check_images(images)
    f = _per_example(factor, images.shape[0], "factor", 0.0)
    return _clip(jax.vmap(pix.adjust_contrast)(images, f))


def brightness(images: jax.Array, delta: Any) -> jax.Array:
    """in + delta per example (dm-pix adjust_brightness), clipped. delta in [-1, 1]."""
    images = _check_images(images)
    d = _per_example(delta, images.shape[0], "delta", -1.0, 1.0)
    return _clip(jax.vmap(pix.adjust_brightness)(images, d))


def color_temperature(images: jax.Array, kelvin: Any) -> jax.Array:
    """Per-channel gains of a `kelvin` illuminant (il.kelvin_to_rgb_gains), per example."""
    images = _check_images(images)
    k = _per_example(kelvin, images.shape[0], "kelvin", 1000.0, 40000.0)
    return _clip(images * il.kelvin_to_rgb_gains(k, xp=jnp)[:, None, None, :])


def directional_light(images: jax.Array, direction: Any, strength: Any) -> jax.Array:
    """Radial side light FROM `direction` (see il.directional_light), per example.

    Args:
      images: float (N, H, W, 3) in [0, 1].
      direction: 'left' | 'right' | 'top' | 'bottom', or int index / (N,) indices into
        il.SIDE_DIRECTIONS (pass indices under jit).
      strength: scalar or (N,) in [0, 1]; 0 is the identity.
    """
    images = _check_images(images)
    n = images.shape[0]
    s = _per_example(strength, n, "strength", 0.0, 1.0)
    return jax.vmap(_directional_one)(images, _directions(direction, n), s)


def mixed(images: jax.Array, *, gamma: Any = 1.0, contrast: Any = 1.0, direction: Any = None,
          strength: Any = 0.0) -> jax.Array:
    """Gamma, then contrast, then directional light (il.mixed), all per example.

    `direction=None` skips the overlay; otherwise strength 0 is its identity.
    """
    images = _check_images(images)
    n = images.shape[0]
    g = _per_example(gamma, n, "gamma", 0.0, lo_open=True)
    f = _per_example(contrast, n, "contrast", 0.0)
    x = _clip(jax.vmap(pix.adjust_gamma)(images, g))
    x = _clip(jax.vmap(pix.adjust_contrast)(x, f))
    if direction is None:
        return x
    s = _per_example(strength, n, "strength", 0.0, 1.0)
    return jax.vmap(_directional_one)(x, _directions(direction, n), s)


def reduce_brightness(images: jax.Array, factor: Any) -> jax.Array:
    """out = in * factor per example (paper A's dimming); factor in [0, 1]."""
    images = _check_images(images)
    f = _per_example(factor, images.shape[0], "factor", 0.0, 1.0)
    return _clip(images * _bcast(f))


def sepia(images: jax.Array, strength: Any = 1.0) -> jax.Array:
    """Blend towards il.SEPIA_MATRIX @ rgb with per-example weight in [0, 1] (paper A)."""
    images = _check_images(images)
    s = _bcast(_per_example(strength, images.shape[0], "strength", 0.0, 1.0))
    toned = _clip(images @ jnp.asarray(il.SEPIA_MATRIX).T)
    return _clip((1.0 - s) * images + s * toned)


def add_noise(key: jax.Array, images: jax.Array, sigma: Any) -> jax.Array:
    """in + sigma * N(0, 1) per pixel and channel (noise = jax.random.normal(key, shape))."""
    images = _check_images(images)
    s = _per_example(sigma, images.shape[0], "sigma", 0.0)
    return _clip(images + _bcast(s) * jax.random.normal(key, images.shape, jnp.float32))


def apply_simulate(images: jax.Array, *, brightness: Any, sepia_strength: Any, noise_sigma: Any,
                   noise: jax.Array) -> jax.Array:
    """Paper A's simulate module with given per-example parameters and standard-normal `noise`.

    Same order as il.apply_simulate: sepia, then dimming, then additive noise.
    """
    images = _check_images(images)
    n = images.shape[0]
    if noise.shape != images.shape:
        raise ValueError(f"noise: expected shape {images.shape}, got {noise.shape}")
    x = sepia(images, sepia_strength)
    x = reduce_brightness(x, brightness)
    return _clip(x + _bcast(_per_example(noise_sigma, n, "noise_sigma", 0.0)) * noise)


def _bounds(bounds: Any, name: str, lo: float = -math.inf, hi: float = math.inf,
            *, lo_open: bool = False) -> tuple[Any, Any]:
    """(low, high) of a range or fixed number; checked against [lo, hi] when concrete."""
    pair = tuple(bounds) if isinstance(bounds, (tuple, list)) else (bounds, bounds)
    if len(pair) != 2:
        raise ValueError(f"{name}: expected a number or a (low, high) pair, got {bounds!r}")
    if all(_concrete(b) is not None for b in pair):
        return il._check_range([float(_concrete(b)) for b in pair], name, lo, hi,
                               lo_open=lo_open)
    return pair


def _uniform(key: jax.Array, n: int, bounds: Any, name: str, lo: float = -math.inf,
             hi: float = math.inf, *, lo_open: bool = False, log: bool = False) -> jax.Array:
    a, b = _bounds(bounds, name, lo, hi, lo_open=lo_open)
    if log:
        return jnp.exp(jax.random.uniform(key, (n,), jnp.float32, jnp.log(a), jnp.log(b)))
    return jax.random.uniform(key, (n,), jnp.float32, a, b)


def simulate_low_light(key: jax.Array, images: jax.Array, *, brightness: Any = None,
                       sepia_strength: Any = None, noise_sigma: Any = None,
                       return_params: bool = False):
    """Paper A's simulate module with per-example parameters drawn from `key`.

    Args:
      key: PRNG key.
      images: float (N, H, W, 3) in [0, 1].
      brightness, sepia_strength, noise_sigma: (low, high) ranges (or fixed numbers) drawn
        uniformly per example; None -> il.SIMULATE_RANGES (our choice, documented there).
      return_params: also return {'brightness', 'sepia_strength', 'noise_sigma': (N,),
        'noise': (N, H, W, 3)} so `apply_simulate` (or its numpy twin) can reproduce the output.
    """
    images = _check_images(images)
    n = images.shape[0]
    given = {"brightness": brightness, "sepia_strength": sepia_strength,
             "noise_sigma": noise_sigma}
    keys = jax.random.split(key, 4)
    params = {
        name: _uniform(k, n, il.SIMULATE_RANGES[name] if v is None else v, name, 0.0, 1.0)
        for k, (name, v) in zip(keys[:3], given.items(), strict=True)
    }
    params["noise"] = jax.random.normal(keys[3], images.shape, jnp.float32)
    out = apply_simulate(images, **params)
    return (out, params) if return_params else out


# ---------------------------------------------------------------------------------------------
# Paper B protocol (i.i.d. per example) and photometric augmentation
# ---------------------------------------------------------------------------------------------


def apply_protocol(key: jax.Array, images: jax.Array, mix: Sequence[float] = il.PAPER_B_MIX,
                   spec: il.ProtocolSpec = il.DEFAULT_PROTOCOL, *, return_params: bool = False):
    """Paper B §4.2 conditions drawn i.i.d. per example, as il.apply_protocol does per image.

    Same distributions as the numpy version (bucket from `mix`, uniform direction, parameters
    from `spec`), not the same draws.

    Returns:
      (images, condition_ids) with ids indexing conditions.CONDITIONS (int32, (N,)), plus the
      `mixed` keyword arguments (per-example arrays) when `return_params`.
    """
    images = _check_images(images)
    if not isinstance(spec, il.ProtocolSpec):
        raise TypeError(f"spec: expected an illumination.ProtocolSpec, got {type(spec).__name__}")
    n = images.shape[0]
    k = jax.random.split(key, 11)
    bucket = jax.random.choice(k[0], 3, (n,), p=jnp.asarray(il._check_mix(mix), jnp.float32))
    low, side = bucket == 0, bucket == 1
    direction = jax.random.randint(k[1], (n,), 0, len(il.SIDE_DIRECTIONS), jnp.int32)
    use_contrast = jax.random.uniform(k[2], (n,)) < spec.p_contrast
    use_mixed = jax.random.uniform(k[3], (n,)) < spec.p_mixed
    draw = lambda kk, r: jax.random.uniform(kk, (n,), jnp.float32, r[0], r[1])
    g = jnp.where(side, jnp.where(use_mixed, draw(k[4], spec.side_gamma), 1.0),
                  jnp.where(low, draw(k[5], spec.low_gamma), draw(k[6], spec.over_gamma)))
    global_c = jnp.where(low, draw(k[7], spec.low_contrast), draw(k[8], spec.over_contrast))
    c = jnp.where(side, jnp.where(use_mixed, draw(k[9], spec.side_contrast), 1.0),
                  jnp.where(use_contrast, global_c, 1.0))
    s = jnp.where(side, draw(k[10], spec.side_strength), 0.0)
    ids = jnp.where(side, jnp.asarray(_SIDE_IDS)[direction],
                    jnp.where(low, cond.index(cond.LOW), cond.index(cond.OVER))).astype(jnp.int32)
    params = {"gamma": g, "contrast": c, "direction": direction, "strength": s}
    out = mixed(images, **params)
    return (out, ids, params) if return_params else (out, ids)


# op, lower and upper bound of the parameter, lower bound open (the op names are shadowed by
# photometric_augment's keyword arguments).
_PHOTOMETRIC_OPS = {
    "color_temperature": (color_temperature, 1000.0, 40000.0, False),
    "brightness": (brightness, -1.0, 1.0, False),
    "contrast": (contrast, 0.0, math.inf, True),
    "gamma": (gamma, 0.0, math.inf, True),
}


def photometric_augment(key: jax.Array, images: jax.Array, *,
                        brightness: Any = PHOTOMETRIC_DEFAULTS["brightness"],
                        contrast: Any = PHOTOMETRIC_DEFAULTS["contrast"],
                        gamma: Any = PHOTOMETRIC_DEFAULTS["gamma"],
                        color_temperature: Any = PHOTOMETRIC_DEFAULTS["color_temperature"],
                        p: float = PHOTOMETRIC_DEFAULTS["p"], return_params: bool = False):
    """Paper B §3.2 photometric augmentation with per-example random parameters.

    Fixed order: colour temperature (the illuminant), brightness, contrast, gamma; clipped to
    [0, 1] after each. Each enabled component is applied to each example independently with
    probability `p`; examples it skips are passed through exactly. Sampling: brightness delta,
    gamma and Kelvin uniform in their ranges; the contrast factor log-uniform (so paper B's
    [0.5, 2.0] is symmetric: as likely to halve as to double contrast).

    Args:
      key: PRNG key; the same key gives the same output.
      images: float (N, H, W, 3) in [0, 1].
      brightness: (low, high) additive delta in [-1, 1], or None to disable.
      contrast: (low, high) factor, low > 0, or None to disable.
      gamma: (low, high) exponent (> 0; out = in ** g), or None to disable.
      color_temperature: (low, high) Kelvin in [1000, 40000], or None to disable.
      p: per-example, per-component application probability in [0, 1].
      return_params: also return the per-example parameters {'color_temperature', 'brightness',
        'contrast', 'gamma'} ((N,) each; identity value 6500 / 0 / 1 / 1 where not applied).

    Returns:
      Augmented float32 images, same shape (and the parameters when asked).
    """
    images = _check_images(images)
    n = images.shape[0]
    p_ = _concrete(p)
    if p_ is not None:
        il._check_scalar(p_, "p", 0.0, 1.0)
    identity = {"color_temperature": il.REFERENCE_KELVIN, "brightness": 0.0, "contrast": 1.0,
                "gamma": 1.0}
    params = {name: jnp.full((n,), v, jnp.float32) for name, v in identity.items()}
    x = images
    ranges = {"color_temperature": color_temperature, "brightness": brightness,
              "contrast": contrast, "gamma": gamma}
    keys = jax.random.split(key, 2 * len(ranges))
    for i, (name, bounds) in enumerate(ranges.items()):  # fixed order, see docstring
        if bounds is None:
            continue
        op, lo, hi, lo_open = _PHOTOMETRIC_OPS[name]
        v = _uniform(keys[2 * i], n, bounds, name, lo, hi, lo_open=lo_open,
                     log=name == "contrast")
        applied = jax.random.uniform(keys[2 * i + 1], (n,)) < p
        x = jnp.where(_bcast(applied), op(x, v), x)
        params[name] = jnp.where(applied, v, params[name])
    return (x, params) if return_params else x


def photometric_augment_from_config(key: jax.Array, images: jax.Array,
                                    cfg: Mapping[str, Any] | Any) -> jax.Array:
    """`photometric_augment` configured by a dict / ConfigDict with PHOTOMETRIC_DEFAULTS keys.

    Missing keys take the defaults; a component set to None is disabled; lists become tuples;
    unknown keys raise (so config typos fail loudly).
    """
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    unknown = set(cfg) - set(PHOTOMETRIC_DEFAULTS)
    if unknown:
        raise KeyError(f"cfg: unknown photometric key(s) {sorted(unknown)}; "
                       f"valid: {sorted(PHOTOMETRIC_DEFAULTS)}")
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    return photometric_augment(key, images, **{**PHOTOMETRIC_DEFAULTS, **kw})
