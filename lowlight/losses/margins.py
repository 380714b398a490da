"""Margin-based softmax heads for face recognition: ArcFace, CosFace, AdaFace, MagFace.

Every head maps cosines ``cos`` (B, C) between L2-normalised embeddings and L2-normalised class
centres to logits (B, C) for a softmax cross-entropy. Only the target column of each row is
modified; the C columns may be the full class set or a sampled / sharded subset (Partial FC),
so a label of ``-1`` means "this row's positive class is not among these C columns": that row
gets no margin. Labels must otherwise index the C columns given (0 <= label < C).

With y the target class, θ = arccos(cos_y) and s the scale, the target logit becomes

- ArcFace  (Deng et al., CVPR 2019)  s·cos(θ + m)
- CosFace  (Wang et al., CVPR 2018)  s·(cos θ − m)
- AdaFace  (Kim et al., CVPR 2022)   s·(cos(clip(θ − m·ẑ, ε, π−ε)) − m − m·ẑ),
  ẑ = clip(h·(‖z‖ − μ)/(σ + ε), −1, 1) with (μ, σ) an EMA of the batch norm statistics
- MagFace  (Meng et al., CVPR 2021)  s·cos(θ + m(a)), a = clip(‖z‖, l_a, u_a),
  m(a) = (u_m − l_m)/(u_a − l_a)·(a − l_a) + l_m, plus the regulariser
  g(a) = a/u_a² + 1/a added to the loss as λ_g·mean(g)

and every other logit is s·cos. Defaults reproduce the forward values of the official code:
insightface ``recognition/arcface_torch/losses.py`` (CombinedMarginLoss, m1=1, m3=0),
``mk-minchul/AdaFace/head.py`` and ``IrvingMeng/MagFace/models/magface.py``. Where the
official code's behaviour is surprising (ArcFace's straight-through gradient, AdaFace's clip on
the whole matrix), it is reproduced and said so at the function.

Paper B (§3.5.1 Eq. 3, §4.1.3) trains with ArcFace, AdaFace or MagFace and states only the
ArcFace values: m = 0.5, s = 64 — our ``arcface`` defaults. It gives no AdaFace or MagFace
hyper-parameters (and does not use CosFace), so those defaults are the official
implementations' (AdaFace: m=0.4, h=0.333, s=64, t_alpha=0.01; MagFace: l_a=10, u_a=110,
l_m=0.45, u_m=0.8, s=64, λ_g=35).

All functions are pure and jittable; Python-bool options are static (bind them with
``functools.partial``). Computation happens in at least float32 (bfloat16 inputs are
promoted), so the returned logits are float32 (float64 under x64).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "ADAFACE_INITIAL_STATS",
    "MAGFACE_LAMBDA_G",
    "adaface",
    "arcface",
    "cosface",
    "magface",
    "magface_min_lambda_g",
    "softmax_cross_entropy",
]

# AdaFace head.py registers batch_mean=20 and batch_std=100 as the initial EMA buffers.
ADAFACE_INITIAL_STATS: tuple[float, float] = (20.0, 100.0)

# λ_g of MagFace: the official training script run/run.sh passes --lambda_g 35 (the argparse
# default in run/trainer.py is 20). The trainer adds λ_g·mean(g) to the identity loss.
MAGFACE_LAMBDA_G: float = 35.0

# arccos has an infinite derivative at ±1 (and is NaN beyond): the ArcFace target cosine is
# clipped to [-1 + 1e-7, 1 - 1e-7] first. arcface_torch clamps logits to [-1, 1] only; the extra
# clip moves θ by at most arccos(1 - 1e-7) ≈ 4.5e-4 rad, and only for |cos| within 1e-7 of 1 —
# about the angular resolution float32 has near θ = 0 anyway.
_ACOS_EPS = 1e-7
# AdaFace head.py: self.eps = 1e-3 (cosine clamp, θ clip, std denominator).
_ADAFACE_EPS = 1e-3


def _as_float(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _target_mask(labels: jax.Array, num_classes: int) -> jax.Array:
    """(B, C) bool, True at each row's target column; an all-False row for label -1."""
    labels = jnp.asarray(labels)
    return labels[:, None] == jnp.arange(num_classes, dtype=labels.dtype)[None, :]


def _gather_target(cos: jax.Array, mask: jax.Array) -> jax.Array:
    # A masked sum rather than take_along_axis: it is a plain reduction over C, which stays
    # cheap when C is sharded over the 'model' axis, and it reads 0 for label -1 rows.
    return jnp.sum(jnp.where(mask, cos, 0.0), axis=-1)


