r"""Relighting network (paper B §3.4) trained on synthetic (degraded → canonical-light) pairs.

The degraded input is the synthetic world's render under its own lighting condition (normal,
low, side ×4, over), and with probability `protocol_p` additionally paper B's protocol ops
(gamma / contrast / directional masks) applied on device. Loss: 0.84·(1 − SSIM) + 0.16·L1
(paper B names L1 + SSIM; the weighting is Zhao et al.'s, see lowlight/losses/reconstruction.py).
Evaluation: PSNR / SSIM / illumination-uniformity gain per lighting condition for the network and
the classic baselines (none, gamma, CLAHE, multi-scale retinex); tables in DIR/eval/<step>/.

Commands:
  python -m lowlight.main --config=configs/relight.py --workdir=runs/relight
  python -m lowlight.main --config=configs/relight.py:smoke --workdir=/tmp/relight_smoke
Arguments: scale = auto | full | cpu | smoke; smoke; width (default 208 → ~1.19M params, the
paper's size; at cpu/smoke scale 32 / 8).
"""

from lowlight import config_lib, recipes


def get_config(arg=None):
    a = config_lib.parse_arg(arg, scale="auto", smoke=False, width=208)
    scale = "smoke" if a.smoke else a.scale
    resolved = recipes.resolve_scale(scale)
    width = a.width if resolved == "full" else (8 if resolved == "smoke" else 32)
    c = recipes.supervised("relight", model="relight", scale=resolved,
                           model_kwargs=dict(width=width))
    c.task_cfg = dict(ssim_alpha=0.84, protocol_p=0.3)
    c.best_metric = "synth_val/relight/psnr"
    return c
