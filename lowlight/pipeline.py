"""End-to-end inference: photo → faces → lighting, attributes, skin and identity (issue 8 §2).

    detect → align → (lighting classifier → route to the attribute model for that light)
           → (relight) → (skin mask) → embed

Every stage after detection is optional and is a trained run directory (`PipelineConfig`), its
model rebuilt from the run's config and loaded from its latest checkpoint
(`lowlight.inference.runs`). Each stage sees faces prepared as its task trained: aligned onto
the ArcFace template at that run's image size (the synthetic world renders faces on that
template, so a detected-and-aligned photo matches the training framing), uint8 → [-1, 1] on
device. All faces of a batch of images go through a stage in one jitted call per fixed-size
batch (padded, so nothing recompiles when the face count changes).

Order and what sees what:
  * the lighting classifier and the attribute models see the aligned face as photographed —
    paper A routes by the light of the input, and its experts trained on unrelit faces;
  * the relighting run (paper B §3.4), if given, relights the face for the skin segmenter and the
    recognition model. A recognition run trained with its own relighting net or skin segmenter
    (paper B §3.9) applies them itself inside its forward; giving a separate relighting run as
    well would relight twice and is refused.
  * Haar detections have no landmarks: the face is a square crop of the box, shifted and grown
    to approximate the template framing (`BOX_SHIFT`, `BOX_MARGIN`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from lowlight.inference import runs
from lowlight.inference.errors import InputError, RunError
from lowlight.inference.results import (  # noqa: F401  (public re-exports)
    Face,
    ImageResult,
    expand_paths,
    read_image,
)

DETECTORS: tuple[str, ...] = ("retinaface", "haar", "haar_clahe", "none")
#: Haar box → ArcFace-like crop. Measured on scikit-image's astronaut and matplotlib's
#: grace_hopper: mapped into the 112 px template by the RetinaFace landmarks' similarity, the
#: Haar box spans ~0.75-0.88 of the template and its centre sits ~0.09 box heights below the
#: template's centre. So: move the box up by 0.09 of its height, grow by 0.12 per side.
BOX_SHIFT = 0.09
BOX_MARGIN = 0.12
#: Side of the aligned crop `Face.brightness` is measured on.
BRIGHTNESS_SIZE = 112


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Which trained runs fill which stage ("" = stage off) and how faces are found.

    attributes: an 'attributes' run (used for every face), an 'attributes_routed' run (paper A
      method 2: its lighting classifier and experts), or a mapping {lighting class (index or
      name, e.g. "low") → attributes run} routed by `lighting`.
    detector: "retinaface" (5 landmarks), "haar" / "haar_clahe" (boxes only), or "none" (each
      image already is one face crop, e.g. an aligned dataset).
    max_faces: keep the largest N faces per image (0 = all).
    batch_size: faces per jitted call of every stage; num_devices: devices a batch is split
      over (0 = all local ones).
    """

    recognition: str = ""
    attributes: str | Mapping[str, str] = ""
    lighting: str = ""
    relight: str = ""
    skin: str = ""
    detector: str = "retinaface"
    score_threshold: float = 0.5
    max_faces: int = 0
    batch_size: int = 16
    num_devices: int = 1
    flip: bool = True

    def __post_init__(self):
        if self.detector not in DETECTORS:
            raise ValueError(f"detector {self.detector!r}; valid: {', '.join(DETECTORS)}")
        if self.batch_size < 1 or self.max_faces < 0:
            raise ValueError(f"batch_size must be >= 1 and max_faces >= 0, got "
                             f"{self.batch_size}, {self.max_faces}")


def _resize(faces: np.ndarray, size: int) -> np.ndarray:
    from lowlight.data.image_io import resize_square

    if faces.shape[1] == size:
        return faces
    return np.stack([resize_square(f, size) for f in faces]) if len(faces) else np.zeros(
        (0, size, size, 3), np.uint8)


