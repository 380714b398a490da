"""MXNet RecordIO (`train.rec` + `train.idx`) in pure Python + numpy: insightface's training packs.

MS1M-ArcFace, MS1M-RetinaFace, Glint360K, WebFace and CASIA packs ship as RecordIO. `RecordIO`
here reads them without mxnet or its C library; the format itself (framing, IRHeader payload,
.idx, insightface's header records) and `write_recordio` are in `lowlight.data.mxrecord`, whose
public names this module re-exports.

Rules chosen here:
  * Header detection (`header=None`): record 0 is a header when its flag > 0 *and* it carries no
    image bytes (insightface writes `pack(header, b'')`); MXFaceDataset checks only flag > 0,
    which would also swallow an image record 0 with a multi-float label. `header=True/False`
    forces it. With a header, image keys are 1..id_start-1; keys the .idx lacks are skipped
    ("missing_key"). Without, image records are all keys in .idx order.
  * Index: `scan=False` needs the .idx; `scan=True` rebuilds it by walking the .rec (keys =
    record ordinals, which is what im2rec and insightface's packers write) and `write_idx=True`
    saves it. At construction the .idx offsets are checked against the file size and the
    record at the largest offset is read, so a truncated .rec fails at once with a
    `RecordIOError` naming the file and the record's offset (as it does at access time).
  * Corrupt images: nothing is skipped at access time (that would make `ds[i]` depend on what
    was read before); `ds[i]` raises `CorruptImageError` naming `rec[key=K]` every time, unless
    the reader was built with `validate=True`, which decodes every image once and drops the
    failures ("corrupt"), counting repairs (grey, alpha, 16-bit, size) as well.
  * Repairs: channels/depth by `sources.to_uint8_rgb`; with `size` every image is resized to
    size x size.
  * Processes: the file is opened lazily per process (reopened when the pid changes, i.e. after
    fork) and read with `os.pread` (no shared file position, so threads are safe); pickling
    drops the handle, so readers travel to grain workers.
"""

from __future__ import annotations

import operator
import os
import struct
import threading
from typing import Any

import numpy as np

from lowlight.data import image_io
from lowlight.data.image_folder import (
    check_size,
    decode_noting,
    note_repairs,
    report_repairs,
)
from lowlight.data.image_io import CorruptImageError, decode_image, resize_square
from lowlight.data.mxrecord import (  # noqa: F401  (public names re-exported)
    _FRAME,
    _IR,
    _LEN_BITS,
    _LEN_MASK,
    MAGIC,
    IRHeader,
    RecordIOError,
    _default_idx,
    _label_value,
    _read_record,
    frame,
    iter_records,
    pack,
    read_index,
    scan_index,
    unpack,
    write_index,
    write_recordio,
)

# ---------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------


