"""`lowlight.pipeline`: detection → alignment → lighting / routed attributes → relight → skin →
embedding on real photos and synthetic faces, checked against the evaluators' own forward passes
(what `lowlight.evaluate` computes), with the verification threshold calibrated from the run.

Runs: the recognition run is trained for one step by the real training loop
(`lowlight.main.run` on configs/vit_magface.py:smoke); the lighting classifier, attribute
experts, relighting net and U-Net are their configs' smoke models with seeded random weights,
saved as the loop saves (step 0) — the pipeline only needs the run format, and compiling their
training steps would cost minutes on a 2-core CPU. Real photos come from scikit-image and
matplotlib and are written to tmp only.
"""

import json
import os
import shutil

import cv2
import jax
import numpy as np
import pytest

from lowlight import pipeline as pl
from lowlight.inference import calibration, runs
from lowlight.inference.errors import InputError, RunError
from tests.helpers import load_config

_BUILT: dict[str, dict] = {}


def _train(name, arg, wd, **overrides):
    from lowlight import main as ll_main

    c = load_config(name, arg, num_devices=1, best_metric="", total_steps=1, **overrides)
    ll_main.run(c, wd)


def _init_run(name, arg, wd, seed):
    """A run directory holding the config's model with seeded random weights at step 0, saved
    as the training loop saves (a TrainState through the loop's Checkpointer). Weights are drawn
    in numpy (LeCun-normal kernels, identity BatchNorm) from the model's abstract shapes, so no
    XLA compilation is spent on initialising."""
    import jax.numpy as jnp

    from lowlight import checkpoint as ckpt_lib
    from lowlight import config_lib, models
    from lowlight.steps import TrainState

    c = load_config(name, arg, seed=seed)
    config_lib.write_or_check(c, wd)
    model = models.create(c.model.name, **dict(c.model.kwargs))
    x = jnp.zeros((1, c.data.size, c.data.size, 3), jnp.float32)
    abstract = jax.eval_shape(lambda k: model.init({"params": k, "dropout": k}, x, train=False),
                              jax.random.key(0))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        last = str(path[-1].key)
        if last in ("scale", "var"):
            return np.ones(leaf.shape, leaf.dtype)
        if last in ("bias", "mean"):  # the age head starts at the config's mean age, as in init
            start = c.model.kwargs.get("age_bias_init", 0.0) if "age_head" in str(path) else 0
            return np.full(leaf.shape, start, leaf.dtype)
        fan_in = max(1, int(np.prod(leaf.shape[:-1])))
        return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)

    v = jax.tree_util.tree_map_with_path(fill, abstract)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=v["params"],
                       batch_stats=v.get("batch_stats", {}), opt_state={},
                       extras={"nonfinite": jnp.zeros((), jnp.int32)},
                       rng=jax.random.key_data(jax.random.key(seed)))
    ck = ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), every=0, async_save=False)
    ck.save(0, state, force=True)
    ck.close()


def photos(root) -> dict[str, str]:
    """astronaut / grace_hopper / a 10%-brightness astronaut as files under `root`."""
    from lowlight.data.sample_photos import dim, sample_photos

    os.makedirs(root, exist_ok=True)
    real = sample_photos()
    astro, hopper = real["astronaut"], real["grace_hopper"]
    out = {}
    for name, im in (("astronaut", astro), ("hopper", hopper),
                     ("astronaut_dark", dim(astro, 0.1))):
        out[name] = os.path.join(root, name + ".png")
        cv2.imwrite(out[name], np.ascontiguousarray(im[..., ::-1]))
    return out


