"""MXNet RecordIO format in pure Python + numpy: framing, record payloads, the .idx index, and a
writer. The random-access reader built on it is `lowlight.data.recordio.RecordIO`, which also
re-exports everything public here.

Reading packs needs neither mxnet nor its C library; `write_recordio` writes the same layout
(for tests, benchmarks and converting folders into packs).

Framing (dmlc-core `recordio.h` / `recordio.cc`, which mxnet uses):
  * A record on disk is one or more parts. Each part: the magic word 0xced7230a (uint32 LE), a
    uint32 LE `lrec` = cflag << 29 | length (upper 3 bits: continuation flag, lower 29 bits:
    byte count), `length` payload bytes, zero padding to a multiple of 4.
  * cflag 0 = whole record; 1 = first part, 2 = middle part, 3 = last part. dmlc's writer splits a
    record exactly where its payload holds the magic word at a 4-byte aligned position and drops
    those 4 bytes, so the reader re-inserts the magic between parts when it joins them (this is
    what keeps a reader that re-synchronises on the magic from mistaking data for a boundary).
    `frame` reproduces the writer byte for byte, `read`/`iter_records` the joining.
  * `.idx`: text lines `key<TAB>offset`, offset = byte position of the record's first part
    (`MXIndexedRecordIO.write_idx`). Keys are integers in insightface and im2rec packs.

Record payload (`mx.recordio.pack`): an IRHeader `(flag, label, id, id2)` packed as `<IfQQ` (24
bytes; mxnet packs native 'IfQQ', which has the same layout on every little-endian machine),
then, when flag > 0, `flag` float32 labels (the header's own label field is then 0 and the label
is the first of those floats), then the encoded image (JPEG/PNG).

insightface layout (what `recognition/arcface_torch/dataset.py` MXFaceDataset reads): record 0 is
a header with flag > 0 and no image whose labels are (id_start, id_end); image records are keys
1 .. id_start-1; keys id_start .. id_end-1 are one record per identity, labels (first, last+1)
of that identity's image keys. MXFaceDataset uses `range(1, int(header.label[0]))` when record
0's flag > 0, otherwise every key of the .idx. Packs made by im2rec have no header.
"""

from __future__ import annotations

import collections
import numbers
import os
import struct
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from absl import logging

from lowlight.data.image_folder import encode_image

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_FRAME = struct.Struct("<II")
_IR = struct.Struct("<IfQQ")
_LEN_BITS = 29
_LEN_MASK = (1 << _LEN_BITS) - 1
_DEFAULT_READ = 1 << 16  # first read of a record whose extent is unknown

IRHeader = collections.namedtuple("IRHeader", ["flag", "label", "id", "id2"])
IRHeader.__doc__ = """mxnet's image record header; label is a float or, when flag > 0, a float32
array of `flag` labels."""


class RecordIOError(ValueError):
    """A malformed or truncated RecordIO file; names the file and the record's byte offset."""

    def __init__(self, path: str, offset: int, reason: str):
        super().__init__(f"{path}: record at byte offset {offset}: {reason}")
        self.path, self.offset, self.reason = path, offset, reason


# ---------------------------------------------------------------------------------------------
# Payload (IRHeader) and framing
# ---------------------------------------------------------------------------------------------


def pack(header: IRHeader | tuple, payload: bytes) -> bytes:
    """`mx.recordio.pack`: IRHeader (+ float32 labels when the label is a sequence) + payload."""
    flag, label, id_, id2 = header
    if isinstance(label, numbers.Number):
        return _IR.pack(0, float(label), int(id_), int(id2)) + bytes(payload)
    labels = np.asarray(label, np.float32).reshape(-1)
    if labels.size == 0:
        raise ValueError("a sequence label must hold at least one value")
    return _IR.pack(labels.size, 0.0, int(id_), int(id2)) + labels.astype("<f4").tobytes() + \
        bytes(payload)


def unpack(record: bytes, name: str = "<record>") -> tuple[IRHeader, bytes]:
    """`mx.recordio.unpack`: (IRHeader, the rest: usually an encoded image)."""
    if len(record) < _IR.size:
        raise ValueError(f"{name}: record of {len(record)} bytes is shorter than an IRHeader "
                         f"({_IR.size} bytes)")
    flag, label, id_, id2 = _IR.unpack_from(record)
    rest = record[_IR.size:]
    if flag > 0:
        if len(rest) < 4 * flag:
            raise ValueError(f"{name}: IRHeader announces {flag} float labels, record holds "
                             f"{len(rest)} bytes after the header")
        label = np.frombuffer(rest, "<f4", flag).astype(np.float32)
        rest = rest[4 * flag:]
    return IRHeader(flag, label, id_, id2), rest


