"""An on-disk face gallery: enrolled embeddings and names, for `lowlight enroll` / `identify`.

A gallery is a folder holding two files, both readable without executing anything:
  * `embeddings.npz` — `embeddings` float32 (N, D) unit-norm rows and `names` (N,) unicode,
    loaded with `allow_pickle=False` (an object array, i.e. a pickle, is refused);
  * `gallery.json`   — format tag and version, the embedding dimension, the recognition model
    that made the embeddings (weights fingerprint, run directory, step) and one entry per row
    (name, source image, face box), human-readable.
Embeddings of different models live in different spaces, so a gallery is tied to the weights
fingerprint of the model that enrolled into it; enrolling or searching with another model is
refused. Saving writes both files to temporary names and renames the npz first, then the JSON;
a crash in between leaves a gallery whose counts disagree, which `open` reports as corrupt.

Search ranks *names*: a name's score is its best cosine over its enrolled embeddings.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from lowlight.inference.errors import GalleryError

FORMAT = "lowlight-gallery"
VERSION = 1
EMBEDDINGS = "embeddings.npz"
META = "gallery.json"
MAX_NAME = 200


@dataclasses.dataclass(frozen=True)
class Match:
    name: str
    similarity: float
    entry: int       # row of the best-matching enrolled embedding


class Gallery:
    """Enrolled faces of one recognition model; see the module docstring for the format."""

    def __init__(self, path: str, model: dict[str, Any], embeddings: np.ndarray | None = None,
                 entries: Sequence[dict[str, Any]] = ()):
        self.path = path
        self.model = dict(model)
        dim = int(model["dim"])
        self.embeddings = (np.zeros((0, dim), np.float32) if embeddings is None
                           else np.asarray(embeddings, np.float32))
        self.entries = [dict(e) for e in entries]

    # ------------------------------------------------------------------ files
    @classmethod
    def open(cls, path: str) -> Gallery:
        """Reads the gallery at `path`; GalleryError naming the file and the problem."""
        meta_path, emb_path = os.path.join(path, META), os.path.join(path, EMBEDDINGS)
        if not os.path.isdir(path):
            raise GalleryError(f"{path}: no gallery there (enroll a face first: lowlight enroll "
                               f"--gallery {path} NAME IMAGE)")
        for p in (meta_path, emb_path):
            if not os.path.isfile(p):
                raise GalleryError(f"{p}: missing; {path} is not a complete lowlight gallery")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise GalleryError(f"{meta_path}: corrupt gallery metadata ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise GalleryError(f"{meta_path}: not a lowlight gallery (format must be {FORMAT!r})")
        if meta.get("version") != VERSION:
            raise GalleryError(f"{meta_path}: gallery version {meta.get('version')!r}; this "
                               f"lowlight reads version {VERSION}")
        model, entries = meta.get("model"), meta.get("entries")
        if not isinstance(model, dict) or not isinstance(entries, list) or not all(
                isinstance(e, dict) and isinstance(e.get("name"), str) for e in entries):
            raise GalleryError(f"{meta_path}: corrupt gallery metadata (expected 'model' and a "
                               "list of 'entries' with names)")
        try:
            dim = int(model["dim"])
        except (KeyError, TypeError, ValueError):
            raise GalleryError(f"{meta_path}: corrupt gallery metadata (no model.dim)") from None
        try:
            with np.load(emb_path, allow_pickle=False) as z:
                emb, names = z["embeddings"], z["names"]
        except (OSError, ValueError, KeyError, EOFError) as e:
            raise GalleryError(f"{emb_path}: corrupt gallery embeddings ({e}); expected an npz "
                               "with 'embeddings' (N, D) float and 'names' (N,) text") from None
        if emb.ndim != 2 or emb.shape[1] != dim or not np.issubdtype(emb.dtype, np.floating):
            raise GalleryError(f"{emb_path}: embeddings {emb.dtype} {emb.shape}; the metadata "
                               f"says float (N, {dim})")
        if names.shape != (len(emb),) or names.dtype.kind != "U" or len(entries) != len(emb):
            raise GalleryError(f"{path}: corrupt gallery: {len(emb)} embeddings, {names.size} "
                               f"names in {EMBEDDINGS}, {len(entries)} entries in {META}")
        if [e["name"] for e in entries] != names.tolist():
            raise GalleryError(f"{path}: corrupt gallery: the names in {EMBEDDINGS} and {META} "
                               "differ")
        if not np.all(np.isfinite(emb)):
            raise GalleryError(f"{emb_path}: corrupt gallery embeddings (non-finite values)")
        return cls(path, model, emb, entries)

    @classmethod
    def open_or_create(cls, path: str, model: dict[str, Any]) -> Gallery:
        """The gallery at `path`, or a new empty one for `model` if there is none yet."""
        if os.path.exists(os.path.join(path, META)) or os.path.exists(
                os.path.join(path, EMBEDDINGS)):
            return cls.open(path)
        if os.path.exists(path) and not os.path.isdir(path):
            raise GalleryError(f"{path}: exists and is not a folder; a gallery is a folder")
        return cls(path, model)

    def save(self) -> None:
        os.makedirs(self.path, exist_ok=True)
        emb_path, meta_path = os.path.join(self.path, EMBEDDINGS), os.path.join(self.path, META)
        names = np.asarray([e["name"] for e in self.entries], dtype=str).reshape(-1)
        if names.size == 0:
            names = np.zeros((0,), "<U1")
        with open(emb_path + ".tmp", "wb") as f:
            np.savez(f, embeddings=self.embeddings.astype(np.float32), names=names)
        meta = {"format": FORMAT, "version": VERSION, "model": self.model,
                "entries": self.entries}
        with open(meta_path + ".tmp", "w") as f:
            json.dump(meta, f, indent=2)
        os.replace(emb_path + ".tmp", emb_path)
        os.replace(meta_path + ".tmp", meta_path)

    # ------------------------------------------------------------------ content
    def __len__(self) -> int:
        return len(self.entries)

    @property
    def names(self) -> list[str]:
        """Distinct enrolled names, in enrolment order."""
        return list(dict.fromkeys(e["name"] for e in self.entries))

    def check_model(self, model: dict[str, Any]) -> None:
        """GalleryError unless `model` (fingerprint, dim) is the model this gallery holds."""
        if int(model["dim"]) != int(self.model["dim"]):
            raise GalleryError(f"{self.path}: holds {self.model['dim']}-d embeddings; this "
                               f"recognition model gives {model['dim']}-d ones")
        if model.get("fingerprint") != self.model.get("fingerprint"):
            raise GalleryError(
                f"{self.path}: enrolled with another recognition model ({self.model.get('workdir')}"
                f" step {self.model.get('step')}); its embeddings cannot be compared with "
                f"{model.get('workdir')} step {model.get('step')}'s. Use a new gallery")

    def add(self, name: str, embeddings: np.ndarray, sources: Sequence[dict[str, Any]],
            model: dict[str, Any]) -> None:
        """Enrolls `embeddings` (k, D) of `name`, one `sources` record per row (saved as is)."""
        name = str(name).strip()
        if not name or len(name) > MAX_NAME or any(c in name for c in "\n\r\t"):
            raise GalleryError(f"name {name!r}: expected 1-{MAX_NAME} characters on one line")
        self.check_model(model)
        emb = np.asarray(embeddings, np.float32).reshape(-1, int(self.model["dim"]))
        if len(emb) != len(sources):
            raise ValueError(f"{len(emb)} embeddings but {len(sources)} source records")
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        self.embeddings = np.concatenate([self.embeddings, emb])
        self.entries += [{"name": name, **dict(s)} for s in sources]

    def search(self, embedding: np.ndarray, model: dict[str, Any], top_k: int = 5
               ) -> list[Match]:
        """The `top_k` enrolled names closest to `embedding` (D,), best first."""
        self.check_model(model)
        if not len(self):
            raise GalleryError(f"{self.path}: the gallery is empty")
        q = np.asarray(embedding, np.float32).reshape(-1)
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        sims = self.embeddings @ q
        best: dict[str, int] = {}
        for i, e in enumerate(self.entries):
            if e["name"] not in best or sims[i] > sims[best[e["name"]]]:
                best[e["name"]] = i
        ranked = sorted(best.items(), key=lambda kv: (-sims[kv[1]], kv[0]))
        return [Match(n, float(sims[i]), i) for n, i in ranked[:max(1, top_k)]]
