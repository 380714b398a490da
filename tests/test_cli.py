"""The `lowlight` command line (verify / analyze / enroll / identify) and the on-disk gallery.

Commands run in-process through `lowlight.cli.main(argv, out)` (the console script's entry
point) on real photos written to tmp, with the runs `tests/test_inference_pipeline.py` builds;
one test runs the installed console script itself.
"""

import io
import json
import os
import subprocess
import sys
from importlib import metadata

import cv2
import numpy as np
import pytest

from lowlight import cli
from lowlight.gallery import EMBEDDINGS, META, Gallery
from lowlight.inference.errors import GalleryError
from tests.test_inference_pipeline import build_runs


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_runs(tmp_path_factory)


def run(*argv):
    """(exit status, stdout) of `lowlight argv...`."""
    out = io.StringIO()
    return cli.main([str(a) for a in argv], out=out), out.getvalue()


def test_verify_same_photo_is_the_same_person(built):
    ph = built["photos"]
    rc, out = run("verify", ph["hopper"], ph["hopper"], "--recognition", built["rec"],
                  "--lighting", built["light"], "--json")
    assert rc == 0
    res = json.loads(out)
    assert res["similarity"] == pytest.approx(1.0, abs=1e-5) and res["same"] is True
    assert res["calibration"]["set"] == "synth_val" and res["calibration"]["step"] == 1
    assert res["threshold"] == res["calibration"]["threshold"] <= 1.0
    assert [f["image"] for f in res["faces"]] == [ph["hopper"]] * 2
    assert all(f["lighting"] in ("normal", "low") and f["num_faces"] == 1 for f in res["faces"])
    assert res["models"]["recognition"]["workdir"] == built["rec"]
    rc, out = run("verify", ph["astronaut"], ph["hopper"], "--recognition", built["rec"])
    assert rc == 0 and out.startswith("similarity ") and "threshold" in out
    assert ("same person" in out) == (float(out.split()[1]) >= res["threshold"])


def test_analyze_json_table_and_drawing(built, tmp_path):
    ph = built["photos"]
    models = ("--lighting", built["light"], "--attributes", built["attr_a"])
    rc, out = run("analyze", ph["astronaut"], ph["hopper"], *models, "--json")
    assert rc == 0
    res = json.loads(out)
    assert [im["image"] for im in res["images"]] == [ph["astronaut"], ph["hopper"]]
    for im in res["images"]:
        (face,) = im["faces"]
        assert len(face["box"]) == 4 and face["alignment"] == "landmarks"
        assert face["lighting"] in ("normal", "low") and 0 < face["brightness"] < 1
        a = face["attributes"]
        assert a["gender"] in ("male", "female") and np.isfinite(a["age"])
        assert a["ethnicity"] in ("White", "Black", "Asian", "Indian", "Others")
        assert sum(a["ethnicity_probs"].values()) == pytest.approx(1.0, abs=1e-3)
    assert res["models"]["attributes"]["all"]["workdir"] == os.path.abspath(built["attr_a"])

    drawn = str(tmp_path / "out.png")
    rc, out = run("analyze", ph["astronaut"], *models, "--draw", drawn, "--detector", "haar")
    assert rc == 0 and out.splitlines()[0].split()[:3] == ["image", "face", "box"]
    src, img = cv2.imread(ph["astronaut"]), cv2.imread(drawn)
    assert img.shape == src.shape == (512, 512, 3)
    x1, y1, x2, y2 = (int(v) for v in out.splitlines()[1].split()[2:6])
    assert np.abs(img[y1:y2 + 1, x1].astype(int) - src[y1:y2 + 1, x1]).max() > 50  # box edge
    np.testing.assert_array_equal(img[400:, 400:], src[400:, 400:])  # far from the face
    folder = tmp_path / "drawn"
    folder.mkdir()
    rc, _ = run("analyze", ph["astronaut"], ph["hopper"], "--detector", "haar",
                "--draw", folder)
    assert rc == 0 and sorted(os.listdir(folder)) == ["astronaut.png", "hopper.png"]


