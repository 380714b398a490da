"""End to end: a few training steps, checkpoint round trip, resume (also on fewer devices),
evaluation — the recognition task on the smoke config, in-process on 8 fake CPU devices."""

import json
import os

import jax
import numpy as np
import pytest

from lowlight import main as ll_main
from lowlight.metric_writer import read_metrics
from tests.helpers import ROOT, load_config


def _config(name="vit_magface", arg="smoke", **overrides):
    return load_config(name, arg, **overrides)


def _steps(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


@pytest.mark.parametrize("name", ["vit_magface", "r100_arcface"])
def test_two_steps_checkpoint_resume_and_eval(tmp_path, name):
    wd = str(tmp_path / "run")
    c = _config(name, total_steps=3, stop_after=2, log_every=1, eval_every=2, ckpt_every=1)
    last = ll_main.run(c, wd)
    assert json.load(open(os.path.join(wd, "config.json")))["loss"]["name"] == c.loss.name
    recs = read_metrics(wd)
    steps = [r["step"] for r in recs if "train/loss" in r]
    assert steps == [1, 2]
    assert all(np.isfinite(r["train/loss"]) for r in recs if "train/loss" in r)
    evals = [r for r in recs if "synth_val/acc" in r]
    assert evals and evals[-1]["step"] == 2
    for key in ("synth_val/auc", "synth_val/tpr@fpr=1e-3", "synth_illum/acc",
                "synth_val/raw_pixel_acc"):
        assert key in evals[-1]
    assert 0.0 <= evals[-1]["synth_val/acc"] <= 1.0
    assert _steps(wd)[-1] == 2
    assert last["train/loss"] == recs[[r["step"] for r in recs].index(2)]["train/loss"]

    # Resume: same workdir, more steps -> continues at step 3, not from scratch.
    c2 = _config(name, total_steps=3, log_every=1, eval_every=100, ckpt_every=1)
    ll_main.run(c2, wd)
    steps = [r["step"] for r in read_metrics(wd) if "train/loss" in r]
    assert steps == [1, 2, 3]
    assert _steps(wd)[-1] == 3


def test_resume_on_fewer_devices_continues_the_same_run(tmp_path):
    """Saved on 8 devices, resumed on 4: the state restores into the new mesh, and the result
    equals an uninterrupted 8-device run (data stream and RNG continue exactly)."""
    wd_a, wd_b = str(tmp_path / "a"), str(tmp_path / "b")
    kw = dict(log_every=1, eval_every=1000, ckpt_every=1, evals={})
    ll_main.run(_config(total_steps=3, **kw), wd_a)
    ll_main.run(_config(total_steps=3, stop_after=2, **kw), wd_b)
    ll_main.run(_config(total_steps=3, num_devices=4, **kw), wd_b)
    la = [r["train/loss"] for r in read_metrics(wd_a) if "train/loss" in r]
    lb = [r["train/loss"] for r in read_metrics(wd_b) if "train/loss" in r]
    assert len(la) == len(lb) == 3
    np.testing.assert_allclose(lb, la, rtol=1e-5)


def test_nonfinite_updates_are_skipped_counted_then_stop(tmp_path):
    """lr = NaN makes every update non-finite: each is skipped (parameters unchanged, so the
    loss stays finite) and counted; beyond max_nonfinite the run stops with a clear message."""
    c = _config(total_steps=6, log_every=1, eval_every=1000, ckpt_every=1, evals={},
                max_nonfinite=2)
    c.optim.lr = float("nan")
    wd = str(tmp_path / "nan")
    with pytest.raises(FloatingPointError, match=r"3 updates were skipped as non-finite"):
        ll_main.run(c, wd)
    recs = [r for r in read_metrics(wd) if "train/loss" in r]
    assert [r["train/nonfinite"] for r in recs] == [1.0, 2.0]
    assert all(np.isfinite(r["train/loss"]) for r in recs)
    from lowlight import checkpoint as ckpt_lib

    first, _, _ = ckpt_lib.load_weights(wd, step=1)
    second, _, _ = ckpt_lib.load_weights(wd, step=2)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
        np.testing.assert_array_equal(a, b)  # skipped updates leave the weights untouched



def test_adaface_statistics_are_updated_before_use(tmp_path):
    """AdaFace keeps an EMA of feature norms in the train state: after one step from the official
    initial (20, 100), mean = 0.01 * batch mean + 0.99 * 20."""
    c = _config("r100_adaface", "smoke", total_steps=1, log_every=1, evals={})
    c.model.name = "vit_t"  # any backbone: the statistics live outside it; ViT compiles fastest
    c.model.kwargs = dict(embed_dim=64, img_size=32, patch_size=8, width=32, depth=1,
                          num_heads=2, drop_path_rate=0.0, mask_ratio=0.0)
    ll_main.run(c, str(tmp_path / "ada"))
    rec = [r for r in read_metrics(str(tmp_path / "ada")) if "train/loss" in r][-1]
    np.testing.assert_allclose(rec["train/adaface_norm_mean"],
                               0.01 * rec["train/norm_mean"] + 0.99 * 20.0, rtol=1e-5)
    assert rec["train/adaface_norm_std"] < 100.0


def test_command_line_smoke_run(tmp_path):
    """The user's path: `python -m lowlight.main --config=configs/vit_magface.py:smoke`."""
    import subprocess
    import sys

    wd = str(tmp_path / "cli")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    r = subprocess.run([sys.executable, "-m", "lowlight.main",
                        "--config=configs/vit_magface.py:smoke", f"--workdir={wd}",
                        "--config.progress=False"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = read_metrics(wd)
    assert max(r["step"] for r in recs) == 4
    assert any("synth_illum/acc" in r for r in recs)
    assert sorted(os.listdir(os.path.join(wd, "checkpoints")))[-1] == "4"


def test_bfloat16_compute_trains(tmp_path):
    c = _config(total_steps=2, log_every=1, eval_every=2, **{"model.kwargs.dtype": "bfloat16"})
    c.evals = {"synth_val": c.evals.synth_val}
    last = ll_main.run(c, str(tmp_path / "bf16"))
    assert np.isfinite(last["train/loss"]) and last["train/nonfinite"] == 0.0
    assert 0.0 <= last["synth_val/acc"] <= 1.0


def test_trains_from_an_insightface_recordio_pack(tmp_path):
    """The researcher's path: an MXNet RecordIO pack (MS1M layout) → recognition training."""
    from lowlight.data.recordio import write_recordio
    from lowlight.data.synthetic import SynthFaces

    faces = SynthFaces(seed=1, num_identities=16, images_per_identity=4, size=32)
    batch = faces.render_batch(np.arange(64))
    pack = tmp_path / "ms1m"
    pack.mkdir()
    write_recordio(str(pack / "train.rec"), str(pack / "train.idx"),
                   [(batch["image"][i], int(batch["identity"][i])) for i in range(64)],
                   ext=".png")
    c = _config(total_steps=2, log_every=1, eval_every=2, **{
        "data.name": "recordio", "data.num_identities": 16, "data.root": str(pack)})
    c.evals = {"synth_val": c.evals.synth_val}
    last = ll_main.run(c, str(tmp_path / "run"))
    assert np.isfinite(last["train/loss"]) and "synth_val/acc" in last
    c.data.num_identities = 8  # fewer classes than the pack has: refused at start
    from lowlight.config_lib import ConfigError

    with pytest.raises(ConfigError, match=r"num_identities=8 but the dataset has 16"):
        ll_main.run(c, str(tmp_path / "run8"))


def test_trains_from_a_prepared_arrayrecord_dataset(tmp_path):
    """tools/prepare.py's output (TFDS ArrayRecord, PNG-encoded) → recognition training."""
    from lowlight.data.prepared import write_prepared
    from lowlight.data.synthetic import SynthFaces

    world = SynthFaces(seed=2, num_identities=16, images_per_identity=4, size=32)
    write_prepared(str(tmp_path / "data"), {"train": world}, name="synth_small",
                   drop_keys=("canonical", "skin_mask"), progress=False, tfds_metadata=False)
    c = _config(total_steps=2, log_every=1, eval_every=1000, evals={}, **{
        "data.name": "prepared", "data.num_identities": 16,
        "data.root": str(tmp_path / "data")})
    last = ll_main.run(c, str(tmp_path / "run"))
    assert np.isfinite(last["train/loss"])


def test_init_from_takes_matching_weights_and_keeps_other_shapes_fresh():
    """config.init_from moves weights whose shapes match (a pretrained / converted backbone) and
    keeps the rest freshly initialised (Partial FC centres of another number of identities)."""
    import jax
    import numpy as np

    from lowlight.loop import _take_matching

    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    fresh = {"backbone": {"w": jax.device_put(np.zeros((3, 2), np.float32), dev)},
             "centers": jax.device_put(np.zeros((10, 2), np.float32), dev)}
    loaded = {"backbone": {"w": np.arange(6, dtype=np.float64).reshape(3, 2)},
              "centers": np.ones((7, 2), np.float32)}
    out = _take_matching(fresh, loaded, "params")
    np.testing.assert_array_equal(out["backbone"]["w"], np.arange(6).reshape(3, 2))
    assert out["backbone"]["w"].dtype == np.float32 and out["backbone"]["w"].sharding == dev
    np.testing.assert_array_equal(out["centers"], np.zeros((10, 2)))
    with pytest.raises(ValueError, match="none of the params"):
        _take_matching(fresh, {"other": np.ones(3)}, "params")
    assert _take_matching({}, loaded, "batch_stats") == {}
