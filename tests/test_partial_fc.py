"""Partial FC on 8 fake CPU devices: parity with an unsharded reference, sampling, HLO layout."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lowlight.losses import partial_fc as pfc

B, D = 24, 20  # sizes chosen distinct from every class count below, so HLO shapes are unambiguous


def _mesh(data, model):
    devices = np.array(jax.devices()[: data * model]).reshape(data, model)
    return Mesh(devices, ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def arcface_ref(cos, labels, s=64.0, m=0.5):
    """Additive angular margin, one-hot form (no gather along classes); label -1: no margin."""
    onehot = labels[:, None] == jnp.arange(cos.shape[1])[None, :]
    theta = jnp.arccos(jnp.clip(cos, -1.0 + 1e-7, 1.0 - 1e-7))
    return jnp.where(onehot, jnp.cos(theta + m), cos) * s


def arcface_with_aux(cos, labels):
    return arcface_ref(cos, labels), {"mean_cos": jnp.mean(cos)}


def _data(c, seed=0, labels=None):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    emb = jax.random.normal(k1, (B, D), jnp.float32)
    if labels is None:
        labels = jax.random.randint(k2, (B,), 0, c)
    return emb, jnp.asarray(labels, jnp.int32), k3


def _reference(emb, labels, centers, cols, margin_fn=arcface_ref):
    """Plain single-device softmax CE over the centre rows `cols` (global ids, numpy)."""
    cols = np.asarray(cols)
    lab = np.asarray(labels)
    remap = np.array([int(np.flatnonzero(cols == y)[0]) if y in cols else -1 for y in lab])

    def loss(emb, centers):
        e = emb / jnp.linalg.norm(emb, axis=1, keepdims=True)
        w = centers[cols]
        w = w / jnp.linalg.norm(w, axis=1, keepdims=True)
        logp = jax.nn.log_softmax(margin_fn(e @ w.T, jnp.asarray(remap)), axis=1)
        keep = remap >= 0
        picked = logp[np.arange(len(lab))[keep], remap[keep]]
        return -jnp.mean(picked)

    dev = jax.devices()[0]
    emb, centers = jax.device_put(np.asarray(emb), dev), jax.device_put(np.asarray(centers), dev)
    val, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(emb, centers)
    return float(val), grads, remap


def _numpy_loss(emb, labels, centers, cols, s=64.0, m=0.5):
    """Float64 numpy forward of the same loss (independent of jax)."""
    emb, centers, cols = np.float64(emb), np.float64(centers), np.asarray(cols)
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    w = centers[cols] / np.linalg.norm(centers[cols], axis=1, keepdims=True)
    cos = e @ w.T
    tgt = np.array([np.flatnonzero(cols == y)[0] for y in np.asarray(labels)])
    rows = np.arange(len(tgt))
    logits = cos * s
    logits[rows, tgt] = np.cos(np.arccos(np.clip(cos[rows, tgt], -1 + 1e-7, 1 - 1e-7)) + m) * s
    mx = logits.max(1, keepdims=True)
    lse = np.log(np.exp(logits - mx).sum(1)) + mx[:, 0]
    return float(np.mean(lse - logits[rows, tgt]))


def _run(
    emb, labels, centers, key, *, mesh, class_axes, num_classes, sample_rate, margin_fn=arcface_ref
):
    """value_and_grad of partial_fc_loss under jit with production-like input shardings."""
    if mesh is not None:
        row = NamedSharding(mesh, P("data"))
        emb, labels = jax.device_put(emb, row), jax.device_put(labels, row)
        centers = jax.device_put(centers, pfc.centers_sharding(mesh, class_axes))

    def f(emb, centers, labels, key):
        return pfc.partial_fc_loss(
            emb,
            labels,
            centers,
            key=key,
            sample_rate=sample_rate,
            margin_fn=margin_fn,
            mesh=mesh,
            class_axes=class_axes,
            num_classes=num_classes,
        )

    step = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
    (loss, aux), grads = step(emb, centers, labels, key)
    return float(loss), aux, grads, step, (emb, centers, labels, key)


MESHES = [
    ((1, 8), ("model",)),
    ((2, 4), ("model",)),
    ((2, 4), ("data", "model")),
    ((8, 1), ("data",)),
]


def test_init_and_sharding_helpers():
    mesh = _mesh(2, 4)
    n = pfc.num_class_shards(mesh, ("data", "model"))
    w = pfc.init_centers(jax.random.key(0), 1001, 64, multiple_of=n)
    assert n == 8 and w.shape == (1008, 64) and w.dtype == jnp.float32
    assert abs(float(jnp.std(w)) - 0.01) < 1e-3
    assert pfc.centers_sharding(mesh, ("data", "model")).spec == P(("data", "model"), None)
    assert pfc.centers_sharding(mesh).spec == P(("model",), None)
    assert pfc.num_sampled_per_shard(100, 10, 0.3) == 3  # not 4 from 0.3 * 10 = 3.0000000004
    assert pfc.num_sampled_per_shard(100, 4, 0.3) == 8  # ceil(7.5)
    with pytest.raises(ValueError, match="multiple_of=4"):
        pfc.partial_fc_loss(
            jnp.ones((B, D)),
            jnp.zeros((B,), jnp.int32),
            jnp.ones((30, D)),
            key=None,
            sample_rate=1.0,
            margin_fn=arcface_ref,
            mesh=_mesh(1, 4),
        )


@pytest.mark.parametrize("shape,class_axes", MESHES)
def test_full_fc_matches_unsharded_reference(shape, class_axes):
    """r = 1: exact model-parallel FC; C = 250 is padded to 256 (padding must be invisible)."""
    c = 250
    mesh = _mesh(*shape)
    n = pfc.num_class_shards(mesh, class_axes)
    centers = pfc.init_centers(jax.random.key(1), c, D, multiple_of=n)
    emb, labels, key = _data(c)
    loss, aux, (g_emb, g_w), _, _ = _run(
        emb, labels, centers, key, mesh=mesh, class_axes=class_axes, num_classes=c, sample_rate=1.0
    )
    ref, (r_emb, r_w), _ = _reference(emb, labels, centers, np.arange(c))
    np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss, _numpy_loss(emb, labels, centers, np.arange(c)), rtol=1e-5)
    np.testing.assert_allclose(g_emb, r_emb, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_w, r_w, rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(g_w)[c:])  # padded centres get no gradient
    assert g_w.sharding.is_equivalent_to(pfc.centers_sharding(mesh, class_axes), 2)
    assert aux["num_sampled"] == centers.shape[0] and int(aux["dropped_positives"]) == 0
    np.testing.assert_array_equal(aux["remapped_labels"], labels)


def test_no_mesh_and_margin_aux():
    c = 40
    centers = pfc.init_centers(jax.random.key(2), c, D)
    emb, labels, key = _data(c, seed=3)
    loss, aux, (g_emb, _), _, _ = _run(
        emb,
        labels,
        centers,
        key,
        mesh=None,
        class_axes=(),
        num_classes=c,
        sample_rate=1.0,
        margin_fn=arcface_with_aux,
    )
    ref, (r_emb, _), _ = _reference(emb, labels, centers, np.arange(c))
    np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_emb, r_emb, rtol=1e-5, atol=1e-5)
    assert set(aux["margin_aux"]) == {"mean_cos"}
    # accuracy = top-1 of the margin logits (ties impossible with random floats)
    e = emb / jnp.linalg.norm(emb, axis=1, keepdims=True)
    cos = e @ (centers / jnp.linalg.norm(centers, axis=1, keepdims=True)).T
    acc = np.mean(np.argmax(np.asarray(arcface_ref(cos, labels)), 1) == np.asarray(labels))
    np.testing.assert_allclose(float(aux["accuracy"]), acc)


def _numpy_sample(key, labels, n, c_local, c, k):
    """Independent reconstruction of the per-shard top-k (same uniform draws, numpy logic)."""
    scores = np.asarray(jax.random.uniform(key, (n, c_local), jnp.float32)).copy()
    gid = np.arange(n * c_local).reshape(n, c_local)
    scores[gid >= c] = -1.0
    for y in np.asarray(labels):
        scores[y // c_local, y % c_local] = 2.0
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(gid, order, 1)  # (n, k) global ids (padding ids >= c)


@pytest.mark.parametrize(
    "shape,class_axes,c,rate",
    [
        ((2, 4), ("data", "model"), 250, 0.3),
        ((1, 8), ("model",), 61, 0.9),  # last shard has 5 real classes < k = 8: padding fills it
        ((2, 4), ("model",), 61, 0.5),
    ],
)
def test_sampled_matches_reference_on_subset(shape, class_axes, c, rate):
    mesh = _mesh(*shape)
    n = pfc.num_class_shards(mesh, class_axes)
    centers = pfc.init_centers(jax.random.key(4), c, D, multiple_of=n)
    c_local = centers.shape[0] // n
    k = pfc.num_sampled_per_shard(centers.shape[0], n, rate)
    assert k < c_local or rate > 0.5
    emb, labels, _ = _data(c, seed=5)
    key = jax.random.key(123)
    loss, aux, (g_emb, g_w), _, _ = _run(
        emb, labels, centers, key, mesh=mesh, class_axes=class_axes, num_classes=c, sample_rate=rate
    )

    expect = _numpy_sample(key, labels, n, c_local, c, k)
    got = np.asarray(aux["sampled_classes"]).reshape(n, k)
    assert aux["num_sampled"] == n * k
    for s in range(n):
        real = expect[s][expect[s] < c]
        assert sorted(got[s][got[s] >= 0]) == sorted(real)  # same subset, exactly k per shard
        assert np.sum(got[s] == -1) == k - len(real)  # padding only where a shard runs short
        n_real = min(c_local, max(0, c - s * c_local))
        assert len(real) == min(k, n_real)
    cols = got[got >= 0]
    assert set(np.asarray(labels)) <= set(cols)  # every positive sampled
    assert int(aux["dropped_positives"]) == 0 and int(aux["dropped_samples"]) == 0

    ref, (r_emb, r_w), remap = _reference(emb, labels, centers, cols)
    np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_emb, r_emb, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_w, r_w, rtol=1e-5, atol=1e-5)
    unsampled = np.setdiff1d(np.arange(centers.shape[0]), cols)
    assert not np.any(np.asarray(g_w)[unsampled])  # only sampled centres get gradient
    remapped = np.asarray(aux["remapped_labels"])
    np.testing.assert_array_equal(np.asarray(aux["sampled_classes"])[remapped], labels)


def test_dropped_positives_counted():
    """8 shards of 8 classes, k = 2: shard 0 holds 4 positive classes -> 2 dropped."""
    c, mesh = 64, _mesh(1, 8)
    centers = pfc.init_centers(jax.random.key(6), c, D, multiple_of=8)
    labels = [0, 1, 2, 3, 3, 9, 20, 40, 0, 63, -1, 8] + [8, 9] * 6
    emb, labels, _ = _data(c, seed=7, labels=labels)
    loss, aux, _, _, _ = _run(
        emb,
        labels,
        centers,
        jax.random.key(8),
        mesh=mesh,
        class_axes=("model",),
        num_classes=c,
        sample_rate=0.25,
    )
    assert int(aux["dropped_positives"]) == 2
    # ties among positives keep the lowest ids: classes 2 and 3 (rows 2, 3, 4) are dropped;
    # the ignored row (-1) is neither counted nor in the loss.
    assert int(aux["dropped_samples"]) == 3
    remapped = np.asarray(aux["remapped_labels"])
    np.testing.assert_array_equal(remapped[[2, 3, 4, 10]], -1)
    cols = np.asarray(aux["sampled_classes"])
    ref, _, ref_remap = _reference(emb, labels, centers, cols[cols >= 0])
    np.testing.assert_array_equal(ref_remap >= 0, remapped >= 0)
    np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-5)

    _, aux2, _, _, _ = _run(
        emb,
        labels,
        centers,
        jax.random.key(8),
        mesh=mesh,
        class_axes=("model",),
        num_classes=c,
        sample_rate=0.5,
    )
    assert int(aux2["dropped_positives"]) == 0 and int(aux2["dropped_samples"]) == 0


# ------------------------------------------------------------------------------ compiled HLO
_COLLECTIVE = re.compile(
    r"=\s*(.*?)\s(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
    r"(-start)?\("
)
_SHAPE = re.compile(r"[a-z]\w*\[([\d,]*)\]")


def _full_class_collectives(hlo, n, c_local, k):
    """Collectives whose output holds the whole class axis of logits, scores or indices."""
    full = {n * c_local, n * k}
    bad = []
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        if not m:
            continue
        for dims in _SHAPE.findall(m.group(1)):
            dims = [int(d) for d in dims.split(",") if d]
            if full & set(dims) or any(
                dims[i : i + 2] in ([n, c_local], [n, k]) for i in range(len(dims) - 1)
            ):
                bad.append(line.strip()[:160])
    return bad


def _dot_shapes(hlo):
    return {
        tuple(int(d) for d in m.split(",") if d)
        for m in re.findall(r"f32\[([\d,]*)\]\S*\s+dot\(", hlo)
    }


@pytest.mark.parametrize(
    "shape,class_axes,rate",
    [
        ((1, 8), ("model",), 1.0),
        ((2, 4), ("data", "model"), 0.5),
        ((2, 4), ("model",), 0.5),
    ],
)
def test_compiled_hlo_keeps_logits_sharded(shape, class_axes, rate):
    c = 296  # 8 * 37 = 4 * 74; k = 19 (n=8) or 37 (n=4): none equals B or D
    mesh = _mesh(*shape)
    n = pfc.num_class_shards(mesh, class_axes)
    c_local = c // n
    k = pfc.num_sampled_per_shard(c, n, rate)
    rows = B // math.prod(mesh.shape[a] for a in mesh.axis_names if a not in class_axes)
    centers = pfc.init_centers(jax.random.key(0), c, D, multiple_of=n)
    emb, labels, key = _data(c)
    _, _, _, step, args = _run(
        emb, labels, centers, key, mesh=mesh, class_axes=class_axes, num_classes=c, sample_rate=rate
    )
    hlo = step.lower(*args).compile().as_text()
    assert _full_class_collectives(hlo, n, c_local, k) == []
    dots = _dot_shapes(hlo)
    assert (rows, k) in dots  # per-device logits: (B / row shards, k)
    assert not any(n * k in s or c in s for s in dots)  # no device computes all columns


def test_hlo_check_catches_gathered_logits_and_topk(monkeypatch):
    """Negative controls: the detector above does fire on the layouts it is meant to forbid."""
    c, mesh, rate = 296, _mesh(1, 8), 0.5
    centers = pfc.init_centers(jax.random.key(0), c, D, multiple_of=8)
    emb, labels, key = _data(c)

    def gathering_margin(cos, labels):  # forces the (B, K) logits onto every device
        cos = jax.lax.with_sharding_constraint(cos, NamedSharding(mesh, P()))
        return arcface_ref(cos, labels)

    _, _, _, step, args = _run(
        emb,
        labels,
        centers,
        key,
        mesh=mesh,
        class_axes=("model",),
        num_classes=c,
        sample_rate=1.0,
        margin_fn=gathering_margin,
    )
    assert _full_class_collectives(step.lower(*args).compile().as_text(), 8, 37, 37)

    # lax.top_k is a TopK custom call that GSPMD replicates: it all-gathers the scores.
    monkeypatch.setattr(pfc, "_top_k_indices", lambda s, k: jax.lax.top_k(s, k)[1])
    _, _, _, step, args = _run(
        emb, labels, centers, key, mesh=mesh, class_axes=("model",), num_classes=c, sample_rate=rate
    )
    assert _full_class_collectives(step.lower(*args).compile().as_text(), 8, 37, 19)


def test_with_project_arcface_if_present():
    """The project margin (written separately) plugs in and keeps the logits sharded."""
    margins = pytest.importorskip("lowlight.losses.margins")
    c, mesh = 296, _mesh(2, 4)
    centers = pfc.init_centers(jax.random.key(0), c, D, multiple_of=8)
    emb, labels, key = _data(c)
    loss, _, _, step, args = _run(
        emb,
        labels,
        centers,
        key,
        mesh=mesh,
        class_axes=("data", "model"),
        num_classes=c,
        sample_rate=1.0,
        margin_fn=margins.arcface,
    )
    ref, _, _ = _reference(emb, labels, centers, np.arange(c), margin_fn=margins.arcface)
    np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-5)
    assert _full_class_collectives(step.lower(*args).compile().as_text(), 8, 37, 37) == []
