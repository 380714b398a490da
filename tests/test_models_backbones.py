"""Identity backbones: parameter counts, call contract, BatchNorm modes, torch parity."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowlight import models
from lowlight.models import iresnet, vit
from lowlight.models import layers as L

# Trainable counts (the `params` collection). r50/r100 and vit_t/s/b are arcface_torch's; the
# others were computed here and agree with the PyTorch reference below (torch meta device).
IRESNET_PARAMS = {
    "iresnet18": 24_025_088,
    "iresnet34": 34_138_816,
    "iresnet50": 43_590_336,
    "iresnet100": 65_155_648,
    "iresnet200": 118_833_408,
}
VIT_PARAMS = {
    "vit_t": 19_137_792,
    "vit_s": 76_023_296,
    "vit_b": 113_833_472,
    "vit_s_std": 42_861_952,  # width 384, 6 heads, GELU (computed here)
    "vit_b_std": 170_657_536,  # width 768: the 110,592 -> 768 head alone is 84.9M (computed here)
}


def tiny_iresnet(**kw):
    return iresnet.IResNet(layers=(1, 2, 1, 1), widths=(8, 16, 16, 32), embed_dim=16, **kw)


def tiny_vit(**kw):
    base = dict(width=32, depth=2, num_heads=4, img_size=36, patch_size=9, embed_dim=16)
    return vit.VisionTransformer(**{**base, **kw})


def _images(seed, batch, size):
    return np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


def _key(seed):
    # rbg keys: the threefry initialisers take seconds to compile on a shared 2-core CPU.
    return jax.random.key(seed, impl="rbg")


def _init(model, x, **kw):
    return jax.jit(lambda x: model.init(_key(1), x, train=False, **kw))(x)


def _apply(model, variables, x, *, train=False, **kw):
    """Jitted apply (one compilation instead of one per op); static kwargs are closed over."""
    arrays = {k: v for k, v in kw.items() if k in ("feature_mask", "token_scale")}
    static = {k: v for k, v in kw.items() if k not in arrays}
    if "rngs" in static:
        rng = static.pop("rngs")["dropout"]
        return jax.jit(
            lambda v, x, a, r: model.apply(v, x, train=train, rngs={"dropout": r}, **a, **static)
        )(variables, x, arrays, rng)
    return jax.jit(lambda v, x, a: model.apply(v, x, train=train, **a, **static))(
        variables, x, arrays
    )


@pytest.fixture(scope="module")
def tiny_ir():
    model = tiny_iresnet()
    x = _images(0, 4, 16)
    return model, x, _init(model, x)


# ------------------------------------------------------------------ parameter counts
@pytest.mark.parametrize("name", sorted({**IRESNET_PARAMS, **VIT_PARAMS}))
def test_param_counts(name):
    shapes = L.param_shapes(models.create(name))
    assert L.count_params(shapes["params"]) == {**IRESNET_PARAMS, **VIT_PARAMS}[name]


def test_iresnet_features_bn_has_no_scale_and_head_shape():
    shapes = L.param_shapes(iresnet.iresnet50())
    assert set(shapes["params"]["features"]) == {"bias"}
    assert set(shapes["batch_stats"]["features"]) == {"mean", "var"}
    assert shapes["params"]["fc"]["kernel"].shape == (512 * 7 * 7, 512)
    assert "downsample_conv" in shapes["params"]["layer1"]["block0"]  # stride 2 in layer1 too
    assert "downsample_conv" not in shapes["params"]["layer1"]["block1"]


def test_count_params_on_arrays_and_shapes():
    tree = {"a": np.zeros((2, 3)), "b": [jax.ShapeDtypeStruct((4,), jnp.float32)]}
    assert L.count_params(tree) == 10


# ------------------------------------------------------------------ call contract
def _check_embedding(emb, aux, batch, dim):
    assert emb.shape == (batch, dim) and emb.dtype == jnp.float32
    assert aux["norm"].shape == (batch,)
    np.testing.assert_allclose(aux["norm"], np.linalg.norm(np.asarray(emb), axis=-1), rtol=1e-5)


def test_iresnet_shapes_and_norm(tiny_ir):
    model, x, variables = tiny_ir
    emb, aux = _apply(model, variables, x)
    _check_embedding(emb, aux, 4, 16)
    assert float(np.linalg.norm(emb)) > 0


def test_batchnorm_stats_update_only_in_train_mode(tiny_ir):
    model, x, variables = tiny_ir
    stats = variables["batch_stats"]

    _, new = _apply(model, variables, x, mutable=["batch_stats"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, new["batch_stats"], stats)

    (emb_train, _), new = _apply(model, variables, x, train=True, mutable=["batch_stats"])
    changed = jax.tree_util.tree_map(
        lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), new["batch_stats"], stats
    )
    assert all(jax.tree_util.tree_leaves(changed))
    # torch momentum 0.1: from the initial 0 the running mean becomes 0.1 * batch mean.
    batch_mean = np.mean(_fc_output(model, variables, x, train=True), axis=0)
    np.testing.assert_allclose(
        new["batch_stats"]["features"]["mean"], 0.1 * batch_mean, rtol=1e-4, atol=1e-6
    )
    emb_eval, _ = _apply(model, variables, x)
    assert not np.allclose(emb_train, emb_eval)


def _fc_output(model, variables, x, train):
    mutable = ["intermediates", "batch_stats"] if train else ["intermediates"]
    _, state = _apply(model, variables, x, train=train, capture_intermediates=True, mutable=mutable)
    return np.asarray(state["intermediates"]["fc"]["__call__"][0])


def test_frozen_bn1d_scale_acts_as_one(tiny_ir):
    model, x, variables = tiny_ir
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(np.array, variables)
    variables["params"]["features"]["bias"] = rng.normal(size=16).astype(np.float32)
    variables["batch_stats"]["features"]["mean"] = rng.normal(size=16).astype(np.float32)
    variables["batch_stats"]["features"]["var"] = rng.uniform(0.5, 2, size=16).astype(np.float32)
    emb, _ = _apply(model, variables, x)
    fc = _fc_output(model, variables, x, train=False)
    bs = variables["batch_stats"]["features"]
    expected = (fc - bs["mean"]) / np.sqrt(bs["var"] + 1e-5) + variables["params"]["features"][
        "bias"
    ]
    np.testing.assert_allclose(emb, expected, rtol=1e-5, atol=1e-5)
    grads = jax.jit(
        jax.grad(lambda p: model.apply({**variables, "params": p}, x, train=False)[0].sum())
    )(variables["params"])
    assert set(grads["features"]) == {"bias"}


def test_iresnet_bfloat16_body_keeps_float32_params(tiny_ir):
    _, x, variables = tiny_ir
    model = tiny_iresnet(dtype=jnp.bfloat16)
    abstract = jax.eval_shape(lambda: model.init(_key(1), x, train=False))
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(abstract))
    emb, aux = _apply(model, variables, x)
    ref, _ = _apply(tiny_iresnet(), variables, x)
    assert emb.dtype == jnp.float32 and aux["norm"].dtype == jnp.float32
    np.testing.assert_allclose(emb, ref, rtol=0.1, atol=0.1 * float(np.abs(ref).max()))


def test_iresnet_mask_modulation_hook(tiny_ir):
    plain, x, plain_vars = tiny_ir
    masks = {
        "ones": np.ones((4, 16, 16), np.float32),
        "zeros": np.zeros((4, 16, 16, 1), np.float32),
    }
    with pytest.raises(ValueError, match="mask_stage"):
        jax.eval_shape(lambda: plain.init(_key(1), x, train=False, feature_mask=masks["ones"]))
    model = tiny_iresnet(mask_stage=2)
    alpha = iresnet.MaskModulation().init(_key(0), x, None)["params"]["alpha"]
    assert float(alpha) == pytest.approx(0.7)
    abstract = jax.eval_shape(lambda: model.init(_key(1), x, train=False))
    assert abstract["params"]["mask_modulation"]["alpha"].shape == ()
    assert L.count_params(abstract["params"]) == L.count_params(plain_vars["params"]) + 1
    variables = {
        **plain_vars,
        "params": {**plain_vars["params"], "mask_modulation": {"alpha": alpha}},
    }
    no_mask, _ = _apply(model, variables, x)
    ones, _ = _apply(model, variables, x, feature_mask=masks["ones"])
    zeros, _ = _apply(model, variables, x, feature_mask=masks["zeros"])
    np.testing.assert_allclose(no_mask, _apply(plain, plain_vars, x)[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ones, no_mask, rtol=1e-5, atol=1e-5)  # M = 1 leaves F unchanged
    assert not np.allclose(zeros, no_mask, atol=1e-3)


def test_vit_shapes_train_mode_and_token_scale():
    model = tiny_vit()
    x = _images(0, 2, 36)
    variables = _init(model, x)
    assert variables["params"]["mask_token"].shape == (1, 1, 32)
    base, aux = _apply(model, variables, x)
    _check_embedding(base, aux, 2, 16)
    (emb, aux), _ = _apply(
        model, variables, x, train=True, rngs={"dropout": _key(2)}, mutable=["batch_stats"]
    )
    _check_embedding(emb, aux, 2, 16)
    assert np.all(np.isfinite(emb))
    ones, _ = _apply(model, variables, x, token_scale=np.ones((2, 16), np.float32))
    np.testing.assert_allclose(ones, base, rtol=1e-6, atol=1e-7)  # x * 1 may fuse differently
    half = np.ones((2, 16), np.float32)
    half[:, :8] = 0.0
    scaled, _ = _apply(model, variables, x, token_scale=half)
    assert not np.allclose(scaled, base, atol=1e-4)
    remat, _ = _apply(tiny_vit(remat=True), variables, x)
    np.testing.assert_allclose(remat, base, rtol=1e-6, atol=1e-6)


def test_vit_random_masking_restores_positions():
    x = jnp.arange(2 * 10 * 3, dtype=jnp.float32).reshape(2, 10, 3)
    kept, ids_restore = vit.random_masking(x, _key(0), 0.1)
    assert kept.shape == (2, 9, 3)
    full = jnp.concatenate([kept, jnp.full((2, 1, 3), -1.0)], axis=1)
    restored = jnp.take_along_axis(full, ids_restore[:, :, None], axis=1)
    dropped = np.asarray(restored[..., 0] == -1.0)
    assert dropped.sum(axis=1).tolist() == [1, 1]
    np.testing.assert_array_equal(np.where(dropped[..., None], -1.0, x), restored)


# ------------------------------------------------------------------ PyTorch parity
def _torch():
    """torch is optional: every parity test skips cleanly without it."""
    return pytest.importorskip("torch")


def _torch_iresnet(layers, widths=(64, 128, 256, 512), num_features=512, fc_scale=49):
    """insightface arcface_torch IResNet, re-typed for the test (same module names)."""
    torch = _torch()
    nn = torch.nn

    class IBasicBlock(nn.Module):
        def __init__(self, inplanes, planes, stride=1, downsample=None):
            super().__init__()
            self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
            self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
            self.prelu = nn.PReLU(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
            self.downsample = downsample

        def forward(self, x):
            out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
            return out + (x if self.downsample is None else self.downsample(x))

    class IResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.inplanes = widths[0]
            self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-05)
            self.prelu = nn.PReLU(widths[0])
            for i, (planes, blocks) in enumerate(zip(widths, layers, strict=True)):
                setattr(self, f"layer{i + 1}", self._make_layer(planes, blocks, 2))
            self.bn2 = nn.BatchNorm2d(widths[-1], eps=1e-05)
            self.dropout = nn.Dropout(p=0.0)
            self.fc = nn.Linear(widths[-1] * fc_scale, num_features)
            self.features = nn.BatchNorm1d(num_features, eps=1e-05)
            nn.init.constant_(self.features.weight, 1.0)
            self.features.weight.requires_grad = False

        def _make_layer(self, planes, blocks, stride):
            downsample = None
            if stride != 1 or self.inplanes != planes:
                downsample = nn.Sequential(
                    nn.Conv2d(self.inplanes, planes, 1, stride, bias=False),
                    nn.BatchNorm2d(planes, eps=1e-05),
                )
            mods = [IBasicBlock(self.inplanes, planes, stride, downsample)]
            self.inplanes = planes
            mods += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
            return nn.Sequential(*mods)

        def forward(self, x):
            x = self.prelu(self.bn1(self.conv1(x)))
            for i in range(len(layers)):
                x = getattr(self, f"layer{i + 1}")(x)
            x = self.dropout(torch.flatten(self.bn2(x), 1))
            return self.features(self.fc(x))

    return IResNet()


def _randomise_norms(model, seed):
    """Non-trivial BN/LN/PReLU values so parity checks every affine and running statistic."""
    torch = _torch()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
                if m.weight is not None and m.weight.requires_grad:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            elif isinstance(m, torch.nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 0.5)


def test_torch_reference_param_counts():
    torch = _torch()

    def trainable(model):
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    with torch.device("meta"):
        for name, count in IRESNET_PARAMS.items():
            layers = iresnet.STAGE_LAYERS[int(name.removeprefix("iresnet"))]
            assert trainable(_torch_iresnet(layers)) == count, name
        for name in ("vit_t", "vit_s", "vit_b"):
            cfg = {"vit_t": (256, 12), "vit_s": (512, 12), "vit_b": (512, 24)}[name]
            assert trainable(_torch_vit(width=cfg[0], depth=cfg[1])) == VIT_PARAMS[name], name


def test_iresnet_torch_parity_eval():
    torch = _torch()
    torch.manual_seed(0)
    layers = (1, 2, 1, 1)
    ref = _torch_iresnet(layers).eval()
    _randomise_norms(ref, seed=1)
    x = np.random.default_rng(0).uniform(-1, 1, size=(2, 3, 112, 112)).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()

    variables = iresnet.load_torch_state(ref.state_dict())
    model = iresnet.IResNet(layers=layers)
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 112, 112, 3)), train=False)
    )
    same = jax.tree_util.tree_map(lambda a, b: a.shape == b.shape, abstract, variables)
    assert all(jax.tree_util.tree_leaves(same))
    emb, aux = _apply(model, variables, x.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(emb, expected, rtol=2e-4, atol=2e-4 * float(np.abs(expected).max()))


def test_iresnet_torch_converter_refuses_unfrozen_features_scale():
    torch = _torch()
    ref = _torch_iresnet((1, 1, 1, 1), widths=(8, 8, 8, 8), num_features=4, fc_scale=1)
    state = ref.state_dict()
    state["features.weight"] = torch.full((4,), 2.0)
    with pytest.raises(ValueError, match="frozen"):
        iresnet.load_torch_state(state)


def _torch_vit(width, depth, heads=8, img=112, patch=9, num_classes=512):
    """arcface_torch VisionTransformer (ln, no hybrid), re-typed without timm."""
    torch = _torch()
    nn = torch.nn

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(width, width * 3, bias=False)
            self.proj = nn.Linear(width, width)

        def forward(self, x):
            b, n, d = x.shape
            qkv = self.qkv(x).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
            attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * (d // heads) ** -0.5).softmax(dim=-1)
            return self.proj((attn @ qkv[2]).transpose(1, 2).reshape(b, n, d))

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = (
                nn.Linear(width, 4 * width),
                nn.ReLU6(),
                nn.Linear(4 * width, width),
            )

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.attn = nn.LayerNorm(width), Attention()
            self.norm2, self.mlp = nn.LayerNorm(width), Mlp()

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class PatchEmbed(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)

    class VisionTransformer(nn.Module):
        def __init__(self):
            super().__init__()
            n = (img // patch) ** 2
            self.n = n
            self.patch_embed = PatchEmbed()
            self.pos_embed = nn.Parameter(torch.randn(1, n, width) * 0.02)
            self.blocks = nn.ModuleList([Block() for _ in range(depth)])
            self.norm = nn.LayerNorm(width)
            self.feature = nn.Sequential(
                nn.Linear(width * n, width, bias=False),
                nn.BatchNorm1d(width, eps=2e-5),
                nn.Linear(width, num_classes, bias=False),
                nn.BatchNorm1d(num_classes, eps=2e-5),
            )
            self.mask_token = nn.Parameter(torch.zeros(1, 1, width))

        def forward(self, x):  # eval path (no masking, no drop path)
            x = self.patch_embed.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
            for blk in self.blocks:
                x = blk(x)
            return self.feature(self.norm(x).reshape(x.shape[0], self.n * width))

    return VisionTransformer()


def test_vit_torch_parity_eval():
    torch = _torch()
    torch.manual_seed(0)
    ref = _torch_vit(width=32, depth=2, heads=4, img=36, num_classes=16).eval()
    _randomise_norms(ref, seed=2)
    x = np.random.default_rng(0).uniform(-1, 1, size=(2, 3, 36, 36)).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    variables = vit.load_torch_state(ref.state_dict())
    emb, _ = _apply(tiny_vit(), variables, x.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(emb, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))
