r"""insightface arcface_torch backbone (`.pth`) -> a lowlight recognition run directory.

    python tools/convert_insightface.py --pth=backbone.pth --arch=r100 --out=runs/ms1m_r100
    python tools/convert_insightface.py --pth=model.pt --arch=vit_t --out=runs/vit_t \
        --config=configs/vit_magface.py:variant=T,scale=full --config.data.num_identities=93431

The output is what a lowlight training run at step 0 would leave behind, so every tool that
reads runs can use it unchanged: `DIR/config.json` (a recognition config for that backbone; by
default `configs/r100_arcface.py:depth=N,scale=full` or `configs/vit_magface.py:variant=X,
scale=full`), an orbax checkpoint `DIR/checkpoints/0/state` holding the whole `TrainState`
(backbone = the converted weights, fresh Partial FC centres and optimizer state) and
`DIR/converted_from.json` (source file, sha256, tensor counts). Hence
`lowlight.checkpoint.load_weights(DIR)`, `python -m lowlight.evaluate --workdir=DIR`,
`--config.init_from=DIR` (a run with the same state shapes) and fine-tuning by
`python -m lowlight.main --config=... --workdir=DIR` (resumes at step 0) all work.

Layout (the per-family converters `load_torch_state` in lowlight/models/iresnet.py and vit.py):
conv kernels OIHW -> HWIO, linear weights (out, in) -> (in, out), BatchNorm weight/bias/running
statistics -> scale/bias + batch_stats mean/var, PReLU weight -> per-channel negative_slope. The
iResNet FC needs no reordering of its 512*7*7 inputs from NCHW to NHWC flatten order because the
lowlight iResNet flattens in torch's (C, H, W) order; the ViT head flattens tokens the same way in
both. Stride-2 convolutions use explicit symmetric padding in the model (torch padding=1).

The file is read with `torch.load(weights_only=True)` (no code execution). Accepted: a plain
state_dict, one wrapped under "state_dict", "model" or "state_dict_backbone" (arcface_torch's
training checkpoints), with DataParallel/DDP "module." or torch.compile "_orig_mod." prefixes.
Unknown, missing and shape-mismatched keys are refused, each named; fp16/bf16 weights are
upcast to float32.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import importlib.util
import json
import os
import sys
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

#: --arch -> (lowlight model name, converter family, default config spec).
ARCHS: dict[str, tuple[str, str, str]] = {
    **{f"r{d}": (f"iresnet{d}", "iresnet", f"configs/r100_arcface.py:depth={d},scale=full")
       for d in (18, 34, 50, 100, 200)},
    **{f"vit_{v}": (f"vit_{v}", "vit", f"configs/vit_magface.py:variant={v.upper()},scale=full")
       for v in ("t", "s", "b")},
}
WRAPPER_KEYS = ("state_dict_backbone", "state_dict", "model")
PREFIXES = ("module.", "_orig_mod.")


class ConversionError(ValueError):
    """The checkpoint does not fit the requested architecture / config (message names keys)."""


# ------------------------------------------------------------------------------ reading
def read_state_dict(path: str, log=print) -> dict[str, np.ndarray]:
    """`path` (.pth/.pt) -> {torch key: float32 numpy array}, unwrapped and de-prefixed."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # pickle refusing code, truncated zip, not a torch file, ...
        raise ConversionError(f"{path}: cannot be read with torch.load(weights_only=True) "
                              f"({type(e).__name__}: {e}); expected a saved state_dict") from None
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: holds a {type(obj).__name__}, expected a state_dict")
    for key in WRAPPER_KEYS:
        if isinstance(obj.get(key), dict):
            log(f"{path}: using the state_dict stored under {key!r} "
                f"(other entries ignored: {', '.join(sorted(k for k in obj if k != key))[:200]})")
            obj = obj[key]
            break
    out: dict[str, np.ndarray] = {}
    for prefix in PREFIXES:
        if obj and all(isinstance(k, str) and k.startswith(prefix) for k in obj):
            log(f"{path}: stripped the {prefix!r} prefix (DataParallel / DDP / torch.compile) "
                f"from {len(obj)} keys")
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    for key, value in obj.items():
        if not _is_tensor(value):
            raise ConversionError(f"{path}: entry {key!r} is a {type(value).__name__}, not a "
                                  "tensor; expected a flat state_dict (name -> tensor)")
        if value.is_floating_point() and value.dtype != torch.float32:
            value = value.float()  # fp16 / bf16 checkpoints; numpy has no bfloat16
        out[key] = value.detach().cpu().numpy()
    if not out:
        raise ConversionError(f"{path}: the state_dict is empty")
    return out


def _is_tensor(x: Any) -> bool:
    return hasattr(x, "detach") and hasattr(x, "is_floating_point")


# ------------------------------------------------------------------------------ key maps
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "negative_slope": "weight",
                  "bias": "bias", "mean": "running_mean", "var": "running_var"}
