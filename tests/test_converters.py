"""tools/convert_insightface.py: arcface_torch .pth -> lowlight run directory, with parity.

The PyTorch references below are insightface `recognition/arcface_torch/backbones/iresnet.py`
and `vit.py`, re-typed here with the same module names (so their state_dict keys are the real
ones) and only what inference needs. Their BatchNorm statistics are calibrated on random images
(train-mode forward passes, cumulative average) after randomising every affine parameter and
PReLU slope: the eval-mode network is then normalised like a trained one, so a 1e-4 absolute
tolerance on the embeddings is meaningful instead of drowned by exploding activations.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lowlight import checkpoint as ckpt_lib
from lowlight.models import layers as L
from tests.helpers import ROOT, load_config


def _tool():
    spec = importlib.util.spec_from_file_location(
        "convert_insightface", os.path.join(ROOT, "tools", "convert_insightface.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tool = _tool()


# ------------------------------------------------------------------ PyTorch references
def _torch_iresnet(layers, widths=(64, 128, 256, 512), num_features=512, fc_scale=7 * 7):
    torch = pytest.importorskip("torch")
    nn = torch.nn

    def conv3x3(i, o, stride=1):
        return nn.Conv2d(i, o, kernel_size=3, stride=stride, padding=1, bias=False)

    class IBasicBlock(nn.Module):
        def __init__(self, inplanes, planes, stride=1, downsample=None):
            super().__init__()
            self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
            self.conv1 = conv3x3(inplanes, planes)
            self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
            self.prelu = nn.PReLU(planes)
            self.conv2 = conv3x3(planes, planes, stride)
            self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
            self.downsample = downsample

        def forward(self, x):
            out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
            return out + (self.downsample(x) if self.downsample is not None else x)

    class IResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.inplanes = widths[0]
            self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-05)
            self.prelu = nn.PReLU(widths[0])
            for i, (planes, blocks) in enumerate(zip(widths, layers)):
                setattr(self, f"layer{i + 1}", self._make_layer(planes, blocks, stride=2))
            self.bn2 = nn.BatchNorm2d(widths[-1], eps=1e-05)
            self.dropout = nn.Dropout(p=0.0, inplace=True)
            self.fc = nn.Linear(widths[-1] * fc_scale, num_features)
            self.features = nn.BatchNorm1d(num_features, eps=1e-05)
            nn.init.constant_(self.features.weight, 1.0)
            self.features.weight.requires_grad = False
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.normal_(m.weight, 0, 0.1)

        def _make_layer(self, planes, blocks, stride):
            downsample = None
            if stride != 1 or self.inplanes != planes:
                downsample = nn.Sequential(
                    nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes, eps=1e-05))
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


def _torch_vit(width, depth, heads=8, img=112, patch=9, num_classes=512):
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = (width // heads) ** -0.5
            self.qkv = nn.Linear(width, width * 3, bias=False)
            self.proj = nn.Linear(width, width)

        def forward(self, x):
            b, n, c = x.shape
            qkv = self.qkv(x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
            return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(width, 4 * width)
            self.act = nn.ReLU6()
            self.fc2 = nn.Linear(4 * width, width)

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

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)

    class VisionTransformer(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_patches = (img // patch) ** 2
            self.patch_embed = PatchEmbed()
            self.pos_embed = nn.Parameter(torch.randn(1, self.num_patches, width) * 0.02)
            self.blocks = nn.ModuleList([Block() for _ in range(depth)])
            self.norm = nn.LayerNorm(width)
            self.feature = nn.Sequential(
                nn.Linear(width * self.num_patches, width, bias=False),
                nn.BatchNorm1d(width, eps=2e-5),
                nn.Linear(width, num_classes, bias=False),
                nn.BatchNorm1d(num_classes, eps=2e-5))
            self.mask_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)

        def forward(self, x):  # eval path: no token masking, no drop path
            x = self.patch_embed(x) + self.pos_embed
            for blk in self.blocks:
                x = blk(x)
            x = self.norm(x.float()).reshape(x.shape[0], self.num_patches * width)
            return self.feature(x)

    return VisionTransformer()


def _realistic(model, size, seed):
    """Random affine norms and PReLU slopes, then BN statistics from one train-mode pass over
    random images (momentum 1: running statistics = that batch's)."""
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(seed)
    norms = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.LayerNorm)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, norms):
                if m.weight.requires_grad:  # (insightface's `features` scale stays frozen at 1)
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
            elif isinstance(m, torch.nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 0.5)
            if isinstance(m, norms[:2]):
                m.reset_running_stats()
                m.momentum = 1.0
        model.train()
        model(torch.rand(4, 3, size, size, generator=gen) * 2 - 1)
    return model.eval()


def _images(seed, batch, size):
    return np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