class Pipeline:
    """Loads the configured runs once; `analyze`, `analyze_paths` and `verify` reuse them."""

    def __init__(self, config: PipelineConfig | None = None, **kwargs):
        self.config = config = dataclasses.replace(config or PipelineConfig(), **kwargs)
        if config.relight and config.recognition:
            mods = runs.read_config(config.recognition, "recognition").get("modules", {}) or {}
            rl = mods.get("relight", {}) or {}
            if rl.get("enabled", False) and rl.get("eval", True):
                raise RunError(f"relight run {config.relight!r}: the recognition run "
                               f"{config.recognition!r} already relights its input; drop one")
        st = functools.partial(runs.stage, batch_size=config.batch_size,
                               num_devices=config.num_devices)
        self.recognition = st(config.recognition, "recognition", flip=config.flip) \
            if config.recognition else None
        self.relight = st(config.relight, "relight") if config.relight else None
        self.skin = st(config.skin, "skin") if config.skin else None
        lighting_dir, experts = self._resolve_attributes(config)
        self.lighting = st(lighting_dir, "lighting") if lighting_dir else None
        self.class_names = self._class_names()
        self.experts = {self._expert_key(c): st(d, "attributes") for c, d in experts.items()}
        if set(self.experts) - {None}:
            missing = [i for i in range(len(self.class_names)) if i not in self.experts]
            if missing:
                raise RunError(f"attributes: no model for lighting classes "
                               f"{[self.class_names[i] for i in missing]} of {lighting_dir!r}")

    # --------------------------------------------------------------- configuration
    @staticmethod
    def _resolve_attributes(config) -> tuple[str, dict]:
        """(lighting run dir, {lighting class index or None (= every face): attributes dir})."""
        attr, lighting = config.attributes, config.lighting
        if not attr:
            return lighting, {}
        if isinstance(attr, Mapping):
            if not lighting:
                raise RunError("attributes given per lighting class but no lighting run")
            return lighting, dict(attr)
        cfg = runs.read_config(attr, "attributes")
        if cfg.get("task") != "attributes_routed":
            return lighting, {None: attr}
        routing = cfg.routing
        return lighting or routing.lighting_from, dict(routing.experts)

    def _class_names(self) -> tuple[str, ...]:
        if self.lighting is None:
            return ()
        from lowlight.models.lighting_cnn import CLASS_NAMES

        n = int(self.lighting.run.config.model.kwargs.get("num_classes", 2))
        return CLASS_NAMES.get(n, tuple(f"class{i}" for i in range(n)))

    def _expert_key(self, key) -> int | None:
        if key is None:
            return None
        if isinstance(key, int) or str(key).isdigit():
            i = int(key)
        elif str(key) in self.class_names:
            i = self.class_names.index(str(key))
        else:
            raise RunError(f"attributes: lighting class {key!r} unknown; the classifier's "
                           f"classes are {list(self.class_names)}")
        if not 0 <= i < len(self.class_names):
            raise RunError(f"attributes: lighting class {i} out of range; the classifier has "
                           f"{len(self.class_names)} classes {list(self.class_names)}")
        return i

    def describe(self) -> dict[str, Any]:
        """Which run fills which stage (for reports and --json output)."""
        out = {"detector": self.config.detector}
        for role in ("recognition", "lighting", "relight", "skin"):
            s = getattr(self, role)
            out[role] = None if s is None else s.run.describe()
        out["attributes"] = {("all" if c is None else self.class_names[c]): s.run.describe()
                             for c, s in self.experts.items()} or None
        return out

    # --------------------------------------------------------------- detection + alignment
    def detect(self, image: np.ndarray) -> list[dict[str, Any]]:
        """The configured detector's faces (largest `max_faces` kept)."""
        if self.config.detector == "none":
            h, w = image.shape[:2]
            faces = [dict(box=(0.0, 0.0, float(w), float(h)), score=1.0, landmarks=None,
                          alignment="image")]
        else:
            from lowlight import align

            faces = align.detect_faces(image, method=self.config.detector,
                                       score_threshold=self.config.score_threshold)
        if self.config.max_faces:
            area = lambda f: (f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1])
            keep = sorted(range(len(faces)), key=lambda i: -area(faces[i]))
            faces = [faces[i] for i in sorted(keep[:self.config.max_faces])]
        return faces

    def crop(self, image: np.ndarray, face: Mapping[str, Any], size: int) -> np.ndarray:
        """The face as a uint8 (size, size, 3) crop framed like the ArcFace template: the
        landmarks' similarity if there are landmarks, else a square around the box (shifted and
        grown, see BOX_SHIFT), or the image's centre square for detector "none"."""
        from lowlight import align
        from lowlight.data import face_crop

        kind = _alignment(face)
        if kind == "landmarks":
            return align.align_face(image, face["landmarks"], size)
        if kind == "image":
            return face_crop.center_crop(image, size)
        x1, y1, x2, y2 = face["box"]
        dy = BOX_SHIFT * (y2 - y1)
        return face_crop.crop_box(image, (x1, y1 - dy, x2, y2 - dy), size=size,
                                  margin=BOX_MARGIN)

    # --------------------------------------------------------------- the stages
    def analyze(self, images: Sequence[np.ndarray], names: Sequence[str] | None = None,
                faces: Sequence[Sequence[Mapping[str, Any]]] | None = None
                ) -> list[ImageResult]:
        """Runs every configured stage on all faces of `images` (uint8 RGB (H, W, 3) each).

        `faces`, if given, replaces detection: per image a list of dicts with "box" and
        optionally "landmarks" (5, 2) and "score" (another detector's output, ground truth).
        """
        from lowlight.data.image_io import to_uint8_rgb

        names = list(names) if names is not None else [f"image{i}" for i in range(len(images))]
        if len(names) != len(images) or (faces is not None and len(faces) != len(images)):
            raise ValueError(f"analyze: {len(images)} images but {len(names)} names"
                             + ("" if faces is None else f" and {len(faces)} face lists"))
        pending = []  # (image index, pixels, detection) per face
        shapes = []
        for i, (im, name) in enumerate(zip(images, names)):
            try:
                im = to_uint8_rgb(np.asarray(im), bgr=False, name=name)
            except ValueError as e:  # CorruptImageError: unsupported layout, names the image
                raise InputError(str(e)) from None
            shapes.append(im.shape)
            for det in (self.detect(im) if faces is None else faces[i]):
                pending.append((i, im, det))
        need = {BRIGHTNESS_SIZE} | {s.size for s in self._crop_consumers()}
        crops = {s: np.stack([self.crop(im, d, s) for _, im, d in pending]) if pending
                 else np.zeros((0, s, s, 3), np.uint8) for s in need}
        out = self._run_stages(crops)
        results = [ImageResult(n, tuple(s), []) for n, s in zip(names, shapes)]
        for k, (i, _, det) in enumerate(pending):
            face = Face(index=len(results[i].faces), box=tuple(float(v) for v in det["box"]),
                        score=float(det.get("score", 1.0)),
                        landmarks=None if det.get("landmarks") is None else
                        np.asarray(det["landmarks"], np.float32),
                        alignment=_alignment(det),
                        brightness=float(_luma(crops[BRIGHTNESS_SIZE][k])))
            for key, values in out.items():
                setattr(face, key, values[k])
            results[i].faces.append(face)
        return results

    def _crop_consumers(self):
        return [s for s in (self.recognition, self.relight, self.skin, self.lighting,
                            *self.experts.values()) if s is not None]

    def _run_stages(self, crops: dict[int, np.ndarray]) -> dict[str, list]:
        n = len(crops[BRIGHTNESS_SIZE])
        out: dict[str, list] = {}
        route = None
        if self.lighting is not None:
            probs = self.lighting(crops[self.lighting.size])["probs"]
            route = np.argmax(probs, axis=-1) if n else np.zeros(0, int)
            out["lighting"] = [self.class_names[c] for c in route]
            out["lighting_probs"] = [dict(zip(self.class_names, map(float, p))) for p in probs]
        if self.experts:
            attrs: list = [None] * n
            for key, expert in self.experts.items():
                idx = np.arange(n) if key is None else np.flatnonzero(route == key)
                pred = expert(crops[expert.size][idx])
                for j, k in enumerate(idx):
                    attrs[k] = _attributes(pred, j, expert.run.workdir)
            out["attributes"] = attrs
        relit = None
        if self.relight is not None:
            relit = self.relight(crops[self.relight.size])["image"]
        face_input = lambda st: crops[st.size] if relit is None else _resize(relit, st.size)
        if self.skin is not None:
            masks = self.skin(face_input(self.skin))["mask"]
            out["skin_mask"] = list(masks)
            out["skin_fraction"] = [float(np.mean(m >= 0.5)) for m in masks]
        if self.recognition is not None:
            out["embedding"] = list(self.recognition(face_input(self.recognition))["embedding"])
        return out

    # --------------------------------------------------------------- files and folders
    def analyze_paths(self, paths: Iterable[str], *, progress: bool = False,
                      chunk: int = 8) -> Iterator[ImageResult]:
        """`analyze` over image files and folders (their images, sorted), `chunk` images at a
        time, with a tqdm bar on stderr if `progress`. Unreadable files named explicitly raise
        InputError; unreadable files found in a folder come back with `error` set."""
        from tqdm import tqdm

        items = expand_paths(paths)
        bar = tqdm(total=len(items), desc="analyze", unit="img", disable=not progress,
                   dynamic_ncols=True)
        try:
            for start in range(0, len(items), chunk):
                part = items[start:start + chunk]
                images, slots = [], []  # slots: the result of each file, in file order
                for path, explicit in part:
                    try:
                        images.append(read_image(path))
                        slots.append(path)
                    except InputError as e:
                        if explicit:
                            raise
                        slots.append(ImageResult(path, None, [], error=str(e)))
                res = iter(self.analyze(images, [s for s in slots if isinstance(s, str)]))
                yield from (next(res) if isinstance(s, str) else s for s in slots)
                bar.update(len(part))
        finally:
            bar.close()

    # --------------------------------------------------------------- verification
    @functools.cached_property
    def calibration(self):
        """The recognition run's threshold (`lowlight.inference.calibration`), computed once."""
        from lowlight.inference import calibration

        return calibration.calibrate(self._need_recognition("verification"), self.relight)

    def _need_recognition(self, what: str):
        if self.recognition is None:
            raise RunError(f"{what} needs a recognition run (PipelineConfig.recognition, "
                           "--recognition=DIR or LOWLIGHT_RECOGNITION)")
        return self.recognition

    def model_record(self) -> dict[str, Any]:
        """The recognition model's identity for galleries: weights fingerprint, run, step, dim."""
        rec = self._need_recognition("a gallery")
        return {"fingerprint": rec.run.fingerprint, "dim": rec.output_shape("embedding")[-1],
                **{k: v for k, v in rec.run.describe().items() if k in ("workdir", "step")}}

    def verify(self, image_a: np.ndarray, image_b: np.ndarray,
               names: Sequence[str] = ("A", "B")) -> dict[str, Any]:
        """Whether the largest faces of two images are one person, at the calibrated threshold.

        Returns {"similarity", "same", "threshold", "calibration", "faces": [face A, face B]}
        (faces as `Face.to_json`, with the image name and its number of faces).
        """
        self._need_recognition("verify")
        results = self.analyze([image_a, image_b], names)
        fa, fb = (r.primary() for r in results)
        sim = float(np.dot(fa.embedding, fb.embedding))
        cal = self.calibration
        faces = [{"image": r.name, "num_faces": len(r.faces), **f.to_json()}
                 for r, f in zip(results, (fa, fb))]
        return {"similarity": sim, "same": bool(sim >= cal.threshold),
                "threshold": cal.to_dict()["threshold"], "calibration": cal.to_dict(),
                "faces": faces}


def _alignment(face: Mapping[str, Any]) -> str:
    if face.get("landmarks") is not None:
        return "landmarks"
    return "image" if face.get("alignment") == "image" else "box"


def _luma(face: np.ndarray) -> float:
    return float(np.mean(face.astype(np.float32) @ np.float32([0.299, 0.587, 0.114])) / 255.0)


def _attributes(pred: dict[str, np.ndarray], j: int, workdir: str) -> dict[str, Any]:
    from lowlight.data.sources import UTK_ETHNICITIES as _ETHNICITIES
    from lowlight.data.sources import UTK_GENDERS as _GENDERS

    probs = pred["ethnicity_probs"][j]
    # a regression head can go below 0 years; what is reported is an age
    return {"age": round(max(0.0, float(pred["age"][j])), 2),
            "gender": _GENDERS[int(pred["gender"][j])],
            "female_prob": round(float(pred["female_prob"][j]), 4),
            "ethnicity": _ETHNICITIES[int(pred["ethnicity"][j])],
            "ethnicity_probs": {n: round(float(p), 4) for n, p in zip(_ETHNICITIES, probs)},
            "model": os.path.abspath(workdir)}
