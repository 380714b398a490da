"""Face-verification pair sets: insightface `.bin` files and LFW's `pairs.txt` + image folders.

Both give what `lowlight.eval.verification.evaluate` consumes: images uint8 (2N, H, W, 3) RGB
with pair i at rows 2i and 2i+1, and issame bool (N,).

insightface `.bin` (lfw.bin, cfp_fp.bin, agedb_30.bin, ... shipped with the MS1M/Glint packs):
a pickle of `(bins, issame_list)`, bins = 2N encoded images (JPEG/PNG bytes), issame_list = N
bools. insightface writes it with `pickle.dump((bins, issame_list), f,
protocol=pickle.HIGHEST_PROTOCOL)` and reads it with `pickle.load` (Python-2-era files need
`encoding="bytes"`: their `str` images are not ASCII).

Security rule: `pickle.load` on a downloaded file runs any callable the file names, so files are
read with `RestrictedUnpickler`, whose `find_class` refuses every global except this allow-list
(no other opcode can reach a callable):
  * numpy's own array / scalar / dtype reconstructors (`numpy[._]core.multiarray._reconstruct`,
    `...scalar`, `numpy[._]core.numeric._frombuffer` (protocol 5), `numpy.ndarray`,
    `numpy.dtype`), with the dtype restricted to bool and integer
    kinds: some .bin files carry issame as a numpy bool array or numpy bools. These build plain
    arrays from raw bytes and execute nothing else; object arrays are refused (dtype 'O').
  * `_codecs.encode(text, "latin1")`, which is how Python 3 pickles `bytes` at protocols 0-2.
Anything else (`os.system`, `builtins.eval`, `subprocess.Popen`, ...) raises `UnsafePickleError`
naming the file and the global; nothing the file asks for is called. After loading, the object
must be `(sequence of bytes, sequence of bools)`, else ValueError naming the file.

Corrupt-pair rule (both formats): a pair with an image that does not decode (or, for LFW, whose
file is missing) cannot be evaluated, so the *pair* is dropped — both images and its issame
entry — keeping images and issame aligned. Dropped pairs are named in one warning and kept in
`dropped` (original pair index -> reason) and `skipped` (reason -> image names); `pair_index`
maps kept pairs to their original index (and `fold` to their LFW fold) so a caller can tell
that the 10-fold split of the remaining pairs no longer lines up with the published folds.

Size rule: with `size`, every image is resized to size x size; with size=None the target is the
most common stored (H, W) (ties: the first seen) and other sizes are resized to it — insightface
resizes too (`resize_short`) — since the images must stack. Channel / depth repairs follow
`sources.to_uint8_rgb`. Repairs are counted in `repaired` / `stats` and named in one warning.

Random access (`ds[i]` -> dict(image1, image2, issame, pair)) indexes the loaded arrays: the first
access (or `len`) runs `load()`, which decodes everything once (LFW: 13k images, about a second
at 112 px), so which pairs exist never depends on access order.
"""

from __future__ import annotations

import collections
import io
import operator
import os
import pickle
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import logging

from lowlight.data.image_folder import (
    check_size,
    decode_noting,
    encode_image,
    fit_image,
    report_repairs,
)
from lowlight.data.image_io import CorruptImageError

_MAX_NAMES = 50

