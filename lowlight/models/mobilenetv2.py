"""Paper A's attribute model: MobileNetV2 features + attention + feature projection + 3 heads.

Paper A ("Deep learning methods based on MobileNetV2 model for low-light face recognition",
§"Proposed method", Fig. 1) recognises age, gender and ethnicity from one face crop:

  MobileNetV2 feature extractor      Sandler et al., "MobileNetV2: Inverted Residuals and Linear
                                     Bottlenecks" (CVPR 2018), Table 2, laid out as torchvision's
                                     `mobilenet_v2().features` (so its weights load, see
                                     `load_torch_state`) — 2,223,872 trainable weights at alpha 1
  Attentional block                  SE by default, CBAM or none (paper A Table 2); attention.py
  Feature projection                 GAP -> FC -> dropout 0.5 ("freezes randomly half of the
                                     neurons"), dropout only when `train=True`
  Output block                       age: linear, 1 output (MSE); gender: 1 logit (sigmoid, BCE);
                                     ethnicity: 5 logits (softmax, CCE) — losses/multitask.py

Feature extractor, exactly as Sandler et al. / torchvision:
  stem      conv3x3(3 -> 32*alpha, stride 2) - BN - ReLU6
  blocks    (t, c, n, s) = (1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2)
            (6,320,1,1); block = [conv1x1 expand x t - BN - ReLU6 (absent when t = 1)] -
            depthwise conv3x3(stride) - BN - ReLU6 - conv1x1 project - BN (linear bottleneck);
            identity shortcut iff stride 1 and in == out channels (10 of the 17 blocks)
  last      conv1x1(-> 1280 * max(1, alpha)) - BN - ReLU6
  channels  `make_divisible(c * alpha, 8)` (torchvision `_make_divisible`); hidden width of a block
            round(in * t); BatchNorm with PyTorch defaults (eps 1e-5, momentum 0.1)
  padding   explicit (k-1)//2 on both sides, as torch; flax "SAME" would pad (0, 1) at stride 2
            on even inputs and shift every feature map by half a pixel

Where paper A is silent we chose (and each is a model attribute): SE reduction r = 16 (Hu et al.),
projection width 256 with a ReLU (paper A: "fully connected layer", size and activation not
given), heads initialised as Keras Dense (Glorot uniform, zero bias; paper A used Keras), body
initialised as torchvision (Kaiming-normal fan-out convs, BN 1/0). Paper A's input is [0, 1];
ours is the repo-wide [-1, 1] (`lowlight.data.normalize`), which only matters for pretrained
weights and is a constant affine map otherwise absorbed by the first BN.

`MobileNetV2.__call__(x, *, train)` -> (outputs, aux):
  outputs {"age": (B,), "gender_logit": (B,), "ethnicity_logits": (B, 5)}, float32;
  aux {"features": (B, projection_dim)} (projection after its activation, before dropout).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lowlight.models import attention as A
from lowlight.models import fast_conv
from lowlight.models import fused_depthwise as FD
from lowlight.models import layers as L

#: Sandler et al. Table 2 / torchvision: (expansion t, output channels c, repeats n, stride s).
INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280

#: Trainable parameters of the feature extractor (`MobileNetV2Features`, BN scale + bias, no
#: running statistics) per width multiplier. 1.0 is torchvision `mobilenet_v2().features`
#: (3,504,872 minus the 1,281,000 of its ImageNet classifier); the others were computed here and
#: agree with the torch re-implementation in tests/test_attributes_models.py.
FEATURES_PARAMS: dict[float, int] = {
    0.5: 687_680,
    0.75: 1_355_424,
    1.0: 2_223_872,
}

# torchvision: nn.init.kaiming_normal_(conv.weight, mode="fan_out"), BN weight 1 / bias 0.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision `_make_divisible`: nearest multiple of `divisor`, never 10% below `v`."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One inverted residual block: channels in/out, stride, expansion t."""

    in_channels: int
    out_channels: int
    stride: int
    expand_ratio: int

    @property
    def hidden(self) -> int:
        return int(round(self.in_channels * self.expand_ratio))

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