def build_runs(tmp_path_factory) -> dict:
    """The runs and photos every inference test uses, built once per process."""
    if not _BUILT:
        root = str(tmp_path_factory.mktemp("inference_runs"))
        d = {k: os.path.join(root, k) for k in
             ("rec", "light", "attr_a", "attr_b", "relight", "skin")}
        c = load_config("vit_magface", "smoke")
        _train("vit_magface", "smoke", d["rec"], evals={"synth_val": c.evals.synth_val})
        _init_run("paper_a", "smoke,exp=lighting,labels=binary", d["light"], seed=5)
        _init_run("paper_a", "smoke,train=natural", d["attr_a"], seed=1)
        _init_run("paper_a", "smoke,train=distortion", d["attr_b"], seed=2)
        _init_run("relight", "smoke", d["relight"], seed=3)
        _init_run("skin_seg", "smoke", d["skin"], seed=4)
        _BUILT.update(d, photos=photos(os.path.join(root, "photos")))
    return _BUILT


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_runs(tmp_path_factory)


def synth_faces(n, size, seed=7):
    from lowlight.data.synthetic import SynthFaces

    return SynthFaces(seed=seed, num_identities=8, images_per_identity=2,
                      size=size).render_batch(np.arange(n))


def test_each_stage_computes_what_its_evaluator_computes(built):
    """On pre-aligned synthetic faces (detector "none"), every stage's output equals the
    forward pass its task's evaluator runs (lowlight.evaluate's code path), relit input and
    routing included."""
    from lowlight import parallel
    from lowlight.eval.evaluators import make_embed_fn
    from lowlight.losses.multitask import predict
    from lowlight.train_supervised import _ModelFn

    p = pl.Pipeline(recognition=built["rec"], lighting=built["light"], skin=built["skin"],
                    relight=built["relight"], attributes=built["attr_a"], detector="none",
                    batch_size=4)
    images = synth_faces(6, 32)["image"]
    res = p.analyze(list(images))
    faces = [r.faces[0] for r in res]
    assert all(len(r.faces) == 1 and r.faces[0].alignment == "image" for r in res)

    def ref(role):
        run = runs.load_run(built[{"lighting": "light", "attributes": "attr_a"}.get(role, role)],
                            role)
        return run, _ModelFn(run.model)

    run, fn = ref("lighting")
    probs = np.asarray(jax.nn.softmax(fn(run.variables, images), -1))
    np.testing.assert_allclose([list(f.lighting_probs.values()) for f in faces], probs,
                               atol=1e-5)
    assert [f.lighting for f in faces] == [("normal", "low")[i] for i in probs.argmax(-1)]
    run, fn = ref("attributes")
    pred = jax.tree.map(np.asarray, predict(fn(run.variables, images),
                                            age_scale=run.config.task_cfg.age_scale))
    assert np.all(pred["age"] > 0)  # else the pipeline's clip at 0 years hides the comparison
    np.testing.assert_allclose([f.attributes["age"] for f in faces], pred["age"], atol=0.01)
    assert [f.attributes["gender"] for f in faces] == [("male", "female")[g]
                                                       for g in pred["gender"]]
    run, fn = ref("relight")  # RelightEvaluator's uint8 conversion
    relit = np.rint(np.clip(fn(run.variables, images) * 0.5 + 0.5, 0, 1) * 255).astype(np.uint8)
    run, fn = ref("skin")
    masks = fn(run.variables, relit)
    np.testing.assert_allclose(np.stack([f.skin_mask for f in faces]), masks, atol=2e-4)
    np.testing.assert_allclose([f.skin_fraction for f in faces],
                               (masks >= 0.5).mean(axis=(1, 2)), atol=1e-6)
    rec = runs.load_run(built["rec"], "recognition")
    embed = make_embed_fn(rec.model, parallel.make_mesh(1, jax.devices()[:1]), batch_size=8)
    want = embed(rec.variables["params"], rec.variables["batch_stats"], relit)
    np.testing.assert_allclose(np.stack([f.embedding for f in faces]), want, atol=2e-4)
    expected_luma = (images.astype(np.float64) @ [0.299, 0.587, 0.114]).mean(axis=(1, 2)) / 255
    # brightness is measured on the 112 px crop: a resize of the 32 px face (means agree)
    np.testing.assert_allclose([f.brightness for f in faces], expected_luma, atol=0.01)


