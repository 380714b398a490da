"""Prepared datasets: any source written once as a TFDS-layout ArrayRecord dataset, read back into
grain without TensorFlow.

Why: real formats (UTKFace JPEG folders, RecordIO, verification .bin files) are slow or awkward to
read at random, and derived sets — paper A's DistortionFace / NaturalFace, paper B §4.2's custom
illumination test set — should be fixed files that every run and every table reads identically.
`tools/prepare.py` is the command line; this module is the format (writer, reader) and the
builder of paper B's test set.

On-disk layout (TFDS's own, so `tfds.data_source(name, data_dir=out)` reads it as well):

    out/<name>/1.0.0/
      <name>-<split>.array_record-00000-of-0000N   shards, written in source order (group_size:1)
      dataset_info.json, features.json              TFDS metadata (when tensorflow-datasets is
                                                    installed; only TFDS's reader needs them)
      lowlight_prepared.json                        ours: feature schema, source spec, per-split
                                                    counts, shard files, skipped items + reasons

Records are serialized `tf.train.Example` protos produced by the small codec below, in the layout
TFDS's feature connectors read, so neither writing nor reading needs TensorFlow (TFDS's `Image`
feature would need TensorFlow to *encode* numpy arrays; we hand it PNG/JPEG bytes instead):

    kind   item value                         Example feature        TFDS feature
    image  uint8 (H, W, 3) RGB                bytes_list[PNG|JPEG]   Image(encoding_format=...)
    int    int / np.integer                   int64_list[1]          Tensor((), int64)
    bool   bool / np.bool_                    int64_list[1]          Tensor((), bool)
    text   str                                bytes_list[UTF-8]      Text()
    bytes  bytes                              bytes_list[1]          Tensor((), string)
    array  float or numeric ndarray (fixed    bytes_list[raw LE]     Tensor(shape, dtype,
           shape; not uint8 RGB)                                      encoding=BYTES): lossless

The schema comes from the first readable item; later items that do not match it (or whose reading
raises a data error) are skipped and listed with their reason.

TFDS without TensorFlow (tensorflow-datasets 4.9.10, checked by tests/test_prepare.py):
  works   `tfds.data_source(name, data_dir=out, split=...)` and
          `tfds.builder_from_directory(path).as_data_source()`: random access, picklable, images
          decoded by OpenCV/PIL; `tfds.folder_dataset.write_metadata` (dataset_info.json,
          features.json) and `FeaturesDict.serialize_example` given *encoded* image bytes.
  fails   `tfds.load`, `builder.as_dataset` (tf.data) and `Image.encode_example(np.ndarray)`:
          ModuleNotFoundError 'tensorflow'. Not used: `DatasetBuilder.download_and_prepare` (in
          our venv it stops earlier, on the optional `importlib_resources`). TFDS returns Text
          fields as bytes; `PreparedSource` returns str.
"""

from __future__ import annotations

import glob
import json
import operator
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from lowlight.data.example_codec import encode_example, parse_example  # noqa: F401
from lowlight.data.image_io import decode_image, to_uint8_rgb

FORMAT = "lowlight-prepared-v1"
META_FILE = "lowlight_prepared.json"
VERSION = "1.0.0"  # TFDS wants a semantic version directory
FILE_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"  # TFDS's default template
IMAGE_FORMATS = ("png", "jpeg")
#: Errors that mean "this item is bad data" (skipped, listed); anything else is a bug and raises.
DATA_ERRORS = (ValueError, OSError, KeyError, IndexError, EOFError)
#: Fields whose value counts the summary reports.
COUNTED_FIELDS = ("condition", "simulated", "transformed")


class SchemaError(ValueError):
    """An item that does not fit the dataset's feature schema."""


# ---------------------------------------------------------------------------------------------
# Schema: item values <-> Example features
# ---------------------------------------------------------------------------------------------


