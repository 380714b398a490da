"""Paper B §4.2's custom illumination test set, built from any verification / identity source:
N sampled faces kept as they are plus N transformed by the illumination protocol (gamma,
contrast, directional light, mixed; ~30% low / 40% side / 30% over), each tagged with its
condition, with no identity overlap with a training set. Written by `tools/prepare.py
--derive=illumination_test`; re-exported by `lowlight.data.prepared`.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from lowlight.data import conditions as cond
from lowlight.data.prepared import PreparedSource, as_item

# ---------------------------------------------------------------------------------------------
# Paper B §4.2: the custom illumination test set
# ---------------------------------------------------------------------------------------------


class Subset:
    """Items `indices` of `source` (tagged `source_index` = the index in `source`)."""

    def __init__(self, source: Any, indices: Sequence[int]):
        self.source = source
        self.indices = np.asarray(indices, np.int64).reshape(-1)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        j = int(self.indices[operator.index(i)])
        item = as_item(self.source[j])
        item.setdefault("source_index", j)
        return item

    def __getattr__(self, name: str):
        if name == "render_batch" and hasattr(self.__dict__.get("source"), "render_batch"):
            return self._render_batch  # keep the synthetic world's vectorised path
        raise AttributeError(name)

    def _render_batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        idx = self.indices[np.asarray(indices, np.int64)]
        return {**self.source.render_batch(idx), "source_index": idx}


class PairImages:
    """The distinct images of a verification pair set (items image1 / image2 / issame / pair,
    as `verification_sets.VerificationBin` / `LFWPairs` give), as a source of single images.

    Item j -> dict(image, pair, pair_position (0 or 1)) plus `identity` and `path` when the set
    names its files (LFW: the identity is the person's folder). An image used by several pairs
    (LFW) is kept once: duplicates are found by a hash of the pixels, so the index is a pure
    function of the set. insightface .bin files carry no identities, so a test set sampled from
    one cannot be checked for identity overlap with training (`illumination_test_set` refuses).
    """

    def __init__(self, pairs: Any):
        import hashlib

        self.pairs = pairs
        files, kept = getattr(pairs, "files", None), None
        self.refs: list[tuple[int, int]] = []
        self.names: list[str] = []
        seen = set()
        for i in range(len(pairs)):
            item = pairs[i]
            if kept is None and files is not None:
                kept = np.asarray(getattr(pairs, "pair_index", np.arange(len(pairs))))
            for pos in (0, 1):
                a = np.ascontiguousarray(item[f"image{pos + 1}"])
                h = hashlib.sha1(str(a.shape).encode() + a.tobytes()).digest()
                if h in seen:
                    continue
                seen.add(h)
                self.refs.append((i, pos))
                if files is not None:
                    self.names.append(files[2 * int(kept[i]) + pos])
        #: identity of each image (the first path component of its file name), if named
        self.identities = [n.split("/")[0] if "/" in n else n.rsplit("_", 1)[0]
                           for n in self.names] if self.names else None

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, j: int) -> dict[str, Any]:
        i, pos = self.refs[operator.index(j)]
        item = self.pairs[i]
        out = {"image": item[f"image{pos + 1}"], "pair": int(item.get("pair", i)),
               "pair_position": pos}
        if self.names:
            out["identity"], out["path"] = self.identities[j], self.names[j]
        return out


def identities_of(source: Any, key: str = "identity", progress: bool = False) -> np.ndarray:
    """Identity labels of every item of `source`, as strings (for cross-dataset comparison).

    Cheap when the source can tell without decoding images (PreparedSource columns, the synthetic
    world, index-preserving wrappers, an `identities` attribute); otherwise reads every item.
    """
    from lowlight.data import illumination  # noqa: F401  (imports illumination_sets safely)
    from lowlight.data.illumination_sets import _Wrapper
    from lowlight.data.synthetic import SynthFaces

    while isinstance(source, _Wrapper):  # DistortionFace & co. keep indices and labels
        source = source.source
    if isinstance(source, PreparedSource):
        ids = source.column(key)
    elif isinstance(source, SynthFaces) and key == "identity":
        ids = np.arange(len(source)) // source.images_per_identity
    elif isinstance(source, Subset):
        ids = identities_of(source.source, key)[source.indices]
    elif key == "identity" and getattr(source, "identities", None) is not None:
        ids = np.asarray(source.identities)
    else:
        from tqdm import tqdm

        ids = []
        for i in tqdm(range(len(source)), desc=f"reading {key}", disable=not progress):
            item = as_item(source[i])
            if key not in item:
                raise KeyError(f"items have no {key!r} field (fields: {sorted(item)}): cannot "
                               f"check identity overlap; pass identity_key=")
            ids.append(item[key])
    return np.asarray([str(x) for x in np.asarray(ids).tolist()], dtype=object)


class IlluminationTestSet:
    """Paper B §4.2 custom illumination test set over a verification source.

    Items [0, len(clean)) are source items `clean` untouched, tagged condition 'normal'; the
    rest are source items `transformed` through `IlluminationProtocol` (exact low / side / over
    mix, side split evenly over the four directions), tagged with the protocol's condition. Every
    item gains `condition_id`, `transformed` and `source_index`. Deterministic; picklable.
    """

    def __init__(self, source: Any, clean: Sequence[int], transformed: Sequence[int],
                 seed: int = 0, mix: Sequence[float] | None = None):
        from lowlight.data.illumination import PAPER_B_MIX, IlluminationProtocol

        self.clean = Subset(source, clean)
        self.protocol = IlluminationProtocol(Subset(source, transformed), seed,
                                             PAPER_B_MIX if mix is None else mix)

    def __len__(self) -> int:
        return len(self.clean) + len(self.protocol)

    def condition(self, i: int) -> str:
        """Condition tag of item i, without reading it."""
        i = operator.index(i)
        n = len(self.clean)
        return cond.NORMAL if i < n else self.protocol.condition(i - n)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = operator.index(i)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for IlluminationTestSet of length "
                             f"{len(self)}")
        n = len(self.clean)
        item = self.clean[i] if i < n else self.protocol[i - n]
        if i < n:
            item["condition"] = cond.NORMAL
        item["condition_id"] = cond.index(item["condition"])
        item["transformed"] = i >= n
        return item


def illumination_test_set(source: Any, *, num_clean: int = 5000, num_transformed: int = 5000,
                          seed: int = 0, paired: bool = True, mix: Sequence[float] | None = None,
                          identity_key: str = "identity",
                          exclude_identities: Iterable[Any] | None = None,
                          training_source: Any = None, on_overlap: str = "drop",
                          progress: bool = False) -> tuple[IlluminationTestSet, dict[str, Any]]:
    """Samples paper B's §4.2 test set from a verification source (defaults: the paper's sizes).

    Paper B keeps the test identities out of training. Pass the training identities
    (`exclude_identities`, compared as strings) and/or a `training_source` to collect them from;
    items of those identities are dropped before sampling (`on_overlap='drop'`, counted in the
    report) or make this raise (`'refuse'`).

    Args:
      source: verification source (items with `image` and, for the overlap check, `identity_key`).
      num_clean: sampled images kept untouched (condition 'normal').
      num_transformed: images passed through the protocol (~30% low / 40% side / 30% over).
      seed: sampling and protocol seed.
      paired: transform the same images that are kept clean (the first num_transformed of the
        sample), so each transformed image has its clean twin; False samples disjoint images.
      mix: (low, side, over) fractions, default paper B's (0.3, 0.4, 0.3).

    Returns:
      (the test set, a JSON-able report: sizes, condition counts, overlap check).
    """
    if on_overlap not in ("drop", "refuse"):
        raise ValueError(f"on_overlap: expected 'drop' or 'refuse', got {on_overlap!r}")
    num_clean, num_transformed = operator.index(num_clean), operator.index(num_transformed)
    if num_clean < 0 or num_transformed < 0 or num_clean + num_transformed == 0:
        raise ValueError(f"num_clean / num_transformed: expected >= 0, not both 0, got "
                         f"{num_clean} / {num_transformed}")
    eligible = np.arange(len(source), dtype=np.int64)
    report: dict[str, Any] = {"source_len": len(source), "seed": seed, "paired": paired}
    excluded = {str(x) for x in (exclude_identities or ())}
    if training_source is not None:
        excluded |= set(identities_of(training_source, identity_key, progress).tolist())
    if exclude_identities is not None or training_source is not None:
        ids = identities_of(source, identity_key, progress)
        overlap = np.isin(ids, np.asarray(sorted(excluded), dtype=object))
        names = sorted(set(ids[overlap].tolist()))
        report["identity_check"] = {"key": identity_key, "excluded_identities": len(excluded),
                                    "overlapping_identities": len(names),
                                    "dropped_items": int(overlap.sum()), "on_overlap": on_overlap,
                                    "examples": names[:20]}
        if overlap.any() and on_overlap == "refuse":
            raise ValueError(f"{int(overlap.sum())} items of {len(names)} identities of the "
                             f"verification set are training identities (e.g. {names[:5]}); "
                             f"paper B's test set must not share identities with training")
        eligible = eligible[~overlap]
    else:
        report["identity_check"] = "not requested (no exclude_identities / training_source)"
    need = max(num_clean, num_transformed) if paired else num_clean + num_transformed
    if need > len(eligible):
        raise ValueError(f"need {need} distinct images ({num_clean} clean + {num_transformed} "
                         f"transformed, paired={paired}) but only {len(eligible)} are eligible; "
                         f"lower num_clean / num_transformed")
    pick = np.random.default_rng([seed, 0x11E5]).choice(eligible, need, replace=False)
    clean = np.sort(pick[:num_clean])
    transformed = np.sort(pick[:num_transformed] if paired else pick[num_clean:])
    ts = IlluminationTestSet(source, clean, transformed, seed, mix)
    report.update(num_clean=num_clean, num_transformed=num_transformed,
                  mix=list(ts.protocol.mix), condition_counts=dict(sorted(Counter(
                      ts.condition(i) for i in range(len(ts))).items())))
    return ts, report