def test_landmarks_on_the_template_reproduce_the_training_framing(built):
    """A synthetic face at the run's size with the ArcFace template as its landmarks is cropped
    unchanged (the world renders on that template), so detection-free and detected faces meet
    the model in the framing it trained on."""
    from lowlight.align import arcface_template

    p = pl.Pipeline(recognition=built["rec"], batch_size=4)
    im = synth_faces(1, 32)["image"][0]
    face = {"box": (0, 0, 32, 32), "landmarks": arcface_template(32)}
    assert np.abs(p.crop(im, face, 32).astype(int) - im).max() <= 1
    a = p.analyze([im], faces=[[face]])[0].faces[0]
    b = pl.Pipeline(recognition=built["rec"], detector="none", batch_size=4).analyze([im])
    assert a.alignment == "landmarks"
    np.testing.assert_allclose(a.embedding, b[0].faces[0].embedding, atol=1e-3)


def test_real_photos_detected_aligned_and_dark_light_kept(built):
    p = pl.Pipeline(recognition=built["rec"], lighting=built["light"], batch_size=4)
    ph = built["photos"]
    res = list(p.analyze_paths([ph["astronaut"], ph["hopper"], ph["astronaut_dark"]]))
    assert [len(r.faces) for r in res] == [1, 1, 1]
    astro, hopper, dark = (r.faces[0] for r in res)
    # the astronaut's face: RetinaFace box around (178, 57)-(273, 177) in the 512 x 512 photo
    np.testing.assert_allclose(astro.box, (178, 57, 273, 177), atol=6)
    assert astro.alignment == "landmarks" and astro.landmarks.shape == (5, 2)
    assert dark.brightness / astro.brightness == pytest.approx(0.1, abs=0.015)
    assert np.linalg.norm(astro.embedding) == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= float(astro.embedding @ hopper.embedding) < 0.999
    js = res[0].to_json()
    json.dumps(js)  # JSON-serialisable
    assert js["faces"][0]["lighting"] in ("normal", "low") and js["faces"][0]["embedding_dim"]
    haar = pl.Pipeline(detector="haar_clahe", batch_size=4).analyze_paths([ph["astronaut_dark"]])
    face = next(haar).faces[0]
    assert face.alignment == "box" and face.landmarks is None


def test_verify_threshold_is_calibrated_from_the_run(built):
    """Same photo twice → similarity 1 and "same"; the threshold is the best-accuracy cosine
    threshold of the run's synth_val pairs (golden: brute force over the pairs' scores from
    lowlight.evaluate), computed once, cached, then read from lowlight.evaluate's scores.npz."""
    from lowlight import evaluate as ll_eval

    wd = built["rec"] + "_cal"
    # without what other tests sharing the run may have left (a cached calibration, an eval/)
    shutil.copytree(built["rec"], wd,
                    ignore=shutil.ignore_patterns(calibration.CACHE_FILE, "eval"))
    p = pl.Pipeline(recognition=wd, lighting=built["light"], batch_size=4)
    im = pl.read_image(built["photos"]["hopper"])
    v = p.verify(im, im)
    assert v["similarity"] == pytest.approx(1.0, abs=1e-5) and v["same"] is True
    assert v["calibration"]["source"] == "computed" and v["calibration"]["set"] == "synth_val"
    assert v["faces"][0]["lighting"] in ("normal", "low")
    cached = json.load(open(os.path.join(wd, calibration.CACHE_FILE)))
    assert cached["step"] == 1 and cached["threshold"] == v["threshold"]
    again = pl.Pipeline(recognition=wd, batch_size=4)
    assert again.calibration.source == calibration.CACHE_FILE

    ll_eval.evaluate(wd)  # writes eval/1/scores.npz
    z = np.load(os.path.join(wd, "eval", "1", "scores.npz"))
    scores, issame = z["synth_val/scores"], z["synth_val/issame"]
    cands = np.r_[np.unique(scores), np.inf]
    acc = np.array([np.mean((scores >= t) == issame) for t in cands])
    golden = cands[np.flatnonzero(acc == acc.max()).max()]
    cal = calibration.calibrate(runs.stage(wd, "recognition", batch_size=4))
    assert cal.source == os.path.join("eval", "1", "scores.npz")
    assert cal.threshold == pytest.approx(golden) and cal.accuracy == pytest.approx(acc.max())
    assert v["threshold"] == pytest.approx(golden, abs=1e-5)  # pipeline's own embeddings


