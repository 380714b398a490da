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

Search (``topk_similarity``, ``rank_identities``, ``index_gallery``) lives in
``lowlight.eval.search``: exact top-k on device over galleries of millions of entries, never
forming the (P, G) similarity matrix, with a certified bfloat16 screening pass for large
galleries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from lowlight.eval.roc_stats import fpr_key
from lowlight.eval.search import (
    SearchIndex,
    blocked_topk,
    index_gallery,
    rank_identities,
    topk_similarity,
)

__all__ = [
    "GalleryProbeSplit",
    "SearchIndex",
    "blocked_topk",
    "cmc",
    "dir_at_fpir",
    "evaluate",
    "index_gallery",
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
    ``rank_identities`` (normalize, screen, probe_batch, gallery_chunk, stats).

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
