"""The input photo with each face's box, landmarks and a short label (`lowlight analyze --draw`).

OpenCV drawing on a copy of the RGB image; line width and font scale follow the image size so
labels stay legible on a phone photo and on a 112 px crop. Labels are ASCII (OpenCV's Hershey
fonts have no other glyphs).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import cv2
import numpy as np

_BOX = (40, 220, 60)       # RGB
_TEXT_BG = (20, 20, 20)
_TEXT = (255, 255, 255)
_POINT = (255, 80, 40)


def label(face) -> str:
    """'#0 low 0.97 | 34y F Asian' from what the pipeline computed for the face."""
    parts = [f"#{face.index}"]
    if face.lighting is not None:
        parts.append(f"{face.lighting} {face.lighting_probs[face.lighting]:.2f}")
    a = face.attributes
    if a is not None:
        parts.append(f"| {a['age']:.0f}y {'F' if a['gender'] == 'female' else 'M'} "
                     f"{a['ethnicity']}")
    return " ".join(parts)


def draw_faces(image: np.ndarray, faces: Sequence) -> np.ndarray:
    """A copy of uint8 RGB `image` with every face of `faces` (pipeline `Face`s) drawn."""
    out = np.ascontiguousarray(np.array(image, np.uint8, copy=True))
    h, w = out.shape[:2]
    thick = max(1, round(min(h, w) / 250))
    font = 0.35 * max(1.0, min(h, w) / 300)
    for face in faces:
        x1, y1, x2, y2 = (int(round(v)) for v in face.box)
        cv2.rectangle(out, (x1, y1), (x2, y2), _BOX, thick, cv2.LINE_AA)
        if face.landmarks is not None:
            for x, y in np.asarray(face.landmarks):
                cv2.circle(out, (int(round(x)), int(round(y))), thick + 1, _POINT, -1,
                           cv2.LINE_AA)
        text = label(face)
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font, 1)
        ty = y1 - 4 if y1 - th - base - 4 >= 0 else min(h - 1, y2 + th + 4)
        tx = min(max(0, x1), max(0, w - tw - 2))
        cv2.rectangle(out, (tx, ty - th - 2), (tx + tw + 2, ty + base), _TEXT_BG, -1)
        cv2.putText(out, text, (tx + 1, ty), cv2.FONT_HERSHEY_SIMPLEX, font, _TEXT, 1,
                    cv2.LINE_AA)
    return out


def write_image(path: str, image: np.ndarray) -> None:
    """Writes uint8 RGB `image` (format from the extension, e.g. .png); OSError naming `path`."""
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise OSError(f"{path}: cannot write, folder {d!r} does not exist")
    try:
        ok = cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    except cv2.error as e:
        raise OSError(f"{path}: cannot write an image there ({e.err})") from None
    if not ok:
        raise OSError(f"{path}: cannot write an image there (unknown extension or no permission)")
