r"""Convolution formulations on XLA:CPU, layer by layer: the evidence behind fast_conv.py.

For the convolution shapes of iResNet-50 (112x112 faces) and MobileNetV2, at batch 32, times:

  forward   xla         lax.conv_general_dilated, NHWC/HWIO (what nn.Conv runs; YNNPACK)
            nchw        the same convolution in NCHW/OIHW layout
            im2col      patches by slicing + concatenation, one dot_general
            patches     patches by lax.conv_general_dilated_patches, one dot_general
            winograd    Winograd F(2x2, 3x3) (stride 1): 16 dot_generals on transformed tiles
            space2batch a dilated conv as a plain conv over the d*d interleaved sub-images
            bf16        the xla forward in bfloat16 (max relative error vs float32 reported)
  backward  xla         XLA's derivative of the convolution (input + kernel gradient)
            fast        lowlight.models.fast_conv (phase-decomposed strided input gradient,
                        kernel gradient by the compiled kernel (cpu_kernels) or in
                        cache-sized batch chunks, Winograd input gradient, 1x1 as dots,
                        depthwise as a sum of shifted views)
            wgrad       the kernel gradient alone: xla, fast, chunked (fast_conv without the
                        compiled kernel: XLA's convolution per batch chunk), and (3x3 stride 1)
                        Winograd F(2x2, 3x3)'s own kernel gradient, 16 matmuls over the tiles

and reports GFLOP/s (2 * MACs of the convolution / time; for winograd the direct-convolution
count, so the figures compare like with like). Every alternative is checked against the xla
forward before it is timed.

    python tools/_bench_conv.py [--batch 32] [--threads 1 --clock cpu] [--layers 0,2]
                                [--xla_flags="--xla_cpu_prefer_vector_width=512"] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(TOOLS))
sys.path.insert(0, TOOLS)

import _bench_env as E  # noqa: E402

# (name, H, C_in, C_out, kernel, stride, groups[, dilation]): iResNet-50, MobileNetV2 and
# relighting-net layers.
LAYERS = (
    ("r50 stem 3->64 112x112", 112, 3, 64, 3, 1, 1),
    ("r50 layer1.0.conv1 112x112", 112, 64, 64, 3, 1, 1),
    ("r50 layer1.0.conv2 s2", 112, 64, 64, 3, 2, 1),
    ("r50 layer1.1 56x56", 56, 64, 64, 3, 1, 1),
    ("r50 layer2.1 28x28", 28, 128, 128, 3, 1, 1),
    ("r50 layer3.1 14x14", 14, 256, 256, 3, 1, 1),
    ("r50 layer4.1 7x7", 7, 512, 512, 3, 1, 1),
    ("r50 layer2.0 shortcut 1x1 s2", 56, 64, 128, 1, 2, 1),
    ("mnv2 block3 expand 1x1", 28, 24, 144, 1, 1, 1),
    ("mnv2 block3 depthwise", 28, 144, 144, 3, 1, 144),
    ("mnv2 block4 depthwise s2", 28, 144, 144, 3, 2, 144),
    ("relight res0 dilation 2", 112, 208, 208, 3, 1, 1, 2),
    ("relight res2 dilation 8", 112, 208, 208, 3, 1, 1, 8),
)


def _args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--xla_flags", default="", help="extra XLA_FLAGS for this run")
    ap.add_argument("--layers", default="", help="comma list of layer indices (default: all)")
    ap.add_argument("--out", default="")
    return ap.parse_args()


def main():
    args = _args()
    E.reexec_with_malloc_tunables(__file__)
    E.pin_threads(args.threads)
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    from lowlight.models import cpu_kernels as CK
    from lowlight.models import fast_conv as FC
    from lowlight.models import winograd as WG

    now = time.process_time if args.clock == "cpu" else time.perf_counter
    dn = ("NHWC", "HWIO", "NHWC")

    def best(fn, *a):
        jax.block_until_ready(fn(*a))
        times = []
        for _ in range(args.repeats):
            t0 = now()
            jax.block_until_ready(fn(*a))
            times.append(now() - t0)
        return min(times)

    dil = [1]  # dilation of the layer being timed (closures below read it)

    def pads(k):
        p = (k - 1) * dil[0] // 2
        return ((p, p), (p, p))

    def xla_fwd(x, w, s, g):
        return lax.conv_general_dilated(x, w, (s, s), pads(w.shape[0]), dimension_numbers=dn,
                                        feature_group_count=g, rhs_dilation=(dil[0], dil[0]))

    def space2batch_fwd(x, w, s, g):
        # dilation d = a plain conv on each of the d*d interleaved sub-images (H/d x W/d)
        d = dil[0]
        b, h, wd, c = x.shape
        xs = x.reshape(b, h // d, d, wd // d, d, c).transpose(0, 2, 4, 1, 3, 5)
        xs = xs.reshape(b * d * d, h // d, wd // d, c)
        p = (w.shape[0] - 1) // 2
        y = lax.conv_general_dilated(xs, w, (1, 1), ((p, p), (p, p)), dimension_numbers=dn)
        o = y.shape[-1]
        y = y.reshape(b, d, d, h // d, wd // d, o).transpose(0, 3, 1, 4, 2, 5)
        return y.reshape(b, h, wd, o)

    def nchw_fwd(x, w, s, g):
        return lax.conv_general_dilated(x, w, (s, s), pads(w.shape[2]),
                                        dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                        feature_group_count=g)

    def im2col_fwd(x, w, s, g):
        kh, kw, c, o = w.shape
        b, h, wd, _ = x.shape
        xp = jnp.pad(x, ((0, 0),) + pads(kh) + ((0, 0),))
        ho, wo = (xp.shape[1] - kh) // s + 1, (xp.shape[2] - kw) // s + 1
        cols = [lax.slice(xp, (0, i, j, 0), (b, i + s * (ho - 1) + 1, j + s * (wo - 1) + 1, c),
                          (1, s, s, 1)) for i in range(kh) for j in range(kw)]
        p = jnp.concatenate(cols, axis=-1)
        return lax.dot_general(p, w.reshape(kh * kw * c, o), (((3,), (0,)), ((), ())))

    def patches_fwd(x, w, s, g):
        kh, kw, c, o = w.shape
        p = lax.conv_general_dilated_patches(x, (kh, kw), (s, s), pads(kh), dimension_numbers=dn)
        # patches are ordered (C, kh, kw) along the feature axis
        wk = w.transpose(2, 0, 1, 3).reshape(c * kh * kw, o)
        return lax.dot_general(p, wk, (((3,), (0,)), ((), ())))

    # Winograd F(2x2, 3x3) (Lavin & Gray 2016): Y = A^T [ (G g G^T) . (B^T d B) ] A
    bt = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
    gm = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
    at = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)

    def winograd_fwd(x, w, s, g):
        b, h, wd, c = x.shape
        o = w.shape[-1]
        th, tw = (h + 1) // 2, (wd + 1) // 2  # 2x2 output tiles
        xp = jnp.pad(x, ((0, 0), (1, 2 * th + 1 - h), (1, 2 * tw + 1 - wd), (0, 0)))
        d = [[xp[:, i : i + 2 * th : 2, j : j + 2 * tw : 2] for j in range(4)] for i in range(4)]
        v = [[sum(bt[a, i] * bt[bb, j] * d[i][j] for i in range(4) for j in range(4)
                  if bt[a, i] and bt[bb, j]) for bb in range(4)] for a in range(4)]
        u = jnp.einsum("ai,ijco,bj->abco", jnp.asarray(gm), w, jnp.asarray(gm))
        m = [[lax.dot_general(v[a][bb], u[a, bb], (((3,), (0,)), ((), ()))) for bb in range(4)]
             for a in range(4)]
        y = [[sum(at[r, a] * at[q, bb] * m[a][bb] for a in range(4) for bb in range(4)
                  if at[r, a] and at[q, bb]) for q in range(2)] for r in range(2)]
        y = jnp.stack([jnp.stack(row, axis=3) for row in y], axis=2)  # b, th, 2, tw, 2, o
        return y.reshape(b, 2 * th, 2 * tw, o)[:, :h, :wd]

    def winograd_wgrad(x, dy, padding):
        # Kernel gradient of F(2x2, 3x3): y = A^T [U * V] A is linear in U = G g G^T, so
        # dU[a, b] = sum over tiles of V[a, b] (x) (A dy A^T)[a, b] (16 matmuls contracting over
        # the tiles), dg = G^T dU G. Correct, but measured slower than fast_conv's chunked wgrad.
        v, (ho, wo) = WG.input_tiles(x, padding)
        th, tw = v[0][0].shape[1], v[0][0].shape[2]
        dyp = jnp.pad(dy, ((0, 0), (0, 2 * th - ho), (0, 2 * tw - wo), (0, 0)))
        dm = WG.combine(WG.AT.T, WG.AT.T,
                         [[dyp[:, r::2, q::2] for q in range(2)] for r in range(2)])
        du = [[lax.dot_general(v[a][q], dm[a][q], (((0, 1, 2), (0, 1, 2)), ((), ())))
               for q in range(4)] for a in range(4)]
        dg = WG.combine(WG.G.T, WG.G.T, du)
        return jnp.stack([jnp.stack(row) for row in dg])

    def bf16_fwd(x, w, s, g):
        return xla_fwd(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), s, g)

    def grads(impl):
        def f(x, w, dy, s, g):
            fn = lambda x, w: FC.conv(x, w, strides=s, padding=pads(w.shape[0]),  # noqa: E731
                                      groups=g, dilation=dil[0], impl=impl)
            _, vjp = jax.vjp(fn, x, w)
            return vjp(dy)

        return f

    def _rel(a, b):
        return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))

    rows = []
    rng = np.random.default_rng(0)
    print(f"batch {args.batch}, threads {args.threads or 'all'}, clock {args.clock}; GFLOP/s "
          f"(2*MACs / time)", flush=True)
    chosen = [int(i) for i in args.layers.split(",")] if args.layers else range(len(LAYERS))
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    for name, h, c, o, k, s, g, *rest in (LAYERS[i] for i in chosen):
        dil[0] = rest[0] if rest else 1
        x = jnp.asarray(rng.standard_normal((args.batch, h, h, c)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((k, k, c // g, o)) * 0.1, jnp.float32)
        ref = jax.jit(xla_fwd, static_argnums=(2, 3))(x, w, s, g)
        ho = ref.shape[1]
        flops = 2.0 * args.batch * ho * ho * o * (c // g) * k * k
        dy = jnp.asarray(rng.standard_normal(ref.shape), jnp.float32)
        row = {"layer": name, "shape": [args.batch, h, h, c, o, k, s, g], "gflop": flops / 1e9}
        fwd = {"xla": xla_fwd, "bf16": bf16_fwd}
        if dil[0] > 1:
            fwd["space2batch"] = space2batch_fwd
        elif g == 1:
            fwd.update(nchw=None, im2col=im2col_fwd, patches=patches_fwd)
            if k == 3 and s == 1:
                fwd["winograd"] = winograd_fwd
        for label, fn in fwd.items():
            if label == "nchw":
                xt, wt = x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1)
                jf = jax.jit(nchw_fwd, static_argnums=(2, 3))
                out = jf(xt, wt, s, g).transpose(0, 2, 3, 1)
                t = best(jf, xt, wt, s, g)
            else:
                jf = jax.jit(fn, static_argnums=(2, 3))
                out = jf(x, w, s, g)
                t = best(jf, x, w, s, g)
            err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
            if label != "bf16" and err > 1e-4:
                raise SystemExit(f"{name} {label}: wrong result (relative error {err:.1e})")
            row[f"fwd_{label}"] = flops / t / 1e9
            if label == "bf16":
                row["bf16_rel_err"] = err
        for impl in ("xla", "fast"):
            jg = jax.jit(grads(impl), static_argnums=(3, 4))
            row[f"bwd_{impl}"] = 2 * flops / best(jg, x, w, dy, s, g) / 1e9
            jw = jax.jit(lambda x, w, dy, impl=impl, s=s, g=g: grads(impl)(x, w, dy, s, g)[1])
            row[f"wgrad_{impl}"] = flops / best(jw, x, w, dy) / 1e9
        # fast_conv's batch-chunked path: the compiled kernel switched off while tracing
        supported, CK.wgrad_supported = CK.wgrad_supported, lambda *a, **k: False
        try:
            jw = jax.jit(lambda x, w, dy, s=s, g=g: grads("fast")(x, w, dy, s, g)[1])
            row["wgrad_chunked"] = flops / best(jw, x, w, dy) / 1e9
        finally:
            CK.wgrad_supported = supported
        extra = ""
        if "winograd" in fwd:
            jw = jax.jit(winograd_wgrad, static_argnums=2)
            ref_dw = jax.jit(lambda x, w, dy, s=s, g=g: grads("xla")(x, w, dy, s, g)[1])(x, w, dy)
            got = jw(x, dy, pads(k))
            if _rel(got, ref_dw) > 1e-4:
                raise SystemExit(f"{name} winograd wgrad: wrong result")
            row["wgrad_winograd"] = flops / best(jw, x, dy, pads(k)) / 1e9
            extra = f" winograd={row['wgrad_winograd']:.0f}"
        rows.append(row)
        fw = " ".join(f"{lab}={row[f'fwd_{lab}']:.0f}" for lab in fwd)
        print(f"{name:<30} fwd: {fw} (bf16 err {row['bf16_rel_err']:.1e}) | grads dx+dw: "
              f"xla={row['bwd_xla']:.0f} fast={row['bwd_fast']:.0f} | wgrad: "
              f"xla={row['wgrad_xla']:.0f} chunked={row['wgrad_chunked']:.0f} "
              f"fast={row['wgrad_fast']:.0f}{extra}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"batch": args.batch, "threads": args.threads, "clock": args.clock,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
