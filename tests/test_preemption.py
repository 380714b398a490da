"""Runs that survive failure: SIGKILL mid-run loses at most one checkpoint interval and the
resumed run continues the same example stream; SIGTERM (SLURM's pre-kill signal) checkpoints and
exits cleanly. Compared step by step with an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import numpy as np

from lowlight.metric_writer import read_metrics
from tests.helpers import ROOT

ARGS = ["--config=configs/vit_magface.py:smoke", "--config.progress=False",
        "--config.total_steps=8", "--config.log_every=1", "--config.ckpt_every=1",
        "--config.eval_every=1000", "--config.evals={}"]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")


def _cmd(wd):
    return [sys.executable, "-m", "lowlight.main", *ARGS, f"--workdir={wd}"]


def _losses(wd) -> dict:
    """step -> loss, the last record of each step winning (a killed segment may repeat)."""
    return {r["step"]: r["train/loss"] for r in read_metrics(wd) if "train/loss" in r}


def _start_and_signal(wd, sig, at_step: int):
    p = subprocess.Popen(_cmd(wd), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if max(_losses(wd) or {0: 0}) >= at_step:
            p.send_signal(sig)
            break
        time.sleep(0.05)
    _, err = p.communicate(timeout=300)
    return p.returncode, err


def test_kill_and_term_then_resume_equal_uninterrupted(tmp_path):
    ref_wd, kill_wd, term_wd = (str(tmp_path / n) for n in ("ref", "kill", "term"))
    r = subprocess.run(_cmd(ref_wd), cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = _losses(ref_wd)
    assert sorted(ref) == list(range(1, 9))

    rc, _ = _start_and_signal(kill_wd, signal.SIGKILL, at_step=3)
    assert rc == -signal.SIGKILL
    killed_at = max(_losses(kill_wd))
    assert killed_at < 8
    r = subprocess.run(_cmd(kill_wd), cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = _losses(kill_wd)
    assert sorted(got) == list(range(1, 9))
    np.testing.assert_allclose([got[s] for s in range(1, 9)], [ref[s] for s in range(1, 9)],
                               rtol=1e-5)

    rc, err = _start_and_signal(term_wd, signal.SIGTERM, at_step=3)
    assert rc == 0, err[-3000:]
    assert "preempted: checkpoint at step" in err
    stopped = max(int(d) for d in os.listdir(os.path.join(term_wd, "checkpoints")) if d.isdigit())
    assert 3 <= stopped < 8 and stopped == max(_losses(term_wd))  # nothing lost on SIGTERM
    r = subprocess.run(_cmd(term_wd), cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = _losses(term_wd)
    np.testing.assert_allclose([got[s] for s in range(1, 9)], [ref[s] for s in range(1, 9)],
                               rtol=1e-5)