def test_best_threshold_tie_rule_and_degenerate_model():
    scores = np.array([0.9, 0.8, 0.8, 0.3, 0.2])
    issame = np.array([True, True, False, False, False])
    # 0.9 and 0.8 are both right on 4 of 5 pairs: the larger threshold wins
    assert calibration.best_threshold(scores, issame) == (0.9, 0.8)
    t, acc = calibration.best_threshold(np.array([0.5, 0.9]), np.array([True, False]))
    assert t == np.inf and acc == 0.5


def same_prediction(a, b) -> bool:
    """One expert's prediction for one face (batch padding may change the last float bits)."""
    close = lambda x, y, tol: abs(x - y) <= tol
    return (a["model"] == b["model"] and close(a["age"], b["age"], 0.011)
            and close(a["female_prob"], b["female_prob"], 2e-4)
            and all(close(a["ethnicity_probs"][k], v, 2e-4)
                    for k, v in b["ethnicity_probs"].items()))


def test_routing_sends_each_face_to_the_expert_of_its_light(built, tmp_path):
    """Swapping the experts of the two lighting classes swaps every face's attributes: the
    prediction comes from the expert that the face's lighting label names. A paper A routed
    run directory (config.task = attributes_routed) configures the same routing."""
    from lowlight import config_lib

    images = [pl.read_image(built["photos"][k]) for k in ("astronaut", "astronaut_dark",
                                                          "hopper")]
    out = {}
    for name, mapping in {"ab": {"normal": built["attr_a"], "low": built["attr_b"]},
                          "ba": {0: built["attr_b"], 1: built["attr_a"]}}.items():
        p = pl.Pipeline(attributes=mapping, lighting=built["light"], batch_size=4)
        out[name] = [r.faces[0] for r in p.analyze(images)]
    only_a = pl.Pipeline(attributes=built["attr_a"], batch_size=4).analyze(images)
    only_b = pl.Pipeline(attributes=built["attr_b"], batch_size=4).analyze(images)
    for k, (fa, fb) in enumerate(zip(out["ab"], out["ba"])):
        assert fa.lighting == fb.lighting
        own_a, own_b = only_a[k].faces[0].attributes, only_b[k].faces[0].attributes
        first, second = (own_a, own_b) if fa.lighting == "normal" else (own_b, own_a)
        assert same_prediction(fa.attributes, first) and same_prediction(fb.attributes, second)
    assert own_a["age"] != own_b["age"] or own_a["female_prob"] != own_b["female_prob"]

    routed = str(tmp_path / "routed")
    config_lib.write_or_check(load_config(
        "paper_a", f"smoke,exp=routed,lighting_from={built['light']},"
                   f"normal_from={built['attr_a']},low_from={built['attr_b']}"), routed)
    p = pl.Pipeline(attributes=routed, batch_size=4)
    assert p.lighting.run.workdir == built["light"]
    assert all(same_prediction(r.faces[0].attributes, f.attributes)
               for r, f in zip(p.analyze(images), out["ab"]))
    with pytest.raises(RunError, match="no lighting run"):
        pl.Pipeline(attributes={"low": built["attr_a"]})
    with pytest.raises(RunError, match=r"no model for lighting classes \['low'\]"):
        pl.Pipeline(attributes={"normal": built["attr_a"]}, lighting=built["light"])
    with pytest.raises(RunError, match="'side' unknown"):
        pl.Pipeline(attributes={"side": built["attr_a"]}, lighting=built["light"])


