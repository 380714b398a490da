"""Mesh construction, global batches, and BatchNorm statistics under a sharded jit."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from lowlight import parallel


def test_mesh_shapes_and_errors():
    assert jax.device_count() == 8
    m = parallel.make_mesh(2)
    assert dict(m.shape) == {"data": 4, "model": 2}
    with pytest.raises(ValueError, match=r"model_parallel=3 must divide the device count 8"):
        parallel.make_mesh(3)


def test_global_batch_is_sharded_over_data_and_drops_strings():
    mesh = parallel.make_mesh(2)
    local = {"image": np.arange(8 * 4, dtype=np.uint8).reshape(8, 4),
             "label": np.arange(8), "condition": np.array(["low"] * 8)}
    g = parallel.global_batch(local, mesh)
    assert set(g) == {"image", "label"}
    assert g["image"].sharding.spec == jax.sharding.PartitionSpec("data")
    np.testing.assert_array_equal(np.asarray(g["image"]), local["image"])
    # each of the 4 data shards holds 2 rows
    assert {s.data.shape for s in g["image"].addressable_shards} == {(2, 4)}


def test_batchnorm_uses_global_batch_statistics_under_sharded_jit():
    """With the batch split over 8 devices, BN still normalises with the *global* mean/var —
    no axis_name or pmean needed (the reason models carry no cross-device code)."""
    mesh = parallel.make_mesh(1)
    bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
    rng = np.random.default_rng(0)
    # Per-device sub-batches with very different means: local stats would differ a lot.
    x = (rng.normal(size=(16, 3)) + np.repeat(np.arange(8), 2)[:, None] * 10).astype(np.float32)
    variables = bn.init(jax.random.key(0), x)

    def apply(v, x):
        return bn.apply(v, x, mutable=["batch_stats"])

    sharded = jax.jit(apply, in_shardings=(parallel.replicated(mesh),
                                          parallel.batch_sharding(mesh)))
    y, new = sharded(variables, jax.device_put(x, parallel.batch_sharding(mesh)))
    expected = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(new["batch_stats"]["mean"]), 0.1 * x.mean(0), rtol=1e-5)
