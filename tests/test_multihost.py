"""Multi-host training on one machine: 2 processes x 2 CPU devices (jax.distributed over
loopback, gloo collectives) must agree with each other and equal a 1-process 4-device run."""

import os
import socket
import subprocess
import sys

import numpy as np

from lowlight.metric_writer import read_metrics
from tests.helpers import ROOT

ARGS = ["--config=configs/vit_magface.py:smoke", "--config.progress=False",
        "--config.total_steps=3", "--config.log_every=1", "--config.eval_every=3"]


def _env(devices: int, **extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path):
    wd_mp, wd_sp = str(tmp_path / "mp"), str(tmp_path / "sp")
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "lowlight.main", *ARGS, f"--workdir={wd_mp}", "--distributed=on"],
        cwd=ROOT, env=_env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                           JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "process 1/2" in outs[1] and "process 0/2" in outs[0]
    single = subprocess.run([sys.executable, "-m", "lowlight.main", *ARGS, f"--workdir={wd_sp}",
                             "--distributed=off"], cwd=ROOT, env=_env(4), capture_output=True,
                            text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    mp = [r for r in read_metrics(wd_mp) if "train/loss" in r]
    sp = [r for r in read_metrics(wd_sp) if "train/loss" in r]
    assert [r["step"] for r in mp] == [1, 2, 3]  # only process 0 writes: one line per step
    np.testing.assert_allclose([r["train/loss"] for r in mp], [r["train/loss"] for r in sp],
                               rtol=1e-4)
    ev_mp = [r for r in read_metrics(wd_mp) if "synth_val/acc" in r][-1]
    ev_sp = [r for r in read_metrics(wd_sp) if "synth_val/acc" in r][-1]
    np.testing.assert_allclose(ev_mp["synth_val/auc"], ev_sp["synth_val/auc"], atol=1e-3)
