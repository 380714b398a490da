"""`lowlight`: face verification, analysis and identification from the command line (issue 8 §3).

  lowlight verify A.jpg B.jpg [--json]           one person or two? (calibrated threshold)
  lowlight analyze IMG|FOLDER... [--json] [--draw OUT.png]
                                                  per face: box, lighting, age, gender, ethnicity
  lowlight enroll --gallery G NAME IMG...         add NAME's faces to the gallery folder G
  lowlight identify --gallery G IMG [--top-k K]   the closest enrolled names

Models are run directories of `python -m lowlight.main` (`--recognition=DIR --attributes=DIR
--lighting=DIR --relight=DIR --skin=DIR`); a flag not given is read from the environment
(`LOWLIGHT_RECOGNITION`, ...), then from the JSON file of `--config` / `LOWLIGHT_CONFIG` (keys
as the flags, e.g. {"recognition": "runs/vit_magface", "detector": "haar_clahe"}).
Problems a user can fix — an unreadable image, no face, a missing or wrong run, a bad gallery —
print one line `lowlight: error: ...` naming the file and exit with status 2
(`LOWLIGHT_TRACEBACK=1` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import json
import logging as py_logging
import os
import sys
from typing import Any

#: Settings the model options resolve (flag > environment > config file > default).
SETTINGS: dict[str, Any] = {"recognition": "", "attributes": "", "lighting": "", "relight": "",
                            "skin": "", "detector": "retinaface", "score_threshold": 0.5,
                            "batch_size": 16}
_HELP = {
    "recognition": "recognition run (embeddings, verify / enroll / identify)",
    "attributes": "attributes run, or an attributes_routed run (paper A routing)",
    "lighting": "lighting-classifier run (reports each face's light; routes attributes)",
    "relight": "relighting run applied before the skin and recognition models",
    "skin": "skin-segmentation run (reports each face's skin fraction)",
}


class UsageError(Exception):
    """A mistake on the command line (exit status 2)."""


# ------------------------------------------------------------------------------ options
def _model_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("models (else LOWLIGHT_<NAME> in the environment, else --config)")
    for role, text in _HELP.items():
        g.add_argument(f"--{role}", metavar="DIR", help=text)
    g.add_argument("--detector", choices=("retinaface", "haar", "haar_clahe", "none"),
                   help="face detector (default retinaface; 'none': each image is one face)")
    g.add_argument("--score-threshold", type=float, help="minimum detector score (0.5)")
    g.add_argument("--batch-size", type=int, help="faces per model call (16)")
    g.add_argument("--config", metavar="FILE", help="JSON file with any of: "
                   + ", ".join(SETTINGS) + " (default: $LOWLIGHT_CONFIG)")
    return p


def resolve_settings(args: argparse.Namespace, environ=os.environ) -> dict[str, Any]:
    """Model settings from flags, then LOWLIGHT_* variables, then the config file."""
    path = args.config or environ.get("LOWLIGHT_CONFIG", "")
    from_file: dict[str, Any] = {}
    if path:
        try:
            with open(path) as f:
                from_file = json.load(f)
        except (OSError, ValueError) as e:
            raise UsageError(f"{path}: cannot read the config file ({e})") from None
        if not isinstance(from_file, dict):
            raise UsageError(f"{path}: expected a JSON object with keys {', '.join(SETTINGS)}")
        unknown = sorted(set(from_file) - set(SETTINGS))
        if unknown:
            raise UsageError(f"{path}: unknown keys {unknown}; valid: {', '.join(SETTINGS)}")
    out = {}
    for key, default in SETTINGS.items():
        value = getattr(args, key, None)
        if value is None:
            value = environ.get(f"LOWLIGHT_{key.upper()}") or from_file.get(key, default)
        try:
            out[key] = type(default)(value)
        except (TypeError, ValueError):
            raise UsageError(f"{key}: expected a {type(default).__name__}, got {value!r}") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    models = _model_options()
    p = argparse.ArgumentParser(prog="lowlight", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    v = sub.add_parser("verify", parents=[models], help="are two faces one person?")
    v.add_argument("image_a", metavar="A")
    v.add_argument("image_b", metavar="B")
    v.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = sub.add_parser("analyze", parents=[models], help="lighting and attributes per face")
    a.add_argument("images", nargs="+", metavar="IMG", help="image files or folders")
    a.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a.add_argument("--draw", metavar="OUT", help="write the image with boxes and labels "
                   "(one image: a file such as out.png; several: a folder)")
    a.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    e = sub.add_parser("enroll", parents=[models], help="add a person's faces to a gallery")
    e.add_argument("--gallery", required=True, metavar="G", help="gallery folder")
    e.add_argument("name")
    e.add_argument("images", nargs="+", metavar="IMG")
    i = sub.add_parser("identify", parents=[models], help="closest names in a gallery")
    i.add_argument("--gallery", required=True, metavar="G", help="gallery folder")
    i.add_argument("image", metavar="IMG")
    i.add_argument("--top-k", type=int, default=5, help="names to list (5)")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def _pipeline(settings: dict[str, Any]):
    from lowlight.pipeline import Pipeline, PipelineConfig

    try:
        config = PipelineConfig(**settings)
    except ValueError as e:  # e.g. a detector name from the config file
        raise UsageError(str(e)) from None
    return Pipeline(config)


# ------------------------------------------------------------------------------ commands
def _fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def cmd_verify(args, settings, out) -> int:
    from lowlight.pipeline import read_image

    images = [read_image(args.image_a), read_image(args.image_b)]
    pipe = _pipeline(settings)
    res = pipe.verify(*images, names=(args.image_a, args.image_b))
    if args.json:
        print(json.dumps({**res, "models": pipe.describe()}, indent=2), file=out)
        return 0
    cal = pipe.calibration
    verdict = "same person" if res["same"] else "different people"
    print(f"similarity {res['similarity']:.4f} -> {verdict} (threshold {cal.threshold:.4f}: "
          f"{cal.describe()})", file=out)
    for tag, f in zip("AB", res["faces"]):
        light = "-" if f["lighting"] is None else f"{f['lighting']} " \
            f"{f['lighting_probs'][f['lighting']]:.2f}"
        print(f"  {tag} {f['image']}: face {f['index'] + 1} of {f['num_faces']}, box "
              f"{[round(x) for x in f['box']]}, light {light}, brightness "
              f"{f['brightness']:.2f}", file=out)
    return 0


def _table(results) -> str:
    head = ("image", "face", "box", "score", "light", "bright", "age", "gender", "ethnicity",
            "skin")
    rows = []
    for r in results:
        if r.error:  # reported on stderr
            continue
        if not r.faces:
            rows.append((r.name, "-", "no face") + ("",) * 7)
        for f in r.faces:
            a = f.attributes or {}
            light = "-" if f.lighting is None else f"{f.lighting} " \
                f"{f.lighting_probs[f.lighting]:.2f}"
            rows.append((r.name, str(f.index), " ".join(str(round(v)) for v in f.box),
                         f"{f.score:.2f}", light, f"{f.brightness:.2f}",
                         _fmt(a.get("age"), ".0f"), a.get("gender", "-"),
                         a.get("ethnicity", "-"), _fmt(f.skin_fraction)))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()
    return "\n".join([line(head), *(line(r) for r in rows)])


def cmd_analyze(args, settings, out) -> int:
    from lowlight.inference import draw
    from lowlight.inference.errors import InputError
    from lowlight.pipeline import expand_paths, read_image

    pipe = _pipeline(settings)
    items = expand_paths(args.images)
    if args.draw and len(items) > 1 and not os.path.isdir(args.draw):
        raise UsageError(f"--draw {args.draw}: {len(items)} images; give an existing folder")
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    results = list(pipe.analyze_paths(args.images, progress=progress and len(items) > 1))
    if args.draw:
        for r in results:
            if r.error:
                continue
            path = args.draw if len(items) == 1 else os.path.join(
                args.draw, os.path.splitext(os.path.basename(r.name))[0] + ".png")
            draw.write_image(path, draw.draw_faces(read_image(r.name), r.faces))
    if args.json:
        print(json.dumps({"models": pipe.describe(), "images": [r.to_json() for r in results]},
                         indent=2), file=out)
    else:
        print(_table(results), file=out)
    for r in results:
        if r.error:
            print(f"lowlight: warning: skipped {r.error}", file=sys.stderr)
    if not any(r.faces for r in results):
        raise InputError("no face found in " + ", ".join(r.name for r in results if not r.error))
    return 0


def cmd_enroll(args, settings, out) -> int:
    from lowlight.gallery import Gallery
    from lowlight.pipeline import read_image

    images = [read_image(p) for p in args.images]   # every file checked before any change
    pipe = _pipeline(settings)
    model = pipe.model_record()
    gallery = Gallery.open_or_create(args.gallery, model)
    gallery.check_model(model)
    results = pipe.analyze(images, args.images)
    faces = [r.primary() for r in results]
    sources = [{"source": os.path.abspath(r.name), "box": [round(v, 2) for v in f.box]}
               for r, f in zip(results, faces)]
    gallery.add(args.name, [f.embedding for f in faces], sources, model)
    gallery.save()
    print(f"enrolled {args.name!r}: {len(faces)} face(s); {args.gallery} now holds "
          f"{len(gallery.names)} name(s), {len(gallery)} face(s)", file=out)
    return 0


def cmd_identify(args, settings, out) -> int:
    from lowlight.gallery import Gallery
    from lowlight.pipeline import read_image

    if args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {args.top_k}")
    gallery = Gallery.open(args.gallery)
    image = read_image(args.image)
    pipe = _pipeline(settings)
    face = pipe.analyze([image], [args.image])[0].primary()
    matches = gallery.search(face.embedding, pipe.model_record(), args.top_k)
    cal = pipe.calibration
    rows = [{"rank": k + 1, "name": m.name, "similarity": m.similarity,
             "match": bool(m.similarity >= cal.threshold)} for k, m in enumerate(matches)]
    if args.json:
        print(json.dumps({"image": args.image, "face": face.to_json(), "matches": rows,
                          "calibration": cal.to_dict()}, indent=2), file=out)
        return 0
    best = rows[0]
    head = f"{best['name']} (similarity {best['similarity']:.4f})" if best["match"] else \
        f"no enrolled match (best {best['name']} {best['similarity']:.4f})"
    print(f"{args.image}: {head}; threshold {cal.threshold:.4f}", file=out)
    for r in rows:
        print(f"  {r['rank']:>2}. {r['name']:<24} {r['similarity']:.4f}"
              f"{'  match' if r['match'] else ''}", file=out)
    return 0


COMMANDS = {"verify": cmd_verify, "analyze": cmd_analyze, "enroll": cmd_enroll,
            "identify": cmd_identify}


class _QuietLibraries(py_logging.Filter):
    """Keeps orbax's / jax's informational warnings (checkpoint metadata, ...) off the console;
    lowlight's own warnings still show."""

    def filter(self, record) -> bool:
        noisy = any(n in record.pathname for n in ("/orbax/", "/jax/", "/etils/", "/grain/"))
        return record.levelno >= py_logging.ERROR or not noisy


def main(argv: list[str] | None = None, out=None) -> int:
    """Runs the command line; returns the exit status (0 ok, 2 a problem the user can fix).

    Run as the program (``argv`` None), it first keeps freed memory for reuse on CPU-only
    installs (``lowlight.cpu_malloc``: batch-1 inference 1.6x faster with fast_conv)."""
    from absl import logging as absl_logging

    if argv is None:
        from lowlight import cpu_malloc

        cpu_malloc.apply()

    out = sys.stdout if out is None else out
    logger = absl_logging.get_absl_logger()
    if not any(isinstance(f, _QuietLibraries) for f in logger.filters):
        logger.addFilter(_QuietLibraries())
    args = build_parser().parse_args(argv)
    from lowlight.data.image_io import CorruptImageError
    from lowlight.inference.errors import GalleryError, InputError, RunError

    try:
        return COMMANDS[args.command](args, resolve_settings(args), out)
    except (UsageError, InputError, RunError, GalleryError, CorruptImageError, OSError) as e:
        if os.environ.get("LOWLIGHT_TRACEBACK"):
            raise
        print(f"lowlight: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