def _torch_embed(model, x_nhwc):
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        return model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def _lowlight_embed(workdir, x_nhwc):
    """Embeddings of the converted run exactly as lowlight builds it: config.json -> model,
    load_weights -> variables."""
    from lowlight.evaluate import load_config as load_run_config
    from lowlight.train import build_model

    model = build_model(load_run_config(workdir))
    params, stats, step = ckpt_lib.load_weights(workdir)
    assert step == 0
    fn = jax.jit(lambda p, s, x: model.apply(p, s, x, train=False)[0])
    return np.asarray(fn({"backbone": params["backbone"]}, stats, x_nhwc))


def _num_converted(state_dict) -> int:
    """Every entry but the BatchNorm step counters and the frozen `features.weight`."""
    return sum(not k.endswith("num_batches_tracked") for k in state_dict) - 1


def _save(obj, path):
    torch = pytest.importorskip("torch")
    torch.save(obj, path)
    return str(path)


# ------------------------------------------------------------------ key map (no torch)
def _torch_layout(path, shape):
    if path[-1] == "kernel" and len(shape) == 4:  # HWIO -> OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(reversed(shape)) if path[-1] == "kernel" else tuple(shape)


def _fake_state_dict(arch, **model_kwargs):
    """A state_dict with the key names and torch shapes an arcface_torch `arch` would have,
    derived from the lowlight model through `torch_key` (values: broadcast ones, no memory)."""
    from lowlight import models

    name, family, _ = tool.ARCHS[arch]
    shapes = L.param_shapes(models.create(name, **model_kwargs))
    state, expected = {}, {}
    for col in ("params", "batch_stats"):
        for path, s in tool._flatten(shapes[col]).items():
            shape = _torch_layout(path, s.shape)
            state[tool.torch_key(family, path)] = np.broadcast_to(np.float32(1), shape)
            expected[(col, *path)] = s
    return state, tool._unflatten(expected), family


@pytest.mark.parametrize("arch", ["r50", "vit_t"])
def test_torch_key_inverts_the_model_converters(arch):
    """Every lowlight leaf maps to a torch key that the family's converter maps back to it."""
    state, expected, family = _fake_state_dict(arch)
    variables, counts = tool.convert_state_dict(state, family, expected, arch)
    assert counts["tensors"] == len(state) and not counts["skipped"]
    got = tool._flatten(variables)
    assert set(got) == set(tool._flatten(expected))
    if arch == "r50":
        assert "layer3.13.downsample.0.weight" not in state
        assert "layer1.0.downsample.1.running_var" in state and "fc.weight" in state
        assert state["fc.weight"].shape == (512, 512 * 7 * 7)
    else:
        assert {"blocks.11.attn.qkv.weight", "feature.3.running_mean", "patch_embed.proj.bias",
                "pos_embed", "mask_token"} <= set(state)


def test_unknown_missing_and_mismatched_keys_are_named():
    state, expected, family = _fake_state_dict("r18")
    state["layer5.0.conv1.weight"] = np.zeros((1, 1, 3, 3), np.float32)
    state["head.weight"] = np.zeros((10, 512), np.float32)
    del state["layer2.1.bn3.running_var"]
    state["fc.weight"] = np.zeros((512, 512 * 4), np.float32)
    with pytest.raises(tool.ConversionError) as err:
        tool.convert_state_dict(state, family, expected, "iresnet18", source="x.pth")
    msg = str(err.value)
    assert "x.pth does not fit iresnet18" in msg
    assert "unexpected key 'layer5.0.conv1.weight'" in msg
    assert "unexpected key 'head.weight'" in msg
    assert "missing key 'layer2.1.bn3.running_var' (for batch_stats/layer2/block1/bn3/var)" in msg
    assert ("shape mismatch: 'fc.weight' (512, 2048) converts to params/fc/kernel (2048, 512), "
            "iresnet18 expects (25088, 512)") in msg


def test_reader_refuses_non_state_dicts(tmp_path):
    pytest.importorskip("torch")
    with pytest.raises(tool.ConversionError, match="entry 'epoch' is a int"):
        tool.read_state_dict(_save({"epoch": 3}, tmp_path / "a.pth"), log=lambda *_: None)
    with pytest.raises(tool.ConversionError, match=r"weights_only=True"):
        tool.read_state_dict(_save(_Opaque(), tmp_path / "b.pth"), log=lambda *_: None)
    with pytest.raises(tool.ConversionError, match=r"--arch=r50 is iresnet50 but the config"):
        tool.convert(str(tmp_path / "a.pth"), "r50", str(tmp_path / "out"),
                     config="configs/r100_arcface.py:depth=18,scale=full")


class _Opaque:  # a pickled class: refused by weights_only=True (it could run code)
    pass


