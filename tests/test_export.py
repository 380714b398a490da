"""lowlight.export / tools/export.py: trained stages as jax.export artifacts, reloaded elsewhere.

A recognition smoke run (the ViT + MagFace main job) is trained for 2 steps; paper A's attribute
model gets a run directory holding random weights with non-trivial BatchNorm statistics (its
MobileNetV2 train step alone takes a minute to compile on a 2-core CPU, and export does not
depend on how the weights were obtained). Both are exported with a symbolic batch for CPU and
CUDA and run in a fresh Python process that imports neither flax nor lowlight's model code;
outputs must equal the in-process models' at batch 5 and at batch 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowlight import checkpoint as ckpt_lib
from lowlight import export
from lowlight import main as ll_main
from tests.helpers import ROOT, load_config


def _random_run(workdir: str, name: str, arg: str) -> str:
    """configs/<name>.py:<arg> + a step-0 checkpoint of random weights (BatchNorm statistics
    and scales away from their 0/1 initial values, so they matter)."""
    from lowlight import config_lib, models

    c = load_config(name, arg)
    config_lib.write_or_check(c, workdir)
    model = models.create(c.model.name, **dict(c.model.kwargs))
    x = jnp.zeros((1, c.data.size, c.data.size, 3))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    rng = np.random.default_rng(0)

    def fill(path, a):
        leaf = path[-1].key
        if leaf in ("scale", "var"):
            v = rng.uniform(0.5, 1.5, a.shape)
        elif leaf in ("bias", "mean"):
            v = rng.normal(0.0, 0.1, a.shape)
        else:  # kernels: unit-variance outputs for unit-variance inputs
            v = rng.normal(0.0, 1.0 / np.sqrt(np.prod(a.shape[:-1])), a.shape)
        return v.astype(np.float32)

    variables = jax.tree_util.tree_map_with_path(fill, shapes)
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), every=0,
                                 async_save=False)
    ckpt.save(0, {"params": variables["params"], "batch_stats": variables.get("batch_stats", {}),
                  "step": np.int32(0)}, force=True)
    ckpt.close()
    return workdir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    rec = str(root / "rec")
    ll_main.run(load_config("vit_magface", "smoke", total_steps=2, log_every=1,
                            eval_every=1000, ckpt_every=2, evals={}, num_devices=1,
                            **{"augment.enabled": False}), rec)
    attr = _random_run(str(root / "attr"), "paper_a", "smoke,train=natural")
    return {"recognition": rec, "attributes": attr}


def _faces(n, size, seed=0):
    from lowlight.data.synthetic import SynthFaces

    ds = SynthFaces(seed=seed, num_identities=8, images_per_identity=2, size=size)
    return ds.render_batch(np.arange(n))["image"]


def _reference(workdir, images) -> dict:
    """The in-process model on the run's checkpoint, computed the way training evaluates."""
    from lowlight import models, steps
    from lowlight.evaluate import load_config as run_config
    from lowlight.losses.multitask import predict
    from lowlight.train import build_model

    config = run_config(workdir)
    params, stats, _ = ckpt_lib.load_weights(workdir)
    if config.task == "recognition":
        model = build_model(config)
        emb = jax.jit(lambda p, s, x: steps.embed_step(p, s, x, model=model, flip=True))(
            params, stats, images)
        return {"embedding": np.asarray(emb)}
    model = models.create(config.model.name, **dict(config.model.kwargs))
    x = (jnp.asarray(images, jnp.float32) / 255.0 - 0.5) / 0.5
    out, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(
        {"params": params, "batch_stats": stats}, x)
    return jax.tree.map(np.asarray, predict(out, age_scale=config.task_cfg.age_scale))


_DEPLOY = r"""
import json, sys
import numpy as np
from lowlight.export import load_stage
arts, images, out = sys.argv[1].split(","), np.load(sys.argv[2]), sys.argv[3]
results = {}
for i, art in enumerate(arts):
    stage = load_stage(art)
    for n in (5, 1):
        for k, v in stage(images[:n]).items():
            results[f"{i}/{n}/{k}"] = np.asarray(v)
np.savez(out, **results)
heavy = sorted(m for m in sys.modules if m.split(".")[0] == "flax" or m.startswith(
    ("lowlight.models", "lowlight.train", "lowlight.steps", "orbax", "optax")))
print(json.dumps(heavy))
"""


