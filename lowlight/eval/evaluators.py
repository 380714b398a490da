"""Evaluators shared by the training loop and checkpoint evaluation.

A registry keyed by `config.evals.<name>.type` — 'synth_verification' (held-out synthetic
people under normal / mixed light or paper B's protocol), 'pairs' (an insightface `.bin` or
LFW pairs.txt, as stored or through the protocol) and 'labelled' (pairs and identification drawn
from any identity-labelled source `config.data` can name: folders, RecordIO, prepared sets). Each
evaluator is built once (it renders or
loads its data up front and caches it) and then `run(embed_fn)` returns `{metric: value}` with
keys prefixed by the evaluator's name, e.g. "synth_val/acc", "synth_val/tpr@fpr=1e-3".

`embed_fn(images_uint8 (N,H,W,3)) -> (N, D)` unit-norm numpy embeddings; `make_embed_fn` builds
one from a model and a mesh with a fixed jitted batch shape (padding the tail), so evaluation
never recompiles.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np

from lowlight import parallel


def make_embed_fn(model, mesh, *, batch_size: int, flip: bool = True):
    """Returns `embed(params, batch_stats, images) -> np.ndarray (N, D)`; one compile per shape."""
    from lowlight.steps import embed_step

    n_data = parallel.data_size(mesh)
    batch_size = max(n_data, (batch_size // n_data) * n_data)
    rep, bsh = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    fn = jax.jit(functools.partial(embed_step, model=model, flip=flip),
                 in_shardings=(rep, rep, bsh), out_shardings=rep)

    def embed(params, batch_stats, images):
        images = np.asarray(images)
        out = []
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            pad = batch_size - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            # A global array built from data every process holds (multi-host safe: each
            # process supplies its devices' rows; numpy inputs only work single-process).
            arr = jax.make_array_from_callback(chunk.shape, bsh, lambda idx, c=chunk: c[idx])
            out.append(np.asarray(fn(params, batch_stats, arr))[:batch_size - pad])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    return embed


def raw_pixel_embeddings(images) -> np.ndarray:
    """The no-learning baseline: grayscale, mean-subtracted, flattened pixels."""
    x = np.asarray(images, np.float32).mean(-1).reshape(len(images), -1)
    return x - x.mean(axis=1, keepdims=True)


class PairVerification:
    """Verification on pairs of cached images; subclasses say where the images come from.

    Subclasses set, in `__init__`: `name`; `images` uint8 (M, H, W, 3), each distinct image once;
    `idx1`, `idx2` (N,) rows of `images` for the two sides of each pair; `issame` (N,) bool;
    `conditions` (M,) lighting tag per image; `pair_conditions` (N,) the pair's tag (its
    probe's); `identity`, `gender`, `ethnicity` (M,) labels or None where the source has none
    (the report then skips identification / fairness for this set and says so).

    `run(embed_fn)` returns `lowlight.eval.verification.evaluate` keys plus `auc_ci_low` /
    `auc_ci_high` (95% stratified bootstrap over pairs, `BOOT_REPLICATES` replicates, seed
    `BOOT_SEED`: the same interval every run), `tnr@fpr=1e-3` (`roc_stats.tnr_at`: 1 − FPR at
    the tpr@fpr=1e-3 operating point) and `raw_pixel_acc` (the same pairs scored by
    `raw_pixel_embeddings`, computed once), all prefixed `<name>/`. Kept for reports
    (`lowlight.eval.report`): `last_scores` (cosine per pair) and `last_embeddings` (unit-norm,
    one row per cached image).
    """

    BOOT_REPLICATES = 200
    BOOT_SEED = 0

    name: str
    images: np.ndarray
    idx1: np.ndarray
    idx2: np.ndarray
    issame: np.ndarray
    conditions: np.ndarray
    pair_conditions: np.ndarray
    identity: np.ndarray | None = None
    gender: np.ndarray | None = None
    ethnicity: np.ndarray | None = None
    _raw: float | None = None
    last_scores: np.ndarray | None = None
    last_embeddings: np.ndarray | None = None

    def extra_metrics(self) -> dict:
        """Scalars about the set itself (e.g. pairs the reader dropped), unprefixed."""
        return {}

    def _probes_through_protocol(self, seed: int) -> None:
        """Appends one protocol-transformed copy of every image that is some pair's probe
        (once per distinct image, so the exact mix is over images) and points idx2 at them."""
        from lowlight.data.illumination import IlluminationProtocol

        rows, where = np.unique(self.idx2, return_inverse=True)
        proto = IlluminationProtocol(_ImageList(self.images[rows]), seed=seed)
        moved = [proto[i] for i in range(len(rows))]
        base = len(self.images)
        self.images = np.concatenate([self.images, np.stack([m["image"] for m in moved])])
        self.conditions = np.concatenate([self.conditions,
                                          np.asarray([m["condition"] for m in moved])])
        for attr in ("identity", "gender", "ethnicity"):  # the copies keep their labels
            lab = getattr(self, attr)
            if lab is not None:
                setattr(self, attr, np.concatenate([lab, lab[rows]]))
        self.idx2 = base + where.reshape(-1)

    def run(self, embed_fn) -> dict:
        from lowlight.eval import roc_stats, verification

        emb = embed_fn(self.images)
        # insightface's 10 folds; a set smaller than that (a test fixture) gets one per pair
        res = verification.evaluate(emb[self.idx1], emb[self.idx2], self.issame,
                                    n_folds=min(10, len(self.issame)))
        out = {f"{self.name}/{k}": v for k, v in res.items() if np.isscalar(v)}
        e1, e2 = emb[self.idx1], emb[self.idx2]
        self.last_scores = np.sum(e1 * e2, axis=1) / np.maximum(
            np.linalg.norm(e1, axis=1) * np.linalg.norm(e2, axis=1), 1e-12)
        emb = np.asarray(emb, np.float32)
        self.last_embeddings = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        ci = roc_stats.bootstrap_ci(self.last_scores, self.issame, ("auc",),
                                    n_boot=self.BOOT_REPLICATES, seed=self.BOOT_SEED)["auc"]
        out[f"{self.name}/auc_ci_low"] = ci.low
        out[f"{self.name}/auc_ci_high"] = ci.high
        roc = roc_stats.Roc.from_scores(self.last_scores, self.issame)
        out[f"{self.name}/tnr@fpr=1e-3"] = roc_stats.tnr_at(1e-3)(roc)
        if self._raw is None:
            raw = raw_pixel_embeddings(self.images)
            self._raw = verification.evaluate(raw[self.idx1], raw[self.idx2], self.issame,
                                              n_folds=min(10, len(self.issame)))["acc"]
        out[f"{self.name}/raw_pixel_acc"] = self._raw
        out.update({f"{self.name}/{k}": v for k, v in self.extra_metrics().items()})
        return out


class SynthVerification(PairVerification):
    """Verification on same/different-identity pairs of held-out synthetic people.

    Config (`config.evals.<name>`): type='synth_verification', num_pairs, seed (a world seed
    other than the training one: identities are functions of (seed, id), so another seed means
    other people), num_identities, images_per_identity, size, lighting:
      'normal'   every image under normal light,
      'mixed'    the synthetic world's own lighting mix (rendered low / side / over light),
      'protocol' normal-light renders passed through paper B's illumination protocol
                 (~30% low, 40% side, 30% over; `lowlight.data.illumination.IlluminationProtocol`).
    Every image has identity, gender and ethnicity labels (identification and fairness run).
    """

    def __init__(self, name: str, cfg):
        from lowlight.data import synthetic

        self.name = name
        kwargs = {}
        lighting = cfg.get("lighting", "mixed")
        if lighting in ("normal", "protocol"):
            kwargs["condition_weights"] = {"normal": 1.0}
        elif lighting != "mixed":
            raise ValueError(f"evals.{name}.lighting={lighting!r}; valid: normal, mixed, protocol")
        src = synthetic.SynthFaces(seed=cfg.seed, num_identities=cfg.num_identities,
                                   images_per_identity=cfg.images_per_identity, size=cfg.size,
                                   **kwargs)
        if lighting == "protocol":
            from lowlight.data.illumination import IlluminationProtocol

            src = IlluminationProtocol(src, seed=cfg.seed)
        i1, i2, self.issame = synthetic.verification_pairs(src, cfg.num_pairs, seed=cfg.seed)
        uniq, inv = np.unique(np.concatenate([i1, i2]), return_inverse=True)
        if hasattr(src, "render_batch"):
            rendered = src.render_batch(uniq)
            self.images = np.asarray(rendered["image"])
            conds = rendered["condition"]
            labels = {k: rendered[k] for k in ("identity", "gender", "ethnicity")}
        else:
            items = [src[int(i)] for i in uniq]
            self.images = np.stack([it["image"] for it in items])
            conds = [it.get("condition", "normal") for it in items]
            labels = {k: [it[k] for it in items] for k in ("identity", "gender", "ethnicity")}
        self.conditions = np.asarray([str(c) for c in conds])
        # demographic and identity labels of the cached images, for fairness and identification
        self.identity = np.asarray(labels["identity"], np.int64)
        self.gender = np.asarray(labels["gender"], np.int64)
        self.ethnicity = np.asarray(labels["ethnicity"], np.int64)
        self.idx1, self.idx2 = inv[:len(i1)], inv[len(i1):]
        # a pair's condition: its second image's (the probe's), as in paper B's protocol where
        # an unaltered gallery face meets a relit / degraded probe
        self.pair_conditions = self.conditions[self.idx2]


class PairSetVerification(PairVerification):
    """Verification on a real pair set: an insightface `.bin` (lfw.bin, cfp_fp.bin, agedb_30.bin,
    ...) or LFW's `pairs.txt` with its image folder, read by `lowlight.data.verification_sets`.

    Config (`config.evals.<name>`): type='pairs', path (the .bin, or pairs.txt), images (LFW:
    the image root, e.g. an aligned `lfw-112x112/`; unused for .bin), size (the model's input
    size: images are resized to it), num_pairs (0 = all; else the first N, which keeps the
    insightface 10-fold split meaningful only when N is a multiple of 10), lighting, seed:
      'as_is'    the images as stored; every image is tagged 'as_is' (its light is unknown),
      'protocol' paper B's illumination test protocol on the set: the first image of each pair
                 stays as stored (the gallery face), the second (the probe) is replaced by a
                 copy passed through `IlluminationProtocol` (exact ~30% low / 40% side / 30%
                 over mix over the distinct probe images, seeded by `seed`) and tagged with its
                 condition; pairs take the probe's tag.

    Images must already be aligned face crops, as insightface's .bin files and aligned LFW copies
    are: nothing is detected or aligned here. Pairs the reader drops (an image that does not
    decode, an LFW file that is missing) are counted in `<name>/dropped_pairs` and named in the
    reader's warning; the 10-fold accuracy then runs over the kept pairs in file order.

    Labels: LFW names its files, so each distinct image is cached once with `identity` = the
    person's folder (identification then runs on the set's own images); a .bin names nobody, so
    `identity` is None and the rows are the file's 2N images. Neither carries gender or ethnicity.
    """

    def __init__(self, name: str, cfg):
        from lowlight.data import verification_sets as vs

        self.name = name
        path = cfg.get("path", "")
        lighting = _real_set_lighting(name, cfg)
        if not path or not os.path.isfile(path):
            raise ValueError(f"evals.{name}.path={path!r}: expected an insightface .bin file or "
                             "an LFW pairs.txt")
        size = cfg.get("size", None) or None
        if path.endswith(".txt"):
            root = cfg.get("images", "")
            if not root or not os.path.isdir(root):
                raise ValueError(f"evals.{name}.images={root!r}: LFW pairs ({path}) need the "
                                 "image folder (e.g. an aligned lfw-112x112/)")
            pairs = vs.LFWPairs(root, path, size=size)
        else:
            pairs = vs.VerificationBin(path, size=size)
        images, issame = pairs.load()
        self.stats = pairs.stats
        n = len(issame)
        if cfg.get("num_pairs", 0):
            n = min(n, int(cfg.num_pairs))
        if n == 0:
            raise ValueError(f"evals.{name}: no pair of {path} could be read "
                             f"({self.stats.get('dropped_pairs', 0)} dropped)")
        self.issame = np.asarray(issame[:n], bool)
        rows1, rows2 = 2 * np.arange(n), 2 * np.arange(n) + 1
        if isinstance(pairs, vs.LFWPairs):
            # one row per distinct file: an image in several pairs is embedded once, and an
            # identification probe is never its own gallery copy
            files = np.asarray(pairs.files)[np.stack([2 * pairs.pair_index[:n],
                                                      2 * pairs.pair_index[:n] + 1], 1).ravel()]
            uniq, first, inv = np.unique(files, return_index=True, return_inverse=True)
            self.images = images[:2 * n][first]
            self.idx1, self.idx2 = inv[0::2], inv[1::2]
            self.identity = np.asarray([f.split("/")[0] for f in uniq])
        else:
            self.images = images[:2 * n]
            self.idx1, self.idx2 = rows1, rows2
        self.conditions = np.full(len(self.images), "as_is")
        if lighting == "protocol":
            self._probes_through_protocol(int(cfg.get("seed", 0)))
        self.pair_conditions = self.conditions[self.idx2]

    def extra_metrics(self) -> dict:
        return {"dropped_pairs": int(self.stats.get("dropped_pairs", 0))}


class LabelledVerification(PairVerification):
    """Verification and identification on any identity-labelled source: identity folders, an
    insightface RecordIO pack, tools/prepare.py output (e.g. paper B's illumination test set,
    whose items carry their condition), UTKFace-style sources — whatever `config.data` can name.

    Config (`config.evals.<name>`): type='labelled', data (a data config as `config.data`: name,
    root, size, split, ...; built by `lowlight.data.pipeline.make_source`), max_images (images
    cached, default 2000), per_identity (at most this many images of one identity, default 4),
    num_pairs (default 3000), seed, lighting ('as_is' or 'protocol', as `PairSetVerification`).

    Sampling (seeded, a pure function of the source's labels): identities in a random order,
    up to `per_identity` of each one's images, until `max_images`; then half the pairs are two
    images of one identity (identities with >= 2 cached images), half two identities. Every
    cached image takes part in identification (report: one gallery image per enrolled identity).
    Conditions come from the items' `condition` field when they have one (else 'as_is'); gender
    and ethnicity labels are kept when every item has them (UTKFace, the synthetic world), so
    the report's fairness tables run.
    """

    def __init__(self, name: str, cfg):
        from lowlight.data import pipeline

        self.name = name
        lighting = _real_set_lighting(name, cfg)
        if "data" not in cfg:
            raise ValueError(f"evals.{name}.data: expected a data config (name, root, size, ...)")
        seed = int(cfg.get("seed", 0))
        src = pipeline.make_source(cfg.data)
        labels = _identity_labels(src)
        rng = np.random.default_rng([seed, 7])
        uniq, inv = np.unique(labels, return_inverse=True)
        per = int(cfg.get("per_identity", 4))
        max_images = int(cfg.get("max_images", 2000))
        # item indices per identity, in index order (no Python loop over a large pack's labels)
        members = np.split(np.argsort(inv, kind="stable"), np.cumsum(np.bincount(inv))[:-1])
        chosen: list[int] = []
        for k in rng.permutation(len(uniq)):
            if len(chosen) >= max_images:
                break
            chosen += rng.permutation(members[k])[:min(per, max_images - len(chosen))].tolist()
        chosen_arr = np.asarray(chosen, np.int64)
        items = [src[int(i)] for i in chosen_arr]
        self.images = np.stack([np.asarray(it["image"]) for it in items])
        self.identity = inv[chosen_arr]
        self.conditions = np.asarray([str(it.get("condition", "as_is")) for it in items])
        for attr in ("gender", "ethnicity"):
            if all(attr in it for it in items):
                setattr(self, attr, np.asarray([int(it[attr]) for it in items], np.int64))
        self.source_index = chosen_arr
        self.idx1, self.idx2, self.issame = _sample_pairs(
            self.identity, int(cfg.get("num_pairs", 3000)), rng, name)
        if lighting == "protocol":
            self._probes_through_protocol(seed)
        self.pair_conditions = self.conditions[self.idx2]


def _identity_labels(src) -> np.ndarray:
    """Identity label of every item, without decoding images where the source allows it."""
    from lowlight.data.prepared import identities_of  # (re-exported; avoids an import cycle)

    for s in (src, getattr(src, "source", None)):  # RecordIO behind pipeline.IdentityPairs
        lab = getattr(s, "labels", None)
        if isinstance(lab, np.ndarray) and len(lab) == len(src):
            return lab
    return identities_of(src)


def _sample_pairs(identity: np.ndarray, num_pairs: int, rng, name: str):
    """(idx1, idx2, issame): half mated pairs (two rows of one identity), half non-mated."""
    by_id: dict[int, np.ndarray] = {}
    for k in np.unique(identity):
        by_id[int(k)] = np.flatnonzero(identity == k)
    multi = [k for k, rows in by_id.items() if len(rows) >= 2]
    if not multi or len(by_id) < 2:
        raise ValueError(f"evals.{name}: the sampled images have {len(by_id)} identities, "
                         f"{len(multi)} with >= 2 images; verification needs >= 2 identities "
                         "and one with >= 2 images (raise max_images / per_identity)")
    n_pos = num_pairs // 2
    i1, i2 = [], []
    for k in rng.choice(multi, n_pos):
        a, b = rng.choice(by_id[int(k)], 2, replace=False)
        i1.append(a)
        i2.append(b)
    n = len(identity)
    while len(i1) < num_pairs:
        a, b = rng.integers(0, n, 2)
        if identity[a] != identity[b]:
            i1.append(a)
            i2.append(b)
    issame = np.arange(num_pairs) < n_pos
    order = rng.permutation(num_pairs)  # contiguous folds mix both kinds
    return (np.asarray(i1, np.int64)[order], np.asarray(i2, np.int64)[order], issame[order])


def _real_set_lighting(name: str, cfg) -> str:
    """`cfg.lighting` of a real set: 'as_is' (default) or 'protocol'."""
    lighting = cfg.get("lighting", "as_is")
    if lighting not in ("as_is", "protocol"):
        raise ValueError(f"evals.{name}.lighting={lighting!r}; valid: as_is, protocol")
    return lighting


class _ImageList:
    """A list of images as a random-access source of {"image": ...} items."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i]}


EVALUATORS = {"synth_verification": SynthVerification, "pairs": PairSetVerification,
              "labelled": LabelledVerification}


def build(evals_cfg) -> dict:
    """{name: evaluator} from `config.evals` (a ConfigDict of per-evaluator configs)."""
    out = {}
    for name, cfg in (evals_cfg or {}).items():
        kind = cfg.get("type")
        if kind not in EVALUATORS:
            raise ValueError(f"unknown evaluator type evals.{name}.type={kind!r}; "
                             f"valid: {', '.join(EVALUATORS)}")
        out[name] = EVALUATORS[kind](name, cfg)
    return out
