r"""Records per second of the real-format readers on ONE core, on generated fixtures.

Writes, in a temporary folder, `--num` JPEG faces (a pool of `--pool` distinct SynthFaces
renders, reused: the readers' cost does not depend on which face it is) as an insightface
RecordIO pack, a verification .bin, an identity-folder tree and an LFW pairs.txt, then times:

  * RecordIO random access: `ds[i]` over a shuffled order (decode included), and `read_raw`
    (I/O + framing only); the lazy `labels` pass; sequential scan: `iter_records` + decode, and
    the index rebuild (`scan_index`, no payload);
  * .bin: `read_verification_bin` (restricted unpickle + decode of every image);
  * ImageFolder: construction, `ds[i]` over all images, construction with validate=True;
  * LFWPairs: construction + `load()`.

Threads are pinned to 1 before numpy / OpenCV load. Both wall-clock and process-CPU rates are
printed (on a shared machine the CPU rate is the steadier estimate). Files are fresh in the page
cache, so these are warm-cache numbers: on a cold network disk, I/O dominates.

    python tools/bench_readers.py [--num 3000] [--size 112] [--pool 100] [--repeats 3]
"""

from __future__ import annotations

import argparse  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import _single_core  # noqa: F401  (pins threads; must precede numpy)
import numpy as np  # noqa: E402
from _single_core import best_rate as _rate
from absl import logging  # noqa: E402

from lowlight.data.image_folder import ImageFolder, encode_image  # noqa: E402
from lowlight.data.recordio import (  # noqa: E402
    RecordIO,
    iter_records,
    scan_index,
    unpack,
    write_recordio,
)
from lowlight.data.sources import decode_image  # noqa: E402
from lowlight.data.synthetic import SynthFaces  # noqa: E402
from lowlight.data.verification_sets import (  # noqa: E402
    LFWPairs,
    read_verification_bin,
    write_verification_bin,
)


def _row(label: str, n: int, rates: tuple[float, float], unit: str = "records/s") -> None:
    wall, cpu = rates
    print(f"{label:<46} n={n:>6}: {wall:9.0f} {unit} wall, {cpu:9.0f} {unit} CPU")


def _sequential_decode(rec_path: str) -> None:
    for _, record in iter_records(rec_path):
        header, data = unpack(record)
        if header.flag == 0 and data:  # image records (the header/identity records are empty)
            decode_image(data)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=3000, help="images per fixture")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--pool", type=int, default=100, help="distinct faces rendered")
    ap.add_argument("--per_identity", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    logging.set_verbosity(logging.ERROR)
    n, k = args.num, args.per_identity
    faces = SynthFaces(seed=0, num_identities=max(args.pool // k, 1), images_per_identity=k,
                       size=args.size)
    pool = [encode_image(im, ".jpg", 95)
            for im in faces.render_batch(np.arange(min(args.pool, len(faces))))["image"]]
    jpegs = [pool[i % len(pool)] for i in range(n)]
    labels = [i // k for i in range(n)]
    print(f"fixtures: {n} JPEG faces {args.size}x{args.size}, "
          f"{np.mean([len(b) for b in pool]) / 1024:.1f} KiB each, {n // k} identities")
    rng = np.random.default_rng(0)

    with tempfile.TemporaryDirectory() as tmp:
        # -- RecordIO -------------------------------------------------------------------------
        rec = os.path.join(tmp, "train.rec")
        t = time.perf_counter()
        write_recordio(rec, None, zip(jpegs, labels))
        print(f"write_recordio: {n / (time.perf_counter() - t):.0f} records/s "
              f"({os.path.getsize(rec) / 2**20:.1f} MiB)")
        ds = RecordIO(rec)
        order = rng.permutation(len(ds))
        _row("RecordIO random ds[i] (read + decode)", n,
             _rate(lambda: [ds[int(i)] for i in order], n, args.repeats))
        _row("RecordIO random read_raw (no decode)", n,
             _rate(lambda: [ds.read_raw(int(i)) for i in order], n, args.repeats))

        def labels_pass():
            ds._labels = None
            return ds.labels

        _row("RecordIO labels (lazy pass, header reads)", n, _rate(labels_pass, n, args.repeats))
        _row("RecordIO sequential iter_records + decode", n,
             _rate(lambda: _sequential_decode(rec), n, args.repeats))
        _row("RecordIO scan_index (rebuild .idx)", n,
             _rate(lambda: scan_index(rec), n, args.repeats))

        # -- verification .bin ----------------------------------------------------------------
        pairs = n // 2
        bin_path = os.path.join(tmp, "lfw.bin")
        write_verification_bin(bin_path, jpegs[:2 * pairs], rng.random(pairs) < 0.5)
        _row("read_verification_bin (unpickle + decode)", 2 * pairs,
             _rate(lambda: read_verification_bin(bin_path), 2 * pairs, args.repeats),
             "images/s")

        # -- identity folders -----------------------------------------------------------------
        root = os.path.join(tmp, "ids")
        for i, (data, lab) in enumerate(zip(jpegs, labels)):
            person = f"person_{lab:05d}"
            os.makedirs(os.path.join(root, person), exist_ok=True)
            with open(os.path.join(root, person, f"{person}_{i % k + 1:04d}.jpg"), "wb") as f:
                f.write(data)
        _row("ImageFolder construction (listing)", n,
             _rate(lambda: ImageFolder(root), n, args.repeats), "files/s")
        folder = ImageFolder(root)
        order = rng.permutation(len(folder))
        _row("ImageFolder random ds[i] (open + decode)", n,
             _rate(lambda: [folder[int(i)] for i in order], n, args.repeats), "images/s")
        _row("ImageFolder construction, validate=True", n,
             _rate(lambda: ImageFolder(root, validate=True), n, args.repeats), "images/s")

        # -- LFW pairs.txt on the same tree -----------------------------------------------------
        people = sorted(set(labels))
        lines = [f"1\t{pairs // 2}"]
        for p in range(pairs // 2):
            lab = people[p % len(people)]
            lines.append(f"person_{lab:05d}\t1\t2")
        for p in range(pairs - pairs // 2):
            a, b = people[p % len(people)], people[(p + 1) % len(people)]
            lines.append(f"person_{a:05d}\t1\tperson_{b:05d}\t3")
        pairs_txt = os.path.join(tmp, "pairs.txt")
        with open(pairs_txt, "w") as f:
            f.write("\n".join(lines) + "\n")
        _row("LFWPairs construction + load()", pairs,
             _rate(lambda: LFWPairs(root, pairs_txt).load(), pairs, args.repeats), "pairs/s")


if __name__ == "__main__":
    main()
