"""Pixel kernel of the synthetic face world: per-image parameters in, images out.

`lowlight.data.synthetic` draws the people and the per-image nuisance, `lowlight.data._faces`
holds the face geometry (face parameters, landmarks, feature boxes); this file holds the
physical model (light and sensor parameters per condition) and turns a batch of parameters into
pixels. Pixels are float32 numpy over whole (B, H, W) arrays, channel-first inside ((B, 3, H, W):
per-image colours broadcast over contiguous rows), written to (B, H, W, 3) uint8 at the end.

Why only + - * / sqrt min max clip floor on pixels: those are correctly rounded IEEE operations,
so a pixel's value does not depend on which SIMD lane, loop tail or batch layout computed it, nor
on the machine's libm. Soft shapes use polynomial falloffs (not exp), the noise bank uses
Irwin-Hall samples and exact box/binomial blurs, rotations come in as rational (cos, sin) pairs.

Geometry: faces are modelled in *template units* (the 112x112 ArcFace crop, where insightface's
`arcface_dst` anchors sit), in a frontal frame (u0, v). A pixel maps to the frontal frame by the
inverse of: yaw about a vertical cylinder of radius `head_r` (exact inverse of
x' = R sin(phi + yaw)), then roll / scale / offset. Landmarks go through the same forward map
(`_faces.project`), so they land on the drawn features.

Speed: full-frame work is what every pixel needs (coordinates, hair, shading, sensor); the face
oval and the small features (eyes, brows, nose, mouth, cheeks, beard, wrinkles) are computed
only inside boxes that contain their whole support (`_faces.chunk_boxes`, computed once per
batch), and a chunk of a few images is rendered per pass so per-call overhead is shared while
temporaries stay in cache. A chunk's box is the union of its images' boxes, so the boxes must be
exact supports, soft edges included, at every size: a feature cut by a box would make an image
depend on its batch-mates (sample i is bit-identical alone or in any batch, in any process).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import cv2
import numpy as np

from lowlight.data import _faces
from lowlight.data import conditions as cond
from lowlight.data._faces import C0, TEMPLATE

NUM_CLUTTER = 5  # background rectangles per image (each switched on/off by a parameter)
FULL_FRAME_BOXES = False  # testing: compute local features everywhere (must not change pixels)
_F = np.float32
# Colour temperature (K) -> linear RGB multipliers of the light (green = 1 before normalising).
_TEMPS = ((2700, 1.35, 1.0, 0.55), (4000, 1.15, 1.0, 0.78), (5500, 1.02, 1.0, 0.95),
          (6500, 0.95, 1.0, 1.05), (8000, 0.88, 1.0, 1.15))
# The clip ufunc itself: np.clip adds a Python-level wrapper that costs more than the work on
# the small arrays of a chunk (same ufunc, same results).
_clip = (np._core if hasattr(np, "_core") else np.core).umath.clip
_INF = _F(np.inf)


def _atleast(x, lo):
    """max(x, lo) for float32 arrays: np.maximum against a scalar takes numpy's slow broadcast
    loop (3x the clip ufunc's time). Same values but for the sign of a zero (clip keeps -0.0,
    maximum returns +0.0), which no output shows: every image, canonical and skin mask of the
    renderer was unchanged bit for bit (70 digests over sizes, options and conditions)."""
    return _clip(x, lo, _INF)


# ---------------------------------------------------------------------------------------------
# Cached grids and the noise bank (lazily built, deterministic, per size)
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _grid(size: int) -> np.ndarray:
    """Template-unit coordinate of each pixel centre along one axis (pixel j -> j * 112/size)."""
    return np.arange(size, dtype=_F) * _F(TEMPLATE / size)


def _blur1d(x: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """Approximately Gaussian blur along `axis` (wrap-around), exact-arithmetic only.

    Small sigma: a binomial kernel (variance n/4); larger: three box passes of radius r
    (variance r(r+1)), each a difference of a float64 cumulative sum.
    """
    if sigma < 1.5:
        n = max(2, 2 * int(round(2 * sigma * sigma)))  # even: centred kernel
        w = np.array([1.0])
        for _ in range(n):
            w = np.convolve(w, [0.5, 0.5])
        out = np.zeros_like(x)
        for o, wk in zip(range(-(n // 2), n // 2 + 1), w.astype(_F)):
            out += wk * np.roll(x, o, axis=axis)
        return out
    r = max(1, int(round((sigma * sigma + 0.25) ** 0.5 - 0.5)))
    y = x.astype(np.float64)
    for _ in range(3):
        pad = np.concatenate([np.take(y, range(-r - 1, 0), axis=axis), y,
                              np.take(y, range(r), axis=axis)], axis=axis)
        c = np.cumsum(pad, axis=axis)
        n = y.shape[axis]
        y = (np.take(c, range(2 * r + 1, 2 * r + 1 + n), axis=axis)
             - np.take(c, range(0, n), axis=axis)) / (2 * r + 1)
    return y.astype(_F)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(dtype=np.float64).astype(_F)
    return (x / _F(x.std(dtype=np.float64))).astype(_F)


@functools.lru_cache(maxsize=4)
def noise_bank(size: int) -> dict[str, np.ndarray]:
    """Tileable noise textures of side 2*size, identical on every machine.

    Gaussian-like samples are Irwin-Hall sums of 4 uniforms (exact arithmetic, no libm), so the
    bank does not depend on the platform. Images read windows at per-image offsets: cheap
    camera noise, skin pores, hair strands and out-of-focus background texture.
    """
    side = 2 * size
    rng = np.random.default_rng([0x5F4CE, 7, size])
    u = rng.random((4, 8, side, side), dtype=_F)
    g = (u.sum(0) - _F(2.0)) * _F(3.0 ** 0.5)  # 8 planes of unit-variance noise
    k = size / TEMPLATE
    skin = _normalise(_blur1d(_blur1d(g[3], 0.6 * k, 0), 0.6 * k, 1)
                      + _F(0.5) * _blur1d(_blur1d(g[4], 2.5 * k, 0), 2.5 * k, 1))
    hair = _normalise(_blur1d(_blur1d(g[5], 3.0 * k, 0), 0.45 * k + 0.3, 1))
    bg = np.stack([_normalise(_blur1d(_blur1d(g[i], 7.0 * k, 0), 7.0 * k, 1)) for i in (6, 7)])
    return {"camera": np.ascontiguousarray(g[:3]), "skin": skin, "hair": hair, "bg": bg}


def _windows(plane: np.ndarray, oy: list[int], ox: list[int], size: int,
             box: tuple[slice, slice] | None = None) -> np.ndarray:
    """Per-image (size, size) windows of a bank plane at pixel offsets (oy, ox) (only their
    (rows, cols) `box` part when given)."""
    rs, cs = box or (slice(0, size), slice(0, size))
    return np.stack([plane[..., a + rs.start:a + rs.stop, b + cs.start:b + cs.stop]
                     for a, b in zip(oy, ox)])


_WINDOWS = ("bg_oy", "bg_ox", "strand_oy", "strand_ox", "tex_oy", "tex_ox", "n_oy", "n_ox")


# ---------------------------------------------------------------------------------------------
# Soft shapes (polynomial, compact support) and compositing
# ---------------------------------------------------------------------------------------------

def _ramp(d, iw):
    """Soft step: 0 for d < -w/2, 1 for d > w/2 (w = 1/iw, about one pixel), linear between."""
    return _clip(d * iw + _F(0.5), _F(0.0), _F(1.0))


def _ellipse(u, v, cx, cy, ax, ay, iw):
    """Anti-aliased filled ellipse; returns (mask, r2) with r2 the normalised squared radius."""
    du = (u - cx) * (1 / ax)
    dv = (v - cy) * (1 / ay)
    r2 = du * du + dv * dv
    return _ramp((1 - r2) * (np.minimum(ax, ay) * _F(0.5)), iw), r2


def _band(v, lo, hi, iw):
    """Anti-aliased coverage of lo < v < hi that fades out where the band is thinner than 1 px."""
    return _ramp(np.minimum(v - lo, hi - v), iw) * _clip((hi - lo) * iw, _F(0.0), _F(1.0))


def _bump(u, v, cx, cy, ax, ay):
    """Smooth compact bump (1 - r^2)^2 inside the ellipse, 0 outside."""
    du = (u - cx) * (1 / ax)
    dv = (v - cy) * (1 / ay)
    b = _atleast(1 - du * du - dv * dv, _F(0.0))
    return b * b


def _lerp(A, m, c):
    """A <- A + m (c - A) in place; A (B,3,H,W), m (B,H,W), c broadcastable to A."""
    t = c - A
    t *= m[:, None]
    A += t


# ---------------------------------------------------------------------------------------------
# Parameter columns and per-box views
# ---------------------------------------------------------------------------------------------

class _Columns(dict):
    """name -> row of a parameter matrix, made on first use (most renders touch few names)."""

    def __init__(self, keys: Sequence[str], pos: dict[str, int], rows: np.ndarray):
        super().__init__()
        self.keys_, self.pos, self.rows = keys, pos, rows

    def __missing__(self, key):
        value = self[key] = self.rows[self.pos[key]]
        return value


@functools.lru_cache(maxsize=8)
def _positions(keys: tuple[str, ...]) -> dict[str, int]:
    return {k: j for j, k in enumerate(keys)}


class _View:
    """Per-box views of the full-frame arrays (writes go through to the full arrays)."""

    def __init__(self, box, **arrays):
        rs, cs = box
        for k, a in arrays.items():
            setattr(self, k, a[..., rs, cs])


# ---------------------------------------------------------------------------------------------
# The renderer
# ---------------------------------------------------------------------------------------------

CANON_AMBIENT = 0.35  # canonical light: ambient + frontal white directional, no noise
CANON_INTENSITY = 0.75


def render(keys: Sequence[str], M: np.ndarray, size: int, *, chunk: int = 1,
           clutter: bool = True, out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Renders a batch whose parameters are the float32 matrix M (N, K), columns named `keys`.

    `chunk` images are rendered per vectorised pass (per-batch work, such as the feature boxes,
    is done once for all). Returns image (N,H,W,3) uint8, canonical (N,H,W,3) uint8, skin_mask
    (N,H,W) float32, written into the arrays of `out` when given (saves a copy of every output).
    """
    n = M.shape[0]
    if out is None:
        out = {"image": np.empty((n, size, size, 3), np.uint8),
               "canonical": np.empty((n, size, size, 3), np.uint8),
               "skin_mask": np.empty((n, size, size), np.float32)}
    if n == 0:
        return out
    keys = tuple(keys)
    pos = _positions(keys)
    cols = np.ascontiguousarray(M.T, dtype=_F)  # (K, N): one row per parameter
    boxes = _faces.chunk_boxes(keys, cols, size, chunk)
    if FULL_FRAME_BOXES:
        full = (slice(0, size), slice(0, size))
        boxes = [{k: full for k in box} for box in boxes]
    for s, box in zip(range(0, n, chunk), boxes):
        _render_chunk(keys, pos, cols[:, s:s + chunk], size, box, clutter,
                      {k: v[s:s + chunk] for k, v in out.items()})
    return out


