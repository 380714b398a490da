"""Real pair sets as evaluators (`type='pairs'`: insightface .bin, LFW pairs.txt) and the config
arguments that point a recognition run at real data (`lowlight.recipes.real_data`).

Fixtures are written in the real formats (a .bin pickle, an LFW folder + pairs.txt, an MXNet
RecordIO pack with its `property` file) from synthetic faces."""

from __future__ import annotations

import os

import cv2
import ml_collections
import numpy as np
import pytest

from lowlight.data import conditions as cond
from lowlight.data.recordio import write_recordio
from lowlight.data.synthetic import SynthFaces
from lowlight.data.verification_sets import write_verification_bin
from lowlight.eval import evaluators as ev_lib
from lowlight.eval import report, verification

SIZE = 32


@pytest.fixture(scope="module")
def world():
    src = SynthFaces(seed=5, num_identities=12, images_per_identity=4, size=SIZE,
                     condition_weights={"normal": 1.0})
    return src.render_batch(np.arange(48))


def _pair_rows(world, n=40, seed=0):
    """n pairs (rows into the world), alternately same / different identity."""
    rng = np.random.default_rng(seed)
    ids = np.asarray(world["identity"])
    out, issame = [], []
    for p in range(n):
        a = int(rng.integers(len(ids)))
        same = p % 2 == 0
        pool = np.flatnonzero((ids == ids[a]) if same else (ids != ids[a]))
        pool = pool[pool != a]
        out.append((a, int(rng.choice(pool))))
        issame.append(same)
    return np.asarray(out), np.asarray(issame)


def _embed(images):
    """A deterministic stand-in for a model: mean-removed grayscale pixels."""
    return ev_lib.raw_pixel_embeddings(images)


def _cfg(**kw):
    base = dict(type="pairs", size=SIZE, lighting="as_is", seed=3, num_pairs=0, images="")
    return ml_collections.ConfigDict({**base, **kw})


def test_bin_evaluator_matches_direct_computation(world, tmp_path):
    rows, issame = _pair_rows(world)
    images = world["image"][rows.ravel()]
    path = str(tmp_path / "lfw.bin")
    write_verification_bin(path, images, issame, ext=".png")
    ev = ev_lib.build({"lfw": _cfg(path=path)})["lfw"]
    assert isinstance(ev, ev_lib.PairSetVerification)
    np.testing.assert_array_equal(ev.images, images)  # PNG: lossless, rows in file order
    assert ev.idx1.tolist() == list(range(0, 80, 2)) and ev.idx2.tolist() == list(range(1, 80, 2))
    assert ev.identity is None and ev.gender is None
    assert set(ev.pair_conditions.tolist()) == {"as_is"}
    out = ev.run(_embed)
    emb = _embed(images)
    want = verification.evaluate(emb[0::2], emb[1::2], issame)
    for k in ("acc", "auc", "eer", "tpr@fpr=1e-3", "num_pos", "num_neg"):
        assert out[f"lfw/{k}"] == pytest.approx(want[k], abs=1e-6), k
    assert out["lfw/dropped_pairs"] == 0
    assert out["lfw/raw_pixel_acc"] == pytest.approx(want["acc"])  # same embedding here
    assert out["lfw/auc_ci_low"] <= out["lfw/auc"] <= out["lfw/auc_ci_high"]
    # num_pairs keeps the first N pairs
    ev10 = ev_lib.build({"x": _cfg(path=path, num_pairs=10)})["x"]
    assert len(ev10.issame) == 10 and ev10.issame.tolist() == issame[:10].tolist()


def test_bin_corrupt_image_drops_and_counts_the_pair(world, tmp_path):
    rows, issame = _pair_rows(world, n=6)
    bins = [cv2.imencode(".png", np.ascontiguousarray(im[..., ::-1]))[1].tobytes()
            for im in world["image"][rows.ravel()]]
    bins[5] = b"\x89PNG not really"
    path = str(tmp_path / "cfp_fp.bin")
    write_verification_bin(path, bins, issame)
    ev = ev_lib.build({"cfp_fp": _cfg(path=path)})["cfp_fp"]
    assert len(ev.issame) == 5 and ev.issame.tolist() == np.delete(issame, 2).tolist()
    assert ev.run(_embed)["cfp_fp/dropped_pairs"] == 1


