"""Paper A's models and objective: MobileNetV2 + attention + heads, lighting CNN, multitask loss."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowlight import models
from lowlight.data import conditions
from lowlight.data.illumination import reduce_brightness
from lowlight.data.normalize import to_model_input
from lowlight.data.synthetic import SynthFaces
from lowlight.losses import multitask as mt
from lowlight.models import attention as A
from lowlight.models import layers as L
from lowlight.models import lighting_cnn as LC
from lowlight.models import mobilenetv2 as M

# torchvision `mobilenet_v2().features`: 3,504,872 total minus the 1280*1000 + 1000 classifier.
TORCHVISION_FEATURES_PARAMS = 2_223_872


def _key(seed):
    # rbg keys: threefry initialisers compile slowly on a shared 2-core CPU.
    return jax.random.key(seed, impl="rbg")


def _images(seed, batch, size, channels=3):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (batch, size, size, channels)).astype(np.float32)


def _abstract_apply(model, size, batch=2):
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    shapes = L.param_shapes(model, image_size=size, batch=batch)
    return jax.eval_shape(lambda v, x: model.apply(v, x, train=False), shapes, x)


# ================================================================== MobileNetV2 structure
def test_make_divisible_matches_torchvision():
    # torchvision _make_divisible values (hand-checked against its formula).
    assert [M.make_divisible(v) for v in (32, 16 * 0.5, 24 * 0.35, 1280 * 1.4, 3)] == [
        32, 8, 8, 1792, 8,
    ]
    assert M.make_divisible(0.75 * 24) == 24 and M.make_divisible(0.75 * 160) == 120
    assert M.last_channels(0.5) == 1280 and M.last_channels(1.4) == 1792


def test_block_table_and_residual_count():
    specs = M.block_specs(1.0)
    assert len(specs) == 17
    assert [s.out_channels for s in specs] == [16, 24, 24, 32, 32, 32, 64, 64, 64, 64,
                                               96, 96, 96, 160, 160, 160, 320]
    assert [s.stride for s in specs] == [1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1]
    assert sum(s.residual for s in specs) == 10  # torchvision: 10 use_res_connect blocks
    assert specs[0].hidden == 32 and specs[1].hidden == 96  # t = 1 block keeps 32 channels


@pytest.mark.parametrize("alpha", [0.5, 0.75, 1.0])
def test_features_param_count(alpha):
    shapes = L.param_shapes(M.MobileNetV2Features(alpha=alpha), image_size=32)
    n = L.count_params(shapes["params"])
    assert n == M.FEATURES_PARAMS[alpha]
    if alpha == 1.0:
        assert n == TORCHVISION_FEATURES_PARAMS
    # Running statistics are not trainable and not counted: one mean + var per BN channel.
    bn_scales = sum(
        int(np.prod(leaf.shape))
        for path, leaf in jax.tree_util.tree_leaves_with_path(shapes["params"])
        if path[-1].key == "scale"
    )
    assert L.count_params(shapes["batch_stats"]) == 2 * bn_scales


def test_full_model_param_breakdown():
    base = L.count_params(L.param_shapes(M.mobilenetv2(attention="none"), 32)["params"])
    se = L.count_params(L.param_shapes(M.mobilenetv2(attention="se"), 32)["params"])
    cbam = L.count_params(L.param_shapes(M.mobilenetv2(attention="cbam"), 32)["params"])
    heads = 1280 * 256 + 256 + (256 + 1) * 2 + 256 * 5 + 5
    assert base == TORCHVISION_FEATURES_PARAMS + heads
    assert se - base == 1280 * 80 + 80 + 80 * 1280 + 1280  # r = 16
    assert cbam - base == se - base + 2 * 7 * 7 + 1  # shared MLP + 7x7 conv (with bias)


@pytest.mark.parametrize("size,cells", [(64, 2), (112, 4), (35, 2)])
def test_model_output_shapes(size, cells):
    model = models.create("mobilenetv2")
    (outputs, aux) = _abstract_apply(model, size, batch=3)
    assert outputs["age"].shape == (3,)
    assert outputs["gender_logit"].shape == (3,)
    assert outputs["ethnicity_logits"].shape == (3, 5)
    assert aux["features"].shape == (3, 256)
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves((outputs, aux)))
    feats = _abstract_apply(M.MobileNetV2Features(), size, batch=3)
    assert feats.shape == (3, cells, cells, 1280)


def _random_variables(model, x, seed=0):
    """Variables filled from numpy (no jitted init: compiling one takes seconds on 2 cores)."""
    shapes = jax.eval_shape(lambda x: model.init(_key(0), x, train=False), x)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return rng.normal(0, math.sqrt(2.0 / fan_in), leaf.shape).astype(np.float32)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        return rng.normal(0, 0.1, leaf.shape).astype(np.float32)  # bias, mean

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def tiny_features():
    """alpha 0.35 extractor on an odd 35x35 input, and one jitted forward returning every block."""
    model = M.MobileNetV2Features(alpha=0.35)
    x = _images(0, 2, 35)
    run = jax.jit(
        lambda v, x: model.apply(v, x, train=False, capture_intermediates=True,
                                 mutable=["intermediates"])
    )
    return model, x, _random_variables(model, x), run


def test_residual_wiring_in_the_model(tiny_features):
    """Projection BN forced to output 1: a block gives input + 1 with the shortcut, else 1."""
    _, x, variables, run = tiny_features
    variables = jax.tree_util.tree_map(np.array, variables)
    for block in variables["params"].values():
        if "project_bn" in block:
            block["project_bn"]["scale"][:] = 0.0
            block["project_bn"]["bias"][:] = 1.0
    _, state = run(variables, x)
    inter = state["intermediates"]
    residual = []
    for i in range(1, 18):
        out = np.asarray(inter[f"features_{i}"]["__call__"][0])
        inp = np.asarray(inter[f"features_{i - 1}"]["__call__"][0])
        assert np.abs(inp).max() > 0  # so that input + 1 and 1 differ
        if out.shape == inp.shape and np.allclose(out, inp + 1.0):
            residual.append(i)
        else:
            np.testing.assert_array_equal(out, 1.0)  # no shortcut: only the projection
    # torchvision's 10 use_res_connect blocks: repeats after the first of each (t,c,n,s) row.
    assert residual == [3, 5, 6, 8, 9, 10, 12, 13, 15, 16]


# ================================================================== attention blocks
def test_se_with_zero_weights_scales_by_one_half():
    x = _images(1, 2, 5, channels=32)
    block = A.SqueezeExcitation(reduction=16)
    variables = block.init(_key(0), x)
    assert variables["params"]["fc1"]["kernel"].shape == (32, 2)
    zero = jax.tree_util.tree_map(jnp.zeros_like, variables)
    out, state = block.apply(zero, x, mutable=["intermediates"])
    np.testing.assert_allclose(out, 0.5 * x, rtol=1e-6)
    np.testing.assert_allclose(state["intermediates"]["scale"][0], 0.5)
    # non-zero weights: the scale differs per channel and lies in (0, 1)
    out, state = block.apply(variables, x, mutable=["intermediates"])
    s = np.asarray(state["intermediates"]["scale"][0])
    assert s.shape == (2, 32) and np.all((s > 0) & (s < 1)) and np.std(s) > 1e-4
    np.testing.assert_allclose(out, x * s[:, None, None, :], rtol=1e-5)


def test_cbam_shape_and_spatially_varying_map():
    x = _images(2, 2, 9, channels=16)
    x[:, :, :4] *= 3.0  # non-uniform input: left part much stronger
    block = A.CBAM(reduction=4)
    variables = block.init(_key(0), x)
    out, state = block.apply(variables, x, mutable=["intermediates"])
    assert out.shape == x.shape
    amap = np.asarray(state["intermediates"]["spatial"]["map"][0])
    assert amap.shape == (2, 9, 9) and np.all((amap > 0) & (amap < 1))
    assert np.std(amap[0]) > 1e-3  # differs per position
    chan = np.asarray(state["intermediates"]["channel"]["scale"][0])
    np.testing.assert_allclose(out, x * chan[:, None, None, :] * amap[..., None], rtol=1e-5)
    # zeroed weights: both attentions are sigmoid(0) everywhere, output x / 4
    zero = jax.tree_util.tree_map(jnp.zeros_like, variables)
    np.testing.assert_allclose(block.apply(zero, x), 0.25 * x, rtol=1e-6)


def test_cbam_spatial_bn_variant_and_factory():
    x = _images(3, 2, 6, channels=8)
    block = A.attention_block("cbam", reduction=2, spatial_bn=True)
    variables = block.init(_key(0), x)
    assert "bias" not in variables["params"]["spatial"]["conv"]
    assert set(variables["batch_stats"]["spatial"]["bn"]) == {"mean", "var"}
    _, new = block.apply(variables, x, train=True, mutable=["batch_stats"])
    assert not np.allclose(new["batch_stats"]["spatial"]["bn"]["mean"], 0.0)
    none = A.attention_block("none", reduction=4, kernel_size=7)
    assert none.init(_key(0), x) == {}
    np.testing.assert_array_equal(none.apply({}, x), x)
    with pytest.raises(ValueError, match="unknown attention"):
        A.attention_block("eca")
    with pytest.raises(ValueError, match="option"):
        A.attention_block("se", ratio=8)


# ================================================================== full model behaviour
def test_model_dropout_train_only_and_torch_weights_merge():
    model = M.mobilenetv2(alpha=0.35, projection_dim=32, age_bias_init=30.0)
    x = _images(4, 4, 32)
    variables = _random_variables(model, x)

    @jax.jit
    def run(v, x):  # one compilation: eval twice, train with two dropout keys
        evals = [model.apply(v, x, train=False) for _ in range(2)]
        trains = [model.apply(v, x, train=True, rngs={"dropout": _key(k)},
                              mutable=["batch_stats"])[0] for k in (1, 2)]
        return evals, trains

    (out1, aux1), (out2, _) = run(variables, x)[0]
    jax.tree_util.tree_map(np.testing.assert_array_equal, out1, out2)
    assert aux1["features"].shape == (4, 32)
    (ta, aux_a), (tb, aux_b) = run(variables, x)[1]
    np.testing.assert_array_equal(aux_a["features"], aux_b["features"])  # dropout after aux
    assert not np.allclose(ta["ethnicity_logits"], tb["ethnicity_logits"])

    # load_torch_state into a whole model: only the backbone changes, shapes must match.
    feats = {
        "params": jax.tree_util.tree_map(np.ones_like, variables["params"]["backbone"]),
        "batch_stats": variables["batch_stats"]["backbone"],
    }
    sd = _flax_backbone_to_torch_like(feats)
    merged = M.load_torch_state(sd, variables)
    assert np.all(merged["params"]["backbone"]["features_3"]["depthwise"]["conv"]["kernel"] == 1)
    np.testing.assert_array_equal(merged["params"]["age_head"]["bias"],
                                  variables["params"]["age_head"]["bias"])
    bigger = M.mobilenetv2(alpha=0.5, projection_dim=32)
    with pytest.raises(ValueError, match="alpha"):
        M.load_torch_state(sd, L.param_shapes(bigger, 32))


def _flax_backbone_to_torch_like(feats):
    """Inverse of the converter's layout rules, for round-tripping without torch."""
    inverse = {}
    for i in range(19):
        for flax_path, torch_key in _torch_names(i):
            node = feats["params"][f"features_{i}"]
            stats = feats["batch_stats"][f"features_{i}"]
            for part in flax_path:
                node, stats = node[part], stats.get(part, {})
            if "kernel" in node:
                inverse[f"{torch_key}.weight"] = np.asarray(node["kernel"]).transpose(3, 2, 0, 1)
            else:
                inverse[f"{torch_key}.weight"] = np.asarray(node["scale"])
                inverse[f"{torch_key}.bias"] = np.asarray(node["bias"])
                inverse[f"{torch_key}.running_mean"] = np.asarray(stats["mean"])
                inverse[f"{torch_key}.running_var"] = np.asarray(stats["var"])
                inverse[f"{torch_key}.num_batches_tracked"] = np.zeros(())
    inverse["classifier.1.weight"] = np.zeros((1000, 1280))  # ignored by the loader
    return inverse


