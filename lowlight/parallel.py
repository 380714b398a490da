"""Device mesh, sharding rules and host-local -> global batches.

One mesh shape serves every task: `Mesh(devices, ('data', 'model'))` with Auto axes, so the
compiler (GSPMD) propagates shardings from the few places we pin them: the batch is split over
'data'; Partial FC class centres over 'model' (and optionally 'data'); everything else is
replicated. With one device this degenerates to plain single-device jit, so the same code runs on
a laptop, on 8 fake CPU devices in the tests and on a 64-GPU cluster.

BatchNorm note: under `jax.jit` with a batch sharded over 'data', `jnp.mean` over the batch axis
is a *global* mean (XLA inserts the all-reduce), so flax BatchNorm needs no `axis_name` and no
`pmean` of statistics. `tests/test_parallel.py` checks this on fake devices.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"
MODEL = "model"


def make_mesh(model_parallel: int = 1, devices=None) -> Mesh:
    """A ('data', 'model') mesh over `devices` (default: all) with `model_parallel` on 'model'.

    Devices are ordered as `jax.devices()` lists them (process-major), so each process's devices
    form contiguous rows of the 'data' axis and a host-local batch maps to a contiguous slice.
    """
    devices = np.asarray(devices if devices is not None else jax.devices())
    n = devices.size
    if model_parallel < 1 or n % model_parallel:
        raise ValueError(
            f"model_parallel={model_parallel} must divide the device count {n} "
            f"(valid: {[d for d in range(1, n + 1) if n % d == 0]})"
        )
    grid = devices.reshape(n // model_parallel, model_parallel)
    axis_types = (jax.sharding.AxisType.Auto,) * 2
    return Mesh(grid, (DATA, MODEL), axis_types=axis_types)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over 'data', the rest replicated (incl. over 'model')."""
    return NamedSharding(mesh, P(DATA))


def data_size(mesh: Mesh) -> int:
    return mesh.shape[DATA]


def global_batch(local_batch, mesh: Mesh):
    """Host-local numpy batch (each process its own slice) -> global jax.Arrays on the mesh.

    Non-array leaves (e.g. lists of condition names) are dropped: they cannot live on device and
    the step functions never need them.
    """
    sharding = batch_sharding(mesh)

    def put(x):
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return {k: put(v) for k, v in local_batch.items() if _is_numeric(v)}


def _is_numeric(x) -> bool:
    return isinstance(x, np.ndarray | jax.Array) and x.dtype != object and x.dtype.kind in "biuf"


def local_batch_size(global_batch_size: int) -> int:
    """This process's share of the global batch (checked divisible by the process count)."""
    pc = jax.process_count()
    if global_batch_size % pc:
        raise ValueError(f"batch_size={global_batch_size} is not divisible by {pc} processes")
    return global_batch_size // pc


def tree_shardings(tree, sharding):
    """The same `sharding` for every leaf of `tree` (shapes-first init helper)."""
    return jax.tree.map(lambda _: sharding, tree)


def param_bytes(tree) -> int:
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))