# ---------------------------------------------------------------------------------------------
# Restricted unpickling
# ---------------------------------------------------------------------------------------------


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names a global outside the allow-list; nothing it names was called."""

    def __init__(self, path: str, global_name: str):
        super().__init__(
            f"{path}: refusing to load global {global_name!r}: a verification .bin holds only "
            "bytes, lists and bools (and numpy bool arrays), so this file is either not a .bin "
            "or was crafted to execute code on load")
        self.path = path
        self.global_name = global_name


_NP_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy.{_core,core}.multiarray._reconstruct
_NP_SCALAR = np.bool_(True).__reduce__()[0]  # numpy.{_core,core}.multiarray.scalar


def _safe_dtype(spec: Any, align: bool = False, copy: bool = False) -> np.dtype:
    dtype = np.dtype(spec, bool(align), bool(copy))
    if dtype.kind not in "biu" or dtype.fields is not None or dtype.subdtype is not None:
        raise pickle.UnpicklingError(f"refusing numpy dtype {dtype!r}: only bool and integer "
                                     "dtypes may appear in a verification .bin")
    return dtype


def _safe_reconstruct(subtype: Any, shape: Any, dtype_code: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"refusing to reconstruct an array of type {subtype!r}")
    return _NP_RECONSTRUCT(subtype, shape, _safe_dtype(dtype_code))


def _safe_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype):
        raise pickle.UnpicklingError("numpy scalar without a dtype")
    _safe_dtype(dtype)
    return _NP_SCALAR(dtype, data) if data is not None else _NP_SCALAR(dtype)


def _safe_frombuffer(buffer: Any, dtype: Any, shape: Any, order: str = "C") -> np.ndarray:
    # Protocol 5 pickles arrays as _frombuffer(bytes, dtype, shape, order).
    array = np.frombuffer(bytes(buffer), dtype=_safe_dtype(dtype))
    return array.reshape(tuple(int(d) for d in shape), order="F" if order == "F" else "C")


def _latin1_encode(text: Any, encoding: str = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding.lower().replace("-", "") != "latin1":
        raise pickle.UnpicklingError("_codecs.encode is allowed only as encode(str, 'latin1')")
    return text.encode("latin1")


_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[..., Any] | type] = {
    **{(m, "_reconstruct"): _safe_reconstruct
       for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "scalar"): _safe_scalar for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_frombuffer"): _safe_frombuffer for m in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _safe_dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose `find_class` allows only `_ALLOWED_GLOBALS` (see module doc)."""

    def __init__(self, file: io.BufferedIOBase, *, path: str = "<pickle>", **kwargs: Any):
        super().__init__(file, **kwargs)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        target = _ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise UnsafePickleError(self.path, f"{module}.{name}")
        return target


