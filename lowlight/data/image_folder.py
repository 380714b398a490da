"""Identity folders (one sub-folder per person), plus the repair bookkeeping every reader shares.

Layout read by `ImageFolder` (the layout of CASIA-WebFace / VGGFace2 / MS1M exports, and what
torchvision's ImageFolder reads):

    root/
      Aaron_Eckhart/  0001.jpg  0002.png ...
      Abba_Eban/      ...

The top of the file holds the helpers the other real-format readers (`recordio.py`,
`verification_sets.py`) use to *repair* images and to say what they repaired: `decode_noting`
decodes exactly like `sources.decode_image` and also reports what the shared conversion rule
(`sources.to_uint8_rgb`) changed — grey, alpha, 16-bit, float — and `fit_image` resizes to a
target size and reports it. Skips are reported through `sources._report_skipped` (one warning,
each name once per process), repairs through `report_repairs`.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import cv2
import numpy as np
from absl import logging

from lowlight.data import image_io
from lowlight.data.image_io import (
    IMAGE_EXTENSIONS,
    CorruptImageError,
    list_files,
    read_image,
    resize_square,
    to_uint8_rgb,
)

# ---------------------------------------------------------------------------------------------
# Decoding with repair notes, resizing, reports (shared by the real-format readers)
# ---------------------------------------------------------------------------------------------

#: What the shared conversion rule can repair, as named in `repaired` / `stats`.
REPAIRS: tuple[str, ...] = ("grayscale", "alpha", "16bit", "float", "resized")
_MAX_NAMES = 50


def layout_notes(raw: np.ndarray) -> tuple[str, ...]:
    """What `to_uint8_rgb` will change in an image decoded with `cv2.IMREAD_UNCHANGED`."""
    notes = []
    channels = 1 if raw.ndim == 2 else raw.shape[2]
    if channels in (1, 2):
        notes.append("grayscale")
    if channels in (2, 4):
        notes.append("alpha")
    if raw.dtype == np.uint16:
        notes.append("16bit")
    elif np.issubdtype(raw.dtype, np.floating):
        notes.append("float")
    return tuple(notes)


def decode_noting(data: bytes, name: str = "<bytes>") -> tuple[np.ndarray, tuple[str, ...]]:
    """`sources.decode_image(data, name)` plus the repairs the conversion rule made.

    The steps are decode_image's (same checks, same messages, same pixels: the tests compare
    the two); they are repeated here only because decode_image does not expose the stored
    layout, and decoding twice would double the cost of validating a dataset.

    Returns:
      (uint8 RGB (H, W, 3), notes) with notes a subset of ("grayscale", "alpha", "16bit",
      "float").

    Raises:
      CorruptImageError: as `decode_image`.
    """
    if not data:
        raise CorruptImageError(name, "empty file")
    problem = image_io._truncation_problem(data)
    if problem:
        raise CorruptImageError(name, problem)
    raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise CorruptImageError(name, "not an image OpenCV can decode")
    return to_uint8_rgb(raw, bgr=True, name=name), layout_notes(raw)


def encode_image(image: np.ndarray | bytes, ext: str = ".jpg", quality: int = 95) -> bytes:
    """uint8 RGB (H, W, 3) or grey (H, W) -> encoded bytes (OpenCV); bytes pass through as is.

    `ext` picks the codec (".jpg", ".png", ...); `quality` is the JPEG quality. The writers use
    this, so their files hold what real packs hold: encoded images, RGB once decoded.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 3:
        a = a[:, :, ::-1]  # RGB -> OpenCV's BGR
    elif a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, [2, 1, 0, 3]]
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if ext.lower() in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(a), params)
    if not ok:
        raise ValueError(f"OpenCV could not encode an image of shape {a.shape} and dtype "
                         f"{a.dtype} as {ext}")
    return buf.tobytes()


