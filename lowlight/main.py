"""Entry point: `python -m lowlight.main --config=configs/NAME.py[:ARGS] --workdir=DIR`.

Thin on purpose: parse flags, optionally join a multi-host job, check the config, write it to the
workdir, and hand over to the task function that `config.task` names (see
`lowlight.config_lib.TASKS`). Tests and notebooks call the same task functions directly.
"""

from __future__ import annotations

import importlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/vit_magface.py:smoke", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config.json, metrics, checkpoints.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "jax.distributed.initialize(): 'auto' joins when a cluster environment (SLURM, "
    "JAX_COORDINATOR_ADDRESS, ...) is detected; 'on' always; 'off' never.",
)


def _want_distributed(mode: str) -> bool:
    if mode != "auto":
        return mode == "on"
    env = os.environ
    slurm_multi = int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env
    return slurm_multi or "JAX_COORDINATOR_ADDRESS" in env or "COORDINATOR_ADDRESS" in env


class _QuietLibraries:
    """Drops INFO chatter of orbax / grain (dozens of lines per checkpoint) from the console;
    their warnings and errors still show. `--verbosity=1` shows everything."""

    NOISY = ("/orbax/", "/grain/", "/etils/")

    def filter(self, record) -> bool:
        import logging as py_logging

        if record.levelno >= py_logging.WARNING:
            return True
        return not any(n in record.pathname for n in self.NOISY)


def run(config, workdir: str):
    """Validates `config`, records it in `workdir` and runs its task. Returns the task's result."""
    import jax

    from lowlight import config_lib

    config_lib.validate(config, num_devices=jax.device_count())
    if jax.process_index() == 0:
        config_lib.write_or_check(config, workdir)
    module_name, fn_name = config_lib.TASKS[config.task].split(":")
    fn = getattr(importlib.import_module(module_name), fn_name)
    return fn(config, workdir)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("both --config and --workdir are required")
    import jax

    from lowlight import config_lib

    if logging.get_verbosity() <= logging.INFO:
        logging.get_absl_logger().addFilter(_QuietLibraries())
    if _want_distributed(_DISTRIBUTED.value):
        kwargs = {}
        if "JAX_NUM_PROCESSES" in os.environ:  # explicit (launch/local_multiprocess.sh)
            kwargs = dict(num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                          process_id=int(os.environ["JAX_PROCESS_ID"]))
        jax.distributed.initialize(**kwargs)
    logging.info(
        "lowlight: process %d/%d, %d local / %d global devices (%s)",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
        jax.devices()[0].platform,
    )
    try:
        run(_CONFIG.value, _WORKDIR.value)
    except config_lib.ConfigError as e:  # configuration mistakes: one clear line, no traceback
        if os.environ.get("LOWLIGHT_TRACEBACK"):
            raise
        print(f"lowlight: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from lowlight import cpu_malloc

    cpu_malloc.apply()  # before jax starts XLA's threads (lowlight/cpu_malloc.py says why)
    app.run(main)
