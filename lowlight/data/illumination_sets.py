"""Dataset wrappers built from the illumination ops: paper A's DistortionFace / NaturalFace and
paper B's illumination-protocol test set, over any random-access source of face dicts.

Deterministic per item (random streams seeded by (seed, wrapper salt, index)), picklable, exact
proportions over a dataset. Re-exported by `lowlight.data.illumination`.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lowlight.data import conditions as cond
from lowlight.data.illumination import (
    DEFAULT_PROTOCOL,
    PAPER_B_MIX,
    ProtocolSpec,
    _check_mix,
    mixed,
    sample_condition_params,
    sample_simulate_params,
    simulate_low_light,
)

# ---------------------------------------------------------------------------------------------
# Dataset wrappers
# ---------------------------------------------------------------------------------------------


def exact_counts(n: int, fractions: Sequence[float]) -> np.ndarray:
    """Splits n items into len(fractions) integer counts by largest remainder (sum == n)."""
    f = np.asarray(fractions, np.float64) * n
    counts = np.floor(f).astype(np.int64)
    order = np.argsort(-(f - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    return counts


class _Wrapper:
    """Random-access view over `source` (items: dicts with an 'image' key)."""

    _salt = 0  # distinguishes the wrappers' random streams for the same seed

    def __init__(self, source: Any, seed: int = 0):
        if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
            raise TypeError(f"source: expected a random-access source with __len__ and "
                            f"__getitem__, got {type(source).__name__}")
        seed = operator.index(seed)
        if seed < 0:
            raise ValueError(f"seed: expected a non-negative integer, got {seed}")
        self.source = source
        self.seed = seed
        self._len = len(source)

    def __len__(self) -> int:
        return self._len

    def _index(self, i: Any) -> int:
        i = operator.index(i)
        if not -self._len <= i < self._len:
            raise IndexError(f"index {i} out of range for {type(self).__name__} of length "
                             f"{self._len}")
        return i % self._len

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self._salt, *keys])

    def _item(self, i: int) -> dict[str, Any]:
        item = self.source[i]
        if not isinstance(item, Mapping) or "image" not in item:
            raise TypeError(f"source[{i}]: expected a dict with an 'image' key, got "
                            f"{type(item).__name__}")
        return dict(item)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(len={self._len}, seed={self.seed})"


class DistortionFace(_Wrapper):
    """Paper A's DistortionFace: every image of `source` through the simulate module.

    Items gain `simulated=True` and `condition='low'`. `**ranges` are passed to
    `simulate_low_light` (defaults SIMULATE_RANGES). Deterministic per (seed, index); picklable.
    """

    _salt = 1

    def __init__(self, source: Any, seed: int = 0, **ranges: Any):
        super().__init__(source, seed)
        sample_simulate_params(np.random.default_rng(0), **ranges)  # validate now, not in workers
        self.ranges = dict(ranges)

    def is_simulated(self, i: int) -> bool:
        self._index(i)
        return True

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = self._index(i)
        item = self._item(i)
        if self.is_simulated(i):
            item["image"] = simulate_low_light(item["image"], self._rng(i), **self.ranges)
            item["simulated"], item["condition"] = True, cond.LOW
        else:
            item["simulated"] = False
            item["condition"] = cond.check(item.get("condition", cond.NORMAL))
        return item


class NaturalFace(DistortionFace):
    """Paper A's NaturalFace: exactly half of `source` (floor(N / 2) items) simulated.

    Which half is a seeded permutation of the indices, so the proportion is exact and the choice
    is the same in every process. Simulated items get `simulated=True`, `condition='low'`; the
    others keep the source's `condition` (or 'normal' if it has none) with `simulated=False`.
    """

    _salt = 2

    def __init__(self, source: Any, seed: int = 0, **ranges: Any):
        super().__init__(source, seed, **ranges)
        chosen = self._rng().permutation(self._len)[: self._len // 2]
        self._simulated = np.zeros(self._len, bool)
        self._simulated[chosen] = True

    def is_simulated(self, i: int) -> bool:
        return bool(self._simulated[self._index(i)])


class IlluminationProtocol(_Wrapper):
    """Paper B's custom illumination dataset (§4.2) over `source`, with an exact mix.

    Counts per bucket are `exact_counts(N, mix)` and the side-light count is split equally
    (± 1) over left/right/top/bottom; conditions are assigned to indices by a seeded permutation.
    Item i gets its parameters from `sample_condition_params(condition_i, rng(seed, i))` and is
    tagged `condition=condition_i`. Deterministic per (seed, index); picklable.
    """

    _salt = 3

    def __init__(self, source: Any, seed: int = 0, mix: Sequence[float] = PAPER_B_MIX,
                 spec: ProtocolSpec = DEFAULT_PROTOCOL):
        super().__init__(source, seed)
        self.mix = _check_mix(mix)
        self.spec = spec
        low, side, over = exact_counts(self._len, self.mix)
        per_side = exact_counts(int(side), [0.25] * 4)
        names = (cond.LOW, *cond.SIDE_CONDITIONS, cond.OVER)
        ordered = np.repeat([cond.index(n) for n in names], [low, *per_side, over])
        self._condition_ids = np.empty(self._len, np.int8)
        self._condition_ids[self._rng().permutation(self._len)] = ordered

    def condition(self, i: int) -> str:
        """The condition assigned to item i (without loading or transforming the image)."""
        return cond.CONDITIONS[self._condition_ids[self._index(i)]]

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = self._index(i)
        item = self._item(i)
        name = self.condition(i)
        params = sample_condition_params(name, self._rng(i), self.spec)
        item["image"] = mixed(item["image"], **params)
        item["condition"] = name
        return item
