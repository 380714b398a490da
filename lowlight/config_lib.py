"""Config helpers shared by every file in configs/ (big_vision style).

A config file defines `get_config(arg=None)`; `arg` is the text after the colon in
`--config=configs/NAME.py:ARG`, e.g. `variant=S,smoke`. `parse_arg` turns it into a ConfigDict of
typed options with defaults, and fails on keys the config does not know — the same one-line
error style as the rest of the start-up checks in `validate`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import ml_collections


class ConfigError(ValueError):
    """A configuration mistake found at start-up; `lowlight.main` prints it as one line."""


# Tasks `lowlight.main` can run: name -> "module:function(config, workdir)". Imported lazily so
# a task's heavy dependencies load only when it runs.
TASKS: dict[str, str] = {
    "recognition": "lowlight.train:train_and_evaluate",
    "relight": "lowlight.train_supervised:train_and_evaluate",
    "skin_seg": "lowlight.train_supervised:train_and_evaluate",
    "attributes": "lowlight.train_supervised:train_and_evaluate",
    "lighting": "lowlight.train_supervised:train_and_evaluate",
    "attributes_routed": "lowlight.attributes:run_routed",
}

# Config keys that may differ between a run and its resumption without counting as a
# "different config" (they steer the process, not the experiment).
RESUMABLE_KEYS = frozenset({
    "resume", "total_steps", "log_every", "eval_every", "ckpt_every", "progress", "num_workers",
    "evals", "keep_ckpts", "best_metric", "num_devices", "eval_batch_size", "stop_after",
    "max_nonfinite",
})


def _coerce(value: str, default: Any) -> Any:
    if isinstance(default, bool):
        if value.lower() in ("", "1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"expected a boolean, got {value!r}")
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    return value


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses `"k1=v1,flag,k2=v2"` against `defaults` (which also fix the types).

    A bare `flag` sets a boolean default to True. Unknown keys raise ValueError naming the key and
    the valid ones, so `vit_magface.py:varient=S` fails at start instead of being ignored.
    """
    out = dict(defaults)
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ConfigError(
                f"unknown config argument {key!r}; valid: {', '.join(sorted(defaults)) or '(none)'}"
            )
        if not sep and not isinstance(defaults[key], bool):
            raise ConfigError(f"config argument {key!r} needs a value ({key}=...)")
        try:
            out[key] = _coerce(value.strip(), defaults[key]) if sep else True
        except ValueError as e:
            raise ConfigError(f"config argument {key!r}: {e}") from None
    return ml_collections.ConfigDict(out)


def choice(name: str, value: str, valid) -> str:
    """Returns `value` if it is in `valid`, else raises one line naming `name` and the choices."""
    valid = tuple(valid)
    if value not in valid:
        raise ConfigError(f"unknown {name} {value!r}; valid: {', '.join(map(str, valid))}")
    return value


def to_dict(config) -> dict:
    """ConfigDict (or mapping) -> plain JSON-serialisable dict."""
    if isinstance(config, ml_collections.ConfigDict):
        config = config.to_dict()
    if isinstance(config, Mapping):
        return {k: to_dict(v) for k, v in config.items()}
    if isinstance(config, tuple | list):
        return [to_dict(v) for v in config]
    return config


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if not prefix and k in RESUMABLE_KEYS:
                continue
            key = f"{prefix}{k}"
            if k not in a or k not in b:
                out.append(key)
            else:
                out += _diff(a[k], b[k], key + ".")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def write_or_check(config, workdir: str) -> None:
    """Writes `workdir/config.json`, or checks that the workdir's existing run used this config.

    A workdir that holds a run of a different experiment config is refused (resuming it would mix
    two experiments in one metrics.jsonl and checkpoint history) unless `config.resume` names what
    to do: `resume="force"` overwrites config.json and resumes anyway.
    """
    path = os.path.join(workdir, "config.json")
    new = json.loads(json.dumps(to_dict(config), default=str))
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = _diff(old, new)
        if diff and config.get("resume", "") != "force":
            raise ConfigError(
                f"workdir {workdir!r} holds a run of a different config (differs in: "
                f"{', '.join(diff[:8])}{', ...' if len(diff) > 8 else ''}); use a new --workdir "
                "or pass --config.resume=force to continue it with this config"
            )
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(new, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def validate(config, num_devices: int | None = None) -> None:
    """Start-up checks that fail in one line naming the key and the valid choices."""
    choice("task", config.task, TASKS)
    if "model" in config and "name" in config.model:
        from lowlight import models

        choice("model (config.model.name)", config.model.name, models.names())
    if "data" in config and "name" in config.data:
        from lowlight.data import pipeline

        choice("dataset (config.data.name)", config.data.name, pipeline.DATASETS)
    if "loss" in config and "name" in config.loss:
        from lowlight.losses import LOSSES

        choice("loss (config.loss.name)", config.loss.name, LOSSES)
    if num_devices and config.get("num_devices", 0):
        num_devices = config.num_devices
    if num_devices and "batch_size" in config:
        if config.batch_size % num_devices:
            raise ConfigError(
                f"config.batch_size={config.batch_size} is not divisible by the {num_devices} "
                "devices; choose a multiple of the device count"
            )
