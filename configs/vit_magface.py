r"""ViT + MagFace with Partial FC on the synthetic world — lowlight's main job (paper B §3.5–3.8).

Paper B reports its best accuracy with a ViT-Base backbone and MagFace (§4.5, Fig. 9). ViTs are
trained with AdamW + cosine decay (paper B §3.9; arcface_torch's ViT recipe: lr 1e-3, wd 0.1),
not with the SGD recipe §4.1.3 gives for the ResNets — both papers' texts support this split.

Commands:
  python -m lowlight.main --config=configs/vit_magface.py --workdir=runs/vit_magface
  python -m lowlight.main --config=configs/vit_magface.py:variant=S,scale=full --workdir=...
  python -m lowlight.main --config=configs/vit_magface.py:smoke --workdir=/tmp/smoke

Arguments: variant = T | S | B | S_std | B_std (arcface_torch vit_t/s/b, or the standard-width
ViT-S/B); scale = auto | full | cpu | smoke (see lowlight/recipes.py; auto = full on a GPU/TPU,
cpu otherwise); smoke = shorthand for scale=smoke; loss overrides MagFace for ablations;
data / root / num_identities / val_targets / lfw_images train and evaluate on real data
(`data=recordio,root=/data/ms1m,val_targets=lfw+cfp_fp+agedb_30`; lowlight.recipes.real_data).
At scale=cpu/smoke the ViT keeps its structure (patch embedding, pre-LN blocks, ReLU6 MLP, the
flatten→FC→BN→FC→BN head) but is narrowed and made shallower to fit a 2-core CPU.
"""

from lowlight import config_lib, recipes

VARIANTS = {"T": "vit_t", "S": "vit_s", "B": "vit_b", "S_std": "vit_s_std", "B_std": "vit_b_std"}


def get_config(arg=None):
    a = config_lib.parse_arg(arg, variant="B", scale="auto", smoke=False, loss="magface",
                             **recipes.REAL_DATA_ARGS)
    scale = "smoke" if a.smoke else a.scale
    model = VARIANTS[config_lib.choice("variant", a.variant, VARIANTS)]
    config_lib.choice("loss", a.loss, recipes.LOSS_DEFAULTS)
    resolved = recipes.resolve_scale(scale)
    model_kwargs = {}
    if resolved in ("cpu", "smoke"):
        small = resolved == "smoke"
        model_kwargs = dict(img_size=32 if small else 64, patch_size=8,
                            width=32 if small else 128, depth=1 if small else 4,
                            num_heads=2 if small else 4, drop_path_rate=0.0, mask_ratio=0.0)
    c = recipes.recognition(model=model, loss=a.loss, scale=resolved, optimizer="adamw",
                            model_kwargs=model_kwargs)
    if resolved == "cpu":
        c.optim.lr = 2e-3
        c.optim.warmup_steps = 100
    c.variant = a.variant
    return recipes.real_data(c, a)