_VIT_HEAD = {"feature_fc1": "feature.0", "feature_bn1": "feature.1",
             "feature_fc2": "feature.2", "feature_bn2": "feature.3"}


def torch_key(family: str, path: tuple[str, ...]) -> str:
    """The arcface_torch state_dict key that a lowlight backbone leaf `path` comes from (the
    inverse of the families' `_torch_rename`), so missing entries are named as the user sees them
    in their .pth."""
    *module, leaf = path
    leaf = _LEAF_TO_TORCH.get(leaf, leaf) if module else leaf
    if family == "iresnet" and module and module[0].startswith("layer"):
        block = module[1].removeprefix("block")
        sub = {"downsample_conv": ["downsample", "0"], "downsample_bn": ["downsample", "1"]}
        module = [module[0], block, *sub.get(module[2], module[2:])]
    elif family == "vit" and module:
        if module[0].startswith("block"):
            module = ["blocks", module[0].removeprefix("block"), *module[1:]]
        elif module[0] in _VIT_HEAD:
            module = [_VIT_HEAD[module[0]]]
        elif module == ["patch_embed"]:
            module = ["patch_embed", "proj"]
    return ".".join([*module, leaf])


def _converter(family: str):
    if family == "iresnet":
        from lowlight.models.iresnet import load_torch_state
    else:
        from lowlight.models.vit import load_torch_state
    return load_torch_state


def _flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def convert_state_dict(state: dict[str, np.ndarray], family: str, expected: dict,
                       model_name: str, source: str = "the .pth") -> tuple[dict, dict]:
    """{torch key: array} -> ({"params", "batch_stats"} numpy trees, counts), checked against
    `expected` ({"params", "batch_stats"} trees of `ShapeDtypeStruct`s of the backbone).

    Every key is converted on its own so that each problem names the torch key it comes from.
    """
    convert = _converter(family)
    got: dict[tuple[str, ...], np.ndarray] = {}
    origin: dict[tuple[str, ...], str] = {}
    unknown, skipped = [], []
    for key, value in state.items():
        try:
            part = convert({key: value})
        except (KeyError, IndexError, ValueError) as e:
            if isinstance(e, ValueError) and "frozen" in str(e):
                raise ConversionError(f"{source}: {e}") from None
            unknown.append(key)
            continue
        flat = _flatten(part)
        if not flat:
            skipped.append(key)  # num_batches_tracked, frozen features.weight (checked = 1)
        for path, array in flat.items():
            got[path], origin[path] = array, key
    want = {path: tuple(s.shape) for path, s in _flatten(expected).items()}
    unknown += [origin[p] for p in got if p not in want]
    missing = [p for p in want if p not in got]
    mismatched = [p for p in got if p in want and tuple(got[p].shape) != want[p]]
    if unknown or missing or mismatched:
        lines = [f"{source} does not fit {model_name}:"]
        lines += [f"  unexpected key {k!r} (no such parameter in {model_name})"
                  for k in sorted(set(unknown))]
        lines += [f"  missing key {torch_key(family, p[1:])!r} (for {'/'.join(p)})"
                  for p in missing]
        lines += [f"  shape mismatch: {origin[p]!r} {tuple(state[origin[p]].shape)} converts to "
                  f"{'/'.join(p)} {tuple(got[p].shape)}, {model_name} expects {want[p]}"
                  for p in mismatched]
        if len(lines) > 41:
            lines = lines[:41] + [f"  ... and {len(lines) - 41} more"]
        raise ConversionError("\n".join(lines))
    counts = dict(tensors=len(got), keys=len(state), skipped=skipped,
                  params=int(sum(a.size for p, a in got.items() if p[0] == "params")),
                  batch_stats=int(sum(a.size for p, a in got.items() if p[0] == "batch_stats")))
    return _unflatten(got), counts


class _Pretrained:
    """Stands in for a backbone module in `FaceEmbedder.init`: `init` returns the converted
    variables (as device arrays); every other attribute (e.g. a ViT's `patch_size`) is the
    module's."""

    def __init__(self, module: Any, variables: dict):
        self.module, self.variables = module, variables

    def init(self, rngs, x, **kwargs) -> dict:
        del rngs, x, kwargs
        import jax

        return jax.tree.map(jax.numpy.asarray, self.variables)

    def __getattr__(self, name: str):
        return getattr(self.module, name)


