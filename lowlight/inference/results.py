"""What the pipeline returns per image and per face, and how it reads image files.

`Face.to_json` / `ImageResult.to_json` are the records `lowlight analyze --json` prints; embeddings
and skin masks stay numpy attributes (`embedding_dim` says one exists).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from lowlight.inference.errors import InputError


@dataclasses.dataclass
class Face:
    """One detected face and what the configured stages said about it (None: stage off).

    `alignment` says how the face was cropped for the models: "landmarks" (similarity onto the
    ArcFace template), "box" (square around a Haar box) or "image" (detector "none": the
    image's centre square).
    """

    index: int                         # position in the image's face list
    box: tuple[float, float, float, float]   # (x1, y1, x2, y2) pixels of the input image
    score: float                       # detector confidence (Haar: merged detections)
    landmarks: np.ndarray | None       # (5, 2) ArcFace-order points, or None
    alignment: str                     # "landmarks" | "box" | "image"
    brightness: float                  # mean luma of the aligned face, in [0, 1]
    lighting: str | None = None
    lighting_probs: dict[str, float] | None = None
    attributes: dict[str, Any] | None = None
    skin_fraction: float | None = None
    skin_mask: np.ndarray | None = None     # (S, S) in [0, 1] at the skin run's size
    embedding: np.ndarray | None = None     # unit-norm (D,)

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)

    def to_json(self) -> dict[str, Any]:
        r = lambda v: round(float(v), 4)
        return {
            "index": self.index, "box": [r(v) for v in self.box], "score": r(self.score),
            "landmarks": None if self.landmarks is None else
            [[r(x), r(y)] for x, y in np.asarray(self.landmarks)],
            "alignment": self.alignment, "brightness": r(self.brightness),
            "lighting": self.lighting,
            "lighting_probs": None if self.lighting_probs is None else
            {k: r(v) for k, v in self.lighting_probs.items()},
            "attributes": self.attributes, "skin_fraction":
            None if self.skin_fraction is None else r(self.skin_fraction),
            "embedding_dim": None if self.embedding is None else int(self.embedding.size),
        }


@dataclasses.dataclass
class ImageResult:
    """The faces of one input image (in detector order), or why it was skipped."""

    name: str                          # file path or caller's name
    shape: tuple[int, ...] | None      # (H, W, 3) of the input; None if unreadable
    faces: list[Face]
    error: str | None = None           # why the image was skipped (folder runs only)

    def primary(self) -> Face:
        """The largest face (the subject of a portrait); InputError naming the image if none."""
        if self.error:
            raise InputError(self.error)
        if not self.faces:
            raise InputError(f"{self.name}: no face found")
        return max(self.faces, key=lambda f: f.area)

    def to_json(self) -> dict[str, Any]:
        return {"image": self.name, "shape": None if self.shape is None else list(self.shape),
                "faces": [f.to_json() for f in self.faces], "error": self.error}


def read_image(path: str) -> np.ndarray:
    """uint8 RGB pixels of an image file; InputError naming the file if it cannot be used."""
    from lowlight.data import image_io

    try:
        return image_io.read_image(path)
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, expected an image file") from None
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:  # CorruptImageError is a ValueError naming the file
        msg = str(e)
        raise InputError(msg if msg.startswith(path) else f"{path}: {msg}") from None


def expand_paths(paths: Iterable[str]) -> list[tuple[str, bool]]:
    """[(file, named explicitly)]: files as given, folders replaced by their images (sorted)."""
    from lowlight.data import image_io

    out = []
    for p in paths:
        if os.path.isdir(p):
            out += [(os.path.join(p, f), False) for f in image_io.list_files(p)
                    if f.lower().endswith(image_io.IMAGE_EXTENSIONS)]
        else:
            out.append((p, True))
    return out
