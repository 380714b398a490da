r"""Converts a dataset (or a derived set) into a prepared TFDS-layout ArrayRecord dataset.

The format and the reader are `lowlight.data.prepared` (read back with
`PreparedSource(out, split)`, `config.data.name = "prepared"`, or `tfds.data_source(name,
data_dir=out)` — no TensorFlow needed either way). Output: `<out>/<name>/1.0.0/`.

Sources (--source):
  synth         the synthetic world (--num_identities, --images_per_identity, --size, --seed,
                --synth_options JSON, or a full --synth_spec JSON / file); identity-disjoint
                splits by --split_fractions (default 0.8,0.1,0.1 -> train/val/test)
  utkface       a UTKFace folder (--root); its own 70/20/10 train/val/test split
  image_folder  identity folders (--root); one "train" split unless --split_fractions
  recordio      an MXNet RecordIO pack (--root = the .rec, .idx beside it); label -> identity;
                one "train" split unless --split_fractions
  bin           an insightface verification .bin (--root = the file); split "test" (pairs)
  lfw           LFW pairs (--root = images, --pairs_txt); split "test" (pairs)
  prepared      a prepared dataset (--root; --splits to choose)
  pkg.mod:Class any other random-access reader, built as Class(**--source_kwargs) (with
                split=<name> for each of --splits, if given)

Derived sets (--derive):
  distortion / natural   paper A's DistortionFace / NaturalFace over every split (--simulate JSON
                         overrides the simulate ranges)
  illumination_test      paper B §4.2's test set from --test_split (default: "test", else the
                         only split): --num_clean untouched + --num_transformed protocol images
                         (30% low / 40% side / 30% over); identities of --exclude_identities (a
                         file, one per line) and of --exclude_from (prepared dataset[:split,...])
                         are dropped (--on_overlap=drop, counted) or refused (--on_overlap=refuse)

Examples:
    python tools/prepare.py --source=synth --num_identities=100 --images_per_identity=5 \
        --size=64 --out=/tmp/prepared
    python tools/prepare.py --source=utkface --root=/data/UTKFace --size=112 --derive=natural \
        --out=/data/prepared
    python tools/prepare.py --source=lfw --root=/data/lfw --pairs_txt=/data/pairs.txt \
        --derive=illumination_test --exclude_identities=train_names.txt --out=/data/prepared
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lowlight.data import prepared  # noqa: E402
from lowlight.data.sources import split_indices  # noqa: E402

DERIVED = ("none", "distortion", "natural", "illumination_test")
SPLIT_NAMES = {1: ("train",), 2: ("train", "test"), 3: ("train", "val", "test")}


def _json_arg(text: str | None) -> dict:
    """A JSON object given inline or as a file path."""
    if not text:
        return {}
    if os.path.isfile(text):
        with open(text) as f:
            return json.load(f)
    return json.loads(text)


def _fractions(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


class Labelled:
    """`(image, label)` items (RecordIO) as dicts {image, identity}: the label is the identity."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        image, label = self.source[i]
        return {"image": image, "identity": int(label)}

    @property
    def identities(self):
        return getattr(self.source, "labels", None)  # cheap: headers only


def identity_splits(source, fractions, seed: int, names=None) -> dict:
    """Identity-disjoint splits of `source`: identities split by `split_indices` (rule 'rest'),
    each split holding every image of its identities, in source order."""
    names = tuple(names or SPLIT_NAMES[len(fractions)])
    ids = prepared.identities_of(source)
    uniq, inverse = np.unique(ids, return_inverse=True)
    parts = split_indices(len(uniq), seed, fractions, names=names, rule="rest")
    return {s: prepared.Subset(source, np.flatnonzero(np.isin(inverse, parts[s])))
            for s in names}