class RecordIO:
    """Random access to an MXNet RecordIO pack: `ds[i]` -> (image uint8 RGB (H, W, 3), label int).

    See the module docstring for the layout and the rules (header detection, index rebuild,
    corrupt images, processes). `len(ds)` is the number of image records.

    Args:
      rec_path: the .rec file.
      idx_path: its .idx (default: rec_path with the extension replaced by .idx).
      scan: rebuild the index by walking the .rec instead of reading the .idx.
      write_idx: with scan, also write the rebuilt index to idx_path.
      header: None (detect), True or False: whether record 0 is insightface's header.
      size: resize images to size x size, or None to keep them as stored.
      validate: decode every image at construction; drop the ones that fail.

    Attributes:
      keys, offsets: int64 (len,) key and byte offset of every image record.
      header_label: record 0's labels (id_start, id_end) as floats, or None without a header.
      skipped: reason -> record names ("missing_key", "corrupt"), repaired: repair -> names.
      labels (property): int64 (len,), read lazily (one small read per record) and cached.
      identity_ranges (property): int64 (num_ids, 2) from the identity records, lazily.
    """

    def __init__(self, rec_path: str, idx_path: str | None = None, *, scan: bool = False,
                 write_idx: bool = False, header: bool | None = None, size: int | None = None,
                 validate: bool = False):
        self.rec_path = os.fspath(rec_path)
        self.idx_path = _default_idx(self.rec_path) if idx_path is None else os.fspath(idx_path)
        self.size = check_size(size)
        self._fd, self._pid, self._lock = None, None, threading.Lock()
        if not os.path.isfile(self.rec_path):
            raise FileNotFoundError(f"RecordIO: {self.rec_path!r} not found")
        self._file_size = os.path.getsize(self.rec_path)
        if scan:
            keys, offsets = scan_index(self.rec_path)
            if write_idx:
                write_index(self.idx_path, keys, offsets)
        elif not os.path.isfile(self.idx_path):
            raise FileNotFoundError(f"RecordIO: index {self.idx_path!r} not found; "
                                    "RecordIO(..., scan=True) rebuilds it from the .rec "
                                    "(add write_idx=True to save it)")
        else:
            keys, offsets = read_index(self.idx_path)
            self._check_offsets(keys, offsets)
        self._all_keys, self._all_offsets = keys, offsets
        self._sorted = np.argsort(keys, kind="stable")
        self._spans = self._extents(offsets)

        skipped: dict[str, list[str]] = {}
        positions = self._image_positions(header, skipped)
        self.keys, self.offsets = keys[positions], offsets[positions]
        self._hints = self._spans[positions]
        self._labels: np.ndarray | None = None
        self.repaired: dict[str, list[str]] = {}
        if validate:
            self._validate(skipped)
        self.skipped = {r: v for r, v in skipped.items() if v}
        self.validated = bool(validate)
        total = len(self.keys) + sum(len(v) for v in self.skipped.values())
        image_io._report_skipped(type(self).__name__, self.rec_path, self.skipped, total)
        report_repairs(type(self).__name__, self.rec_path, self.repaired, len(self.keys))

    # -- index build --------------------------------------------------------------------------

    def _check_offsets(self, keys: np.ndarray, offsets: np.ndarray) -> None:
        bad = (offsets < 0) | (offsets + 8 > self._file_size)
        if bad.any():
            shown = ", ".join(f"key {k} at {o}" for k, o in zip(keys[bad][:5], offsets[bad][:5]))
            raise RecordIOError(self.rec_path, int(offsets[bad][0]),
                                f"{int(bad.sum())} .idx entries point past the end of the file "
                                f"({self._file_size} bytes): {shown} (truncated .rec, or "
                                f"{self.idx_path} belongs to another file)")
        if len(offsets):  # the last record must be complete: catches a truncated tail at once
            last = int(np.argmax(offsets))
            _read_record(self._read, self.rec_path, int(offsets[last]),
                         self._file_size - int(offsets[last]))

    def _extents(self, offsets: np.ndarray) -> np.ndarray:
        """Bytes from each offset to the next record (the file end for the last)."""
        order = np.argsort(offsets, kind="stable")
        ordered = offsets[order]
        nxt = np.append(ordered[1:], self._file_size)
        spans = np.empty_like(offsets)
        spans[order] = nxt - ordered
        return np.clip(spans, 8, 1 << _LEN_BITS)

    def _position(self, key: int) -> int | None:
        j = np.searchsorted(self._all_keys, key, sorter=self._sorted)
        if j < len(self._sorted) and self._all_keys[self._sorted[j]] == key:
            return int(self._sorted[j])
        return None

    def _image_positions(self, header: bool | None, skipped: dict[str, list[str]]) -> np.ndarray:
        self.header_label = None
        pos0 = self._position(0)
        if header is not False and pos0 is not None:
            h, rest = unpack(self._record_at(pos0), f"{self.rec_path}[key=0]")
            if h.flag > 0 and (header or not rest):
                self.header_label = tuple(float(v) for v in h.label)
            elif header:
                raise ValueError(f"{self.rec_path}: header=True but record 0 has flag "
                                 f"{h.flag} (an insightface header has flag > 0)")
        elif header:
            raise ValueError(f"{self.rec_path}: header=True but there is no record with key 0")
        if self.header_label is None:
            return np.arange(len(self._all_keys))
        wanted = np.arange(1, int(self.header_label[0]), dtype=np.int64)
        j = np.searchsorted(self._all_keys, wanted, sorter=self._sorted)
        j = np.minimum(j, max(len(self._sorted) - 1, 0))
        found = self._all_keys[self._sorted[j]] == wanted
        skipped["missing_key"] = [f"key={k}" for k in wanted[~found]]
        return self._sorted[j[found]]

    def _validate(self, skipped: dict[str, list[str]]) -> None:
        keep, labels = [], []
        for i in range(len(self.keys)):
            name = self._name(i)
            try:
                h, data = unpack(self._record(i), name)
                image, notes = decode_noting(data, name)
            except RecordIOError:
                raise  # the file's structure is broken, not one image
            except (CorruptImageError, ValueError):  # undecodable, or shorter than its IRHeader
                skipped.setdefault("corrupt", []).append(self._short(i))
                continue
            if self.size is not None and image.shape[:2] != (self.size, self.size):
                notes = (*notes, "resized")
            note_repairs(self.repaired, self._short(i), notes)
            keep.append(i)
            labels.append(int(_label_value(h)))
        self.keys, self.offsets, self._hints = (a[keep] for a in (self.keys, self.offsets,
                                                                    self._hints))
        self._labels = np.asarray(labels, np.int64)

    # -- file access --------------------------------------------------------------------------

    def _read(self, n: int, pos: int) -> bytes:
        if self._fd is None or self._pid != os.getpid():
            with self._lock:  # two threads' first reads must not both open the file
                if self._fd is None or self._pid != os.getpid():
                    self._fd = os.open(self.rec_path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                    self._pid = os.getpid()
        if hasattr(os, "pread"):
            return os.pread(self._fd, n, pos)
        with self._lock:  # no pread (Windows): seek + read under a lock
            os.lseek(self._fd, pos, os.SEEK_SET)
            return os.read(self._fd, n)

    def _record_at(self, position: int) -> bytes:
        return _read_record(self._read, self.rec_path, int(self._all_offsets[position]),
                            int(self._spans[position]))

    def _record(self, i: int) -> bytes:
        return _read_record(self._read, self.rec_path, int(self.offsets[i]), int(self._hints[i]))

    def _short(self, i: int) -> str:
        return f"key={int(self.keys[i])}"

    def _name(self, i: int) -> str:
        return f"{self.rec_path}[{self._short(i)}]"

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_fd=None, _pid=None, _lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- public access ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.keys)

    def _check(self, i: int) -> int:
        i = operator.index(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for RecordIO {self.rec_path!r} with "
                             f"{len(self)} images")
        return i % len(self)

    def read_raw(self, i: int) -> tuple[IRHeader, bytes]:
        """(IRHeader, encoded image bytes) of image record i, undecoded."""
        i = self._check(i)
        return unpack(self._record(i), self._name(i))

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        i = self._check(i)
        name = self._name(i)
        h, data = unpack(self._record(i), name)
        image = decode_image(data, name)
        if self.size is not None:
            image = resize_square(image, self.size)
        return image, int(_label_value(h))

    @property
    def labels(self) -> np.ndarray:
        """int64 (len,) labels of the image records (first float label when flag > 0)."""
        if self._labels is None:
            out = np.empty(len(self), np.int64)
            for i in range(len(self)):
                out[i] = self._label_at(i)
            self._labels = out
        return self._labels

    def _label_at(self, i: int) -> int:
        # Reads 8 frame bytes + IRHeader + one float label; the whole record only when its
        # first part is shorter than that (a magic word inside the IRHeader splits it there).
        need = _IR.size + 4
        head = self._read(8 + need, int(self.offsets[i]))
        if len(head) >= 8:
            magic, lrec = _FRAME.unpack_from(head)
            cflag, length = lrec >> _LEN_BITS, lrec & _LEN_MASK
            prefix = head[8:8 + min(length, need)]
            if magic == MAGIC and (cflag == 0 or length >= need) and \
                    len(prefix) == min(length, need) and len(prefix) >= _IR.size:
                flag, label, _, _ = _IR.unpack_from(prefix)
                if flag == 0:
                    return int(label)
                if len(prefix) == need:
                    return int(struct.unpack_from("<f", prefix, _IR.size)[0])
        return int(_label_value(unpack(self._record(i), self._name(i))[0]))

    @property
    def identity_ranges(self) -> np.ndarray:
        """int64 (num_ids, 2): [first, last+1) image keys per identity record (empty if none)."""
        if getattr(self, "_identity_ranges", None) is None:
            rows = []
            if self.header_label is not None and len(self.header_label) >= 2:
                for key in range(int(self.header_label[0]), int(self.header_label[1])):
                    pos = self._position(key)
                    if pos is None:
                        continue
                    h, _ = unpack(self._record_at(pos), f"{self.rec_path}[key={key}]")
                    if h.flag >= 2:
                        rows.append((int(h.label[0]), int(h.label[1])))
            self._identity_ranges = np.asarray(rows, np.int64).reshape(-1, 2)
        return self._identity_ranges

    @property
    def num_classes(self) -> int:
        """Identity records when the pack has them, else max(label) + 1."""
        if len(self.identity_ranges):
            return len(self.identity_ranges)
        return int(self.labels.max()) + 1 if len(self) else 0

    @property
    def stats(self) -> dict[str, int]:
        out = {"images": len(self), "records": len(self._all_keys)}
        out.update({f"skipped/{r}": len(v) for r, v in self.skipped.items()})
        out.update({f"repaired/{r}": len(v) for r, v in self.repaired.items()})
        return out

    def __repr__(self) -> str:
        return (f"RecordIO({self.rec_path!r}, len={len(self)}, header={self.header_label}, "
                f"skipped={ {r: len(v) for r, v in self.skipped.items()} })")