def _render_chunk(keys: tuple[str, ...], pos: dict[str, int], cols: np.ndarray, size: int,
                  box: dict[str, tuple], clutter: bool, out: dict[str, np.ndarray]) -> None:
    """Renders one chunk: parameter rows `cols` (K, B), feature boxes `box`, into `out`."""
    B = cols.shape[1]
    P = _Columns(keys, pos, cols)  # name -> (B,) parameter
    cols = cols.reshape(len(keys), B, 1, 1)
    p = _Columns(keys, pos, cols)  # name -> (B,1,1), broadcasts over (B,H,W)

    def rgb(n):  # (B,3,1,1) view of the consecutive columns n_r, n_g, n_b
        j = pos[n + "_r"]
        assert keys[j + 1] == n + "_g" and keys[j + 2] == n + "_b", n
        return cols[j:j + 3].transpose(1, 0, 2, 3)
    bank = noise_bank(size)
    t = _grid(size)
    xg, yg = t[None, None, :], t[None, :, None]
    iw = p["scale"] * _F(size / TEMPLATE)  # 1 / (template units per pixel): soft edges ~1 px

    # --- pixel -> face frame: undo offset, roll, scale (u, v), then yaw (u0) -----------------
    X = xg - (C0 + p["off_x"])
    Y = yg - (C0 + p["off_y"])
    ca, sa = p["roll_c"] / p["scale"], p["roll_s"] / p["scale"]
    u = (ca * X + C0) + sa * Y
    v = (ca * Y + C0) - sa * X
    xp = u - (C0 + p["delta"])
    R = p["head_r"]
    du0 = xp * p["yaw_c"] - np.sqrt(_atleast(R * R - xp * xp, _F(0.0))) * p["yaw_s"]
    u0 = du0 + C0  # frontal frame; du0 = signed distance from the midline
    adu = np.abs(du0)
    ey, ny, my = p["eye_y"], p["nose_y"], p["mouth_y"]

    # --- background: colour x (gradient, blurred texture); clutter rectangles -------------------
    # window offsets into the bank (side 2 size), from fractions in [0, 1)
    win = (P.rows[_faces.rows(keys, _WINDOWS)].astype(np.float64) * size).astype(np.int64).tolist()
    bgt = _windows(bank["bg"], win[0], win[1], size)  # (B,2,H,W)
    # (albedo stays >= 0 from here on: every later layer is a convex mix or a factor in [0, 1])
    lum = _atleast((1 + p["bg_grad"] * (yg - C0) * _F(1 / C0)) * (1 + p["bg_tex"] * bgt[:, 0]),
                     _F(0.0))
    A = rgb("bg") * lum[:, None]
    A[:, 2] *= _atleast(1 + _F(0.5) * p["bg_tex"] * bgt[:, 1], _F(0.0))  # some colour variation
    if clutter:
        _clutter(A, P, t, size)

    # --- hair behind the head: its outline (the part over the face is drawn last) -------------
    hair_tex = _windows(bank["hair"], win[2], win[3], size)
    hair_col = lambda tex: rgb("hair") * (_F(0.7) + _F(0.45) * _clip(tex + 1, 0, 2.5))[:, None]
    hb = _View(box["hair"], A=A, u0=u0, adu=adu, v=v, tex=hair_tex)
    hm, hr2 = _ellipse(hb.u0, hb.v, C0, p["hair_cy"], p["hair_rx"], p["hair_ry"], iw)
    # (the factors below are exactly 1 / 0 for a crown / no long hair: skipped if so for all)
    if not P["crown"].all():
        hm *= _atleast(_ramp(hb.adu - (p["face_w"] - 5), iw), p["crown"])  # bald: sides only
    hm *= _ramp(p["hair_bottom"] - hb.v, iw)
    hair_out = hm
    if P["long"].any():
        hair_out = np.maximum(hm, (_ramp(p["long_w"] - hb.adu, iw) * _ramp(hb.v - p["hair_cy"], iw)
                                   * _ramp(p["long_len"] - hb.v - _F(0.12) * hb.adu, iw * _F(0.25)))
                              * p["long"])
    hair_out = hair_out * p["hair_density"]  # (hair box)
    hair_rgb = hair_col(hb.tex)
    _lerp(hb.A, hair_out, hair_rgb)
    h = np.zeros((B, size, size), _F)  # height field, template units towards the camera
    h[:, box["hair"][0]] = (p["hair_vol"] * np.sqrt(_clip(1 - hr2, 0, 1))) * hm

    # --- neck and clothes ----------------------------------------------------------------------
    skin = np.zeros((B, size, size), _F)
    n = _View(box["neck"], A=A, adu=adu, v=v, skin=skin, h=h)
    neck = _ramp(p["neck_w"] - n.adu, iw) * _ramp(n.v - ey - 25, iw)
    _lerp(n.A, neck, rgb("skin") * _F(0.85))
    n.skin += neck
    np.maximum(n.h, neck * (p["face_depth"] * _F(0.35)), out=n.h)
    c = _View(box["cloth"], A=A, u=u, v=v, skin=skin, h=h)
    cloth = _ramp(c.v - (p["cloth_y"] - _F(0.35) * _atleast(np.abs(c.u - C0) - 12, _F(0.0))), iw)
    _lerp(c.A, cloth, rgb("cloth"))
    c.skin *= 1 - cloth
    c.h *= 1 - cloth


    # --- ears, then the face oval (jaw taper) with textured skin albedo ---------------------------
    e = _View(box["ears"], A=A, adu=adu, v=v, skin=skin, h=h)
    em, _ = _ellipse(e.adu, e.v, p["face_w"], p["ear_y"], p["ear_w"], p["ear_h"], iw)
    _lerp(e.A, em, rgb("skin") * _F(0.92))
    e.skin += em * (1 - e.skin)
    np.maximum(e.h, em * (p["face_depth"] * _F(0.2)), out=e.h)
    face = np.zeros((B, size, size), _F)
    f = _View(box["face"], A=A, du0=du0, v=v, skin=skin, h=h, face=face)
    taper = _clip((f.v - p["jaw_y"]) / (p["chin_y"] - p["jaw_y"]), 0, 1)
    half_w = p["face_w"] * (1 - p["jaw_taper"] * taper * taper)
    fdu = f.du0 / half_w
    mid, hh = (p["face_top"] + p["chin_y"]) * _F(0.5), (p["chin_y"] - p["face_top"]) * _F(0.5)
    fdv = (f.v - mid) / hh
    fr2 = fdu * fdu + fdv * fdv
    f.face[...] = _ramp((1 - fr2) * (half_w * _F(0.5)), iw)
    stex = _windows(bank["skin"], win[4], win[5], size, box["face"])
    _lerp(f.A, f.face, rgb("skin") * (1 + p["tex_amp"] * stex)[:, None])
    f.skin += f.face * (1 - f.skin)
    np.maximum(f.h, p["face_depth"] * np.sqrt(_clip(1 - fr2, 0, 1)), out=f.h)
    D = np.ones((B, size, size), _F)  # multiplicative darkening (pupils, lashes, creases, ...)

    # --- cheeks: relief and blush; chin -----------------------------------------------------------
    c = _View(box["cheeks"], A=A, u0=u0, v=v, adu=adu, h=h)
    c.h += p["cheek_h"] * _bump(c.adu, c.v, p["eye_dx"] + 3, ey + 12, _F(13.0), _F(10.5))
    blush = _bump(c.adu, c.v, p["eye_dx"] + 2, ey + 16, _F(9.0), _F(7.0)) * p["blush"]
    c.A[:, 1:] *= (1 - blush)[:, None]
    c = _View(box["chin"], du0=du0, v=v, h=h)
    c.h += _F(2.0) * _bump(c.du0, c.v, 0, p["chin_y"] - 8, _F(10.0), _F(6.0))

    # --- nose: ridge, tip, wings, nostrils --------------------------------------------------------
    n = _View(box["nose"], du0=du0, adu=adu, v=v, h=h, D=D)
    along = (_clip((n.v - ey + 4) / (ny - ey + 4), 0, 1)
             * _clip((ny + 3 - n.v) * _F(1 / 3), 0, 1))
    nw = p["nose_w"] * (_F(0.6) + _F(0.5) * along)
    tt = _clip(1 - (n.du0 / nw) ** 2, 0, 1)
    n.h += (p["nose_h"] * along) * (tt * tt)
    n.h += _F(2.0) * _bump(n.du0, n.v, 0, ny - 1, p["nose_w"] * _F(0.55), _F(3.5))
    n.h += _F(1.5) * _bump(n.adu, n.v, p["nose_w"] * _F(0.75), ny - 0.5, _F(2.8), _F(2.8))
    nm, _ = _ellipse(n.adu, n.v, p["nose_w"] * _F(0.42), ny + 1.6, p["nose_w"] * _F(0.3),
                     _F(1.1), iw)
    n.D *= 1 - _F(0.75) * nm

    # --- age: forehead lines, nasolabial folds ---------------------------------------------------
    if "fore" in box:
        f = _View(box["fore"], adu=adu, v=v, face=face, D=D)
        fv = f.v * _F(1 / 3.2)
        tri = np.abs(fv - np.floor(fv) - _F(0.5))  # triangle wave: 0 on the lines
        fore = _ramp(ey - p["brow_gap"] - 4 - f.v, iw) * _ramp(18 - f.adu, iw)
        f.D *= 1 - _clip(1 - tri * _F(5.0), 0, 1) * fore * (p["wrinkle"] * f.face)
        f = _View(box["fold"], adu=adu, v=v, face=face, D=D)
        xf = p["nose_w"] + 2 + (f.v - ny) * _F(0.35)  # from the nose wing outwards and down
        fold = (_clip(1 - np.abs(f.adu - xf) * _F(0.8), 0, 1)
                * _ramp(f.v - ny + 1, iw) * _ramp(my + 6 - f.v, iw))
        f.D *= 1 - fold * (_F(0.8) * p["wrinkle"] * f.face)

    # --- beard / moustache ------------------------------------------------------------------------
    if "beard" in box:
        b = _View(box["beard"], A=A, du0=du0, adu=adu, v=v, face=face, skin=skin,
                  hair_tex=hair_tex)
        bt = p["beard_top"] - _F(0.012) * b.du0 * b.du0
        bm = _ramp(b.v - bt, iw * _F(0.5)) * b.face * p["beard"]
        mous = (_ramp(b.v - ny - 2.5, iw) * _ramp(my - b.v, iw)
                * _ramp(p["mouth_w"] + 2 - b.adu, iw) * p["moustache"])
        bm = np.maximum(bm, mous) * _clip(_F(0.75) + _F(0.4) * b.hair_tex, 0, 1)
        _lerp(b.A, bm, hair_col(b.hair_tex))
        b.skin *= 1 - bm

    # --- mouth: lips, opening with teeth, crease --------------------------------------------------
    m = _View(box["mouth"], A=A, du0=du0, v=v, h=h, D=D, skin=skin)
    m.h += _F(1.8) * _bump(m.du0, m.v, 0, my, p["mouth_w"] + 2, _F(6.0))
    tm = m.du0 / p["mouth_w"]
    tt = tm * tm
    tm2 = _clip(tt, -_INF, _F(1.5))
    inside = _clip(1 - tm2, 0, 1)
    line = my - p["smile"] * tm2 * _F(3.0) + p["smile"] * _F(0.8)  # mouth line, corners up
    gap = p["open"] * inside * _F(5.0)
    upper = line - p["lip_u"] * inside * (1 - _F(0.25) * _clip(1 - tm2 * 12, 0, 1))
    lips = _band(m.v, upper, line + gap + p["lip_l"] * inside, iw) * _ramp(1 - tm2,
                                                                             iw * p["mouth_w"])
    _lerp(m.A, lips, rgb("lip"))
    m.skin *= 1 - lips
    opening = _band(m.v, line, line + gap, iw)
    teeth = _ramp(line + gap * _F(0.45) - m.v, iw)
    _lerp(m.A, opening, (_F(0.04) + _F(0.5) * teeth[:, None]))
    m.h -= p["open"] * _F(2.0) * opening
    # (uncapped tm^2 here: with the cap the crease would never end sideways below ~40 px)
    crease = _clip(1 - np.abs(m.v - line) * iw * _F(0.8), 0, 1) * _ramp(1.1 - tt, iw * 4)
    m.D *= 1 - _F(0.65) * crease

    # --- eyes (sockets, lens-shaped opening, sclera, iris, pupil, lashes, bags) and brows --------
    # Both eyes at once in |du0| (mirror symmetric; tilt and taper mirror too, gaze does not).
    e = _View(box["eyes"], A=A, du0=du0, adu=adu, v=v, h=h, D=D, skin=skin, face=face,
              hair_tex=hair_tex)
    e.h -= p["socket"] * _bump(e.adu, e.v, p["eye_dx"], ey - 1, _F(9.0), _F(6.5))
    e.h += _F(1.2) * _bump(e.adu, e.v, p["eye_dx"], ey - p["brow_gap"], _F(11.0), _F(3.5))
    e.D *= 1 - _bump(e.adu, e.v, p["eye_dx"], ey + 5, _F(6.0), _F(2.2)) * (
        _F(0.6) * p["wrinkle"] * e.face)
    te = (e.adu - p["eye_dx"]) / p["eye_w"]  # -1 inner corner, +1 outer corner
    lens = _clip(1 - te * te, 0, 1)
    cyl = ey + p["eye_tilt"] * te
    top = cyl - p["eye_h"] * lens
    eye = _band(e.v, top, cyl + p["eye_h"] * _F(0.8) * lens, iw)
    _lerp(e.A, eye, rgb("sclera"))
    gaze = np.where(e.du0 < 0, -p["gaze_x"], p["gaze_x"])  # |du0| of the iris centre moves
    ir, r2 = _ellipse(e.adu - gaze, e.v, p["eye_dx"], ey + p["gaze_y"], p["iris_rad"],
                      p["iris_rad"], iw)
    _lerp(e.A, ir * eye, rgb("iris"))
    pupil = _ramp((_F(0.2) - r2) * (p["iris_rad"] * _F(0.45)), iw)  # r < 0.45 iris
    lash = (_clip(1 - np.abs(e.v - top + 0.3) * iw * _F(0.7), 0, 1)
            * _ramp(1.15 - np.abs(te), iw * p["eye_w"]))
    e.D *= (1 - _F(0.9) * pupil * eye) * (1 - p["lash"] * lash)
    e.skin *= 1 - np.maximum(eye, lash)
    # brows: an arch above each eye, thicker at the inner end
    tb = (e.adu - (p["eye_dx"] + _F(1.0))) / p["brow_len"]
    tb2 = tb * tb
    bc = ey - p["brow_gap"] - p["brow_raise"] - p["brow_arch"] * _clip(1 - tb2, 0, 1)
    bth = p["brow_th"] * (1 - _F(0.35) * _clip(tb + 1, 0, 2))
    brow = (_ramp(bth - np.abs(e.v - bc), iw) * _ramp(1 - tb2, iw * p["brow_len"])
            * p["brow_dens"]) * _clip(_F(0.8) + _F(0.3) * e.hair_tex, 0, 1)
    _lerp(e.A, brow, hair_col(e.hair_tex) * _F(0.85))
    e.skin *= 1 - brow
    dark = [box[k] for k in ("nose", "mouth", "eyes", "fore", "fold") if k in box]
    rs = slice(min(b[0].start for b in dark), max(b[0].stop for b in dark))
    cs = slice(min(b[1].start for b in dark), max(b[1].stop for b in dark))
    A[..., rs, cs] *= D[:, None, rs, cs]  # (D is 1 outside those boxes)

    # --- hair over the face: cap above the hairline (jagged fringe), side locks ----------------
    hb = _View(box["hair"], A=A, du0=du0, adu=adu, v=v, skin=skin)
    hl = p["hairline"] + p["recess"] * (hb.du0 - p["part"]) ** 2 * _F(1 / 400)
    if np.any(P["fringe"] > 0):  # jag is exactly 0 without a fringe: skipping changes nothing
        fr = (hb.du0 + C0) * _F(1 / 3.0)
        hl = hl + np.abs(fr - np.floor(fr) - _F(0.5)) * (p["fringe"] * _F(4.0))  # fringe tips
    front = np.maximum(_ramp(hl - hb.v, iw),
                       _ramp(hb.adu - (p["face_w"] - p["side_cov"]), iw)
                       * _ramp(p["side_len"] - hb.v, iw)) * hair_out
    _lerp(hb.A, front, hair_rgb)
    hb.skin *= 1 - front

    # --- shading: normals from the height field; Lambert + ambient + Blinn-Phong ------------------
    k = iw * _F(0.5)  # central differences -> derivative per template unit
    gx = np.zeros_like(h)
    gy = np.zeros_like(h)
    np.subtract(h[:, :, 2:], h[:, :, :-2], out=gx[:, :, 1:-1])
    np.subtract(h[:, 2:, :], h[:, :-2, :], out=gy[:, 1:-1, :])
    gx *= k
    gy *= k
    inv = 1 / np.sqrt(gx * gx + gy * gy + 1)  # n = (-gx, -gy, 1) * inv
    ndl = (p["l_z"] - gx * p["l_x"] - gy * p["l_y"]) * inv
    fall = _clip(1 + p["l_fall"] * ((xg - C0) * p["l_x"] + (yg - C0) * p["l_y"]) * _F(1 / C0),
                   _F(0.15), _F(2.0))
    light = (p["l_amb"] + p["l_int"] * _atleast(ndl, _F(0.0)) * fall)
    spec = _atleast((p["h_z"] - gx * p["h_x"] - gy * p["h_y"]) * inv, _F(0.0))
    for _ in range(4):  # (n.h)^16
        spec *= spec
    spec *= (p["spec_k"] * p["l_int"] * skin) * fall

    # --- sensor: shot + read noise (electrons), gain, clip, gamma 2 (sqrt), 8-bit -----------------
    # Shot-noise std comes from the green channel's electron count (per-channel would cost 3x).
    g_e = (A[:, 1] * light + spec) * (p["col_g"] * p["exposure"] * p["fw"])
    sig = np.sqrt(g_e + p["read"] * p["read"]) * (p["noise"] * p["gain"] / p["fw"])
    canon = _F(CANON_AMBIENT) + _F(CANON_INTENSITY) * inv  # frontal light: n.l = n_z
    light *= p["exposure"] * p["gain"]
    spec *= p["exposure"] * p["gain"]
    # All three channels per operation ((B,3,H,W), per-image colours broadcast), quantised into
    # a channel-first uint8 scratch and interleaved once per image: casting straight into the
    # (B,H,W,3) outputs is a strided write per channel, 6x slower than a contiguous one.
    y = A * light[:, None]
    y += spec[:, None]
    y *= rgb("col")
    cam, noise = bank["camera"], np.empty_like(y)
    for b, (oy, ox) in enumerate(zip(win[6], win[7])):  # windows of the bank, read in place
        np.multiply(sig[b], cam[:, oy:oy + size, ox:ox + size], out=noise[b])
    y += noise
    A *= canon[:, None]
    scratch = np.empty(y.shape, np.uint8)
    for src, dst in ((y, out["image"]), (A, out["canonical"])):
        _quantise(src, scratch)
        for b in range(B):
            cv2.merge(tuple(scratch[b]), dst[b])
    _clip(skin, _F(0.0), _F(1.0), out=out["skin_mask"])