def fit_image(image: np.ndarray, shape: tuple[int, int] | None) -> tuple[np.ndarray, bool]:
    """Resizes `image` to `shape` = (H, W) (no-op for None or a match); returns (image, resized).

    Square targets use `sources.resize_square`; others the same interpolation rule (INTER_AREA
    when shrinking, INTER_LINEAR otherwise). The aspect ratio is not kept.
    """
    if shape is None or image.shape[:2] == tuple(shape):
        return image, False
    h, w = shape
    if h == w:
        return resize_square(image, h), True
    interp = cv2.INTER_AREA if h < image.shape[0] and w < image.shape[1] else cv2.INTER_LINEAR
    return cv2.resize(image, (w, h), interpolation=interp), True


def note_repairs(repaired: dict[str, list[str]], name: str, notes: Iterable[str]) -> None:
    for note in notes:
        repaired.setdefault(note, []).append(name)


def report_repairs(reader: str, where: str, repaired: Mapping[str, Sequence[str]],
                   total: int) -> None:
    """One warning naming the images the shared rules repaired (converted or resized)."""
    if not any(repaired.values()):
        return
    parts = []
    for note, names in repaired.items():
        if names:
            shown = ", ".join(names[:_MAX_NAMES])
            more = len(names) - _MAX_NAMES
            parts.append(f"{note} ({len(names)}): {shown}"
                         + (f" (+{more} more; see .repaired)" if more > 0 else ""))
    logging.warning("%s(%s): repaired images of %d by the shared conversion rule (channels -> "
                    "RGB, depth -> 8 bit, size -> target): %s", reader, where, total,
                    "; ".join(parts))


def check_size(size: int | None) -> int | None:
    if size is None:
        return None
    size = operator.index(size)
    if size <= 0:
        raise ValueError(f"size: expected a positive integer or None, got {size}")
    return size


# ---------------------------------------------------------------------------------------------
# ImageFolder
# ---------------------------------------------------------------------------------------------

#: Reasons a file or folder is skipped, in the order they are checked.
FOLDER_SKIP_REASONS: tuple[str, ...] = (
    "hidden_folder",  # a sub-folder whose name starts with '.' (.git, .ipynb_checkpoints)
    "not_in_folder",  # a file directly in root: it belongs to no identity
    "not_image",  # extension not in `extensions`, or a hidden file (README, .DS_Store, ._x.jpg)
    "empty",  # zero bytes
    "corrupt",  # does not decode (only checked with validate=True)
    "empty_folder",  # an identity folder left with no image: not a class (names the folder)
)


