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

import operator
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Shared helpers (lowlight.data.image_io), re-exported: readers and users import them from here.
from lowlight.data.image_io import (  # noqa: F401
    IMAGE_EXTENSIONS,
    SPLIT_RULES,
    CorruptImageError,
    _report_skipped,
    decode_image,
    list_files,
    read_image,
    resize_square,
    split_indices,
    to_uint8_rgb,
)

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
# Readers in their own modules (they import lowlight.data.image_io, not this file, so these
# imports cannot cycle).
# ---------------------------------------------------------------------------------------------

from lowlight.data import recordio as _recordio  # noqa: E402
from lowlight.data import verification_sets as _verification  # noqa: E402
from lowlight.data.image_folder import ImageFolder  # noqa: E402

# The public names of ../shared/API.md.
RecordIO = _recordio.RecordIO
read_verification_bin = _verification.read_verification_bin
RecordIOError = _recordio.RecordIOError
write_recordio = _recordio.write_recordio
LFWPairs = _verification.LFWPairs
UnsafePickleError = _verification.UnsafePickleError
VerificationBin = _verification.VerificationBin
write_verification_bin = _verification.write_verification_bin
__all_readers__ = (ImageFolder,)
