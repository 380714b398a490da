"""Where an XLA:CPU program spends its time: per-HLO-op durations from `jax.profiler`, grouped.

`tools/bench.py --profile` and docs/performance.md use this to show *why* a model runs at the
speed it does. The profiler's trace names every executed thunk after its HLO instruction
(`ynn_fusion.146`, `convolution-base-dilated.7`, `loop_multiply_fusion.3`, ...); the optimised
HLO text (`compiled.as_text()`) says what each instruction is. Joining the two gives a breakdown
into categories a reader can act on:

  conv fwd            convolutions of the forward pass
  conv dgrad          input gradients (transposed convolutions); "strided" = XLA's lhs-dilated
                      form, which multiplies the zeros it inserts (s*s more work at stride s)
  conv wgrad          kernel gradients (a convolution whose window is the whole feature map)
  dot fwd / dot bwd   matmuls (dense layers, convolutions written as dot_general)
  elementwise         loop fusions: BatchNorm apply, PReLU, residual adds, optimizer update
  reduce              reduction fusions: BatchNorm statistics and their gradients
  copy/transpose      layout changes XLA inserted (`transpose`, `copy` fusions)
  other               everything else (slices, pads, scatters, while loops, ...)

Backward-pass instructions are the ones whose `op_name` metadata goes through `transpose(`
(JAX's name for the VJP of a traced function). The trace is wall-clock time: on a loaded
machine every op is inflated, so read the *shares*, not the absolute milliseconds.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile

import jax

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (\S+?) ([\w\-]+)\((.*)$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OPNAME = re.compile(r'op_name="([^"]*)"')
_WINDOW = re.compile(r"window=\{size=(\d+)x(\d+)")

CATEGORIES = ("conv fwd", "conv dgrad", "conv dgrad strided", "conv wgrad", "dot fwd",
              "dot bwd", "elementwise", "reduce", "copy/transpose", "other")


def _computations(hlo: str) -> dict[str, list[str]]:
    """Computation name -> its instruction lines (the ENTRY one under "ENTRY")."""
    comps: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        if line and not line.startswith(" ") and "{" in line and "(" in line:
            name = line.split("(")[0].split()[-1].lstrip("%")
            current = "ENTRY" if line.startswith("ENTRY") else name
            comps[current] = []
        elif current is not None and line.startswith("  "):
            comps[current].append(line)
    return comps


def _classify_conv(line: str, backward: bool) -> str:
    if not backward:
        return "conv fwd"
    if "lhs_dilate" in line:
        return "conv dgrad strided"
    m = _WINDOW.search(line)
    if m and max(int(m.group(1)), int(m.group(2))) > 11:  # window = a whole feature map
        return "conv wgrad"
    return "conv dgrad"


def classify(hlo: str) -> dict[str, tuple[str, str]]:
    """Instruction name (as the trace names it) -> (category, op_name metadata)."""
    comps = _computations(hlo)
    out: dict[str, tuple[str, str]] = {}
    for line in comps.get("ENTRY", []):
        m = _INSTR.match(line)
        if not m:
            continue
        name, opcode = m.group(1), m.group(3)
        opname = (_OPNAME.search(line) or [None, ""])[1]
        backward = "transpose(" in opname
        body = [line]
        if opcode == "fusion":
            called = _CALLS.search(line)
            body = comps.get(called.group(1), []) if called else []
        text = "\n".join(body)
        conv = [b for b in body if " convolution(" in b]
        if conv:
            name = (_OPNAME.search(conv[0]) or [None, opname])[1]
            cat = _classify_conv(conv[0], "transpose(" in name)
        elif " dot(" in text:
            cat = "dot bwd" if backward else "dot fwd"
        elif opcode in ("transpose", "copy") or re.search(r"\b(transpose|copy)_?\w*fusion", name):
            cat = "copy/transpose"
        elif " reduce(" in text or opcode == "reduce":
            cat = "reduce"
        elif opcode == "fusion":
            cat = "elementwise"
        else:
            cat = "other"
        out[name] = (cat, opname)
    return out


def trace_durations(fn, *args, runs: int = 2) -> dict[str, float]:
    """Mean wall-clock seconds per call of each executed HLO thunk of `fn(*args)` (jitted)."""
    jax.block_until_ready(fn(*args))  # compile outside the trace
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(runs):
                jax.block_until_ready(fn(*args))
        path = sorted(glob.glob(os.path.join(tmp, "**", "perfetto_trace.json.gz"),
                                recursive=True))[-1]
        with gzip.open(path) as f:
            data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    total: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            total[e["name"]] += e["dur"] * 1e-6 / runs
    return dict(total)


def breakdown(fn, *args, runs: int = 2, top: int = 8) -> dict:
    """{"total_s", "categories": {cat: seconds}, "top": [(name, cat, seconds, op_name)]}."""
    hlo = fn.lower(*args).compile().as_text()
    kinds = classify(hlo)
    durations = trace_durations(fn, *args, runs=runs)
    cats = dict.fromkeys(CATEGORIES, 0.0)
    rows = []
    for name, sec in durations.items():
        if name not in kinds:
            continue  # runtime bookkeeping events (executor, python frames)
        cat, opname = kinds[name]
        cats[cat] += sec
        rows.append((name, cat, sec, opname))
    rows.sort(key=lambda r: -r[2])
    return {"total_s": sum(cats.values()), "categories": cats, "top": rows[:top]}


def format_breakdown(title: str, b: dict) -> str:
    total = b["total_s"] or 1.0
    lines = [f"{title}: {b['total_s'] * 1e3:.0f} ms in HLO ops per call"]
    for cat, sec in sorted(b["categories"].items(), key=lambda kv: -kv[1]):
        if sec > 0:
            lines.append(f"  {cat:<20} {sec * 1e3:9.1f} ms  {100 * sec / total:5.1f}%")
    lines.append("  slowest ops:")
    for name, cat, sec, opname in b["top"]:
        lines.append(f"    {sec * 1e3:8.1f} ms  {cat:<18} {name:<32} {opname[-70:]}")
    return "\n".join(lines)
