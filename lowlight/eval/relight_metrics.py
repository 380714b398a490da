"""Relighting quality: PSNR, SSIM and illumination uniformity, per lighting condition.

Paper B evaluates its relighting network (§3.4) only indirectly (verification gains, §4.1.6 and
Table 2) plus one number in the conclusions: "relighting improves illumination uniformity by
1.35 ± 0.12", never defining uniformity. We define it here (our choice):

* **Non-uniformity** of an image over the face: the coefficient of variation (std / mean) of the
  *low-frequency luminance* over the skin. Luminance is Rec.601 luma of the [0, 1] RGB image;
  low-frequency means a mask-normalised Gaussian blur, `G*(m·Y) / G*(m)` with std
  `sigma_frac × image side` (1/16 -> 7 px at 112x112), which keeps shading (a lit and a dark
  cheek) and drops texture and small features, and does not let the background bleed into the
  face; std and mean are weighted by the soft skin mask `m`. Dividing by the mean makes it
  independent of exposure: a uniformly dim face is as uniform as the same face brightened, so
  only *uneven* light scores badly. 0 = perfectly even light.
* **Uniformity gain** ("improvement") of a method on an image: non-uniformity of the degraded
  input divided by that of the method's output, `(U_in + eps) / (U_out + eps)` with eps = 1e-3
  (so a perfectly flat output gives a large finite number, not inf). 1.35 means the output's
  shading varies 1/1.35 as much as the input's, i.e. "35 % more uniform"; the `none` baseline
  scores exactly 1. The paper's "1.35 ± 0.12" reads as mean ± std of this over images.
  Caveat: the measure is invariant to gains, not to tone curves — a global power law y -> y^g
  scales the CV by about g, so a brightening gamma (g < 1) also earns a partial "gain"
  (on synthetic low-light faces, auto-gamma scores ~2). Read it together with PSNR/SSIM.

`evaluate_relighting` reports, per method and per condition, mean PSNR and SSIM against the
canonical-light target, mean non-uniformity of the output, and mean and std of the uniformity
gain — for the relighting network (any `uint8 batch -> uint8 batch` callable, e.g.
`lowlight.models.relight.uint8_relighter`) and the classic baselines of
`lowlight.data.illumination.ENHANCERS` (none, gamma, clahe, msr).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import cv2
import jax
import numpy as np

from lowlight.data import illumination
from lowlight.losses import reconstruction

#: Metrics each table cell holds, in display order.
METRICS: tuple[str, ...] = ("psnr", "ssim", "nonuniformity", "uniformity_gain",
                            "uniformity_gain_std")
#: Default baselines: every classic enhancer.
BASELINES: tuple[str, ...] = tuple(illumination.ENHANCERS)
#: Blur std of the low-frequency luminance, as a fraction of the image side.
SIGMA_FRAC = 1.0 / 16.0
#: Stabiliser of the uniformity-gain ratio.
GAIN_EPS = 1e-3

Table = dict[str, dict[str, dict[str, float]]]


def _as_batch(images: Any, name: str) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"{name}: expected (H, W, 3) or (N, H, W, 3), got shape {x.shape}")
    return x


def _to_unit(x: np.ndarray) -> np.ndarray:
    """uint8 -> float in [0, 1]; floats are taken as already in [0, 1]."""
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Full-reference metrics
# ---------------------------------------------------------------------------------------------


def psnr(pred: Any, target: Any, *, max_val: float | None = None) -> np.ndarray | float:
    """Peak signal-to-noise ratio per image, 10·log10(max_val² / MSE), in dB (float64).

    Args:
      pred, target: equal-shape images (H, W, C) or (N, H, W, C).
      max_val: peak value; default 255 for uint8 inputs, else 1.0 ([0, 1] floats).

    Returns:
      A float for one image or (N,) for a batch; +inf where the images are identical.
    """
    p, t = np.asarray(pred), np.asarray(target)
    if p.shape != t.shape:
        raise ValueError(f"psnr: expected equal shapes, got {p.shape} and {t.shape}")
    if max_val is None:
        max_val = 255.0 if p.dtype == np.uint8 else 1.0
    single = p.ndim == 3
    p, t = _as_batch(p, "pred").astype(np.float64), _as_batch(t, "target").astype(np.float64)
    mse = np.mean((p - t) ** 2, axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        out = 10.0 * np.log10(float(max_val) ** 2 / mse)
    return float(out[0]) if single else out


#: Jitted once; retraces only per new image shape.
_ssim_jit = jax.jit(reconstruction.ssim)


def ssim(pred: Any, target: Any) -> np.ndarray | float:
    """SSIM per image (`lowlight.losses.reconstruction.ssim`, 11-tap Gaussian window, sigma 1.5).

    uint8 inputs are scaled to [0, 1]; floats must already be in [0, 1]. Returns a float for one
    image, (N,) for a batch.
    """
    p, t = np.asarray(pred), np.asarray(target)
    single = p.ndim == 3
    out = np.asarray(_ssim_jit(_to_unit(_as_batch(p, "pred")), _to_unit(_as_batch(t, "target"))),
                     np.float64)
    return float(out[0]) if single else out


# ---------------------------------------------------------------------------------------------
# Illumination uniformity
# ---------------------------------------------------------------------------------------------


def low_frequency_luminance(image: Any, mask: Any, *, sigma_frac: float = SIGMA_FRAC
                            ) -> np.ndarray:
    """Mask-normalised Gaussian blur of Rec.601 luma, (H, W) float32 (NaN where mask ~ 0 nearby).

    Args:
      image: one RGB image (H, W, 3), uint8 or float in [0, 1].
      mask: (H, W) weights in [0, 1] (the skin mask).
      sigma_frac: blur std as a fraction of the image's larger side.
    """
    x = _to_unit(np.asarray(image))
    m = np.asarray(mask, np.float32)
    if x.ndim != 3 or m.shape != x.shape[:2]:
        raise ValueError(f"expected image (H, W, 3) and mask (H, W), got {x.shape}, {m.shape}")
    y = x @ illumination.LUMA_601
    s = sigma_frac * max(x.shape[:2])
    blur = lambda z: cv2.GaussianBlur(z, (0, 0), sigmaX=s, sigmaY=s,  # noqa: E731
                                      borderType=cv2.BORDER_REFLECT)
    num, den = blur(y * m), blur(m)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 1e-6, num / den, np.nan).astype(np.float32)


def illumination_nonuniformity(image: Any, mask: Any, *, sigma_frac: float = SIGMA_FRAC
                               ) -> np.ndarray | float:
    """Coefficient of variation of low-frequency skin luminance (0 = perfectly even light).

    Weighted by the soft skin mask (see the module docstring for the definition and why it is
    divided by the mean). NaN for an image whose mask is empty.

    Args:
      image: (H, W, 3) or (N, H, W, 3), uint8 or float in [0, 1].
      mask: (H, W) or (N, H, W) skin weights in [0, 1].
      sigma_frac: low-pass std as a fraction of the image side.

    Returns:
      A float for one image, (N,) float64 for a batch.
    """
    single = np.asarray(image).ndim == 3
    x = _as_batch(image, "image")
    m = np.asarray(mask, np.float32)
    m = m[None] if m.ndim == 2 else m
    if m.shape != x.shape[:3]:
        raise ValueError(f"mask: expected shape {x.shape[:3]}, got {m.shape}")
    out = np.full(len(x), np.nan)
    for i, (im, w) in enumerate(zip(x, m)):
        lum = low_frequency_luminance(im, w, sigma_frac=sigma_frac).astype(np.float64)
        w = np.where(np.isfinite(lum), w, 0.0).astype(np.float64)
        total = w.sum()
        if total < 1e-6:
            continue
        lum = np.nan_to_num(lum)
        mean = (w * lum).sum() / total
        std = math.sqrt(max((w * (lum - mean) ** 2).sum() / total, 0.0))
        out[i] = std / max(mean, 1e-6)
    return float(out[0]) if single else out


def uniformity_gain(before: Any, after: Any, mask: Any, *, sigma_frac: float = SIGMA_FRAC,
                    eps: float = GAIN_EPS) -> np.ndarray | float:
    """Illumination-uniformity improvement, (U(before) + eps) / (U(after) + eps), per image.

    > 1 when `after` is lit more evenly over the skin than `before`; 1.35 = 35 % more uniform
    (paper B's conclusion reports 1.35 ± 0.12 for its relighting network).
    """
    u0 = np.asarray(illumination_nonuniformity(before, mask, sigma_frac=sigma_frac))
    u1 = np.asarray(illumination_nonuniformity(after, mask, sigma_frac=sigma_frac))
    gain = (u0 + eps) / (u1 + eps)
    return float(gain) if gain.ndim == 0 else gain


# ---------------------------------------------------------------------------------------------
# Per-condition evaluation
# ---------------------------------------------------------------------------------------------


def _pair_arrays(pairs: Mapping[str, Any], condition: str):
    target_key = "target" if "target" in pairs else "canonical"
    missing = [k for k in ("image", target_key, "skin_mask") if k not in pairs]
    if missing:
        raise KeyError(f"pairs[{condition!r}]: missing {missing}; expected keys image, "
                       f"target (or canonical), skin_mask")
    image = _as_batch(pairs["image"], f"{condition}.image")
    target = _as_batch(pairs[target_key], f"{condition}.{target_key}")
    mask = np.asarray(pairs["skin_mask"], np.float32)
    mask = mask[None] if mask.ndim == 2 else mask
    if image.dtype != np.uint8 or target.dtype != np.uint8:
        raise TypeError(f"pairs[{condition!r}]: image and target must be uint8")
    if image.shape != target.shape or mask.shape != image.shape[:3]:
        raise ValueError(f"pairs[{condition!r}]: shapes disagree: image {image.shape}, target "
                         f"{target.shape}, skin_mask {mask.shape}")
    return image, target, mask


def evaluate_relighting(
    pairs_by_condition: Mapping[str, Mapping[str, Any]],
    methods: Mapping[str, Callable[[np.ndarray], np.ndarray]] | None = None,
    *,
    baselines: Sequence[str] = BASELINES,
    sigma_frac: float = SIGMA_FRAC,
) -> Table:
    """PSNR / SSIM / illumination uniformity per method and lighting condition.

    Args:
      pairs_by_condition: condition name -> {"image": degraded uint8 (N, H, W, 3), "target"
        (or "canonical", as `SynthFaces.render_batch` returns it): uint8 (N, H, W, 3) under
        canonical light, "skin_mask": (N, H, W) in [0, 1]}.
      methods: extra methods by name, each `fn(uint8 (N, H, W, 3)) -> uint8 (N, H, W, 3)`
        (e.g. {"relight": lowlight.models.relight.uint8_relighter(model, variables)}).
      baselines: names in `illumination.ENHANCERS` to evaluate too (default: all of them).
      sigma_frac: low-pass std of the uniformity measure (fraction of the image side).

    Returns:
      {method: {condition: {metric: value}}} with metrics `METRICS`: psnr (dB) and ssim are the
      means over images against the target (psnr is +inf if any output equals its target
      exactly); nonuniformity is the mean over images of the output's; uniformity_gain and
      uniformity_gain_std are the mean and std over images of U(input) / U(output) (images with
      an empty skin mask are skipped: NaN-aware means). Baselines come first, then `methods`.
    """
    all_methods: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    for name in baselines:
        if name not in illumination.ENHANCERS:
            raise ValueError(f"unknown baseline {name!r}; valid: "
                             f"{', '.join(illumination.ENHANCERS)}")
        all_methods[name] = illumination.ENHANCERS[name]
    for name, fn in (methods or {}).items():
        if name in all_methods:
            raise ValueError(f"method {name!r} clashes with a baseline of the same name")
        all_methods[name] = fn

    table: Table = {name: {} for name in all_methods}
    for condition, pairs in pairs_by_condition.items():
        image, target, mask = _pair_arrays(pairs, condition)
        u_in = illumination_nonuniformity(image, mask, sigma_frac=sigma_frac)
        for name, fn in all_methods.items():
            out = np.asarray(fn(image))
            if out.shape != image.shape or out.dtype != np.uint8:
                raise ValueError(f"method {name!r} returned {out.dtype} {out.shape}; expected "
                                 f"uint8 {image.shape}")
            u_out = illumination_nonuniformity(out, mask, sigma_frac=sigma_frac)
            gain = (u_in + GAIN_EPS) / (u_out + GAIN_EPS)
            with np.errstate(invalid="ignore"):
                table[name][condition] = {
                    "psnr": float(np.mean(psnr(out, target))),
                    "ssim": float(np.mean(ssim(out, target))),
                    "nonuniformity": float(np.nanmean(u_out)) if np.isfinite(u_out).any()
                    else math.nan,
                    "uniformity_gain": float(np.nanmean(gain)) if np.isfinite(gain).any()
                    else math.nan,
                    "uniformity_gain_std": float(np.nanstd(gain)) if np.isfinite(gain).any()
                    else math.nan,
                }
    return table


def to_markdown(table: Table, metrics: Sequence[str] = METRICS, *, digits: int = 3) -> str:
    """Renders an `evaluate_relighting` table: one section per metric, methods × conditions."""
    methods = list(table)
    conditions: list[str] = []
    for per_cond in table.values():
        conditions += [c for c in per_cond if c not in conditions]
    lines: list[str] = []
    for metric in metrics:
        lines += [f"### {metric}", "", "| method | " + " | ".join(conditions) + " |",
                  "|---|" + "---:|" * len(conditions)]
        for m in methods:
            cells = []
            for c in conditions:
                v = table[m].get(c, {}).get(metric)
                cells.append("–" if v is None else f"{v:.{digits}f}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