def _label_value(header: IRHeader) -> float:
    return float(header.label[0]) if header.flag > 0 else float(header.label)


def frame(record: bytes) -> bytes:
    """A record as dmlc's `RecordIOWriter::WriteRecord` writes it (parts split at aligned
    occurrences of the magic word, which is dropped; zero padding to 4 bytes)."""
    n = len(record)
    if n >= 1 << _LEN_BITS:
        raise ValueError(f"RecordIO records must be shorter than 2**29 bytes, got {n}")
    out, start = [], 0
    pos = record.find(_MAGIC_BYTES)
    while 0 <= pos <= n - 4:
        if pos % 4 == 0:
            cflag = 1 if start == 0 else 2
            out += [_FRAME.pack(MAGIC, cflag << _LEN_BITS | (pos - start)), record[start:pos]]
            start = pos + 4
        pos = record.find(_MAGIC_BYTES, pos + 1)
    cflag = 3 if start else 0
    out += [_FRAME.pack(MAGIC, cflag << _LEN_BITS | (n - start)), record[start:],
            b"\0" * (-n % 4)]
    return b"".join(out)


def _read_record(read, path: str, offset: int, hint: int = _DEFAULT_READ) -> bytes:
    """Reads and joins the record whose first part starts at `offset`.

    `read(n, pos)` returns up to n bytes at pos (fewer at the end of the file); `hint` is the
    first read's size (the record's extent when known: one system call per record).
    """
    buf = read(max(hint, 8), offset)

    def covered(end: int) -> bool:
        nonlocal buf
        if offset + len(buf) < end:
            buf += read(end - offset - len(buf), offset + len(buf))
        return offset + len(buf) >= end

    parts, pos, index = [], offset, 0
    while True:
        if not covered(pos + 8):
            raise RecordIOError(path, offset, f"the file ends at byte {offset + len(buf)}, "
                                f"inside the frame header at byte {pos} (truncated file?)")
        magic, lrec = _FRAME.unpack_from(buf, pos - offset)
        if magic != MAGIC:
            raise RecordIOError(path, offset, f"no RecordIO magic at byte {pos} (found "
                                f"0x{magic:08x}): the .idx does not belong to this .rec, or "
                                "the file is corrupt")
        cflag, length = lrec >> _LEN_BITS, lrec & _LEN_MASK
        if cflag not in ((0, 1) if index == 0 else (2, 3)):
            raise RecordIOError(path, offset, f"part {index} at byte {pos} has continuation "
                                f"flag {cflag}")
        if not covered(pos + 8 + length):
            raise RecordIOError(path, offset, f"the part at byte {pos} announces {length} "
                                f"bytes but the file ends at byte {offset + len(buf)} "
                                "(truncated file?)")
        start = pos - offset + 8
        parts.append(buf[start:start + length])
        pos += 8 + length + (-length % 4)
        index += 1
        if cflag in (0, 3):
            return _MAGIC_BYTES.join(parts)


def iter_records(rec_path: str, *, payload: bool = True) -> Iterator[tuple[int, bytes | None]]:
    """Walks a .rec sequentially: yields (offset of the record, joined record bytes or None).

    `payload=False` skips the data (used to rebuild an index). Raises RecordIOError on a bad
    magic, a bad continuation flag or a truncated file, naming the record's offset.
    """
    size = os.path.getsize(rec_path)
    with open(rec_path, "rb", buffering=1 << 20) as f:
        pos = 0
        while pos < size:
            start, parts, index = pos, [], 0
            while True:
                head = f.read(8)
                if len(head) < 8:
                    raise RecordIOError(rec_path, start, f"the file ends at byte {size}, inside "
                                        f"the frame header at byte {pos} (truncated file?)")
                magic, lrec = _FRAME.unpack(head)
                if magic != MAGIC:
                    raise RecordIOError(rec_path, start, f"no RecordIO magic at byte {pos} "
                                        f"(found 0x{magic:08x}): not a RecordIO file, or corrupt")
                cflag, length = lrec >> _LEN_BITS, lrec & _LEN_MASK
                if cflag not in ((0, 1) if index == 0 else (2, 3)):
                    raise RecordIOError(rec_path, start, f"part {index} at byte {pos} has "
                                        f"continuation flag {cflag}")
                if pos + 8 + length > size:
                    raise RecordIOError(rec_path, start, f"the part at byte {pos} announces "
                                        f"{length} bytes but the file ends at byte {size} "
                                        "(truncated file?)")
                padded = length + (-length % 4)
                if payload:
                    parts.append(f.read(padded)[:length])
                else:
                    f.seek(padded, os.SEEK_CUR)
                pos += 8 + padded
                index += 1
                if cflag in (0, 3):
                    break
            yield start, (_MAGIC_BYTES.join(parts) if payload else None)


