"""Benchmark Partial FC: step time and per-device memory vs class count and device count.

    python tools/bench_partial_fc.py                       # ~1-2 min on 2 CPU cores
    python tools/bench_partial_fc.py --classes=10000,100000 --devices=1,8 --sample_rate=0.3

One subprocess per device count (XLA_FLAGS=--xla_force_host_platform_device_count=N must be set
before jax starts). Each child builds a Mesh(N, 1) over ('data', 'model') and shards the class
centres over both axes (insightface layout: every device owns C/N classes), then times the
jitted forward+backward of `partial_fc_loss` (after one warm-up call) at the sampling rate r and
at r = 1 (exact model-parallel FC; only up to --full_max_classes: slow on CPU). The child with
the most devices also times an unsharded full-FC softmax on one device in the same process, as
the baseline row.

Memory per device is printed twice: from shapes (centres C_pad*D/n*4 bytes, logits B*k*4 bytes
per buffer) and from XLA's `compiled.memory_analysis()` (arguments + temporaries of the
per-device program). Fake CPU devices share the host's cores, so step times do *not* shrink with
N here; the point on CPU is that per-device memory does, and that the program stays sharded.
Prints figures only; no assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

_CHILD = "_PFC_BENCH_CHILD"


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--classes", default="10000,100000,1000000")
    p.add_argument("--devices", default="1,2,4,8")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--sample_rate", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up")
    p.add_argument("--baseline", type=int, default=1, help="also time unsharded full FC")
    p.add_argument(
        "--full_max_classes",
        type=int,
        default=100000,
        help="largest class count also run sharded at r = 1 (slow on CPU)",
    )
    return p.parse_args(argv)


def _mb(x):
    return x / 2**20


# ------------------------------------------------------------------------------ child
def _child(a):
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from lowlight.losses import partial_fc as pfc

    n_dev = len(jax.devices())
    mesh = Mesh(
        np.array(jax.devices()).reshape(n_dev, 1),
        ("data", "model"),
        axis_types=(jax.sharding.AxisType.Auto,) * 2,
    )
    class_axes = ("data", "model")
    n = pfc.num_class_shards(mesh, class_axes)

    def margin(cos, labels, s=64.0, m=0.5):  # ArcFace, one-hot form (elementwise, stays sharded)
        onehot = labels[:, None] == jnp.arange(cos.shape[1])[None, :]
        theta = jnp.arccos(jnp.clip(cos, -1.0 + 1e-7, 1.0 - 1e-7))
        return jnp.where(onehot, jnp.cos(theta + m), cos) * s

    def measure(fn, *args):
        """(seconds per step after a warm-up call, per-device bytes from XLA or None)."""
        compiled = fn.lower(*args).compile()
        try:  # memory_analysis is optional per backend
            m = compiled.memory_analysis()
            mem = _mb(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes)
        except Exception:
            mem = None
        jax.block_until_ready(compiled(*args))  # warm-up
        t0 = time.perf_counter()
        for _ in range(a.steps):
            out = compiled(*args)
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / a.steps, mem

    rows = []
    for c in [int(x) for x in a.classes.split(",")]:
        c_pad = pfc.padded_num_classes(c, n)
        w_shard = pfc.centers_sharding(mesh, class_axes)
        centers = jax.jit(
            functools.partial(pfc.init_centers, num_classes=c, dim=a.dim, multiple_of=n),
            out_shardings=w_shard,
        )(jax.random.key(0))
        row_shard = NamedSharding(mesh, P("data"))
        emb = jax.device_put(
            np.random.default_rng(1).normal(size=(a.batch, a.dim)).astype(np.float32), row_shard
        )
        labels = jax.device_put(
            np.random.default_rng(2).integers(0, c, a.batch).astype(np.int32), row_shard
        )
        key = jax.random.key(3)
        rates = sorted({a.sample_rate, 1.0} if c <= a.full_max_classes else {a.sample_rate})
        for rate in rates:
            k = pfc.num_sampled_per_shard(c_pad, n, rate)

            def loss(emb, centers, labels, key, rate=rate, c=c):
                return pfc.partial_fc_loss(
                    emb,
                    labels,
                    centers,
                    key=key,
                    sample_rate=rate,
                    margin_fn=margin,
                    mesh=mesh,
                    class_axes=class_axes,
                    num_classes=c,
                )[0]

            step = jax.jit(
                jax.value_and_grad(loss, argnums=(0, 1)), out_shardings=(None, (row_shard, w_shard))
            )
            t, mem = measure(step, emb, centers, labels, key)
            rows.append(
                dict(
                    kind="partial_fc",
                    devices=n_dev,
                    classes=c,
                    rate=rate,
                    k=k,
                    step_s=t,
                    centres_mb=_mb(c_pad * a.dim * 4 / n),
                    logits_mb=_mb(a.batch * k * 4),
                    xla_mb=mem,
                )
            )
            print(json.dumps(rows[-1]), flush=True)
        del centers

        if a.baseline:
            dev = jax.devices()[0]
            w1 = jax.device_put(pfc.init_centers(jax.random.key(0), c, a.dim), dev)
            e1, y1 = jax.device_put(np.asarray(emb), dev), jax.device_put(np.asarray(labels), dev)

            def full_fc(emb, w, labels):
                e = emb / jnp.linalg.norm(emb, axis=1, keepdims=True)
                w = w / jnp.linalg.norm(w, axis=1, keepdims=True)
                logp = jax.nn.log_softmax(margin(e @ w.T, labels), axis=1)
                return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], 1))

            step = jax.jit(jax.value_and_grad(full_fc, argnums=(0, 1)))
            t, mem = measure(step, e1, w1, y1)
            rows.append(
                dict(
                    kind="full_fc_1dev",
                    devices=1,
                    classes=c,
                    rate=1.0,
                    k=c,
                    step_s=t,
                    centres_mb=_mb(c * a.dim * 4),
                    logits_mb=_mb(a.batch * c * 4),
                    xla_mb=mem,
                )
            )
            print(json.dumps(rows[-1]), flush=True)
            del w1


# ------------------------------------------------------------------------------ parent
def main(argv=None):
    a = _args(argv)
    if os.environ.get(_CHILD):
        return _child(a)
    devices = [int(x) for x in a.devices.split(",")]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    print(
        f"Partial FC bench: B={a.batch} D={a.dim} r={a.sample_rate} classes={a.classes} "
        f"(mesh (N,1), classes over ('data','model'); fake CPU devices share the cores)"
    )
    hdr = (
        f"{'kind':<13}{'dev':>4}{'classes':>10}{'r':>6}{'k/shard':>9}{'step ms':>10}"
        f"{'centres MB/dev':>16}{'logits MB/dev':>15}{'XLA MB/dev':>12}"
    )
    print(hdr)
    print("-" * len(hdr))
    t_start = time.perf_counter()
    for nd in devices:
        env = dict(
            os.environ,
            **{
                _CHILD: "1",
                "JAX_PLATFORMS": "cpu",
                "XLA_FLAGS": f"--xla_force_host_platform_device_count={nd}",
                "TF_CPP_MIN_LOG_LEVEL": "3",
            },
        )
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        child_args = [
            f"--classes={a.classes}",
            f"--batch={a.batch}",
            f"--dim={a.dim}",
            f"--sample_rate={a.sample_rate}",
            f"--steps={a.steps}",
            f"--full_max_classes={a.full_max_classes}",
            f"--baseline={int(a.baseline and nd == max(devices))}",
        ]
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), *child_args],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for line in proc.stdout:
            if not line.startswith("{"):
                continue
            r = json.loads(line)
            xla = "n/a" if r["xla_mb"] is None else f"{r['xla_mb']:.1f}"
            print(
                f"{r['kind']:<13}{r['devices']:>4}{r['classes']:>10}{r['rate']:>6.2f}"
                f"{r['k']:>9}{1e3 * r['step_s']:>10.1f}{r['centres_mb']:>16.2f}"
                f"{r['logits_mb']:>15.2f}{xla:>12}",
                flush=True,
            )
        if proc.wait():
            print(f"(child with {nd} devices exited with {proc.returncode})")
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