def test_exported_stages_run_in_a_fresh_process(runs, tmp_path):
    images = _faces(5, 32)
    arts = []
    for task in ("recognition", "attributes"):
        blob = export.export_stage(runs[task], platforms=("cpu", "cuda"))
        arts.append(str(tmp_path / f"{task}.llstage"))
        with open(arts[-1], "wb") as f:
            f.write(blob)
        m = export.read_manifest(arts[-1])
        step = {"recognition": 2, "attributes": 0}[task]
        assert (m["task"], m["step"], m["platforms"]) == (task, step, ["cpu", "cuda"])
        assert m["input"]["shape"] == [None, 32, 32, 3]
    np.save(tmp_path / "images.npy", images)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    r = subprocess.run([sys.executable, "-c", _DEPLOY, ",".join(arts),
                        str(tmp_path / "images.npy"), str(tmp_path / "out.npz")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []  # nothing but jax + numpy
    got = np.load(tmp_path / "out.npz")

    rec = _reference(runs["recognition"], images)
    assert got["0/5/embedding"].shape == (5, 64)
    np.testing.assert_allclose(got["0/5/embedding"], rec["embedding"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["0/1/embedding"], rec["embedding"][:1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got["0/5/embedding"], axis=1), 1.0, rtol=1e-5)
    assert np.all(got["0/5/norm"] > 0)

    attr = _reference(runs["attributes"], images)
    for key in ("age", "female_prob", "ethnicity_probs"):
        np.testing.assert_allclose(got[f"1/5/{key}"], attr[key], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[f"1/1/{key}"], attr[key][:1], rtol=1e-5, atol=1e-5)
    for key in ("gender", "ethnicity"):
        np.testing.assert_array_equal(got[f"1/5/{key}"], attr[key])


def _export_cli(argv):
    """tools/export.py's main(argv), in process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("export_tool",
                                                  os.path.join(ROOT, "tools", "export.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv)


def test_fixed_batch_cli_and_input_checks(runs, tmp_path, capsys):
    art = str(tmp_path / "fixed.llstage")
    _export_cli([f"--workdir={runs['recognition']}", f"--out={art}", "--batch_size=2",
                 "--no-flip"])
    assert "recognition stage of vit_b (step 2" in capsys.readouterr().out
    stage = export.load_stage(art)
    assert stage.manifest["input"]["shape"] == [2, 32, 32, 3] and not stage.manifest["flip"]
    images = _faces(2, 32, seed=1)
    out = stage(images)
    assert out["embedding"].shape == (2, 64)
    with pytest.raises(ValueError, match=r"expected uint8 images of shape \(2, 32, 32, 3\)"):
        stage(images[:1])
    with pytest.raises(ValueError, match=r"uint8"):
        stage(images.astype(np.float32))

    cuda_only = str(tmp_path / "cuda.llstage")
    with open(cuda_only, "wb") as f:
        f.write(export.export_stage(runs["attributes"], platforms=("cuda",), batch_size=1))
    assert export.read_manifest(cuda_only)["platforms"] == ["cuda"]
    with pytest.raises(ValueError, match=r"exported for cuda and cannot run on this cpu"):
        export.load_stage(cuda_only)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        export.export_stage(str(tmp_path))


@pytest.mark.parametrize("name,arg,task", [("paper_a", "smoke,exp=lighting,labels=groups",
                                            "lighting"),
                                           ("relight", "smoke", "relight"),
                                           ("skin_seg", "smoke", "skin_seg")])
def test_other_stages_match_their_models(tmp_path, name, arg, task):
    from lowlight import models
    from lowlight.evaluate import load_config as run_config

    wd = _random_run(str(tmp_path / task), name, arg)
    art = str(tmp_path / "stage.llstage")
    with open(art, "wb") as f:
        f.write(export.export_stage(wd))
    stage = export.load_stage(art)
    assert stage.manifest["task"] == task
    config = run_config(wd)
    images = _faces(3, config.data.size)
    got = jax.tree.map(np.asarray, stage(images))
    params, stats, _ = ckpt_lib.load_weights(wd)
    model = models.create(config.model.name, **dict(config.model.kwargs))
    x = (images.astype(np.float32) / 255.0 - 0.5) / 0.5
    out = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False)[0])(
        {"params": params, "batch_stats": stats}, x))
    if task == "lighting":
        assert stage.manifest["class_names"] == ["normal", "low", "side", "over"]
        np.testing.assert_allclose(got["logits"], out, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got["label"], out.argmax(-1))
        np.testing.assert_allclose(got["probs"].sum(-1), 1.0, rtol=1e-6)
    elif task == "relight":
        expected = np.clip(np.rint((out * 0.5 + 0.5) * 255.0), 0, 255)
        assert got["image"].dtype == np.uint8 and got["image"].shape == images.shape
        assert np.abs(got["image"].astype(int) - expected).max() <= 1  # rounding ties only
    else:
        assert got["mask"].shape == images.shape[:3]
        np.testing.assert_allclose(got["mask"], out, rtol=1e-5, atol=1e-6)
