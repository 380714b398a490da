"""1:N identification: closed-set CMC and open-set DIR at FPIR, for any identity-labelled
embeddings, with similarity search that scales to million-entry galleries.

Paper B §4.3 Eq. 16 defines the CMC, ``CMC(k) = (1/N) Σᵢ 1{yᵢ ∈ Top-k(ŷᵢ)}``, and §4.6 (Fig. 8)
reports closed- and open-set identification with Rank-1 / Rank-5. Definitions used here:

- Scores are cosine similarities (embeddings L2-normalised, unless ``normalize=False``: then
  raw dot products). A gallery may hold several templates per identity; an identity's score
  for a probe is the maximum over its templates, and the candidate list ranks identities
  (not templates) by that score. Ties are broken by the lower gallery index of the identity's
  best template (deterministic; identical for chunked and full-matrix search).
- Closed-set CMC(r), r = 1..k: fraction of *mated* probes (probe identity present in the
  gallery) whose identity is among the r best-scoring gallery identities. rank-1 is the
  closed-set identification accuracy. Non-mated probes are not counted (reported separately).
- Open-set, ISO/IEC 19795-1 / NIST FRVT 1:N style, with a threshold τ (a candidate is returned
  when its score is > τ) and rank r (default 1):
    FPIR(τ) = fraction of non-mated probes whose best candidate scores > τ (a non-mated search
              returning any candidate at all is a false positive);
    DIR(τ, r) = fraction of mated probes whose true identity is at rank <= r AND scores > τ;
    FNIR(τ, r) = 1 − DIR(τ, r).
  DIR@FPIR=x uses the lowest τ with FPIR(τ) <= x: with the non-mated best scores sorted
  descending u₁ >= u₂ >= …, and m = ⌊x·N_nm⌋ allowed false positives, τ = u_{m+1} (τ = −inf
  if m >= N_nm). This is the operating point with the largest DIR among thresholds with
  FPIR <= x (same convention as ``verification.tpr_at_fpr``). When x < 1/N_nm only FPIR = 0
  is measurable; "dir@fpir=x/reachable" is then False.

Search (``topk_similarity``) runs on device: probes in fixed-size batches, and for each batch a
loop over fixed-size gallery chunks keeps a running top-T (merge of the running list with the
chunk's top-T, found by ``blocked_topk``), so the (P, G) similarity matrix never exists; peak
memory is one (probe_batch, gallery_chunk) block plus one float32 copy of the gallery on device
(normalised chunk by chunk as it is read, so no normalised copy either). One compilation per
(probe_batch, gallery shape, k): the tail probe batch is zero-padded, and the last gallery chunk
is read at a clamped offset with the overlap masked, so no gallery copy is padded. For
identity-level lists, T = k·g templates are kept (g = most templates of any one identity): the
best template of each of the k best identities is among them (fewer than k identities can
outscore it, each with at most g templates), so the deduplicated list is exact.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowlight.eval.roc_stats import fpr_key

__all__ = [
    "GalleryProbeSplit",
    "blocked_topk",
    "cmc",
    "dir_at_fpir",
    "evaluate",
    "rank_identities",
    "split_gallery_probe",
    "topk_similarity",
]


# --------------------------------------------------------------------------------------------
# gallery / probe split
# --------------------------------------------------------------------------------------------


class GalleryProbeSplit(NamedTuple):
    """Indices into the labelled set: ``gallery`` and ``probe`` (ascending), and for each
    probe whether its identity is enrolled (``probe_mated``)."""

    gallery: np.ndarray
    probe: np.ndarray
    probe_mated: np.ndarray


def split_gallery_probe(
    labels: Any, seed: int, *, gallery_per_id: int = 1, unknown_fraction: float = 0.0
) -> GalleryProbeSplit:
    """Splits identity-labelled items into an enrolled gallery and probes.

    ``round(unknown_fraction · #identities)`` identities, drawn at random, are *unknown*: none of
    their items is enrolled and all become non-mated probes (open-set). For every other
    identity, ``gallery_per_id`` of its items, drawn at random, are enrolled and the rest
    become mated probes; an identity with no more than ``gallery_per_id`` items is enrolled
    whole (it has no probe and acts as a distractor). Deterministic in ``seed``.
    """
    labels = np.asarray(labels).ravel()
    if gallery_per_id < 1:
        raise ValueError("gallery_per_id must be >= 1")
    if not 0.0 <= unknown_fraction < 1.0:
        raise ValueError("unknown_fraction must be in [0, 1)")
    rng = np.random.default_rng(seed)
    ids, code = np.unique(labels, return_inverse=True)
    unknown = np.zeros(ids.size, bool)
    unknown[rng.permutation(ids.size)[: int(round(unknown_fraction * ids.size))]] = True
    # random order within each identity: shuffle, then stable sort by identity
    perm = rng.permutation(labels.size)
    perm = perm[np.argsort(code[perm], kind="stable")]
    starts = np.searchsorted(code[perm], np.arange(ids.size))
    position = np.empty(labels.size, np.int64)
    position[perm] = np.arange(labels.size) - starts[code[perm]]
    enrolled = ~unknown[code] & (position < gallery_per_id)
    gallery = np.flatnonzero(enrolled)
    probe = np.flatnonzero(~enrolled)
    return GalleryProbeSplit(gallery, probe, ~unknown[code[probe]])


# --------------------------------------------------------------------------------------------
# chunked top-k on device
# --------------------------------------------------------------------------------------------


@jax.jit
def _l2n(x):
    n = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.where(n == 0, 1.0, n)


def blocked_topk(scores: jax.Array, k: int, block: int = 128) -> tuple[jax.Array, jax.Array]:
    """Exactly ``lax.top_k(scores, k)`` — values and indices, ties by lower index — for (P, C)
    scores with C divisible by ``block`` and C // block >= k, in about one pass over the row.

    ``lax.top_k`` on XLA:CPU sorts each row. Here: the maximum of each run of ``block``
    consecutive scores, the k best runs by that maximum, then the top k of those runs' k·block
    members. Every top-k entry lies in one of those runs (a run holding the j-th best entry has
    a maximum at least as large, and fewer than j runs can have a larger maximum), and both
    ``lax.top_k`` calls keep the lower index among equal values, so ties resolve as on the
    full row."""
    p, c = scores.shape
    runs = scores.reshape(p, c // block, block)
    _, best_runs = lax.top_k(runs.max(axis=-1), k)
    cand = jnp.take_along_axis(runs, best_runs[:, :, None], axis=1).reshape(p, k * block)
    values, pos = lax.top_k(cand, k)
    index = (best_runs[:, :, None] * block + jnp.arange(block)).reshape(p, k * block)
    return values, jnp.take_along_axis(index, pos, axis=1)


def _chunk_topk(sim, k, block=128):
    if sim.shape[1] % block == 0 and sim.shape[1] // block >= k:
        return blocked_topk(sim, k, block)
    return lax.top_k(sim, k)


@functools.partial(jax.jit, static_argnames=("k", "chunk", "normalize"))
def _topk_block(probes, gallery, *, k: int, chunk: int, normalize: bool = False):
    """Top-k (scores desc, gallery index asc among ties) of probes @ gallery.T, chunk by chunk;
    ``normalize`` L2-normalises each gallery chunk as it is read (no normalised gallery copy).

    The chunks are a Python loop (unrolled in the program), not ``lax.scan``: XLA:CPU runs a
    matmul inside a loop body without its fast library kernels — measured 55 queries/s against
    1M gallery embeddings with the scan, ~330 unrolled (docs/performance.md)."""
    g = gallery.shape[0]
    kc = min(k, chunk)
    best_s = jnp.full((probes.shape[0], k), -jnp.inf, probes.dtype)
    best_i = jnp.full((probes.shape[0], k), -1, jnp.int32)
    for start in range(0, g, chunk):
        s = min(start, g - chunk)  # the last chunk is read at a clamped offset ...
        block = lax.slice_in_dim(gallery, s, s + chunk)
        if normalize:
            block = _l2n(block)
        # HIGHEST: no TF32/bf16 passes on GPU/TPU, which would reorder near ties.
        sim = jnp.dot(probes, block.T, precision=lax.Precision.HIGHEST)
        idx = s + jnp.arange(chunk, dtype=jnp.int32)
        if s < start:
            sim = jnp.where(idx >= start, sim, -jnp.inf)  # ... with the re-read overlap masked
        cs, ci = _chunk_topk(sim, kc)
        # Running entries come first and have lower gallery indices; top_k keeps the earlier
        # of equal values, so ties stay ordered by gallery index as in the full-matrix top_k.
        ms, mi = lax.top_k(jnp.concatenate([best_s, cs], 1), k)
        all_i = jnp.concatenate([best_i, idx[ci]], 1)
        best_s, best_i = ms, jnp.take_along_axis(all_i, mi, 1)
    return best_s, best_i


@functools.partial(jax.jit, static_argnames=("k",))
def _dedupe(scores, labels, *, k: int):
    """Top-k distinct labels of score-sorted candidate rows (first occurrence = best)."""
    # A stable sort by label keeps each label's candidates in score order, so the first of
    # each run is that identity's best template; O(T log T) per row, no (T, T) comparison.
    order = jnp.argsort(labels, axis=1, stable=True)
    sl = jnp.take_along_axis(labels, order, 1)
    first = jnp.concatenate([jnp.ones_like(sl[:, :1], bool), sl[:, 1:] != sl[:, :-1]], 1)
    rows = jnp.arange(labels.shape[0])[:, None]
    dup = jnp.zeros(labels.shape, bool).at[rows, order].set(~first)
    s, pos = lax.top_k(jnp.where(dup, -jnp.inf, scores), k)
    return s, jnp.take_along_axis(labels, pos, 1)


def _batches(probes: np.ndarray, gallery: jax.Array, k: int, probe_batch: int, gallery_chunk: int,
             normalize: bool, labels: jax.Array | None = None, k_ids: int = 0):
    p = probes.shape[0]
    pb = max(1, min(probe_batch, p))
    chunk = max(1, min(gallery_chunk, gallery.shape[0]))
    for a in range(0, p, pb):
        block = probes[a : a + pb]
        n = block.shape[0]
        if n < pb:
            block = np.concatenate([block, np.zeros((pb - n,) + block.shape[1:], block.dtype)])
        x = jnp.asarray(block)
        s, i = _topk_block(x, gallery, k=k, chunk=chunk, normalize=normalize)
        if labels is not None:
            cand = labels[i]
            if k_ids < k:
                s, cand = _dedupe(s, cand, k=k_ids)
            i = cand
        yield np.asarray(s)[:n], np.asarray(i)[:n]


def _prepare(probes: Any, gallery: Any, normalize: bool):
    probes = np.asarray(probes, np.float32)
    gallery = jnp.asarray(gallery, jnp.float32)  # on device once
    if probes.ndim != 2 or gallery.ndim != 2 or probes.shape[1] != gallery.shape[1]:
        raise ValueError(f"need (P, D) and (G, D) embeddings, got {probes.shape}, {gallery.shape}")
    if gallery.shape[0] == 0:
        raise ValueError("empty gallery")
    if normalize and probes.size:  # the gallery is normalised chunk by chunk in _topk_block
        probes = np.asarray(_l2n(probes))
    return probes, gallery


def topk_similarity(
    probes: Any,
    gallery: Any,
    k: int,
    *,
    normalize: bool = True,
    probe_batch: int = 256,
    gallery_chunk: int = 16384,
) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar gallery entries of each probe, never forming the (P, G) matrix.

    Args:
      probes: (P, D); gallery: (G, D) embeddings (float32 on device; a numpy gallery is copied
        to the device inside the call — 2 GB at 1M x 512, half the time of a 256-probe search —
        so pass a ``jax.Array`` to search one gallery repeatedly; probes go in ``probe_batch``
        rows at a time).
      k: list length, clamped to G.
      normalize: cosine similarity (L2-normalise both sides; a zero vector stays zero) if True,
        raw dot products if False.
      probe_batch, gallery_chunk: block sizes; results do not depend on them beyond float
        rounding of the dot products.

    Returns:
      (scores (P, k) float32 descending, indices (P, k) int32 into the gallery); equal scores
      are ordered by gallery index, exactly as ``lax.top_k`` on the full matrix would.
    """
    probes, gallery = _prepare(probes, gallery, normalize)
    k = min(int(k), gallery.shape[0])
    out = list(_batches(probes, gallery, k, probe_batch, gallery_chunk, normalize))
    if not out:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
    return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])