def safe_load_pickle(path: str) -> Any:
    """Unpickles `path` with `RestrictedUnpickler`, as insightface's load_bin does: first with
    the default encoding, then with encoding="bytes" if a Python 2 `str` is not ASCII."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return RestrictedUnpickler(io.BytesIO(data), path=path).load()
    except UnicodeDecodeError:
        return RestrictedUnpickler(io.BytesIO(data), path=path, encoding="bytes").load()


def _as_bytes(x: Any) -> bytes | None:
    if isinstance(x, (bytes, bytearray, memoryview)):
        return bytes(x)
    if isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 1:
        return x.tobytes()
    return None


def _parse_bin(obj: Any, path: str) -> tuple[list[bytes], np.ndarray]:
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise ValueError(f"{path}: not an insightface verification .bin: expected a pickled "
                         f"(bins, issame_list) pair, got {type(obj).__name__}")
    bins, issame = obj
    if not isinstance(bins, (list, tuple)):
        raise ValueError(f"{path}: bins: expected a list of encoded images, got "
                         f"{type(bins).__name__}")
    out = []
    for j, b in enumerate(bins):
        data = _as_bytes(b)
        if data is None:
            raise ValueError(f"{path}: bins[{j}]: expected encoded image bytes, got "
                             f"{type(b).__name__}")
        out.append(data)
    flags = np.asarray(issame)
    if flags.ndim != 1 or flags.dtype.kind not in "biu" or (
            flags.dtype.kind != "b" and not np.isin(flags, (0, 1)).all()):
        raise ValueError(f"{path}: issame_list: expected a flat list of bools, got "
                         f"{type(issame).__name__} of dtype {flags.dtype}, shape {flags.shape}")
    flags = flags.astype(bool)
    if len(out) < 2 * len(flags):
        raise ValueError(f"{path}: {len(out)} images for {len(flags)} pairs (need "
                         f"{2 * len(flags)})")
    if len(out) > 2 * len(flags):
        logging.warning("%s: %d images for %d pairs; ignoring the last %d (as insightface "
                        "does)", path, len(out), len(flags), len(out) - 2 * len(flags))
        out = out[:2 * len(flags)]
    return out, flags


def write_verification_bin(path: str, images: np.ndarray | Sequence[bytes | np.ndarray],
                           issame: Sequence[bool] | np.ndarray, *, ext: str = ".jpg",
                           quality: int = 95) -> None:
    """Writes an insightface verification .bin: `pickle.dump((bins, issame_list))`.

    Args:
      path: output file.
      images: 2N images, uint8 RGB (H, W, 3) arrays (encoded with `ext`) or encoded bytes (kept
        as is); pair i is images 2i and 2i+1.
      issame: N bools.
      ext, quality: codec for array images (".jpg" with `quality`, or ".png").
    """
    flags = [bool(s) for s in np.asarray(issame, bool).reshape(-1)]
    bins = [encode_image(im, ext, quality) for im in images]
    if len(bins) != 2 * len(flags):
        raise ValueError(f"{len(bins)} images for {len(flags)} pairs (need {2 * len(flags)})")
    with open(path, "wb") as f:
        pickle.dump((bins, flags), f, protocol=pickle.HIGHEST_PROTOCOL)


# ---------------------------------------------------------------------------------------------
# Shared pair assembly
# ---------------------------------------------------------------------------------------------


def _warn_dropped(reader: str, where: str, dropped: dict[int, str], total: int) -> None:
    if not dropped:
        return
    items = sorted(dropped.items())
    shown = "; ".join(f"pair {p}: {why}" for p, why in items[:_MAX_NAMES])
    more = len(items) - _MAX_NAMES
    logging.warning("%s(%s): dropped %d of %d pairs (a broken pair cannot be evaluated; images "
                    "and issame stay aligned): %s%s", reader, where, len(items), total, shown,
                    f" (+{more} more; see .dropped)" if more > 0 else "")


class _PairSet:
    """Decode-once pair container shared by VerificationBin and LFWPairs (see module doc)."""

    size: int | None
    dropped: dict[int, str]
    skipped: dict[str, list[str]]
    repaired: dict[str, list[str]]
    _issame_all: np.ndarray
    _loaded: tuple[np.ndarray, np.ndarray] | None = None
    pair_index: np.ndarray | None = None

    def _names(self) -> Sequence[str]:
        raise NotImplementedError

    def _decode(self, j: int) -> tuple[np.ndarray, tuple[str, ...]]:
        raise NotImplementedError

    def _where(self) -> str:
        raise NotImplementedError

    def _release(self) -> None:
        """Frees what load() no longer needs (the encoded bytes)."""

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """(images uint8 (2K, H, W, 3) RGB, issame bool (K,)) for the K pairs that survive the
        corrupt-pair rule; decoded on the first call, cached after."""
        if self._loaded is not None:
            return self._loaded
        names, n = self._names(), len(self._issame_all)
        before = dict(self.dropped)
        decoded: list[tuple[np.ndarray, tuple[str, ...]] | None] = [None] * (2 * n)
        for j in range(2 * n):
            if j // 2 in self.dropped:
                continue
            try:
                decoded[j] = self._decode(j)
            except CorruptImageError as e:
                self.dropped[j // 2] = f"corrupt image {names[j]} ({e.reason})"
                self.skipped.setdefault("corrupt", []).append(names[j])
        if "corrupt" in self.skipped:  # an LFW image can sit in several pairs: name it once
            self.skipped["corrupt"] = list(dict.fromkeys(self.skipped["corrupt"]))
        kept = [p for p in range(n) if p not in self.dropped]
        if self.size is not None:
            shape = (self.size, self.size)
        else:
            shapes = collections.Counter(decoded[j][0].shape[:2]
                                         for p in kept for j in (2 * p, 2 * p + 1))
            shape = shapes.most_common(1)[0][0] if shapes else None
        images, repaired = [], {}
        for p in kept:
            for j in (2 * p, 2 * p + 1):
                image, notes = decoded[j]
                image, resized = fit_image(image, shape)
                for note in (*notes, "resized") if resized else notes:
                    repaired.setdefault(note, {})[names[j]] = None
                images.append(image)
        self.repaired = {k: list(v) for k, v in repaired.items()}
        self.pair_index = np.asarray(kept, np.int64)
        h, w = shape if shape is not None else (0, 0)
        stacked = np.stack(images) if images else np.zeros((0, h, w, 3), np.uint8)
        self._loaded = (stacked, self._issame_all[self.pair_index])
        self._release()
        reader = type(self).__name__
        _warn_dropped(reader, self._where(),
                      {p: r for p, r in self.dropped.items() if p not in before}, n)
        report_repairs(reader, self._where(), self.repaired, 2 * len(kept))
        return self._loaded

    @property
    def stats(self) -> dict[str, int]:
        """Counts: pairs in the file, kept and dropped pairs, skip reasons, repairs."""
        out = {"pairs": len(self._issame_all)}
        if self._loaded is not None:
            out["kept_pairs"] = len(self._loaded[1])
        out["dropped_pairs"] = len(self.dropped)
        out.update({f"skipped/{r}": len(v) for r, v in self.skipped.items()})
        out.update({f"repaired/{r}": len(v) for r, v in self.repaired.items()})
        return out

    def __len__(self) -> int:
        return len(self.load()[1])

    def __getitem__(self, i: int) -> dict[str, Any]:
        images, issame = self.load()
        i = operator.index(i)
        if not -len(issame) <= i < len(issame):
            raise IndexError(f"pair {i} out of range for {type(self).__name__} with "
                             f"{len(issame)} pairs")
        i %= len(issame)
        return dict(image1=images[2 * i], image2=images[2 * i + 1], issame=bool(issame[i]),
                    pair=int(self.pair_index[i]))


# ---------------------------------------------------------------------------------------------
# insightface .bin
# ---------------------------------------------------------------------------------------------


class VerificationBin(_PairSet):
    """An insightface verification .bin (see module doc for the format and the rules).

    The file is unpickled (restricted) and checked at construction; images are decoded by
    `load()` (or the first `len` / `[i]`).

    Attributes (after load): `pair_index` (K,) original pair of each kept pair, `dropped`
    {pair: reason}, `skipped` {"corrupt": [image names]}, `repaired` {repair: [image names]},
    `stats`. Image names are `path[image j]`, j the position in the file's image list.
    """

    def __init__(self, path: str, *, size: int | None = None):
        self.path = os.fspath(path)
        self.size = check_size(size)
        self._bins, self._issame_all = _parse_bin(safe_load_pickle(self.path), self.path)
        self.dropped, self.skipped, self.repaired = {}, {}, {}

    def _names(self) -> Sequence[str]:
        return [f"{self.path}[image {j}]" for j in range(len(self._bins))]

    def _decode(self, j: int) -> tuple[np.ndarray, tuple[str, ...]]:
        return decode_noting(self._bins[j], f"{self.path}[image {j}]")

    def _where(self) -> str:
        return self.path

    def _release(self) -> None:
        self._bins = None

    def __repr__(self) -> str:
        return f"VerificationBin({self.path!r}, pairs={len(self._issame_all)})"


def read_verification_bin(path: str, *, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Reads an insightface verification .bin safely.

    Returns:
      (images uint8 (2N, H, W, 3) RGB, issame bool (N,)), pair i = images 2i and 2i+1, after
      the corrupt-pair rule (dropped pairs are logged; use `VerificationBin` to inspect them).

    Raises:
      UnsafePickleError: the pickle names a global outside the allow-list (not executed).
      ValueError: the pickle is not (bins, issame_list).
    """
    return VerificationBin(path, size=size).load()


