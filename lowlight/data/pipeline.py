"""grain input pipelines: a config names a dataset, this file turns it into batches.

Why batches are rendered, not stacked: the synthetic world renders a whole batch of faces in one
vectorised call (`SynthFaces.render_batch`), ~an order of magnitude faster than rendering
faces one by one, so the pipeline shuffles and batches *indices* and maps the batch renderer over
them. Sources without `render_batch` (real-format readers) are read item by item and stacked.

Multi-host: the global index stream is shuffled and batched identically in every process;
each process keeps its contiguous `batch_size / process_count` rows of every global batch and
renders only those; `parallel.global_batch` assembles the global array. So the global batches do
not depend on the process count. The iterator is checkpointable
(`grain.checkpoint.CheckpointSave`), so a resumed run continues the same example stream.

Defaults sized for small machines: grain's stock ReadOptions use 16 threads and a 500-element
buffer, which on a 2-core machine only adds GIL contention; we read with `min(4, cores)` threads
and a small buffer, and use worker processes only when `num_workers > 0`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import grain
import jax
import numpy as np

#: Dataset names `config.data.name` may take.
DATASETS: tuple[str, ...] = ("synth", "utkface", "recordio", "image_folder", "prepared")


class IdentityPairs:
    """Adapts an `(image, label)` source (RecordIO) to the dict items pipelines read."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        image, label = self.source[i]
        return {"image": image, "identity": int(label)}


#: Paper A's dataset variants: the source itself, DistortionFace, NaturalFace.
VARIANTS: tuple[str, ...] = ("clean", "distortion", "natural")


def make_source(cfg):
    """Random-access source for a data config (`cfg.name` + its options), wrapped by paper A's
    simulate module when `cfg.variant` is 'distortion' (every image) or 'natural' (half)."""
    if cfg.name == "synth":
        from lowlight.config_lib import to_dict
        from lowlight.data.synthetic import SynthFaces

        extra = to_dict(cfg.get("synth", {}) or {})
        src = SynthFaces(seed=cfg.seed, num_identities=cfg.num_identities,
                         images_per_identity=cfg.images_per_identity, size=cfg.size, **extra)
    elif cfg.name == "utkface":
        from lowlight.data.sources import UTKFace

        if not cfg.get("root"):
            raise ValueError("config.data.root: the UTKFace folder is required for "
                             "data.name='utkface'")
        crop = cfg.get("face_crop", "") or None
        # validate: decode every file once up front so a corrupt JPEG is skipped (and reported)
        # at start instead of failing a training step hours later.
        src = UTKFace(cfg.root, split=cfg.get("split", "train"), seed=cfg.seed,
                      size=cfg.size, face_crop={"no_face": "center"} if crop else None,
                      validate=cfg.get("validate", True))
    elif cfg.name == "recordio":
        # insightface MS1M / Glint / WebFace packs: root = folder with train.rec + train.idx, or
        # the .rec path itself; labels are identity ids.
        from lowlight.data.sources import RecordIO

        root = cfg.get("root", "")
        rec = os.path.join(root, "train.rec") if os.path.isdir(root) else root
        if not rec or not os.path.exists(rec):
            raise ValueError(f"config.data.root: no RecordIO pack at {root!r} (expected a folder "
                             "with train.rec/train.idx or a .rec file)")
        src = IdentityPairs(RecordIO(rec, size=cfg.size, validate=cfg.get("validate", False)))
    elif cfg.name == "image_folder":
        from lowlight.data.sources import ImageFolder

        if not cfg.get("root"):
            raise ValueError("config.data.root: the identity-folder root is required for "
                             "data.name='image_folder'")
        src = ImageFolder(cfg.root, size=cfg.size, validate=cfg.get("validate", True))
    # -- prepared (tools/prepare.py output; lowlight.data.prepared) ---------------------------
    elif cfg.name == "prepared":
        from lowlight.data.prepared import PreparedSource

        if not cfg.get("root"):
            raise ValueError("config.data.root: the prepared dataset folder (tools/prepare.py "
                             "--out, or its <name>/1.0.0 folder) is required for "
                             "data.name='prepared'")
        src = PreparedSource(cfg.root, split=cfg.get("split", "train"))
    # -----------------------------------------------------------------------------------------
    else:
        raise ValueError(f"unknown dataset (config.data.name) {cfg.name!r}; "
                         f"valid: {', '.join(DATASETS)}")
    variant = cfg.get("variant", "clean")
    if variant not in VARIANTS:
        raise ValueError(f"unknown data variant (config.data.variant) {variant!r}; "
                         f"valid: {', '.join(VARIANTS)}")
    if variant != "clean":
        from lowlight.data import illumination

        wrap = illumination.DistortionFace if variant == "distortion" else illumination.NaturalFace
        from lowlight.config_lib import to_dict

        src = wrap(src, seed=cfg.seed, **to_dict(cfg.get("simulate", {}) or {}))
    return src