def rank_identities(
    probes: Any,
    gallery: Any,
    gallery_labels: Any,
    k: int,
    *,
    normalize: bool = True,
    probe_batch: int = 256,
    gallery_chunk: int = 16384,
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate lists of identities: for each probe, the k gallery identities with the highest
    identity score (max over that identity's templates), best first.

    Returns:
      (scores (P, k'), labels (P, k')) with k' = min(k, #gallery identities); labels are
      values of ``gallery_labels``. Ties as in the module docstring.
    """
    gallery_labels = np.asarray(gallery_labels).ravel()
    uniq, codes, counts = np.unique(gallery_labels, return_inverse=True, return_counts=True)
    probes, gallery = _prepare(probes, gallery, normalize)
    if codes.size != gallery.shape[0]:
        raise ValueError(f"{codes.size} gallery labels for {gallery.shape[0]} gallery embeddings")
    k_ids = min(int(k), uniq.size)
    t = min(k_ids * int(counts.max()), gallery.shape[0])
    lab = jnp.asarray(codes.astype(np.int32))
    out = list(_batches(probes, gallery, t, probe_batch, gallery_chunk, normalize, lab, k_ids))
    if not out:
        return np.zeros((0, k_ids), np.float32), uniq[np.zeros((0, k_ids), np.int64)]
    scores = np.concatenate([o[0] for o in out])
    return scores, uniq[np.concatenate([o[1] for o in out])]


# --------------------------------------------------------------------------------------------
# metrics from candidate lists
# --------------------------------------------------------------------------------------------


def _true_rank(cand_labels: np.ndarray, cand_scores: np.ndarray, probe_labels: np.ndarray):
    """1-based rank of each probe's identity in its list (inf if absent) and its score
    (-inf if absent)."""
    hit = cand_labels == probe_labels[:, None]
    found = hit.any(axis=1)
    pos = np.argmax(hit, axis=1)
    rank = np.where(found, pos + 1.0, np.inf)
    score = np.where(found, cand_scores[np.arange(pos.size), pos], -np.inf)
    return rank, score


def cmc(
    probes: Any,
    probe_labels: Any,
    gallery: Any,
    gallery_labels: Any,
    *,
    ranks: Sequence[int] = (1, 5, 10),
    max_rank: int | None = None,
    **search_kw: Any,
) -> dict[str, Any]:
    """Closed-set CMC over the mated probes (module docstring).

    Returns:
      "rank-r" for each r in ``ranks``; "cmc" array (max_rank,) with CMC(1..max_rank)
      (max_rank defaults to max(ranks); ranks beyond the number of gallery identities count
      every mated probe); "num_mated", "num_unmated_ignored".
    """
    return evaluate(probes, probe_labels, gallery, gallery_labels, ranks=ranks, max_rank=max_rank,
                    fpir_targets=(), **search_kw)


def dir_at_fpir(
    mated_rank: Any, mated_score: Any, nonmated_top_score: Any, fpir: float, *, rank: int = 1
) -> tuple[float, float]:
    """DIR at FPIR <= x from per-probe results (module docstring for the definitions).

    Args:
      mated_rank: (M,) 1-based rank of each mated probe's true identity (inf if not listed).
      mated_score: (M,) that identity's score (anything if not listed).
      nonmated_top_score: (N_nm,) best candidate score of each non-mated probe.
      fpir: target x.
      rank: r; a mated probe counts only with rank <= r.

    Returns:
      (DIR, τ): candidates are returned when score > τ; FPIR(τ) <= x.
    """
    u = np.sort(np.asarray(nonmated_top_score, np.float64).ravel())[::-1]
    if u.size == 0:
        raise ValueError("DIR@FPIR needs non-mated probes")
    m = int(math.floor(fpir * u.size))
    while m > 0 and m / u.size > fpir:  # guard the float product both ways
        m -= 1
    while (m + 1) / u.size <= fpir:
        m += 1
    tau = float(u[m]) if m < u.size else -math.inf
    r = np.asarray(mated_rank, np.float64).ravel()
    s = np.asarray(mated_score, np.float64).ravel()
    if r.size == 0:
        return math.nan, tau
    return float(np.mean((r <= rank) & (s > tau))), tau


def evaluate(
    probes: Any,
    probe_labels: Any,
    gallery: Any,
    gallery_labels: Any,
    *,
    ranks: Sequence[int] = (1, 5, 10),
    max_rank: int | None = None,
    fpir_targets: Sequence[float] = (1e-1, 1e-2, 1e-3),
    dir_rank: int = 1,
    **search_kw: Any,
) -> dict[str, Any]:
    """Closed-set CMC and open-set DIR@FPIR from one search.

    Probes whose label is absent from ``gallery_labels`` are non-mated. ``search_kw`` goes to
    ``rank_identities`` (normalize, probe_batch, gallery_chunk).

    Returns:
      "rank-r" (r in ranks), "cmc" (max_rank,), "num_mated", "num_unmated_ignored" (non-mated
      probes, which closed-set metrics skip); and for each x in ``fpir_targets`` (needs
      non-mated probes): "dir@fpir=x" (at rank ``dir_rank``), "fnir@fpir=x" = 1 − DIR,
      "threshold@fpir=x" (τ, accept score > τ), "dir@fpir=x/reachable" (N_nm >= 1/x),
      plus "num_nonmated" (without non-mated probes these are NaN and reachable is False).
    """
    probe_labels = np.asarray(probe_labels).ravel()
    gallery_labels = np.asarray(gallery_labels).ravel()
    if np.asarray(probes).shape[0] != probe_labels.size:
        raise ValueError("one label per probe needed")
    max_rank = int(max_rank or max(ranks))
    k = max(max_rank, dir_rank, 1)
    cand_scores, cand_labels = rank_identities(probes, gallery, gallery_labels, k, **search_kw)
    mated = np.isin(probe_labels, gallery_labels)
    rank, score = _true_rank(cand_labels[mated], cand_scores[mated], probe_labels[mated])
    out: dict[str, Any] = {}
    n_mated = int(mated.sum())
    curve = np.array([np.mean(rank <= r) if n_mated else math.nan for r in range(1, max_rank + 1)])
    for r in ranks:
        out[f"rank-{r}"] = float(np.mean(rank <= r)) if n_mated else math.nan
    out.update(cmc=curve, num_mated=n_mated, num_unmated_ignored=int((~mated).sum()))
    if fpir_targets:
        top = cand_scores[~mated, 0]
        out["num_nonmated"] = int(top.size)
        for x in fpir_targets:
            key = fpr_key(x)
            if top.size:
                d, tau = dir_at_fpir(rank, score, top, x, rank=dir_rank)
            else:  # closed-set data: no non-mated probe, FPIR undefined
                d, tau = math.nan, math.nan
            out[f"dir@fpir={key}"] = d
            out[f"fnir@fpir={key}"] = 1.0 - d
            out[f"threshold@fpir={key}"] = tau
            out[f"dir@fpir={key}/reachable"] = bool(top.size and 1.0 / top.size <= x)
    return out