def as_item(item: Any) -> dict[str, Any]:
    """A source item as a dict: dicts as they are, `(image, label)` tuples as image / label; an
    `image` that is not uint8 RGB (grey, alpha, 16-bit, float) goes through `to_uint8_rgb`.
    (Pair items — image1 / image2 / issame — need no `image`: both images are image fields.)"""
    if isinstance(item, Mapping):
        out = dict(item)
    elif isinstance(item, tuple) and len(item) == 2:
        out = {"image": item[0], "label": item[1]}
    else:
        raise TypeError(f"expected a dict item or an (image, label) tuple, got "
                        f"{type(item).__name__}")
    if "image" in out:
        image = np.asarray(out["image"])
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            out["image"] = to_uint8_rgb(image, bgr=False)
    return out


def infer_spec(value: Any) -> dict[str, Any] | None:
    """Feature spec of one item value (see the module docstring), or None if unsupported."""
    if isinstance(value, (bool, np.bool_)):
        return {"kind": "bool"}
    if isinstance(value, (int, np.integer)):
        return {"kind": "int"}
    if isinstance(value, (str, np.str_)):
        return {"kind": "text"}
    if isinstance(value, bytes):
        return {"kind": "bytes"}
    if isinstance(value, (float, np.floating)):
        value = np.asarray(value)
    if isinstance(value, np.ndarray):
        if value.ndim == 0 and value.dtype.kind != "f":
            return infer_spec(value[()])
        if value.dtype == np.uint8 and value.ndim == 3 and value.shape[2] == 3:
            return {"kind": "image"}
        if value.dtype.kind in "biuf" and value.dtype.itemsize <= 8:
            return {"kind": "array", "dtype": value.dtype.name, "shape": list(value.shape)}
    return None


def _encode_value(key: str, spec: Mapping[str, Any], value: Any, image_format: str,
                  jpeg_quality: int) -> tuple[str, Any]:
    kind = spec["kind"]
    if kind == "image":
        a = np.asarray(value)
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
            raise SchemaError(f"{key}: expected uint8 (H, W, 3), got {a.dtype} {a.shape}")
        params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if image_format == "jpeg" else []
        ok, buf = cv2.imencode("." + image_format, np.ascontiguousarray(a[:, :, ::-1]), params)
        if not ok:
            raise SchemaError(f"{key}: OpenCV could not encode the image as {image_format}")
        return "bytes", buf.tobytes()
    if kind in ("int", "bool"):
        ok = isinstance(value, (bool, np.bool_)) if kind == "bool" else (
            isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)))
        if not ok:
            raise SchemaError(f"{key}: expected {kind}, got {type(value).__name__}")
        return "int", int(value)
    if kind == "text":
        if not isinstance(value, (str, np.str_)):
            raise SchemaError(f"{key}: expected str, got {type(value).__name__}")
        return "bytes", str(value).encode()
    if kind == "bytes":
        if not isinstance(value, bytes):
            raise SchemaError(f"{key}: expected bytes, got {type(value).__name__}")
        return "bytes", value
    a, dtype = np.asarray(value), np.dtype(spec["dtype"])
    if a.shape != tuple(spec["shape"]) or not np.can_cast(a.dtype, dtype, "safe"):
        raise SchemaError(f"{key}: expected {dtype.name} {tuple(spec['shape'])}, got "
                          f"{a.dtype.name} {a.shape}")
    return "bytes", np.ascontiguousarray(a, dtype.newbyteorder("<")).tobytes()


def encode_item(item: Mapping[str, Any], schema: Mapping[str, Mapping[str, Any]], *,
                image_format: str = "png", jpeg_quality: int = 95) -> bytes:
    """One item as a serialized Example (keys not in `schema` are left out)."""
    missing = [k for k in schema if k not in item]
    if missing:
        raise SchemaError(f"missing field(s) {missing}")
    return encode_example({k: _encode_value(k, s, item[k], image_format, jpeg_quality)
                           for k, s in schema.items()})