def test_fixed_batches_compile_once_and_results_do_not_depend_on_batching(built):
    p = pl.Pipeline(recognition=built["rec"], lighting=built["light"], batch_size=2,
                    detector="none")
    faces = synth_faces(5, 32)["image"]
    one = p.analyze([faces[0]])[0].faces[0]
    many = p.analyze(list(faces))  # 5 faces → 3 padded calls of 2
    np.testing.assert_allclose(many[0].faces[0].embedding, one.embedding, atol=1e-5)
    assert p.recognition.traces == 1 and p.lighting.traces == 1
    assert p.analyze([]) == []
    sharded = pl.Pipeline(recognition=built["rec"], batch_size=2, detector="none",
                          num_devices=2).analyze(list(faces))
    np.testing.assert_allclose(np.stack([r.faces[0].embedding for r in sharded]),
                               np.stack([r.faces[0].embedding for r in many]), atol=1e-5)


def test_folder_run_reports_unreadable_and_faceless_images(built, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(built["photos"]["astronaut"], folder / "a.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (folder / "notes.txt").write_text("not an image")
    cv2.imwrite(str(folder / "wall.png"), np.full((200, 300, 3), 128, np.uint8))
    p = pl.Pipeline(detector="haar")
    res = {os.path.basename(r.name): r for r in p.analyze_paths([str(folder)], progress=True)}
    assert sorted(res) == ["a.png", "broken.jpg", "wall.png"]
    assert len(res["a.png"].faces) == 1 and res["wall.png"].faces == []
    assert "broken.jpg" in res["broken.jpg"].error and "truncated JPEG" in res["broken.jpg"].error
    with pytest.raises(InputError, match="broken.jpg"):
        list(p.analyze_paths([str(folder / "broken.jpg")]))
    with pytest.raises(InputError, match="wall.png: no face found"):
        res["wall.png"].primary()
    with pytest.raises(InputError, match="missing.png: no such file"):
        pl.read_image(str(tmp_path / "missing.png"))


def test_unusable_runs_fail_with_the_directory_named(built, tmp_path):
    with pytest.raises(RunError, match="no such directory"):
        pl.Pipeline(recognition=str(tmp_path / "nope"))
    with pytest.raises(RunError, match="no config.json"):
        pl.Pipeline(recognition=str(tmp_path))
    with pytest.raises(RunError, match="is a 'lighting' run; expected a 'recognition' run"):
        pl.Pipeline(recognition=built["light"])
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(os.path.join(built["skin"], "config.json"), empty / "config.json")
    with pytest.raises(RunError, match=f"skin run '{empty}': no checkpoint"):
        pl.Pipeline(skin=str(empty))
    other = str(tmp_path / "other")
    shutil.copytree(built["light"], other)
    cfg = json.load(open(os.path.join(other, "config.json")))
    cfg["model"]["kwargs"]["dense"] = 64  # config no longer describes the checkpoint
    json.dump(cfg, open(os.path.join(other, "config.json"), "w"))
    with pytest.raises(RunError, match=r"checkpoint step 0 does not fit .*model \(64, 2\)"):
        pl.Pipeline(lighting=other)
    relit = str(tmp_path / "relit_rec")  # a recognition run that relights its own input
    os.makedirs(relit)
    cfg = json.load(open(os.path.join(built["rec"], "config.json")))
    cfg["modules"]["relight"]["enabled"] = True
    json.dump(cfg, open(os.path.join(relit, "config.json"), "w"))
    with pytest.raises(RunError, match="already relights its input"):
        pl.Pipeline(recognition=relit, relight=built["relight"])
