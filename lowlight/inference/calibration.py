"""The verification threshold of a recognition run: "same person" iff cosine >= threshold.

A threshold only means something for the model it was chosen on, so it comes from the run
itself. Sources, the first that applies to the checkpoint step the pipeline loaded:

  1. `workdir/eval/<step>/scores.npz`, written by `python -m lowlight.evaluate`: the per-pair
     cosine scores and labels of the run's verification sets.
  2. `workdir/calibration.json`, cached by an earlier computation for that step and set.
  3. Computed now: the run's own synthetic validation pairs (`config.evals.synth_val`, or the
     recipe's default set at the run's image size when the run has no evaluators) embedded as
     the pipeline embeds faces — its relighting stage if it has one, then the recognition stage
     with flip test-time augmentation like `lowlight.evaluate` — and cached in calibration.json
     (skipped with a warning if the directory is read-only).

Rule: the threshold with the highest accuracy on those pairs, the largest among ties (the cosine
form of `lowlight.eval.verification.evaluate`'s "best_threshold"). Set preference: synth_val
(the synthetic world's mixed light), synth_illum, synth_clean, then any other. The pairs are
rendered, pre-aligned synthetic faces; on detected real photos the threshold is the same model's
operating point, not a guarantee of the same accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
from absl import logging

from lowlight.eval import verification

CACHE_FILE = "calibration.json"
CACHE_VERSION = 1
RULE = "best accuracy"
PREFERRED_SETS = ("synth_val", "synth_illum", "synth_clean")


@dataclasses.dataclass(frozen=True)
class Calibration:
    threshold: float   # accept when cosine >= threshold (+inf: the model rejects every pair)
    accuracy: float    # accuracy of that threshold on the calibration pairs
    set: str           # which verification set
    num_pairs: int
    step: int          # checkpoint step the scores came from
    source: str        # where: "eval/<step>/scores.npz", "calibration.json" or "computed"
    rule: str = RULE

    def describe(self) -> str:
        return (f"{self.rule} on {self.num_pairs} {self.set} pairs of step {self.step} "
                f"(accuracy {self.accuracy:.3f}; from {self.source})")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["threshold"] = _json_float(self.threshold)
        return d


def _json_float(x: float) -> float | str:
    return x if np.isfinite(x) else ("inf" if x > 0 else "-inf")


def best_threshold(scores, issame) -> tuple[float, float]:
    """(threshold, accuracy): the cosine threshold with the most correct decisions (accept iff
    score >= threshold), the largest one among ties; +inf if rejecting everything is best."""
    fpr, tpr, thresholds = verification.roc(scores, issame)
    issame = np.asarray(issame, bool)
    pos, neg = int(issame.sum()), int((~issame).sum())
    correct = np.round(tpr * pos + (1.0 - fpr) * neg)
    best = int(np.argmax(correct))
    return float(thresholds[best]), float(correct[best] / issame.size)


def _pick(names) -> str | None:
    names = list(names)
    for n in PREFERRED_SETS:
        if n in names:
            return n
    return sorted(names)[0] if names else None


def from_scores_file(workdir: str, step: int) -> Calibration | None:
    """The calibration from `eval/<step>/scores.npz`, if lowlight.evaluate wrote one."""
    rel = os.path.join("eval", str(step), "scores.npz")
    path = os.path.join(workdir, rel)
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        logging.warning("calibration: ignoring unreadable %s (%s)", path, e)
        return None
    name = _pick({k.split("/")[0] for k in data if k.endswith("/scores")
                  and k[:-len("scores")] + "issame" in data})
    if name is None:
        return None
    scores, issame = data[f"{name}/scores"], data[f"{name}/issame"].astype(bool)
    threshold, acc = best_threshold(scores, issame)
    return Calibration(threshold, acc, name, int(issame.size), step, rel)


def eval_set_config(config) -> tuple[str, dict]:
    """(name, config) of the synthetic verification set to calibrate on."""
    evals = {n: dict(c) for n, c in (config.get("evals") or {}).items()
             if dict(c).get("type") == "synth_verification"}
    name = _pick(evals)
    if name is not None:
        return name, evals[name]
    # the recipe's synth_val at cpu scale, at this run's image size
    return "synth_val", dict(type="synth_verification", seed=10_001, num_identities=150,
                             images_per_identity=4, size=int(config.data.size), num_pairs=1000,
                             lighting="mixed")


def _read_cache(workdir: str, step: int, name: str, key: dict) -> Calibration | None:
    path = os.path.join(workdir, CACHE_FILE)
    try:
        with open(path) as f:
            c = json.load(f)
        if (c.get("version") != CACHE_VERSION or c.get("step") != step
                or c.get("set") != name or c.get("key") != key):
            return None
        return Calibration(float(c["threshold"]), float(c["accuracy"]), name,
                           int(c["num_pairs"]), step, CACHE_FILE)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        logging.warning("calibration: ignoring unreadable %s (%s)", path, e)
        return None


def _write_cache(workdir: str, cal: Calibration, key: dict) -> None:
    path = os.path.join(workdir, CACHE_FILE)
    rec = {**cal.to_dict(), "version": CACHE_VERSION, "key": key}
    rec.pop("source")
    try:
        with open(path + ".tmp", "w") as f:
            json.dump(rec, f, indent=2, sort_keys=True)
        os.replace(path + ".tmp", path)
    except OSError as e:
        logging.warning("calibration: cannot cache in %s (%s); it is recomputed next time",
                        path, e)


def calibrate(recognition, relight=None) -> Calibration:
    """The threshold for a recognition `runs.Stage` whose input a relighting `runs.Stage`
    prepares, if given (as in the pipeline); see the module docstring for the sources.

    With a separate relighting stage the embeddings differ from the ones lowlight.evaluate
    scored, so its scores.npz is not used and the cache records the relighting run too.
    """
    run = recognition.run
    if relight is None:
        cal = from_scores_file(run.workdir, run.step)
        if cal is not None:
            return cal
    name, cfg = eval_set_config(run.config)
    key = {**cfg, "relight": None if relight is None else relight.run.describe()}
    cal = _read_cache(run.workdir, run.step, name, key)
    if cal is not None:
        return cal
    import ml_collections

    from lowlight.data.image_io import resize_square
    from lowlight.eval.evaluators import SynthVerification

    ev = SynthVerification(name, ml_collections.ConfigDict(cfg))
    resize = lambda ims, s: ims if ims.shape[1] == s else np.stack(
        [resize_square(im, s) for im in ims])
    images = ev.images
    if relight is not None:
        images = relight(resize(images, relight.size))["image"]
    emb = recognition(resize(images, recognition.size))["embedding"]
    scores = np.sum(emb[ev.idx1] * emb[ev.idx2], axis=1)
    threshold, acc = best_threshold(scores, ev.issame)
    cal = Calibration(threshold, acc, name, int(np.size(ev.issame)), run.step, "computed")
    _write_cache(run.workdir, cal, key)
    return cal
