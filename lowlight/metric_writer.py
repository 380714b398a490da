"""Metrics out: `workdir/metrics.jsonl` (one JSON object per line, always with "step") and
TensorBoard event files under `workdir/tb/`. Only process 0 writes; others get a no-op writer.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np


def _to_py(v):
    if isinstance(v, jax.Array | np.ndarray | np.generic):
        v = np.asarray(v)
        return v.item() if v.size == 1 else v.tolist()
    return v


class MetricWriter:
    def __init__(self, workdir: str, *, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            if tensorboard:
                try:
                    from tensorboardX import SummaryWriter

                    self._tb = SummaryWriter(os.path.join(workdir, "tb"))
                except ImportError:  # optional dependency
                    self._tb = None

    def write(self, step: int, metrics: dict) -> dict:
        """Appends one line {"step": step, **metrics}; returns the python-typed record."""
        rec = {"step": int(step)}
        rec.update({k: _to_py(v) for k, v in metrics.items()})
        if not self.enabled:
            return rec
        rec.setdefault("time", time.time())
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, allow_nan=True) + "\n")
        if self._tb is not None:
            for k, v in rec.items():
                if k not in ("step", "time") and isinstance(v, int | float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, int(step))
            self._tb.flush()
        return rec

    def close(self):
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    """All records of `workdir/metrics.jsonl` (empty list if none)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
