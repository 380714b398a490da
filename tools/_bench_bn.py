r"""BatchNorm (+ activation) in training mode on XLA:CPU: flax's autodiff vs the fused VJP.

After fast_conv, the iResNet and MobileNetV2 train steps spend most of their time in
BatchNorm's elementwise passes and reductions (docs/performance.md). `nn.BatchNorm`
differentiated by JAX reads its input and the incoming gradient in several separate reduction
and elementwise passes; the closed form that `lowlight.models.layers.BatchNormAct` (`bn_act`)
implements as a `jax.custom_vjp`,

    xhat = (x - mean) * rstd,  y = act(scale * xhat + bias)
    g = dy * act'(.),  dbias = sum(g),  dscale = sum(g * xhat)
    dx = scale * rstd * (g - dbias / n - xhat * dscale / n)

needs one reduction pass (all sums) and one elementwise pass over the same data. This script
times both (forward + backward of one layer, batch statistics and their running-average
update, the activation fused) on the activation shapes of iResNet-50 and MobileNetV2 at
batch 32, prints flax / fused, and checks they agree.

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

    def flax_bn(name):
        """What the models ran before: nn.BatchNorm, then the activation, autodiff."""
        bn = L.batch_norm(train=True)

        def f(params, x, slope):
            y, _ = bn.apply({"params": params, "batch_stats": stats0}, x, mutable=["batch_stats"])
            return jnp.where(y >= 0, y, slope * y) if name == "prelu" else jnp.clip(y, 0.0, 6.0)

        return f

    def fused_bn(name):
        """The library's `BatchNormAct` (the same variables, the fused custom_vjp)."""
        bn = L.BatchNormAct(use_running_average=False, activation=name)

        def f(params, x, slope):
            y, _ = bn.apply({"params": params, "batch_stats": stats0}, x,
                            slope if name == "prelu" else None, mutable=["batch_stats"])
            return y

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
        steps, outs = {}, {}
        for kind, make in (("flax", flax_bn), ("fused", fused_bn)):
            f = make(name)
            steps[kind] = jax.jit(lambda p, x, s, f=f, dy=dy: jax.vjp(f, p, x, s)[1](dy))
            outs[kind] = jax.block_until_ready(steps[kind](params, x, slope))
        times = dict.fromkeys(steps, float("inf"))
        for _ in range(7):  # interleaved, best of 7: both see the same machine state
            for kind, step in steps.items():
                t0 = now()
                jax.block_until_ready(step(params, x, slope))
                times[kind] = min(times[kind], now() - t0)
        err = max(float(jnp.max(jnp.abs(a - b_)) / jnp.maximum(jnp.max(jnp.abs(b_)), 1e-30))
                  for a, b_ in zip(jax.tree.leaves(outs["fused"]), jax.tree.leaves(outs["flax"]))
                  if b_.size and float(jnp.max(jnp.abs(b_))) > 0)
        print(f"{label:<34} flax {1e3 * times['flax']:7.1f}  fused {1e3 * times['fused']:7.1f}"
              f"  ({times['flax'] / times['fused']:.2f}x, max rel diff {err:.1e})", flush=True)


if __name__ == "__main__":
    main()