def test_protocol_relights_only_the_probe_with_the_exact_mix(world, tmp_path):
    rows, issame = _pair_rows(world, n=40)
    images = world["image"][rows.ravel()]
    path = str(tmp_path / "agedb_30.bin")
    write_verification_bin(path, images, issame, ext=".png")
    ev = ev_lib.build({"a": _cfg(path=path, lighting="protocol")})["a"]
    # gallery faces untouched, probes transformed copies appended after the 80 stored images
    np.testing.assert_array_equal(ev.images[ev.idx1], images[0::2])
    assert ev.idx2.tolist() == list(range(80, 120))
    assert not np.array_equal(ev.images[ev.idx2], images[1::2])
    groups = [cond.group(c) for c in ev.pair_conditions]
    # paper B's mix 30% low / 40% side / 30% over, exact on 40 probes
    assert (groups.count("low"), groups.count("side"), groups.count("over")) == (12, 16, 12)
    again = ev_lib.build({"a": _cfg(path=path, lighting="protocol")})["a"]
    np.testing.assert_array_equal(again.images, ev.images)  # seeded: the same set every run
    other = ev_lib.build({"a": _cfg(path=path, lighting="protocol", seed=4)})["a"]
    assert not np.array_equal(other.pair_conditions, ev.pair_conditions)
    out = ev.run(_embed)
    assert out["a/num_pos"] == 20 and out["a/num_neg"] == 20
    md, metrics = report.recognition_report({"a": ev}, str(tmp_path), plots=False)
    assert "a/condition/low/auc" in metrics and "a/cmc_rank1" not in metrics
    assert "no identity labels" in md and "not measured" in md