def block_specs(
    alpha: float = 1.0,
    round_nearest: int = 8,
    setting: Sequence[tuple[int, int, int, int]] = INVERTED_RESIDUAL_SETTING,
) -> tuple[BlockSpec, ...]:
    """The 17 inverted residual blocks of MobileNetV2 at width `alpha` (torchvision's loop)."""
    specs = []
    in_ch = make_divisible(STEM_CHANNELS * alpha, round_nearest)
    for t, c, n, s in setting:
        out_ch = make_divisible(c * alpha, round_nearest)
        for i in range(n):
            specs.append(BlockSpec(in_ch, out_ch, s if i == 0 else 1, t))
            in_ch = out_ch
    return tuple(specs)


def last_channels(alpha: float = 1.0, round_nearest: int = 8) -> int:
    """Width of the final 1x1 conv: 1280, widened (never narrowed) for alpha > 1 (torchvision)."""
    return make_divisible(LAST_CHANNELS * max(1.0, alpha), round_nearest)


def _pad(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
    p = (kernel - 1) // 2
    return ((p, p), (p, p))


class ConvBNReLU6(nn.Module):
    """conv(k, stride, groups, no bias) - BN - ReLU6 (torchvision `Conv2dNormActivation`)."""

    features: int
    kernel: int = 3
    stride: int = 1
    groups: int = 1
    dtype: Any = jnp.float32
    conv_impl: str = "auto"
    bn_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, *, fused: bool = False,
                 pre: FD.Terms | None = None):
        """conv - BN - ReLU6 of x. `fused` (inference only, where `fused_depthwise.usable`;
        `InvertedResidual` decides): a depthwise unit returns post(conv(pad(pre(x)))) from one
        compiled pass, `pre` being the previous unit's deferred BN + ReLU6 (None: x is already
        activated); a 1x1 unit returns (its conv output, its BN + ReLU6 as `FD.Terms`) for the
        depthwise unit to apply. The same variables either way."""
        if fused and self.groups > 1:
            kernel = FD.ConvKernel(self.features, (self.kernel, self.kernel),
                                   feature_group_count=self.groups, kernel_init=_CONV_INIT,
                                   name="conv")(x.shape[-1])
            return FD.depthwise_bn_act(x, kernel, strides=(self.stride, self.stride),
                                       padding=_pad(self.kernel), pre=pre,
                                       post=self._bn_terms())
        if pre is not None or (fused and self.kernel != 1):
            raise ValueError("only a fused depthwise unit takes `pre`; a fused dense unit "
                             "must be 1x1")
        x = fast_conv.conv_module(self.conv_impl)(
            self.features,
            (self.kernel, self.kernel),
            strides=self.stride,
            padding=_pad(self.kernel),
            feature_group_count=self.groups,
            use_bias=False,
            dtype=self.dtype,
            kernel_init=_CONV_INIT,
            name="conv",
        )(x)
        if fused:
            return x, self._bn_terms()
        return L.batch_norm_act(x, train=train, activation="relu6", dtype=self.dtype,
                                impl=self.bn_impl or self.conv_impl, name="bn")

    def _bn_terms(self) -> FD.Terms:
        return FD.BatchNormTerms(L.TORCH_BN_EPS, activation="relu6", name="bn")(self.features)


class InvertedResidual(nn.Module):
    """Sandler et al. inverted residual with linear bottleneck; input channels come from x.

    The identity shortcut is used iff `stride == 1` and in == out channels (torchvision
    `use_res_connect`).
    """

    out_channels: int
    stride: int
    expand_ratio: int
    dtype: Any = jnp.float32
    conv_impl: str = "auto"
    bn_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {self.stride}")
        spec = BlockSpec(x.shape[-1], self.out_channels, self.stride, self.expand_ratio)
        block = functools.partial(ConvBNReLU6, dtype=self.dtype, conv_impl=self.conv_impl,
                                  bn_impl=self.bn_impl)
        h = x
        depthwise = block(spec.hidden, stride=self.stride, groups=spec.hidden, name="depthwise")
        if (not train and not self.is_initializing() and x.dtype == jnp.float32
                and FD.usable(self.conv_impl, (*x.shape[:-1], spec.hidden),
                              (3, 3, 1, spec.hidden), self.dtype)):
            # Inference on one CPU device: the expansion's BN + ReLU6, the padding, the
            # depthwise conv and its BN + ReLU6 in one compiled pass (fused_depthwise).
            pre = None
            if self.expand_ratio != 1:
                h, pre = block(spec.hidden, kernel=1, name="expand")(h, train, fused=True)
            h = depthwise(h, train, fused=True, pre=pre)
        else:
            if self.expand_ratio != 1:
                h = block(spec.hidden, kernel=1, name="expand")(h, train)
            h = depthwise(h, train)
        h = fast_conv.conv_module(self.conv_impl)(
            self.out_channels,
            (1, 1),
            use_bias=False,
            dtype=self.dtype,
            kernel_init=_CONV_INIT,
            name="project_conv",
        )(h)
        h = L.batch_norm(train=train, dtype=self.dtype, name="project_bn")(h)
        return x + h if spec.residual else h


