"""Winograd F(2x2, 3x3) convolutions: the forward pass and the kernel gradient.

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR 2016): a stride-1 3x3
convolution is Y = A^T [(G g G^T) * (B^T d B)] A on 4x4 input tiles with 2x2 outputs, i.e.
16 matmuls (one per tile position) on transformed tiles, 2.25x fewer multiplications than the
direct form. This file holds the mathematics and the shape rules that say where it was
measured faster on XLA:CPU (docs/performance.md); `lowlight.models.fast_conv` decides the
device policy (chunking and the Winograd kernel gradient on one device only) and calls it.
Numerics: the transforms are exact in binary (coefficients 0, +-1, +-1/2), so results agree
with the direct convolution to float32 rounding (tests/test_fast_conv.py).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)

#: Channels (input and output) from which Winograd pays at any number of tiles (in batch
#: chunks of WINO_CHUNK_TILES): 208 -> 208 on 112x112 maps 1.5-1.75x XLA's convolution, 64 -> 64
#: 0.55x; the U-Net's 56x56 layers at batch 64 (50k tiles), 128 -> 128 and 256 -> 128, 1.1x and
#: 1.34x the compiled direct convolution.
WINO_WIDE = 128
#: Tiles per Winograd batch chunk of a wide layer on one device: the 16 transformed planes of
#: a chunk stay closer to cache. Relighting net (208 channels, 112x112) at batch 16: 6.8 img/s
#: without Winograd, 11.3 in one pass, 12.1 in chunks of 8,192 tiles, 13.2 of 4,096 (one image).
#: Narrower layers run in one pass (iResNet-50: no gain from chunks, within +-3%).
WINO_CHUNK_TILES = 4096
#: Channels (the fewer of in and out) from which the kernel gradient of a Winograd layer is
#: computed in the Winograd domain too (`wgrad`): 2.25x fewer multiplications than the direct
#: sum, but the transformed planes of x and dy cost memory traffic in proportion to 1/in +
#: 1/out channels. Against the compiled direct kernel gradient at batch 32 (docs/
#: performance.md): 14x14 256 -> 256 1.4x, 7x7 512 -> 512 1.7x, 14x14 128 -> 256 1.25x,
#: 7x7 256 -> 512 1.5x faster; 28x28 128 -> 128 0.9x (slower: kept on the kernel).
WINO_WGRAD_MIN_CHANNELS = 256
#: Tiles beyond which the Winograd-domain kernel gradient is summed over chunks of whole
#: images (`wgrad_chunk_images`): bounds its transformed planes (16 x tiles x (in + out)
#: floats, 268 MB at 256 -> 256 channels) for large batches or maps. The measured layers
#: (iResNets at batch 32: 512-1,568 tiles; the U-Net's: up to 6,272) run in one pass.
WINO_WGRAD_CHUNK_TILES = 8192


def tile_grid(x_shape, padding) -> tuple[int, int, int, int]:
    """(ho, wo, th, tw): output size of a padded stride-1 3x3 convolution and its 2x2 tiles."""
    ho = x_shape[1] + padding[0][0] + padding[0][1] - 2
    wo = x_shape[2] + padding[1][0] + padding[1][1] - 2
    return ho, wo, -(-ho // 2), -(-wo // 2)


def is_wide(w_shape) -> bool:
    return min(w_shape[2], w_shape[3]) >= WINO_WIDE


def use_winograd(x_shape, w_shape, strides, dilation, groups, padding) -> bool:
    """Where F(2x2, 3x3) measured faster than XLA:CPU's convolution on the benchmark machine
    (Zen 5, 2 cores; docs/performance.md): 1.5-1.9x on 56x56x64 and 7x7x512, 1.5x on
    14x14x256 at batch 32, 1.2-1.3x at batch 1; about equal (0.96-1.09x) elsewhere. On one
    core the gain is larger at 14x14 and 28x28 (1.1-1.85x) and nil on 56x56 and larger maps
    at batch 32. Not used below 16 tiles, nor above 32k tiles (112x112 maps beyond batch 10)
    unless the layer is wide (WINO_WIDE): on narrower layers the transformed tiles (4x the
    input) would only add memory traffic."""
    if not (w_shape[:2] == (3, 3) and strides == (1, 1) and dilation == (1, 1) and groups == 1
            and min(w_shape[2], w_shape[3]) >= 64
            and all(p >= 0 for pair in padding for p in pair)):
        return False
    _, _, th, tw = tile_grid(x_shape, padding)
    tiles = x_shape[0] * th * tw
    return tiles >= 16 and (tiles <= 32768 or is_wide(w_shape))


def wide_enough_for_wgrad(w_shape) -> bool:
    """Whether a Winograd layer is wide enough for the Winograd-domain kernel gradient."""
    return min(w_shape[2], w_shape[3]) >= WINO_WGRAD_MIN_CHANNELS


def combine(mat_r, mat_q, terms):
    """out[r][q] = sum_ij mat_r[r, i] * mat_q[q, j] * terms[i][j] for nested lists of arrays,
    skipping zero coefficients (the Winograd transforms as fused elementwise sums)."""
    rows = []
    for r in range(mat_r.shape[0]):
        cols = []
        for q in range(mat_q.shape[0]):
            acc = None
            for i in range(mat_r.shape[1]):
                for j in range(mat_q.shape[1]):
                    coef = float(mat_r[r, i] * mat_q[q, j])
                    if coef:
                        t = terms[i][j] if coef == 1.0 else coef * terms[i][j]
                        acc = t if acc is None else acc + t
            cols.append(acc)
        rows.append(cols)
    return rows


def input_tiles(x, padding, channels_first: bool = False):
    """Input tiles transformed, B^T d B: 4x4 nested list of (b, th, tw, c), or of
    (c, b, th, tw) with `channels_first`; and (ho, wo)."""
    (pt, pb), (pl, pr) = padding
    ho, wo, th, tw = tile_grid(x.shape, padding)
    pads = ((pt, pb + 2 * th - ho), (pl, pr + 2 * tw - wo))
    if channels_first:
        xp = jnp.pad(x.transpose(3, 0, 1, 2), ((0, 0), (0, 0), *pads))
        d = [[xp[:, :, i : i + 2 * th : 2, j : j + 2 * tw : 2] for j in range(4)]
             for i in range(4)]
    else:
        xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
        d = [[xp[:, i : i + 2 * th : 2, j : j + 2 * tw : 2] for j in range(4)] for i in range(4)]
    return combine(BT, BT, d), (ho, wo)


def forward(x, w, padding, precision, *, chunked: bool = True):
    """Stride-1 3x3 convolution by Winograd F(2x2, 3x3): 16 matmuls (tile positions x C ->
    O) on transformed 4x4 tiles. With `chunked` (the caller's choice: one device, where a
    chunk of consecutive images is not split over devices), wide layers with more than
    WINO_CHUNK_TILES tiles run in chunks of whole images."""
    b = x.shape[0]
    _, _, th, tw = tile_grid(x.shape, padding)
    n = max(1, WINO_CHUNK_TILES // (th * tw))  # whole images per chunk
    if chunked and b > n and is_wide(w.shape):
        # static python loop (unrolled): XLA:CPU runs matmuls in loop bodies without its
        # library kernels
        return jnp.concatenate([_forward_whole(x[i : i + n], w, padding, precision)
                                for i in range(0, b, n)])
    return _forward_whole(x, w, padding, precision)


def _forward_whole(x, w, padding, precision):
    b, o = x.shape[0], w.shape[3]
    v, (ho, wo) = input_tiles(x, padding)  # B^T d B, each (b, th, tw, c)
    th, tw = v[0][0].shape[1], v[0][0].shape[2]
    u = combine(G, G, [[w[i, j] for j in range(3)] for i in range(3)])  # G g G^T
    m = [[lax.dot_general(v[a][q], u[a][q], (((3,), (0,)), ((), ())), precision=precision)
          for q in range(4)] for a in range(4)]
    y = combine(AT, AT, m)  # A^T M A: 2x2 outputs per tile, each (b, th, tw, o)
    y = jnp.stack([jnp.stack(row, axis=3) for row in y], axis=2)  # (b, th, 2, tw, 2, o)
    return y.reshape(b, 2 * th, 2 * tw, o)[:, :ho, :wo].astype(x.dtype)


def wgrad_chunk_images(x_shape, padding) -> int:
    """Whole images per chunk of the Winograd-domain kernel gradient (WINO_WGRAD_CHUNK_TILES)."""
    _, _, th, tw = tile_grid(x_shape, padding)
    return max(1, WINO_WGRAD_CHUNK_TILES // (th * tw))


def wgrad(x, dy, padding, precision):
    """Kernel gradient of a stride-1 3x3 convolution through the F(2x2, 3x3) transforms.

    With Y = A^T [U * V] A per tile (U = G g G^T, V = B^T d B), the gradient of U at tile
    position xi is sum over tiles of V[xi]^T dM[xi], where dM = A dY A^T lifts each 2x2 tile of
    dy to 4x4; then dg = G^T dU G. That is 16 matmuls contracting over the tiles, 2.25x fewer
    multiplications than the direct kernel gradient. The input planes are built channels-
    first, (c, tiles), in the transform's own loop: XLA:CPU's matmul does not contract a
    leading axis in place, and with (tiles, c) planes it inserted a transpose per plane that
    cost more than the matmuls. One pass over the batch given; callers sum chunks of
    `wgrad_chunk_images` images (float32 accumulation)."""
    v, (ho, wo) = input_tiles(x, padding, channels_first=True)  # each (c, b, th, tw)
    th, tw = v[0][0].shape[2], v[0][0].shape[3]
    dyp = jnp.pad(dy, ((0, 0), (0, 2 * th - ho), (0, 2 * tw - wo), (0, 0)))
    d = [[dyp[:, i::2, j::2] for j in range(2)] for i in range(2)]  # each (b, th, tw, o)
    dm = combine(AT.T, AT.T, d)  # A dY A^T: 4x4 of (b, th, tw, o)
    du = [[lax.dot_general(v[a][q], dm[a][q], (((1, 2, 3), (0, 1, 2)), ((), ())),
                           precision=precision, preferred_element_type=jnp.float32)
           for q in range(4)] for a in range(4)]
    dg = combine(G.T, G.T, du)  # G^T dU G: 3x3 of (c, o)
    return jnp.stack([jnp.stack(row) for row in dg])
