r"""lowlight vs PyTorch on this CPU, side by side in one process, plus data and evaluation rates.

Per model (`_bench_models.py`; the PyTorch twins in `_bench_torch.py` have the same parameter
count, checked before timing):
  * train step images/s at batch 32 (forward + backward + optimizer update), best of N steps;
  * inference latency at batch 1 (mean and p95 over >= 200 timed calls after warm-up; fewer
    with --quick) and throughput at batch 64 (best of N calls);
  * lowlight / PyTorch ratios (> 1 means lowlight is faster, for latency < 1 is better);
  * achieved GFLOP/s and its fraction of this machine's fp32 matmul peak, measured at the
    start with 2048^2 and 4096^2 matmuls in JAX and in PyTorch (the best is "the peak"). One
    FLOP count serves both sides (the same model): 2 per MAC of the forward pass's
    convolutions and matmuls (`torch.utils.flop_counter` on the twin); a train step counts 3x
    its forward pass. XLA's cost analysis of lowlight's program is recorded beside it.
Then: the synthetic renderer and the real-format readers on one core (`bench_synth.py`,
`bench_readers.py`), the grain pipeline, `verification.evaluate` pairs/s, and 1:N search
queries/s against 100k and 1M gallery embeddings. The machine's load (`/proc/loadavg`) is
recorded before every measurement: on a shared machine, compare ratios measured side by side,
not absolute figures from different moments.

    python tools/bench.py [--models=iresnet50,iresnet100,vit_s,mobilenetv2_se,unet,relight,pipeline]
                          [--quick] [--out=bench.json] [--conv_impl=fast|xla|xla,fast]
                          [--bn_impl=xla|fast] [--threads=N] [--clock=wall|cpu] [--profile]
                          [--no_data]

--conv_impl picks lowlight's convolution for the models that have the option (all but the
ViT: iResNets, MobileNetV2, U-Net, relighting net, the pipeline's three nets); a comma list
times each (one row per implementation). --bn_impl picks the BatchNorm+activation of the
iResNets and MobileNetV2 (default: the same as the convolution; `xla` = flax's BatchNorm
differentiated by JAX, `fast` = the fused VJP of lowlight.models.layers.BatchNormAct).
--threads=1 --clock=cpu times one pinned core by process CPU time: steadier on a loaded machine
(it measures what a dedicated core would do), but not the multi-core figure the goals name.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(TOOLS))
sys.path.insert(0, TOOLS)

import _bench_env as E  # noqa: E402

ALL_MODELS = ("iresnet50", "iresnet100", "vit_s", "mobilenetv2_se", "unet", "relight",
              "pipeline")
#: Models with a `conv_impl` attribute (lowlight.models.fast_conv); the pipeline's three nets.
CONV_IMPL_MODELS = ("iresnet50", "iresnet100", "mobilenetv2_se", "unet", "relight", "pipeline")


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(ALL_MODELS))
    ap.add_argument("--quick", action="store_true", help="fewer runs (< 10 min for all models)")
    ap.add_argument("--out", default="", help="write all figures as JSON here")
    ap.add_argument("--conv_impl", default="auto",
                    help="lowlight conv implementation(s) for models that have the option: "
                         "auto (the models' default), xla, fast, or a comma list")
    ap.add_argument("--bn_impl", default="",
                    help="BatchNorm+activation of iResNets / MobileNetV2: xla (flax's), fast "
                         "(fused VJP) or auto; default: follow --conv_impl")
    ap.add_argument("--threads", type=int, default=0, help="cores to use (0 = all)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--profile", action="store_true",
                    help="print lowlight's per-op time breakdown of each train step")
    ap.add_argument("--no_data", action="store_true", help="skip data and evaluation figures")
    ap.add_argument("--malloc", choices=("reuse", "default"), default="reuse",
                    help="reuse: restart with glibc malloc tunables that keep freed memory "
                         "(_bench_env.MALLOC_TUNABLES); default: the environment as it is")
    ap.add_argument("--train_batch", type=int, default=32)
    ap.add_argument("--infer_batch", type=int, default=64)
    ap.add_argument("--_worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--_result", default="", help=argparse.SUPPRESS)
    ap.add_argument("--_peak", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = set(models) - set(ALL_MODELS)
    if unknown:
        ap.error(f"--models: unknown {sorted(unknown)}; valid: {','.join(ALL_MODELS)}")
    impls = [m for m in args.conv_impl.split(",") if m]
    if not impls or set(impls) - {"auto", "xla", "fast"}:
        ap.error(f"--conv_impl {args.conv_impl!r}: expected auto, xla, fast or a comma list")
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock=cpu measures one core: use it with --threads=1")
    args.models, args.impls = models, impls
    return args


_load = E.load


def machine() -> dict:
    info = {"python": platform.python_version(), "cpus_online": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "L2 cache",
                               "L3 cache", "Hypervisor vendor"):
                info[key.strip()] = value.strip()
            if key.strip() == "Flags":
                flags = value.split()
                info["avx512"] = sorted(f for f in flags if f.startswith("avx512"))
    except OSError:
        pass
    with open("/proc/meminfo") as f:
        info["mem_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    return info


class Clock:
    def __init__(self, kind: str):
        self.now = time.process_time if kind == "cpu" else time.perf_counter

    @contextlib.contextmanager
    def timer(self):
        class T:
            seconds = 0.0

        t, t0 = T(), self.now()
        yield t
        t.seconds = self.now() - t0

    def times(self, fn, runs: int, warmup: int = 1, settle: float = 0.0) -> list[float]:
        """`runs` timed calls of fn, back to back, after `settle` seconds of sleep and
        `warmup` untimed calls (see SETTLE_S)."""
        if settle:
            time.sleep(settle)
        for _ in range(warmup):
            fn()
        out = []
        for _ in range(runs):
            t0 = self.now()
            fn()
            out.append(self.now() - t0)
        return out


def matmul_peak(clock: Clock, sizes=(2048, 4096), runs: int = 5) -> dict:
    """Best fp32 matmul rate over square sizes, in JAX and in PyTorch (GFLOP/s)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    out = {"sizes": list(sizes), "jax_gflops": 0.0, "torch_gflops": 0.0}
    for n in sizes:
        a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
        mm = jax.jit(lambda a: a @ a)
        flops = 2.0 * n**3
        best = min(clock.times(lambda mm=mm, a=a: mm(a).block_until_ready(), runs))
        out["jax_gflops"] = max(out["jax_gflops"], flops / best / 1e9)
        ta = torch.randn(n, n)
        best = min(clock.times(lambda ta=ta: ta @ ta, runs))
        out["torch_gflops"] = max(out["torch_gflops"], flops / best / 1e9)
    out["peak_gflops"] = max(out["jax_gflops"], out["torch_gflops"])
    return out


