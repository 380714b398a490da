"""Paper A's digital preprocessing: Haar-cascade face detection, eye alignment, crop, resize.

Paper A (Maksymenko et al. 2025, "Proposed method", Fig. 1): "The digital preprocessing block
detects an object of interest (face) and aligns an image, using Haar feature-based cascade
classifiers. After that, an image is resized and normalized by the brightness values in the
range [0;1]." This module is that block, built on OpenCV's stock cascades:

  * detection: `haarcascade_frontalface_default.xml` on the grayscale image, optionally after
    CLAHE (`clahe=True`). Plain Haar loses dark faces: on `skimage.data.astronaut()` scaled to
    brightness 0.2 it still finds the face (with 15 merged detections instead of 40), at 0.15 and
    0.1 it finds nothing; on a CLAHE-equalised grayscale it finds the face down to 0.08. CLAHE is
    used for detection only; crops keep the original pixels.
  * alignment (optional, `align_eyes=True`): `haarcascade_eye.xml` inside the face box gives the
    two eye centres; the image is rotated about the face centre by the eye-line angle so the
    eyes are level, then cropped. If both eyes are not found the crop is unrotated.
  * crop: the largest detected face, grown by `margin` on every side, as a square (zero padding
    outside the image), resized to size x size, optionally scaled to float32 [0, 1].
  * no face: `no_face="center"` returns the centred largest square of the image (resized) with
    found=False; `no_face="skip"` returns (None, False) and `FaceCropped` drops such samples
    when it builds its index.

Cost: cascades are loaded lazily once per thread of each process (OpenCV's CascadeClassifier is
not safe to share between threads) and never stored on user objects, so everything here pickles.
"""

from __future__ import annotations

import math
import operator
import os
import threading
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np

FACE_CASCADE = "haarcascade_frontalface_default.xml"
EYE_CASCADE = "haarcascade_eye.xml"
NO_FACE_RULES: tuple[str, ...] = ("center", "skip")

#: CLAHE settings for the dark-image pre-step (OpenCV's customary clip limit and 8x8 tiles).
CLAHE_CLIP_LIMIT = 2.0
CLAHE_TILES = (8, 8)

#: Eye-line angles beyond this (degrees) are treated as misdetections and ignored.
MAX_EYE_ANGLE = 30.0

_LOCAL = threading.local()


def _cascade(name: str) -> cv2.CascadeClassifier:
    cache = _LOCAL.__dict__.setdefault("cascades", {})
    if name not in cache:
        path = os.path.join(cv2.data.haarcascades, name)
        clf = cv2.CascadeClassifier(path)
        if clf.empty():
            raise RuntimeError(f"cannot load the OpenCV Haar cascade {path!r}; "
                               "opencv-python(-headless) 4.x ships it under cv2.data")
        cache[name] = clf
    return cache[name]


def _clahe() -> Any:
    if not hasattr(_LOCAL, "clahe"):
        _LOCAL.clahe = cv2.createCLAHE(clipLimit=CLAHE_CLIP_LIMIT, tileGridSize=CLAHE_TILES)
    return _LOCAL.clahe


def _as_uint8(image: Any) -> np.ndarray:
    """uint8 (H, W, 3) RGB or (H, W) grey; float input must lie in [0, 1]."""
    a = np.asarray(image)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3) or 0 in a.shape:
        raise ValueError(f"image: expected (H, W, 3) RGB or (H, W) grey, got shape {a.shape}")
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.floating):
        return np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise TypeError(f"image: expected uint8 or float in [0, 1], got {a.dtype}")


def detection_gray(image: Any, *, clahe: bool = False) -> np.ndarray:
    """The uint8 grayscale image the cascades run on: RGB -> grey, then CLAHE if asked."""
    a = _as_uint8(image)
    gray = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY) if a.ndim == 3 else a
    return _clahe().apply(gray) if clahe else np.ascontiguousarray(gray)


def _default_min_size(shape) -> int:
    # A face narrower than 10% of the shorter side is not the subject of a face-dataset image;
    # skipping those scales also skips the most expensive part of the scan.
    return max(24, round(0.1 * min(shape[:2])))


def _detect(gray: np.ndarray, cascade: str, *, min_size: int, scale_factor: float,
            min_neighbors: int) -> list[dict[str, Any]]:
    boxes, neighbours = _cascade(cascade).detectMultiScale2(
        gray, scaleFactor=scale_factor, minNeighbors=min_neighbors, minSize=(min_size, min_size))
    out = [dict(box=(int(x), int(y), int(x + w), int(y + h)), score=float(n), landmarks=None)
           for (x, y, w, h), n in zip(np.reshape(boxes, (-1, 4)), np.ravel(neighbours))]
    area = lambda d: (d["box"][2] - d["box"][0]) * (d["box"][3] - d["box"][1])
    out.sort(key=lambda d: (-area(d), -d["score"], d["box"]))
    return out