_CLUTTER_FIELDS = ("on", "x0", "x1", "y0", "y1", "r", "g", "b", "soft")


def _clutter(A: np.ndarray, P: dict[str, np.ndarray], t: np.ndarray, size: int) -> None:
    """Soft-edged background rectangles, each composited only inside its own box."""
    k = size / TEMPLATE
    j0 = P.pos["cl0_on"]  # the sampler writes the 5 x 9 clutter fields as one block
    n = len(_CLUTTER_FIELDS)
    assert P.keys_[j0 + n * NUM_CLUTTER - 1] == f"cl{NUM_CLUTTER - 1}_soft"
    blk = P.rows[j0:j0 + n * NUM_CLUTTER].T.reshape(-1, NUM_CLUTTER, n, 1)  # (B,K,9,1)
    on, x0, x1, y0, y1 = (blk[:, :, i] for i in range(5))
    col, soft = blk[:, :, 5:8, :, None], blk[:, :, 8]  # (B,K,3,1,1), (B,K,1)
    isoft = 1 / soft
    mx = _ramp(np.minimum(t - x0, x1 - t), isoft)  # (B,K,W)
    my = _ramp(np.minimum(t - y0, y1 - t), isoft)  # (B,K,H)
    lim = lambda a: _clip(a, 0, size).astype(int)[..., 0].tolist()
    c0, c1 = lim(np.floor((x0 - soft) * k) - 1), lim(np.ceil((x1 + soft) * k) + 2)
    r0, r1 = lim(np.floor((y0 - soft) * k) - 1), lim(np.ceil((y1 + soft) * k) + 2)
    on = (on[..., 0] > 0).tolist()
    for b in range(A.shape[0]):
        for j in range(NUM_CLUTTER):
            if not on[b][j] or c1[b][j] <= c0[b][j] or r1[b][j] <= r0[b][j]:
                continue
            rs, cs = slice(r0[b][j], r1[b][j]), slice(c0[b][j], c1[b][j])
            sub = A[b, :, rs, cs]
            sub += (my[b, j, rs, None] * mx[b, j, None, cs]) * (col[b, j] - sub)