def decode_value(spec: Mapping[str, Any], values: list, name: str = "<record>") -> Any:
    """One Example feature back to the item value the writer was given (see module docstring)."""
    kind = spec["kind"]
    if kind == "image":
        return decode_image(values[0], name)
    if kind == "int":
        return int(values[0])
    if kind == "bool":
        return bool(values[0])
    if kind == "text":
        return values[0].decode()
    if kind == "bytes":
        return values[0]
    dtype = np.dtype(spec["dtype"]).newbyteorder("<")
    a = np.frombuffer(values[0], dtype).astype(dtype.newbyteorder("="))
    return a.reshape(spec["shape"])[()] if not spec["shape"] else a.reshape(spec["shape"])


def tfds_features(schema: Mapping[str, Mapping[str, Any]], image_format: str):
    """The `tfds.features.FeaturesDict` that reads our records (imports tensorflow-datasets)."""
    import tensorflow_datasets as tfds

    F = tfds.features
    out = {}
    for key, s in schema.items():
        kind = s["kind"]
        if kind == "image":
            out[key] = F.Image(shape=(None, None, 3), encoding_format=image_format)
        elif kind == "text":
            out[key] = F.Text()
        elif kind == "array":
            out[key] = F.Tensor(shape=tuple(s["shape"]), dtype=np.dtype(s["dtype"]),
                                encoding=F.Encoding.BYTES)
        else:
            dtype = {"int": np.int64, "bool": np.bool_, "bytes": np.object_}[kind]
            out[key] = F.Tensor(shape=(), dtype=dtype)
    return F.FeaturesDict(out)


# ---------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------


def _items(source: Any, chunk: int):
    """Yields (index, item dict or exception) in index order; batches through `render_batch`
    when the source has one (the synthetic world renders ~10x faster that way)."""
    n = len(source)
    batched = hasattr(source, "render_batch")
    for start in range(0, n, chunk):
        idx = list(range(start, min(n, start + chunk)))
        if batched:
            try:
                b = source.render_batch(idx)
                for j, i in enumerate(idx):
                    yield i, {k: v[j] for k, v in b.items()}
                continue
            except DATA_ERRORS:
                pass  # fall back to item by item, so the error is pinned on its item
        for i in idx:
            try:
                yield i, source[i]
            except DATA_ERRORS as e:
                yield i, e


def _shard_name(name: str, split: str, k: int, n: int) -> str:
    return f"{name}-{split}.array_record-{k:05d}-of-{n:05d}"


def _write_split(tmp: str, name: str, split: str, source: Any, schema: dict | None,
                 opts: Mapping[str, Any]) -> tuple[dict, dict]:
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm import tqdm

    drop, eps = set(opts["drop_keys"]), opts["examples_per_shard"]
    skipped: dict[str, list[dict]] = {}
    counts: dict[str, Counter] = {}
    ignored: set[str] = set()
    lengths, files, writer = [], [], None
    t0 = time.perf_counter()
    bar = tqdm(total=len(source), desc=f"{name}/{split}", unit="img", disable=not opts["progress"])
    for i, item in _items(source, opts["chunk"]):
        bar.update(1)
        try:
            if isinstance(item, BaseException):
                raise item
            item = as_item(item)
            item.setdefault("source_index", i)
            for k in drop:
                item.pop(k, None)
            if schema is None:  # the first readable item defines the schema
                specs = {k: infer_spec(v) for k, v in item.items()}
                schema = {k: s for k, s in sorted(specs.items()) if s is not None}
                ignored.update(k for k, s in specs.items() if s is None)
            ignored.update(k for k in item if k not in schema)
            record = encode_item(item, schema, image_format=opts["image_format"],
                                 jpeg_quality=opts["jpeg_quality"])
        except DATA_ERRORS as e:
            reason = "schema_mismatch" if isinstance(e, SchemaError) else type(e).__name__
            skipped.setdefault(reason, []).append({"index": i, "detail": str(e)})
            continue
        if writer is None or lengths[-1] == eps:
            if writer is not None:
                writer.close()
            files.append(os.path.join(tmp, f".shard-{split}-{len(files):05d}"))
            writer = ArrayRecordWriter(files[-1], "group_size:1")
            lengths.append(0)
        writer.write(record)
        lengths[-1] += 1
        for k in COUNTED_FIELDS:
            if k in schema:
                counts.setdefault(k, Counter())[str(item[k])] += 1
    bar.close()
    if writer is not None:
        writer.close()
    names = [_shard_name(name, split, k, len(files)) for k in range(len(files))]
    for f, n in zip(files, names):
        os.replace(f, os.path.join(tmp, n))
    seconds = time.perf_counter() - t0
    info = {"num_examples": sum(lengths), "source_len": len(source), "shard_lengths": lengths,
            "files": names, "num_bytes": sum(os.path.getsize(os.path.join(tmp, n)) for n in names),
            "skipped": skipped, "ignored_keys": sorted(ignored),
            "value_counts": {k: dict(sorted(c.items())) for k, c in counts.items()}}
    return info, {"seconds": seconds, "schema": schema}