def detect_faces_haar(image: Any, *, clahe: bool = False, min_size: int | None = None,
                      scale_factor: float = 1.1, min_neighbors: int = 5) -> list[dict[str, Any]]:
    """Faces found by OpenCV's frontal-face Haar cascade, largest first.

    Args:
      image: uint8 (or float in [0, 1]) RGB (H, W, 3) or grey (H, W).
      clahe: detect on a CLAHE-equalised grayscale (recovers dark faces, see module docstring).
      min_size: smallest face side in pixels; None = 10% of the shorter image side, >= 24.
      scale_factor, min_neighbors: `CascadeClassifier.detectMultiScale` parameters.

    Returns:
      [dict(box=(x1, y1, x2, y2) ints in pixels, score=float, landmarks=None)], sorted by box
      area, largest first. `score` is the number of raw detections merged into the box (>=
      min_neighbors): a confidence count, not a probability. The keys match
      `lowlight.align.detect_faces`.
    """
    gray = detection_gray(image, clahe=clahe)
    min_size = _default_min_size(gray.shape) if min_size is None else operator.index(min_size)
    return _detect(gray, FACE_CASCADE, min_size=min_size, scale_factor=scale_factor,
                   min_neighbors=min_neighbors)


def eye_angle(gray: np.ndarray, box: tuple[int, int, int, int]) -> float | None:
    """In-plane roll of a face from its eyes, in degrees, or None if it cannot be measured.

    Eyes are searched with `haarcascade_eye.xml` in the upper 60% of `box` on the detection
    grayscale; the most-supported detection in each half of the box is that side's eye. The
    angle is atan2(dy, dx) of the line from the image-left to the image-right eye (positive when
    the image-right eye is lower); None if an eye is missing or |angle| > MAX_EYE_ANGLE.
    """
    x1, y1, x2, y2 = box
    h, w = gray.shape[:2]
    x1c, y1c, x2c = max(0, x1), max(0, y1), min(w, x2)
    y2c = min(h, y1 + int(round(0.6 * (y2 - y1))))
    roi = gray[y1c:y2c, x1c:x2c]
    if roi.size == 0:
        return None
    eyes = _detect(np.ascontiguousarray(roi), EYE_CASCADE,
                   min_size=max(8, (x2 - x1) // 10), scale_factor=1.1, min_neighbors=5)
    mid = (x1 + x2) / 2 - x1c
    best: dict[str, tuple[float, float, float]] = {}
    for e in eyes:
        ex1, ey1, ex2, ey2 = e["box"]
        cx, cy = (ex1 + ex2) / 2, (ey1 + ey2) / 2
        side = "left" if cx < mid else "right"
        if side not in best or e["score"] > best[side][0]:
            best[side] = (e["score"], cx, cy)
    if len(best) < 2:
        return None
    (_, lx, ly), (_, rx, ry) = best["left"], best["right"]
    angle = math.degrees(math.atan2(ry - ly, rx - lx))
    return angle if abs(angle) <= MAX_EYE_ANGLE else None


def _fit(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return np.ascontiguousarray(image)
    interp = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interp)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The centred largest square of `image` (offset floor((H - s) / 2), floor((W - s) / 2)),
    resized to size x size."""
    h, w = image.shape[:2]
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    return _fit(image[y0:y0 + s, x0:x0 + s], size)


def crop_box(image: np.ndarray, box: tuple[int, int, int, int], *, size: int, margin: float,
             angle: float = 0.0) -> np.ndarray:
    """Square crop around `box`, grown by `margin` x box side on each side, resized to `size`.

    The square has side round(max(w, h) * (1 + 2 * margin)) and the box's centre; parts outside
    the image are zero. With `angle` != 0 the image is first rotated by `angle` degrees
    (counter-clockwise as displayed, OpenCV's convention) about the box centre, which levels an
    eye line of that angle.
    """
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    side = max(1, int(round(max(x2 - x1, y2 - y1) * (1 + 2 * margin))))
    if angle:
        rot = cv2.getRotationMatrix2D((cx, cy), angle, 1.0)
        image = cv2.warpAffine(image, rot, (image.shape[1], image.shape[0]),
                               flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    h, w = image.shape[:2]
    ox, oy = int(round(cx - side / 2)), int(round(cy - side / 2))
    out = np.zeros((side, side) + image.shape[2:], image.dtype)
    sx1, sy1, sx2, sy2 = max(0, ox), max(0, oy), min(w, ox + side), min(h, oy + side)
    if sx2 > sx1 and sy2 > sy1:
        out[sy1 - oy:sy2 - oy, sx1 - ox:sx2 - ox] = image[sy1:sy2, sx1:sx2]
    return _fit(out, size)


def crop_face(image: Any, *, size: int = 112, margin: float = 0.2, clahe: bool = False,
              no_face: str = "center", align_eyes: bool = False, as_float: bool = False,
              min_size: int | None = None, scale_factor: float = 1.1,
              min_neighbors: int = 5) -> tuple[np.ndarray | None, bool]:
    """Paper A's preprocessing of one image: detect, (align), crop, resize, (scale to [0, 1]).

    Args:
      image: uint8 (or float in [0, 1]) RGB (H, W, 3).
      size: output side in pixels.
      margin: fraction of the face box side added on each side (0.2 -> crop 1.4x the box).
      clahe: detect on CLAHE-equalised grayscale (for dark images).
      no_face: "center" -> centre crop (see `center_crop`), found=False; "skip" -> (None, False).
      align_eyes: level the eye line before cropping (see `eye_angle`, `crop_box`).
      as_float: return float32 in [0, 1] (paper A's normalisation) instead of uint8.
      min_size, scale_factor, min_neighbors: see `detect_faces_haar`.

    Returns:
      (crop (size, size, 3) uint8 or float32, or None; found), found = a face was detected.
      The largest face wins when there are several.
    """
    if no_face not in NO_FACE_RULES:
        raise ValueError(f"no_face: expected one of {NO_FACE_RULES}, got {no_face!r}")
    size = operator.index(size)
    if size <= 0 or margin < 0:
        raise ValueError(f"size must be positive and margin non-negative, got {size}, {margin}")
    rgb = _as_uint8(image)
    if rgb.ndim != 3:
        raise ValueError(f"image: expected (H, W, 3) RGB, got shape {rgb.shape}")
    gray = detection_gray(rgb, clahe=clahe)
    min_size = _default_min_size(gray.shape) if min_size is None else operator.index(min_size)
    faces = _detect(gray, FACE_CASCADE, min_size=min_size, scale_factor=scale_factor,
                    min_neighbors=min_neighbors)
    if faces:
        box = faces[0]["box"]
        angle = (eye_angle(gray, box) or 0.0) if align_eyes else 0.0
        crop = crop_box(rgb, box, size=size, margin=margin, angle=angle)
    elif no_face == "skip":
        return None, False
    else:
        crop = center_crop(rgb, size)
    if as_float:
        crop = crop.astype(np.float32) / np.float32(255.0)
    return crop, bool(faces)


class FaceCropped:
    """Applies `crop_face` to every item of a random-access source of dicts with an 'image'.

    Items keep the source's other keys and gain `face_found` (bool). No-face rule:
      * no_face="center" (default): lazy; a faceless image becomes its centre crop. `stats`
        counts, in this process, the distinct indices read and those without a face.
      * no_face="skip": the whole source is scanned once at construction (one detection per
        item) and only items with a face are kept, so `len()` and `ds[i]` stay deterministic —
        samples are never dropped at access time. `stats` holds the scan's counts and the
        skipped source indices; `source_indices` maps each kept item to the source.
    Picklable (no OpenCV objects are stored) and deterministic per index.

    Args:
      source: random-access source (`len`, `[i]` -> dict with 'image').
      **crop_opts: `crop_face` options (size, margin, clahe, no_face, align_eyes, as_float, ...).
    """

    def __init__(self, source: Any, **crop_opts: Any):
        if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
            raise TypeError(f"source: expected a random-access source with __len__ and "
                            f"__getitem__, got {type(source).__name__}")
        self.source = source
        self.crop_opts = dict(crop_opts)
        self.no_face = self.crop_opts.get("no_face", "center")
        crop_face(np.zeros((8, 8, 3), np.uint8), **self.crop_opts)  # validate options now
        self._seen: set[int] = set()
        self._no_face: set[int] = set()
        if self.no_face == "skip":
            keep = []
            for i in range(len(source)):
                _, found = crop_face(self._item(i)["image"], **self.crop_opts)
                if found:
                    keep.append(i)
                else:
                    self._no_face.add(i)
            self.source_indices = np.asarray(keep, np.int64)
            self._seen = set(range(len(source)))
        else:
            self.source_indices = None

    def _item(self, i: int) -> dict[str, Any]:
        item = self.source[i]
        if not isinstance(item, Mapping) or "image" not in item:
            raise TypeError(f"source[{i}]: expected a dict with an 'image' key, got "
                            f"{type(item).__name__}")
        return dict(item)

    @property
    def stats(self) -> dict[str, Any]:
        """{"seen": distinct source indices examined, "no_face": how many had no face,
        "no_face_indices": their sorted source indices} (this process only)."""
        return {"seen": len(self._seen), "no_face": len(self._no_face),
                "no_face_indices": sorted(self._no_face)}

    def __len__(self) -> int:
        return len(self.source) if self.source_indices is None else len(self.source_indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = operator.index(i)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for FaceCropped of length {n}")
        i %= n
        j = i if self.source_indices is None else int(self.source_indices[i])
        item = self._item(j)
        crop, found = crop_face(item["image"], **self.crop_opts)
        if crop is None:  # the scan found a face; a source that changed under us did not
            raise RuntimeError(f"source[{j}]: no face found at access, although the index "
                               "scan found one; is the source deterministic?")
        self._seen.add(j)
        if not found:
            self._no_face.add(j)
        item["image"], item["face_found"] = crop, found
        return item

    def __repr__(self) -> str:
        return f"FaceCropped(len={len(self)}, no_face={self.no_face!r}, stats={self.stats})"
