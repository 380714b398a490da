"""Model size, latency and throughput of any ``fn(x)`` (paper B §4.3 Eq. 17, Tables 12, 14).

Paper B reports "average inference latency" = total inference time / number of images at batch
size 1 (1000 test images on an RTX 3090), and "model size" = number of parameters × storage
precision. Definitions used here:

- ``param_count``: number of scalars in the ``params`` collection (trainable weights).
- ``tree_bytes``: Σ size·itemsize over a pytree's array leaves, at their actual dtypes.
  "size_bytes" = bytes of ``params`` + bytes of ``batch_stats`` (BatchNorm running statistics,
  which a deployed model must ship too); other collections are reported but not added.
- latency: ``fn(x)`` at batch 1, each call followed by ``jax.block_until_ready`` on its output
  (JAX dispatch is asynchronous: without it one would time the dispatch, not the compute),
  timed with ``time.perf_counter`` per call, after ``warmup`` untimed calls (the first one
  compiles); reported as mean, median, p95 (``np.percentile`` linear interpolation) and std
  over ``runs`` (>= 200 by default) calls, in milliseconds. Eq. 17's average latency is the
  mean.
- throughput: images per second at batch 64 = 64 · runs / total wall time of ``runs``
  back-to-back blocked calls after warm-up.
The input is ``example`` (any pytree of arrays with a leading batch axis); its first item is
repeated to build the batch-1 and batch-64 inputs. Pass a ``jax.jit``-ed ``fn`` (or
``jit=True``) to time compiled code; timings on a shared CPU are indicative only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["latency", "model_size", "param_count", "profile", "throughput", "tree_bytes"]


def param_count(tree: Any) -> int:
    """Number of scalars in the array leaves of ``tree`` (e.g. ``variables["params"]``)."""
    return int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(tree)))


def tree_bytes(tree: Any) -> int:
    """Bytes of the array leaves of ``tree`` at their dtypes (size × itemsize)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return int(sum(np.size(x) * np.dtype(x.dtype).itemsize for x in leaves))


def model_size(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Size of flax ``variables`` ({"params": ..., "batch_stats": ..., ...}).

    Returns:
      "params" (count), "param_bytes", "batch_stats" (count), "batch_stats_bytes",
      "size_bytes" (params + batch_stats bytes), "size_mib" (size_bytes / 2**20),
      "other_bytes" (any other collections, not in size_bytes).
    """
    params = variables.get("params", {})
    stats = variables.get("batch_stats", {})
    other = {k: v for k, v in variables.items() if k not in ("params", "batch_stats")}
    pb, sb = tree_bytes(params), tree_bytes(stats)
    return {
        "params": param_count(params),
        "param_bytes": pb,
        "batch_stats": param_count(stats),
        "batch_stats_bytes": sb,
        "size_bytes": pb + sb,
        "size_mib": (pb + sb) / 2**20,
        "other_bytes": tree_bytes(other),
    }


def _batch_of(example: Any, n: int) -> Any:
    return jax.tree_util.tree_map(lambda a: jnp.repeat(jnp.asarray(a)[:1], n, axis=0), example)


def _timed(fn: Callable[[Any], Any], x: Any, runs: int, warmup: int) -> np.ndarray:
    if runs < 1:
        raise ValueError("runs must be >= 1")
    for _ in range(max(warmup, 1)):  # at least one: the compile is never timed
        jax.block_until_ready(fn(x))
    times = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x))
        times[i] = time.perf_counter() - t0
    return times


def latency(fn: Callable[[Any], Any], example: Any, *, runs: int = 200, warmup: int = 10
            ) -> dict[str, float]:
    """Batch-1 latency of ``fn`` in ms: "latency_ms_mean", "latency_ms_median",
    "latency_ms_p95", "latency_ms_std", "latency_runs" (module docstring)."""
    t = _timed(fn, _batch_of(example, 1), runs, warmup) * 1e3
    return {
        "latency_ms_mean": float(t.mean()),
        "latency_ms_median": float(np.median(t)),
        "latency_ms_p95": float(np.percentile(t, 95)),
        "latency_ms_std": float(t.std()),
        "latency_runs": int(runs),
    }


def throughput(fn: Callable[[Any], Any], example: Any, *, batch_size: int = 64, runs: int = 20,
               warmup: int = 3) -> dict[str, float]:
    """Images per second at ``batch_size``: "throughput_per_s", "throughput_batch",
    "throughput_runs" (module docstring)."""
    t = _timed(fn, _batch_of(example, batch_size), runs, warmup)
    return {
        "throughput_per_s": float(batch_size * runs / t.sum()),
        "throughput_batch": int(batch_size),
        "throughput_runs": int(runs),
    }


def profile(
    fn: Callable[[Any], Any],
    example: Any,
    *,
    variables: Mapping[str, Any] | None = None,
    jit: bool = False,
    runs: int = 200,
    warmup: int = 10,
    batch_size: int = 64,
    throughput_runs: int = 20,
) -> dict[str, Any]:
    """Everything at once: ``model_size(variables)`` keys (if given), ``latency`` at batch 1
    and ``throughput`` at ``batch_size``, plus "backend" (``jax.default_backend()``).

    Example::

        variables = model.init(key, x)
        fn = jax.jit(lambda x: model.apply(variables, x, train=False))
        efficiency.profile(fn, x, variables=variables)
    """
    if jit:
        fn = jax.jit(fn)
    out: dict[str, Any] = {"backend": jax.default_backend()}
    if variables is not None:
        out.update(model_size(variables))
    out.update(latency(fn, example, runs=runs, warmup=warmup))
    out.update(throughput(fn, example, batch_size=batch_size, runs=throughput_runs, warmup=3))
    return out