def test_enroll_then_identify_returns_the_enrolled_name(built, tmp_path):
    ph, g = built["photos"], str(tmp_path / "gallery")
    rec = ("--recognition", built["rec"])
    assert run("enroll", "--gallery", g, "eileen", ph["astronaut"], *rec)[0] == 0
    rc, out = run("enroll", "--gallery", g, "grace", ph["hopper"], ph["hopper"], *rec)
    assert rc == 0 and "2 name(s), 3 face(s)" in out
    rc, out = run("identify", "--gallery", g, ph["astronaut"], "--top-k", "2", "--json", *rec)
    assert rc == 0
    res = json.loads(out)
    assert [m["name"] for m in res["matches"]] == ["eileen", "grace"]
    assert res["matches"][0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert res["matches"][0]["match"] is True
    rc, out = run("identify", "--gallery", g, ph["hopper"], *rec)
    assert rc == 0 and out.splitlines()[1].split()[:2] == ["1.", "grace"]
    # the files are plain data: no pickle needed to read them
    with np.load(os.path.join(g, EMBEDDINGS), allow_pickle=False) as z:
        assert z["embeddings"].shape == (3, 64) and z["names"].tolist() == [
            "eileen", "grace", "grace"]
    meta = json.load(open(os.path.join(g, META)))
    assert meta["model"]["step"] == 1 and meta["entries"][0]["source"] == ph["astronaut"]


def test_user_errors_exit_2_naming_the_file(built, tmp_path, capsys):
    ph, rec = built["photos"], ("--recognition", built["rec"])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    wall = str(tmp_path / "wall.png")
    cv2.imwrite(wall, np.full((240, 320, 3), 90, np.uint8))
    cases = [
        (("verify", broken, ph["hopper"], *rec), f"{broken}: truncated JPEG"),
        (("verify", tmp_path / "missing.png", ph["hopper"], *rec), "missing.png: no such file"),
        (("verify", ph["hopper"], wall, *rec), f"{wall}: no face found"),
        (("analyze", wall), f"no face found in {wall}"),
        (("verify", ph["hopper"], ph["hopper"]), "verify needs a recognition run"),
        (("verify", ph["hopper"], ph["hopper"], "--recognition", tmp_path / "nope"),
         f"recognition run '{tmp_path / 'nope'}': no such directory"),
        (("identify", "--gallery", tmp_path / "g", ph["hopper"], *rec),
         f"{tmp_path / 'g'}: no gallery there"),
        (("analyze", ph["hopper"], "--skin", built["light"]),
         "is a 'lighting' run; expected a 'skin_seg' run"),
    ]
    for argv, message in cases:
        assert run(*argv)[0] == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("lowlight: error: ") and message in err[-1], (argv, err)
    g = tmp_path / "corrupt"
    g.mkdir()
    np.savez(g / EMBEDDINGS, embeddings=np.zeros((1, 64), np.float32),
             names=np.array([{"a": 1}], dtype=object))  # an object array is a pickle
    json.dump({"format": "lowlight-gallery", "version": 1, "model": {"dim": 64},
               "entries": [{"name": "a"}]}, open(g / META, "w"))
    assert run("identify", "--gallery", g, ph["hopper"], *rec)[0] == 2
    assert f"{g / EMBEDDINGS}: corrupt gallery embeddings" in capsys.readouterr().err


def test_model_settings_come_from_flags_then_environment_then_config_file(tmp_path, capsys):
    cfg = tmp_path / "lowlight.json"
    cfg.write_text(json.dumps({"recognition": "from_file", "lighting": "file_light",
                               "detector": "haar", "batch_size": 4}))
    args = cli.build_parser().parse_args(["verify", "a", "b", "--recognition", "flag",
                                          "--config", str(cfg)])
    env = {"LOWLIGHT_RECOGNITION": "env", "LOWLIGHT_LIGHTING": "env_light"}
    s = cli.resolve_settings(args, environ=env)
    assert (s["recognition"], s["lighting"], s["detector"], s["batch_size"]) == (
        "flag", "env_light", "haar", 4)
    assert s["attributes"] == "" and s["score_threshold"] == 0.5
    cfg.write_text(json.dumps({"recognition": "x", "detectr": "haar"}))
    with pytest.raises(cli.UsageError, match=r"lowlight.json: unknown keys \['detectr'\]"):
        cli.resolve_settings(args, environ={})
    cfg.write_text(json.dumps({"detector": "mtcnn"}))
    assert run("analyze", "x.png", "--config", cfg)[0] == 2
    assert "detector 'mtcnn'; valid: retinaface, haar, haar_clahe, none" in capsys.readouterr().err


def test_gallery_ranks_names_by_their_best_face_and_refuses_other_models(tmp_path):
    model = {"fingerprint": "abc", "dim": 3, "workdir": "/runs/r", "step": 7}
    g = Gallery.open_or_create(str(tmp_path / "g"), model)
    g.add("ann", np.array([[1.0, 0, 0], [0, 1.0, 0]]), [{"source": "a1"}, {"source": "a2"}],
          model)
    g.add("bob", np.array([[0.6, 0.8, 0.0]]), [{"source": "b"}], model)
    g.save()
    g = Gallery.open(str(tmp_path / "g"))
    q = np.array([0.0, 2.0, 1.0])  # unit: (0, .894, .447); ann's best is row 2
    m = g.search(q, model, top_k=5)
    assert [(x.name, x.entry) for x in m] == [("ann", 1), ("bob", 2)]
    np.testing.assert_allclose([x.similarity for x in m], [2 / 5 ** 0.5, 1.6 / 5 ** 0.5],
                               rtol=1e-6)
    assert g.names == ["ann", "bob"] and len(g) == 3
    with pytest.raises(GalleryError, match="holds 3-d embeddings; this recognition model "
                                           "gives 4-d"):
        g.add("cy", np.ones((1, 4)), [{}], {**model, "dim": 4})
    with pytest.raises(GalleryError, match="enrolled with another recognition model"):
        g.search(q, {**model, "fingerprint": "other"})
    with pytest.raises(GalleryError, match="expected 1-200 characters"):
        g.add("two\nlines", np.ones((1, 3)), [{}], model)
    meta = json.load(open(tmp_path / "g" / META))
    meta["entries"][0]["name"] = "eve"
    json.dump(meta, open(tmp_path / "g" / META, "w"))
    with pytest.raises(GalleryError, match="the names in embeddings.npz and gallery.json differ"):
        Gallery.open(str(tmp_path / "g"))
    (tmp_path / "g" / META).write_text("{not json")
    with pytest.raises(GalleryError, match="gallery.json: corrupt gallery metadata"):
        Gallery.open(str(tmp_path / "g"))


def test_console_script_is_installed_and_reports_errors():
    (ep,) = [e for e in metadata.entry_points(group="console_scripts") if e.name == "lowlight"]
    assert ep.value == "lowlight.cli:main"
    script = os.path.join(os.path.dirname(sys.executable), "lowlight")
    proc = subprocess.run([script, "verify", "nope_a.png", "nope_b.png", "--recognition", "."],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("lowlight: error: ")
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "identify" in proc.stdout
