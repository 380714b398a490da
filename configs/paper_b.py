r"""Paper B's experiments as one config family: ablation, mask and segmenter comparisons, grid.

  exp=baseline     iResNet + ArcFace, no augmentation, no modules            (Table 6, row 1)
  exp=aug          + photometric augmentation in training                      (Table 6, row 2)
  exp=relight      + neural relighting at inference                            (Table 6, row 3)
  exp=full         + U-Net skin mask modulating features (all modules)         (Table 6, row 4)
  exp=mask_none | mask_se | mask_cbam | mask_unet
                   feature modulation compared on the same backbone            (Table 8)
  exp=seg_none | seg_ycbcr | seg_cnn3 | seg_unet
                   mask source compared: none, YCbCr thresholds, 3-conv CNN, U-Net (Table 9)
  exp=grid         backbone × loss (§4.5.5): backbone=r50|r100|vit_t|vit_s|vit_b, loss=...,
                   modules=aug (augmentation only) | full (relighting + U-Net mask, as Table
                   6(b) trains every cell)

The relighting net and segmenters are trained first by their own configs; point at their runs:
  python -m lowlight.main --config=configs/relight.py --workdir=runs/relight
  python -m lowlight.main --config=configs/skin_seg.py --workdir=runs/skin_unet
  python -m lowlight.main --config=configs/skin_seg.py:model=seg_cnn3 --workdir=runs/skin_cnn3
  python -m lowlight.main --config=configs/paper_b.py:exp=full --workdir=runs/b_full
(`relight_from`, `unet_from`, `cnn3_from` override those paths; an empty path trains the module
from scratch jointly, which the paper does not do.) The pretrained modules stay frozen for
`freeze_steps` steps, then are fine-tuned with the backbone (§3.9). Every experiment evaluates on
held-out synthetic people under mixed light and under paper B's illumination protocol.

Real data (every experiment): `data=recordio,root=/data/ms1m,val_targets=lfw+cfp_fp+agedb_30`
trains on an insightface pack and evaluates on its .bin sets, each as stored and through the
illumination protocol (`lfw_illum/...`); see `lowlight.recipes.real_data`. The relighting net and
segmenters are still pretrained on the synthetic world (they need relit targets and skin masks
that real packs do not have).

scale = auto | full | cpu | smoke; at cpu/smoke the module sizes match configs/relight.py and
configs/skin_seg.py at the same scale, so their checkpoints load.
"""

from lowlight import config_lib, recipes

EXPS = ("baseline", "aug", "relight", "full", "mask_none", "mask_se", "mask_cbam", "mask_unet",
        "seg_none", "seg_ycbcr", "seg_cnn3", "seg_unet", "grid")
BACKBONES = {"r18": "iresnet18", "r50": "iresnet50", "r100": "iresnet100", "vit_t": "vit_t",
             "vit_s": "vit_s", "vit_b": "vit_b"}


def get_config(arg=None):
    a = config_lib.parse_arg(arg, exp="full", backbone="r100", loss="arcface", scale="auto",
                             smoke=False, relight_from="runs/relight", unet_from="runs/skin_unet",
                             cnn3_from="runs/skin_cnn3", freeze_steps=-1, modules="aug",
                             **recipes.REAL_DATA_ARGS)
    config_lib.choice("exp", a.exp, EXPS)
    config_lib.choice("backbone", a.backbone, BACKBONES)
    config_lib.choice("loss", a.loss, recipes.LOSS_DEFAULTS)
    config_lib.choice("modules", a.modules, ("aug", "full"))
    scale = recipes.resolve_scale("smoke" if a.smoke else a.scale)
    small, cpu = scale == "smoke", scale in ("cpu", "smoke")
    backbone = a.backbone if a.exp == "grid" else "r100"
    loss = a.loss if a.exp == "grid" else "arcface"
    model = BACKBONES[backbone]
    model_kwargs = {}
    if cpu:
        if model.startswith("vit"):
            model_kwargs = dict(img_size=32 if small else 64, patch_size=8,
                                width=32 if small else 128, depth=1 if small else 4,
                                num_heads=2 if small else 4, drop_path_rate=0.0, mask_ratio=0.0)
        else:
            model = "iresnet18"
            model_kwargs = dict(recipes.CPU_IRESNET)
    c = recipes.recognition(model=model, loss=loss, scale=scale,
                            optimizer="adamw" if model.startswith("vit") else "sgd",
                            model_kwargs=model_kwargs)
    if scale == "cpu" and not model.startswith("vit"):
        c.optim.lr, c.optim.warmup_steps, c.optim.clip_norm = 0.05, 100, 5.0
    if scale == "cpu" and model.startswith("vit"):
        c.optim.lr, c.optim.warmup_steps = 2e-3, 100
    c.exp = a.exp
    recipes.real_data(c, a)

    relight_kw = dict(width=208 if not cpu else 8 if small else 32)
    seg_kw = {"unet": dict(width=1.0 if not cpu else 0.125 if small else 0.25), "seg_cnn3": {}}
    freeze = a.freeze_steps if a.freeze_steps >= 0 else (2 if small else c.total_steps // 4)
    m = c.modules

    def use_relight():
        m.relight.update(enabled=True, init_from=a.relight_from, freeze_steps=freeze,
                         train=False, eval=True, kwargs=relight_kw)

    def use_mask(model_name):
        m.mask.update(source="segmenter", model=model_name, freeze_steps=freeze,
                      init_from=a.unet_from if model_name == "unet" else a.cnn3_from,
                      kwargs=seg_kw[model_name])

    exp = a.exp
    c.augment.enabled = exp not in ("baseline",)
    all_modules = exp == "full" or (exp == "grid" and a.modules == "full")
    if exp == "relight" or all_modules:
        use_relight()
    if exp in ("mask_unet", "seg_unet") or all_modules:
        use_mask("unet")
    if exp == "seg_cnn3":
        use_mask("seg_cnn3")
    if exp == "seg_ycbcr":
        m.mask.source = "ycbcr"
    if exp in ("mask_se", "mask_cbam"):
        m.mask.attention = exp.split("_")[1]
    if small:
        # smoke runs do not need pretrained modules: drop the default paths (which would not
        # exist), keep any path the user (or tools/reproduce.py) gave explicitly
        defaults = {"runs/relight", "runs/skin_unet", "runs/skin_cnn3"}
        for k in ("relight", "mask"):
            if m[k].get("init_from") in defaults:
                m[k].init_from = ""
    return c
