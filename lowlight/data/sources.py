"""Readers for real dataset formats: random-access sources that yield uint8 RGB images.

Every reader here follows the same contract as `lowlight.data.synthetic.SynthFaces`: `len(src)`,
`src[i]` -> a dict (or tuple, where API.md says so), deterministic, picklable, cheap to construct
in grain worker processes. The file is laid out so more formats slot in below the shared parts:

  * Image decoding and validation (shared): `decode_image`, `read_image`, `to_uint8_rgb`,
    `resize_square`, `CorruptImageError`. One conversion rule for every reader.
  * Folder listing, skip bookkeeping and splits (shared): `list_files`, `split_indices`.
  * Readers: `UTKFace` (paper A's dataset). RecordIO, verification .bin, LFW and image folders
    follow in later issues.

Paper A (Maksymenko et al. 2025, "Experimental results") trains on UTKFace, 23,708 images split
16,595 / 4,741 / 2,371 for training / validation / testing; `split_indices` reproduces those sizes
(see there for the rounding rule and the one image the published sizes leave out).
"""

from __future__ import annotations

import math
import operator
import os
import re
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import cv2
import numpy as np
from absl import logging

# ---------------------------------------------------------------------------------------------
# Image decoding and validation (shared by every reader)
# ---------------------------------------------------------------------------------------------

#: File extensions the folder readers treat as images (compared case-insensitively).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png")

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class CorruptImageError(ValueError):
    """An image file (or byte string) that cannot be decoded completely; names the file."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def _truncation_problem(data: bytes) -> str | None:
    """Why `data` is an incomplete JPEG/PNG, or None.

    Whether a truncated file decodes depends on the OpenCV build (older builds fill the missing
    rows with grey and only print a libjpeg warning; 4.14 returns None), so completeness is
    checked on the bytes and the rule does not depend on the build: a JPEG must have an EOI
    marker (FFD9) after its last start-of-scan marker (FFDA) — byte stuffing guarantees FFD9
    cannot occur inside entropy-coded data — and a PNG must contain its IEND chunk. Other
    formats are left to the decoder.
    """
    if data.startswith(_JPEG_MAGIC):
        sos = data.rfind(b"\xff\xda")
        if sos < 0:
            return "truncated JPEG (no start-of-scan marker)"
        if data.find(b"\xff\xd9", sos) < 0:
            return "truncated JPEG (no end-of-image marker after the last scan)"
    elif data.startswith(_PNG_MAGIC) and data.rfind(b"IEND") < 0:
        return "truncated PNG (no IEND chunk)"
    return None


def to_uint8_rgb(array: np.ndarray, *, bgr: bool = True, name: str = "<array>") -> np.ndarray:
    """Converts a decoded image of any common layout to contiguous uint8 RGB (H, W, 3).

    The rule, shared by every reader:
      * channels: (H, W) or (H, W, 1) grey -> replicated to 3 channels; (H, W, 2) grey + alpha ->
        the grey channel, replicated; (H, W, 3) colour -> reordered BGR -> RGB when `bgr` (OpenCV
        order); (H, W, 4) colour + alpha -> the colour channels, alpha dropped (what
        `cv2.IMREAD_COLOR` does; pixels are not composited over a background).
      * depth: uint8 as is; uint16 -> round(x / 257), which maps 0..65535 onto 0..255 with
        257 * k -> k exactly; float -> round(clip(x, 0, 1) * 255). Other dtypes are rejected.

    Args:
      array: the decoded pixels.
      bgr: whether 3/4-channel input is in OpenCV's BGR(A) order (True for `cv2.imdecode`).
      name: used in error messages (the file path).

    Raises:
      CorruptImageError: for unsupported shapes or dtypes.
    """
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or 0 in a.shape or (a.ndim == 3 and a.shape[2] not in (2, 3, 4)):
        raise CorruptImageError(name, f"unsupported image shape {a.shape}")
    if a.dtype == np.uint16:
        a = ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        a = np.rint(np.clip(np.nan_to_num(a.astype(np.float32)), 0.0, 1.0) * 255.0)
        a = a.astype(np.uint8)
    elif a.dtype != np.uint8:
        raise CorruptImageError(name, f"unsupported pixel type {a.dtype}")
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    elif a.shape[2] == 2:
        a = np.repeat(a[:, :, :1], 3, axis=2)
    else:
        a = a[:, :, 2::-1] if bgr else a[:, :, :3]
    return np.ascontiguousarray(a)


def decode_image(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decodes encoded image bytes (JPEG, PNG, anything `cv2.imdecode` reads) to uint8 RGB.

    Decoding uses `cv2.IMREAD_UNCHANGED` so 16-bit depth and alpha are seen (and converted by
    `to_uint8_rgb`); EXIF orientation is therefore *not* applied: pixels come in stored order.

    Raises:
      CorruptImageError: empty data, a truncated JPEG/PNG (see `_truncation_problem`), bytes
        OpenCV cannot decode, or an unsupported layout. The message names `name`.
    """
    if not data:
        raise CorruptImageError(name, "empty file")
    problem = _truncation_problem(data)
    if problem:
        raise CorruptImageError(name, problem)
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise CorruptImageError(name, "not an image OpenCV can decode")
    return to_uint8_rgb(array, bgr=True, name=name)