class MobileNetV2Features(nn.Module):
    """torchvision `mobilenet_v2(width_mult=alpha).features`: (B,H,W,3) -> (B,H/32,W/32,C_last).

    Module names mirror torchvision's indices: `features_0` (stem), `features_1..17` (blocks),
    `features_18` (last 1x1 conv). Any input size works (odd sizes round up at each stride 2).
    """

    alpha: float = 1.0
    round_nearest: int = 8
    dtype: Any = jnp.float32
    conv_impl: str = "auto"
    bn_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = x.astype(self.dtype)
        stem = make_divisible(STEM_CHANNELS * self.alpha, self.round_nearest)
        x = ConvBNReLU6(stem, stride=2, dtype=self.dtype, conv_impl=self.conv_impl,
                        bn_impl=self.bn_impl, name="features_0")(x, train)
        specs = block_specs(self.alpha, self.round_nearest)
        for i, spec in enumerate(specs, start=1):
            x = InvertedResidual(
                spec.out_channels, spec.stride, spec.expand_ratio, dtype=self.dtype,
                conv_impl=self.conv_impl, bn_impl=self.bn_impl, name=f"features_{i}",
            )(x, train)
        last = last_channels(self.alpha, self.round_nearest)
        return ConvBNReLU6(last, kernel=1, dtype=self.dtype, conv_impl=self.conv_impl,
                           bn_impl=self.bn_impl, name=f"features_{len(specs) + 1}")(x, train)


class MobileNetV2(nn.Module):
    """Paper A's multi-task attribute network (Fig. 1). See the module docstring.

    Attributes:
      alpha: MobileNetV2 width multiplier.
      attention: "se" | "cbam" | "none" (paper A Table 2; SE is the proposed block).
      reduction: attention reduction ratio r (paper A silent; 16 as Hu et al. / Woo et al.).
      projection_dim: width of the feature-projection FC (paper A silent; 256).
      projection_activation: "relu" | "linear" for that FC (paper A silent; ReLU).
      dropout: dropout after the projection (paper A: half of the neurons, 0.5).
      num_ethnicities: ethnicity classes (UTKFace: 5).
      age_bias_init: initial bias of the age output, in the model's age units (years times the
        loss's `age_scale`); e.g. the training-set mean age shortens the start of training.
      dtype: computation dtype of the feature extractor; attention, projection and heads run in
        float32 with float32 parameters.
      conv_impl: "auto" (default: "fast" on the CPU backend, "xla" elsewhere), "xla"
        (`nn.Conv`) or "fast" (`fast_conv.Conv`: the same parameters, outputs and gradients to
        float32 rounding; depthwise convolutions as shifted sums, docs/performance.md).
      bn_impl: the BN + ReLU6 of every conv-BN-ReLU6 unit: "xla" is `nn.BatchNorm` + clip
        differentiated by JAX; "fast" is `layers.BatchNormAct` (train mode: one hand-written
        VJP, on one CPU device the compiled `cpu_kernels.bn_act_bwd`; the same variables and
        numbers to float32 rounding); "auto" "fast" on the CPU backend. None (default) follows
        `conv_impl`. With the compiled depthwise and BatchNorm backward kernels the fused form
        measured 165.6 ms per train step at batch 32 against flax's 187.8 (one process; before
        those kernels it was the slower one, 0.81x, docs/performance.md). The projection BNs
        (no activation) stay flax's: fused, they measured the same (169.0 vs 168.6 ms).
    """

    alpha: float = 1.0
    attention: str = "se"
    reduction: int = 16
    projection_dim: int = 256
    projection_activation: str = "relu"
    dropout: float = 0.5
    num_ethnicities: int = 5
    age_bias_init: float = 0.0
    dtype: Any = jnp.float32
    conv_impl: str = "auto"
    bn_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool):
        if self.projection_activation not in ("relu", "linear"):
            raise ValueError(
                f"projection_activation must be 'relu' or 'linear', got "
                f"{self.projection_activation!r}"
            )
        f = MobileNetV2Features(self.alpha, dtype=self.dtype, conv_impl=self.conv_impl,
                                bn_impl=self.bn_impl, name="backbone")(x, train=train)
        f = f.astype(jnp.float32)
        f = A.attention_block(self.attention, reduction=self.reduction, name="attention")(
            f, train=train
        )

        # ---- feature projection: GAP -> FC -> dropout ----
        dense = functools.partial(
            nn.Dense, kernel_init=nn.initializers.glorot_uniform(), bias_init=nn.initializers.zeros
        )
        h = dense(self.projection_dim, name="projection")(jnp.mean(f, axis=(1, 2)))
        if self.projection_activation == "relu":
            h = nn.relu(h)
        z = nn.Dropout(self.dropout, deterministic=not train)(h)

        # ---- output block: three heads ----
        age = nn.Dense(
            1,
            kernel_init=nn.initializers.glorot_uniform(),
            bias_init=nn.initializers.constant(self.age_bias_init),
            name="age_head",
        )(z)
        gender = dense(1, name="gender_head")(z)
        ethnicity = dense(self.num_ethnicities, name="ethnicity_head")(z)
        outputs = {
            "age": age[:, 0],
            "gender_logit": gender[:, 0],
            "ethnicity_logits": ethnicity,
        }
        return outputs, {"features": h}