def _jpg(image):
    return cv2.imencode(".jpg", np.ascontiguousarray(image[..., ::-1]),
                        [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def _lfw(world, tmp_path):
    """An LFW-layout folder (Name/Name_000k.jpg) of the world's 12 people and a pairs.txt with
    one fold of 4 same + 4 different pairs; image Ann_0001 appears in several pairs."""
    root = tmp_path / "lfw"
    names = [f"P{i:02d}_X" for i in range(12)]
    ids = np.asarray(world["identity"])
    for i, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for k, row in enumerate(np.flatnonzero(ids == i)[:3]):
            (root / name / f"{name}_{k + 1:04d}.jpg").write_bytes(_jpg(world["image"][row]))
    same = [(0, 1, 2), (0, 1, 3), (1, 1, 2), (2, 2, 3)]
    diff = [(0, 1, 1, 1), (0, 1, 2, 2), (3, 1, 4, 1), (5, 2, 6, 1)]
    lines = ["1\t4"] + [f"{names[p]}\t{a}\t{b}" for p, a, b in same] + \
            [f"{names[p]}\t{a}\t{names[q]}\t{b}" for p, a, q, b in diff]
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    return root, names


def test_lfw_evaluator_dedupes_images_and_keeps_identities(world, tmp_path):
    root, names = _lfw(world, tmp_path)
    ev = ev_lib.build({"lfw": _cfg(path=str(tmp_path / "pairs.txt"), images=str(root))})["lfw"]
    # 16 file references, 11 distinct files: P00_X_0001 is in four pairs
    assert len(ev.images) == 11
    assert ev.issame.tolist() == [True] * 4 + [False] * 4
    assert ev.identity[ev.idx1].tolist() == [names[0], names[0], names[1], names[2],
                                             names[0], names[0], names[3], names[5]]
    assert (ev.identity[ev.idx1] == ev.identity[ev.idx2]).tolist() == ev.issame.tolist()
    out = ev.run(_embed)
    emb = _embed(ev.images)
    want = verification.evaluate(emb[ev.idx1], emb[ev.idx2], ev.issame, n_folds=2)
    assert out["lfw/auc"] == pytest.approx(want["auc"], abs=1e-9)
    md, metrics = report.recognition_report({"lfw": ev}, str(tmp_path), plots=False)
    assert "lfw/cmc_rank1" in metrics  # identities known: identification runs
    with pytest.raises(ValueError, match=r"evals\.lfw\.images"):
        ev_lib.build({"lfw": _cfg(path=str(tmp_path / "pairs.txt"))})


def test_bad_pair_set_configs_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"evals\.x\.path='/nope\.bin'"):
        ev_lib.build({"x": _cfg(path="/nope.bin")})
    (tmp_path / "a.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"evals\.x\.lighting='dark'"):
        ev_lib.build({"x": _cfg(path=str(tmp_path / "a.bin"), lighting="dark")})


# ------------------------------------------------------------------------------ configs


@pytest.fixture
def pack(world, tmp_path):
    """An insightface-layout pack: train.rec/.idx, property, lfw.bin and cfp_fp.bin."""
    d = tmp_path / "ms1m"
    d.mkdir()
    write_recordio(str(d / "train.rec"), str(d / "train.idx"),
                   [(world["image"][i], int(world["identity"][i])) for i in range(48)],
                   ext=".png")
    rows, issame = _pair_rows(world, n=20)
    for name in ("lfw", "cfp_fp"):
        write_verification_bin(str(d / f"{name}.bin"), world["image"][rows.ravel()], issame,
                               ext=".png")
    return d


def test_real_data_config_arguments(pack):
    from lowlight.config_lib import ConfigError
    from tests.helpers import load_config

    c = load_config("paper_b", f"exp=aug,smoke,data=recordio,root={pack},"
                               "val_targets=lfw+cfp_fp")
    assert c.data.name == "recordio" and c.data.root == str(pack)
    assert c.data.num_identities == 12  # no property file: the pack's largest label + 1
    assert sorted(c.evals) == ["cfp_fp", "cfp_fp_illum", "lfw", "lfw_illum"]
    assert c.evals.lfw_illum.lighting == "protocol" and c.evals.lfw.lighting == "as_is"
    assert c.evals.lfw.path == os.path.join(str(pack), "lfw.bin") and c.evals.lfw.size == 32
    assert c.best_metric == "lfw/acc"
    (pack / "property").write_text("85742,112,112\n")  # insightface's class count wins
    c = load_config("vit_magface", f"smoke,data=recordio,root={pack}")
    assert c.data.num_identities == 85742 and "synth_val" in c.evals  # no targets: synthetic
    c = load_config("r100_arcface", f"smoke,val_targets={pack}/cfp_fp.bin")
    assert c.data.name == "synth" and list(c.evals) == ["cfp_fp", "cfp_fp_illum"]
    for arg, msg in (("data=recordio", r"data=recordio needs root"),
                     ("data=lmdb,root=/", r"unknown data 'lmdb'"),
                     (f"root={pack},val_targets=agedb_30", r"no pair set at .*agedb_30\.bin"),
                     ("val_targets=lfw", r"'lfw' is a name"),
                     (f"val_targets={pack}/pairs.txt", r"no pair set")):
        with pytest.raises(ConfigError, match=msg):
            load_config("vit_magface", "smoke," + arg)


def test_trains_on_a_pack_and_evaluates_its_bin_sets(pack, tmp_path):
    """End to end: config arguments → RecordIO training → .bin evaluation (as stored and
    through the protocol) in metrics.jsonl, and lowlight.evaluate's report on the checkpoint."""
    from lowlight import evaluate as evaluate_lib
    from lowlight import main as ll_main
    from tests.helpers import load_config

    c = load_config("paper_b", f"exp=aug,smoke,data=recordio,root={pack},val_targets=lfw",
                    total_steps=2, eval_every=2, ckpt_every=2)
    workdir = str(tmp_path / "run")
    last = ll_main.run(c, workdir)
    for k in ("lfw/acc", "lfw/auc", "lfw_illum/acc", "lfw_illum/dropped_pairs"):
        assert k in last and np.isfinite(last[k]), k
    metrics = evaluate_lib.evaluate(workdir)
    assert metrics["lfw/acc"] == pytest.approx(last["lfw/acc"], abs=1e-6)
    text = open(os.path.join(workdir, "eval", "2", "report.md")).read()
    assert "lfw_illum" in text and "not measured" in text
    # the same checkpoint on another pair set, chosen at evaluation time (a converted model's
    # path): the run's own evaluators are replaced, the metrics are appended
    other = evaluate_lib.evaluate(workdir, val_targets="cfp_fp", root=str(pack))
    assert {"cfp_fp/acc", "cfp_fp_illum/acc"} <= set(other) and "lfw/acc" not in other
    # cfp_fp.bin holds the very pairs of lfw.bin (see `pack`): identical figures
    assert other["cfp_fp/acc"] == pytest.approx(metrics["lfw/acc"], abs=1e-9)
    from lowlight.config_lib import ConfigError

    with pytest.raises(ConfigError, match=r"no pair set at .*agedb_30\.bin"):
        evaluate_lib.evaluate(workdir, val_targets="agedb_30", root=str(pack))
    with pytest.raises(ConfigError, match=r"recognition runs; this run's task is 'relight'"):
        evaluate_lib.with_pair_sets(ml_collections.ConfigDict({"task": "relight"}), "lfw")


# ------------------------------------------------------------------------------ labelled sources


def _folder(world, tmp_path):
    root = tmp_path / "ids"
    for i, (image, ident) in enumerate(zip(world["image"], world["identity"])):
        d = root / f"id{int(ident):03d}"
        d.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(d / f"{i}.png"), np.ascontiguousarray(image[..., ::-1]))
    return root


def _labelled(data, **kw):
    base = dict(type="labelled", data=data, max_images=30, per_identity=3, num_pairs=40,
                seed=1, lighting="as_is")
    return ml_collections.ConfigDict({**base, **kw})


def test_labelled_source_pairs_and_identification(world, tmp_path):
    root = _folder(world, tmp_path)
    data = dict(name="image_folder", root=str(root), size=SIZE, validate=False)
    ev = ev_lib.build({"ids": _labelled(data)})["ids"]
    assert len(ev.images) == 30  # 10 identities x 3 images (per_identity), max_images 30
    counts = np.bincount(ev.identity)
    assert counts[counts > 0].tolist() == [3] * 10
    same = ev.identity[ev.idx1] == ev.identity[ev.idx2]
    assert same.tolist() == ev.issame.tolist() and ev.issame.sum() == 20
    assert not np.any(ev.idx1 == ev.idx2)
    # each cached image is the folder's item at its source index (and carries its identity)
    from lowlight.data.image_folder import ImageFolder

    folder = ImageFolder(str(root), size=SIZE)
    for row in (0, 7, 29):
        item = folder[int(ev.source_index[row])]
        np.testing.assert_array_equal(ev.images[row], item["image"])
        assert item["identity"] == ev.identity[row]
    assert ev.gender is None and set(ev.conditions.tolist()) == {"as_is"}
    again = ev_lib.build({"ids": _labelled(data)})["ids"]
    np.testing.assert_array_equal(again.images, ev.images)
    np.testing.assert_array_equal(again.idx1, ev.idx1)
    out = ev.run(_embed)
    emb = _embed(ev.images)
    want = verification.evaluate(emb[ev.idx1], emb[ev.idx2], ev.issame)
    assert out["ids/acc"] == pytest.approx(want["acc"])
    _, metrics = report.recognition_report({"ids": ev}, str(tmp_path), plots=False)
    assert 0.0 <= metrics["ids/cmc_rank1"] <= 1.0
    prot = ev_lib.build({"ids": _labelled(data, lighting="protocol")})["ids"]
    probes = np.unique(ev.idx2)
    assert len(prot.images) == 30 + len(probes)
    assert set(prot.pair_conditions.tolist()) <= set(cond.CONDITIONS) - {"normal"}
    np.testing.assert_array_equal(prot.identity[prot.idx2], ev.identity[ev.idx2])


def test_labelled_synthetic_source_keeps_demographics_for_fairness(tmp_path):
    data = dict(name="synth", seed=77, num_identities=20, images_per_identity=3, size=SIZE,
                synth={})
    ev = ev_lib.build({"s": _labelled(data, max_images=60)})["s"]
    world = SynthFaces(seed=77, num_identities=20, images_per_identity=3, size=SIZE)
    want = world.render_batch(ev.source_index)
    np.testing.assert_array_equal(ev.gender, want["gender"])
    np.testing.assert_array_equal(ev.conditions, np.asarray(want["condition"]).astype(str))
    ev.run(_embed)
    _, metrics = report.recognition_report({"s": ev}, str(tmp_path), plots=False)
    assert any(k.startswith("s/fairness/tpr_gender=") for k in metrics)
    with pytest.raises(ValueError, match=r"evals\.t: the sampled images have 1 identities"):
        ev_lib.build({"t": _labelled(data, per_identity=3, max_images=3)})