def _quantise(y: np.ndarray, out: np.ndarray) -> None:
    """Linear light -> display uint8 with gamma 2 (sqrt, exact) and rounding, written to out."""
    _clip(y, _F(0.0), _F(1.0), out=y)
    np.sqrt(y, out=y)
    y *= _F(255.0)
    y += _F(0.5)
    out[...] = y


# ---------------------------------------------------------------------------------------------
# Light and sensor parameters that belong with the pixel model
# ---------------------------------------------------------------------------------------------

def temperature(kelvin: float) -> tuple[float, float, float]:
    """Linear RGB multipliers of light of colour temperature `kelvin` (luminance 1)."""
    i = 0
    while i < len(_TEMPS) - 2 and kelvin > _TEMPS[i + 1][0]:
        i += 1
    ks = [t[0] for t in _TEMPS]
    a = min(max((kelvin - ks[i]) / (ks[i + 1] - ks[i]), 0.0), 1.0)
    c = [(1 - a) * _TEMPS[i][j] + a * _TEMPS[i + 1][j] for j in (1, 2, 3)]
    y = 0.3 * c[0] + 0.59 * c[1] + 0.11 * c[2]
    return c[0] / y, c[1] / y, c[2] / y


def light_params(r: np.random.Generator, name: str, P: dict, noise: float) -> None:
    """Adds the light and sensor parameters of condition `name` to P.

    Every condition draws the same 16 uniforms, so the stream after them does not depend on
    the condition. Directions are in image axes: x right, y down, z towards the camera.
    """
    U = r.random(16).tolist()
    a, b = 2 * U[0] - 1, 2 * U[1] - 1
    n = math.sqrt(a * a + b * b) + 1e-6
    dx, dy = a / n, b / n  # random lateral direction (image x right, y down)
    m = 0.45 * U[2]  # sine of the light's angle from the camera axis
    inten, amb, expo, gain = 0.75 + 0.2 * U[3], 0.22 + 0.12 * U[4], 0.95 + 0.15 * U[5], 1.0
    kelvin, fall, read = 4500 + 2500 * U[8], 0.1 * U[9], 2.0 + 3.0 * U[7]
    if name == cond.LOW:
        m, inten, amb = 0.6 * U[2], 0.65 + 0.25 * U[3], 0.15 + 0.15 * U[4]
        expo, gain, read = 0.005 + 0.02 * U[5], 1.5 + 2.5 * U[10], 3.0 + 6.0 * U[7]
        kelvin, fall = 2700 + 2000 * U[8], 0.3 * U[9]
    elif name in cond.SIDE_CONDITIONS:
        j = 0.27 * (2 * U[0] - 1)
        dx, dy = {cond.SIDE_LEFT: (-1, j), cond.SIDE_RIGHT: (1, j), cond.SIDE_TOP: (j, -1),
                  cond.SIDE_BOTTOM: (j, 1)}[name]  # light comes FROM that side of the image
        n = math.sqrt(dx * dx + dy * dy)
        dx, dy = dx / n, dy / n
        m, inten, amb = 0.85 + 0.13 * U[2], 1.0 + 0.4 * U[3], 0.02 + 0.06 * U[4]
        expo, fall, kelvin = 0.9 + 0.2 * U[5], 0.35 + 0.3 * U[9], 3500 + 3500 * U[8]
    elif name == cond.OVER:
        m, inten, amb = 0.4 * U[2], 0.9 + 0.2 * U[3], 0.25 + 0.15 * U[4]
        expo, kelvin = 1.35 + 0.75 * U[5], 5000 + 3000 * U[8]
    lz = math.sqrt(1 - m * m)
    P["l_x"], P["l_y"], P["l_z"] = m * dx, m * dy, lz
    hn = math.sqrt(m * m + (lz + 1) ** 2)  # half vector between light and view (0, 0, 1)
    P["h_x"], P["h_y"], P["h_z"] = m * dx / hn, m * dy / hn, (lz + 1) / hn
    P["l_int"], P["l_amb"], P["l_fall"] = inten, amb, fall
    P["col_r"], P["col_g"], P["col_b"] = temperature(kelvin)
    P["exposure"], P["gain"], P["fw"], P["read"] = expo, gain, 3000.0 + 5000.0 * U[6], read
    P["noise"] = noise