# ------------------------------------------------------------------------------ config
def load_config(spec: str, overrides: dict[str, Any] | None = None):
    """`configs/NAME.py[:ARG]` (relative to the cwd or the repo) -> ConfigDict, with dotted
    `overrides` applied (values are coerced by ConfigDict's own type checks)."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path) and os.path.exists(os.path.join(ROOT, path)):
        path = os.path.join(ROOT, path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--config: no config file {path!r}")
    module_spec = importlib.util.spec_from_file_location("_converter_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    for key, value in (overrides or {}).items():
        node = config
        *parents, last = key.split(".")
        try:
            for p in parents:
                node = node[p]
            node[last] = value
        except (KeyError, AttributeError, TypeError) as e:
            raise ValueError(f"--config.{key}={value!r}: {e}") from None
    return config


def _check_config(config, arch: str) -> None:
    model_name = ARCHS[arch][0]
    if config.get("task") != "recognition":
        raise ConversionError(f"the config's task is {config.get('task')!r}; converted "
                              "insightface backbones need a recognition config")
    if config.model.name != model_name:
        raise ConversionError(f"--arch={arch} is {model_name} but the config's model is "
                              f"{config.model.name!r}; pass a matching --config or --arch")


# ------------------------------------------------------------------------------ convert
def convert(pth: str, arch: str, out: str, *, config=None, overrides: dict | None = None,
            log=print) -> dict:
    """Converts `pth` into the run directory `out`; returns a summary (also `converted_from.json`).

    Args:
      pth: arcface_torch backbone state_dict file.
      arch: a key of `ARCHS` (r18 ... r200, vit_t/s/b).
      out: run directory to create (refused if it already holds a checkpoint).
      config: a recognition ConfigDict, or a config spec "configs/NAME.py[:ARG]"; default
        `ARCHS[arch][2]`. Its backbone must be exactly the checkpoint's.
      overrides: dotted config keys -> values, applied to a spec (e.g. data.num_identities).
    """
    if arch not in ARCHS:
        raise ConversionError(f"unknown --arch {arch!r}; valid: {', '.join(ARCHS)}")
    ckpt_dir = os.path.join(out, "checkpoints")
    if os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir)):
        raise FileExistsError(f"{out!r} already holds checkpoints; choose a new --out")
    import jax

    from lowlight import checkpoint as ckpt_lib
    from lowlight import config_lib, parallel, train

    model_name, family, default_spec = ARCHS[arch]
    if config is None or isinstance(config, str):
        config = load_config(config or default_spec, overrides)
    elif overrides:
        raise ValueError("overrides apply to a config spec, not to a ConfigDict")
    _check_config(config, arch)

    state_dict = read_state_dict(pth, log=log)
    mesh = parallel.make_mesh(1, devices=jax.devices()[:1])
    model, _, _, init, abstract = train.setup(config, mesh)
    expected = {"params": abstract.params["backbone"],
                "batch_stats": abstract.batch_stats["backbone"]}
    variables, counts = convert_state_dict(state_dict, family, expected, model_name, source=pth)

    # The state a training run of this config starts from, built by the training code itself
    # (`steps.init_state`: Partial FC centres, optimizer state, extras, rng) with the backbone's
    # initialiser replaced by the converted weights, so the layout is exactly what the loop saves
    # and restores. Run eagerly: jitting it would compile every random initialiser of the
    # backbone only to throw the result away (a minute for r50 on a small CPU).
    model = dataclasses.replace(model, backbone=_Pretrained(model.backbone, variables))
    state = init(jax.random.key(config.seed), model=model)
    shapes = lambda t: jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), t)
    if shapes(state) != shapes(abstract):  # a change in steps.init_state this tool missed
        raise RuntimeError("the converted state does not match the training state's layout")
    state = train.load_pretrained_modules(config, state)  # modules.*.init_from, if configured

    config_lib.write_or_check(config, out)
    ckpt = ckpt_lib.Checkpointer(ckpt_dir, every=0, keep=1, async_save=False)
    ckpt.save(0, state, force=True)
    ckpt.close()
    summary = dict(source=os.path.abspath(pth), sha256=_sha256(pth), arch=arch,
                   model=model_name, tensors=counts["tensors"], state_dict_keys=counts["keys"],
                   skipped=counts["skipped"], params=counts["params"],
                   batch_stats=counts["batch_stats"])
    with open(os.path.join(out, "converted_from.json"), "w") as f:
        json.dump(summary, f, indent=2)
    log(f"converted {counts['tensors']} tensors ({counts['params']:,} parameters, "
        f"{counts['batch_stats']:,} BatchNorm statistics) of {counts['keys']} state_dict keys; "
        f"skipped {len(counts['skipped'])} (num_batches_tracked, frozen features.weight); "
        f"wrote {out}")
    return summary


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------ CLI
def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any --config.KEY=VALUE overrides that key of the config.")
    p.add_argument("--pth", required=True, help="arcface_torch backbone state_dict (.pth/.pt)")
    p.add_argument("--arch", required=True, choices=list(ARCHS))
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--config", default=None,
                   help="configs/NAME.py[:ARGS] (default: the arch's recipe at scale=full)")
    args, rest = p.parse_known_args(argv)
    overrides = {}
    for item in rest:
        key, sep, value = item.partition("=")
        if not key.startswith("--config.") or not sep:
            p.error(f"unrecognised argument {item!r} (overrides look like --config.KEY=VALUE)")
        overrides[key.removeprefix("--config.")] = _parse_value(value)
    try:
        return convert(args.pth, args.arch, args.out, config=args.config, overrides=overrides)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # incl. ConversionError
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
