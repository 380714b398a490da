"""Data and evaluation figures for `tools/bench.py`: renderer, readers, grain, verification, 1:N.

The single-core data benchmarks already exist as scripts (`bench_synth.py`, `bench_readers.py`);
they pin BLAS/OpenCV threads *before* numpy loads, which a process that already imported jax
and torch cannot do any more, so they run here as subprocesses and their printed figures are
parsed. The grain pipeline (threads, as training runs it), verification and 1:N search run
in-process.

1:N search: `lowlight.eval.search.topk_similarity` as a user calls it (probe batches of 256,
gallery chunks of 16,384; bf16 screen + certified float32 re-scoring, and the float32 pass
alone), and `search_topk` below, the float32 search with all probes and 64k-entry chunks in
one program, checked equal to it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowlight.eval import search

TOOLS = os.path.dirname(os.path.abspath(__file__))


def _run_script(script: str, args: list[str], timeout: float) -> str:
    cmd = [sys.executable, os.path.join(TOOLS, script), *args]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                         check=True)
    return out.stdout


_RATE = re.compile(r"^(?P<label>.+?)\s+(?:n=\s*\d+:)?\s*(?P<wall>[\d.]+) (?P<unit>[\w/]+) wall,"
                   r"\s+(?P<cpu>[\d.]+) [\w/]+ CPU")


def _parse_rates(text: str) -> dict[str, dict[str, float]]:
    rows = {}
    for line in text.splitlines():
        m = _RATE.match(line.strip())
        if m:
            label = re.sub(r"\s+", " ", m.group("label")).strip(" :")
            rows[label] = {"wall": float(m.group("wall")), "cpu": float(m.group("cpu")),
                           "unit": m.group("unit")}
    return rows


def synth_renderer(quick: bool) -> dict[str, Any]:
    """tools/bench_synth.py: images/s of the batched renderer and of ds[i], ONE core."""
    text = _run_script("bench_synth.py", ["--repeats", "2" if quick else "3",
                                          "--items", "100" if quick else "300"], 600)
    rows = _parse_rates(text)
    batch = next(v for k, v in rows.items() if k.startswith("render_batch"))
    item = next(v for k, v in rows.items() if k.startswith("ds[i]"))
    return {"render_batch_per_core": batch, "item_per_core": item, "raw": text.strip()}


def readers(quick: bool) -> dict[str, Any]:
    """tools/bench_readers.py: RecordIO / .bin / folder readers, ONE core."""
    text = _run_script("bench_readers.py", ["--num", "1000" if quick else "3000",
                                            "--repeats", "2" if quick else "3"], 900)
    rows = _parse_rates(text)
    pick = {k: v for k, v in rows.items() if k.startswith(("RecordIO random ds[i]",
                                                           "RecordIO sequential",
                                                           "read_verification_bin"))}
    return {"rows": pick, "raw": text.strip()}


def grain_pipeline(quick: bool) -> dict[str, Any]:
    """images/s of `lowlight.data.pipeline.batch_iterator` (grain, threads) over the synthetic
    world (batched rendering) and over a RecordIO pack (per-item JPEG decode)."""
    from lowlight.data import pipeline
    from lowlight.data.image_folder import encode_image
    from lowlight.data.recordio import RecordIO, write_recordio
    from lowlight.data.synthetic import SynthFaces

    batch, n_batches = 128, (4 if quick else 10)
    out = {}
    synth = SynthFaces(seed=0, num_identities=10_000, images_per_identity=10, size=112)
    it = pipeline.batch_iterator(synth, batch_size=batch, seed=0, keys=("image", "identity"))
    next(it)  # builds lazy state, starts the threads
    t = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    out["synth_images_per_s"] = batch * n_batches / (time.perf_counter() - t)

    with tempfile.TemporaryDirectory() as tmp:
        faces = SynthFaces(seed=1, num_identities=20, images_per_identity=10, size=112)
        pool = [encode_image(im, ".jpg", 95) for im in faces.render_batch(np.arange(200))["image"]]
        n = 4000
        rec = os.path.join(tmp, "train.rec")
        write_recordio(rec, None, ((pool[i % len(pool)], i // 10) for i in range(n)))
        src = pipeline.IdentityPairs(RecordIO(rec))
        it = pipeline.batch_iterator(src, batch_size=batch, seed=0)
        next(it)
        t = time.perf_counter()
        for _ in range(n_batches):
            next(it)
        out["recordio_images_per_s"] = batch * n_batches / (time.perf_counter() - t)
    out["batch"] = batch
    out["threads"] = pipeline.default_read_options().num_threads
    return out


def verification_pairs(quick: bool) -> dict[str, Any]:
    """pairs/s of `lowlight.eval.verification.evaluate` (10 folds, all metrics)."""
    from lowlight.eval import verification

    out = {}
    for n in ((6000,) if quick else (6000, 60_000)):
        rng = np.random.default_rng(0)
        e1 = rng.standard_normal((n, 512)).astype(np.float32)
        e2 = e1 + rng.standard_normal((n, 512)).astype(np.float32)
        issame = rng.random(n) < 0.5
        e2[~issame] = rng.standard_normal((int((~issame).sum()), 512))
        best = float("inf")
        for _ in range(2 if quick else 3):
            t = time.perf_counter()
            verification.evaluate(e1, e2, issame)
            best = min(best, time.perf_counter() - t)
        out[f"pairs_per_s@{n}"] = n / best
    return out


# --------------------------------------------------------------------------------------------
# 1:N search
# --------------------------------------------------------------------------------------------
def search_topk(probes: jax.Array, gallery: jax.Array, k: int, *, chunk: int = 65536,
                block: int = 128):
    """Top-k cosine similarities of unit `probes` (P, D) against a unit `gallery` (G, D):
    one matmul per gallery chunk, `blocked_topk` per chunk, then a merge of the chunk winners
    (ties by lower gallery index, as `lax.top_k` on the full matrix). Returns device arrays."""
    g = gallery.shape[0]
    vals, idx = [], []
    for start in range(0, g, chunk):
        block_g = gallery[start : start + chunk]
        sim = jnp.dot(probes, block_g.T, precision=lax.Precision.HIGHEST)
        n = sim.shape[1]
        if n % block == 0 and n // block >= k:
            v, i = search.blocked_topk(sim, k, block)
        else:
            v, i = lax.top_k(sim, min(k, n))
        vals.append(v)
        idx.append(i + start)
    v, pos = lax.top_k(jnp.concatenate(vals, axis=1), k)
    return v, jnp.take_along_axis(jnp.concatenate(idx, axis=1), pos, axis=1)


def identification_search(quick: bool) -> dict[str, Any]:
    """queries/s against 100k and 1M gallery embeddings (512-d fp32, k=10): lowlight's
    `topk_similarity` with the bf16 screen (its default at these sizes) and with the float32
    pass alone, and `search_topk` above (checked equal to it), in one process.

    Gallery forms: a `SearchIndex` (`index_gallery`: on the device with its screening copy, as
    a gallery searched repeatedly is kept), a `jax.Array` (the screening copy is made in the
    call), and a numpy array (copied to the device in the call too: a one-off search)."""
    from lowlight.eval import search

    rng = np.random.default_rng(0)
    probes = rng.standard_normal((1024, 512)).astype(np.float32)
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    out: dict[str, Any] = {"k": 10, "dim": 512, "probes": int(probes.shape[0])}
    reps = 1 if quick else 2

    def best_of(fn, *args, **kw):
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            r = jax.block_until_ready(fn(*args, **kw))
            best = min(best, time.perf_counter() - t)
        return best, r

    for g in (100_000, 1_000_000):
        gallery = rng.standard_normal((g, 512)).astype(np.float32)
        gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
        n_probe = 256 if (quick or g == 1_000_000) else 1024
        p = probes[:n_probe]
        gal_dev = jnp.asarray(gallery)
        t = time.perf_counter()
        index = search.index_gallery(gal_dev)
        out[f"index_gallery_s@{g}"] = time.perf_counter() - t
        search.topk_similarity(p[:256], index, 10)  # compile both passes
        search.topk_similarity(p[:256], index, 10, screen=False)

        stats: dict[str, int] = {}
        dt, (ref_s, ref_i) = best_of(search.topk_similarity, p, index, 10, stats=stats)
        out[f"topk_similarity_q_per_s@{g}"] = n_probe / dt
        out[f"screen_fallback_rows@{g}"] = stats["fallback"]
        for name, gal, kw in (("float32_pass", index, dict(screen=False)),
                              ("float32_pass_unnormalized", index._replace(norms=None),
                               dict(screen=False, normalize=False)),
                              ("device_gallery", gal_dev, {}),
                              ("host_gallery", gallery, {})):
            dt, (s, i) = best_of(search.topk_similarity, p, gal, 10, **kw)
            out[f"topk_similarity_{name}_q_per_s@{g}"] = n_probe / dt
            if name != "float32_pass_unnormalized":
                out[f"topk_similarity_{name}_equal@{g}"] = bool(np.array_equal(i, ref_i))

        fast = jax.jit(lambda q, gal: search_topk(q, gal, 10))
        jax.block_until_ready(fast(jnp.asarray(p[:256]), gal_dev))
        dt, (s, i) = best_of(fast, jnp.asarray(p), gal_dev)
        out[f"search_topk_q_per_s@{g}"] = n_probe / dt
        out[f"search_topk_equal@{g}"] = bool(np.array_equal(np.asarray(i), ref_i))
        del gallery, gal_dev, index
    return out
