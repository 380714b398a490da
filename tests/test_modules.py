"""Paper B's modules inside recognition: mask math, patch scores, YCbCr on device, pretrained
modules loaded from their own runs, frozen for N steps and then fine-tuned, and the ablation
configs."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowlight import checkpoint as ckpt_lib
from lowlight import main as ll_main
from lowlight import models
from lowlight.data.normalize import to_model_input
from lowlight.models.face_embedder import FaceEmbedder, patch_scores, ycbcr_mask
from tests.helpers import load_config


def _config(name, arg, **overrides):
    return load_config(name, arg, **overrides)


def test_patch_scores_golden():
    m = np.zeros((1, 4, 4), np.float32)
    m[0, :2, :2] = 1.0
    m[0, 2:, 2:] = 0.5
    np.testing.assert_allclose(np.asarray(patch_scores(jnp.asarray(m), 2)), [[1, 0, 0, 0.5]])


def test_ycbcr_on_device_matches_opencv_baseline():
    from lowlight.data.skin_color import ycbcr_skin_mask
    from lowlight.data.synthetic import SynthFaces

    imgs = SynthFaces(seed=3, num_identities=4, images_per_identity=2, size=32).render_batch(
        np.arange(8))["image"]
    ref = ycbcr_skin_mask(imgs)
    got = np.asarray(ycbcr_mask(jnp.asarray(to_model_input(imgs))))
    assert ref.mean() > 0.1  # the faces do contain skin
    assert np.mean(got == ref) > 0.99  # equal up to OpenCV's fixed-point rounding at the bounds


def test_mask_modulation_math_in_the_backbone():
    """F' = a*M*F + (1-a)*F: M=1 is the identity, M=0 scales features by 1-a."""
    bb = models.create("iresnet18", embed_dim=16, widths=(8, 8, 8, 8), mask_stage=1)
    emb = FaceEmbedder(bb, mask_source="ycbcr")
    x = jnp.zeros((2, 32, 32, 3))
    params, stats = emb.init(jax.random.key(0), x)
    alpha = params["backbone"]["mask_modulation"]["alpha"]
    assert float(alpha) == pytest.approx(0.7)
    mod = bb.apply  # direct check of the hook at stage 1 via intermediate-free comparison
    v = {"params": params["backbone"], "batch_stats": stats["backbone"]}
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    e_none, _ = mod(v, x, train=False, feature_mask=jnp.ones((2, 32, 32)))
    p0 = jax.tree.map(lambda a: a, params["backbone"])
    p0["mask_modulation"]["alpha"] = jnp.zeros(())
    e_alpha0, _ = mod({"params": p0, "batch_stats": stats["backbone"]}, x, train=False,
                      feature_mask=jnp.zeros((2, 32, 32)))
    np.testing.assert_allclose(np.asarray(e_none), np.asarray(e_alpha0), rtol=1e-5, atol=1e-5)
    e_zero, _ = mod(v, x, train=False, feature_mask=jnp.zeros((2, 32, 32)))
    assert not np.allclose(np.asarray(e_zero), np.asarray(e_none), atol=1e-4)


def test_vit_token_scaling_from_segmenter():
    bb = models.create("vit_t", img_size=32, patch_size=8, width=16, depth=1, num_heads=2,
                       embed_dim=8, mask_ratio=0.0, drop_path_rate=0.0)
    seg = models.create("seg_cnn3", features=(4, 4))
    emb = FaceEmbedder(bb, segmenter=seg, mask_source="segmenter")
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    params, stats = emb.init(jax.random.key(1), x)
    e, aux, _ = emb.apply(params, stats, x, train=False)
    assert e.shape == (2, 8) and aux["mask"].shape == (2, 32, 32)
    ref, _ = bb.apply({"params": params["backbone"], "batch_stats": stats["backbone"]}, x,
                      train=False, token_scale=patch_scores(aux["mask"], 8))
    np.testing.assert_allclose(np.asarray(e), np.asarray(ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("exp", ["mask_se", "mask_cbam", "seg_ycbcr"])
def test_ablation_variants_build_their_modules(exp):
    from lowlight.train import build_model

    c = _config("paper_b", f"exp={exp},smoke")
    model = build_model(c)
    params, _ = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3))),
                               jax.random.key(0))
    names = set(params["backbone"])
    if exp == "seg_ycbcr":
        assert "mask_modulation" in names and model.mask_source == "ycbcr"
    else:
        assert f"attention_{exp.split('_')[1]}" in names


def test_pretrained_modules_frozen_then_finetuned(tmp_path):
    """relight + U-Net trained by their own configs, loaded into recognition, unchanged for
    freeze_steps=2, updated at step 3 (joint fine-tuning)."""
    wd_r, wd_s, wd = (str(tmp_path / n) for n in ("relight", "seg", "rec"))
    ll_main.run(_config("relight", "smoke"), wd_r)
    ll_main.run(_config("skin_seg", "smoke"), wd_s)
    c = _config("paper_b", "exp=full,smoke", total_steps=3, ckpt_every=1, keep_ckpts=5,
                eval_every=3, **{"modules.relight.init_from": wd_r,
                                 "modules.relight.train": True,
                                 "modules.mask.init_from": wd_s,
                                 "modules.relight.freeze_steps": 2,
                                 "modules.mask.freeze_steps": 2})
    last = ll_main.run(c, wd)
    assert np.isfinite(last["train/loss"]) and "synth_illum/acc" in last
    r_params, _, _ = ckpt_lib.load_weights(wd_r)
    s_params, _, _ = ckpt_lib.load_weights(wd_s)
    by_step = {s: ckpt_lib.load_weights(wd, step=s)[0] for s in (1, 2, 3)}

    def same(a, b):
        return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    for s in (1, 2):
        assert same(by_step[s]["relight"], r_params)
        assert same(by_step[s]["segmenter"], s_params)
    assert not same(by_step[3]["relight"], r_params)
    assert not same(by_step[3]["segmenter"], s_params)
    assert not same(by_step[1]["backbone"], by_step[2]["backbone"])  # backbone trains throughout