def _write_tfds_metadata(tmp: str, name: str, splits: Mapping[str, dict], schema: dict,
                         image_format: str, description: str) -> None:
    import tensorflow_datasets as tfds

    infos = [tfds.core.SplitInfo(
        name=s, shard_lengths=info["shard_lengths"], num_bytes=info["num_bytes"],
        filename_template=tfds.core.ShardedFileTemplate(
            data_dir=tmp, template=FILE_TEMPLATE, dataset_name=name, split=s,
            filetype_suffix="array_record")) for s, info in splits.items()]
    tfds.folder_dataset.write_metadata(
        data_dir=tmp, features=tfds_features(schema, image_format), split_infos=infos,
        version=VERSION, filename_template=FILE_TEMPLATE, check_data=False,
        description=description)


def write_prepared(out: str, splits: Mapping[str, Any], *, name: str,
                   source: Mapping[str, Any] | None = None,
                   source_skipped: Mapping[str, Sequence[str]] | None = None,
                   derived: Mapping[str, Any] | None = None, image_format: str = "png",
                   jpeg_quality: int = 95, examples_per_shard: int = 10_000,
                   drop_keys: Sequence[str] = (), overwrite: bool = False,
                   progress: bool = True, chunk: int = 32, tfds_metadata: bool = True) -> dict:
    """Writes `splits` ({split name: random-access source}) as a prepared dataset.

    Items are written in index order, split by split, `examples_per_shard` per shard. The output
    appears atomically: everything is written to a temporary folder renamed at the end.

    Args:
      out: the data dir; the dataset goes to `out/name/1.0.0/`.
      splits: split name -> source whose items are dicts with an `image` (uint8 RGB) plus label
        fields, or `(image, label)` tuples. Each item gains `source_index` (its index in that
        split's source) unless it has one.
      name: dataset name (lower-case snake case: TFDS parses it out of the file names).
      source: JSON-able description of where the data came from (stored as metadata).
      source_skipped: reason -> names the source itself skipped when it was built (UTKFace's
        `.skipped`), stored next to the items skipped while writing.
      derived: JSON-able description of a derived set (wrapper, seed, statistics).
      image_format: 'png' (lossless) or 'jpeg'.
      drop_keys: item fields not to store.
      tfds_metadata: also write TFDS's dataset_info.json / features.json (needs
        tensorflow-datasets; if it is missing the dataset is still complete for PreparedSource).

    Returns:
      The summary: the contents of lowlight_prepared.json plus `path`, `seconds` and rates.
    """
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"name: expected lower-case snake case (TFDS dataset name), got {name!r}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format: expected one of {IMAGE_FORMATS}, got {image_format!r}")
    if operator.index(examples_per_shard) < 1:
        raise ValueError(f"examples_per_shard: expected >= 1, got {examples_per_shard}")
    for s in splits:
        if not re.fullmatch(r"\w+", s) or "-" in s:
            raise ValueError(f"split name {s!r}: letters, digits and '_' only")
    final = os.path.join(out, name, VERSION)
    if os.path.exists(final) and not overwrite:
        raise FileExistsError(f"{final} exists; pass overwrite=True (--overwrite) to replace it")
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = f"{final}.incomplete-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    opts = dict(drop_keys=drop_keys, examples_per_shard=examples_per_shard, progress=progress,
                image_format=image_format, jpeg_quality=jpeg_quality, chunk=chunk)
    meta = {"format": FORMAT, "name": name, "version": VERSION, "image_format": image_format,
            "source": dict(source or {}), "derived": dict(derived or {}),
            "source_skipped": {r: list(v) for r, v in (source_skipped or {}).items() if v},
            "features": None, "splits": {}}
    schema, seconds = None, {}
    try:
        for split, src in splits.items():
            info, extra = _write_split(tmp, name, split, src, schema, opts)
            schema, seconds[split] = extra["schema"], extra["seconds"]
            meta["splits"][split] = info
        if not schema or not any(s["num_examples"] for s in meta["splits"].values()):
            raise ValueError("nothing to write: every item was skipped (see the reasons above)"
                             if splits else "no splits given")
        meta["features"] = schema
        meta["tfds"] = {"metadata": False, "reason": "not requested"}
        if tfds_metadata:
            try:
                _write_tfds_metadata(tmp, name, meta["splits"], schema, image_format,
                                     f"lowlight prepared dataset from {meta['source']}")
                meta["tfds"] = {"metadata": True}
            except ImportError as e:
                meta["tfds"] = {"metadata": False, "reason": f"tensorflow-datasets missing: {e}"}
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True, default=_json_default)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = sum(s["num_examples"] for s in meta["splits"].values())
    secs = sum(seconds.values())
    return {**meta, "path": final, "seconds": seconds,
            "records_per_second": total / secs if secs > 0 else float("inf")}


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def format_summary(summary: Mapping[str, Any], max_names: int = 10) -> str:
    """Human-readable report of a `write_prepared` summary: counts, skips with reasons."""
    lines = [f"prepared {summary['name']} -> {summary['path']}"]
    lines.append(f"  source: {json.dumps(summary['source'], default=_json_default)}")
    if summary.get("derived"):
        lines.append(f"  derived: {json.dumps(summary['derived'], default=_json_default)}")
    lines.append("  features: " + ", ".join(f"{k}:{s['kind']}"
                                            for k, s in summary["features"].items()))
    for split, s in summary["splits"].items():
        secs = summary.get("seconds", {}).get(split)
        rate = f", {s['num_examples'] / secs:.0f} rec/s" if secs else ""
        lines.append(f"  {split}: {s['num_examples']} of {s['source_len']} written, "
                     f"{len(s['files'])} shard(s), {s['num_bytes'] / 1e6:.2f} MB{rate}")
        for k, c in s["value_counts"].items():
            lines.append(f"    {k}: " + ", ".join(f"{v}={n}" for v, n in c.items()))
        for reason, items in s["skipped"].items():
            shown = "; ".join(f"[{x['index']}] {x['detail']}" for x in items[:max_names])
            more = f" (+{len(items) - max_names} more)" if len(items) > max_names else ""
            lines.append(f"    skipped {len(items)} ({reason}): {shown}{more}")
        if s["ignored_keys"]:
            lines.append(f"    not stored (unsupported type or not in schema): "
                         f"{', '.join(s['ignored_keys'])}")
    for reason, names in summary.get("source_skipped", {}).items():
        more = f" (+{len(names) - max_names} more)" if len(names) > max_names else ""
        lines.append(f"  skipped by the source ({reason}, {len(names)}): "
                     f"{', '.join(names[:max_names])}{more}")
    t = summary.get("tfds", {})
    lines.append("  tfds metadata: " + ("written" if t.get("metadata") else
                                        f"not written ({t.get('reason')})"))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------