# ---------------------------------------------------------------------------------------------
# Index files
# ---------------------------------------------------------------------------------------------


def scan_index(rec_path: str) -> tuple[np.ndarray, np.ndarray]:
    """(keys, offsets) int64 of every record, by walking the .rec; keys are record ordinals."""
    offsets = np.fromiter((o for o, _ in iter_records(rec_path, payload=False)), np.int64)
    return np.arange(len(offsets), dtype=np.int64), offsets


def read_index(idx_path: str) -> tuple[np.ndarray, np.ndarray]:
    """(keys, offsets) int64 from a .idx (`key<TAB>offset` lines), in file order."""
    with open(idx_path, "rb") as f:
        data = f.read()
    tokens = data.split()
    lines = sum(1 for line in data.splitlines() if line.strip())
    if len(tokens) != 2 * lines:
        raise ValueError(f"{idx_path}: expected 'key<TAB>offset' on every line")
    try:
        keys = np.asarray(tokens[0::2]).astype(np.int64)
        offsets = np.asarray(tokens[1::2]).astype(np.int64)
    except ValueError:
        raise ValueError(f"{idx_path}: keys and offsets must be integers (insightface and "
                         "im2rec packs use integer keys)") from None
    return keys.reshape(-1), offsets.reshape(-1)


def write_index(idx_path: str, keys: Iterable[int], offsets: Iterable[int]) -> None:
    """Writes a .idx atomically (temporary file + rename)."""
    tmp = f"{idx_path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="ascii") as f:
        f.writelines(f"{int(k)}\t{int(o)}\n" for k, o in zip(keys, offsets))
    os.replace(tmp, idx_path)


def _default_idx(rec_path: str) -> str:
    return os.path.splitext(rec_path)[0] + ".idx"


# ---------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------


def write_recordio(rec_path: str, idx_path: str | None,
                   samples: Iterable[tuple[np.ndarray | bytes, Any]], *, header: bool = True,
                   ext: str = ".jpg", quality: int = 95) -> int:
    """Writes an insightface-layout RecordIO pack (streaming: samples are consumed once).

    Args:
      rec_path: output .rec.
      idx_path: output .idx, or None for rec_path with the extension replaced.
      samples: (image, label) pairs. image: uint8 RGB (H, W, 3) / grey array (encoded with `ext`)
        or encoded bytes (stored as is, even if corrupt: tests use that). label: an int/float
        (flag 0) or a sequence of floats (flag = its length; the identity is its first value).
      header: write insightface's record 0 (labels (id_start, id_end)) and, when each
        identity's images are contiguous, one identity record per identity (labels (first key,
        last key + 1)), in order of first appearance. Without contiguity only record 0 is
        written (id_start == id_end) and a warning says so. header=False writes image records
        only, keys from 0 (im2rec layout).
      ext, quality: codec for array images.

    Returns:
      The number of image records.
    """
    idx_path = _default_idx(rec_path) if idx_path is None else idx_path
    keys, offsets = [], []
    ranges: dict[int, list[int]] = {}
    contiguous, last = True, None
    with open(rec_path, "wb") as f:

        def put(key: int, record: bytes) -> None:
            keys.append(key)
            offsets.append(f.tell())
            f.write(frame(record))

        placeholder = pack(IRHeader(0, (0.0, 0.0), 0, 0), b"")  # rewritten once n is known
        if header:
            put(0, placeholder)
        key = first = 1 if header else 0
        for image, label in samples:
            put(key, pack(IRHeader(0, label, key, 0), encode_image(image, ext, quality)))
            ident = int(label) if isinstance(label, numbers.Number) else int(
                np.asarray(label, np.float32).reshape(-1)[0])
            if ident != last and ident in ranges:
                contiguous = False
            ranges.setdefault(ident, [key, key])[1] = key + 1
            last, key = ident, key + 1
        num_images = key - first
        if header:
            id_start = key
            if contiguous:
                for start, end in ranges.values():
                    put(key, pack(IRHeader(0, (float(start), float(end)), key, 0), b""))
                    key += 1
            elif ranges:
                logging.warning("write_recordio(%s): identities are not contiguous, so no "
                                "identity records were written (header only)", rec_path)
            if key >= 1 << 24:
                raise ValueError(f"{rec_path}: {key} keys do not fit the float32 header labels "
                                 "exactly (limit 2**24)")
            record0 = frame(pack(IRHeader(0, (float(id_start), float(key)), 0, 0), b""))
            assert len(record0) == len(frame(placeholder))
            f.seek(0)
            f.write(record0)
    write_index(idx_path, keys, offsets)
    return num_images
