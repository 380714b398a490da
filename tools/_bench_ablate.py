r"""Where a train step's time goes, measured by taking parts of its backward pass away.

The profiler's per-op wall times (`tools/bench.py --profile`) are unreliable for this on
XLA:CPU. The executor runs independent ops concurrently on the two cores, so each op's time is
inflated by whatever ran beside it. Layout copies that XLA inserts for a convolution's operands
carry no op name either, so they cannot be charged to the convolution. This script measures
the whole step instead. It compiles the model's train step (`_bench_models.lowlight_side`:
the step `tools/bench.py` times) several times. Each compile replaces one part of the backward
pass by a stand-in that does no work:

  full             the step as benchmarked
  no kernel grads  every `fast_conv` convolution's kernel gradient (3x3 and 1x1, whether
                   XLA's or the compiled kernel's; also the depthwise ones, which autodiff
                   derives in `fast_conv._depthwise` on several devices, and which on one CPU
                   device the compiled depthwise kernel computes in the same pass as the input
                   gradient: there only its output is replaced, so that pass's cost stays)
  no input grads   every `fast_conv` convolution's input gradient (dense and strided)
  BN bwd identity  the fused BatchNorm + activation backward (`layers.BatchNormAct`) passes
                   the gradient through and gives zero parameter gradients (models on
                   `bn_impl="fast"`: the iResNets by default; --bn_impl=fast for MobileNetV2)

With PyTorch installed (`pip install torch==2.13.0`, as for tools/bench.py), its twin of the
model is timed in the same rounds with and without its convolution kernels' gradients
(`requires_grad=False`: autograd skips them), which gives the same figure for PyTorch. That
variant also skips those weights' optimizer update, whereas lowlight's stand-in still updates
them from zero gradients (tens of ms on iResNet-50).

Each stand-in keeps a dependency on the incoming gradient, so XLA cannot drop the rest of the
backward: the BatchNorm one passes it through, the convolution ones read one element of it, and
the depthwise kernels' gradient is cut (`stop_gradient`) after their input gradient is formed.
The difference to "full" is then what that part costs inside the model, memory traffic and
lost concurrency included. The variants are timed alternately in one process (best of
--rounds). The stand-ins give wrong gradients: this measures cost only.

    python tools/_bench_ablate.py [--model iresnet50] [--bn_impl fast] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(TOOLS))
sys.path.insert(0, TOOLS)

import _bench_env as E  # noqa: E402

VARIANTS = ("full", "no kernel grads", "no input grads", "BN bwd identity")


def _patches(variant: str):
    """(module, attribute, replacement) triples for `variant`; imported late (after env)."""
    import jax.numpy as jnp
    from jax import lax

    from lowlight.models import fast_conv as F
    from lowlight.models import layers as L

    def tie(dy):  # one element of the gradient: keeps the dependency, costs nothing
        return lax.stop_gradient(dy.reshape(-1)[0]) * 0

    def no_wgrad(x, dy, w_shape, w_dtype, *args):
        return (jnp.zeros(w_shape, w_dtype) + tie(dy)).astype(w_dtype)

    depthwise = F._depthwise
    depthwise_kernel_bwd = F._depthwise_kernel_bwd_bwd

    def depthwise_no_wgrad(x, w, *args):
        return depthwise(x, lax.stop_gradient(w), *args)

    def depthwise_kernel_no_wgrad(strides, padding, res, dy):
        dx, dw = depthwise_kernel_bwd(strides, padding, res, dy)
        return dx, jnp.zeros_like(dw) + tie(dy)

    def no_dgrad(dy, w, x_shape, *args):
        return jnp.zeros(x_shape, dy.dtype) + tie(dy)

    def bn_identity(activation, eps, dtype, stats_dtype, res, cts):
        x, _, _, scale, bias, slope = res
        dy = cts[0]
        return (dy.astype(x.dtype), None if scale is None else jnp.zeros_like(scale),
                jnp.zeros_like(bias), None if slope is None else jnp.zeros_like(slope))

    if variant == "no kernel grads":
        return [(F, "_wgrad", no_wgrad), (F, "_depthwise", depthwise_no_wgrad),
                (F, "_depthwise_kernel_bwd_bwd", depthwise_kernel_no_wgrad)]
    if variant == "no input grads":
        return [(F, "_dgrad", no_dgrad)]
    if variant == "BN bwd identity":
        return [(L, "_bn_act_bwd", bn_identity)]
    return []


def _redefine_vjps():
    """A custom_vjp holds its bwd function: re-register after (un)patching one."""
    from lowlight.models import fast_conv as F
    from lowlight.models import layers as L

    L._bn_act.defvjp(L._bn_act_fwd, L._bn_act_bwd)
    F._depthwise_kernel_bwd.defvjp(F._depthwise_kernel_bwd_fwd, F._depthwise_kernel_bwd_bwd)


@contextlib.contextmanager
def _patched(variant: str):
    saved = []
    for mod, name, new in _patches(variant):
        saved.append((mod, name, getattr(mod, name)))
        setattr(mod, name, new)
    _redefine_vjps()
    try:
        yield
    finally:
        for mod, name, old in saved:
            setattr(mod, name, old)
        _redefine_vjps()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="iresnet50",
                    choices=("iresnet50", "iresnet100", "mobilenetv2_se", "unet", "relight"))
    ap.add_argument("--bn_impl", default="", help="xla|fast|auto (default: the model's)")
    ap.add_argument("--train_batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    E.reexec_with_malloc_tunables(__file__)
    E.pin_threads(args.threads)
    import _bench_models as M
    from bench import Clock

    steps = {}
    try:
        import torch  # noqa: F401
    except ImportError:
        print("(PyTorch not installed: lowlight's figures only)")
    else:
        for frozen, label in ((False, "torch full"), (True, "torch no kernel grads")):
            steps[label] = M.torch_side(args.model, train_batch=args.train_batch,
                                        frozen_convs=frozen).train_step
    for variant in VARIANTS:
        with _patched(variant):  # patched while the step is traced and compiled
            side = M.lowlight_side(args.model, train_batch=args.train_batch, conv_impl="fast",
                                   timer=Clock("wall").timer, bn_impl=args.bn_impl or None)
        steps[variant] = side.train_step
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(args.rounds):
        for variant, step in steps.items():
            step()  # settle after the previous variant
            t0 = time.perf_counter()
            step()
            best[variant] = min(best[variant], time.perf_counter() - t0)
    print(f"{args.model} train step, batch {args.train_batch}, bn_impl "
          f"{args.bn_impl or 'model default'}; best of {args.rounds}, load {E.load():.1f}")
    for variant, sec in best.items():
        full = best["torch full" if variant.startswith("torch") else "full"]
        part = full - sec
        cost = "" if variant.endswith("full") else (
            f"  -> that part costs {1e3 * part:6.0f} ms ({100 * part / full:4.1f}%)")
        print(f"  {variant:<22} {1e3 * sec:7.0f} ms{cost}", flush=True)


if __name__ == "__main__":
    main()