class ImageFolder:
    """Face images in identity folders: `root/<identity>/**/<image>`.

    `ds[i]` -> dict(image uint8 RGB (H, W, 3), identity int, path str). `classes` holds the
    identity folder names, `identity` indexes it, `num_classes` is its length.

    Index build (at construction; a pure function of the folder's contents and the options):
      1. Identity folders are the direct sub-folders of `root`, sorted by code point; images
         inside them are found recursively, sorted by relative path (`sources.list_files`).
      2. Skipped, by reason (FOLDER_SKIP_REASONS): hidden sub-folders, files directly in root,
         hidden files and files whose extension is not in `extensions` (macOS `._x.jpg`
         resource forks are hidden files), zero-byte files and, with
         `validate=True`, files that do not decode. A folder left without images is skipped as
         "empty_folder" and gets no label, so labels stay contiguous 0..num_classes-1 over the
         identities that have images. Names are relative to root, in `self.skipped`
         (reason -> names) and in one warning.
      3. Labels: the index of the identity folder among the kept (sorted) folders.

    Repairs (every access, same rule as every reader): grey / grey+alpha / RGBA / 16-bit / float
    images are converted by `sources.to_uint8_rgb`; with `size`, images of another size are
    resized to size x size (`resize_square`, aspect not kept). With size=None images keep their
    stored sizes (which may differ; batching then needs a size). With `validate=True` each
    repair is also counted and named at construction (`self.repaired`, `self.stats`, one
    warning); without it nothing is decoded before access.

    Corrupt-file rule (as `sources.UTKFace`): nothing is skipped at access time, so `ds[i]` never
    depends on what was read before. Without validation a file that does not decode stays in the
    index and `ds[i]` raises `CorruptImageError` naming it, every time; `validate=True` drops
    such files at construction.

    Args:
      root: the folder holding one sub-folder per identity.
      size: output size (square) or None to keep stored sizes.
      extensions: file extensions treated as images (case-insensitive, with or without dot).
      validate: decode every image at construction: skip corrupt ones, count repairs.
    """

    def __init__(self, root: str, *, size: int | None = None,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS, validate: bool = False):
        self.root = os.fspath(root)
        self.size = check_size(size)
        if isinstance(extensions, str):
            extensions = (extensions,)
        self.extensions = tuple(sorted({(e if e.startswith(".") else "." + e).lower()
                                        for e in extensions}))
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"ImageFolder: dataset folder not found: {self.root!r}")
        skipped: dict[str, list[str]] = {r: [] for r in FOLDER_SKIP_REASONS}
        repaired: dict[str, list[str]] = {}
        folders = []
        for entry in os.scandir(self.root):
            if entry.is_dir():
                (skipped["hidden_folder"] if entry.name.startswith(".") else folders).append(
                    entry.name)
            elif entry.is_file():
                skipped["not_in_folder"].append(entry.name)
        skipped["hidden_folder"].sort()
        skipped["not_in_folder"].sort()

        classes, files, labels, total = [], [], [], len(skipped["not_in_folder"])
        for folder in sorted(folders):
            kept = []
            for rel in list_files(os.path.join(self.root, folder)):
                total += 1
                name = f"{folder}/{rel}"
                path = os.path.join(self.root, folder, rel)
                base = rel.rsplit("/", 1)[-1]
                if base.startswith(".") or not base.lower().endswith(self.extensions):
                    skipped["not_image"].append(name)
                elif os.path.getsize(path) == 0:
                    skipped["empty"].append(name)
                elif validate and not self._validate(path, name, repaired):
                    skipped["corrupt"].append(name)
                else:
                    kept.append(name)
            if not kept:
                skipped["empty_folder"].append(folder + "/")
                continue
            files.extend(kept)
            labels.extend([len(classes)] * len(kept))
            classes.append(folder)

        self.classes: tuple[str, ...] = tuple(classes)
        self.files: tuple[str, ...] = tuple(files)
        self.labels = np.asarray(labels, np.int64)
        self.skipped = {r: v for r, v in skipped.items() if v}
        self.repaired = repaired
        self.validated = bool(validate)
        self.num_files = total
        image_io._report_skipped(type(self).__name__, self.root, self.skipped, total)
        report_repairs(type(self).__name__, self.root, self.repaired, len(self.files))

    def _validate(self, path: str, name: str, repaired: dict[str, list[str]]) -> bool:
        try:
            with open(path, "rb") as f:
                image, notes = decode_noting(f.read(), path)
        except CorruptImageError:
            return False
        if self.size is not None and image.shape[:2] != (self.size, self.size):
            notes = (*notes, "resized")
        note_repairs(repaired, name, notes)
        return True

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def stats(self) -> dict[str, int]:
        """Counts: images, classes, files seen, every skip reason and (validated) repair."""
        out = {"images": len(self.files), "classes": self.num_classes, "files": self.num_files}
        out.update({f"skipped/{r}": len(v) for r, v in self.skipped.items()})
        out.update({f"repaired/{r}": len(v) for r, v in self.repaired.items()})
        return out

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = operator.index(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for ImageFolder of length {len(self)}")
        path = os.path.join(self.root, self.files[i])
        image = read_image(path)
        if self.size is not None:
            image = resize_square(image, self.size)
        return dict(image=image, identity=int(self.labels[i]), path=path)

    def __repr__(self) -> str:
        return (f"ImageFolder(root={self.root!r}, len={len(self)}, "
                f"num_classes={self.num_classes}, skipped="
                f"{ {r: len(v) for r, v in self.skipped.items()} })")