def find_dataset_dir(root: str, name: str | None = None) -> str:
    """The prepared-dataset folder at `root`: root itself, root/<name>/ or root/<name>/<version>/
    (the one dataset there, or the one called `name`)."""
    root = os.fspath(root)
    if os.path.isfile(os.path.join(root, META_FILE)):
        return root
    found = []
    for depth in ("*", os.path.join("*", "*")):
        found += [os.path.dirname(p)
                  for p in sorted(glob.glob(os.path.join(root, depth, META_FILE)))]
    if name is not None:
        found = [d for d in found if name in os.path.relpath(d, root).split(os.sep)]
    if len(found) != 1:
        what = "no prepared dataset" if not found else f"{len(found)} prepared datasets"
        raise FileNotFoundError(f"{what} under {root!r} (looked for {META_FILE} in it and two "
                                f"levels below{'' if name is None else f', name={name!r}'})"
                                + (f": {found}" if found else ""))
    return found[0]


def read_metadata(root: str, name: str | None = None) -> dict[str, Any]:
    """The lowlight_prepared.json of the dataset at `root` (see `find_dataset_dir`)."""
    with open(os.path.join(find_dataset_dir(root, name), META_FILE)) as f:
        return json.load(f)


class PreparedSource:
    """One split of a prepared dataset: a picklable grain random-access source.

    `src[i]` -> dict with every stored field decoded back to the value that was written:
    images uint8 RGB (H, W, 3) (PNG: bit-identical), ints, bools, str, numpy arrays; plus
    `source_index`. Reading needs neither TensorFlow nor tensorflow-datasets.

    Args:
      root: the dataset folder, or a data dir holding exactly one (or `name`).
      split: a split name of the dataset.
      keys: fields to decode (default all); leaving images out makes label scans cheap.
      name: dataset name, when `root` holds several.
    """

    def __init__(self, root: str, split: str = "train", *, keys: Sequence[str] | None = None,
                 name: str | None = None):
        self.path = find_dataset_dir(root, name)
        with open(os.path.join(self.path, META_FILE)) as f:
            self.metadata = json.load(f)
        if self.metadata.get("format") != FORMAT:
            raise ValueError(f"{self.path}: format {self.metadata.get('format')!r}, this "
                             f"reader reads {FORMAT!r}")
        splits = self.metadata["splits"]
        if split not in splits:
            raise ValueError(f"split: {split!r} is not in {self.path}; valid: "
                             f"{', '.join(splits)}")
        self.split = split
        self.features = self.metadata["features"]
        unknown = sorted(set(keys or ()) - set(self.features))
        if unknown:
            raise ValueError(f"keys: unknown field(s) {unknown}; valid: {sorted(self.features)}")
        self.keys = tuple(keys) if keys else tuple(self.features)
        self.files = [os.path.join(self.path, f) for f in splits[split]["files"]]
        self._len = int(splits[split]["num_examples"])
        self._reader = None

    def _data(self):
        if self._reader is None:
            from array_record.python.array_record_data_source import ArrayRecordDataSource

            self._reader = ArrayRecordDataSource(self.files)
        return self._reader

    def __getstate__(self):
        return {**self.__dict__, "_reader": None}  # readers reopen lazily in each process

    def __len__(self) -> int:
        return self._len

    def _decode(self, record: bytes, i: int) -> dict[str, Any]:
        parsed = parse_example(record, self.keys)
        name = f"{self.path}:{self.split}[{i}]"
        return {k: decode_value(self.features[k], parsed[k], name) for k in self.keys}

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = operator.index(i)
        if not -self._len <= i < self._len:
            raise IndexError(f"index {i} out of range for {self!r}")
        i %= self._len
        return self._decode(self._data()[i], i)

    def column(self, key: str, chunk: int = 256) -> np.ndarray:
        """One label field over the whole split, without decoding anything else."""
        if key not in self.features:
            raise KeyError(f"{key!r} is not a field of {self!r}; fields: {sorted(self.features)}")
        data, spec, out = self._data(), self.features[key], []
        for s in range(0, self._len, chunk):
            for rec in data.__getitems__(list(range(s, min(self._len, s + chunk)))):
                out.append(decode_value(spec, parse_example(rec, (key,))[key]))
        return np.asarray(out)

    def __repr__(self) -> str:
        return f"PreparedSource({self.path!r}, split={self.split!r}, len={self._len})"


# Paper B's illumination test set lives in its own file; re-exported for existing callers.
from lowlight.data.illumination_testset import (  # noqa: E402
    IlluminationTestSet,
    PairImages,
    Subset,
    identities_of,
    illumination_test_set,
)

__reexports__ = (IlluminationTestSet, PairImages, Subset, identities_of, illumination_test_set)
