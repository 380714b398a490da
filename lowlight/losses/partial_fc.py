"""Partial FC: margin softmax over a sampled, class-sharded set of class centres.

Implements An et al., "Partial FC: Training 10 Million Identities on a Single Machine"
(ICCVW 2021, Sec. 3: model-parallel FC + Partial FC sampling, r = 0.1..0.3; Table 2 uses r = 0.3
as "PFC-0.3"), following insightface `arcface_torch/partial_fc_v2.py`, but written for GSPMD:
one jitted program over a `Mesh(devices, ('data', 'model'))`, no pmap, no explicit collectives.

Sharding layout
---------------
* Class centres `W` (C_pad, D) are a plain parameter of the training state, sharded along the
  class axis over `class_axes` (`centers_sharding(mesh, class_axes)` = P(class_axes, None)), and
  replicated over the remaining mesh axes. `class_axes=('data', 'model')` is insightface's
  layout (every device owns C/N classes); `('model',)` keeps centres replicated over 'data'.
  C is padded to a multiple of the shard count (`init_centers(..., multiple_of=n)`); padded rows
  are never positive and are masked to a large negative logit, so they never take softmax mass.
* Embeddings (B, D) come in sharded over 'data'. They are normalised and constrained to
  P(row_axes, None), where row_axes are the mesh axes *not* used for classes; for
  `class_axes=('data', 'model')` that means fully replicated, i.e. arcface_torch's AllGather of
  the batch features (cheap: B x D).
* Logits (B, K) are constrained to P(row_axes, class_axes): every device holds only its own
  columns. The softmax cross entropy is written as max/sum reductions over the class axis, which
  XLA lowers to all-reduces of (B,) vectors; the (B, K) logit matrix is never gathered
  (`tests/test_partial_fc.py` checks the compiled HLO).

Sampling (r < 1)
----------------
Centres are viewed as (n_shards, C_local, D). Per shard, scores are uniform random numbers,
every positive class of the *global* batch gets score 2, padded classes -1, and a top-k keeps
k = ceil(r * C_local) columns per shard. Shapes are static and the gather is shard-local.
Padded classes are picked only to fill a shard that has fewer than k real classes; they are
reported as -1 in `aux["sampled_classes"]` and masked out of the softmax like at r = 1.
Constraint: k must be >= the number of distinct positive classes that fall into any one shard
(at most the global batch size). insightface grows k dynamically when this fails; under jit we
cannot, so surplus positives are dropped: their rows are left out of the loss, counted in
`aux["dropped_positives"]` (classes) and `aux["dropped_samples"]` (rows). With r = 1 there is no
sampling and the loss is the exact model-parallel full softmax.

Only sampled centres receive gradient (the transpose of the gather is a shard-local
scatter-add), exactly as in the paper.

Memory per device (f32, n = shards on class_axes, R = size of the row axes, K = n * k columns)
---------------------------------------------------------------------------------------------
* centres:     C_pad * D / n * 4 bytes, x (1 param + 1 grad + optimizer slots: SGD-momentum 1,
               Adam 2); replicated over the row axes.
* sampling:    C_local * (4 + 1) bytes scores + positive mask, k * 4 bytes indices (r < 1 only).
* gathered W:  k * D * 4 bytes for this device's sampled rows (+ a normalised copy, + its
               gradient in the backward pass).
* logits:      (B / R) * k * 4 bytes per buffer; cos, logits and the softmax gradient give ~3.
* embeddings:  (B / R) * D * 4 bytes (the gathered batch).
The full-FC baseline on one device needs C * D * 4 * (2 + slots) + B * C * 4 * ~3 bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# Logit given to padded / masked columns: exp(NEG - max) == 0 in f32, and unlike -inf it cannot
# produce inf - inf = nan if a whole shard is padding.
_NEG = -1e30
# F.normalize's eps (arcface_torch normalises both features and centres with it).
_EPS = 1e-12

MarginFn = Callable[[jax.Array, jax.Array], Any]


def num_class_shards(mesh: Mesh | None, class_axes: Sequence[str] = ("model",)) -> int:
    """Number of class shards: product of the mesh sizes of `class_axes` (1 without a mesh)."""
    if mesh is None:
        return 1
    return math.prod(mesh.shape[a] for a in tuple(class_axes))


def padded_num_classes(num_classes: int, multiple_of: int) -> int:
    """`num_classes` rounded up to a multiple of `multiple_of` (the class shard count)."""
    return -(-num_classes // multiple_of) * multiple_of


def num_sampled_per_shard(num_classes_padded: int, num_shards: int, sample_rate: float) -> int:
    """k = ceil(r * C_local), clipped to [1, C_local]; C_local = C_pad / num_shards."""
    c_local = num_classes_padded // num_shards
    if sample_rate >= 1.0:
        return c_local
    # round() first so 0.3 * 10 = 3.0000000000000004 does not become 4.
    return max(1, min(c_local, math.ceil(round(sample_rate * c_local, 6))))


def init_centers(
    key: jax.Array, num_classes: int, dim: int, dtype=jnp.float32, *, multiple_of: int = 1
) -> jax.Array:
    """Class centres ~ normal(0, 0.01) as arcface_torch, shape (padded C, dim).

    Args:
      key: PRNG key.
      num_classes: real number of classes C.
      dim: embedding dimension D.
      dtype: parameter dtype.
      multiple_of: pad C up to a multiple of this (the class shard count, see
        `num_class_shards`). Rows >= C are padding; pass `num_classes=C` to `partial_fc_loss`.
    """
    c_pad = padded_num_classes(num_classes, multiple_of)
    return (0.01 * jax.random.normal(key, (c_pad, dim), jnp.float32)).astype(dtype)


def centers_sharding(mesh: Mesh, axes: Sequence[str] = ("model",)) -> NamedSharding:
    """Centres sharded along the class axis over `axes`, replicated elsewhere: P(axes, None)."""
    return NamedSharding(mesh, P(tuple(axes), None))


def _l2_normalize(x: jax.Array) -> jax.Array:
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, _EPS * _EPS))


def _top_k_indices(scores: jax.Array, k: int) -> jax.Array:
    """Indices of the k largest scores along axis 1 (ties: lower index first).

    `jax.lax.top_k` lowers to a TopK custom call that the SPMD partitioner does not split along
    the batch axis: it all-gathers the (n_shards, C_local) scores onto every device. A stable
    sort along axis 1 is partitioned along axis 0, so each device only sorts its own C_local.
    """
    iota = jax.lax.broadcasted_iota(jnp.int32, scores.shape, 1)
    _, idx = jax.lax.sort((-scores, iota), dimension=1, num_keys=1, is_stable=True)
    return idx[:, :k]


def partial_fc_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    centers: jax.Array,
    *,
    key: jax.Array | None,
    sample_rate: float,
    margin_fn: MarginFn,
    mesh: Mesh | None = None,
    class_axes: Sequence[str] = ("model",),
    num_classes: int | None = None,
) -> tuple[jax.Array, dict[str, Any]]:
    """Margin softmax cross entropy over sampled, class-sharded centres (call inside jit).

    Args:
      embeddings: (B, D) features of the global batch (typically sharded over 'data').
      labels: (B,) int global class ids in [0, num_classes); a label outside that range
        (e.g. -1) ignores the row.
      centers: (C_pad, D) class centres, C_pad divisible by the class shard count, laid out as
        `centers_sharding(mesh, class_axes)`.
      key: PRNG key for negative sampling (unused, may be None, when sample_rate >= 1).
      sample_rate: fraction r of each shard's classes kept (paper: 0.1-0.3); >= 1 = full FC.
      margin_fn: `margin_fn(cos, labels) -> logits` or `-> (logits, aux)`, e.g.
        `functools.partial(margins.arcface, s=64.0, m=0.5)`. It receives the (B, K) cosines of
        the sampled columns (sharded over the class axis) and labels remapped to column indices,
        -1 where the positive is not among the columns (no margin on that row). To keep the
        logits sharded it should be elementwise (one-hot masks), not gather along classes.
      mesh: ('data', 'model') mesh; None = no sharding constraints, one class shard.
      class_axes: mesh axes the class dimension is sharded over.
      num_classes: real class count C (rows >= C of `centers` are padding); default C_pad.

    Returns:
      (loss, aux): scalar mean cross entropy over rows whose positive was sampled, and aux with
      "accuracy" (top-1 over the sampled logits, all B rows; dropped/ignored rows count as
      wrong), "dropped_positives" (positive classes not sampled because a shard had more than
      k), "dropped_samples" (rows left out of the loss for that reason), "num_sampled" (K, a
      Python int), "sampled_classes" (K,) global ids of the columns (-1 = padding),
      "remapped_labels" (B,), "margin_aux".
    """
    c_pad, dim = centers.shape
    num_classes = c_pad if num_classes is None else int(num_classes)
    class_axes = tuple(class_axes)
    n = num_class_shards(mesh, class_axes)
    if c_pad % n:
        raise ValueError(
            f"centres have {c_pad} rows, not a multiple of the {n} class shards over "
            f"{class_axes}; create them with init_centers(..., multiple_of={n})"
        )
    if not 0 < num_classes <= c_pad:
        raise ValueError(f"num_classes={num_classes} must be in (0, {c_pad}]")
    c_local = c_pad // n
    k = num_sampled_per_shard(c_pad, n, sample_rate)

    if mesh is None:
        row = None

        def constrain(x, *spec):
            return x
    else:
        row_axes = tuple(a for a in mesh.axis_names if a not in class_axes and mesh.shape[a] > 1)
        row = row_axes or None
        cls = class_axes

        def constrain(x, *spec):
            spec = tuple(cls if s == "C" else s for s in spec)
            return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))

    labels = labels.astype(jnp.int32)
    labels = jnp.where((labels >= 0) & (labels < num_classes), labels, -1)

    # Batch features, replicated over the class axes (arcface_torch's AllGather: B x D).
    emb = _l2_normalize(embeddings.astype(jnp.float32))
    emb = constrain(emb, row, None)

    # ---------------------------------------------------------------- sampling
    if sample_rate >= 1.0:
        w = centers
        col_ids = jnp.arange(c_pad, dtype=jnp.int32)
        dropped = jnp.zeros((), jnp.int32)
    else:
        if key is None:
            raise ValueError("partial_fc_loss needs a PRNG key when sample_rate < 1")
        shard_base = (jnp.arange(n, dtype=jnp.int32) * c_local)[:, None]
        local = jnp.arange(c_local, dtype=jnp.int32)[None, :]
        is_pos = jnp.zeros((n, c_local), jnp.bool_)
        safe = jnp.maximum(labels, 0)
        # Positives of the global batch; ignored rows (label -1) scatter out of bounds -> dropped.
        shard_of = jnp.where(labels >= 0, safe // c_local, n)
        is_pos = is_pos.at[shard_of, safe % c_local].set(True, mode="drop")
        is_pos = constrain(is_pos, "C", None)
        scores = jax.random.uniform(key, (n, c_local), jnp.float32)
        scores = constrain(scores, "C", None)
        valid = shard_base + local < num_classes
        scores = jnp.where(is_pos, 2.0, jnp.where(valid, scores, -1.0))
        idx = _top_k_indices(scores, k)  # (n, k), per shard: positives first
        idx = constrain(idx, "C", None)
        w = constrain(centers.reshape(n, c_local, dim), "C", None, None)
        w = jnp.take_along_axis(w, idx[:, :, None], axis=1)  # shard-local gather
        w = constrain(w, "C", None, None).reshape(n * k, dim)
        col_ids = (idx + shard_base).reshape(n * k)
        num_pos = jnp.sum(is_pos, axis=1, dtype=jnp.int32)
        dropped = jnp.sum(jnp.maximum(num_pos - k, 0))

    num_cols = col_ids.shape[0]
    col_ids = constrain(col_ids, "C")
    col_valid = col_ids < num_classes

    # ---------------------------------------------------------------- cosines and margin
    w = constrain(w, "C", None)
    w = _l2_normalize(w.astype(jnp.float32))
    cos = jnp.dot(emb, w.T, preferred_element_type=jnp.float32)
    cos = constrain(cos, row, "C")

    col = jnp.arange(num_cols, dtype=jnp.int32)
    if sample_rate >= 1.0:
        remapped = labels
    else:
        # Column of each label among the sampled ones: an elementwise compare + a max over the
        # sharded class axis (an all-reduce of B ints), never a gather from another shard.
        hit = constrain(labels[:, None] == col_ids[None, :], row, "C")
        remapped = jnp.max(jnp.where(hit, col[None, :], -1), axis=1)
    has_pos = remapped >= 0

    out = margin_fn(cos, remapped)
    logits, margin_aux = out if isinstance(out, tuple) else (out, None)
    logits = constrain(logits.astype(jnp.float32), row, "C")
    logits = jnp.where(col_valid[None, :], logits, _NEG)
    logits = constrain(logits, row, "C")

    # ---------------------------------------------------------------- sharded cross entropy
    # logsumexp as max / sum reductions over the class axis -> all-reduces of (B,) vectors.
    row_max = jax.lax.stop_gradient(jnp.max(logits, axis=1))
    sum_exp = jnp.sum(jnp.exp(logits - row_max[:, None]), axis=1)
    lse = jnp.log(sum_exp) + row_max
    onehot = constrain(remapped[:, None] == col[None, :], row, "C")
    target = jnp.sum(jnp.where(onehot, logits, 0.0), axis=1)
    ce = jnp.where(has_pos, lse - target, 0.0)
    num_rows = jnp.sum(has_pos, dtype=jnp.int32)
    loss = jnp.sum(ce) / jnp.maximum(num_rows, 1).astype(jnp.float32)

    # Top-1 without an argmax across shards: the positive is the row max.
    correct = has_pos & (target >= row_max)
    accuracy = jnp.mean(correct.astype(jnp.float32))

    ignored = labels < 0
    aux = {
        "accuracy": accuracy,
        "dropped_positives": dropped,
        "dropped_samples": jnp.sum(~has_pos & ~ignored, dtype=jnp.int32),
        "num_sampled": num_cols,
        "sampled_classes": jnp.where(col_valid, col_ids, -1),
        "remapped_labels": remapped,
        "margin_aux": margin_aux,
    }
    return loss, aux