def read_image(path: str) -> np.ndarray:
    """Reads and decodes one image file to uint8 RGB (H, W, 3); see `decode_image`."""
    with open(path, "rb") as f:
        return decode_image(f.read(), path)


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes to (size, size): `INTER_AREA` when shrinking (no aliasing), `INTER_LINEAR` when
    enlarging. The aspect ratio is not kept (UTKFace chips are square already)."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    interp = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interp)


# ---------------------------------------------------------------------------------------------
# Folder listing, skip bookkeeping, splits (shared)
# ---------------------------------------------------------------------------------------------


def list_files(root: str, *, recursive: bool = True) -> list[str]:
    """Regular files under `root` as '/'-separated paths relative to `root`, sorted by code point.

    Sorting the relative path string makes the order independent of the file system's listing
    order. `recursive=False` lists only `root` itself. Symlinked directories are not followed.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset folder not found: {root!r}")
    out = []
    if recursive:
        for dirpath, _, filenames in os.walk(root):
            rel_dir = os.path.relpath(dirpath, root)
            for fn in filenames:
                rel = fn if rel_dir == "." else os.path.join(rel_dir, fn)
                if os.path.isfile(os.path.join(root, rel)):
                    out.append(rel.replace(os.sep, "/"))
    else:
        out = [e.name for e in os.scandir(root) if e.is_file()]
    return sorted(out)


#: Absolute paths already named in a skip warning in this process (each is reported once, even
#: when train/val/test readers are built on the same folder).
_REPORTED: set[str] = set()
_MAX_LOGGED_NAMES = 50


def _report_skipped(reader: str, root: str, skipped: Mapping[str, Sequence[str]],
                    total: int) -> None:
    """One warning listing the skipped names (per reason) not yet reported in this process."""
    fresh = {}
    for reason, names in skipped.items():
        new = [n for n in names if os.path.abspath(os.path.join(root, n)) not in _REPORTED]
        if new:
            fresh[reason] = new
            _REPORTED.update(os.path.abspath(os.path.join(root, n)) for n in new)
    if not fresh:
        return
    counts = ", ".join(f"{r}: {len(v)}" for r, v in skipped.items() if v)
    parts = []
    for reason, names in fresh.items():
        shown = ", ".join(names[:_MAX_LOGGED_NAMES])
        more = len(names) - _MAX_LOGGED_NAMES
        parts.append(f"{reason}: {shown}" + (f" (+{more} more; see .skipped)" if more > 0 else ""))
    logging.warning("%s(%s): skipped %d of %d files (%s). %s", reader, root,
                    sum(len(v) for v in skipped.values()), total, counts, "; ".join(parts))


def _exact(f: Any) -> Fraction:
    # Fractions are read from their decimal repr: 0.1 means 1/10, so ceil(0.1 * 30) is 3, not
    # the 4 the binary float 0.1000000000000000055... would give.
    return Fraction(repr(f)) if isinstance(f, float) else Fraction(f)


SPLIT_RULES: tuple[str, ...] = ("paper", "rest")


def split_indices(n: int, seed: int, fractions: Sequence[float] = (0.7, 0.2, 0.1), *,
                  names: Sequence[str] = ("train", "val", "test"),
                  rule: str = "paper") -> dict[str, np.ndarray]:
    """Deterministic seeded split of range(n) into named, disjoint parts.

    The order is `np.random.RandomState(seed).permutation(n)` — the legacy generator, whose
    stream numpy has frozen (NEP 19), so a split is the same under any numpy version — cut into
    consecutive pieces of the sizes below; each part's indices are then sorted ascending.

    Sizes (exact rational arithmetic on the fractions' decimal values):
      * rule="paper" (default): every part but the last gets floor(f * n); the last gets
        ceil(f * n), capped at what is left. This is the rule that reproduces paper A: for
        n = 23,708 and (0.7, 0.2, 0.1) it gives 16,595 / 4,741 / 2,371. Those published sizes sum
        to 23,707, so no rule that covers all 23,708 images reproduces them; the index left out
        (at most one for 70/20/10) is returned under "unused" instead of being dropped silently.
        (Paper A's sizes are equally consistent with round(0.7 n), round(0.2 n), rest on
        n = 23,707, i.e. with one image dropped before splitting; we cannot tell which.)
      * rule="rest": every part but the last gets floor(f * n); the last takes everything left,
        so "unused" is empty (for 23,708: 16,595 / 4,741 / 2,372).
    If the fractions sum to less than 1, "paper" leaves the remainder in "unused".

    Args:
      n: number of items.
      seed: non-negative integer < 2**32.
      fractions: one non-negative fraction per part, summing to at most 1.
      names: the parts' names ("unused" is reserved).
      rule: "paper" or "rest".

    Returns:
      {name: sorted int64 indices} for every name, plus "unused"; together they partition
      range(n).
    """
    n, seed = operator.index(n), operator.index(seed)
    if n < 0:
        raise ValueError(f"n: expected a non-negative integer, got {n}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed: expected an integer in [0, 2**32), got {seed}")
    names = tuple(names)
    if len(names) != len(fractions) or not names:
        raise ValueError(f"names {names} and fractions {tuple(fractions)} must have the same "
                         "non-zero length")
    if len(set(names)) != len(names) or "unused" in names:
        raise ValueError(f"names must be unique and must not contain 'unused', got {names}")
    if rule not in SPLIT_RULES:
        raise ValueError(f"rule: expected one of {SPLIT_RULES}, got {rule!r}")
    fr = [_exact(f) for f in fractions]
    if any(f < 0 for f in fr) or sum(fr) > 1:
        raise ValueError(f"fractions must be non-negative and sum to at most 1, got "
                         f"{tuple(fractions)}")
    sizes = [math.floor(f * n) for f in fr[:-1]]
    left = n - sum(sizes)
    sizes.append(left if rule == "rest" else min(math.ceil(fr[-1] * n), left))
    perm = np.random.RandomState(seed).permutation(n).astype(np.int64)
    out, start = {}, 0
    for name, size in zip(names, sizes):
        out[name] = np.sort(perm[start:start + size])
        start += size
    out["unused"] = np.sort(perm[start:])
    return out


# ---------------------------------------------------------------------------------------------
# UTKFace
# ---------------------------------------------------------------------------------------------

UTK_MAX_AGE = 116
UTK_GENDERS = ("male", "female")  # 0, 1
UTK_ETHNICITIES = ("White", "Black", "Asian", "Indian", "Others")  # 0..4

#: Reasons a UTKFace file is skipped, in the order they are checked.
UTK_SKIP_REASONS: tuple[str, ...] = (
    "not_image",  # no image extension and not UTKFace-like (README.txt, .DS_Store)
    "missing_field",  # only two label fields: [age]_[gender]_[datetime].jpg (no race)
    "bad_name",  # otherwise not [age]_[gender]_[race]_[datetime].ext[.chip.ext]
    "out_of_range",  # age > 116, gender not 0/1 or race not 0..4
    "empty",  # zero bytes
    "corrupt",  # does not decode (only checked with validate=True)
)

_EXT = r"\.(?:jpe?g|png)"
_TAIL = rf"{_EXT}(?:\.chip{_EXT})?"
# The datetime field is any token without '_', '.' or white space (real files: 17 digits).
_UTK_NAME = re.compile(rf"^(\d+)_(\d+)_(\d+)_([^_.\s]+){_TAIL}$", re.IGNORECASE)
_UTK_NO_RACE = re.compile(rf"^(\d+)_(\d+)_([^_.\s]+){_TAIL}$", re.IGNORECASE)
_UTK_LIKE = re.compile(r"^\d+_\d")


def parse_utkface_name(name: str) -> tuple[int, int, int] | str:
    """(age, gender, ethnicity) from a UTKFace file name, or the skip reason (a string).

    Only the base name is parsed. Accepted: `[age]_[gender]_[race]_[datetime].ext` optionally
    followed by `.chip.ext` (ext: jpg, jpeg or png, any case), age 0..116, gender 0 (male) or
    1 (female), race 0..4 (White, Black, Asian, Indian, Others). See UTK_SKIP_REASONS.
    """
    base = name.rsplit("/", 1)[-1]
    m = _UTK_NAME.match(base)
    if m is None:
        if _UTK_NO_RACE.match(base):
            return "missing_field"
        if base.lower().endswith(IMAGE_EXTENSIONS) or _UTK_LIKE.match(base):
            return "bad_name"
        return "not_image"
    age, gender, race = (int(g) for g in m.groups()[:3])
    if age > UTK_MAX_AGE or gender > 1 or race >= len(UTK_ETHNICITIES):
        return "out_of_range"
    return age, gender, race


class UTKFace:
    """UTKFace (Zhang et al. 2017) read from its image folder: paper A's dataset.

    `ds[i]` -> dict(image uint8 RGB (H, W, 3), age int, gender int (0 male, 1 female),
    ethnicity int (0 White, 1 Black, 2 Asian, 3 Indian, 4 Others), path str), plus
    face_found bool when `face_crop` is on. Labels come from the file name (see
    `parse_utkface_name`); images are decoded with OpenCV and converted by `to_uint8_rgb`.

    Index build (at construction; the index is a pure function of the folder's contents and the
    options, identical in every process):
      1. List files: recursive by default, so both the flat `UTKFace/` release and the in-the-wild
         `part1/ part2/ part3/` layout work; order = sorted relative path.
      2. Skip, by reason (UTK_SKIP_REASONS): bad names, out-of-range labels, zero-byte files, and,
         with `validate=True`, files that fail to decode (every file is decoded once; costs a
         full pass over the folder). Skipped names are in `self.skipped` (reason -> relative
         paths) and are logged in one warning, each name once per process.
      3. Split the remaining files with `split_indices(n, seed, fractions, rule=split_rule)`;
         `split="all"` keeps all of them, `split="unused"` the (at most one) file the paper rule
         leaves out. Within a split, items are in file order.

    Corrupt-file rule: nothing is skipped at access time, because substituting another sample
    would make `ds[i]` depend on what was read before. With `validate=False` (default; cheap
    construction) a file that is named correctly but does not decode stays in the index and
    `ds[i]` raises `CorruptImageError` naming it, every time; build with `validate=True` to drop
    such files before the split instead.

    Args:
      root: the folder holding the images.
      split: "train", "val", "test" (fractions order), "unused" or "all".
      seed: split seed.
      fractions: train/val/test fractions (paper A: 70/20/10).
      split_rule: "paper" or "rest", see `split_indices`.
      recursive: also read sub-folders.
      validate: decode every file at construction and skip failures (reason "corrupt").
      size: resize images to size x size (`resize_square`), or None to keep them as stored.
      face_crop: None/False for no crop; True or a dict of `face_crop.crop_face` options to apply
        paper A's Haar crop (output size = `size`, default 112). Only no_face="center" is allowed
        here; to drop faceless images use `face_crop.FaceCropped(UTKFace(...), no_face="skip")`.
    """

    SPLITS = ("train", "val", "test")

    def __init__(self, root: str, split: str = "train", seed: int = 0, *,
                 fractions: Sequence[float] = (0.7, 0.2, 0.1), split_rule: str = "paper",
                 recursive: bool = True, validate: bool = False, size: int | None = None,
                 face_crop: bool | Mapping[str, Any] | None = None):
        if split not in (*self.SPLITS, "unused", "all"):
            raise ValueError(f"split: expected one of {(*self.SPLITS, 'unused', 'all')}, "
                             f"got {split!r}")
        if size is not None and operator.index(size) <= 0:
            raise ValueError(f"size: expected a positive integer or None, got {size}")
        self.root, self.split, self.seed = os.fspath(root), split, operator.index(seed)
        self.size = None if size is None else operator.index(size)
        self.face_crop = self._check_face_crop(face_crop)

        files = list_files(self.root, recursive=recursive)
        skipped: dict[str, list[str]] = {r: [] for r in UTK_SKIP_REASONS}
        kept, labels = [], []
        for rel in files:
            parsed = parse_utkface_name(rel)
            if isinstance(parsed, str):
                skipped[parsed].append(rel)
                continue
            path = os.path.join(self.root, rel)
            if os.path.getsize(path) == 0:
                skipped["empty"].append(rel)
                continue
            if validate:
                try:
                    read_image(path)
                except CorruptImageError:
                    skipped["corrupt"].append(rel)
                    continue
            kept.append(rel)
            labels.append(parsed)
        self.skipped = {r: v for r, v in skipped.items() if v}
        self.num_files = len(files)
        self.num_valid = len(kept)
        _report_skipped(type(self).__name__, self.root, self.skipped, len(files))

        if split == "all":
            idx = np.arange(len(kept), dtype=np.int64)
        else:
            idx = split_indices(len(kept), self.seed, fractions, names=self.SPLITS,
                                rule=split_rule)[split]
        self.files = tuple(kept[i] for i in idx)
        self.labels = np.asarray(labels, np.int64).reshape(-1, 3)[idx]  # age, gender, ethnicity

    @staticmethod
    def _check_face_crop(face_crop):
        if not face_crop:
            return None
        opts = {} if face_crop is True else dict(face_crop)
        if "size" in opts:
            raise ValueError("face_crop: give the output size through UTKFace(size=...)")
        if opts.get("no_face", "center") != "center":
            raise ValueError("face_crop: only no_face='center' keeps random access intact; use "
                             "lowlight.data.face_crop.FaceCropped(source, no_face='skip') to "
                             "drop images without a face")
        return opts

    @property
    def skip_counts(self) -> dict[str, int]:
        """Reason -> number of skipped files."""
        return {r: len(v) for r, v in self.skipped.items()}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = operator.index(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for UTKFace split {self.split!r} of "
                             f"length {len(self)}")
        path = os.path.join(self.root, self.files[i])
        image = read_image(path)
        age, gender, ethnicity = (int(v) for v in self.labels[i])
        item = dict(image=image, age=age, gender=gender, ethnicity=ethnicity, path=path)
        if self.face_crop is not None:
            from lowlight.data.face_crop import crop_face

            item["image"], item["face_found"] = crop_face(image, size=self.size or 112,
                                                          **self.face_crop)
        elif self.size is not None:
            item["image"] = resize_square(image, self.size)
        return item

    def __repr__(self) -> str:
        return (f"UTKFace(root={self.root!r}, split={self.split!r}, seed={self.seed}, "
                f"len={len(self)}, skipped={self.skip_counts})")


# ---------------------------------------------------------------------------------------------
# Readers in their own modules, re-exported here. Lazily (PEP 562): those modules import the
# helpers above, so an eager import at this point would fail whenever one of them is imported
# before this file ("partially initialized module").
# ---------------------------------------------------------------------------------------------

_REEXPORTS = {
    "RecordIO": "lowlight.data.recordio",
    "RecordIOError": "lowlight.data.recordio",
    "write_recordio": "lowlight.data.recordio",
    "read_verification_bin": "lowlight.data.verification_sets",
    "write_verification_bin": "lowlight.data.verification_sets",
    "VerificationBin": "lowlight.data.verification_sets",
    "UnsafePickleError": "lowlight.data.verification_sets",
    "LFWPairs": "lowlight.data.verification_sets",
    "ImageFolder": "lowlight.data.image_folder",
}


def __getattr__(name: str) -> Any:
    module = _REEXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