def _torch_names(i):
    """(flax sub-path, torchvision module name) pairs of features.<i>."""
    p = f"features.{i}"
    if i in (0, 18):
        return [(["conv"], f"{p}.0"), (["bn"], f"{p}.1")]
    subs = (["expand", "depthwise"] if i != 1 else ["depthwise"])
    names = []
    for j, sub in enumerate(subs):
        names += [([sub, "conv"], f"{p}.conv.{j}.0"), ([sub, "bn"], f"{p}.conv.{j}.1")]
    n = len(subs)
    return names + [(["project_conv"], f"{p}.conv.{n}"), (["project_bn"], f"{p}.conv.{n + 1}")]


def test_registry_and_lighting_names():
    assert isinstance(models.create("mobilenetv2", attention="cbam"), M.MobileNetV2)
    assert models.create("lighting_cnn", num_classes=4).num_classes == 4
    assert LC.CLASS_NAMES[4] == conditions.GROUPS == ("normal", "low", "side", "over")
    with pytest.raises(ValueError, match="projection_activation"):
        _abstract_apply(M.mobilenetv2(projection_activation="gelu"), 32)


# ================================================================== torch parity (optional)
def _torch():
    return pytest.importorskip("torch")


def _torch_mobilenet_modules(torch):
    """torchvision's MobileNetV2 feature extractor, re-typed for the test (same module names)."""
    nn = torch.nn

    def conv_bn(inp, out, k=3, stride=1, groups=1):
        return nn.Sequential(
            nn.Conv2d(inp, out, k, stride, (k - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out),
            nn.ReLU6(inplace=True),
        )

    class InvertedResidual(nn.Module):
        def __init__(self, inp, oup, stride, t):
            super().__init__()
            hidden = int(round(inp * t))
            self.use_res_connect = stride == 1 and inp == oup
            layers = [conv_bn(inp, hidden, k=1)] if t != 1 else []
            layers += [
                conv_bn(hidden, hidden, stride=stride, groups=hidden),
                nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
                nn.BatchNorm2d(oup),
            ]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.use_res_connect else self.conv(x)

    def features(alpha):
        specs = M.block_specs(alpha)
        layers = [conv_bn(3, specs[0].in_channels, stride=2)]
        layers += [InvertedResidual(s.in_channels, s.out_channels, s.stride, s.expand_ratio)
                   for s in specs]
        layers.append(conv_bn(specs[-1].out_channels, M.last_channels(alpha), k=1))
        return nn.Sequential(*layers)

    return InvertedResidual, features


def _randomise(torch, module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                # He-scaled weights: torch's default init shrinks the signal layer after layer,
                # which would let a wrong padding in early blocks fade out of the final output.
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.3)
    return module.eval()


def _nchw(torch, x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(y):
    return y.detach().numpy().transpose(0, 2, 3, 1)


def test_torch_reference_param_counts():
    torch = _torch()
    _, features = _torch_mobilenet_modules(torch)
    with torch.device("meta"):
        for alpha, count in M.FEATURES_PARAMS.items():
            assert sum(p.numel() for p in features(alpha).parameters()) == count, alpha


@pytest.mark.parametrize("in_ch,out_ch,stride,t,size", [(24, 24, 1, 6, 8), (16, 24, 2, 6, 10),
                                                        (32, 16, 1, 1, 7)])
def test_inverted_residual_torch_parity(in_ch, out_ch, stride, t, size):
    torch = _torch()
    block_cls, _ = _torch_mobilenet_modules(torch)
    torch.manual_seed(0)
    ref = _randomise(torch, block_cls(in_ch, out_ch, stride, t), 1)
    index = 1 if t == 1 else 3  # a torchvision block index with the same expansion layout
    variables = L.convert_torch_state(
        ref.state_dict(), lambda m: M._torch_rename(["features", str(index)] + m)[1:]
    )
    x = _images(5, 2, size, channels=in_ch)
    with torch.no_grad():
        expected = _nhwc(ref(_nchw(torch, x)))
    out = M.InvertedResidual(out_ch, stride, t).apply(variables, x, False)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_se_and_cbam_torch_parity():
    torch = _torch()
    tnn = torch.nn

    class SE(tnn.Module):  # Hu et al. with nn.Linear excitation
        def __init__(self, c, r):
            super().__init__()
            self.fc1, self.fc2 = tnn.Linear(c, c // r), tnn.Linear(c // r, c)

        def forward(self, x):
            s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3))))))
            return x * s[:, :, None, None]

    class CBAM(tnn.Module):  # Woo et al. Eqs. (2)-(3), descriptors in the paper's (avg, max) order
        def __init__(self, c, r):
            super().__init__()
            self.fc1, self.fc2 = tnn.Linear(c, c // r), tnn.Linear(c // r, c)
            self.conv = tnn.Conv2d(2, 1, 7, padding=3)

        def forward(self, x):
            mlp = lambda v: self.fc2(torch.relu(self.fc1(v)))  # noqa: E731
            x = x * torch.sigmoid(mlp(x.mean((2, 3))) + mlp(x.amax((2, 3))))[:, :, None, None]
            d = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
            return x * torch.sigmoid(self.conv(d))

    torch.manual_seed(0)
    x = _images(6, 2, 6, channels=32)
    se = _randomise(torch, SE(32, 8), 2)
    cbam = _randomise(torch, CBAM(32, 8), 3)
    with torch.no_grad():
        se_ref, cbam_ref = (_nhwc(m(_nchw(torch, x))) for m in (se, cbam))
    se_vars = L.convert_torch_state(se.state_dict(), lambda m: m)
    out = A.SqueezeExcitation(reduction=8).apply(se_vars, x)
    np.testing.assert_allclose(out, se_ref, rtol=1e-5, atol=1e-5)

    cb = L.convert_torch_state(cbam.state_dict(), lambda m: m)["params"]
    cb_vars = {"params": {"channel": {"fc1": cb["fc1"], "fc2": cb["fc2"]},
                          "spatial": {"conv": cb["conv"]}}}
    out = A.CBAM(reduction=8).apply(cb_vars, x)
    np.testing.assert_allclose(out, cbam_ref, rtol=1e-5, atol=1e-5)


def test_features_torch_parity_through_loader(tiny_features):
    torch = _torch()
    _, features = _torch_mobilenet_modules(torch)
    torch.manual_seed(0)
    ref = _randomise(torch, features(0.35), 4)
    state = {f"features.{k}": v for k, v in ref.state_dict().items()}
    _, x, _, run = tiny_features  # alpha 0.35, odd 35x35 input: every stride-2 pad matters
    out, state = run(M.load_torch_state(state), x)
    h = _nchw(torch, x)
    with torch.no_grad():
        for i, layer in enumerate(ref):  # every block, not only the end of the network
            h = layer(h)
            expected = _nhwc(h)
            got = np.asarray(state["intermediates"][f"features_{i}"]["__call__"][0])
            assert got.shape == expected.shape, i
            np.testing.assert_allclose(got, expected, rtol=1e-4,
                                       atol=1e-4 * np.abs(expected).max(), err_msg=f"block {i}")
    assert out.shape == (2, 2, 2, 1280)
    np.testing.assert_array_equal(out, got)


# ================================================================== loss, metrics, early stop
def _loss_case():
    rng = np.random.default_rng(7)
    outputs = {
        "age": rng.uniform(0, 80, 6).astype(np.float32),
        "gender_logit": rng.normal(0, 3, 6).astype(np.float32),
        "ethnicity_logits": rng.normal(0, 2, (6, 5)).astype(np.float32),
    }
    batch = {
        "age": rng.integers(1, 100, 6),
        "gender": np.array([0, 1, 1, 0, 1, 0]),
        "ethnicity": np.array([0, 1, 2, 3, 4, 2]),
    }
    return outputs, batch


def _numpy_terms(outputs, batch, age_scale):
    p = 1.0 / (1.0 + np.exp(-outputs["gender_logit"].astype(np.float64)))
    y = batch["gender"]
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    z = outputs["ethnicity_logits"].astype(np.float64)
    probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    ce = -np.log(probs[np.arange(len(z)), batch["ethnicity"]])
    mse = (outputs["age"] - batch["age"] * age_scale) ** 2
    return mse, bce, ce


@pytest.mark.parametrize("age_scale", [1.0, 0.01])
def test_attribute_loss_golden(age_scale):
    outputs, batch = _loss_case()
    if age_scale != 1.0:
        outputs = {**outputs, "age": outputs["age"] * age_scale}
    mse, bce, ce = _numpy_terms(outputs, batch, age_scale)
    total, parts = mt.attribute_loss(outputs, batch, age_scale=age_scale)
    np.testing.assert_allclose(parts["age_mse"], mse.mean(), rtol=1e-5)
    np.testing.assert_allclose(parts["gender_bce"], bce.mean(), rtol=1e-5)
    np.testing.assert_allclose(parts["ethnicity_ce"], ce.mean(), rtol=1e-5)
    np.testing.assert_allclose(total, 0.1 * mse.mean() + bce.mean() + ce.mean(), rtol=1e-5)
    np.testing.assert_allclose(parts["total"], total)

    w = np.array([1, 1, 0, 1, 0, 1], np.float32)  # e.g. padding
    total_w, _ = mt.attribute_loss(outputs, batch, w_age=0.5, w_gender=2.0, w_ethnicity=0.0,
                                   age_scale=age_scale, weights=w)
    keep = w > 0
    np.testing.assert_allclose(total_w, 0.5 * mse[keep].mean() + 2.0 * bce[keep].mean(),
                               rtol=1e-5)


def test_attribute_loss_is_stable_and_jittable():
    outputs = {"age": np.zeros(2, np.float32), "gender_logit": np.array([200.0, -200.0]),
               "ethnicity_logits": np.array([[500.0, 0, 0, 0, 0], [0, 0, 0, 0, 500.0]])}
    batch = {"age": np.zeros(2), "gender": np.array([0, 0]), "ethnicity": np.array([0, 0])}
    total, parts = jax.jit(mt.attribute_loss)(outputs, batch)
    np.testing.assert_allclose(parts["gender_bce"], 100.0, rtol=1e-6)  # (200 + 0) / 2
    np.testing.assert_allclose(parts["ethnicity_ce"], 250.0, rtol=1e-6)  # (0 + 500) / 2
    assert np.isfinite(total)


def test_attribute_metrics_hand_case():
    outputs = {
        "age": np.array([30.0, 20.0, 51.0]),
        "gender_logit": np.array([2.0, -1.0, 0.0]),  # -> female, male, male (tie is male)
        "ethnicity_logits": np.eye(5)[[0, 3, 4]] * 3.0,
    }
    batch = {"age": np.array([25, 20, 50]), "gender": np.array([1, 1, 0]),
             "ethnicity": np.array([0, 3, 2])}
    m = mt.attribute_metrics(outputs, batch)
    assert float(m["age_mae"]) == pytest.approx(2.0)
    assert float(m["gender_acc"]) == pytest.approx(2 / 3)
    assert float(m["ethnicity_acc"]) == pytest.approx(2 / 3)
    scaled = {**outputs, "age": outputs["age"] / 100}
    assert float(mt.attribute_metrics(scaled, batch, age_scale=0.01)["age_mae"]) == \
        pytest.approx(2.0, rel=1e-5)
    m = mt.attribute_metrics(outputs, batch, weights=np.array([1.0, 1.0, 0.0]))
    assert float(m["age_mae"]) == pytest.approx(2.5) and float(m["ethnicity_acc"]) == 1.0


def test_early_stopping_patience_best_and_state():
    es = mt.EarlyStopping(patience=3)
    assert [es.update(v) for v in (5.0, 4.0, 4.5, 4.2)] == [False] * 4
    assert (es.best, es.best_step, es.wait) == (4.0, 1, 2)
    saved = es.state_dict()
    assert es.update(4.0) is True  # equal is not better: third non-improving update stops
    assert es.update(1.0) is False and es.best == 1.0 and es.best_step == 5  # improvement resets

    resumed = mt.EarlyStopping.from_state_dict(saved)
    assert resumed.state_dict() == saved
    assert resumed.update(4.1) is True and resumed.best_step == 1

    es = mt.EarlyStopping(patience=2, min_delta=0.5)
    assert es.update(5.0, step=10) is False
    assert es.update(4.6, step=20) is False and es.best == 5.0  # within min_delta
    assert es.update(float("nan"), step=30) is True and es.best_step == 10

    es = mt.EarlyStopping(patience=1, mode="max")
    assert es.update(0.5) is False and es.update(0.7) is False and es.update(0.6) is True
    assert es.best == 0.7 and math.isinf(mt.EarlyStopping(mode="max").best)
    with pytest.raises(ValueError, match="mode"):
        mt.EarlyStopping(mode="up")


# ================================================================== lighting classifier
@pytest.mark.parametrize("num_classes,size", [(2, 32), (4, 33)])
def test_lighting_cnn_shapes(num_classes, size):
    model = models.create("lighting_cnn", num_classes=num_classes)
    logits, aux = _abstract_apply(model, size, batch=3)
    assert logits.shape == (3, num_classes) and logits.dtype == jnp.float32
    assert aux["features"].shape == (3, 128)
    with pytest.raises(ValueError, match="num_classes"):
        _abstract_apply(LC.lighting_cnn(num_classes=1), 32)


def _dark_vs_bright(seed, n):
    ds = SynthFaces(seed=seed, num_identities=n, images_per_identity=1, size=32,
                    conditions=("normal",))
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        label = i % 2
        image = ds[i]["image"]
        if label:  # paper A's simulated low light: exposure reduced to 10-35%
            image = reduce_brightness(image, rng.uniform(0.1, 0.35))
        images.append(image)
        labels.append(label)
    return to_model_input(np.stack(images)), np.array(labels)


def test_lighting_cnn_learns_dark_vs_bright():
    x_train, y_train = _dark_vs_bright(0, 64)
    x_test, y_test = _dark_vs_bright(1, 64)
    model = LC.lighting_cnn(num_classes=2, widths=(16, 32, 32), dense=32)
    params = jax.jit(lambda x: model.init(_key(0), x, train=False))(x_train[:2])["params"]
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, rng):
        def loss_fn(p):
            logits, _ = model.apply({"params": p}, x_train, train=True, rngs={"dropout": rng})
            return optax.softmax_cross_entropy_with_integer_labels(logits, y_train).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    for i in range(40):
        params, opt_state, loss = step(params, opt_state, jax.random.fold_in(_key(1), i))
    logits, _ = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))(params, x_test)
    accuracy = float(np.mean(np.argmax(logits, -1) == y_test))
    assert accuracy > 0.9, (accuracy, float(loss))
