r"""Skin segmentation (paper B §3.3, eqs. 4–6) on the synthetic world's skin masks.

Loss: BCE + Dice + 0.01·TV + 0.005·(mean(M) − 0.6)² (paper B eq. 6). Evaluation: IoU / Dice per
lighting condition for the model and YCbCr thresholding (Chai & Ngan: Cr 133–173, Cb 77–127);
tables in DIR/eval/<step>/. `model=seg_cnn3` trains paper B §4.5.4's 3-conv-layer baseline.

Commands:
  python -m lowlight.main --config=configs/skin_seg.py --workdir=runs/skin_unet
  python -m lowlight.main --config=configs/skin_seg.py:model=seg_cnn3 --workdir=runs/skin_cnn3
  python -m lowlight.main --config=configs/skin_seg.py:smoke --workdir=/tmp/seg_smoke
Arguments: model = unet | seg_cnn3; scale = auto | full | cpu | smoke; smoke.
At cpu/smoke scale the U-Net keeps its four levels at 1/4 (cpu) or 1/8 (smoke) width.
"""

from lowlight import config_lib, recipes


def get_config(arg=None):
    a = config_lib.parse_arg(arg, model="unet", scale="auto", smoke=False)
    config_lib.choice("model", a.model, ("unet", "seg_cnn3"))
    scale = "smoke" if a.smoke else a.scale
    cpu_kwargs = {"unet": dict(width=0.125 if scale == "smoke" else 0.25), "seg_cnn3": {}}[a.model]
    c = recipes.supervised("skin_seg", model=a.model, scale=scale, cpu_model_kwargs=cpu_kwargs)
    # Paper B eq. 6 weights; photometric augmentation so the segmenter sees bad light too.
    c.task_cfg = dict(lambda_tv=0.01, lambda_area=0.005, tv_reduction="sum",
                      augment=dict(enabled=True))
    c.best_metric = "synth_val/model/all/iou"
    return c
