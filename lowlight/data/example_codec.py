"""`tf.train.Example` protobuf encoding and parsing by hand (no TensorFlow, no protobuf
schema): the record format of prepared datasets, which TFDS reads as its own.

Example{1: Features{1: map<string, Feature>}}, Feature{1: BytesList, 2: FloatList,
3: Int64List}, each list {1: repeated value}.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from typing import Any

# ---------------------------------------------------------------------------------------------
# tf.train.Example codec (protobuf wire format, by hand: Example{1: Features{1: map<string,
# Feature>}}, Feature{1: BytesList, 2: FloatList, 3: Int64List}, each list {1: repeated value})
# ---------------------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    n &= 0xFFFFFFFFFFFFFFFF  # int64 two's complement, as protobuf encodes negative int64
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(field: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def encode_example(features: Mapping[str, tuple[str, Any]]) -> bytes:
    """Serializes {key: ('bytes', bytes) | ('int', int)} as a tf.train.Example (sorted keys)."""
    entries = []
    for key in sorted(features):
        kind, value = features[key]
        feat = _ld(1, _ld(1, value)) if kind == "bytes" else _ld(3, _ld(1, _varint(value)))
        entries.append(_ld(1, _ld(1, key.encode()) + _ld(2, feat)))
    return _ld(1, b"".join(entries))


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int):
    """(field, wire type, value) of the message in buf[start:end]; length-delimited values are
    (start, end) offsets, fixed-width ones raw bytes."""
    pos = start
    while pos < end:
        key, pos = _read_varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            value, pos = (pos, pos + n), pos + n
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, pos = bytes(buf[pos:pos + width]), pos + width
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, wire, value


def parse_example(data: bytes, keys: Iterable[str] | None = None) -> dict[str, list]:
    """Parses a tf.train.Example: {key: list of bytes | int | float} (only `keys` if given)."""
    buf = memoryview(data)
    wanted = None if keys is None else set(keys)
    out: dict[str, list] = {}
    for f, _, (s, e) in _fields(buf, 0, len(buf)):
        if f != 1:
            continue
        for f2, _, (s2, e2) in _fields(buf, s, e):  # map entries
            if f2 != 1:
                continue
            key, feat = None, None
            for f3, _, v in _fields(buf, s2, e2):
                if f3 == 1:
                    key = bytes(buf[v[0]:v[1]]).decode()
                elif f3 == 2:
                    feat = v
            if key is None or (wanted is not None and key not in wanted):
                continue
            values: list = []
            for kind, _, (ls, le) in _fields(buf, *feat) if feat else ():
                for _, wire, v in _fields(buf, ls, le):
                    if kind == 1:
                        values.append(bytes(buf[v[0]:v[1]]))
                    elif kind == 2:
                        raw = v if wire == 5 else bytes(buf[v[0]:v[1]])
                        values.extend(struct.unpack(f"<{len(raw) // 4}f", raw))
                    elif wire == 0:
                        values.append(v - (1 << 64) if v >= 1 << 63 else v)
                    else:
                        p = v[0]
                        while p < v[1]:
                            x, p = _read_varint(buf, p)
                            values.append(x - (1 << 64) if x >= 1 << 63 else x)
            out[key] = values
    return out
