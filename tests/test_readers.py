"""Real-format readers: MXNet RecordIO, insightface .bin, LFW pairs, identity folders.

Fixtures are written here in the real formats. The RecordIO fixture is framed by hand (struct,
independent of lowlight's writer) so reader and writer cannot share a bug unnoticed.
"""

import logging
import os
import pickle
import shutil
import struct

import cv2
import numpy as np
import pytest

from lowlight.data import sources
from lowlight.data.image_folder import ImageFolder, decode_noting
from lowlight.data.recordio import (
    MAGIC,
    RecordIO,
    RecordIOError,
    frame,
    pack,
    unpack,
    write_recordio,
)
from lowlight.data.sources import CorruptImageError, decode_image
from lowlight.data.synthetic import SynthFaces
from lowlight.data.verification_sets import (
    LFWPairs,
    UnsafePickleError,
    VerificationBin,
    read_verification_bin,
    write_verification_bin,
)

SIZE = 32


@pytest.fixture(scope="module")
def faces():
    ds = SynthFaces(size=SIZE, num_identities=10, images_per_identity=2)
    return [ds[i] for i in range(20)]


def _png(rgb):
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    assert ok
    return buf.tobytes()


def _jpg(rgb, quality=90):
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def _cv_rgb(data):
    """Reference decode, independent of lowlight."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]


# ---------------------------------------------------------------------------------------------
# RecordIO, framed by hand
# ---------------------------------------------------------------------------------------------

M = struct.pack("<I", MAGIC)


def _part(cflag, data):
    return M + struct.pack("<I", cflag << 29 | len(data)) + data + b"\0" * (-len(data) % 4)


def _ir(flag, label, id_, id2=0):
    return struct.pack("<IfQQ", flag, label, id_, id2)


MULTI_I, FLAG_I, CORRUPT_I = 7, 4, 20  # positions among image records (key = position + 1)


@pytest.fixture(scope="module")
def rec(tmp_path_factory, faces):
    """train.rec/.idx in insightface layout, framed by hand: header, 21 image records (PNG and
    JPEG; one with 3 float labels; one split in 3 parts; one truncated JPEG), identity records."""
    d = tmp_path_factory.mktemp("rec")
    blobs, expected, labels, raws = [], [], [], []
    for i, f in enumerate(faces):
        img = f["image"]
        data = _png(img) if i % 2 == 0 else _jpg(img)
        expected.append(img if i % 2 == 0 else _cv_rgb(data))
        labels.append(f["identity"])
        if i == FLAG_I:  # flag 3: label field 0, labels (identity, 0.25, 0.75) follow
            payload = _ir(3, 0.0, i + 1) + np.array([f["identity"], .25, .75], "<f4").tobytes()
            payload += data
            blobs.append(_part(0, payload))
        elif i == MULTI_I:  # id = id2 = magic: dmlc's writer splits at bytes 8 and 16
            payload = _ir(0, f["identity"], MAGIC, MAGIC) + data
            assert payload[8:12] == M and payload[16:20] == M
            blobs.append(_part(1, payload[:8]) + _part(2, payload[12:16])
                         + _part(3, payload[20:]))
        else:
            payload = _ir(0, f["identity"], i + 1) + data
            blobs.append(_part(0, payload))
        raws.append(payload)
    bad = _jpg(faces[0]["image"])
    bad = bad[:len(bad) // 2]
    payload = _ir(0, 9.0, 21) + bad
    blobs.append(_part(0, payload))
    raws.append(payload)
    labels.append(9)
    n = len(blobs)  # 21 image records, keys 1..21
    ids = {}
    for k, lab in enumerate(labels, start=1):
        ids.setdefault(lab, [k, k])[1] = k + 1
    id_records = [_part(0, _ir(2, 0.0, n + 1 + j) + np.array(r, "<f4").tobytes())
                  for j, r in enumerate(ids.values())]
    header = _part(0, _ir(2, 0.0, 0) + np.array([n + 1, n + 1 + len(ids)], "<f4").tobytes())
    records = [header, *blobs, *id_records]
    offsets = np.cumsum([0] + [len(r) for r in records[:-1]])
    (d / "train.rec").write_bytes(b"".join(records))
    (d / "train.idx").write_text("".join(f"{k}\t{o}\n" for k, o in enumerate(offsets)))
    return dict(dir=d, rec=str(d / "train.rec"), idx=str(d / "train.idx"), expected=expected,
                labels=np.array(labels), offsets=offsets, raws=raws, ids=ids, n=n,
                multi_parts=blobs[MULTI_I])


def _check_pack(ds, rec):
    assert len(ds) == rec["n"]
    assert ds.header_label == (rec["n"] + 1.0, rec["n"] + 1.0 + len(rec["ids"]))
    np.testing.assert_array_equal(ds.keys, np.arange(1, rec["n"] + 1))
    np.testing.assert_array_equal(ds.offsets, rec["offsets"][1:rec["n"] + 1])
    np.testing.assert_array_equal(ds.labels, rec["labels"])
    for i, want in enumerate(rec["expected"]):
        image, label = ds[i]
        assert image.dtype == np.uint8 and image.shape == (SIZE, SIZE, 3)
        np.testing.assert_array_equal(image, want, err_msg=f"record {i}")
        assert label == rec["labels"][i]


def test_recordio_reads_insightface_layout(rec):
    ds = RecordIO(rec["rec"])  # .idx found next to the .rec
    _check_pack(ds, rec)
    np.testing.assert_array_equal(ds.identity_ranges, np.array(list(rec["ids"].values())))
    assert ds.num_classes == len(rec["ids"])
    assert ds[-1 - (rec["n"] - 1 - MULTI_I)][1] == rec["labels"][MULTI_I]  # negative index
    with pytest.raises(IndexError):
        ds[rec["n"]]


def test_recordio_flag_labels_and_multipart(rec):
    ds = RecordIO(rec["rec"], rec["idx"])
    h, data = ds.read_raw(FLAG_I)
    assert h.flag == 3
    np.testing.assert_allclose(h.label, [rec["labels"][FLAG_I], 0.25, 0.75])
    assert ds[FLAG_I][1] == rec["labels"][FLAG_I]
    # Reassembly re-inserts the magic between parts: the record is the original payload.
    h, data = ds.read_raw(MULTI_I)
    assert (h.id, h.id2) == (MAGIC, MAGIC)
    assert _ir(0, h.label, MAGIC, MAGIC) + data == rec["raws"][MULTI_I]
    # The writer splits exactly like dmlc's (same bytes as the hand-framed parts).
    assert frame(rec["raws"][MULTI_I]) == rec["multi_parts"]
    assert unpack(pack((0, [1.0, 2.0], 3, 4), b"xy"))[1] == b"xy"


def test_recordio_corrupt_image_rule(rec, caplog):
    ds = RecordIO(rec["rec"])
    with pytest.raises(CorruptImageError, match=r"train\.rec\[key=21\].*truncated JPEG"):
        ds[CORRUPT_I]
    with caplog.at_level(logging.WARNING):
        valid = RecordIO(rec["rec"], validate=True)
    assert len(valid) == rec["n"] - 1
    assert valid.skipped == {"corrupt": ["key=21"]}
    assert valid.stats["skipped/corrupt"] == 1
    assert "key=21" in caplog.text and "corrupt" in caplog.text
    np.testing.assert_array_equal(valid.labels, rec["labels"][:-1])


def test_recordio_rebuilds_missing_index(rec, tmp_path):
    shutil.copy(rec["rec"], tmp_path / "train.rec")
    path = str(tmp_path / "train.rec")
    with pytest.raises(FileNotFoundError, match="scan=True"):
        RecordIO(path)
    ds = RecordIO(path, scan=True)
    assert not (tmp_path / "train.idx").exists()
    _check_pack(ds, rec)
    RecordIO(path, scan=True, write_idx=True)
    assert (tmp_path / "train.idx").read_text() == open(rec["idx"]).read()
    _check_pack(RecordIO(path), rec)


def test_recordio_truncated_file_names_file_and_offset(rec, tmp_path):
    data = open(rec["rec"], "rb").read()
    last = int(rec["offsets"][-1])  # last identity record
    cut = tmp_path / "cut.rec"
    cut.write_bytes(data[:last + 12])
    with pytest.raises(RecordIOError, match=rf"cut\.rec: record at byte offset {last}: .*"
                                            r"truncated"):
        RecordIO(str(cut), rec["idx"])
    with pytest.raises(RecordIOError, match=rf"cut\.rec: record at byte offset {last}"):
        RecordIO(str(cut), scan=True)
    # Cut in the middle of the image records: the .idx points past the end.
    mid = int(rec["offsets"][10])
    cut.write_bytes(data[:mid + 40])
    with pytest.raises(RecordIOError, match=r"cut\.rec: record at byte offset \d+: .*past the "
                                            r"end"):
        RecordIO(str(cut), rec["idx"])
    # Truncated after the reader was built: the access names the record.
    shutil.copy(rec["rec"], cut)
    ds = RecordIO(str(cut), rec["idx"])
    with open(cut, "r+b") as f:
        f.truncate(mid + 40)
    with pytest.raises(RecordIOError, match=rf"cut\.rec: record at byte offset {mid}"):
        ds[9]


def test_recordio_pickles_and_reopens_per_process(rec):
    ds = RecordIO(rec["rec"])
    ds[0]  # opens the file
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._fd is None
    np.testing.assert_array_equal(clone[3][0], rec["expected"][3])
    ds._pid = -1  # as after a fork: the next read opens a fresh handle
    old = ds._fd
    np.testing.assert_array_equal(ds[5][0], rec["expected"][5])
    assert ds._pid == os.getpid() and ds._fd != old
    os.close(old)
    if hasattr(os, "fork"):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: read through the inherited reader
            try:
                os.write(w, bytes([ds[2][1]]))
            finally:
                os._exit(0)
        os.close(w)
        got = os.read(r, 1)
        os.close(r)
        os.waitpid(pid, 0)
        assert got == bytes([rec["labels"][2]])


def test_write_recordio_round_trip_and_layouts(faces, tmp_path, caplog):
    images = [f["image"] for f in faces[:6]]
    labels = [f["identity"] for f in faces[:6]]
    path = str(tmp_path / "a.rec")
    assert write_recordio(path, None, zip(images, labels), ext=".png") == 6
    ds = RecordIO(path)
    assert ds.header_label == (7.0, 7.0 + len(set(labels)))
    assert [ds[i][1] for i in range(6)] == labels
    np.testing.assert_array_equal(ds[2][0], images[2])
    assert ds.identity_ranges.tolist() == [[1, 3], [3, 5], [5, 7]]
    # im2rec layout: no header, keys from 0; float-list labels.
    path = str(tmp_path / "b.rec")
    write_recordio(path, str(tmp_path / "b.idx"),
                   [(im, [lab, 0.5]) for im, lab in zip(images, labels)], header=False)
    ds = RecordIO(path, str(tmp_path / "b.idx"))
    assert ds.header_label is None and ds.keys.tolist() == list(range(6))
    assert ds.labels.tolist() == labels and ds.num_classes == max(labels) + 1
    # Identities not contiguous: header only, with a warning.
    with caplog.at_level(logging.WARNING):
        write_recordio(str(tmp_path / "c.rec"), None, zip(images, [0, 1, 0, 1, 0, 1]))
    assert "not contiguous" in caplog.text
    ds = RecordIO(str(tmp_path / "c.rec"))
    assert len(ds) == 6 and len(ds.identity_ranges) == 0


def test_recordio_repairs_layouts_and_sizes(tmp_path, caplog):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (20, 20), np.uint8)
    deep = rng.integers(0, 65536, (24, 24, 3), np.uint16)
    samples = [(cv2.imencode(".png", gray)[1].tobytes(), 0),
               (cv2.imencode(".png", deep)[1].tobytes(), 1)]
    path = str(tmp_path / "r.rec")
    write_recordio(path, None, samples)
    with caplog.at_level(logging.WARNING):
        ds = RecordIO(path, size=16, validate=True)
    assert ds.repaired == {"grayscale": ["key=1"], "resized": ["key=1", "key=2"],
                           "16bit": ["key=2"]}
    assert "grayscale" in caplog.text and "16bit" in caplog.text
    image, _ = ds[0]
    assert image.shape == (16, 16, 3)
    assert (image[..., 0] == image[..., 1]).all()
    full = RecordIO(path)[1][0]
    np.testing.assert_array_equal(full, ((deep[..., ::-1].astype(np.int64) + 128) // 257))


# ---------------------------------------------------------------------------------------------
# insightface .bin
# ---------------------------------------------------------------------------------------------


def _pairs(faces, n=4):
    images = np.stack([f["image"] for f in faces[:2 * n]])
    issame = np.array([faces[2 * p]["identity"] == faces[2 * p + 1]["identity"]
                       for p in range(n)])
    issame[-1] = False
    return images, issame


def test_bin_round_trip(faces, tmp_path):
    images, issame = _pairs(faces)
    path = str(tmp_path / "lfw.bin")
    write_verification_bin(path, images, issame, ext=".png")
    got, same = read_verification_bin(path)
    assert got.dtype == np.uint8 and got.shape == (8, SIZE, SIZE, 3)
    np.testing.assert_array_equal(got, images)
    assert same.dtype == bool and same.tolist() == issame.tolist()
    # The file is what insightface writes: a plain (list of bytes, list of bools) pickle.
    with open(path, "rb") as f:
        bins, flags = pickle.load(f)
    assert all(isinstance(b, bytes) for b in bins) and flags == issame.tolist()
    got, _ = read_verification_bin(path, size=20)
    assert got.shape == (8, 20, 20, 3)


def _py2_pickle(bins, flags):
    """Protocol 2 as Python 2 wrote it: images as `str` (BINSTRING), so a default-encoding
    load fails on non-ASCII bytes and insightface retries with encoding='bytes'."""
    out = [b"\x80\x02(", *(b"T" + struct.pack("<i", len(b)) + b for b in bins), b"l("]
    out += [b"\x88" if s else b"\x89" for s in flags]
    return b"".join(out) + b"l\x86."


def test_bin_python2_bytes_pickle(faces, tmp_path):
    images, issame = _pairs(faces, 3)
    data = _py2_pickle([_png(im) for im in images], issame.tolist())
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(data)  # what makes the encoding="bytes" path necessary
    path = tmp_path / "old.bin"
    path.write_bytes(data)
    got, same = read_verification_bin(str(path))
    np.testing.assert_array_equal(got, images)
    assert same.tolist() == issame.tolist()


def test_bin_numpy_bools_allowed_object_arrays_refused(faces, tmp_path):
    images, issame = _pairs(faces, 2)
    path = tmp_path / "np.bin"
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        path.write_bytes(pickle.dumps(([_png(im) for im in images], np.array(issame)),
                                      protocol=protocol))
        assert read_verification_bin(str(path))[1].tolist() == issame.tolist()
    path.write_bytes(pickle.dumps(([_png(im) for im in images],
                                   [np.bool_(s) for s in issame])))
    assert read_verification_bin(str(path))[1].tolist() == issame.tolist()
    path.write_bytes(pickle.dumps(([_png(im) for im in images], np.array(issame, object))))
    with pytest.raises(pickle.UnpicklingError, match="dtype"):
        read_verification_bin(str(path))


class _Evil:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_bin_malicious_pickle_refused_and_not_executed(faces, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    images, issame = _pairs(faces, 1)
    path.write_bytes(pickle.dumps(([_png(im) for im in images], [_Evil(f"touch {marker}")])))
    assert b"system" in path.read_bytes()
    forbidden = f"{os.system.__module__}.system"  # posix.system on Linux
    with pytest.raises(UnsafePickleError) as info:
        read_verification_bin(str(path))
    assert str(path) in str(info.value) and forbidden in str(info.value)
    assert not marker.exists()
    # Other shapes of the same attack: a builtin, and a global hidden in a protocol-0 pickle.
    path.write_bytes(b"cbuiltins\neval\n(Vprint(1)\ntR.")
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        read_verification_bin(str(path))
    path.write_bytes(pickle.dumps({"not": "a bin"}))
    with pytest.raises(ValueError, match="not an insightface verification .bin"):
        read_verification_bin(str(path))


def test_bin_corrupt_entry_drops_the_pair(faces, tmp_path, caplog):
    images, issame = _pairs(faces)
    bins = [_png(im) for im in images]
    bins[3] = bins[3][:len(bins[3]) // 2]  # pair 1, second image: truncated PNG
    gray = cv2.cvtColor(images[4], cv2.COLOR_RGB2GRAY)
    bins[4] = cv2.imencode(".png", gray)[1].tobytes()  # pair 2: grey -> converted
    bins[6] = _png(cv2.resize(images[6], (40, 40)))  # pair 3: wrong size -> resized
    path = str(tmp_path / "bad.bin")
    write_verification_bin(path, bins, issame)
    with caplog.at_level(logging.WARNING):
        vb = VerificationBin(path)
        got, same = vb.load()
    assert got.shape == (6, SIZE, SIZE, 3) and same.tolist() == issame[[0, 2, 3]].tolist()
    assert vb.pair_index.tolist() == [0, 2, 3]
    assert list(vb.dropped) == [1] and "truncated PNG" in vb.dropped[1]
    assert vb.skipped == {"corrupt": [f"{path}[image 3]"]}
    assert vb.repaired == {"grayscale": [f"{path}[image 4]"], "resized": [f"{path}[image 6]"]}
    assert vb.stats["dropped_pairs"] == 1 and vb.stats["kept_pairs"] == 3
    assert "dropped 1 of 4 pairs" in caplog.text and "pair 1" in caplog.text
    np.testing.assert_array_equal(got[:2], images[:2])
    np.testing.assert_array_equal(got[2], np.repeat(gray[..., None], 3, axis=2))
    assert len(vb) == 3 and vb[1]["pair"] == 2 and vb[1]["issame"] == bool(issame[2])


# ---------------------------------------------------------------------------------------------
# LFW pairs.txt
# ---------------------------------------------------------------------------------------------


def test_lfw_pairs_missing_and_corrupt(faces, tmp_path, caplog):
    root = tmp_path / "lfw"
    names = ["Ann_A", "Bob_B", "Cid_C"]
    for k, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for num in (1, 2):
            f = faces[2 * k + num - 1]["image"]
            (root / name / f"{name}_{num:04d}.jpg").write_bytes(_jpg(f))
    (root / "Cid_C" / "Cid_C_0002.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    lines = ["2\t2",  # 2 folds x (2 same + 2 different)
             "Ann_A\t1\t2", "Bob_B\t1\t2", "Ann_A\t1\tBob_B\t2", "Bob_B\t1\tAnn_A\t2",
             "Ann_A\t1\t3", "Cid_C\t1\t2", "Ann_A\t2\tCid_C\t1", "Bob_B\t2\tDan_D\t1"]
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        lfw = LFWPairs(str(root), str(tmp_path / "pairs.txt"))
    assert "Ann_A/Ann_A_0003.jpg" in caplog.text and "Dan_D/Dan_D_0001.jpg" in caplog.text
    assert lfw.skipped["missing_file"] == ["Ann_A/Ann_A_0003.jpg", "Dan_D/Dan_D_0001.jpg"]
    assert sorted(lfw.dropped) == [4, 7]
    images, issame = lfw.load()
    assert sorted(lfw.dropped) == [4, 5, 7] and "Cid_C_0002.jpg" in lfw.dropped[5]
    assert lfw.pair_index.tolist() == [0, 1, 2, 3, 6]
    assert issame.tolist() == [True, True, False, False, False]
    assert lfw.fold.tolist() == [0, 0, 0, 0, 1]
    assert images.shape == (10, SIZE, SIZE, 3)
    np.testing.assert_array_equal(images[4], _cv_rgb(_jpg(faces[0]["image"])))
    np.testing.assert_array_equal(images[5], _cv_rgb(_jpg(faces[3]["image"])))
    assert lfw[4]["pair"] == 6 and lfw[4]["issame"] is False
    (tmp_path / "bad.txt").write_text("10\t300\nAnn_A\t1\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2"):
        LFWPairs(str(root), str(tmp_path / "bad.txt"))


# ---------------------------------------------------------------------------------------------
# Identity folders
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path, faces):
    root = tmp_path / "ids"
    for name in ("alice", "bob", "carol", "dave", ".hidden"):
        (root / name).mkdir(parents=True)
    a = faces[0]["image"]
    gray = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY)
    rgba = np.dstack([a, np.full(a.shape[:2], 128, np.uint8)])
    # 16-bit, off the exact multiples: round(x / 257) still recovers a
    deep = np.minimum(a.astype(np.uint32) * 257 + 3, 65535).astype(np.uint16)
    cv2.imwrite(str(root / "alice" / "a_gray.png"), gray)
    cv2.imwrite(str(root / "alice" / "b_rgba.png"), rgba[..., [2, 1, 0, 3]])
    cv2.imwrite(str(root / "alice" / "c_16bit.png"), deep[..., ::-1])
    (root / "alice" / "d.jpg").write_bytes(_jpg(a))
    (root / "bob" / "sub").mkdir()
    (root / "bob" / "sub" / "e.PNG").write_bytes(_png(cv2.resize(faces[1]["image"], (40, 40))))
    (root / "bob" / "notes.txt").write_text("not an image")
    (root / "bob" / ".DS_Store").write_bytes(b"\0\1")
    (root / "bob" / "broken.jpg").write_bytes(_jpg(a)[:100])
    (root / "dave" / "readme.txt").write_text("x")
    (root / ".hidden" / "x.jpg").write_bytes(_jpg(a))
    (root / "stray.jpg").write_bytes(_jpg(a))
    (root / "empty_file").mkdir()
    (root / "empty_file" / "z.png").write_bytes(b"")
    return dict(root=str(root), a=a, gray=gray)


def test_image_folder_index_and_skips(folder, caplog):
    with caplog.at_level(logging.WARNING):
        ds = ImageFolder(folder["root"])
    assert ds.classes == ("alice", "bob") and ds.num_classes == 2
    assert ds.files == ("alice/a_gray.png", "alice/b_rgba.png", "alice/c_16bit.png",
                        "alice/d.jpg", "bob/broken.jpg", "bob/sub/e.PNG")
    assert ds.labels.tolist() == [0, 0, 0, 0, 1, 1]
    assert ds.skipped == {"hidden_folder": [".hidden"], "not_in_folder": ["stray.jpg"],
                          "not_image": ["bob/.DS_Store", "bob/notes.txt", "dave/readme.txt"],
                          "empty": ["empty_file/z.png"],
                          "empty_folder": ["carol/", "dave/", "empty_file/"]}
    for name in ("carol/", "notes.txt", "stray.jpg", "z.png"):
        assert name in caplog.text
    item = ds[3]
    assert item["identity"] == 0 and item["path"].endswith("d.jpg")
    with pytest.raises(CorruptImageError, match="broken.jpg"):
        ds[4]
    assert ds[5]["image"].shape == (40, 40, 3)


def test_image_folder_converts_layouts(folder, caplog):
    ds = ImageFolder(folder["root"], size=SIZE)
    a, gray = folder["a"], folder["gray"]
    np.testing.assert_array_equal(ds[0]["image"], np.repeat(gray[..., None], 3, axis=2))
    np.testing.assert_array_equal(ds[1]["image"], a)  # alpha dropped
    np.testing.assert_array_equal(ds[2]["image"], a)  # 16-bit -> 8-bit
    assert ds[5]["image"].shape == (SIZE, SIZE, 3)  # 40x40 resized
    with caplog.at_level(logging.WARNING):
        valid = ImageFolder(folder["root"], size=SIZE, validate=True)
    assert valid.skipped["corrupt"] == ["bob/broken.jpg"] and len(valid) == 5
    assert valid.repaired == {"grayscale": ["alice/a_gray.png"], "alpha": ["alice/b_rgba.png"],
                              "16bit": ["alice/c_16bit.png"], "resized": ["bob/sub/e.PNG"]}
    assert valid.stats["repaired/16bit"] == 1 and "16bit" in caplog.text


def test_decode_noting_matches_decode_image(folder):
    for rel in ("alice/a_gray.png", "alice/b_rgba.png", "alice/c_16bit.png", "alice/d.jpg"):
        data = open(os.path.join(folder["root"], rel), "rb").read()
        image, notes = decode_noting(data, rel)
        np.testing.assert_array_equal(image, decode_image(data, rel))
    assert notes == ()
    with pytest.raises(CorruptImageError, match="truncated JPEG"):
        decode_noting(data[:50], "x.jpg")


def test_sources_reexports():
    assert sources.RecordIO is RecordIO and sources.ImageFolder is ImageFolder
    assert sources.LFWPairs is LFWPairs and sources.read_verification_bin is read_verification_bin
    with pytest.raises(AttributeError):
        sources.NoSuchReader  # noqa: B018


def test_readers_pickle(folder, faces, tmp_path):
    ds = pickle.loads(pickle.dumps(ImageFolder(folder["root"])))
    assert ds[3]["identity"] == 0
    images, issame = _pairs(faces, 2)
    write_verification_bin(str(tmp_path / "v.bin"), images, issame)
    vb = pickle.loads(pickle.dumps(VerificationBin(str(tmp_path / "v.bin"))))
    assert len(vb) == 2
