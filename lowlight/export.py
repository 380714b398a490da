"""Deployment artifacts of trained stages with `jax.export` (serialized StableHLO).

    blob = export_stage("runs/vit_magface")                  # symbolic batch, CPU
    blob = export_stage("runs/r100", platforms=("cpu", "cuda"))   # exported on a CPU machine
    open("embedder.llstage", "wb").write(blob)
    stage = load_stage("embedder.llstage")                   # needs jax + numpy only
    out = stage(faces_uint8)                                 # {"embedding": (N, 512), "norm": (N,)}

What a stage computes (input: aligned faces, uint8 RGB NHWC at the run's `data.size`; the
[-1, 1] normalisation is inside the artifact so callers cannot get it wrong):

  recognition  {"embedding": unit-norm (N, D), "norm": (N,) raw norm (MagFace quality)} — the
               whole FaceEmbedder (relight and skin mask when configured), with the flip-sum
               of evaluation (`flip=True`, as `steps.embed_step`), so exported embeddings equal
               the ones `lowlight.evaluate` scores
  attributes   `losses.multitask.predict`: age (years), female_prob, gender, ethnicity,
               ethnicity_probs
  lighting     logits, probs, label (class names in the manifest)
  relight      image: the relit face, uint8
  skin_seg     mask: (N, H, W) in [0, 1]

Weights are arguments of the exported function, not constants baked into it: the StableHLO stays
a few hundred kB whatever the model size (an r100 baked in would be a 260 MB module that XLA
constant-folds slowly at every load), and the same program runs any checkpoint of the same
architecture. The artifact bundles both in one uncompressed `.npz` (read with
`allow_pickle=False`, so loading never executes code): `stablehlo` (the serialized `Exported`),
`manifest` (JSON: task, model, step, input/output specs, platforms, jax version) and `w00000...`
(the weight leaves in the order the function takes them). The batch dimension is symbolic
(`jax.export.symbolic_shape("b")`) unless `batch_size` fixes it: one artifact serves any batch,
XLA compiles once per batch size seen. `platforms=("cpu", "cuda")` lowers for both from any
machine; the program then picks its branch by the device it runs on.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "lowlight-stage/1"
TASKS = ("recognition", "attributes", "lighting", "relight", "skin_seg")


# ------------------------------------------------------------------------------ stage functions
def _to_input(images):
    from lowlight.data.normalize import to_model_input

    return to_model_input(images, xp=jnp)


def _recognition(config, params, batch_stats, *, flip: bool):
    from lowlight.train import build_model

    model = build_model(config)
    params = {k: v for k, v in params.items() if k != "centers"}  # training-only class centres

    def fn(variables, images):
        p, s = variables["params"], variables["batch_stats"]
        x = _to_input(images)
        emb, aux, _ = model.apply(p, s, x, train=False)
        if flip:  # insightface / lowlight evaluation: embedding of image + mirror
            emb = emb + model.apply(p, s, x[:, :, ::-1, :], train=False)[0]
        emb = emb.astype(jnp.float32)
        unit = emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
        return {"embedding": unit, "norm": aux["norm"].astype(jnp.float32)}

    return fn, {"params": params, "batch_stats": batch_stats}, {"flip": flip}


def _dense(config, params, batch_stats, post: Callable):
    from lowlight import models

    model = models.create(config.model.name, **dict(config.model.get("kwargs", {}) or {}))

    def fn(variables, images):
        out, _ = model.apply(variables, _to_input(images), train=False)
        return post(out)

    return fn, {"params": params, "batch_stats": batch_stats}


def _attributes(config, params, batch_stats, **_):
    from lowlight.losses.multitask import predict

    age_scale = float((config.get("task_cfg", {}) or {}).get("age_scale", 1.0))
    fn, variables = _dense(config, params, batch_stats,
                           lambda out: predict(out, age_scale=age_scale))
    return fn, variables, {"age_scale": age_scale}


def _lighting(config, params, batch_stats, **_):
    from lowlight.models.lighting_cnn import CLASS_NAMES

    def post(logits):
        logits = logits.astype(jnp.float32)
        return {"logits": logits, "probs": jax.nn.softmax(logits, axis=-1),
                "label": jnp.argmax(logits, axis=-1).astype(jnp.int32)}

    fn, variables = _dense(config, params, batch_stats, post)
    n = int(config.model.get("kwargs", {}).get("num_classes", 2))
    return fn, variables, {"class_names": list(CLASS_NAMES.get(n, ()))}


def _relight(config, params, batch_stats, **_):
    from lowlight.data.normalize import from_model_input

    def post(out):
        image = jnp.clip(jnp.rint(from_model_input(out, xp=jnp)), 0, 255)
        return {"image": image.astype(jnp.uint8)}

    return (*_dense(config, params, batch_stats, post), {})


def _skin_seg(config, params, batch_stats, **_):
    return (*_dense(config, params, batch_stats,
                    lambda mask: {"mask": mask.astype(jnp.float32)}), {})


_BUILDERS = {"recognition": _recognition, "attributes": _attributes, "lighting": _lighting,
             "relight": _relight, "skin_seg": _skin_seg}


# ------------------------------------------------------------------------------ export
def export_stage(workdir: str, *, batch_size: int | None = None,
                 platforms: Sequence[str] = ("cpu",), step: int | None = None,
                 flip: bool = True) -> bytes:
    """The deployment artifact (bytes of an `.npz`) of the run in `workdir`.

    Args:
      workdir: a lowlight run directory (config.json + checkpoints/), e.g. a training run or a
        converted insightface backbone (tools/convert_insightface.py).
      batch_size: None for a symbolic batch dimension (any batch at run time), or a fixed size.
      platforms: subset of "cpu", "cuda", "rocm", "tpu" the program is lowered for; lowering
        needs no such device, so a CPU machine can export for GPUs.
      step: checkpoint step (default: the latest).
      flip: recognition only — add the embedding of the mirrored face (evaluation protocol).
    """
    from lowlight import checkpoint as ckpt_lib
    from lowlight.evaluate import load_config

    config = load_config(workdir)
    if config.task not in _BUILDERS:
        raise ValueError(f"{workdir}: task {config.task!r} cannot be exported; "
                         f"valid: {', '.join(TASKS)}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be None (symbolic) or >= 1, got {batch_size}")
    params, batch_stats, step = ckpt_lib.load_weights(workdir, step)
    kwargs = {"flip": flip} if config.task == "recognition" else {}
    fn, variables, extra = _BUILDERS[config.task](config, params, batch_stats, **kwargs)
    flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
    leaves = [np.asarray(x) for _, x in flat]
    for (path, _), x in zip(flat, leaves):
        if x.dtype.kind not in "fiub":  # e.g. bfloat16 (ml_dtypes): .npz would store raw bytes
            raise ValueError(f"{workdir}: weight {jax.tree_util.keystr(path)} has dtype "
                             f"{x.dtype}, which .npz cannot hold; expected float32")

    def flat_fn(weights, images):
        return fn(jax.tree.unflatten(treedef, weights), images)

    size = int(config.data.size)
    batch = jax.export.symbolic_shape("b")[0] if batch_size is None else int(batch_size)
    specs = ([jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves],
             jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8))
    from lowlight.models import cpu_kernels  # here: loading an artifact imports no model code

    try:
        with cpu_kernels.disabled():  # a portable artifact: no custom calls of this process
            exported = jax.export.export(jax.jit(flat_fn), platforms=tuple(platforms))(*specs)
    except Exception as e:
        if batch_size is None:  # shape polymorphism is what can fail for a model that lowers
            raise ValueError(f"{workdir}: exporting {config.model.name} with a symbolic batch "
                             f"failed ({type(e).__name__}: {e}); pass batch_size=N") from e
        raise
    outputs = {name: {"shape": [d if isinstance(d, int) else str(d) for d in aval.shape],
                      "dtype": str(aval.dtype)}
               for name, aval in zip(_output_names(exported), exported.out_avals)}
    manifest = dict(
        format=FORMAT, task=config.task, model=config.model.name, step=int(step),
        workdir=os.path.abspath(workdir), platforms=list(exported.platforms),
        jax_version=jax.__version__, num_weights=len(leaves),
        num_params=int(sum(x.size for x in leaves)),
        input={"shape": [None if batch_size is None else batch, size, size, 3],
               "dtype": "uint8", "layout": "NHWC RGB face crop (aligned for recognition)"},
        outputs=outputs, **extra)
    arrays = {"stablehlo": np.frombuffer(bytes(exported.serialize()), np.uint8),
              "manifest": np.frombuffer(json.dumps(manifest).encode(), np.uint8)}
    arrays.update({f"w{i:05d}": x for i, x in enumerate(leaves)})
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _output_names(exported) -> list[str]:
    """Output dict keys in flat order (the exported function returns a flat dict)."""
    dummy = jax.tree.unflatten(exported.out_tree, range(exported.out_tree.num_leaves))
    return [k for k, _ in sorted(dummy.items(), key=lambda kv: kv[1])]


# ------------------------------------------------------------------------------ load
class Stage:
    """A loaded artifact: `stage(images uint8 (N,H,W,3)) -> {name: jax.Array}`.

    Weights are put on the default device once; each new batch size compiles once (jit cache).
    `manifest` describes inputs and outputs; `exported` is the `jax.export.Exported`.
    """

    def __init__(self, exported, weights: list, manifest: dict, path: str):
        self.exported, self.manifest, self.path = exported, manifest, path
        self._weights = weights
        self._call = jax.jit(exported.call)

    def __call__(self, images) -> dict[str, jax.Array]:
        shape = self.manifest["input"]["shape"]
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or list(images.shape[1:]) != shape[1:] \
                or (shape[0] is not None and images.shape[0] != shape[0]):
            want = ["N" if d is None else d for d in shape]
            raise ValueError(f"{self.path}: expected uint8 images of shape {tuple(want)} "
                             f"(NHWC RGB), got {images.dtype} {images.shape}")
        return self._call(self._weights, images)


def _read_manifest(z, path: str) -> dict:
    if "manifest" not in z.files or "stablehlo" not in z.files:
        raise ValueError(f"{path}: not a lowlight stage artifact (no manifest/stablehlo)")
    manifest = json.loads(z["manifest"].tobytes().decode())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def read_manifest(path: str) -> dict:
    """The manifest of an artifact (no deserialisation, works for any platform)."""
    with np.load(path, allow_pickle=False) as z:
        return _read_manifest(z, path)


def load_stage(path: str) -> Stage:
    """Reads an artifact written from `export_stage`; imports no lowlight model code."""
    with np.load(path, allow_pickle=False) as z:
        manifest = _read_manifest(z, path)
        exported = jax.export.deserialize(bytearray(z["stablehlo"].tobytes()))
        weights = [z[f"w{i:05d}"] for i in range(manifest["num_weights"])]
    backend = jax.default_backend()
    runs_on = {"gpu": ("cuda", "rocm")}.get(backend, (backend,))
    if not set(runs_on) & set(exported.platforms):
        raise ValueError(f"{path} was exported for {', '.join(exported.platforms)} and cannot "
                         f"run on this {backend} backend; export it with "
                         f"platforms=(..., {runs_on[0]!r})")
    return Stage(exported, jax.device_put(weights), manifest, path)


def describe(manifest: dict[str, Any]) -> str:
    """One-paragraph human summary of a manifest (for the CLI)."""
    dims = lambda shape: tuple(d if isinstance(d, int) else "N" for d in shape)
    ins = manifest["input"]
    outs = ", ".join(f"{k} {dims(v['shape'])} {v['dtype']}"
                     for k, v in manifest["outputs"].items())
    return (f"{manifest['task']} stage of {manifest['model']} (step {manifest['step']}, "
            f"{manifest['num_params']:,} weights) for {'/'.join(manifest['platforms'])}: "
            f"input {ins['dtype']} {dims(ins['shape'])}; outputs {outs}")
