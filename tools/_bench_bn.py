r"""BatchNorm (+ activation) in training mode on XLA:CPU: flax's autodiff vs a hand-written VJP.

The evidence for a proposed change to lowlight/models/layers.py (not made here): after
fast_conv, MobileNetV2's train step spends most of its time in BatchNorm's elementwise passes
and reductions (docs/performance.md). `nn.BatchNorm` differentiated by JAX reads its input and
the incoming gradient in several separate reduction and elementwise passes; the closed form

    xhat = (x - mean) * rstd,  y = act(scale * xhat + bias)
    g = dy * act'(.),  dbias = sum(g),  dscale = sum(g * xhat)
    dx = scale * rstd * (g - dbias / n - xhat * dscale / n)

needs one reduction pass (both sums) and one elementwise pass over the same data. This script
times both (forward + backward, batch statistics, one fused activation) on the activation
shapes of iResNet-50 and MobileNetV2 at batch 32, and checks they agree.

    python tools/_bench_bn.py [--threads 1 --clock cpu]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(TOOLS))
sys.path.insert(0, TOOLS)

import _bench_env as E  # noqa: E402

SHAPES = (  # (name, B, H, W, C, activation)
    ("r50 layer1 bn2+prelu 56x56x64", 32, 56, 56, 64, "prelu"),
    ("r50 layer3 bn2+prelu 14x14x256", 32, 14, 14, 256, "prelu"),
    ("mnv2 expand bn+relu6 56x56x144", 32, 56, 56, 144, "relu6"),
    ("mnv2 expand bn+relu6 14x14x384", 32, 14, 14, 384, "relu6"),
)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = ap.parse_args()
    E.reexec_with_malloc_tunables(__file__)
    E.pin_threads(args.threads)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lowlight.models import layers as L

    now = time.process_time if args.clock == "cpu" else time.perf_counter
    eps = L.TORCH_BN_EPS

    def act(name, h, slope):
        return jnp.where(h >= 0, h, slope * h) if name == "prelu" else jnp.clip(h, 0.0, 6.0)

    def flax_bn(name):
        bn = L.batch_norm(train=True)

        def f(params, x, slope):
            y, _ = bn.apply({"params": params, "batch_stats": stats0}, x, mutable=["batch_stats"])
            return act(name, y, slope)

        return f

    def fused_bn(name):
        @jax.custom_vjp
        def f(params, x, slope):
            return fwd(params, x, slope)[0]

        def fwd(params, x, slope):
            axes = (0, 1, 2)
            mean = jnp.mean(x, axes)
            var = jnp.mean(jnp.square(x - mean), axes)
            rstd = jax.lax.rsqrt(var + eps)
            h = (x - mean) * (rstd * params["scale"]) + params["bias"]
            return act(name, h, slope), (x, mean, rstd, params, slope)

        def bwd(res, dy):
            x, mean, rstd, params, slope = res
            axes = (0, 1, 2)
            n = x.shape[0] * x.shape[1] * x.shape[2]
            xhat = (x - mean) * rstd
            h = xhat * params["scale"] + params["bias"]
            if name == "prelu":
                g = jnp.where(h >= 0, dy, slope * dy)
                dslope = jnp.sum(jnp.where(h >= 0, 0.0, dy * h), axes)
            else:
                g = jnp.where((h > 0) & (h < 6), dy, 0.0)
                dslope = jnp.zeros_like(slope)
            dbias = jnp.sum(g, axes)
            dscale = jnp.sum(g * xhat, axes)
            dx = (params["scale"] * rstd) * (g - dbias / n - xhat * (dscale / n))
            return {"scale": dscale, "bias": dbias}, dx, dslope

        f.defvjp(fwd, bwd)
        return f

    rng = np.random.default_rng(0)
    print(f"threads {args.threads or 'all'}, clock {args.clock}; ms per forward+backward",
          flush=True)
    for label, b, h, w, c, name in SHAPES:
        x = jnp.asarray(rng.standard_normal((b, h, w, c)) * 2 + 0.5, jnp.float32)
        dy = jnp.asarray(rng.standard_normal((b, h, w, c)), jnp.float32)
        params = {"scale": jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32),
                  "bias": jnp.asarray(rng.standard_normal(c) * 0.1, jnp.float32)}
        stats0 = {"mean": jnp.zeros(c), "var": jnp.ones(c)}
        slope = jnp.full((c,), 0.25, jnp.float32)
        times, outs = {}, {}
        for kind, make in (("flax", flax_bn), ("fused", fused_bn)):
            f = make(name)
            step = jax.jit(lambda p, x, s, f=f, dy=dy: jax.vjp(f, p, x, s)[1](dy))
            outs[kind] = jax.block_until_ready(step(params, x, slope))
            best = float("inf")
            for _ in range(5):
                t0 = now()
                jax.block_until_ready(step(params, x, slope))
                best = min(best, now() - t0)
            times[kind] = best
        err = max(float(jnp.max(jnp.abs(a - b_)) / jnp.max(jnp.abs(b_)))
                  for a, b_ in zip(jax.tree.leaves(outs["fused"]), jax.tree.leaves(outs["flax"])))
        print(f"{label:<34} flax {1e3 * times['flax']:7.1f}  fused {1e3 * times['fused']:7.1f}"
              f"  ({times['flax'] / times['fused']:.2f}x, max rel diff {err:.1e})", flush=True)


if __name__ == "__main__":
    main()
