"""Illumination ops (numpy) for building datasets, the two papers' simulators, and enhancers.

What lives here (the on-device JAX twins of the ops are in `illumination_jax.py`):

* Paper A's *simulate module* (Proposed method / dataset section: "the processing module employs
  noise and sepia filters and randomized brightness reduction"): `add_noise`, `sepia`,
  `reduce_brightness`, `apply_simulate` and `simulate_low_light`, and the two datasets built
  with it, `DistortionFace` (every image simulated) and `NaturalFace` (half simulated).
* Paper B's *custom illumination dataset* protocol (§4.2: gamma in [0.3, 1.8], contrast factor in
  [0.5, 2.0], directional-lighting masks from a radial gradient overlay, mixed lighting; ~30%
  low-light, ~40% side-light, ~30% over-exposed/front-light): `gamma`, `contrast`,
  `directional_light`, `mixed`, `apply_protocol` and the `IlluminationProtocol` dataset wrapper.
  §3.2's photometric training augmentation is `illumination_jax.photometric_augment`; its
  brightness and colour-temperature ops have numpy twins here (`brightness`, `color_temperature`).
* Classic enhancement baselines (paper A cites CLAHE [23] and multi-scale retinex [24]):
  `clahe`, `gamma_correct`, `multi_scale_retinex`, registered by name in `ENHANCERS`.

Conventions shared by every op:

* Images are RGB, (H, W, 3) or a batch (N, H, W, 3). uint8 in -> uint8 out (rounded); float in
  [0, 1] in -> float32 in [0, 1] out. Ops compute on [0, 1] floats and clip after each step.
  The enhancers are uint8 only.
* Parameters of numpy ops are scalars applied to every image of a batch; the JAX twins take
  per-example parameters.
* Gamma: out = in ** g on [0, 1] values, so g > 1 darkens and g < 1 brightens.
* Condition tags are the names of `lowlight.data.conditions`.
* Dataset wrappers are deterministic: item i is computed from `np.random.default_rng([seed, salt,
  i])` (never Python `hash()`), and whole-dataset assignments (which half of NaturalFace is
  simulated, which condition each IlluminationProtocol item gets) come from a seeded permutation,
  so proportions are exact and every process (grain workers included) sees the same items.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np

from lowlight.data import conditions as cond

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

#: Side-light directions: the side the light comes FROM (that side of the image is bright).
SIDE_DIRECTIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
DIRECTION_CONDITION: dict[str, str] = dict(zip(SIDE_DIRECTIONS, cond.SIDE_CONDITIONS, strict=True))
#: Light-source position of each direction in normalised image coordinates (u across, v down):
#: the middle of the lit edge.
LIGHT_CENTRES = np.array([[0.0, 0.5], [1.0, 0.5], [0.5, 0.0], [0.5, 1.0]], np.float32)
#: Distance (in normalised coordinates) at which the radial light falls to zero: the opposite
#: edge. Our choice; paper B gives no number.
LIGHT_RADIUS = 1.0

#: The standard (Microsoft / W3C filter) sepia matrix; rows give output R, G, B.
SEPIA_MATRIX = np.array(
    [[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], np.float32
)
#: Rec.601 luma weights (the dm-pix / TensorFlow grayscale default).
LUMA_601 = np.array([0.299, 0.587, 0.114], np.float32)
#: Colour temperature whose gains are (1, 1, 1): daylight white point.
REFERENCE_KELVIN = 6500.0

#: Paper A simulate-module parameter ranges, drawn uniformly per image. Paper A gives no numbers:
#: these are our choice. brightness = multiplicative factor (0.2-0.6 turns a typical face of mean
#: ~0.45 into ~0.1-0.27, visibly dark but recoverable); sepia = blend weight towards the sepia
#: matrix (a colour cast, not full sepia); noise_sigma = std of additive Gaussian noise on [0, 1]
#: values (2.5-13 grey levels, i.e. an SNR of a few at the darkened signal level).
SIMULATE_RANGES: dict[str, tuple[float, float]] = {
    "brightness": (0.2, 0.6),
    "sepia_strength": (0.2, 0.6),
    "noise_sigma": (0.01, 0.05),
}

#: Paper B §4.2 mix of the three condition buckets: low-light, side-light, over/front-light.
PAPER_B_MIX: tuple[float, float, float] = (0.3, 0.4, 0.3)
#: Paper B §4.2 parameter ranges.
PAPER_B_GAMMA = (0.3, 1.8)
PAPER_B_CONTRAST = (0.5, 2.0)


@dataclasses.dataclass(frozen=True)
class ProtocolSpec:
    """Per-condition parameter ranges of paper B's illumination protocol (§4.2).

    All gamma and contrast ranges lie inside the paper's [0.3, 1.8] and [0.5, 2.0]; the split of
    those ranges between conditions, the side-light strength and the probabilities are our choice.

    * low: gamma from `low_gamma` (> 1, darkening); with probability `p_contrast` also a contrast
      factor from `low_contrast` (< 1, flat).
    * over (over-exposed / front-light): gamma from `over_gamma` (< 1, brightening); with
      probability `p_contrast` also a contrast factor from `over_contrast` (> 1, harsh).
    * side_*: a radial directional-light overlay with strength from `side_strength`; with
      probability `p_mixed` ("mixed lighting") also a milder global gamma from `side_gamma` and
      contrast from `side_contrast`. The mild ranges stay inside the weakest pure low/over change,
      so the side light remains the dominant effect (see `dominant_condition`).
    """

    low_gamma: tuple[float, float] = (1.2, 1.8)
    low_contrast: tuple[float, float] = (0.5, 0.9)
    over_gamma: tuple[float, float] = (0.3, 0.85)
    over_contrast: tuple[float, float] = (1.1, 2.0)
    side_strength: tuple[float, float] = (0.4, 0.8)
    side_gamma: tuple[float, float] = (0.85, 1.2)
    side_contrast: tuple[float, float] = (0.8, 1.25)
    p_contrast: float = 0.5
    p_mixed: float = 0.5

    def __post_init__(self):
        for name in ("low_gamma", "over_gamma", "side_gamma"):
            _check_range(getattr(self, name), name, 0.0, lo_open=True)
        for name in ("low_contrast", "over_contrast", "side_contrast"):
            _check_range(getattr(self, name), name, 0.0)
        _check_range(self.side_strength, "side_strength", 0.0, 1.0)
        _check_scalar(self.p_contrast, "p_contrast", 0.0, 1.0)
        _check_scalar(self.p_mixed, "p_mixed", 0.0, 1.0)
        # Keep every drawn parameter set tagged by its own condition (dominant_condition).
        if self.low_gamma[0] <= 1.0 or self.over_gamma[1] >= 1.0:
            raise ValueError("low_gamma must lie above 1 and over_gamma below 1, got "
                             f"{self.low_gamma} and {self.over_gamma}")
        if self.side_strength[0] <= 0.0:
            raise ValueError(f"side_strength: expected low > 0, got {self.side_strength}")


# ---------------------------------------------------------------------------------------------
# Validation and dtype handling
# ---------------------------------------------------------------------------------------------

_SHAPE_MSG = "an RGB array of shape (H, W, 3) or (N, H, W, 3)"


def _check_image(image: Any, name: str = "image", *, uint8_only: bool = False) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array ({_SHAPE_MSG}), "
                        f"got {type(image).__name__}")
    if image.ndim not in (3, 4) or image.shape[-1] != 3 or 0 in image.shape:
        raise ValueError(f"{name}: expected {_SHAPE_MSG}, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image
    if uint8_only:
        raise TypeError(f"{name}: expected dtype uint8, got {image.dtype}")
    if not np.issubdtype(image.dtype, np.floating):
        raise TypeError(f"{name}: expected dtype uint8 or float in [0, 1], got {image.dtype}")
    lo, hi = float(np.min(image)), float(np.max(image))
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1e-5 or hi > 1 + 1e-5:
        raise ValueError(f"{name}: float images must lie in [0, 1], got values in [{lo}, {hi}]")
    return image


def _to_float(image: Any, name: str = "image") -> tuple[np.ndarray, bool]:
    """Validated image -> (float32 in [0, 1], whether the input was uint8)."""
    image = _check_image(image, name)
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0, True
    return np.clip(image.astype(np.float32), 0.0, 1.0), False


def _restore(x: np.ndarray, was_uint8: bool) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    if was_uint8:
        return np.rint(x * 255.0).astype(np.uint8)
    return x.astype(np.float32)


def _check_scalar(value: Any, name: str, lo: float = -math.inf, hi: float = math.inf,
                  *, lo_open: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a real number, got {value!r}") from None
    if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
        bracket = "(" if lo_open else "["
        raise ValueError(f"{name}: expected a number in {bracket}{lo}, {hi}], got {value!r}")
    return v


def _check_range(value: Any, name: str, lo: float = -math.inf, hi: float = math.inf,
                 *, lo_open: bool = False) -> tuple[float, float]:
    """A fixed number or a (low, high) pair -> (low, high) inside [lo, hi]."""
    if isinstance(value, (tuple, list, np.ndarray)):
        if len(value) != 2:
            raise ValueError(f"{name}: expected a number or a (low, high) pair, got {value!r}")
        a = _check_scalar(value[0], f"{name}[0]", lo, hi, lo_open=lo_open)
        b = _check_scalar(value[1], f"{name}[1]", lo, hi, lo_open=lo_open)
        if a > b:
            raise ValueError(f"{name}: expected low <= high, got {value!r}")
        return a, b
    v = _check_scalar(value, name, lo, hi, lo_open=lo_open)
    return v, v


def _check_rng(rng: Any, name: str = "rng") -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"{name}: expected a numpy Generator (np.random.default_rng(...)), "
                        f"got {type(rng).__name__}")
    return rng


def direction_index(direction: str | int) -> int:
    """Index of a side-light direction in SIDE_DIRECTIONS ('left', 'right', 'top', 'bottom')."""
    if isinstance(direction, str):
        if direction not in SIDE_DIRECTIONS:
            raise ValueError(f"direction: expected one of {SIDE_DIRECTIONS}, got {direction!r}")
        return SIDE_DIRECTIONS.index(direction)
    d = operator.index(direction)
    if not 0 <= d < len(SIDE_DIRECTIONS):
        raise ValueError(f"direction: expected an index in [0, {len(SIDE_DIRECTIONS)}), got {d}")
    return d


DEFAULT_PROTOCOL = ProtocolSpec()


# ---------------------------------------------------------------------------------------------
# Shared maths (xp = numpy or jax.numpy; used by illumination_jax too)
# ---------------------------------------------------------------------------------------------


def radial_light_mask(height: int, width: int, centre, xp=np):
    """Radial light falloff (H, W) in [0, 1]: 1 at `centre`, 0 at distance LIGHT_RADIUS.

    `centre` is (u, v) in normalised coordinates (pixel centres at (x + 0.5) / W, (y + 0.5) / H),
    so the mask does not depend on resolution. The falloff is linear in distance.
    """
    v = (xp.arange(height, dtype=xp.float32) + 0.5) / height
    u = (xp.arange(width, dtype=xp.float32) + 0.5) / width
    d = xp.sqrt((u[None, :] - centre[0]) ** 2 + (v[:, None] - centre[1]) ** 2)
    return xp.clip(1.0 - d / LIGHT_RADIUS, 0.0, 1.0)


def kelvin_to_rgb_gains(kelvin, xp=np):
    """Per-channel gains (..., 3) simulating an illuminant of `kelvin` degrees.

    Model: Tanner Helland's fit of the sRGB colour of a black body at temperature T (valid for
    1000-40000 K), divided by the colour at REFERENCE_KELVIN (6500 K -> gains (1, 1, 1)), then
    divided by the Rec.601 luma of the gains so that a grey pixel keeps its brightness and only
    its colour changes. Warm (low K) -> red gain > 1, blue gain < 1; cool (high K) -> the reverse.
    """

    def helland(k):
        t = xp.clip(xp.asarray(k, dtype=xp.float32), 1000.0, 40000.0) / 100.0
        hot = xp.maximum(t - 60.0, 1e-3)
        r = xp.where(t <= 66.0, 255.0, 329.698727446 * hot ** -0.1332047592)
        g = xp.where(t <= 66.0, 99.4708025861 * xp.log(t) - 161.1195681661,
                     288.1221695283 * hot ** -0.0755148492)
        b_cool = 138.5177312231 * xp.log(xp.maximum(t - 10.0, 1e-3)) - 305.0447927307
        b = xp.where(t >= 66.0, 255.0, xp.where(t <= 19.0, 0.0, b_cool))
        return xp.clip(xp.stack([r, g, b], axis=-1), 1.0, 255.0)

    gains = helland(kelvin) / helland(REFERENCE_KELVIN)
    luma = xp.sum(gains * xp.asarray(LUMA_601), axis=-1, keepdims=True)
    return gains / luma


def dominant_condition(gamma: float = 1.0, contrast: float = 1.0,
                       direction: str | int | None = None, strength: float = 0.0) -> str:
    """Condition tag of a (possibly mixed) lighting change, by its dominant effect.

    Rule: a directional light (direction given, strength > 0) dominates, because uneven light is
    what defines side-light; otherwise the global change decides: gamma > 1 -> 'low',
    gamma < 1 -> 'over'; with gamma == 1, contrast < 1 -> 'low', contrast > 1 -> 'over';
    no change -> 'normal'.
    """
    if direction is not None and strength > 0:
        return DIRECTION_CONDITION[SIDE_DIRECTIONS[direction_index(direction)]]
    if gamma != 1.0:
        return cond.LOW if gamma > 1.0 else cond.OVER
    if contrast != 1.0:
        return cond.LOW if contrast < 1.0 else cond.OVER
    return cond.NORMAL


# ---------------------------------------------------------------------------------------------
# Photometric ops (paper B §3.2 and §4.2)
# ---------------------------------------------------------------------------------------------


def gamma(image: np.ndarray, g: float) -> np.ndarray:
    """Gamma change out = in ** g on [0, 1] values (g > 1 darkens, g < 1 brightens).

    Args:
      image: uint8 or float-in-[0, 1] RGB, (H, W, 3) or (N, H, W, 3).
      g: exponent, > 0. Paper B §4.2 draws it from [0.3, 1.8].

    Returns:
      The adjusted image, same shape; uint8 if the input was uint8, else float32.
    """
    x, u8 = _to_float(image)
    return _restore(np.power(x, _check_scalar(g, "g", 0.0, lo_open=True)), u8)


def contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """Contrast change around the image mean: out = mean + factor * (in - mean), clipped.

    The mean is taken per image and per channel over the spatial axes, as in
    `tf.image.adjust_contrast` / `dm_pix.adjust_contrast` (the OpenCV recipe
    `addWeighted(img, f, mean, 1 - f, 0)` with a per-channel mean), so the JAX twin can use
    dm-pix directly. A constant image is unchanged; factor < 1 flattens, > 1 hardens.

    Args:
      image: uint8 or float-in-[0, 1] RGB, (H, W, 3) or (N, H, W, 3).
      factor: contrast factor, >= 0. Paper B §4.2 draws it from [0.5, 2.0].

    Returns:
      The adjusted image, same shape and dtype convention as `gamma`.
    """
    x, u8 = _to_float(image)
    f = _check_scalar(factor, "factor", 0.0)
    mean = x.mean(axis=(-3, -2), keepdims=True)
    return _restore(mean + f * (x - mean), u8)


def brightness(image: np.ndarray, delta: float) -> np.ndarray:
    """Additive brightness shift out = in + delta, clipped (`dm_pix.adjust_brightness`).

    Args:
      image: uint8 or float-in-[0, 1] RGB, (H, W, 3) or (N, H, W, 3).
      delta: shift in [-1, 1] ([0, 1] units, i.e. delta * 255 grey levels for uint8).
    """
    x, u8 = _to_float(image)
    return _restore(x + _check_scalar(delta, "delta", -1.0, 1.0), u8)


def color_temperature(image: np.ndarray, kelvin: float) -> np.ndarray:
    """Recolours the image as if lit by a `kelvin` illuminant (see `kelvin_to_rgb_gains`).

    Args:
      image: uint8 or float-in-[0, 1] RGB, (H, W, 3) or (N, H, W, 3).
      kelvin: colour temperature in [1000, 40000]; 6500 is the identity, lower is warmer.
    """
    x, u8 = _to_float(image)
    k = _check_scalar(kelvin, "kelvin", 1000.0, 40000.0)
    return _restore(x * kelvin_to_rgb_gains(k).astype(np.float32), u8)


def directional_light(image: np.ndarray, direction: str | int, strength: float) -> np.ndarray:
    """Side light from `direction` via a multiplicative radial-gradient overlay (paper B §4.2).

    out = in * (1 - strength + 2 * strength * m), with m = `radial_light_mask` centred on the
    middle of the lit edge: the lit edge is scaled by (1 + strength), the far edge by
    (1 - strength). Multiplicative shading (rather than additive light) keeps black black, as a
    change of irradiance would.

    Args:
      image: uint8 or float-in-[0, 1] RGB, (H, W, 3) or (N, H, W, 3).
      direction: where the light comes FROM: 'left' (left half bright, right dark), 'right',
        'top' (top-down light), 'bottom' (bottom-up), or the index into SIDE_DIRECTIONS.
      strength: in [0, 1]; 0 is the identity.
    """
    x, u8 = _to_float(image)
    d = direction_index(direction)
    s = _check_scalar(strength, "strength", 0.0, 1.0)
    m = radial_light_mask(x.shape[-3], x.shape[-2], LIGHT_CENTRES[d])
    return _restore(x * (1.0 - s + 2.0 * s * m)[..., None], u8)


def mixed(image: np.ndarray, *, gamma: float = 1.0, contrast: float = 1.0,
          direction: str | int | None = None, strength: float = 0.0) -> np.ndarray:
    """Paper B's "mixed lighting": gamma, then contrast, then a directional overlay (§4.2).

    The defaults are the identity for each component; `direction=None` skips the overlay. The tag
    of the result is `dominant_condition(gamma, contrast, direction, strength)`.
    """
    x, u8 = _to_float(image)
    g = _check_scalar(gamma, "gamma", 0.0, lo_open=True)
    f = _check_scalar(contrast, "contrast", 0.0)
    x = np.clip(np.power(x, g), 0.0, 1.0)
    mean = x.mean(axis=(-3, -2), keepdims=True)
    x = np.clip(mean + f * (x - mean), 0.0, 1.0)
    if direction is not None:
        x = directional_light(x, direction, strength)
    return _restore(x, u8)


# ---------------------------------------------------------------------------------------------
# Paper A simulate module
# ---------------------------------------------------------------------------------------------


def reduce_brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """Exposure reduction out = in * factor (paper A's brightness reduction).

    Args:
      image: uint8 or float-in-[0, 1] RGB, (H, W, 3) or (N, H, W, 3).
      factor: in [0, 1]; 1 is the identity.
    """
    x, u8 = _to_float(image)
    return _restore(x * _check_scalar(factor, "factor", 0.0, 1.0), u8)


def sepia(image: np.ndarray, strength: float = 1.0) -> np.ndarray:
    """Sepia colour shift: blend of the image and SEPIA_MATRIX @ rgb, clipped (paper A).

    Args:
      image: uint8 or float-in-[0, 1] RGB, (H, W, 3) or (N, H, W, 3).
      strength: blend weight in [0, 1]; 0 is the identity, 1 is the full sepia filter.
    """
    x, u8 = _to_float(image)
    s = _check_scalar(strength, "strength", 0.0, 1.0)
    toned = np.clip(x @ SEPIA_MATRIX.T, 0.0, 1.0)
    return _restore((1.0 - s) * x + s * toned, u8)


def add_noise(image: np.ndarray, sigma: float, rng: np.random.Generator | None = None, *,
              noise: np.ndarray | None = None) -> np.ndarray:
    """Additive Gaussian sensor noise out = in + sigma * n, n ~ N(0, 1) per pixel and channel.

    Args:
      image: uint8 or float-in-[0, 1] RGB, (H, W, 3) or (N, H, W, 3).
      sigma: noise std in [0, 1] units (>= 0).
      rng: numpy Generator drawing n; ignored when `noise` is given.
      noise: optional explicit standard-normal field of the image's shape (lets the JAX twin and
        this function be compared on the same draw).
    """
    x, u8 = _to_float(image)
    s = _check_scalar(sigma, "sigma", 0.0)
    if noise is None:
        noise = _check_rng(rng).standard_normal(x.shape, dtype=np.float32)
    noise = np.asarray(noise, np.float32)
    if noise.shape != x.shape:
        raise ValueError(f"noise: expected shape {x.shape} (the image's), got {noise.shape}")
    return _restore(x + s * noise, u8)


def apply_simulate(image: np.ndarray, *, brightness: float, sepia_strength: float,
                   noise_sigma: float, rng: np.random.Generator | None = None,
                   noise: np.ndarray | None = None) -> np.ndarray:
    """Paper A's simulate module with fixed parameters: sepia, then dimming, then noise.

    Order: the colour cast belongs to the (dim, warm) scene light, dimming scales the signal, and
    sensor noise is added after exposure, so its relative level grows as the image darkens.
    Arguments as in `sepia`, `reduce_brightness` (`brightness` is its factor) and `add_noise`.
    """
    x, u8 = _to_float(image)
    x = sepia(x, sepia_strength)
    x = reduce_brightness(x, brightness)
    x = add_noise(x, noise_sigma, rng, noise=noise)
    return _restore(x, u8)


def sample_simulate_params(rng: np.random.Generator, **ranges: Any) -> dict[str, float]:
    """Draws {'brightness', 'sepia_strength', 'noise_sigma'} uniformly from their ranges.

    Keyword arguments override SIMULATE_RANGES entries; each is a (low, high) pair or a number.
    """
    rng = _check_rng(rng)
    unknown = set(ranges) - set(SIMULATE_RANGES)
    if unknown:
        raise TypeError(f"unknown simulate parameter(s) {sorted(unknown)}; "
                        f"valid: {sorted(SIMULATE_RANGES)}")
    merged = {**SIMULATE_RANGES, **ranges}
    limits = {"brightness": (0.0, 1.0), "sepia_strength": (0.0, 1.0), "noise_sigma": (0.0, 1.0)}
    out = {}
    for name in SIMULATE_RANGES:  # fixed order: same draws in every process
        lo, hi = _check_range(merged[name], name, *limits[name])
        out[name] = float(rng.uniform(lo, hi))
    return out


def simulate_low_light(image: np.ndarray, rng: np.random.Generator, *,
                       return_params: bool = False, **ranges: Any):
    """Paper A's simulate module with randomised parameters (one draw per image of a batch).

    Args:
      image: uint8 or float-in-[0, 1] RGB, (H, W, 3) or (N, H, W, 3).
      rng: numpy Generator.
      return_params: also return the drawn parameters (a dict, or a list of dicts for a batch).
      **ranges: `brightness`, `sepia_strength`, `noise_sigma` as (low, high) or a number;
        defaults SIMULATE_RANGES (our choice, see there).

    Returns:
      The simulated image (same shape/dtype convention), and the parameters if asked.
    """
    _check_image(image)
    rng = _check_rng(rng)
    if image.ndim == 4:
        results = [simulate_low_light(im, rng, return_params=True, **ranges) for im in image]
        out = np.stack([r[0] for r in results])
        return (out, [r[1] for r in results]) if return_params else out
    params = sample_simulate_params(rng, **ranges)
    out = apply_simulate(image, rng=rng, **params)
    return (out, params) if return_params else out


# ---------------------------------------------------------------------------------------------
# Paper B protocol
# ---------------------------------------------------------------------------------------------


def _check_mix(mix: Sequence[float]) -> tuple[float, float, float]:
    if len(mix) != 3:
        raise ValueError(f"mix: expected 3 fractions (low, side, over), got {mix!r}")
    m = tuple(_check_scalar(v, f"mix[{i}]", 0.0, 1.0) for i, v in enumerate(mix))
    if abs(sum(m) - 1.0) > 1e-6:
        raise ValueError(f"mix: fractions must sum to 1, got {mix!r} (sum {sum(m)})")
    return m


def sample_condition_params(condition: str, rng: np.random.Generator,
                            spec: ProtocolSpec = DEFAULT_PROTOCOL) -> dict[str, Any]:
    """Draws `mixed` keyword arguments producing `condition` ('low', 'over' or 'side_*').

    See ProtocolSpec for the ranges. The result always satisfies
    `dominant_condition(**params) == condition`.
    """
    rng = _check_rng(rng)
    cond.check(condition)
    p = {"gamma": 1.0, "contrast": 1.0, "direction": None, "strength": 0.0}
    if condition in (cond.LOW, cond.OVER):
        low = condition == cond.LOW
        p["gamma"] = float(rng.uniform(*(spec.low_gamma if low else spec.over_gamma)))
        if rng.random() < spec.p_contrast:
            p["contrast"] = float(rng.uniform(*(spec.low_contrast if low else spec.over_contrast)))
    elif condition in cond.SIDE_CONDITIONS:
        p["direction"] = SIDE_DIRECTIONS[cond.SIDE_CONDITIONS.index(condition)]
        p["strength"] = float(rng.uniform(*spec.side_strength))
        if rng.random() < spec.p_mixed:
            p["gamma"] = float(rng.uniform(*spec.side_gamma))
            p["contrast"] = float(rng.uniform(*spec.side_contrast))
    else:
        raise ValueError(f"condition: the protocol generates low, side_* or over, "
                         f"got {condition!r}")
    return p


def apply_protocol(image: np.ndarray, rng: np.random.Generator,
                   mix: Sequence[float] = PAPER_B_MIX, spec: ProtocolSpec = DEFAULT_PROTOCOL,
                   *, return_params: bool = False):
    """Draws one of paper B's §4.2 conditions and applies it to one image.

    The bucket is drawn from `mix` (low, side, over; default 30/40/30), a side-light direction
    uniformly among the four, then parameters by `sample_condition_params`. For exact dataset
    proportions use `IlluminationProtocol` instead of i.i.d. draws.

    Args:
      image: uint8 or float-in-[0, 1] RGB, one image (H, W, 3).
      rng: numpy Generator.
      mix: fractions of (low, side, over), summing to 1.
      spec: per-condition parameter ranges.
      return_params: also return the `mixed` keyword arguments used.

    Returns:
      (image, condition_name) or (image, condition_name, params).
    """
    _check_image(image)
    if image.ndim != 3:
        raise ValueError(f"image: apply_protocol takes one image (H, W, 3), got {image.shape}")
    rng = _check_rng(rng)
    bucket = int(rng.choice(3, p=_check_mix(mix)))
    name = (cond.LOW, None, cond.OVER)[bucket] or cond.SIDE_CONDITIONS[int(rng.integers(4))]
    params = sample_condition_params(name, rng, spec)
    out = mixed(image, **params)
    return (out, name, params) if return_params else (out, name)


# Re-exports: the dataset wrappers and the enhancement baselines live in their own files.
from lowlight.data.enhance import (  # noqa: E402
    ENHANCERS,
    clahe,
    gamma_correct,
    multi_scale_retinex,
    no_enhancement,
)
from lowlight.data.illumination_sets import (  # noqa: E402
    DistortionFace,
    IlluminationProtocol,
    NaturalFace,
    exact_counts,
)

__all_reexports__ = (ENHANCERS, clahe, gamma_correct, multi_scale_retinex, no_enhancement,
                     DistortionFace, IlluminationProtocol, NaturalFace, exact_counts)
