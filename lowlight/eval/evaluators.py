"""Evaluators shared by the training loop and checkpoint evaluation.

A registry keyed by `config.evals.<name>.type`. Each evaluator is built once (it renders or
loads its data up front and caches it) and then `run(embed_fn)` returns `{metric: value}` with
keys prefixed by the evaluator's name, e.g. "synth_val/acc", "synth_val/tpr@fpr=1e-3".

`embed_fn(images_uint8 (N,H,W,3)) -> (N, D)` unit-norm numpy embeddings; `make_embed_fn` builds
one from a model and a mesh with a fixed jitted batch shape (padding the tail), so evaluation
never recompiles.
"""

from __future__ import annotations

import functools

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


class SynthVerification:
    """Verification on same/different-identity pairs of held-out synthetic people.

    Config (`config.evals.<name>`): type='synth_verification', num_pairs, seed (a world seed
    other than the training one: identities are functions of (seed, id), so another seed means
    other people), num_identities, images_per_identity, size, lighting:
      'normal'   every image under normal light,
      'mixed'    the synthetic world's own lighting mix (rendered low / side / over light),
      'protocol' normal-light renders passed through paper B's illumination protocol
                 (~30% low, 40% side, 30% over; `lowlight.data.illumination.IlluminationProtocol`).
    Metrics: `lowlight.eval.verification.evaluate` keys, plus `raw_pixel_acc` (same pairs,
    pixel baseline) computed once, `auc_ci_low` / `auc_ci_high` (95% stratified bootstrap over
    pairs, `BOOT_REPLICATES` replicates, seed `BOOT_SEED`: the same interval every run) and
    `tnr@fpr=1e-3` (`roc_stats.tnr_at`: 1 − FPR at the tpr@fpr=1e-3 operating point).

    Kept for reports (`lowlight.eval.report`): per cached image `images`, `conditions`,
    `identity`, `gender`, `ethnicity`; per pair `idx1`, `idx2` (into `images`), `issame`,
    `pair_conditions`; after `run()`, `last_scores` (cosine per pair) and `last_embeddings`
    (unit-norm, one row per cached image).
    """

    BOOT_REPLICATES = 200
    BOOT_SEED = 0

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
        self._raw = None
        self.last_scores = None
        self.last_embeddings = None

    def run(self, embed_fn) -> dict:
        from lowlight.eval import roc_stats, verification

        emb = embed_fn(self.images)
        res = verification.evaluate(emb[self.idx1], emb[self.idx2], self.issame)
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
            self._raw = verification.evaluate(raw[self.idx1], raw[self.idx2], self.issame)["acc"]
        out[f"{self.name}/raw_pixel_acc"] = self._raw
        return out


EVALUATORS = {"synth_verification": SynthVerification}


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
