r"""Images per second of the synthetic face world on ONE core.

Measures the batched renderer (`SynthFaces.render_batch`, the pipeline's path) and per-item
access (`ds[i]`, what a plain random-access reader does), at 112x112 by default. Threads are
pinned to 1 before numpy / OpenCV load. Both wall-clock and process-CPU rates are printed: on a
shared machine the CPU-time rate is the steadier estimate of what one dedicated core does.

    python tools/bench_synth.py [--size 112] [--batch 256] [--items 300] [--repeats 3]
"""

from __future__ import annotations

import argparse  # noqa: E402

import _single_core  # noqa: F401  (pins threads; must precede numpy)
import numpy as np  # noqa: E402
from _single_core import best_rate as _rate

from lowlight.data.synthetic import SynthFaces  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--batch", type=int, default=256, help="images per render_batch call")
    ap.add_argument("--items", type=int, default=300, help="images read one by one with ds[i]")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    ds = SynthFaces(seed=0, num_identities=10_000, images_per_identity=10, size=args.size)
    rng = np.random.default_rng(0)
    ds.render_batch(np.arange(16))  # builds the lazy noise bank and grids
    batches = [rng.choice(len(ds), args.batch, replace=False) for _ in range(args.repeats)]
    it = iter(batches)
    wall, cpu = _rate(lambda: ds.render_batch(next(it)), args.batch, args.repeats)
    print(f"render_batch ({args.batch} random indices, {args.size}x{args.size}): "
          f"{wall:7.0f} images/s wall, {cpu:7.0f} images/s CPU")
    items = rng.choice(len(ds), args.items, replace=False)
    wall, cpu = _rate(lambda: [ds[int(i)] for i in items], args.items, args.repeats)
    print(f"ds[i]        ({args.items} random indices, {args.size}x{args.size}): "
          f"{wall:7.0f} images/s wall, {cpu:7.0f} images/s CPU")


if __name__ == "__main__":
    main()
