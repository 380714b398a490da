r"""Exports a trained stage of a lowlight run for deployment (`lowlight.export`).

    python tools/export.py --workdir=runs/vit_magface --out=embedder.llstage
    python tools/export.py --workdir=runs/a_nat_se --out=attributes.llstage \
        --platforms=cpu,cuda --batch_size=32

The artifact (serialized StableHLO + weights + a JSON manifest in one .npz) runs with
`lowlight.export.load_stage(FILE)(images)` wherever jax is installed; no lowlight model code,
flax or the run directory is needed there. Without --batch_size the batch dimension is symbolic.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="lowlight run directory")
    p.add_argument("--out", required=True, help="artifact file to write")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="fixed batch size (default: symbolic, any batch)")
    p.add_argument("--platforms", default="cpu",
                   help="comma-separated subset of cpu,cuda,rocm,tpu (default: cpu)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                   help="recognition: add the mirrored face's embedding (evaluation protocol)")
    args = p.parse_args(argv)

    from lowlight import export

    platforms = tuple(x.strip() for x in args.platforms.split(",") if x.strip())
    unknown = sorted(set(platforms) - {"cpu", "cuda", "rocm", "tpu"})
    if unknown:
        p.error(f"--platforms: unknown {', '.join(unknown)}; valid: cpu, cuda, rocm, tpu")
    try:
        blob = export.export_stage(args.workdir, batch_size=args.batch_size,
                                   platforms=platforms, step=args.step, flip=args.flip)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({len(blob) / 2**20:.1f} MiB): "
          f"{export.describe(export.read_manifest(args.out))}")
    return args.out


if __name__ == "__main__":
    main()