# ---------------------------------------------------------------------------------------------
# LFW pairs.txt
# ---------------------------------------------------------------------------------------------

#: Where LFW keeps image `num` of person `name`, relative to the image root.
LFW_FILENAME = "{name}/{name}_{num:04d}.jpg"


def parse_pairs_txt(path: str) -> tuple[list[tuple[str, int, str, int, bool, int]], int, int]:
    """Parses LFW's pairs.txt.

    First line: `folds<TAB>pairs_per_fold` (View 2: `10 300`, each fold being 300 same-person
    lines then 300 different-person lines) or a single pair count (View 1's pairsDevTrain.txt:
    `1100`, same then different). Then `name n1 n2` (same person) or `name1 n1 name2 n2`
    (different people), white-space separated.

    Returns:
      ([(name1, num1, name2, num2, issame, line_number)], folds, pairs_per_fold), with
      pairs_per_fold counting same + different pairs of one fold.
    """
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if not lines:
        raise ValueError(f"{path}: empty pairs file")
    head = lines[0].split()
    if not head or len(head) > 2 or not all(re.fullmatch(r"\d+", t) for t in head):
        raise ValueError(f"{path}:1: expected 'folds pairs_per_fold' or a pair count, got "
                         f"{lines[0]!r}")
    folds, per_fold = (1, int(head[0])) if len(head) == 1 else (int(head[0]), 2 * int(head[1]))
    pairs = []
    for no, line in enumerate(lines[1:], start=2):
        t = line.split()
        try:
            if len(t) == 3:
                pairs.append((t[0], int(t[1]), t[0], int(t[2]), True, no))
            elif len(t) == 4:
                pairs.append((t[0], int(t[1]), t[2], int(t[3]), False, no))
            elif t:
                raise ValueError
        except ValueError:
            raise ValueError(f"{path}:{no}: expected 'name n1 n2' or 'name1 n1 name2 n2', got "
                             f"{line!r}") from None
    if len(pairs) != folds * per_fold:
        logging.warning("%s: header announces %d folds x %d pairs = %d, found %d pairs", path,
                        folds, per_fold, folds * per_fold, len(pairs))
    return pairs, folds, per_fold