def build_source(a) -> tuple[dict, dict, dict]:
    """(splits {name: source}, source description, names skipped by the source itself)."""
    kind, skipped = a.source, {}
    if kind == "synth":
        from lowlight.data.synthetic import SynthFaces

        if a.synth_spec:
            world = SynthFaces.from_spec(_json_arg(a.synth_spec))
        else:
            world = SynthFaces(seed=a.seed, num_identities=a.num_identities,
                               images_per_identity=a.images_per_identity, size=a.size or 112,
                               **_json_arg(a.synth_options))
        fr = _fractions(a.split_fractions or "0.8,0.1,0.1")
        splits = identity_splits(world, fr, a.seed) if len(fr) > 1 else {"train": world}
        desc = {"type": "synth", "spec": world.spec, "split": {"by": "identity",
                                                             "fractions": fr, "seed": a.seed}}
        return splits, desc, skipped
    if kind == "utkface":
        from lowlight.data.sources import UTKFace

        splits = {s: UTKFace(_need(a.root, "--root"), split=s, seed=a.seed, size=a.size,
                             validate=a.validate) for s in UTKFace.SPLITS}
        # the paper rule leaves at most one file out of every split: name it, not convert it
        unused = UTKFace(a.root, split="unused", seed=a.seed, validate=a.validate).files
        desc = {"type": "utkface", "root": os.path.abspath(a.root), "seed": a.seed,
                "size": a.size, "validate": a.validate, "split": "paper A 70/20/10",
                "unused_files": list(unused)}
        return splits, desc, splits["train"].skipped
    if kind == "image_folder":
        from lowlight.data.image_folder import ImageFolder

        src = ImageFolder(_need(a.root, "--root"), size=a.size, validate=a.validate)
        fr = _fractions(a.split_fractions or "1")
        splits = identity_splits(src, fr, a.seed) if len(fr) > 1 else {"train": src}
        desc = {"type": "image_folder", "root": os.path.abspath(a.root), "size": a.size,
                "validate": a.validate, "num_classes": src.num_classes,
                "split": {"by": "identity", "fractions": fr, "seed": a.seed}}
        return splits, desc, src.skipped
    if kind == "recordio":
        from lowlight.data.recordio import RecordIO

        rec = RecordIO(_need(a.root, "--root"), size=a.size, validate=a.validate)
        src = Labelled(rec)
        fr = _fractions(a.split_fractions or "1")
        splits = identity_splits(src, fr, a.seed) if len(fr) > 1 else {"train": src}
        desc = {"type": "recordio", "path": os.path.abspath(a.root), "size": a.size,
                "validate": a.validate, "num_classes": rec.num_classes,
                "split": {"by": "identity", "fractions": fr, "seed": a.seed}}
        return splits, desc, rec.skipped
    if kind in ("bin", "lfw"):
        from lowlight.data import verification_sets as vs

        if kind == "bin":
            src = vs.VerificationBin(_need(a.root, "--root"), size=a.size)
            desc = {"type": "bin", "path": os.path.abspath(a.root), "size": a.size}
        else:
            src = vs.LFWPairs(_need(a.root, "--root"), _need(a.pairs_txt, "--pairs_txt"),
                              size=a.size)
            desc = {"type": "lfw", "root": os.path.abspath(a.root),
                    "pairs_txt": os.path.abspath(a.pairs_txt), "size": a.size}
        len(src)  # decodes once: fills dropped / skipped
        desc["dropped_pairs"] = {str(k): v for k, v in sorted(src.dropped.items())}
        return {"test": src}, desc, src.skipped
    if kind == "prepared":
        meta = prepared.read_metadata(_need(a.root, "--root"))
        names = a.splits.split(",") if a.splits else list(meta["splits"])
        splits = {s: prepared.PreparedSource(a.root, s) for s in names}
        return splits, {"type": "prepared", "path": splits[names[0]].path,
                        "source": meta["source"], "derived": meta["derived"]}, {}
    if ":" in kind:
        mod, cls = kind.split(":", 1)
        factory = getattr(importlib.import_module(mod), cls)
        kw = _json_arg(a.source_kwargs)
        names = a.splits.split(",") if a.splits else []
        splits = ({s: factory(**kw, split=s) for s in names} if names else
                  {"train": factory(**kw)})
        first = next(iter(splits.values()))
        skipped = getattr(first, "skipped", {})
        return splits, {"type": kind, "kwargs": kw}, skipped if isinstance(skipped, dict) else {}
    raise SystemExit(f"--source: unknown source {kind!r} (synth, utkface, image_folder, "
                     f"recordio, bin, lfw, prepared or module.path:Class)")


def _need(value, flag: str):
    if not value:
        raise SystemExit(f"{flag} is required for this --source")
    return value