# ------------------------------------------------------------------ parity
def test_r50_parity_through_the_run_directory(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    ref = _realistic(_torch_iresnet((3, 4, 14, 3)), 112, seed=1)
    pth = _save(ref.state_dict(), tmp_path / "backbone.pth")
    out = str(tmp_path / "r50")
    summary = tool.convert(pth, "r50", out, overrides={"data.num_identities": 100},
                           log=lambda *_: None)
    assert summary["params"] == 43_590_336
    # 78 BatchNorm2d x 4 + 53 convs + 25 PReLUs + fc (2) + features (bias, mean, var)
    assert summary["tensors"] == _num_converted(ref.state_dict()) == 395
    x = _images(0, 2, 112)
    expected = _torch_embed(ref, x)
    got = _lowlight_embed(out, x)
    assert float(np.abs(expected).max()) > 1.0  # a normalised, non-degenerate embedding
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    config = json.load(open(os.path.join(out, "config.json")))
    assert (config["model"]["name"], config["data"]["size"], config["scale"]) == (
        "iresnet50", 112, "full")


def test_vit_t_parity(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    ref = _realistic(_torch_vit(width=256, depth=12), 112, seed=2)
    pth = _save(ref.state_dict(), tmp_path / "vit_t.pth")
    out = str(tmp_path / "vit_t")
    summary = tool.convert(pth, "vit_t", out, overrides={"data.num_identities": 100},
                           log=lambda *_: None)
    assert summary["params"] == 19_137_792
    x = _images(1, 2, 112)
    np.testing.assert_allclose(_lowlight_embed(out, x), _torch_embed(ref, x), rtol=0, atol=1e-4)


# ------------------------------------------------------------------ CLI, evaluate, init_from
def test_cli_wrapped_checkpoint_then_evaluate_and_init_from(tmp_path):
    """The command line on an arcface_torch-style training checkpoint ({"state_dict_backbone":
    DDP-prefixed keys}), converted into the smoke recipe (iResNet-18 blocks at quarter width,
    32x32): the run evaluates with lowlight.evaluate and seeds another run via init_from."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    ref = _realistic(_torch_iresnet((2, 2, 2, 2), widths=(16, 32, 64, 128), num_features=64,
                                    fc_scale=2 * 2), 32, seed=3)
    wrapped = {"epoch": 3, "state_dict_backbone": {f"module.{k}": v
                                                   for k, v in ref.state_dict().items()}}
    pth = _save(wrapped, tmp_path / "checkpoint_gpu_0.pt")
    out = str(tmp_path / "cli")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    r = subprocess.run([sys.executable, "tools/convert_insightface.py", f"--pth={pth}",
                        "--arch=r18", f"--out={out}",
                        "--config=configs/r100_arcface.py:depth=18,smoke",
                        "--config.data.num_identities=32"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "under 'state_dict_backbone'" in r.stdout and "'module.' prefix" in r.stdout
    assert f"converted {_num_converted(ref.state_dict())} tensors" in r.stdout
    x = _images(2, 3, 32)
    np.testing.assert_allclose(_lowlight_embed(out, x), _torch_embed(ref, x), rtol=0, atol=1e-4)
    again = subprocess.run([sys.executable, "tools/convert_insightface.py", f"--pth={pth}",
                            "--arch=r18", f"--out={out}"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already holds checkpoints" in again.stderr

    from lowlight import evaluate

    cfg_path = os.path.join(out, "config.json")  # one evaluation set is enough here
    cfg = json.load(open(cfg_path))
    cfg["evals"] = {"synth_val": cfg["evals"]["synth_val"]}
    json.dump(cfg, open(cfg_path, "w"))
    metrics = evaluate.evaluate(out)
    assert metrics["step"] == 0 and 0.0 <= metrics["synth_val/acc"] <= 1.0
    assert os.path.exists(os.path.join(out, "eval", "0", "report.md"))

    # init_from: a new run of the same recipe restores the converted state into its own
    # abstract train state (what `loop.restore_or_init` does for config.init_from; its jitted
    # random init is skipped here, it costs more than the whole conversion).
    from lowlight import parallel, train

    c = load_config("r100_arcface", "depth=18,smoke", **{"data.num_identities": 32,
                                                           "init_from": out})
    mesh = parallel.make_mesh(1, devices=jax.devices()[:1])
    _, _, _, _, abstract = train.setup(c, mesh)
    shardings = train.state_shardings(abstract, mesh, tuple(c.partial_fc.class_axes))
    other = ckpt_lib.Checkpointer(ckpt_lib.find_checkpoint_dir(c.init_from), read_only=True)
    state, step = other.restore(ckpt_lib.abstract_with_shardings(abstract, shardings))
    other.close()
    assert step == 0 and int(state.step) == 0
    params, stats, _ = ckpt_lib.load_weights(out)
    for a, b in zip(jax.tree.leaves((params, stats)),
                    jax.tree.leaves(jax.device_get((state.params, state.batch_stats)))):
        np.testing.assert_array_equal(a, b)
