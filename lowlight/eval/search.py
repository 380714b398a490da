"""Exact top-k similarity search of probe embeddings against a large gallery, on device.

``topk_similarity`` (entries) and ``rank_identities`` (identities, max over templates) are
what ``lowlight.eval.identification`` builds its CMC / DIR@FPIR on. Results are *exact*: the
scores and gallery indices a float32 matmul of all probes against the whole gallery and one
``lax.top_k`` per row would give, ties ordered by gallery index. Two passes compute that:

Exact pass (``_exact_block``). Probes in fixed-size batches; for each batch a loop over
fixed-size gallery chunks keeps a running top-T (merge of the running list with the chunk's
top-T, found by ``blocked_topk``), so the (P, G) similarity matrix never exists; peak memory is
one (probe_batch, gallery_chunk) block plus one float32 copy of the gallery on device
(normalised chunk by chunk as it is read, so no normalised copy either). One compilation per
(probe_batch, gallery shape, k): the tail probe batch is zero-padded, and the last gallery chunk
is read at a clamped offset with the overlap masked, so no gallery copy is padded.

Screened pass (``_screened_block``), the default for large galleries. The same loop runs over a
bfloat16 copy of the (normalised) gallery — bf16 x bf16 products accumulated in float32, 1.5x
the float32 matmul rate on an AVX-512-BF16 CPU (440 vs 293 GFLOP/s measured here) and half the
bytes — keeping the K > T best screen scores. Those K candidates are re-scored in float32 and
their top T taken. A per-probe certificate decides whether that is the exact answer:

  With q, g the float32 probe and gallery row the exact pass multiplies, q~ = bf16(q),
  g~ = bf16(g), e_q = q - q~, e_g = g - g~, the screen score s^ = sum q~_i g~_i satisfies
  s^ - q.g = -(sum q~ e_g + sum e_q g~ + sum e_q e_g) + float32 accumulation error, so
      |s^ - q.g| <= |q~| E + |e_q| M + |e_q| E + gamma |q~| M = delta(q)
  with E = 2^-8 max_j |g_j| (rounding to nearest to bf16's 8 significant bits errs by at most
  2^-8 of each component), M = (1 + 2^-8) max_j |g_j| (both fixed when the bf16 copy is
  made; |e_q| is measured for each probe) and gamma = 4 D 2^-24 (float32 summation of D terms
  in any order, for the screen's and for the re-scoring's sums, with room to spare). Every
  entry outside the candidates has screen score <= s^_K (the K-th best), hence float32 score
  <= s^_K + delta(q). If the T-th re-scored score t_T > s^_K + delta(q), no outsider can
  reach the top T, not even tie it: the re-scored top T *is* the exact top T.

Rows that fail the certificate are searched again by the exact pass (batched, padded to a power
of two). On 1M random unit 512-d embeddings with k = 10 (no clusters: the hardest case for the
margin) every probe was certified, at 260 queries/s against 126 for the exact pass alone
(docs/performance.md).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["SearchIndex", "blocked_topk", "index_gallery", "rank_identities", "topk_similarity"]

# Screen when the gallery has at least this many entries and the list is short: below that the
# bf16 copy and the re-scoring do not pay for themselves.
SCREEN_MIN_GALLERY = 1 << 16
SCREEN_MAX_T = 128


def blocked_topk(scores: jax.Array, k: int, block: int = 128) -> tuple[jax.Array, jax.Array]:
    """Exactly ``lax.top_k(scores, k)`` — values and indices, ties by lower index — for (P, C)
    scores with C divisible by ``block`` and C // block >= k, in about one pass over the row.

    ``lax.top_k`` on XLA:CPU sorts each row. Here: the maximum of each run of ``block``
    consecutive scores, the k best runs by that maximum, then the top k of those runs' k·block
    members. Every top-k entry lies in one of those runs: each run ranked before the run
    holding the j-th best entry e (larger maximum, or equal maximum and lower index) holds its
    own entry ranked before e, so fewer than j runs are. Both ``lax.top_k`` calls keep the
    lower position among equal values and the chosen runs are taken in gallery order, so ties
    resolve as on the full row."""
    p, c = scores.shape
    runs = scores.reshape(p, c // block, block)
    _, best_runs = lax.top_k(runs.max(axis=-1), k)
    # in gallery order, so that the second top_k's lower-position rule is the lower-index rule
    # (by rank, a later run with a larger maximum would put its members before an earlier
    # run's equal ones)
    best_runs = jnp.sort(best_runs, axis=1)
    cand = jnp.take_along_axis(runs, best_runs[:, :, None], axis=1).reshape(p, k * block)
    values, pos = lax.top_k(cand, k)
    index = (best_runs[:, :, None] * block + jnp.arange(block)).reshape(p, k * block)
    return values, jnp.take_along_axis(index, pos, axis=1)


def _chunk_topk(sim, k):
    """Top-k of one chunk's scores: ``blocked_topk`` with the largest run length (<= 128) that
    keeps the second sort at <= 2,048 members, else ``lax.top_k``."""
    c = sim.shape[1]
    for block in (128, 64, 32, 16, 8):
        if c % block == 0 and c // block >= k and k * block <= 2048:
            return blocked_topk(sim, k, block)
    return lax.top_k(sim, k)


def _chunk_loop(probes, g, k, chunk, score):
    """Running top-k (scores desc, gallery index asc among ties) of ``score(probes, a, b)``, the
    (P, b - a) scores against gallery rows a..b, over the chunks of a g-entry gallery.

    The chunks are a Python loop (unrolled in the program), not ``lax.scan``: XLA:CPU runs a
    matmul inside a loop body without its fast library kernels — measured 55 queries/s against
    1M gallery embeddings with the scan, ~170-200 unrolled (docs/performance.md)."""
    kc = min(k, chunk)
    best_s = jnp.full((probes.shape[0], k), -jnp.inf, jnp.float32)
    best_i = jnp.full((probes.shape[0], k), -1, jnp.int32)
    for start in range(0, g, chunk):
        s = min(start, g - chunk)  # the last chunk is read at a clamped offset ...
        sim = score(probes, s, s + chunk)
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


@jax.jit
def _row_norms(x):
    """(G, 1) L2 norms of the rows, 1 for a zero row (which then stays zero when divided)."""
    n = jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True))
    return jnp.where(n == 0, 1.0, n)




@functools.partial(jax.jit, static_argnames=("k", "chunk"))
def _exact_block(probes, gallery, norms, *, k: int, chunk: int):
    """Top-k of probes @ gallery.T in float32. With ``norms`` ((G, 1) row norms, or None), each
    gallery chunk is divided by its rows' norms as it is read (no normalised gallery copy;
    the norms come from one pass beforehand, as XLA:CPU runs a row reduction fused into the
    division ~10x slower than the two apart)."""
    def score(p, a, b):
        rows = lax.slice_in_dim(gallery, a, b)
        if norms is not None:
            rows = rows / lax.slice_in_dim(norms, a, b)
        # HIGHEST: no TF32/bf16 passes on GPU/TPU, which would reorder near ties.
        return jnp.dot(p, rows.T, precision=lax.Precision.HIGHEST)

    return _chunk_loop(probes, gallery.shape[0], k, chunk, score)


def _delta(q, err_norm, screen_norm):
    """delta(q) of the module docstring for each row of float32 probes ``q`` (P, D)."""
    qs = q.astype(jnp.bfloat16).astype(jnp.float32)
    nq = jnp.sqrt(jnp.sum(qs * qs, axis=1))
    ne = jnp.sqrt(jnp.sum((q - qs) ** 2, axis=1))
    gamma = 4.0 * q.shape[1] * 2.0**-24
    d = nq * err_norm + ne * screen_norm + ne * err_norm + gamma * nq * screen_norm
    # the bound's own float32 evaluation, and bf16 products flushed to zero (subnormals)
    return d * (1.0 + 2.0**-10) + 1e-30


@functools.partial(jax.jit, static_argnames=("k", "kk", "chunk"))
def _screened_block(probes, screen, gallery, norms, err_norm, screen_norm, *, k: int, kk: int,
                    chunk: int):
    """(scores, indices, certified) of the screened pass for one probe batch: top ``kk`` of
    the bf16 screen, re-scored in float32, top ``k`` of those; ``certified`` marks the rows
    whose result is provably the exact pass's (module docstring)."""
    qs = probes.astype(jnp.bfloat16)

    def score(p, a, b):
        return lax.dot_general(p, lax.slice_in_dim(screen, a, b), (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)

    screen_s, cand = _chunk_loop(qs, screen.shape[0], kk, chunk, score)
    cand = jnp.sort(cand, axis=1)  # index order, so top_k's tie rule is the gallery-index rule
    rows = gallery[cand]  # (P, kk, D) float32
    if norms is not None:
        rows = rows / norms[cand]
    exact = jnp.einsum("pd,pkd->pk", probes, rows, precision=lax.Precision.HIGHEST)
    s, pos = lax.top_k(exact, k)
    i = jnp.take_along_axis(cand, pos, 1)
    certified = s[:, -1] > screen_s[:, -1] + _delta(probes, err_norm, screen_norm)
    return s, i, certified


class SearchIndex(NamedTuple):
    """A gallery prepared for repeated search (``index_gallery``): keep it and pass it as
    ``gallery`` to ``topk_similarity`` / ``rank_identities``, so the device copy, the row
    norms and the screening copy are made once, not at every call.

    gallery: (G, D) float32 on device, as given (not normalised).
    norms: (G, 1) row norms (1 for zero rows) if the searches use cosine similarity, else None.
    screen: (G, D) bfloat16 copy of the gallery (divided by ``norms``), or None.
    err_norm, screen_norm: E and M of the certificate (module docstring).
    """

    gallery: jax.Array
    norms: jax.Array | None
    screen: jax.Array | None
    err_norm: float
    screen_norm: float

    @property
    def normalize(self) -> bool:
        return self.norms is not None


@jax.jit
def _screen_copy(gallery, norms):
    return (gallery if norms is None else gallery / norms).astype(jnp.bfloat16)


def index_gallery(gallery: Any, *, normalize: bool = True, screen: bool = True) -> SearchIndex:
    """Puts a (G, D) gallery on the device once, with its row norms for cosine similarity, and
    with ``screen`` its bfloat16 screening copy (G·D·2 bytes: 1 GB at 1M x 512; 0.3 s to make
    here)."""
    if isinstance(gallery, SearchIndex):
        if gallery.normalize != normalize:
            raise ValueError(f"SearchIndex built with normalize={gallery.normalize}, "
                             f"search asks for normalize={normalize}")
        index = gallery
    else:
        g = jnp.asarray(gallery, jnp.float32)
        if g.ndim != 2:
            raise ValueError(f"need (G, D) gallery embeddings, got shape {g.shape}")
        if g.shape[0] == 0:
            raise ValueError("empty gallery")
        index = SearchIndex(g, _row_norms(g) if normalize else None, None, math.nan, math.nan)
    if index.screen is not None or not screen:
        return index
    # the largest row the screen multiplies (normalised rows: 1 up to float32 rounding)
    top = 1.0 if normalize else float(jnp.max(_row_norms(index.gallery)))
    top *= 1.0 + 2.0**-20
    return index._replace(screen=_screen_copy(index.gallery, index.norms),
                          err_norm=2.0**-8 * top, screen_norm=(1.0 + 2.0**-8) * top)


def _screen_k(t: int) -> int:
    """Candidates kept by the screen for a list of t: at k = 10, K = 32 certified 95% of
    rows of a 1M random-embedding search and K = 64 all of them (docs/performance.md)."""
    return max(4 * t, 64)


def _batches(probes: np.ndarray, index: SearchIndex, k: int, probe_batch: int,
             gallery_chunk: int, use_screen: bool, stats: dict[str, int]):
    """((scores, indices) of ``probe_batch`` rows, n valid rows) per probe batch; the tail
    batch is zero-padded so every batch has one shape (one compilation)."""
    p = probes.shape[0]
    g = index.gallery.shape[0]
    pb = max(1, min(probe_batch, p))
    chunk = max(1, min(gallery_chunk, g))
    kk = min(_screen_k(k), g)
    exact = functools.partial(_exact_block, gallery=index.gallery, norms=index.norms, k=k,
                              chunk=chunk)
    for a in range(0, p, pb):
        block = probes[a : a + pb]
        n = block.shape[0]
        if n < pb:
            block = np.concatenate([block, np.zeros((pb - n,) + block.shape[1:], block.dtype)])
        x = jnp.asarray(block)
        if not use_screen:
            yield exact(x), n
            continue
        s, i, ok = _screened_block(x, index.screen, index.gallery, index.norms, index.err_norm,
                                   index.screen_norm, k=k, kk=kk, chunk=chunk)
        s, i = np.array(s), np.array(i)
        redo = np.flatnonzero(~np.asarray(ok)[:n])
        stats["screened"] += n
        stats["fallback"] += redo.size
        if redo.size:  # uncertified rows: the exact pass, padded to a power of two
            m = 1 << (int(redo.size) - 1).bit_length()
            xr = np.zeros((m, block.shape[1]), block.dtype)
            xr[: redo.size] = block[redo]
            rs, ri = exact(jnp.asarray(xr))
            s[redo], i[redo] = np.asarray(rs)[: redo.size], np.asarray(ri)[: redo.size]
        yield (s, i), n


def _search(probes: Any, gallery: Any, t_of, normalize: bool, screen: bool | None,
            probe_batch: int, gallery_chunk: int, stats: dict[str, int] | None):
    probes = np.asarray(probes, np.float32)
    index = index_gallery(gallery, normalize=normalize, screen=False)
    g, d = index.gallery.shape
    if probes.ndim != 2 or probes.shape[1] != d:
        raise ValueError(f"need (P, D) and (G, D) embeddings, got {probes.shape}, {(g, d)}")
    t = t_of(g)
    if screen is None:
        screen = g >= SCREEN_MIN_GALLERY and t <= SCREEN_MAX_T
    screen = bool(screen) and _screen_k(t) < g
    if screen and probes.size:
        index = index_gallery(index, normalize=normalize, screen=True)
    if normalize and probes.size:  # the gallery is normalised chunk by chunk
        probes = np.asarray(probes / _row_norms(probes))
    stats = stats if stats is not None else {}
    stats.update(screened=0, fallback=0)
    return list(_batches(probes, index, t, probe_batch, gallery_chunk, screen, stats)), index


def topk_similarity(
    probes: Any,
    gallery: Any,
    k: int,
    *,
    normalize: bool = True,
    screen: bool | None = None,
    probe_batch: int = 256,
    gallery_chunk: int = 16384,
    stats: dict[str, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar gallery entries of each probe, never forming the (P, G) matrix.

    Args:
      probes: (P, D) embeddings, searched ``probe_batch`` rows at a time.
      gallery: (G, D) embeddings, or a ``SearchIndex`` from ``index_gallery`` (keep one to
        search a gallery repeatedly: a numpy gallery is copied to the device inside each call,
        2 GB at 1M x 512, and the screening copy is made there too).
      k: list length, clamped to G.
      normalize: cosine similarity (L2-normalise both sides; a zero vector stays zero) if True,
        raw dot products if False.
      screen: bfloat16 screening + certified float32 re-scoring (module docstring) if True, the
        float32 pass alone if False; None: screen galleries of >= 65,536 entries for k <= 128.
        Either gives the exact result.
      probe_batch, gallery_chunk: block sizes; results do not depend on them beyond float
        rounding of the dot products.
      stats: if given, receives "screened" (rows searched by the screen) and "fallback" (of
        those, rows the certificate sent to the float32 pass).

    Returns:
      (scores (P, k) float32 descending, indices (P, k) int32 into the gallery); equal scores
      are ordered by gallery index, exactly as ``lax.top_k`` on the full matrix would.
    """
    out, index = _search(probes, gallery, lambda g: min(int(k), g), normalize, screen,
                         probe_batch, gallery_chunk, stats)
    k = min(int(k), index.gallery.shape[0])
    if not out:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
    return (np.concatenate([np.asarray(s)[:n] for (s, _), n in out]),
            np.concatenate([np.asarray(i)[:n] for (_, i), n in out]))


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


def rank_identities(
    probes: Any,
    gallery: Any,
    gallery_labels: Any,
    k: int,
    *,
    normalize: bool = True,
    screen: bool | None = None,
    probe_batch: int = 256,
    gallery_chunk: int = 16384,
    stats: dict[str, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate lists of identities: for each probe, the k gallery identities with the highest
    identity score (max over that identity's templates), best first.

    The search keeps T = k·g templates (g = most templates of any one identity): the best
    template of each of the k best identities is among them (fewer than k identities can
    outscore it, each with at most g templates), so the deduplicated list is exact. Arguments
    as ``topk_similarity``.

    Returns:
      (scores (P, k') float32, labels (P, k')) with k' = min(k, #gallery identities); labels
      are values of ``gallery_labels``. Equal identity scores are ordered by the gallery index
      of each identity's best template.
    """
    gallery_labels = np.asarray(gallery_labels).ravel()
    uniq, codes, counts = np.unique(gallery_labels, return_inverse=True, return_counts=True)
    g = int(np.shape(gallery.gallery if isinstance(gallery, SearchIndex) else gallery)[0])
    if codes.size != g:
        raise ValueError(f"{codes.size} gallery labels for {g} gallery embeddings")
    k_ids = min(int(k), uniq.size)
    lab = jnp.asarray(codes.astype(np.int32))

    def t_of(n):
        return min(k_ids * int(counts.max()), n)

    out, _ = _search(probes, gallery, t_of, normalize, screen, probe_batch, gallery_chunk, stats)
    if not out:
        return np.zeros((0, k_ids), np.float32), uniq[np.zeros((0, k_ids), np.int64)]
    scores, cands = [], []
    for (s, i), n in out:  # per (padded) probe batch: one compilation of _dedupe
        s, cand = jnp.asarray(s), lab[jnp.asarray(i)]
        if k_ids < t_of(g):
            s, cand = _dedupe(s, cand, k=k_ids)
        scores.append(np.asarray(s)[:n])
        cands.append(np.asarray(cand)[:n])
    return np.concatenate(scores), uniq[np.concatenate(cands)]
