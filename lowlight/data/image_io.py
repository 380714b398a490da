"""Image decoding, validation, folder listing, skip reporting and seeded splits shared by every
real-format reader (UTKFace, RecordIO, verification .bin / LFW, image folders, prepared sets).

One conversion rule for every reader: `to_uint8_rgb` (grey → 3 channels, alpha dropped, 16-bit
→ round(x/257), floats clipped to [0, 1] and scaled); corrupt or truncated data raises
`CorruptImageError` naming the file. Re-exported by `lowlight.data.sources`.
"""

from __future__ import annotations

import math
import operator
import os
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
