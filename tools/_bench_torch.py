"""PyTorch twins of lowlight's models, for `tools/bench.py` only (torch is not a dependency).

Each class is the same architecture as its lowlight counterpart — layer for layer, with the
same trainable parameter count (bench.py checks the counts before timing) — written the way a
PyTorch user would (NCHW modules, `channels_last` memory format chosen by the caller). Weights
are not shared with the flax models: the benchmark times the compute, not the numbers.

  IResNet          insightface arcface_torch iResNet (lowlight.models.iresnet)
  ViT              arcface_torch VisionTransformer, incl. train-time token masking and
                   stochastic depth (lowlight.models.vit)
  MobileNetV2Attr  torchvision MobileNetV2 features + SE + projection + three heads
                   (lowlight.models.mobilenetv2)
  UNet             paper B §3.3 U-Net, transposed-conv upsampling (lowlight.models.unet)
  RelightNet       paper B §3.4 five-layer dilated residual CNN (lowlight.models.relight)
  Pipeline         relight -> U-Net mask -> iResNet with mask modulation after a stage
                   (lowlight.models.face_embedder.FaceEmbedder, inference)
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


# --------------------------------------------------------------------------------------------
# iResNet
# --------------------------------------------------------------------------------------------
class IBasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class MaskModulation(nn.Module):
    """Paper B eq. 2, F' = a*M*F + (1-a)*F, as lowlight.models.iresnet.MaskModulation."""

    def __init__(self, alpha: float = 0.7):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(alpha))

    def forward(self, x, mask):
        mask = F.interpolate(mask[:, None], size=x.shape[-2:], mode="bilinear",
                             align_corners=False, antialias=True)
        a = self.alpha.clamp(0.0, 1.0)
        return x * (a * mask + (1.0 - a))


class IResNet(nn.Module):
    def __init__(self, layers, widths=(64, 128, 256, 512), embed_dim=512, mask_stage=None):
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-5)
        self.prelu = nn.PReLU(widths[0])
        self.stages = nn.ModuleList(self._make_layer(p, b, 2) for p, b in zip(widths, layers))
        self.bn2 = nn.BatchNorm2d(widths[-1], eps=1e-5)
        self.fc = nn.Linear(widths[-1] * 49, embed_dim)
        self.features = nn.BatchNorm1d(embed_dim, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        self.mask_stage = mask_stage
        self.mask_modulation = MaskModulation() if mask_stage is not None else None

    def _make_layer(self, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes, eps=1e-5))
        mods = [IBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        mods += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x, mask=None):
        x = self.prelu(self.bn1(self.conv1(x)))
        if self.mask_stage == 0:
            x = self.mask_modulation(x, mask)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if self.mask_stage == i + 1:
                x = self.mask_modulation(x, mask)
        x = torch.flatten(self.bn2(x), 1)
        return self.features(self.fc(x))


# --------------------------------------------------------------------------------------------
# ViT (arcface_torch)
# --------------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # The explicit softmax(q k^T) v of arcface_torch and of lowlight's ViT (no fused SDPA).
        attn = (qkv[0] @ qkv[1].transpose(-2, -1)) * (d // self.heads) ** -0.5
        out = attn.softmax(-1) @ qkv[2]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim, heads, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU6(), nn.Linear(4 * dim, dim))
        self.drop_path = drop_path

    def _drop(self, y):
        if not self.training or self.drop_path == 0.0:
            return y
        keep = torch.rand(y.shape[0], 1, 1, device=y.device) >= self.drop_path
        return y * keep / (1.0 - self.drop_path)

    def forward(self, x):
        x = x + self._drop(self.attn(self.norm1(x)))
        return x + self._drop(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    def __init__(self, width=512, depth=12, heads=8, embed_dim=512, img=112, patch=9,
                 drop_path_rate=0.1, mask_ratio=0.1):
        super().__init__()
        n = (img // patch) ** 2
        self.n, self.mask_ratio = n, mask_ratio
        self.patch_embed = nn.Conv2d(3, width, patch, patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, n, width))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(width, heads, r) for r in rates)
        self.norm = nn.LayerNorm(width, eps=1e-5)
        self.feature = nn.Sequential(nn.Linear(n * width, width, bias=False),
                                     nn.BatchNorm1d(width, eps=2e-5),
                                     nn.Linear(width, embed_dim, bias=False),
                                     nn.BatchNorm1d(embed_dim, eps=2e-5))

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        b, n, d = x.shape
        masking = self.training and self.mask_ratio > 0
        if masking:
            keep = int(n * (1 - self.mask_ratio))
            ids_shuffle = torch.argsort(torch.rand(b, n, device=x.device), dim=1)
            ids_restore = torch.argsort(ids_shuffle, dim=1)
            x = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        if masking:
            x = torch.cat([x, self.mask_token.expand(b, n - x.shape[1], d)], 1)
            x = torch.gather(x, 1, ids_restore[:, :, None].expand(-1, -1, d))
        return self.feature(x.reshape(b, n * d))


