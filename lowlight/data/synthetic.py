"""The synthetic face world: lowlight's embedded default dataset, rendered procedurally.

Why it exists: every model in the project (recognition, attributes, lighting classifier,
relighting, skin segmentation) needs labelled faces, and a fresh machine can download none. So
`SynthFaces` *renders* people with full ground truth — identity, age, gender, ethnicity, five
ArcFace-order landmarks, a skin mask, the same face under canonical light, and the lighting
condition — from nothing but integers.

What the world is:
  * A person is a random code derived only from (seed, identity): face outline and jaw; eye, brow,
    nose and mouth geometry; skin albedo and pores; hair style and colour; beard. Attributes
    shape the code: age (1-100) changes proportions (children: big forehead, small nose, low mouth),
    wrinkles and greying; gender changes jaw, brows, hair and beard; ethnicity shifts the priors of
    albedo, nose, lips and eyes (priors overlap, as real populations do). A fraction of people
    (`lookalike_rate`) are mixed from an earlier person's code: different identities that look
    alike, which keeps verification honest.
  * An image of a person adds nuisance derived from (seed, identity, image): roll and yaw (a
    warp about a head cylinder), scale and offset jitter around the ArcFace template, expression
    (smile, open mouth, brow raise, squint/blink, gaze), a small age drift, clothes and a cluttered
    background.
  * Light is physically motivated: normals from the face height field, Lambertian + ambient +
    Blinn-Phong shading from a light direction with intensity, spatial falloff and colour
    temperature, then a sensor (shot + read noise in electrons, gain, clipping, gamma, 8-bit
    quantisation). Conditions follow `lowlight.data.conditions`: normal (frontal-ish, moderate),
    low (dim, few photons, so stronger noise), side_left/right/top/bottom (strong light *from* that
    side of the image, e.g. side_left = light comes from the image's left, whose half is brighter,
    the opposite half dark), over (very bright, clipped). `canonical` is the same face, pose,
    expression and background under frontal neutral white light without noise: the relighting
    target.

Determinism: every random draw comes from `np.random.default_rng([salt, seed, stream, identity,
image, ...])` (no global state, no salted `hash()`), pixels use only correctly rounded float
operations (see `_render`), and the boxes that limit where small features are computed contain
each feature's whole support at every size (see `_faces`), so sample i of a spec is bit-identical
in any process, worker or machine, and identical whether rendered alone or inside any batch.

Speed: `render_batch` renders many faces in one vectorised pass (see tools/bench_synth.py);
`ds[i]` is `render_batch([i])`. Construction is free; the noise bank is built lazily per size.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lowlight.data import _faces, _render
from lowlight.data import conditions as cond
from lowlight.data._faces import clip as _clip
from lowlight.data._faces import pick as _pick

VERSION = "synthfaces-v1"  # bump when a change alters pixels of an existing spec

#: insightface's arcface_dst at 112x112: left eye, right eye, nose tip, left/right mouth corner.
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)
ETHNICITIES = ("White", "Black", "Asian", "Indian", "Others")  # UTKFace coding
GENDERS = ("male", "female")

#: Default lighting mix: normal light is common, every condition appears.
DEFAULT_CONDITION_WEIGHTS: dict[str, float] = {
    cond.NORMAL: 0.40, cond.LOW: 0.15, cond.SIDE_LEFT: 0.10, cond.SIDE_RIGHT: 0.10,
    cond.SIDE_TOP: 0.05, cond.SIDE_BOTTOM: 0.05, cond.OVER: 0.15}

#: Keyword-only options of SynthFaces and their defaults.
OPTIONS: dict[str, Any] = {
    "condition_weights": None,  # mapping condition -> weight (missing = 0); None = default mix
    "conditions": None,  # restrict to these condition names (weights renormalised)
    "noise": 1.0,  # sensor-noise multiplier (0 = noiseless, still quantised)
    "pose_jitter": 1.0,  # multiplier on roll/yaw/scale/offset spread
    "expression_jitter": 1.0,  # multiplier on smile/open mouth/brows/eyes/gaze spread
    "age_drift": 2,  # +- years an image's age may differ from the person's
    "clutter": True,  # background rectangles on/off
    "lookalike_rate": 0.25,  # fraction of people mixed from an earlier person's code
}

_SALT = 0x5F4CE
_S_BASE, _S_LOOK, _S_IMAGE, _S_PAIRS = range(4)
_NZ, _NW = 40, 16
_CHUNK_PIXELS = 4 * 112 * 112  # pixels per vectorised pass: amortises calls, stays in cache
_CHUNK_IMAGES = 12  # ... and at most this many images: a chunk's feature boxes are the union of
# its images' boxes, so they grow with the images per pass. (Measured, 256-image batches on one
# core: 12 images per pass beat 49 at 32 px by ~8%, 31 at 40 px by ~20%, 21 at 48 px by ~10%.)
_ETH_PROBS = (0.42, 0.19, 0.14, 0.17, 0.08)  # roughly UTKFace's mix


def _chunk_size(size: int) -> int:
    """Images per vectorised pass of the renderer at `size` (any value gives the same pixels)."""
    return max(1, min(_CHUNK_IMAGES, _CHUNK_PIXELS // (size * size)))


# ---------------------------------------------------------------------------------------------
# Random streams (exact arithmetic only: no libm, so draws are identical on every machine)
# ---------------------------------------------------------------------------------------------

def _rng(*key: int) -> np.random.Generator:
    key = (_SALT, *key)
    # A uint32 array is the same entropy as the list of ints (each below 2**32 is one word)
    # and seeds 2.5x faster; larger ints keep the list (SeedSequence splits them into words).
    if 0 <= min(key) and max(key) < 1 << 32:
        return np.random.Generator(np.random.PCG64(np.array(key, np.uint32)))
    return np.random.default_rng(list(key))


def _gauss(r: np.random.Generator, n: int) -> list[float]:
    """n unit-variance near-Gaussian draws (Irwin-Hall: sum of 4 uniforms), bounded by +-3.46."""
    return ((r.random((n, 4)).sum(1) - 2.0) * math.sqrt(3.0)).tolist()


@functools.lru_cache(maxsize=8192)
def _base(seed: int, identity: int):
    r = _rng(seed, _S_BASE, identity)
    z, w = _gauss(r, _NZ), r.random(_NW).tolist()
    gender, eth = int(w[0] < 0.5), _pick(w[1], _ETH_PROBS)
    if w[2] < 0.12:
        age = 1 + int(w[3] * 15)
    elif w[2] < 0.75:
        age = 16 + int(w[3] * 30)
    else:
        age = 46 + int(w[3] * w[3] * 52)
    return z, w, gender, eth, age


@functools.lru_cache(maxsize=8192)
def _person(seed: int, identity: int, lookalike_rate: float):
    """(z, w, gender, ethnicity, base age, lookalike-of or -1) of a person."""
    z, w, gender, eth, age = _base(seed, identity)
    x = _rng(seed, _S_LOOK, identity).random(4 + _NW).tolist()
    if identity > 0 and x[0] < lookalike_rate:
        target = identity - 1 - int(x[1] * min(identity, 64))
        tz, tw, gender, eth, tage = _base(seed, target)
        rho = 0.80 + 0.12 * x[2]
        q = math.sqrt(1 - rho * rho)
        z = [rho * a + q * b for a, b in zip(tz, z)]
        w = [b if xi < 0.85 else a for a, b, xi in zip(w, tw, x[4:])]
        age = _clip(tage + int(x[3] * 17) - 8, 1, 100)
        return z, w, gender, eth, age, target
    return z, w, gender, eth, age, -1


# ---------------------------------------------------------------------------------------------
# Per-sample parameters (the face itself: lowlight.data._faces)
# ---------------------------------------------------------------------------------------------

def _nuisance(r: np.random.Generator, P: dict, o: Mapping, clutter: bool) -> tuple[int, float]:
    """Adds per-image pose / expression / background parameters to P.

    Returns (age offset in years, eye-openness factor), which the face parameters need.
    """
    G, U = _gauss(r, 16), r.random(64).tolist()
    pj, ej = o["pose_jitter"], o["expression_jitter"]
    for name, t in (("roll", _clip(0.055 * G[0] * pj, -0.35, 0.35)),
                    ("yaw", _clip(0.09 * G[1] * pj, -0.27, 0.27))):
        P[name + "_c"], P[name + "_s"] = (1 - t * t) / (1 + t * t), 2 * t / (1 + t * t)
    P["scale"] = _clip(1.0 + 0.04 * G[2] * pj, 0.8, 1.2)
    P["off_x"], P["off_y"] = 2.0 * G[3] * pj, 2.0 * G[4] * pj
    smile = _clip(0.45 * G[5] * ej, 0.0, 1.0)
    P["smile"], P["open"] = smile, _clip(0.35 * (G[6] - 0.8) * ej, 0.0, 0.9)
    P["brow_raise"] = 0.7 * G[7] * ej
    eye_open = _clip(1.0 - 0.12 * abs(G[8]) * ej, 0.3, 1.1) * (1 - 0.15 * smile)
    if U[0] < 0.03 * ej:
        eye_open = 0.15  # blink
    P["gaze_x"], P["gaze_y"] = 0.6 * G[9] * ej, 0.3 * G[10] * ej
    lum = 0.06 + 0.45 * U[2]
    P["bg_r"], P["bg_g"], P["bg_b"] = (min(0.9, lum * (0.5 + U[k])) for k in (3, 4, 5))
    P["bg_grad"], P["bg_tex"] = 0.4 * (U[6] - 0.5), 0.1 + 0.25 * U[7]
    P["bg_ox"], P["bg_oy"] = U[8], U[9]
    for k in range(_render.NUM_CLUTTER):
        V = U[10 + 8 * k: 18 + 8 * k]
        x0, y0 = V[0] * 132 - 30, V[1] * 132 - 30
        P[f"cl{k}_on"] = float(clutter and V[2] < 0.6)
        P[f"cl{k}_x0"], P[f"cl{k}_x1"] = x0, x0 + 8 + 50 * V[3]
        P[f"cl{k}_y0"], P[f"cl{k}_y1"] = y0, y0 + 8 + 60 * V[4]
        lum_k = 0.04 + 0.6 * V[5]
        P[f"cl{k}_r"], P[f"cl{k}_g"], P[f"cl{k}_b"] = (
            lum_k * (0.4 + V[6]), lum_k * (0.4 + V[7]), lum_k * (0.4 + V[5] * V[6]))
        P[f"cl{k}_soft"] = 0.5 + 3.0 * V[3] * V[7]  # (fields in _render._CLUTTER_FIELDS order)
    cl = 0.02 + 0.5 * U[50] * U[50]
    P["cloth_r"], P["cloth_g"], P["cloth_b"] = (cl * (0.3 + U[k]) for k in (51, 52, 53))
    P["cloth_y"] = 118.0 + 4.0 * G[11]
    P["n_ox"], P["n_oy"] = U[54], U[55]
    d = o["age_drift"]
    return int(U[1] * (2 * d + 1)) - d, eye_open


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------

def _nonneg_int(key: str, value: Any, lo: int = 0, hi: int | None = None) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{key}: expected an integer, got {value!r}") from None
    if v < lo or (hi is not None and v > hi):
        rng_txt = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{key}: expected an integer {rng_txt}, got {v}")
    return v


def _real(key: str, value: Any, lo: float, hi: float) -> float:
    try:
        if isinstance(value, bool):
            raise TypeError
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}: expected a number, got {value!r}") from None
    if not (math.isfinite(v) and lo <= v <= hi):
        raise ValueError(f"{key}: expected a number in [{lo}, {hi}], got {value!r}")
    return v


def _resolve_options(more: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(more) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown SynthFaces option {unknown[0]!r}; valid: {', '.join(OPTIONS)}")
    o = {**OPTIONS, **more}
    weights = o["condition_weights"]
    if weights is None:
        weights = DEFAULT_CONDITION_WEIGHTS
    if not isinstance(weights, Mapping):
        raise ValueError(f"condition_weights: expected a mapping condition -> weight, got "
                         f"{type(weights).__name__}")
    for k in weights:
        if k not in cond.CONDITIONS:
            raise ValueError(f"condition_weights: unknown condition {k!r}; valid: "
                             f"{', '.join(cond.CONDITIONS)}")
    w = {c: _real(f"condition_weights[{c!r}]", weights.get(c, 0.0), 0.0, 1e12)
         for c in cond.CONDITIONS}
    allowed = o["conditions"]
    if allowed is None:
        allowed = cond.CONDITIONS
    elif isinstance(allowed, str):
        allowed = (allowed,)
    allowed = tuple(allowed)
    for c in allowed:
        if c not in cond.CONDITIONS:
            raise ValueError(f"conditions: unknown condition {c!r}; valid: "
                             f"{', '.join(cond.CONDITIONS)}")
    total = sum(w[c] for c in allowed)
    if not allowed or total <= 0:
        raise ValueError(f"conditions / condition_weights: no allowed condition has a positive "
                         f"weight (conditions={allowed}, condition_weights={w})")
    o["condition_weights"] = w
    o["conditions"] = tuple(c for c in cond.CONDITIONS if c in allowed)
    o["noise"] = _real("noise", o["noise"], 0.0, 100.0)
    o["pose_jitter"] = _real("pose_jitter", o["pose_jitter"], 0.0, 5.0)
    o["expression_jitter"] = _real("expression_jitter", o["expression_jitter"], 0.0, 5.0)
    o["age_drift"] = _nonneg_int("age_drift", o["age_drift"], 0, 30)
    if not isinstance(o["clutter"], (bool, np.bool_)):
        raise ValueError(f"clutter: expected True or False, got {o['clutter']!r}")
    o["clutter"] = bool(o["clutter"])
    o["lookalike_rate"] = _real("lookalike_rate", o["lookalike_rate"], 0.0, 1.0)
    return o


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------

class SynthFaces:
    """Procedurally rendered faces with ground truth; a grain random-access source.

    Sample i shows person `i // images_per_identity` (its `image_idx = i % images_per_identity`).
    Items are dicts: image uint8 (H,W,3) RGB; skin_mask float32 (H,W) in [0,1]; canonical uint8
    (H,W,3) (same face under canonical frontal light, no noise); landmarks float32 (5,2) (x, y)
    pixels in ArcFace order (left eye, right eye, nose tip, left/right mouth corner; left = image
    left); identity, age (1-100), gender (0 male, 1 female), ethnicity (0 White, 1 Black, 2 Asian,
    3 Indian, 4 Others) ints; condition str (a name in `conditions.CONDITIONS`); condition_id int.

    Args:
      seed: world seed (>= 0); people are functions of (seed, identity).
      num_identities: number of people.
      images_per_identity: images per person.
      size: output side in pixels (>= 32); geometry is resolution independent.
      **more: keyword-only options (see `OPTIONS`): condition_weights (mapping condition ->
        weight, missing = 0, default `DEFAULT_CONDITION_WEIGHTS`), conditions (restrict to these
        names), noise (sensor-noise multiplier, 1.0), pose_jitter (1.0), expression_jitter
        (1.0), age_drift (years, 2), clutter (background clutter, True), lookalike_rate (0.25).

    Raises:
      ValueError: naming the bad key and the valid choices.
    """

    def __init__(self, seed: int = 0, num_identities: int = 1000, images_per_identity: int = 10,
                 size: int = 112, **more: Any):
        self.seed = _nonneg_int("seed", seed)
        self.num_identities = _nonneg_int("num_identities", num_identities, 1)
        self.images_per_identity = _nonneg_int("images_per_identity", images_per_identity, 1)
        self.size = _nonneg_int("size", size, 32, 1024)
        self.options = _resolve_options(more)
        o = self.options
        w = np.array([o["condition_weights"][c] if c in o["conditions"] else 0.0
                      for c in cond.CONDITIONS])
        self._cum = np.cumsum(w) / w.sum()

    # -- description ------------------------------------------------------------------------
    @property
    def spec(self) -> dict[str, Any]:
        """Everything that defines the dataset (JSON-friendly); `SynthFaces.from_spec` inverts."""
        o = self.options
        return {"version": VERSION, "seed": self.seed, "num_identities": self.num_identities,
                "images_per_identity": self.images_per_identity, "size": self.size,
                **{k: (dict(o[k]) if k == "condition_weights" else
                       list(o[k]) if k == "conditions" else o[k]) for k in OPTIONS}}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> SynthFaces:
        """Rebuilds a dataset from `spec` (refusing a spec written by another renderer version)."""
        spec = dict(spec)
        version = spec.pop("version", VERSION)
        if version != VERSION:
            raise ValueError(f"version: spec is for {version!r}, this renderer is {VERSION!r}")
        return cls(**spec)

    def __repr__(self) -> str:
        return (f"SynthFaces(seed={self.seed}, num_identities={self.num_identities}, "
                f"images_per_identity={self.images_per_identity}, size={self.size})")

    def __len__(self) -> int:
        return self.num_identities * self.images_per_identity

    # -- per-person and per-sample parameters ------------------------------------------------
    def identity_attributes(self, identity: int) -> dict[str, int]:
        """gender, ethnicity, base age and lookalike_of (-1 if none) of a person."""
        _, _, gender, eth, age, target = _person(self.seed, int(identity),
                                                 self.options["lookalike_rate"])
        return {"gender": gender, "ethnicity": eth, "age": age, "lookalike_of": target}

    def condition_of(self, index: int) -> str:
        """The lighting condition sample `index` is rendered under (cheap: no rendering)."""
        identity, image = divmod(self._check_index(index), self.images_per_identity)
        return self._condition(_rng(self.seed, _S_IMAGE, identity, image).random())

    def _condition(self, u: float) -> str:
        return cond.CONDITIONS[int(min(np.searchsorted(self._cum, u, side="right"),
                                       len(cond.CONDITIONS) - 1))]

    def _check_index(self, index: Any) -> int:
        i = operator.index(index)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for SynthFaces of length {n}")
        return i % n

    def _sample(self, index: int, condition: str | None):
        o = self.options
        identity, image = divmod(index, self.images_per_identity)
        z, w, gender, eth, base_age, _ = _person(self.seed, identity, o["lookalike_rate"])
        # One stream per image, drawn in a fixed order: condition, nuisance, light. The light
        # uses the same uniforms whatever the condition, so overriding the condition changes
        # nothing else.
        r = _rng(self.seed, _S_IMAGE, identity, image)
        u_cond = r.random()
        # the face depends on the image's age, which comes from the nuisance draw
        N = {}
        drift, eye_open = _nuisance(r, N, o, o["clutter"])
        age = _clip(base_age + drift, 1, 100)
        P = _faces.face_params(z, w, gender, eth, age, base_age)
        P.update(N)
        P["eye_h"] *= eye_open
        P["gaze_x"] *= P["eye_w"] / 5.6
        P["neck_w"] = 0.55 * P["face_w"]
        name = condition if condition is not None else self._condition(u_cond)
        _render.light_params(r, name, P, o["noise"])
        lm = _faces.project(P)
        attrs = (identity, age, gender, eth, name)
        return P, lm, attrs

    # -- rendering ------------------------------------------------------------------------------
    def render_batch(self, indices: Sequence[int] | np.ndarray,
                     condition: str | Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Renders samples `indices` in vectorised passes; the fast path.

        Args:
          indices: sample indices (negative ones count from the end).
          condition: optional override — one condition name for all, or one per index. Only the
            light changes: face, pose, expression, background, mask, landmarks and canonical
            are those of the sample under its own condition.

        Returns:
          dict of stacked arrays: image (B,H,W,3) uint8, canonical (B,H,W,3) uint8, skin_mask
          (B,H,W) float32, landmarks (B,5,2) float32, identity / age / gender / ethnicity /
          condition_id (B,) int64, condition (B,) str.
        """
        idx = [self._check_index(i) for i in np.asarray(indices).reshape(-1)]
        if condition is None or isinstance(condition, str):
            conds = [condition] * len(idx)
        else:
            conds = list(condition)
            if len(conds) != len(idx):
                raise ValueError(f"condition: expected {len(idx)} names, got {len(conds)}")
        for c in conds:
            if c is not None:
                cond.check(c)
        samples = [self._sample(i, c) for i, c in zip(idx, conds)]
        n, hw = len(idx), (self.size, self.size)
        res = {"image": np.empty((n, *hw, 3), np.uint8),
               "canonical": np.empty((n, *hw, 3), np.uint8),
               "skin_mask": np.empty((n, *hw), np.float32)}
        if n:
            keys = list(samples[0][0])
            M = np.array([[p[k] for k in keys] for p, _, _ in samples], np.float32)
            _render.render(keys, M, self.size, chunk=_chunk_size(self.size),
                           clutter=self.options["clutter"], out=res)
        lm = np.array([lm for _, lm, _ in samples], np.float64).reshape(n, 5, 2)
        res["landmarks"] = (lm * (self.size / _render.TEMPLATE)).astype(np.float32)
        for j, key in enumerate(("identity", "age", "gender", "ethnicity")):
            res[key] = np.array([a[j] for _, _, a in samples], np.int64)
        names = [a[4] for _, _, a in samples]
        res["condition"] = np.array(names, dtype="<U16")
        res["condition_id"] = np.array([cond.index(c) for c in names], np.int64)
        return res

    def __getitem__(self, index: int) -> dict[str, Any]:
        b = self.render_batch([self._check_index(index)])
        item = {k: v[0] for k, v in b.items()}
        for k in ("identity", "age", "gender", "ethnicity", "condition_id"):
            item[k] = int(item[k])
        item["condition"] = str(item["condition"])
        return item