class LFWPairs(_PairSet):
    """LFW verification pairs from `pairs.txt` and the image folder (see module doc).

    Missing files are found at construction: their pairs are dropped and listed in one warning
    (`dropped`, `skipped["missing_file"]`, relative paths). Corrupt images are found by
    `load()` and handled by the same rule. Each distinct image is decoded once.

    Args:
      root: image root (`lfw/` or an aligned copy such as `lfw-112x112/`).
      pairs_txt: path of pairs.txt (or pairsDevTest.txt, ...).
      size: output size, see module doc.
      filename: template of an image path relative to root, with fields name and num.

    Attributes: as `VerificationBin`, plus `folds`, `pairs_per_fold` (from the header) and, after
    load, `fold` (K,): the published fold of each kept pair.
    """

    def __init__(self, root: str, pairs_txt: str, *, size: int | None = None,
                 filename: str = LFW_FILENAME):
        self.root, self.pairs_txt = os.fspath(root), os.fspath(pairs_txt)
        self.size = check_size(size)
        pairs, self.folds, self.pairs_per_fold = parse_pairs_txt(self.pairs_txt)
        self.files = []
        for name1, n1, name2, n2, _, _ in pairs:
            self.files += [filename.format(name=name1, num=n1), filename.format(name=name2,
                                                                                 num=n2)]
        self._issame_all = np.asarray([p[4] for p in pairs], bool)
        self._lines = [p[5] for p in pairs]
        self.dropped, self.skipped, self.repaired = {}, {}, {}
        exists = {rel: os.path.isfile(os.path.join(self.root, rel)) for rel in set(self.files)}
        missing: dict[str, None] = {}
        for j, rel in enumerate(self.files):
            if not exists[rel]:
                missing[rel] = None
                p = j // 2
                why = self.dropped.get(p, f"line {self._lines[p]}: missing")
                self.dropped[p] = f"{why} {rel}"
        if missing:
            self.skipped["missing_file"] = list(missing)
        _warn_dropped(type(self).__name__, self._where(), self.dropped, len(pairs))
        self._cache: dict[str, Any] = {}

    def _names(self) -> Sequence[str]:
        return self.files

    def _decode(self, j: int) -> tuple[np.ndarray, tuple[str, ...]]:
        rel = self.files[j]
        if rel not in self._cache:
            path = os.path.join(self.root, rel)
            try:
                with open(path, "rb") as f:
                    self._cache[rel] = decode_noting(f.read(), path)
            except CorruptImageError as e:
                self._cache[rel] = e
        out = self._cache[rel]
        if isinstance(out, CorruptImageError):
            raise out
        return out

    def _where(self) -> str:
        return f"{self.root}, {os.path.basename(self.pairs_txt)}"

    def _release(self) -> None:
        self._cache = {}

    @property
    def fold(self) -> np.ndarray:
        """Published fold (0-based) of each kept pair."""
        self.load()
        return self.pair_index // max(self.pairs_per_fold, 1)

    def __repr__(self) -> str:
        return (f"LFWPairs(root={self.root!r}, pairs_txt={self.pairs_txt!r}, "
                f"pairs={len(self._issame_all)}, dropped={len(self.dropped)})")