def _safe_sqrt(x: jax.Array) -> jax.Array:
    """sqrt with value 0 and gradient 0 (instead of inf/NaN) at x <= 0."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def arcface(
    cos: jax.Array,
    labels: jax.Array,
    *,
    s: float = 64.0,
    m: float = 0.5,
    straight_through: bool = True,
    easy_margin: bool = False,
    fallback: bool = False,
) -> jax.Array:
    """ArcFace logits: target s·cos(θ + m), others s·cos.

    The default follows insightface arcface_torch ``CombinedMarginLoss`` (m1=1, m2=m, m3=0),
    which computes the margin under ``torch.no_grad`` in place: the forward value carries the
    margin but the gradient w.r.t. ``cos`` is s everywhere, as if no margin had been applied.
    That is reproduced as ``cos + stop_gradient(cos(θ + m) − cos)`` on the target column.

    Args:
      cos: (B, C) cosines.
      labels: (B,) int target column per row, or -1 for "not among these columns" (no margin).
      s: scale.
      m: additive angular margin (radians).
      straight_through: True (default, arcface_torch): gradient as without margin.
        False: exact gradient of s·cos(θ + m), as in the original insightface ArcFace.
      easy_margin: apply the margin only where cos θ > 0 (elsewhere keep cos θ).
        Takes precedence over ``fallback``, as in the original code.
      fallback: the original ArcFace rule for θ + m > π, where cos(θ + m) stops decreasing in
        θ: where cos θ <= cos(π − m) use cos θ − m·sin(π − m) instead (``th``/``mm`` in
        insightface's ArcMarginProduct). arcface_torch's default path has no fallback.

    Returns:
      (B, C) logits.
    """
    cos = _as_float(cos)
    mask = _target_mask(labels, cos.shape[-1])
    target = _gather_target(cos, mask)
    theta = jnp.arccos(jnp.clip(target, -1.0 + _ACOS_EPS, 1.0 - _ACOS_EPS))
    target_m = jnp.cos(theta + m)
    if easy_margin:
        target_m = jnp.where(target > 0, target_m, target)
    elif fallback:
        threshold = jnp.cos(jnp.pi - m)
        mm = jnp.sin(jnp.pi - m) * m
        target_m = jnp.where(target > threshold, target_m, target - mm)
    if straight_through:
        target_m = target + lax.stop_gradient(target_m - target)
    return s * jnp.where(mask, target_m[:, None], cos)


def cosface(cos: jax.Array, labels: jax.Array, *, s: float = 64.0, m: float = 0.4) -> jax.Array:
    """CosFace (large-margin cosine) logits: target s·(cos − m), others s·cos.

    Args:
      cos: (B, C) cosines.
      labels: (B,) int, -1 for rows without a target among these columns.
      s: scale.
      m: additive cosine margin.

    Returns:
      (B, C) logits.
    """
    cos = _as_float(cos)
    mask = _target_mask(labels, cos.shape[-1])
    return s * jnp.where(mask, cos - m, cos)


def adaface(
    cos: jax.Array,
    norms: jax.Array,
    labels: jax.Array,
    stats: tuple[jax.Array, jax.Array],
    *,
    s: float = 64.0,
    m: float = 0.4,
    h: float = 0.333,
    t_alpha: float = 0.01,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """AdaFace logits with the feature-norm–adaptive margin, exactly as the official head.py.

    Steps (eps = 1e-3): cos is clamped to [−1+eps, 1−eps]; norms are clipped to [0.001, 100]
    and detached (no gradient reaches the norms); the EMA statistics are updated with this
    batch's mean and unbiased (ddof=1) std *before* use; ẑ = clip(h·(norm − μ)/(σ + eps), −1, 1);
    θ' = clip(θ − m·ẑ·onehot, eps, π − eps) and cos' = cos θ' − (m + m·ẑ)·onehot; logits s·cos'.

    Reproduced quirk: the clip of θ' applies to the whole matrix, so non-target (and label -1)
    columns become s·cos(clip(arccos(cos), eps, π−eps)), which differs slightly from s·cos
    near ±1. The batch statistics include every row (label -1 rows too). The unbiased std
    needs B >= 2 (B = 1 gives NaN, as in torch). Under ``jit`` with a data-sharded batch the
    statistics are over the global batch (official DDP training computes them per GPU).

    Args:
      cos: (B, C) cosines.
      norms: (B,) (or (B, 1)) embedding norms before normalisation.
      labels: (B,) int, -1 for rows without a target among these columns.
      stats: (batch_mean, batch_std) EMA state; start from ``ADAFACE_INITIAL_STATS``.
      s: scale.
      m: margin.
      h: concentration of the margin scaler (≈68% of ẑ within ±h).
      t_alpha: EMA weight of the current batch.

    Returns:
      (logits (B, C), new_stats) with new_stats = (new_mean, new_std) float scalars
      (no gradient).
    """
    eps = _ADAFACE_EPS
    cos = jnp.clip(_as_float(cos), -1.0 + eps, 1.0 - eps)
    safe_norms = lax.stop_gradient(jnp.clip(_as_float(norms).reshape(cos.shape[0]), 0.001, 100.0))

    mean = jnp.mean(safe_norms)
    std = jnp.std(safe_norms, ddof=1)
    old_mean, old_std = stats
    new_mean = lax.stop_gradient(
        mean * t_alpha + (1.0 - t_alpha) * jnp.asarray(old_mean, mean.dtype)
    )
    new_std = lax.stop_gradient(std * t_alpha + (1.0 - t_alpha) * jnp.asarray(old_std, std.dtype))

    margin_scaler = (safe_norms - new_mean) / (new_std + eps)
    margin_scaler = jnp.clip(margin_scaler * h, -1.0, 1.0)

    onehot = _target_mask(labels, cos.shape[-1]).astype(cos.dtype)
    g_angular = m * margin_scaler * -1.0
    theta = jnp.arccos(cos)
    theta_m = jnp.clip(theta + onehot * g_angular[:, None], eps, math.pi - eps)
    cos = jnp.cos(theta_m)
    g_add = m + m * margin_scaler
    cos = cos - onehot * g_add[:, None]
    return cos * s, (new_mean, new_std)


def magface(
    cos: jax.Array,
    norms: jax.Array,
    labels: jax.Array,
    *,
    s: float = 64.0,
    l_a: float = 10.0,
    u_a: float = 110.0,
    l_m: float = 0.45,
    u_m: float = 0.8,
    easy_margin: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """MagFace logits and per-example regulariser, as official MagLinear + MagLoss.

    a = clip(norms, l_a, u_a); m(a) = (u_m − l_m)/(u_a − l_a)·(a − l_a) + l_m; cos is clamped to
    [−1, 1]; cos(θ + m) = cos·cos m − sin θ·sin m. The gradient flows into ``norms`` (inside
    [l_a, u_a], zero outside, as torch.clamp) through both m(a) and g(a): MagFace shapes the
    norms on purpose. The caller adds ``MAGFACE_LAMBDA_G * mean(g)`` to the cross-entropy.

    Only the target column is evaluated through sin θ (official code computes it for all columns
    then masks): same values, but no 0·inf = NaN gradient when a non-target cosine is exactly ±1.
    At a target cosine of exactly ±1 the gradient of sin θ is taken as 0 instead of inf.

    Args:
      cos: (B, C) cosines.
      norms: (B,) (or (B, 1)) embedding norms before normalisation (differentiable).
      labels: (B,) int, -1 for rows without a target among these columns.
      s: scale.
      l_a, u_a: norm range the margin is defined on.
      l_m, u_m: margins at l_a and u_a.
      easy_margin: True (official MagLinear default): margin only where cos θ > 0, else cos θ.
        False: where cos θ <= cos(π − m) use cos θ − m·sin(π − m).

    Returns:
      (logits (B, C), g (B,)) with g(a) = a/u_a² + 1/a.
    """
    cos = jnp.clip(_as_float(cos), -1.0, 1.0)
    a = jnp.clip(_as_float(norms).reshape(cos.shape[0]), l_a, u_a)
    margin = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m

    mask = _target_mask(labels, cos.shape[-1])
    target = _gather_target(cos, mask)
    sin_theta = _safe_sqrt(1.0 - target**2)
    target_m = target * jnp.cos(margin) - sin_theta * jnp.sin(margin)
    if easy_margin:
        target_m = jnp.where(target > 0, target_m, target)
    else:
        mm = jnp.sin(math.pi - margin) * margin
        threshold = jnp.cos(math.pi - margin)
        target_m = jnp.where(target > threshold, target_m, target - mm)
    logits = s * jnp.where(mask, target_m[:, None], cos)
    g = 1.0 / (u_a**2) * a + 1.0 / a
    return logits, g


def magface_min_lambda_g(
    *, s: float = 64.0, l_a: float = 10.0, u_a: float = 110.0, l_m: float = 0.45, u_m: float = 0.8
) -> float:
    """Smallest λ_g for which the MagFace optimum norm is unique (the paper's condition, as
    checked in the official run/trainer.py): s·k·u_a²·l_a²/(u_a² − l_a²) with
    k = (u_m − l_m)/(u_a − l_a). About 22.6 for the defaults, below ``MAGFACE_LAMBDA_G``."""
    k = (u_m - l_m) / (u_a - l_a)
    return s * k * u_a**2 * l_a**2 / (u_a**2 - l_a**2)


def softmax_cross_entropy(
    logits: jax.Array, labels: jax.Array, *, reduction: str = "mean"
) -> jax.Array:
    """Softmax cross-entropy over the C columns, with label -1 rows excluded.

    A -1 row has no positive among these columns, so it has no well-defined cross-entropy: it
    contributes 0 and is left out of the mean (mean over rows with label >= 0; 0 if none). In
    Partial FC the sampled columns always contain every positive, so this case does not occur
    there; the rule just keeps the function total.

    Args:
      logits: (B, C).
      labels: (B,) int in [-1, C).
      reduction: "mean" (scalar) or "none" ((B,) per-row losses, 0 for -1 rows).

    Returns:
      The loss, float32 or wider.
    """
    logits = _as_float(logits)
    mask = _target_mask(labels, logits.shape[-1])
    valid = jnp.asarray(labels) >= 0
    log_p = jax.nn.log_softmax(logits, axis=-1)
    nll = jnp.where(valid, -jnp.sum(jnp.where(mask, log_p, 0.0), axis=-1), 0.0)
    if reduction == "none":
        return nll
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return jnp.sum(nll) / jnp.maximum(jnp.sum(valid), 1).astype(nll.dtype)
