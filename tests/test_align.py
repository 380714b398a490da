"""lowlight.align: Umeyama similarity, ArcFace template, align_face, detect_faces dispatch."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage import transform as sktf

from lowlight import align
from lowlight.data.synthetic import SynthFaces


def _skimage_similarity(src, dst) -> np.ndarray:
    if hasattr(sktf.SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26
        return sktf.SimilarityTransform.from_estimate(src, dst).params
    t = sktf.SimilarityTransform()
    assert t.estimate(src, dst)
    return t.params


def _similarity(angle_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), tx],
                     [scale * np.sin(a), scale * np.cos(a), ty], [0, 0, 1]])


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:2, :2].T + m[:2, 2]


# ------------------------------------------------------------------------------- umeyama
def test_umeyama_matches_skimage():
    rng = np.random.default_rng(0)
    for trial in range(20):
        src = rng.uniform(0, 200, (5, 2))
        dst = rng.uniform(0, 112, (5, 2)) if trial % 2 else align.ARCFACE_DST
        np.testing.assert_allclose(align.umeyama(src, dst), _skimage_similarity(src, dst),
                                   rtol=1e-9, atol=1e-9)
    # Mirrored points: the best *proper* similarity (no reflection), as skimage.
    src = align.ARCFACE_DST * [-1, 1]
    m = align.umeyama(src, align.ARCFACE_DST)
    assert np.linalg.det(m[:2, :2]) > 0
    np.testing.assert_allclose(m, _skimage_similarity(src, align.ARCFACE_DST), atol=1e-9)


def test_umeyama_recovers_an_exact_similarity():
    t = _similarity(-33.0, 1.7, 12.5, -40.0)
    src = np.random.default_rng(1).uniform(0, 100, (7, 2))
    np.testing.assert_allclose(align.umeyama(src, _apply(t, src)), t, atol=1e-10)


def test_umeyama_bad_input():
    with pytest.raises(ValueError, match="coincide"):
        align.umeyama(np.ones((5, 2)), align.ARCFACE_DST)
    with pytest.raises(ValueError, match="same shape"):
        align.umeyama(np.zeros((5, 2)), np.zeros((4, 2)))


# ------------------------------------------------------------------------------ template
def test_arcface_template_sizes():
    np.testing.assert_array_equal(align.arcface_template(112), align.ARCFACE_DST)
    np.testing.assert_allclose(align.arcface_template(224), align.ARCFACE_DST * 2)
    # insightface estimate_norm for 128: same scale as 112, shifted 8 px right.
    np.testing.assert_allclose(align.arcface_template(128)[0], [46.2946, 51.6963])
    np.testing.assert_allclose(align.arcface_template(256)[4], [2 * 70.7299 + 16, 2 * 92.2041])
    np.testing.assert_allclose(align.arcface_template(64), align.ARCFACE_DST * 64 / 112)
    with pytest.raises(ValueError, match="size"):
        align.arcface_template(0)


# ----------------------------------------------------------------------------- align_face
def test_align_face_on_template_is_identity():
    image = np.random.default_rng(2).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    out = align.align_face(image, align.ARCFACE_DST)
    assert out.dtype == np.uint8 and out.shape == (112, 112, 3)
    np.testing.assert_array_equal(out, image)
    # A 2x nearest upscale aligned with the doubled template (+0.5: pixel-centre offset) samples
    # midway between two equal pixels everywhere: the original again.
    big = cv2.resize(image, (224, 224), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(align.align_face(big, align.ARCFACE_DST * 2 + 0.5), image)


def test_align_face_undoes_a_known_rotation_and_scale():
    sample = SynthFaces(seed=3, num_identities=2, images_per_identity=1, size=112,
                        conditions=("normal",))[0]
    image, lmk = sample["image"], sample["landmarks"].astype(np.float64)
    t = _similarity(25.0, 1.6, 60.0, 10.0)  # rotate, enlarge, move into a 260 x 260 canvas
    moved = cv2.warpAffine(image, t[:2], (260, 260), flags=cv2.INTER_LINEAR)
    moved_lmk = _apply(t, lmk)

    # The transform found from the moved landmarks is the original one composed with t^-1 ...
    direct = align.umeyama(lmk, align.ARCFACE_DST)
    found = align.umeyama(moved_lmk, align.ARCFACE_DST)
    np.testing.assert_allclose(found @ t, direct, atol=1e-9)
    # ... so the moved landmarks land where the unmoved ones do: at the template, up to this
    # face's own deviation from it (a few pixels; a similarity cannot remove it).
    np.testing.assert_allclose(_apply(found, moved_lmk), _apply(direct, lmk), atol=1e-9)
    assert np.abs(_apply(found, moved_lmk) - align.ARCFACE_DST).max() < 6

    # And the crops agree pixel for pixel, up to one extra bilinear resampling.
    a, b = align.align_face(moved, moved_lmk), align.align_face(image, lmk)
    inner = (slice(16, 96), slice(16, 96))
    diff = np.abs(a[inner].astype(int) - b[inner].astype(int))
    assert diff.mean() < 3.0, diff.mean()


def test_align_face_bad_input():
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match=r"landmarks: expected \(5, 2\)"):
        align.align_face(image, np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"landmarks: expected \(5, 2\)"):
        align.align_face(image, np.zeros((5, 3)))
    with pytest.raises(ValueError, match="finite"):
        align.align_face(image, np.full((5, 2), np.nan))
    with pytest.raises(ValueError, match=r"image: expected \(H, W, 3\)"):
        align.align_face(np.zeros((64, 64, 4), np.uint8), align.ARCFACE_DST)
    with pytest.raises(TypeError, match="uint8"):
        align.align_face(np.zeros((64, 64, 3), np.int32), align.ARCFACE_DST)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        align.align_face(np.full((64, 64, 3), 2.0), align.ARCFACE_DST)
    with pytest.raises(ValueError, match="coincide"):
        align.align_face(image, np.ones((5, 2)))
    # Grey and float [0, 1] images are accepted and give RGB uint8.
    out = align.align_face(np.full((64, 64), 0.5), align.ARCFACE_DST / 2, size=56)
    assert out.shape == (56, 56, 3) and out.dtype == np.uint8 and out[28, 28].tolist() == [128] * 3


# --------------------------------------------------------------------------- detect_faces
def test_detect_faces_haar_methods_and_errors():
    import skimage.data

    photo = skimage.data.astronaut()
    dark = np.rint(photo * 0.1).astype(np.uint8)
    faces = align.detect_faces(photo, method="haar")
    assert len(faces) == 1 and faces[0]["landmarks"] is None
    assert all(isinstance(v, float) for v in faces[0]["box"])
    # Plain Haar loses the face at 10% brightness; the CLAHE pre-step finds it again.
    assert align.detect_faces(dark, method="haar") == []
    clahe = align.detect_faces(dark, method="haar_clahe")
    assert len(clahe) == 1
    np.testing.assert_allclose(clahe[0]["box"], faces[0]["box"], atol=10)
    assert align.detect_faces(photo, method="haar", score_threshold=1e6) == []
    with pytest.raises(ValueError, match="method: expected one of"):
        align.detect_faces(photo, method="mtcnn")
    with pytest.raises(ValueError, match="image: expected"):
        align.detect_faces(np.zeros((10, 10, 2), np.uint8))


def test_detect_then_align_puts_the_face_on_the_template():
    import skimage.data

    face = align.detect_faces(skimage.data.astronaut())[0]
    crop = align.align_face(skimage.data.astronaut(), face["landmarks"])
    assert crop.shape == (112, 112, 3)
    m = align.umeyama(face["landmarks"], align.ARCFACE_DST)
    mapped = _apply(m, face["landmarks"])
    # A real face is not the template: here the smile and the nose are ~6 px off at 112.
    assert np.abs(mapped - align.ARCFACE_DST).max() < 8
    # The crop is the photo warped by exactly that transform.
    want = cv2.warpAffine(skimage.data.astronaut(), m[:2], (112, 112), borderValue=0)
    np.testing.assert_array_equal(crop, want)