def default_read_options() -> grain.ReadOptions:
    threads = max(1, min(4, os.cpu_count() or 1))
    return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)


def _ensure_flags_parsed() -> None:
    """grain reads absl flags (in this process and in its workers); outside `app.run` (tests,
    notebooks, worker processes) nobody parsed them, so mark them parsed with their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _worker_init(worker_index: int, worker_count: int) -> None:
    del worker_index, worker_count
    _ensure_flags_parsed()


class _RowSlice(grain.transforms.Map):
    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def map(self, indices):
        return np.asarray(indices)[self.start:self.stop]


class RenderBatch(grain.transforms.Map):
    """Maps a batch of indices to a dict of stacked arrays, keeping only `keys`.

    Uses the source's vectorised `render_batch` when it has one, else reads items one by one.
    `rename` maps source keys to batch keys (e.g. identity -> label).
    """

    def __init__(self, source, keys: Sequence[str] | None = None,
                 rename: dict[str, str] | None = None):
        self.source = source
        self.keys = tuple(keys) if keys else None
        self.rename = dict(rename or {})

    def map(self, indices):
        indices = np.asarray(indices, dtype=np.int64)
        if hasattr(self.source, "render_batch"):
            batch = self.source.render_batch(indices)
        else:
            items = [self.source[int(i)] for i in indices]
            batch = {k: np.stack([np.asarray(it[k]) for it in items]) for k in items[0]}
        out = {}
        for k, v in batch.items():
            if self.keys is not None and k not in self.keys:
                continue
            out[self.rename.get(k, k)] = np.asarray(v)
        out["index"] = indices
        return out


def batch_iterator(source, *, batch_size: int, seed: int, shuffle: bool = True,
                   repeat: bool = True, keys: Sequence[str] | None = None,
                   rename: dict[str, str] | None = None, num_workers: int = 0,
                   drop_remainder: bool = True, shard_by_process: bool = True,
                   transform: Callable | None = None):
    """A checkpointable iterator of host-local batches (dicts of numpy arrays).

    Args:
      source: random-access source (`len`, `[i]`, optionally `render_batch`).
      batch_size: the *global* batch size; each process yields its share.
      seed: shuffle seed (each epoch reshuffles with seed + epoch).
      keys: source keys to keep (default: all); `rename` renames them.
      num_workers: grain worker processes (0 = threads in this process).
      transform: optional extra per-batch numpy function.
    """
    pc, pi = (jax.process_count(), jax.process_index()) if shard_by_process else (1, 0)
    if batch_size % pc:
        raise ValueError(f"batch_size={batch_size} is not divisible by {pc} processes")
    local_bs = batch_size // pc
    # Shuffle and batch the *global* index stream, then keep this process's contiguous rows:
    # every process count sees the same global batches (a 2-host run equals a 1-host run, and a
    # run resumed on another topology continues the same stream). Only indices are shared;
    # each process renders / decodes just its own rows.
    ds = grain.MapDataset.range(len(source))
    if shuffle:
        ds = ds.seed(seed).shuffle()
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if pc > 1:
        ds = ds.map(_RowSlice(pi * local_bs, (pi + 1) * local_bs))
    ds = ds.map(RenderBatch(source, keys, rename))
    if transform is not None:
        ds = ds.map(transform)
    it_ds = ds.to_iter_dataset(default_read_options())
    if num_workers > 0:
        _ensure_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers),
                                  worker_init_fn=_worker_init)
    return iter(it_ds)
