r"""Contact sheet of the synthetic face world, for people to look at.

Rows are people; columns are every lighting condition of `lowlight.data.conditions.CONDITIONS`
(the same sample rendered under each, via the condition override), then the skin mask and the
canonical (relighting) target. Landmarks of the first column are drawn as dots.

    python tools/synth_preview.py --out docs/synth_preview.png [--rows 6] [--seed 0] [--size 112]
"""

from __future__ import annotations

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lowlight.data import conditions  # noqa: E402
from lowlight.data.synthetic import ETHNICITIES, GENDERS, SynthFaces  # noqa: E402


def sheet(ds: SynthFaces, identities, image_idx: int = 0):
    """Returns the figure: rows = identities, columns = conditions + skin mask + canonical."""
    names = list(conditions.CONDITIONS)
    cols = names + ["skin mask", "canonical"]
    fig, axes = plt.subplots(len(identities), len(cols),
                             figsize=(1.25 * len(cols), 1.38 * len(identities)), squeeze=False)
    for r, pid in enumerate(identities):
        idx = pid * ds.images_per_identity + image_idx
        b = ds.render_batch([idx] * len(names), condition=names)
        panels = list(b["image"]) + [b["skin_mask"][0], b["canonical"][0]]
        for c, (ax, img) in enumerate(zip(axes[r], panels)):
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0,
                      vmax=1 if img.ndim == 2 else None, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=8)
            if c == len(cols) - 1:
                lm = b["landmarks"][0]
                ax.plot(lm[:, 0], lm[:, 1], ".", ms=2.5, color="#00ff66")
        a = {k: int(b[k][0]) for k in ("age", "gender", "ethnicity")}
        axes[r][0].set_ylabel(f"id {pid}\n{a['age']} {GENDERS[a['gender']][0].upper()} "
                              f"{ETHNICITIES[a['ethnicity']]}", fontsize=7)
    fig.subplots_adjust(left=0.07, right=0.995, top=0.95, bottom=0.005, wspace=0.04, hspace=0.06)
    return fig


def diverse_identities(ds: SynthFaces, rows: int, pool: int = 300) -> list[int]:
    """Greedy pick of people covering ethnicities, both genders and child/adult/elderly ages."""
    bucket = lambda a: 0 if a < 16 else (1 if a < 55 else 2)
    attrs = {i: ds.identity_attributes(i) for i in range(min(pool, ds.num_identities))}
    chosen, eths, ages, last_g = [], set(), set(), None
    for _ in range(min(rows, len(attrs))):
        def score(i, last_g=last_g):
            a = attrs[i]
            return (2 * (a["ethnicity"] not in eths) + (a["gender"] != last_g)
                    + (bucket(a["age"]) not in ages), -i)
        best = max((i for i in attrs if i not in chosen), key=score)
        chosen.append(best)
        a = attrs[best]
        eths.add(a["ethnicity"])
        ages.add(bucket(a["age"]))
        last_g = a["gender"]
        if len(eths) == len(ETHNICITIES):
            eths.clear()
        if len(ages) == 3:
            ages.clear()
    return chosen


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output PNG path")
    ap.add_argument("--rows", type=int, default=6, help="number of people (rows)")
    ap.add_argument("--seed", type=int, default=0, help="world seed")
    ap.add_argument("--size", type=int, default=112, help="image side in pixels")
    ap.add_argument("--first", type=int, default=None,
                    help="show identities first..first+rows-1 (default: a diverse selection)")
    ap.add_argument("--dpi", type=int, default=90)
    ap.add_argument("--colors", type=int, default=256,
                    help="palette size of the saved PNG (0 = full RGB); keeps docs images small")
    args = ap.parse_args(argv)
    ds = SynthFaces(seed=args.seed, num_identities=max(300, (args.first or 0) + args.rows),
                    size=args.size)
    ids = (diverse_identities(ds, args.rows) if args.first is None
           else range(args.first, args.first + args.rows))
    fig = sheet(ds, ids)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.colors:
        import io

        from PIL import Image

        buf = io.BytesIO()
        fig.savefig(buf, dpi=args.dpi, format="png")
        img = Image.open(buf).convert("RGB")
        img.quantize(colors=args.colors, method=Image.Quantize.MEDIANCUT).save(
            args.out, optimize=True)
    else:
        fig.savefig(args.out, dpi=args.dpi)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