def _stats(times: list[float]) -> dict:
    import numpy as np

    t = np.asarray(times)
    return {"mean_ms": 1e3 * float(t.mean()), "p95_ms": 1e3 * float(np.percentile(t, 95)),
            "median_ms": 1e3 * float(np.median(t)), "runs": int(t.size)}


#: How the two sides of a comparison are timed. Each side runs in blocks of back-to-back
#: calls, as a user's loop would, after SETTLE_S seconds of sleep and one untimed call; blocks
#: of the two sides alternate so that both see the same load, and the best call of each side
#: counts. Why blocks and a pause, not one call of each side in turn: both frameworks' worker
#: threads spin-wait for a while after a call (PyTorch's OpenMP team under libgomp's default
#: active wait policy, XLA's pool), so a call that follows the other side's shares the cores
#: with them. Alternating single calls timed MobileNetV2-SE at batch 64 at 0.95-1.00x with
#: PyTorch faster (66-69 ms) than when it ran alone back to back (91-110 ms), while lowlight's
#: alone was 65 ms (docs/performance.md, "How the benchmark times the two sides").
SETTLE_S = 0.25
#: Seconds of timed calls per side aimed for (at least 3 calls, at most 30), in 3 blocks.
SECONDS_PER_SIDE = 6.0
BLOCKS = 3