# --------------------------------------------------------------------------------------------
# MobileNetV2 + SE + heads (paper A)
# --------------------------------------------------------------------------------------------
def _conv_bn_relu6(inp, out, k=3, stride=1, groups=1):
    return nn.Sequential(nn.Conv2d(inp, out, k, stride, (k - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(out), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, t):
        super().__init__()
        hidden = int(round(inp * t))
        self.residual = stride == 1 and inp == oup
        layers = [_conv_bn_relu6(inp, hidden, k=1)] if t != 1 else []
        layers += [_conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2Attr(nn.Module):
    """torchvision mobilenet_v2().features + SE(r=16) + GAP-FC(256)-ReLU-dropout + 3 heads."""

    SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
               (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, projection_dim=256, reduction=16, num_ethnicities=5):
        super().__init__()
        layers, inp = [_conv_bn_relu6(3, 32, stride=2)], 32
        for t, c, n, s in self.SETTING:
            for i in range(n):
                layers.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        layers.append(_conv_bn_relu6(inp, 1280, k=1))
        self.features = nn.Sequential(*layers)
        self.se = nn.Sequential(nn.Linear(1280, 1280 // reduction), nn.ReLU(),
                                nn.Linear(1280 // reduction, 1280), nn.Sigmoid())
        self.projection = nn.Linear(1280, projection_dim)
        self.dropout = nn.Dropout(0.5)
        self.age = nn.Linear(projection_dim, 1)
        self.gender = nn.Linear(projection_dim, 1)
        self.ethnicity = nn.Linear(projection_dim, num_ethnicities)

    def forward(self, x):
        f = self.features(x)
        f = f * self.se(f.mean((2, 3)))[:, :, None, None]
        z = self.dropout(torch.relu(self.projection(f.mean((2, 3)))))
        return self.age(z)[:, 0], self.gender(z)[:, 0], self.ethnicity(z)


# --------------------------------------------------------------------------------------------
# U-Net (paper B §3.3) and relighting net (§3.4)
# --------------------------------------------------------------------------------------------
def _double_conv(inp, out):
    return nn.Sequential(nn.Conv2d(inp, out, 3, padding=1, bias=False), nn.BatchNorm2d(out),
                         nn.ReLU(inplace=True), nn.Conv2d(out, out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out), nn.ReLU(inplace=True))


class UNet(nn.Module):
    def __init__(self, features=(64, 128, 256, 512)):
        super().__init__()
        feats = tuple(features)
        chans = (3,) + feats[:-2]
        self.enc = nn.ModuleList(_double_conv(c, f) for c, f in zip(chans, feats[:-1]))
        self.bottleneck = _double_conv(feats[-2], feats[-1])
        self.up = nn.ModuleList(nn.ConvTranspose2d(feats[k + 1], feats[k], 2, 2)
                                for k in range(len(feats) - 1))
        self.dec = nn.ModuleList(_double_conv(2 * feats[k], feats[k])
                                 for k in range(len(feats) - 1))
        self.head = nn.Conv2d(feats[0], 1, 1)

    def forward(self, x):
        skips = []
        for enc in self.enc:
            x = enc(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for k in reversed(range(len(self.dec))):
            x = self.dec[k](torch.cat([skips[k], self.up[k](x)], 1))
        logits = self.head(x)[:, 0]
        return torch.sigmoid(logits), logits


class RelightNet(nn.Module):
    def __init__(self, width=208, dilations=(2, 4, 8), max_gain=16.0):
        super().__init__()
        self.conv_in = nn.Conv2d(3, width, 3, padding=1)
        self.res = nn.ModuleList(nn.Conv2d(width, width, 3, padding=d, dilation=d)
                                 for d in dilations)
        self.conv_out = nn.Conv2d(width, 6, 3, padding=1)
        self.bound = math.log(max_gain)

    def forward(self, x):
        h = torch.relu(self.conv_in(x))
        for conv in self.res:
            h = h + torch.relu(conv(h))
        head = self.conv_out(h)
        gain = torch.exp(self.bound * torch.tanh(head[:, :3] / self.bound))
        out01 = torch.clamp((x + 1.0) * 0.5 * gain + head[:, 3:], 0.0, 1.0)
        return out01 * 2.0 - 1.0


class Pipeline(nn.Module):
    """Paper B Fig. 3 at inference: relight -> U-Net skin mask -> iResNet with mask modulation."""

    def __init__(self, layers, mask_stage=1, relight_width=208, unet_features=(64, 128, 256, 512)):
        super().__init__()
        self.relight = RelightNet(relight_width)
        self.segmenter = UNet(unet_features)
        self.backbone = IResNet(layers, mask_stage=mask_stage)

    def forward(self, x):
        x = self.relight(x)
        mask, _ = self.segmenter(x)
        return self.backbone(x, mask)


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
