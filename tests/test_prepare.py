"""Prepared datasets (lowlight.data.prepared, tools/prepare.py): round trips, derived sets, TFDS.

Fixtures are written at test time: a tiny synthetic world, a UTKFace-style folder (synthetic
faces under UTKFace names, plus malformed names and a truncated JPEG), an identity folder.
"""

import importlib.util
import json
import os
import pickle
import subprocess
import sys
from collections import Counter

import cv2
import ml_collections
import numpy as np
import pytest

from lowlight.data import conditions as cond
from lowlight.data import illumination as il
from lowlight.data import pipeline
from lowlight.data import prepared as P
from lowlight.data.sources import UTKFace
from lowlight.data.synthetic import SynthFaces

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool():
    spec = importlib.util.spec_from_file_location("prepare_tool",
                                                  os.path.join(ROOT, "tools", "prepare.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _assert_item_equal(got, want, extra=("source_index",)):
    assert set(got) == set(want) | set(extra), (sorted(got), sorted(want))
    for k, v in want.items():
        g = got[k]
        if isinstance(v, np.ndarray):
            assert isinstance(g, np.ndarray) and g.dtype == v.dtype and g.shape == v.shape, k
            np.testing.assert_array_equal(g, v, err_msg=k)
        else:
            assert type(g) is type(v) and g == v, (k, g, v)


# ---------------------------------------------------------------------------------------------
# Codec
# ---------------------------------------------------------------------------------------------


def test_example_codec_round_trips_every_kind():
    rng = np.random.default_rng(0)
    item = {"image": rng.integers(0, 256, (7, 5, 3), dtype=np.uint8), "n": -3, "big": 2**40,
            "flag": True, "name": "Zoë", "blob": b"\x00\xff", "x": 0.1,
            "arr": rng.normal(size=(2, 3)).astype(np.float32),
            "ids": np.array([-1, 5], np.int64)}
    schema = {k: P.infer_spec(v) for k, v in item.items()}
    assert schema["x"] == {"kind": "array", "dtype": "float64", "shape": []}
    record = P.encode_item(item, schema)
    parsed = P.parse_example(record)
    back = {k: P.decode_value(schema[k], parsed[k]) for k in schema}
    _assert_item_equal(back, {**item, "x": np.float64(0.1)}, extra=())
    assert P.parse_example(record, keys=("n",)) == {"n": [-3]}
    with pytest.raises(P.SchemaError, match="arr"):
        P.encode_item({**item, "arr": np.zeros((3, 3), np.float32)}, schema)


def test_codec_reads_what_tfds_serializes():
    tfds = pytest.importorskip("tensorflow_datasets")
    schema = {"n": {"kind": "int"}, "flag": {"kind": "bool"}, "name": {"kind": "text"},
              "arr": {"kind": "array", "dtype": "float32", "shape": [2, 2]},
              "image": {"kind": "image"}}
    png = cv2.imencode(".png", np.full((3, 4, 3), 9, np.uint8))[1].tobytes()
    feats = P.tfds_features(schema, "png")
    arr = np.arange(4, dtype=np.float32).reshape(2, 2)
    rec = feats.serialize_example({"n": -7, "flag": False, "name": "a", "arr": arr,
                                   "image": png})
    parsed = P.parse_example(rec)
    assert P.decode_value(schema["n"], parsed["n"]) == -7
    assert P.decode_value(schema["flag"], parsed["flag"]) is False
    assert P.decode_value(schema["name"], parsed["name"]) == "a"
    np.testing.assert_array_equal(P.decode_value(schema["arr"], parsed["arr"]), arr)
    assert P.decode_value(schema["image"], parsed["image"]).shape == (3, 4, 3)
    assert tfds.__version__


# ---------------------------------------------------------------------------------------------
# Synthetic world -> prepared -> PreparedSource / grain / make_source
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_prepared(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("prep"))
    world = SynthFaces(seed=3, num_identities=6, images_per_identity=3, size=40)
    val_idx = [16, 2, 9]
    summary = P.write_prepared(out, {"train": world, "val": P.Subset(world, val_idx)},
                               name="tiny_synth", source={"spec": world.spec},
                               examples_per_shard=5, progress=False)
    return out, world, val_idx, summary


def test_synthetic_round_trip_is_bit_identical(synth_prepared):
    out, world, val_idx, summary = synth_prepared
    src = P.PreparedSource(out, "train")
    assert len(src) == len(world) == 18
    meta = src.metadata
    assert meta["splits"]["train"]["shard_lengths"] == [5, 5, 5, 3]
    assert meta["splits"]["val"]["shard_lengths"] == [3]
    assert meta["source"]["spec"] == world.spec and meta["tfds"]["metadata"] in (True, False)
    shards = sorted(f for f in os.listdir(src.path) if f.startswith("tiny_synth-train"))
    assert shards == [f"tiny_synth-train.array_record-0000{k}-of-00004" for k in range(4)]
    for i in range(len(world)):
        _assert_item_equal(src[i], world[i])
        assert src[i]["source_index"] == i
    _assert_item_equal(src[-1], world[17])
    with pytest.raises(IndexError):
        src[18]
    val = pickle.loads(pickle.dumps(P.PreparedSource(out, "val")))
    for j, i in enumerate(val_idx):
        item = val[j]
        assert item.pop("source_index") == i
        _assert_item_equal(item, world[i], extra=())
    counts = Counter(world.condition_of(i) for i in range(len(world)))
    assert summary["splits"]["train"]["value_counts"]["condition"] == dict(counts)
    np.testing.assert_array_equal(src.column("identity"), np.arange(18) // 3)
    labels = P.PreparedSource(out, "train", keys=("identity", "age"))[4]
    assert labels == {"identity": 1, "age": world[4]["age"]}
    with pytest.raises(ValueError, match="valid: train, val"):
        P.PreparedSource(out, "test")


def test_output_is_deterministic(tmp_path):
    world = SynthFaces(seed=1, num_identities=3, images_per_identity=2, size=32)
    for run in ("a", "b"):
        P.write_prepared(str(tmp_path / run), {"train": world}, name="det",
                         source={"spec": world.spec}, examples_per_shard=4, progress=False)
    a, b = (tmp_path / r / "det" / P.VERSION for r in ("a", "b"))
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b)) and len(names) >= 4
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


def test_prepared_source_feeds_the_grain_pipeline(synth_prepared):
    out, world, _, _ = synth_prepared
    cfg = ml_collections.ConfigDict({"name": "prepared", "root": out, "split": "train",
                                     "seed": 0})
    src = pipeline.make_source(cfg)
    assert isinstance(src, P.PreparedSource) and len(src) == 18
    it = pipeline.batch_iterator(src, batch_size=4, seed=1, keys=("image", "identity"),
                                 shard_by_process=False)
    for _ in range(3):
        b = next(it)
        assert b["image"].shape == (4, 40, 40, 3) and b["image"].dtype == np.uint8
        ref = world.render_batch(b["index"])
        np.testing.assert_array_equal(b["image"], ref["image"])
        np.testing.assert_array_equal(b["identity"], ref["identity"])
    with pytest.raises(ValueError, match="root"):
        pipeline.make_source(ml_collections.ConfigDict({"name": "prepared", "seed": 0}))


def test_refuses_to_overwrite_and_reports_skipped_items(tmp_path):
    class Flaky:
        def __len__(self):
            return 5

        def __getitem__(self, i):
            if i == 1:
                raise OSError("disk says no")
            lm = np.zeros((5, 2) if i != 3 else (4, 2), np.float32)
            return {"image": np.full((6, 6, 3), i, np.uint8), "identity": i, "landmarks": lm}

    s = P.write_prepared(str(tmp_path), {"train": Flaky()}, name="flaky", progress=False)
    sk = s["splits"]["train"]["skipped"]
    assert [x["index"] for x in sk["OSError"]] == [1] and "disk says no" in sk["OSError"][0][
        "detail"]
    assert [x["index"] for x in sk["schema_mismatch"]] == [3]
    src = P.PreparedSource(str(tmp_path), "train")
    assert [src[j]["identity"] for j in range(len(src))] == [0, 2, 4]
    assert "skipped 1 (OSError)" in P.format_summary(s)
    with pytest.raises(FileExistsError):
        P.write_prepared(str(tmp_path), {"train": Flaky()}, name="flaky", progress=False)


def test_cli_on_the_synthetic_world(tmp_path, capsys):
    summary = _tool().main(["--source=synth", "--num_identities=10", "--images_per_identity=2",
                            "--size=32", f"--out={tmp_path}", "--no_progress",
                            "--drop_keys=skin_mask,canonical"])
    printed = capsys.readouterr().out
    assert "prepared synth" in printed and "records/s" in printed
    assert {s: v["num_examples"] for s, v in summary["splits"].items()} == {
        "train": 16, "val": 2, "test": 2}
    ids = {s: set(P.PreparedSource(str(tmp_path), s).column("identity").tolist())
           for s in ("train", "val", "test")}
    assert not (ids["train"] & ids["test"]) and not (ids["train"] & ids["val"])
    item = P.PreparedSource(str(tmp_path), "test")[0]
    assert "skin_mask" not in item and "canonical" not in item


# ---------------------------------------------------------------------------------------------
# UTKFace -> DistortionFace / NaturalFace
# ---------------------------------------------------------------------------------------------

MALFORMED = {"39_1_20170116174525125.jpg.chip.jpg": "missing_field",
             "130_0_0_x.jpg": "out_of_range", "notes.txt": "not_image"}
TRUNCATED = "31_1_2_20170101000000001.jpg.chip.jpg"


@pytest.fixture(scope="module")
def utk(tmp_path_factory):
    root = tmp_path_factory.mktemp("UTKFace")
    batch = SynthFaces(size=40, num_identities=13, images_per_identity=1).render_batch(
        list(range(13)))
    for i in range(13):
        age, gender, eth = (int(batch[k][i]) for k in ("age", "gender", "ethnicity"))
        ok, buf = cv2.imencode(".jpg", batch["image"][i][:, :, ::-1])
        (root / f"{age}_{gender}_{eth}_{20170116174525125 + i}.jpg.chip.jpg").write_bytes(
            buf.tobytes())
    for name in MALFORMED:
        (root / name).write_bytes(buf.tobytes() if name.endswith(".jpg") else b"text\n")
    (root / TRUNCATED).write_bytes(buf.tobytes()[: len(buf) // 2])
    return str(root)


@pytest.mark.parametrize("variant", ["natural", "distortion"])
def test_utkface_derived_sets(utk, tmp_path, capsys, variant):
    summary = _tool().main(["--source=utkface", f"--root={utk}", f"--derive={variant}",
                            f"--out={tmp_path}", "--seed=1", "--no_progress"])
    printed = capsys.readouterr().out
    for name, reason in MALFORMED.items():  # skipped by the reader, named in the summary
        assert name in summary["source_skipped"][reason] and name in printed
    corrupt = [x for s in summary["splits"].values() for x in s["skipped"].get(
        "CorruptImageError", [])]
    assert len(corrupt) == 1 and TRUNCATED in corrupt[0]["detail"] and TRUNCATED in printed
    wrap = il.NaturalFace if variant == "natural" else il.DistortionFace
    total = 0
    for split in UTKFace.SPLITS:
        ref = wrap(UTKFace(utk, split=split, seed=1), seed=1)
        src = P.PreparedSource(str(tmp_path), split)
        total += len(src)
        written = src.column("source_index")
        flags = src.column("simulated")
        np.testing.assert_array_equal(flags, [ref.is_simulated(i) for i in written])
        if variant == "natural":
            assert ref._simulated.sum() == len(ref) // 2  # exactly half of the split
            assert summary["derived"]["simulated_of_source"][split] == len(ref) // 2
        else:
            assert flags.all()
        assert set(src.column("condition")) <= {"low", "normal"}
        for j in range(min(3, len(src))):  # bit-identical to the on-the-fly wrapper
            item = src[j]
            want = ref[item["source_index"]]
            np.testing.assert_array_equal(item["image"], want["image"])
            assert (item["age"], item["simulated"]) == (want["age"], want["simulated"])
    # 14 well-named files: one truncated, one left out by the paper split rule (and named)
    assert len(summary["source"]["unused_files"]) == 1 and total == 12


# ---------------------------------------------------------------------------------------------
# Paper B §4.2 illumination test set
# ---------------------------------------------------------------------------------------------


def test_illumination_test_set_counts_mix_and_identity_exclusion(tmp_path):
    world = SynthFaces(seed=5, num_identities=30, images_per_identity=4, size=32,
                       conditions=["normal"])
    excluded = list(range(10))
    ts, rep = P.illumination_test_set(world, num_clean=30, num_transformed=30, seed=2,
                                      exclude_identities=excluded)
    assert rep["identity_check"]["dropped_items"] == 40
    assert rep["identity_check"]["overlapping_identities"] == 10
    s = P.write_prepared(str(tmp_path), {"test": ts}, name="illum", derived=rep,
                         progress=False)
    src = P.PreparedSource(str(tmp_path), "test")
    assert len(src) == 60
    conds = src.column("condition").tolist()
    groups = Counter(cond.group(c) for c in conds)
    assert groups["normal"] == 30
    for g, frac in zip(("low", "side", "over"), il.PAPER_B_MIX):
        assert abs(groups[g] - frac * 30) <= 1, groups
    assert all(abs(conds.count(c) - 12 / 4) <= 1 for c in cond.SIDE_CONDITIONS)
    assert s["splits"]["test"]["value_counts"]["condition"] == rep["condition_counts"]
    transformed = src.column("transformed")
    np.testing.assert_array_equal(transformed, np.arange(60) >= 30)
    np.testing.assert_array_equal(src.column("condition_id"), [cond.index(c) for c in conds])
    ids = src.column("identity")
    assert not set(ids.tolist()) & set(excluded)
    sidx = src.column("source_index")
    assert set(sidx[30:]) == set(sidx[:30])  # paired: each transformed image has its clean twin
    for j in (0, 31):
        item, orig = src[j], world[int(src[j]["source_index"])]
        same = np.array_equal(item["image"], orig["image"])
        assert same == (j < 30)

    # a training source works like a list; refusing raises; disjoint sampling
    train = P.Subset(world, np.arange(40))  # identities 0..9
    _, rep2 = P.illumination_test_set(world, num_clean=10, num_transformed=10,
                                      training_source=train)
    assert rep2["identity_check"]["dropped_items"] == 40
    with pytest.raises(ValueError, match="training identities"):
        P.illumination_test_set(world, num_clean=10, num_transformed=10,
                                exclude_identities=["3"], on_overlap="refuse")
    ts3, _ = P.illumination_test_set(world, num_clean=10, num_transformed=12, paired=False)
    assert not set(ts3.clean.indices) & set(ts3.protocol.source.indices)
    with pytest.raises(ValueError, match="eligible"):
        P.illumination_test_set(world, num_clean=100, num_transformed=100,
                                exclude_identities=excluded)


def test_illumination_test_set_from_pairs_and_cli_exclusions(tmp_path, capsys):
    class Pairs:  # the verification-set interface: image1 / image2 / issame / pair
        files = [f"p{k // 3}/p{k // 3}_{k}.jpg" for k in range(12)]

        def __init__(self):
            self.im = SynthFaces(seed=1, num_identities=4, images_per_identity=3,
                                 size=32).render_batch(list(range(12)))["image"]

        def __len__(self):
            return 7

        def __getitem__(self, i):
            a, b = (2 * i) % 12, (2 * i + 1) % 12  # pair 6 repeats pair 0's images
            return {"image1": self.im[a], "image2": self.im[b], "issame": a // 3 == b // 3,
                    "pair": i}

    images = P.PairImages(Pairs())
    assert len(images) == 12 and images.identities[:4] == ["p0", "p0", "p0", "p1"]
    ts, rep = P.illumination_test_set(images, num_clean=4, num_transformed=4,
                                      exclude_identities=["p2"])
    assert rep["identity_check"]["dropped_items"] == 3
    assert "p2" not in {ts[i]["identity"] for i in range(len(ts))}

    tool = _tool()
    first = str(tmp_path / "a")
    tool.main(["--source=synth", "--num_identities=12", "--images_per_identity=2", "--size=32",
               "--synth_options", json.dumps({"conditions": ["normal"]}),
               "--split_fractions=0.5,0.5", f"--out={first}", "--no_progress"])
    test_ids = P.PreparedSource(first, "test").column("identity")
    (tmp_path / "ids.txt").write_text(f"{test_ids[0]}\n")
    s = tool.main(["--source=prepared", f"--root={first}", "--derive=illumination_test",
                   "--num_clean=6", "--num_transformed=6", f"--out={tmp_path / 'b'}",
                   f"--exclude_identities={tmp_path / 'ids.txt'}",
                   f"--exclude_from={first}:train", "--no_progress"])
    check = s["derived"]["identity_check"]
    assert check["dropped_items"] == 2 and check["overlapping_identities"] == 1
    assert check["excluded_identities"] == 7  # 6 training identities + the one listed
    assert s["splits"]["test"]["num_examples"] == 12
    assert "illumination_test" in capsys.readouterr().out


def test_image_folder_reader_plugs_in(tmp_path):
    folder = pytest.importorskip("lowlight.data.image_folder")
    batch = SynthFaces(seed=2, num_identities=3, images_per_identity=2, size=32).render_batch(
        list(range(6)))
    for i in range(6):
        d = tmp_path / "faces" / f"person_{i // 2}"
        d.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(d / f"{i}.png"), batch["image"][i][:, :, ::-1])
    (tmp_path / "faces" / "person_0" / "readme.txt").write_text("x")
    s = _tool().main(["--source=image_folder", f"--root={tmp_path / 'faces'}",
                      f"--out={tmp_path / 'out'}", "--no_progress"])
    assert s["source_skipped"] == {"not_image": ["person_0/readme.txt"]}
    src = P.PreparedSource(str(tmp_path / "out"), "train")
    ref = folder.ImageFolder(str(tmp_path / "faces"))
    for i in range(6):
        _assert_item_equal(src[i], ref[i])
    np.testing.assert_array_equal(src[5]["image"], batch["image"][5])


def test_recordio_pack_with_identity_splits(tmp_path):
    recordio = pytest.importorskip("lowlight.data.recordio")
    batch = SynthFaces(seed=4, num_identities=4, images_per_identity=2, size=32).render_batch(
        list(range(8)))
    rec = str(tmp_path / "train.rec")
    recordio.write_recordio(rec, None, [(batch["image"][i], i // 2) for i in range(8)],
                            ext=".png")
    s = _tool().main(["--source=recordio", f"--root={rec}", "--split_fractions=0.5,0.5",
                      f"--out={tmp_path / 'out'}", "--no_progress"])
    assert {k: v["num_examples"] for k, v in s["splits"].items()} == {"train": 4, "test": 4}
    for split in ("train", "test"):
        src = P.PreparedSource(str(tmp_path / "out"), split)
        for j in range(len(src)):
            item = src[j]
            i = item["source_index"]
            assert item["identity"] == i // 2
            np.testing.assert_array_equal(item["image"], batch["image"][i])


def test_verification_bin_to_illumination_test_set(tmp_path):
    vs = pytest.importorskip("lowlight.data.verification_sets")
    images = SynthFaces(seed=6, num_identities=5, images_per_identity=2, size=32,
                        conditions=["normal"]).render_batch(list(range(10)))["image"]
    path = str(tmp_path / "lfw.bin")
    vs.write_verification_bin(path, images, [True, False, True, False, True], ext=".png")
    s = _tool().main(["--source=bin", f"--root={path}", "--derive=illumination_test",
                      "--num_clean=10", "--num_transformed=10", f"--out={tmp_path / 'out'}",
                      "--no_progress"])
    assert s["name"] == "bin_illumination_test" and s["splits"]["test"]["num_examples"] == 20
    src = P.PreparedSource(str(tmp_path / "out"), "test")
    clean = {int(src[j]["pair"]) * 2 + src[j]["pair_position"]: src[j]["image"]
             for j in range(10)}
    assert sorted(clean) == list(range(10))
    for k, im in clean.items():
        np.testing.assert_array_equal(im, images[k])
    ids = tmp_path / "ids.txt"
    ids.write_text("0\n")
    with pytest.raises(KeyError, match="identity"):  # .bin has no identities: cannot check
        _tool().main(["--source=bin", f"--root={path}", "--derive=illumination_test",
                      "--num_clean=2", "--num_transformed=2", f"--out={tmp_path / 'o2'}",
                      f"--exclude_identities={ids}", "--no_progress"])


# ---------------------------------------------------------------------------------------------
# TFDS reads it without importing TensorFlow
# ---------------------------------------------------------------------------------------------

_TFDS_SCRIPT = r"""
import sys
import numpy as np, tensorflow_datasets as tfds
from lowlight.data.prepared import PreparedSource
out = sys.argv[1]
ours = PreparedSource(out, "train")
a = tfds.data_source("tiny_synth", data_dir=out, split="train")
b = tfds.builder_from_directory(ours.path).as_data_source()["val"]
assert len(a) == len(ours) and len(b) == 3
for i in range(len(ours)):
    x, y = a[i], ours[i]
    for k, v in y.items():
        w = x[k].decode() if isinstance(x[k], bytes) else x[k]
        assert np.array_equal(np.asarray(w), np.asarray(v)), (i, k)
assert np.array_equal(b[0]["image"], PreparedSource(out, "val")[0]["image"])
assert "tensorflow" not in sys.modules  # TFDS read, decoded and never imported TensorFlow
print("OK", len(a))
"""


def test_tfds_reads_it_without_tensorflow(synth_prepared):
    pytest.importorskip("tensorflow_datasets")
    out, _, _, summary = synth_prepared
    assert summary["tfds"] == {"metadata": True}
    for f in ("dataset_info.json", "features.json"):
        assert os.path.isfile(os.path.join(summary["path"], f))
    r = subprocess.run([sys.executable, "-c", _TFDS_SCRIPT, out], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "OK 18" in r.stdout, r.stderr[-3000:]