def mobilenetv2(**kwargs: Any) -> MobileNetV2:
    """Paper A's MobileNetV2 attribute model. kwargs: alpha=1.0, attention="se", reduction=16,
    projection_dim=256, projection_activation="relu", dropout=0.5, num_ethnicities=5,
    age_bias_init=0.0, dtype=jnp.float32, conv_impl="auto", bn_impl=None (see `MobileNetV2`)."""
    return MobileNetV2(**kwargs)


# --------------------------------------------------------------------------------------------
# torchvision weights
# --------------------------------------------------------------------------------------------
def _expands(block_index: int) -> bool:
    """Whether features.<block_index> (1..17) has an expansion conv (t != 1)."""
    ratios = [t for t, _, n, _ in INVERTED_RESIDUAL_SETTING for _ in range(n)]
    return ratios[block_index - 1] != 1


def _torch_rename(module: list[str]) -> list[str]:
    """torchvision module path -> flax path: features.3.conv.1.0 -> features_3/depthwise/conv."""
    if module[0] != "features":
        raise ValueError(f"not a feature-extractor entry: {'.'.join(module)}")
    index = int(module[1])
    top = f"features_{index}"
    last_index = len(block_specs()) + 1
    if index in (0, last_index):  # Conv2dNormActivation: 0 conv, 1 bn
        return [top, {"0": "conv", "1": "bn"}[module[2]]]
    rest = module[3:]  # after "conv"
    expands = _expands(index)
    sub_blocks = ["expand", "depthwise"] if expands else ["depthwise"]
    j = int(rest[0])
    if j < len(sub_blocks):  # a Conv2dNormActivation inside the block
        return [top, sub_blocks[j], {"0": "conv", "1": "bn"}[rest[1]]]
    return [top, ["project_conv", "project_bn"][j - len(sub_blocks)]]


def load_torch_state(state_dict: Any, variables: Any = None) -> dict:
    """torchvision `mobilenet_v2` `state_dict` -> flax variables of the feature extractor.

    Entries outside `features.` (the ImageNet classifier) are ignored. Without `variables` the
    result is `{"params", "batch_stats"}` for `MobileNetV2Features`; with the variables of a whole
    `MobileNetV2` it returns a copy of them whose `backbone` is replaced (e.g. to start paper A's
    training from ImageNet weights). Note torchvision's weights expect ImageNet-normalised input,
    not our [-1, 1].
    """
    features = {k: v for k, v in state_dict.items() if k.startswith("features.")}
    converted = L.convert_torch_state(features, _torch_rename)
    if variables is None:
        return converted
    out = {k: dict(v) for k, v in variables.items()}
    for collection in ("params", "batch_stats"):
        shapes = [jax.tree_util.tree_map(lambda a: tuple(a.shape), t[collection])
                  for t in (converted, {collection: out[collection]["backbone"]})]
        if shapes[0] != shapes[1]:
            raise ValueError(f"state_dict {collection} do not match the model's backbone (alpha?)")
        out[collection]["backbone"] = converted[collection]
    return out