def bench_model(name: str, impl: str | None, args, clock: Clock, peak: float) -> dict:
    import _bench_models as BM

    runs_lat = 30 if args.quick else 200

    def alternate(fa, fb) -> tuple[list[float], list[float]]:
        """Timed calls of fa and fb in alternating blocks (see SETTLE_S); 1 each with --quick."""
        if args.quick:
            return clock.times(fa, 1, warmup=0), clock.times(fb, 1, warmup=0)
        slowest = max(min(clock.times(f, 1, warmup=0)) for f in (fa, fb))
        calls = int(min(30, max(3, -(-SECONDS_PER_SIDE // slowest))))
        per_block = -(-calls // BLOCKS)
        ta, tb = [], []
        for _ in range(BLOCKS):
            ta += clock.times(fa, per_block, warmup=1, settle=SETTLE_S)
            tb += clock.times(fb, per_block, warmup=1, settle=SETTLE_S)
        return ta, tb

    from lowlight.models import fast_conv

    shown = None if impl is None else (impl if impl != "auto" else
                                       "auto=" + fast_conv.resolve_impl("auto"))
    if args.bn_impl and name in ("iresnet50", "iresnet100", "mobilenetv2_se"):
        shown = f"{shown or 'auto'}+bn={args.bn_impl}"
    row: dict = {"model": name, "what": BM.MODELS[name], "conv_impl": shown, "load": [_load()]}
    jx = BM.lowlight_side(name, train_batch=args.train_batch, conv_impl=impl, timer=clock.timer,
                          bn_impl=args.bn_impl or None)
    th = BM.torch_side(name, train_batch=args.train_batch)
    row["params"] = {"lowlight": jx.params, "torch": th.params}
    if jx.params != th.params:
        raise SystemExit(f"{name}: parameter counts differ (lowlight {jx.params:,}, "
                         f"torch {th.params:,}); the PyTorch twin is not the same model")
    row["compile_train_s"] = jx.compile_s

    b = args.train_batch
    if jx.train_step is not None:
        row["load"].append(_load())
        jx.train_step()  # warm-up (first call after compile)
        th.train_step()
        jt, tt = alternate(jx.train_step, th.train_step)
        row["train"] = {
            "batch": b,
            "lowlight_img_s": b / min(jt), "torch_img_s": b / min(tt), "runs": len(jt),
            "lowlight_counted_flops": jx.train_flops, "torch_counted_flops": th.train_flops,
            "_jt": jt, "_tt": tt,
        }
        row["train"]["ratio"] = row["train"]["lowlight_img_s"] / row["train"]["torch_img_s"]
        if args.profile:
            row["profile"] = jx.profile()

    row["load"].append(_load())
    j1, t1 = jx.infer(1), th.infer(1)
    lat_j = clock.times(j1, runs_lat, warmup=5)
    time.sleep(SETTLE_S)
    lat_t = clock.times(t1, runs_lat, warmup=5)
    row["latency_b1"] = {"lowlight": _stats(lat_j), "torch": _stats(lat_t)}
    row["latency_b1"]["ratio_mean"] = (row["latency_b1"]["lowlight"]["mean_ms"]
                                       / row["latency_b1"]["torch"]["mean_ms"])
    row["latency_b1"]["ratio_p95"] = (row["latency_b1"]["lowlight"]["p95_ms"]
                                      / row["latency_b1"]["torch"]["p95_ms"])

    row["load"].append(_load())
    n = args.infer_batch
    jn, tn = jx.infer(n), th.infer(n)
    jn()
    tn()
    jt, tt = alternate(jn, tn)
    # One FLOP count for both sides (the same model), independent of how a side computes it
    # (Winograd needs fewer multiplications than the convolution it replaces): 2 per MAC of
    # every convolution and matmul of the forward pass, counted by torch.utils.flop_counter on
    # the PyTorch twin. A train step counts 3x its forward pass (the usual convention; the
    # frameworks' own backward counts disagree on depthwise convolutions, both counting their
    # kernel gradient as if dense). XLA's cost analysis of lowlight's forward is recorded too.
    fwd_flops = th.infer_flops(n) / n
    row["flops_per_image_fwd"] = {"torch_flop_counter": fwd_flops,
                                  "xla_cost_analysis": jx.infer_flops(n) / n}
    if "train" in row:
        row["train"]["model_flops"] = 3 * fwd_flops * b
        row["train"]["lowlight_gflops_s"] = 3 * fwd_flops * b / min(row["train"]["_jt"]) / 1e9
        row["train"]["torch_gflops_s"] = 3 * fwd_flops * b / min(row["train"]["_tt"]) / 1e9
        del row["train"]["_jt"], row["train"]["_tt"]
    row["throughput"] = {
        "batch": n, "lowlight_img_s": n / min(jt), "torch_img_s": n / min(tt), "runs": len(jt),
        "lowlight_gflops_s": fwd_flops * n / min(jt) / 1e9,
        "torch_gflops_s": fwd_flops * n / min(tt) / 1e9,
    }
    row["throughput"]["ratio"] = row["throughput"]["lowlight_img_s"] / row["throughput"][
        "torch_img_s"]
    for key in ("train", "throughput"):
        if key in row:
            for side in ("lowlight", "torch"):
                row[key][f"{side}_peak_frac"] = row[key][f"{side}_gflops_s"] / peak
    row["load"].append(_load())
    return row


def _fmt_row(r: dict) -> str:
    name = r["model"] + (f"[{r['conv_impl']}]" if r.get("conv_impl") else "")
    tr = r.get("train")
    train = (f"{tr['lowlight_img_s']:7.2f} {tr['torch_img_s']:7.2f} {tr['ratio']:5.2f}x "
             f"{100 * tr['lowlight_peak_frac']:4.0f}% {100 * tr['torch_peak_frac']:4.0f}%"
             if tr else f"{'-':>7} {'-':>7} {'-':>6} {'-':>5} {'-':>5}")
    lat = r["latency_b1"]
    tp = r["throughput"]
    ll, th = lat["lowlight"], lat["torch"]
    return (f"{name:<24} {train} | {ll['mean_ms']:7.1f} {ll['p95_ms']:7.1f} "
            f"{th['mean_ms']:7.1f} {th['p95_ms']:7.1f} {lat['ratio_mean']:5.2f}x | "
            f"{tp['lowlight_img_s']:7.1f} {tp['torch_img_s']:7.1f} {tp['ratio']:5.2f}x "
            f"{100 * tp['lowlight_peak_frac']:4.0f}% {100 * tp['torch_peak_frac']:4.0f}% | "
            f"{min(r['load']):.1f}-{max(r['load']):.1f}")


_LAT = "latency b1 ms: ll mean/p95, torch mean/p95, ratio"
HEADER = (f"{'model':<24} {'train img/s (b32)':^37} | {_LAT:^45} | "
          f"{'throughput b64 img/s':^35} | load\n"
          f"{'':<24} {'ll':>7} {'torch':>7} {'ratio':>6} {'ll%pk':>5} {'th%pk':>5} |"
          f"{'':>45} | {'ll':>7} {'torch':>7} {'ratio':>6} {'ll%pk':>5} {'th%pk':>5} |")


def _worker(args) -> dict:
    """One measurement in this (child) process: "peak", "model:NAME:IMPL" or "data"."""
    threads = E.pin_threads(args.threads)
    import torch

    torch.set_num_threads(threads)
    clock = Clock(args.clock)
    kind, _, rest = args._worker.partition(":")
    if kind == "peak":
        return matmul_peak(clock, runs=3 if args.quick else 5)
    if kind == "model":
        name, _, impl = rest.partition(":")
        return bench_model(name, impl or None, args, clock, args._peak)
    if kind == "data":
        import _bench_data as BD

        data = {}
        for key, fn in (("synth", BD.synth_renderer), ("readers", BD.readers),
                        ("grain", BD.grain_pipeline), ("verification", BD.verification_pairs),
                        ("search", BD.identification_search)):
            load = _load()
            data[key] = fn(args.quick)
            data[key]["load"] = load
            print(f"{key}: " + json.dumps({k: v for k, v in data[key].items() if k != "raw"},
                                          default=float), flush=True)
        return data
    raise ValueError(args._worker)


def _spawn(spec: str, extra: list[str] | None = None) -> dict:
    """Runs one measurement in a fresh process (memory is returned to the system after each
    model: with MALLOC_TUNABLES a process keeps its high-water mark) and returns its JSON."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--_worker", spec,
               "--_result", f.name, *(extra or [])]
        subprocess.run(cmd, check=True)
        with open(f.name) as r:
            return json.load(r)


def main(argv=None):
    args = _args(argv)
    if args.malloc == "reuse" and argv is None:
        E.reexec_with_malloc_tunables(__file__)
    if args._worker:
        out = _worker(args)
        with open(args._result, "w") as f:
            json.dump(out, f, default=float)
        return

    t_start = time.perf_counter()
    threads = len(os.sched_getaffinity(0)) if args.threads <= 0 else args.threads
    result = {"command": " ".join(["python", "tools/bench.py"] + sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
              "threads": threads, "clock": args.clock, "quick": args.quick,
              "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "load_start": _load()}
    print(f"machine: {result['machine'].get('Model name')} | {threads} threads | "
          f"clock={args.clock} | malloc={args.malloc} | load {result['load_start']:.2f}",
          flush=True)
    peak = _spawn("peak")
    result["matmul_peak"] = peak
    print(f"fp32 matmul peak (2048^2, 4096^2): jax {peak['jax_gflops']:.0f} GFLOP/s, torch "
          f"{peak['torch_gflops']:.0f} GFLOP/s -> peak {peak['peak_gflops']:.0f}", flush=True)

    rows = []
    print(HEADER, flush=True)
    for name in args.models:
        for impl in (args.impls if name in CONV_IMPL_MODELS else [""]):
            row = _spawn(f"model:{name}:{impl}", ["--_peak", str(peak["peak_gflops"])])
            rows.append(row)
            print(_fmt_row(row), flush=True)
            if row.get("profile"):
                print(row["profile"], flush=True)
    result["models"] = rows
    if not args.no_data:
        result["data"] = _spawn("data")
    result["elapsed_s"] = time.perf_counter() - t_start
    print(f"elapsed {result['elapsed_s'] / 60:.1f} min", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=float)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