# ---------------------------------------------------------------------------------------------
# Verification pairs
# ---------------------------------------------------------------------------------------------

def _world(ds: Any) -> SynthFaces:
    """The SynthFaces under `ds` (index-preserving wrappers expose theirs as `.source`)."""
    seen = 0
    while not isinstance(ds, SynthFaces):
        if not hasattr(ds, "source") or seen > 16:
            raise TypeError(f"verification_pairs: expected SynthFaces or a wrapper of it (with "
                            f".source), got {type(ds).__name__}")
        ds, seen = ds.source, seen + 1
    return ds


def verification_pairs(ds: Any, num_pairs: int, seed: int = 0, *,
                       hard_negatives: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic same/different-person pairs of sample indices of `ds`.

    Half the pairs are positives (two different images of one person), half negatives (two
    people; with `num_pairs` odd the extra pair is negative). A fraction `hard_negatives` of the
    negatives are hard: the second person is the first's lookalike source when it is in the
    dataset, else a person of the same gender and ethnicity. Pair order is shuffled so that
    contiguous folds (insightface's 10-fold protocol) mix both kinds.

    Args:
      ds: a SynthFaces, or an index-preserving wrapper of one (reached through `.source`).
      num_pairs: number of pairs (>= 2).
      seed: pair-sampling seed (independent of the world's seed).
      hard_negatives: fraction of negatives that are hard, in [0, 1].

    Returns:
      (idx1 int64 (N,), idx2 int64 (N,), issame bool (N,)).
    """
    world = _world(ds)
    num_pairs = _nonneg_int("num_pairs", num_pairs, 2)
    seed = _nonneg_int("seed", seed)
    hard_negatives = _real("hard_negatives", hard_negatives, 0.0, 1.0)
    n_id, ipi = world.num_identities, world.images_per_identity
    if ipi < 2 or n_id < 2:
        raise ValueError(f"verification_pairs needs >= 2 identities and >= 2 images per "
                         f"identity, got {n_id} and {ipi}")
    r = _rng(_S_PAIRS, seed, world.seed, n_id, ipi)
    n_pos = num_pairs // 2
    n_neg = num_pairs - n_pos
    pid = r.integers(0, n_id, n_pos)
    a = r.integers(0, ipi, n_pos)
    b = (a + 1 + r.integers(0, ipi - 1, n_pos)) % ipi
    attrs = [world.identity_attributes(i) for i in range(n_id)]
    groups: dict[tuple[int, int], list[int]] = {}
    for i, at in enumerate(attrs):
        groups.setdefault((at["gender"], at["ethnicity"]), []).append(i)
    id1 = r.integers(0, n_id, n_neg)
    hard = r.random(n_neg) < hard_negatives
    pick, other = r.random(n_neg), r.integers(0, n_id - 1, n_neg)
    id2 = np.empty(n_neg, np.int64)
    for k in range(n_neg):
        i = int(id1[k])
        look = attrs[i]["lookalike_of"]
        group = groups[(attrs[i]["gender"], attrs[i]["ethnicity"])]
        if hard[k] and 0 <= look < n_id and pick[k] < 0.5:
            id2[k] = look
        elif hard[k] and len(group) > 1:
            j = group[int(pick[k] * (len(group) - 1))]
            id2[k] = j if j != i else group[-1]
        else:
            id2[k] = (i + 1 + other[k]) % n_id
    na, nb = r.integers(0, ipi, n_neg), r.integers(0, ipi, n_neg)
    idx1 = np.concatenate([pid * ipi + a, id1 * ipi + na]).astype(np.int64)
    idx2 = np.concatenate([pid * ipi + b, id2 * ipi + nb]).astype(np.int64)
    issame = np.concatenate([np.ones(n_pos, bool), np.zeros(n_neg, bool)])
    order = r.permutation(num_pairs)
    return idx1[order], idx2[order], issame[order]