def derive(a, splits: dict) -> tuple[dict, dict]:
    """(derived splits, description) for --derive."""
    if a.derive == "none":
        return splits, {}
    if a.derive in ("distortion", "natural"):
        from lowlight.data import illumination as il

        wrap = il.DistortionFace if a.derive == "distortion" else il.NaturalFace
        ranges = _json_arg(a.simulate)
        out = {s: wrap(src, seed=a.seed, **ranges) for s, src in splits.items()}
        simulated = {s: int(sum(w.is_simulated(i) for i in range(len(w))))
                     for s, w in out.items()}
        return out, {"type": a.derive, "paper": "A", "seed": a.seed, "ranges": ranges,
                     "simulated_of_source": simulated}
    name = a.test_split or ("test" if "test" in splits else None)
    if name is None and len(splits) == 1:
        name = next(iter(splits))
    if name not in splits:
        raise SystemExit(f"--test_split: choose one of {list(splits)}")
    src = splits[name]
    if len(src) and isinstance(src[0], dict) and "image" not in src[0] and "image1" in src[0]:
        src = prepared.PairImages(src)  # a pair set: sample its distinct images
    exclude = None
    if a.exclude_identities or a.exclude_from:
        exclude = set()
        if a.exclude_identities:
            with open(a.exclude_identities) as f:
                exclude |= {line.strip() for line in f if line.strip()}
        for spec in a.exclude_from or ():
            root, _, which = spec.partition(":")
            names = which.split(",") if which else list(prepared.read_metadata(root)["splits"])
            for s in names:
                exclude |= set(prepared.identities_of(
                    prepared.PreparedSource(root, s, keys=(a.identity_key,)),
                    a.identity_key).tolist())
    ts, report = prepared.illumination_test_set(
        src, num_clean=a.num_clean, num_transformed=a.num_transformed, seed=a.seed,
        paired=a.paired, identity_key=a.identity_key, exclude_identities=exclude,
        on_overlap=a.on_overlap, progress=not a.no_progress)
    report.update(type="illumination_test", paper="B §4.2", from_split=name,
                  exclude_from=a.exclude_from or [])
    return {"test": ts}, report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--source", required=True)
    p.add_argument("--out", required=True, help="data dir; the dataset goes to out/name/1.0.0")
    p.add_argument("--name", help="dataset name (default: source[_derive])")
    p.add_argument("--root", help="dataset folder / file of the source")
    p.add_argument("--pairs_txt", help="LFW pairs.txt")
    p.add_argument("--splits", help="comma list of splits (prepared / module:Class sources)")
    p.add_argument("--source_kwargs", help="JSON (inline or file) for a module:Class source")
    p.add_argument("--seed", type=int, default=0, help="world / split / derivation seed")
    p.add_argument("--size", type=int, default=None, help="image size (synth default 112)")
    p.add_argument("--validate", action="store_true", help="decode every file up front")
    p.add_argument("--num_identities", type=int, default=100)
    p.add_argument("--images_per_identity", type=int, default=10)
    p.add_argument("--synth_options", help="JSON of SynthFaces options")
    p.add_argument("--synth_spec", help="JSON (inline or file) of a full SynthFaces spec")
    p.add_argument("--split_fractions", help="identity-disjoint split, e.g. 0.8,0.1,0.1")
    p.add_argument("--derive", choices=DERIVED, default="none")
    p.add_argument("--simulate", help="JSON of paper A simulate ranges (distortion/natural)")
    p.add_argument("--test_split", help="split the illumination test set is sampled from")
    p.add_argument("--num_clean", type=int, default=5000)
    p.add_argument("--num_transformed", type=int, default=5000)
    p.add_argument("--paired", action=argparse.BooleanOptionalAction, default=True,
                   help="transform the same images that are kept clean (default)")
    p.add_argument("--identity_key", default="identity")
    p.add_argument("--exclude_identities", help="file: training identities, one per line")
    p.add_argument("--exclude_from", action="append",
                   help="prepared training dataset[:split,...] whose identities to exclude")
    p.add_argument("--on_overlap", choices=("drop", "refuse"), default="drop")
    p.add_argument("--image_format", choices=prepared.IMAGE_FORMATS, default="png")
    p.add_argument("--jpeg_quality", type=int, default=95)
    p.add_argument("--examples_per_shard", type=int, default=10_000)
    p.add_argument("--drop_keys", default="", help="comma list of item fields not to store")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--no_tfds_metadata", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    t0 = time.perf_counter()
    splits, desc, skipped = build_source(a)
    splits, derived = derive(a, splits)
    default = a.source.rsplit(":", 1)[-1].lower() if ":" in a.source else a.source
    name = a.name or (default if a.derive == "none" else f"{default}_{a.derive}")
    summary = prepared.write_prepared(
        a.out, splits, name=name, source=desc, source_skipped=skipped, derived=derived,
        image_format=a.image_format, jpeg_quality=a.jpeg_quality,
        examples_per_shard=a.examples_per_shard,
        drop_keys=[k for k in a.drop_keys.split(",") if k], overwrite=a.overwrite,
        progress=not a.no_progress, tfds_metadata=not a.no_tfds_metadata)
    print(prepared.format_summary(summary))
    total = sum(s["num_examples"] for s in summary["splits"].values())
    print(f"  {total} records in {time.perf_counter() - t0:.1f} s "
          f"(writing: {summary['records_per_second']:.0f} records/s)")
    return summary


if __name__ == "__main__":
    main()
