"""The face model of the synthetic world in template units: parameters, landmarks, boxes.

`lowlight.data.synthetic` draws people and images, `lowlight.data._render` turns parameters into
pixels; this file holds the geometry in between, in template units (the 112x112 ArcFace crop,
where insightface's `arcface_dst` anchors sit) and in the face's frontal frame (u0, v):

  * `face_params`: a person's face geometry and albedo, shaped by age, gender and ethnicity.
  * `project`: the landmarks through the same pose map as the pixels (yaw about the head
    cylinder, then roll / scale / offset), so they land on the drawn features.
  * `regions`, `chunk_boxes`: where each local feature `_render` draws can be non-zero. A
    region is the feature's exact support, soft edges included (a soft edge is a pixel wide:
    several template units at small sizes), mapped forward to a pixel box; the renderer
    computes the feature only inside its box. A conservative box saves work and cannot change
    a pixel, so an image is identical whatever box (the union over its chunk) it gets: alone
    or in any batch, at any size. Each bound mirrors a formula in `_render._render_chunk`:
    change both together (tests/test_synthetic.py compares boxed and full-frame renders).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

TEMPLATE = 112.0  # template side (ArcFace crop) in which all geometry is expressed
C0 = 56.0  # template centre = face midline

# Linear-light albedos (display value squared, gamma 2).
_SKIN = ((0.74, 0.52, 0.40), (0.19, 0.10, 0.06), (0.70, 0.50, 0.34),
         (0.45, 0.26, 0.16), (0.56, 0.36, 0.23))
_SKIN_SPREAD = (0.12, 0.28, 0.12, 0.18, 0.22)
_HAIR = ((0.020, 0.018, 0.016), (0.055, 0.034, 0.020), (0.13, 0.075, 0.040),
         (0.28, 0.18, 0.09), (0.52, 0.40, 0.21), (0.33, 0.10, 0.04))
_HAIR_PROBS = ((0.14, 0.30, 0.25, 0.13, 0.13, 0.05), (0.75, 0.22, 0.03, 0, 0, 0),
               (0.70, 0.27, 0.03, 0, 0, 0), (0.68, 0.28, 0.04, 0, 0, 0),
               (0.40, 0.38, 0.15, 0.05, 0.02, 0))
_IRIS = ((0.045, 0.022, 0.010), (0.11, 0.055, 0.022), (0.09, 0.16, 0.24),
         (0.09, 0.15, 0.07))
_STYLES = ("short", "buzz", "medium", "long", "bangs", "bun")
_STYLE_PROBS = ((0.50, 0.20, 0.16, 0.04, 0.08, 0.02), (0.08, 0.01, 0.30, 0.40, 0.13, 0.08))


def pick(u: float, probs: Sequence[float]) -> int:
    """Index i with cumulative probability (normalised) just above u."""
    total, acc = sum(probs), 0.0
    for i, q in enumerate(probs):
        acc += q
        if u * total < acc:
            return i
    return len(probs) - 1


def clip(x, lo, hi):
    """min(max(x, lo), hi) on Python numbers."""
    return min(max(x, lo), hi)


# ---------------------------------------------------------------------------------------------
# Face parameters and landmarks
# ---------------------------------------------------------------------------------------------

def face_params(z, w, gender: int, eth: int, age: int, base_age: int) -> dict[str, float]:
    """Identity geometry and albedo (template units), shaped by the attributes."""
    ch = clip((16 - age) / 14, 0.0, 1.0)  # childness
    old = clip((age - 30) / 50, 0.0, 1.0)
    fem, male = float(gender), 1.0 - gender
    asian, black, white = float(eth == 2), float(eth == 1), float(eth == 0)
    P = {}
    P["eye_y"] = 51.6 + 1.1 * z[0] + 1.0 * ch
    P["eye_dx"] = 17.6 + 0.9 * z[1]
    P["eye_w"] = 5.6 + 0.45 * z[2] + 0.6 * ch + 0.2 * fem
    P["eye_h"] = 2.5 + 0.35 * z[3] - 0.45 * asian + 0.3 * ch
    P["eye_tilt"] = 0.5 * z[4] + 0.4 * asian
    P["brow_gap"] = 8.5 + 0.9 * z[5] + 0.6 * fem - 0.8 * old
    P["brow_th"] = max(0.8, 1.7 + 0.4 * z[6] + 0.5 * male - 0.4 * fem)
    P["brow_arch"] = 1.2 + 0.6 * z[7] + 0.8 * fem
    P["brow_len"] = 9.5 + 0.9 * z[8]
    P["brow_dens"] = clip(0.85 + 0.1 * z[34] - 0.1 * fem - 0.3 * ch, 0.4, 1.0)
    P["nose_y"] = 71.7 + 1.4 * z[9] - 2.0 * ch
    P["nose_w"] = (6.2 + 0.7 * z[10] + (-0.3, 1.6, 0.6, 0.4, 0.4)[eth] - 0.8 * ch - 0.4 * fem)
    P["nose_h"] = max(1.5, 4.0 + 1.0 * z[11] + (1.2, -0.5, -1.5, 0.5, 0.0)[eth] - 3.0 * ch)
    P["mouth_y"] = 92.3 + 1.4 * z[12] - 3.5 * ch
    P["mouth_w"] = 14.6 + 1.1 * z[13] - 1.5 * ch
    P["lip_u"] = max(1.0, 2.4 + 0.45 * z[14] + 0.8 * black + 0.3 * fem - 0.6 * old)
    P["lip_l"] = max(1.2, 3.2 + 0.5 * z[15] + 0.9 * black + 0.3 * fem - 0.6 * old)
    P["face_w"] = 37.5 + 1.8 * z[16] + 1.0 * male + 1.0 * ch + 0.8 * asian
    P["face_top"] = 10.0 + 2.5 * z[17] - 4.0 * ch
    P["chin_y"] = 110.0 + 2.2 * z[18] - 2.0 * ch + 1.0 * male
    P["jaw_y"] = P["nose_y"] + 2.0
    P["jaw_taper"] = clip(0.38 + 0.08 * z[19] + 0.08 * fem - 0.10 * male + 0.05 * ch
                           - 0.08 * old, 0.15, 0.6)
    P["cheek_h"] = 2.0 + 0.7 * z[20] + 1.0 * ch
    P["face_depth"] = 26.0 + 3.0 * z[32]
    P["socket"] = 2.5 + 0.6 * z[24] + 1.0 * white - 0.5 * ch
    P["ear_y"] = P["nose_y"] - 6.0 + 1.2 * z[33]
    P["ear_w"], P["ear_h"] = 4.0, 10.5
    P["head_r"] = P["face_w"] + 6.0
    # skin: ethnicity prior x lightness x redness; pores/blotches; blush; shine; wrinkles
    L = 1.0 + _SKIN_SPREAD[eth] * clip(z[21], -2.5, 2.5) * 0.6
    sk = (_SKIN[eth][0] * L * (1 + 0.05 * z[22] + 0.03 * ch), _SKIN[eth][1] * L,
          _SKIN[eth][2] * L * (1 - 0.07 * z[22]))
    P["skin_r"], P["skin_g"], P["skin_b"] = (clip(c, 0.02, 0.9) for c in sk)
    P["tex_amp"] = 0.025 + 0.01 * abs(z[23]) + 0.03 * old
    P["tex_ox"], P["tex_oy"] = w[11], w[12]
    P["blush"] = clip(0.06 + 0.04 * z[31] + 0.03 * fem + 0.04 * ch, 0.0, 0.2)
    P["spec_k"] = clip(0.12 + 0.05 * z[30], 0.02, 0.3)
    P["wrinkle"] = old * clip(0.6 + 0.25 * z[35], 0.1, 1.0) * 0.35
    # eyes
    P["sclera_r"], P["sclera_g"], P["sclera_b"] = 0.62, 0.58, 0.55
    iris = pick(w[6], (0.15, 0.30, 0.35, 0.20) if eth == 0 else (0.8, 0.2, 0, 0))
    P["iris_r"], P["iris_g"], P["iris_b"] = _IRIS[iris]
    P["iris_rad"] = 0.42 * P["eye_w"]
    P["lash"] = 0.55 + 0.15 * fem
    # hair: colour by ethnicity, greying with age; style by gender (baldness with age)
    hk = (1 + 0.15 * clip(z[28], -2, 2)) * (1 + 0.8 * ch * (eth == 0))  # fair-haired children
    grey = clip((age - 38 - 8 * z[29]) / 35, 0.0, 1.0)
    P["hair_r"], P["hair_g"], P["hair_b"] = (
        c * hk * (1 - grey) + g * grey
        for c, g in zip(_HAIR[pick(w[4], _HAIR_PROBS[eth])], (0.55, 0.55, 0.53)))
    bald = gender == 0 and w[9] < clip((base_age - 30) / 70, 0.0, 0.6)
    style = "bald" if bald else _STYLES[pick(w[5], _STYLE_PROBS[gender])]
    vol = {"buzz": 1.5, "bald": 2.0}.get(style, 5.0 + 1.2 * clip(z[27], -2, 2))
    P["hair_rx"] = P["face_w"] + 1.0 + 0.6 * vol
    P["hair_cy"] = P["eye_y"] + 4.0
    P["hair_ry"] = P["hair_cy"] - (P["face_top"] - vol)
    P["hair_vol"] = 4.0 + vol
    P["hairline"] = P["face_top"] + 9.0 + 2.0 * z[25] - 3.0 * ch
    P["recess"] = 6.0 + 8.0 * old * male
    P["part"] = 6.0 * clip(z[26], -1.5, 1.5)
    P["fringe"], P["crown"], P["long"], P["hair_density"] = 0.0, 1.0, 0.0, 1.0 - 0.2 * ch
    P["long_w"], P["long_len"] = P["face_w"] + 7.0 + 1.5 * z[27], 125.0 + 10.0 * z[28]
    P["side_cov"], P["side_len"] = 1.0, P["eye_y"] - 4.0
    P["hair_bottom"] = P["ear_y"] + 2.0
    if style == "buzz":
        P["hair_density"], P["side_cov"], P["side_len"] = 0.6, 0.5, P["eye_y"] - 6.0
        P["hair_bottom"] = P["ear_y"] - 3.0
    elif style == "medium":
        P["side_cov"], P["side_len"], P["hair_bottom"] = 5.0, P["mouth_y"] - 6.0, P["mouth_y"] + 5
    elif style == "long":
        P["side_cov"], P["side_len"], P["long"] = 6.0, 140.0, 1.0
        P["hair_bottom"] = 140.0
    elif style == "bangs":
        P["hairline"] = P["eye_y"] - P["brow_gap"] - 4.5 + 1.0 * z[25]
        P["fringe"], P["recess"], P["side_cov"], P["side_len"] = 1.0, 0.5, 4.0, P["mouth_y"]
        P["long"] = float(w[13] < 0.5)
        P["hair_bottom"] = P["mouth_y"] + 5
    elif style == "bun":
        P["side_cov"], P["side_len"] = 0.5, P["eye_y"] - 8.0
    elif style == "bald":
        P["crown"], P["hairline"], P["side_cov"] = 0.0, P["face_top"] - 20.0, 0.0
    P["strand_ox"], P["strand_oy"] = w[14], w[15]
    # beard (adult men): none / stubble / moustache / full
    kind = pick(w[7], (0.55, 0.20, 0.08, 0.17)) if (gender == 0 and age >= 17) else 0
    P["beard"] = (0.0, 0.35, 0.0, 0.9)[kind]
    P["moustache"] = (0.0, 0.0, 0.9, 0.9)[kind]
    P["beard_top"] = P["nose_y"] + 9.0 - 1.5 * clip(z[35], -1, 1)
    # lips: skin tinted, or lipstick
    lip = (P["skin_r"] * 0.85, P["skin_g"] * 0.45, P["skin_b"] * 0.5)
    if gender == 1 and age >= 16 and w[10] < 0.3:
        lip = (0.42, 0.05, 0.08)
    P["lip_r"], P["lip_g"], P["lip_b"] = lip
    return P


def project(P: dict) -> list[tuple[float, float]]:
    """Landmarks (5 (x, y) in template units) through the pixels' yaw/roll/scale/offset.

    Also sets P['delta'], the horizontal shift that keeps the landmarks' mean x where the frontal
    face has it (what alignment would do), so faces stay on the template under yaw.
    """
    lift = 2.2 * P["smile"]  # mouth-corner rise, matches _render's mouth line at |t| = 1
    X = (-P["eye_dx"], P["eye_dx"], 0.0, -P["mouth_w"], P["mouth_w"])
    Y = (P["eye_y"], P["eye_y"], P["nose_y"], P["mouth_y"] - lift, P["mouth_y"] - lift)
    R, yc, ys = P["head_r"], P["yaw_c"], P["yaw_s"]
    xp = [x * yc + math.sqrt(R * R - x * x) * ys for x in X]
    P["delta"] = delta = sum(x - q for x, q in zip(X, xp)) / 5
    c, s, k = P["roll_c"], P["roll_s"], P["scale"]
    return [(C0 + P["off_x"] + k * (c * (q + delta) - s * (y - C0)),
             C0 + P["off_y"] + k * (s * (q + delta) + c * (y - C0))) for q, y in zip(xp, Y)]


# ---------------------------------------------------------------------------------------------
# Feature regions and their pixel boxes
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=32)
def rows(keys: tuple[str, ...], names: tuple[str, ...]) -> list[int]:
    """Rows of the parameters `names` in a parameter matrix with columns `keys`."""
    return [keys.index(k) for k in names]


_KEYS64 = ("scale", "roll_c", "roll_s", "off_x", "off_y", "yaw_c", "yaw_s", "head_r", "delta",
           "eye_y", "nose_y", "mouth_y", "face_w", "hair_rx", "hair_ry", "hair_cy", "hair_bottom",
           "long", "long_len", "ear_h", "ear_w", "ear_y", "eye_w", "eye_h", "eye_tilt", "eye_dx",
           "brow_len", "brow_gap", "brow_raise", "brow_arch", "brow_th", "nose_w", "mouth_w",
           "smile", "open", "lip_u", "lip_l", "face_top", "chin_y", "jaw_taper", "beard_top",
           "cloth_y", "wrinkle", "beard", "moustache")  # what the boxes need, as float64


def chunk_boxes(keys: tuple[str, ...], cols: np.ndarray, size: int,
                chunk: int) -> list[dict[str, tuple[slice, slice]]]:
    """Feature boxes of each chunk of `chunk` consecutive images: name -> (rows, cols) slices.

    `cols` (K, N): the parameter matrix, one row per name in `keys`. A chunk's box is the union
    of its images' boxes; a feature whose strength is 0 in every image of the chunk (wrinkles,
    beard) gets no box, and the renderer skips it (it would be exactly 0 anyway).
    """
    F = cols[rows(keys, _KEYS64)].astype(np.float64)
    f = dict(zip(_KEYS64, F))
    # one image (ds[i]): Python floats are ~10x cheaper than 1-element arrays
    reg = regions(dict(zip(_KEYS64, F[:, 0].tolist())) if F.shape[1] == 1 else f, size)
    starts = np.arange(0, cols.shape[1], chunk)
    lo, hi = np.minimum.reduceat, np.maximum.reduceat
    r0, r1, c0, c1 = pixel_bounds(f, size, reg)
    r0, r1, c0, c1 = (lo(r0, starts).tolist(), hi(r1, starts).tolist(),
                      lo(c0, starts).tolist(), hi(c1, starts).tolist())
    wrinkles = hi(f["wrinkle"] > 0, starts).tolist()
    beards = hi(np.maximum(f["beard"], f["moustache"]) > 0, starts).tolist()
    out = []
    for j in range(len(starts)):
        box = {n: (slice(r0[j][i], max(r0[j][i], r1[j][i])),
                   slice(c0[j][i], max(c0[j][i], c1[j][i]))) for i, n in enumerate(reg)}
        if not wrinkles[j]:
            del box["fore"], box["fold"]
        if not beards[j]:
            del box["beard"]
        out.append(box)
    return out


def regions(f: dict[str, np.ndarray], size: int) -> dict[str, tuple]:
    """Frontal-frame region of each local feature, outside which it is exactly 0.

    Bounds are the features' exact supports in template units *including their soft edges*,
    whose width is a pixel: w = 1 / iw = 112 / (size * scale) template units, several units at
    small sizes (a bound that ignores it only holds at large ones). In `_render`'s shapes,
    `_ramp(d, iw * a)` is non-zero for d > -w / (2a), `_ellipse` with radii (ax, ay) for
    r2 < 1 + w / min(ax, ay), `_bump` strictly inside its ellipse.

    `f`: float64 parameters ((B,) arrays, or floats for one image). Returns name -> (du_lo,
    du_hi, v_lo, v_hi), du = u0 - midline (NaN du bounds: all columns).
    """
    w = TEMPLATE / (size * f["scale"])
    sqrt, lo, hi = ((math.sqrt, min, max) if isinstance(w, float) else
                    (np.sqrt, np.minimum, np.maximum))
    ey, ny, my, fw, nw, mw = (f[k] for k in ("eye_y", "nose_y", "mouth_y", "face_w", "nose_w",
                                             "mouth_w"))
    zero = ey * 0
    none = (zero + np.nan, zero + np.nan)
    # hair outline (ellipse cut at hair_bottom), long hair (its end a ramp with iw / 4)
    rx, ry = f["hair_rx"], f["hair_ry"]
    hair = (f["hair_cy"] - ry * sqrt(1 + w / lo(rx, ry)),
            hi(f["hair_bottom"] + w / 2, (f["long"] > 0) * (f["long_len"] + 2 * w)))
    # clothes: the neckline rises 0.35 per unit beyond |u - C0| = 12, and |u - C0| <= u_max
    u_max = ((abs(f["roll_c"]) + abs(f["roll_s"]))
             * (C0 + hi(abs(f["off_x"]), abs(f["off_y"])) + 1) / f["scale"])
    ear = f["ear_h"] * sqrt(1 + w / lo(f["ear_w"], f["ear_h"]))
    # eyes: socket / ridge / bag bumps; lens |te| < 1; lashes |te| < t_lash, |v - top| < w / 0.7;
    # brows |tb| < tb_max (about eye_dx + 1), centre between b_hi and b_lo, half-height <= th
    ew, eh, tilt, gap = f["eye_w"], f["eye_h"], abs(f["eye_tilt"]), f["brow_gap"]
    t_lash = 1.15 + w / (2 * ew)
    tb_max = sqrt(1 + w / (2 * f["brow_len"]))
    b_hi = ey - gap - f["brow_raise"] - hi(f["brow_arch"], 0)
    b_lo = ey - gap - f["brow_raise"] - lo(f["brow_arch"], 0)
    th = f["brow_th"] + w / 2
    eye_u = f["eye_dx"] + hi(hi(11.0, 1.15 * ew + w / 2), 1 + f["brow_len"] * tb_max)
    eyes = (lo(lo(ey - 7.5, ey - gap - 3.5),
               lo(ey - tilt * t_lash - eh - 0.3 - w / 0.7, b_hi - th)),
            hi(hi(ey + 7.2, ey - gap + 3.5),
               hi(hi(ey + tilt * t_lash - 0.3 + w / 0.7, ey + tilt + 0.8 * eh + w / 2), b_lo + th)))
    # nose: ridge |du| < 1.1 nose_w for ey - 4 < v < ny + 3; tip and wing bumps; nostrils
    nos = sqrt(1 + w / lo(0.3 * nw, 1.1))
    nose_u = hi(hi(1.1 * nw, 0.75 * nw + 2.8), (0.42 + 0.3 * nos) * nw)
    nose = (lo(ey - 4, lo(ny - 4.5, ny + 1.6 - 1.1 * nos)), hi(ny + 3, ny + 1.6 + 1.1 * nos))
    # mouth: bump; lips and opening |tm| < 1; crease tm^2 < 1.1 + w / 8, |v - line| < 1.25 w;
    # the mouth line lies in [my - 3.7 smile, my + 0.8 smile]
    sm = f["smile"]
    mouth_u = hi(mw + 2, mw * sqrt(1.1 + w / 8))
    mouth = (lo(my - 6, my - 3.7 * sm - hi(f["lip_u"] + w / 2, 1.25 * w)),
             hi(my + 6, my + 0.8 * sm + hi(5 * f["open"] + f["lip_l"] + w / 2, 1.25 * w)))
    # face oval: du0^2 < fw^2 + w fw; v within mid -+ half height x sqrt(1 + w / half width)
    mid, hh = (f["face_top"] + f["chin_y"]) / 2, (f["chin_y"] - f["face_top"]) / 2
    face_bot = mid + hh * sqrt(1 + w / (fw * (1 - f["jaw_taper"])))
    beard = (lo(f["beard_top"] - 0.012 * (fw * fw + w * fw) - w, ny + 2.5 - w / 2),
             hi(face_bot, my + w / 2))
    fold_u = nw + 3.25 + 0.35 * (my + 6 + w / 2 - ny)  # xf at the lowest v, + 1.25
    face_u = sqrt(fw * fw + w * fw)
    return {
        "face": (-face_u, face_u, mid - hh * sqrt(1 + w / fw), face_bot),
        "hair": (*none, *hair),
        "neck": (*none, ey + 25 - w / 2, zero + 1e4),
        "cloth": (*none, f["cloth_y"] - 0.35 * hi(u_max - 12, 0) - w / 2, zero + 1e4),
        "ears": (*none, f["ear_y"] - ear, f["ear_y"] + ear),
        "eyes": (-eye_u, eye_u, *eyes),
        "cheeks": (-(f["eye_dx"] + 16), f["eye_dx"] + 16, ey + 1.5, ey + 23),
        "nose": (-nose_u, nose_u, *nose),
        "mouth": (-mouth_u, mouth_u, *mouth),
        "chin": (zero - 10, zero + 10, f["chin_y"] - 14, f["chin_y"] - 2),
        "beard": (*none, *beard),
        "fore": (-(18 + w / 2), 18 + w / 2, mid - hh * sqrt(1 + w / fw), ey - gap - 4 + w / 2),
        "fold": (-fold_u, fold_u, ny - 1 - w / 2, my + 6 + w / 2),
    }


def pixel_bounds(f: dict[str, np.ndarray], size: int, reg: dict[str, tuple]) -> np.ndarray:
    """Per-image pixel bounds (4, B, K) = (r0, r1, c0, c1) of the K frontal-frame regions `reg`.

    Conservative: each region is mapped forward (yaw on its visible branch, then roll / scale /
    offset) with a 1-unit margin against rounding, then to whole pixels plus one.
    """
    s, c, sn, ox, oy, yc, ys, R, dl = (f[k][:, None] for k in (
        "scale", "roll_c", "roll_s", "off_x", "off_y", "yaw_c", "yaw_s", "head_r", "delta"))
    vals = np.array(list(reg.values()), np.float64).reshape(len(reg), 4, -1).transpose(1, 2, 0)
    has_cols = ~np.isnan(vals[0])
    lo_u, hi_u = np.where(has_cols, vals[0], 0.0), np.where(has_cols, vals[1], 0.0)
    lo_v, hi_v = vals[2] - C0 - 1.0, vals[3] - C0 + 1.0
    lim = R * yc - 1.0  # the inverse yaw map is one-to-one for |du| below this
    ok = has_cols & (np.maximum(-lo_u, hi_u) + 1.0 < lim)
    fwd = lambda X: X * yc + np.sqrt(np.maximum(R * R - X * X, 0.0)) * ys + dl
    ua, ub = fwd(lo_u - 1.0), fwd(hi_u + 1.0)
    xs, ys_ = [], []
    for du in (ua, ub):
        for dv in (lo_v, hi_v):
            xs.append(C0 + ox + s * (c * du - sn * dv))
            ys_.append(C0 + oy + s * (sn * du + c * dv))
    # rows-only regions: every column; rows where v in [lo, hi] at either image edge
    edge = (-C0 - ox, TEMPLATE - C0 - ox)
    yr = [C0 + oy + (s * dv + sn * X) / c for dv in (lo_v, hi_v) for X in edge]
    k = size / TEMPLATE
    y_lo = np.where(ok, np.min(ys_, 0), np.min(yr, 0)) * k
    y_hi = np.where(ok, np.max(ys_, 0), np.max(yr, 0)) * k
    x_lo = np.where(ok, np.min(xs, 0) * k, 0.0)
    x_hi = np.where(ok, np.max(xs, 0) * k, size)
    return np.clip(np.stack([np.floor(y_lo) - 1, np.ceil(y_hi) + 2, np.floor(x_lo) - 1,
                             np.ceil(x_hi) + 2]), 0, size).astype(np.int64)
