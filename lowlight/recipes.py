"""Shared config builders for configs/*.py (one place for every paper constant).

`recognition(...)` returns the full ConfigDict of a face-recognition run (task 'recognition').
Config files choose backbone, loss and scale and override what differs. Scales:
  * full  — paper B §4.1.3 at cluster size: 112x112, batch 512, SGD lr 0.1 cosine, wd 5e-4,
            Partial FC r = 0.3 (for the synthetic world; real MS1M data comes with the data issue);
  * cpu   — the same code path sized for a 2-core CPU: a few minutes, learns something real;
  * smoke — seconds: proves every code path runs (tests use it).
`scale=auto` picks 'full' when an accelerator is visible and 'cpu' otherwise; config.json
records the resolved value.
"""

from __future__ import annotations

import ml_collections

SCALES = ("auto", "full", "cpu", "smoke")

#: iResNet at cpu/smoke scale: iResNet-18's blocks at a quarter of the width (16-32-64-128) —
#: the full-width r18 costs ~3 s per 64-image step on a 2-core CPU, this ~0.2 s.
CPU_IRESNET = {"widths": (16, 32, 64, 128)}

# Paper B §4.1.3 (training details) and official defaults per loss.
LOSS_DEFAULTS = {
    "arcface": dict(s=64.0, m=0.5, straight_through=True, easy_margin=False, fallback=False),
    "cosface": dict(s=64.0, m=0.4),
    "adaface": dict(s=64.0, m=0.4, h=0.333, t_alpha=0.01),
    # MagFace official: s=64, l_a=10, u_a=110, l_m=0.45, u_m=0.8, lambda_g=35, easy margin.
    "magface": dict(s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0,
                    easy_margin=True),
}


def resolve_scale(scale: str) -> str:
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid: {', '.join(SCALES)}")
    if scale != "auto":
        return scale
    import jax

    return "full" if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else "cpu"


def recognition(*, model: str, loss: str, scale: str, optimizer: str = "sgd",
                model_kwargs: dict | None = None) -> ml_collections.ConfigDict:
    """Full config of a recognition run; see the module docstring for `scale`."""
    scale = resolve_scale(scale)
    c = ml_collections.ConfigDict()
    c.task = "recognition"
    c.scale = scale
    c.seed = 0
    c.resume = ""       # another run's workdir / checkpoints dir to continue, or "force"
    c.init_from = ""    # weights-only initialisation from another run

    # data.name: synth (default) | recordio (insightface pack: root = folder with train.rec) |
    # image_folder | prepared (tools/prepare.py output) | utkface. num_identities = classes.
    c.data = dict(name="synth", seed=0, num_identities=2000, images_per_identity=20, size=112,
                  synth={}, root="", split="train", validate=False)
    # dtype: compute dtype of the backbone ("bfloat16" on GPUs/TPUs for mixed precision;
    # parameters, the embedding head, margins and softmax stay float32).
    c.model = dict(name=model, kwargs=dict(embed_dim=512, dtype="float32",
                                           **(model_kwargs or {})))
    c.loss = dict(name=loss, **LOSS_DEFAULTS[loss])
    # Partial FC, paper B §4.1.3: sampling rate 0.3 "in accordance with the official insightface
    # training protocol"; centres split over every device like arcface_torch.
    c.partial_fc = dict(sample_rate=0.3, class_axes=("data", "model"))
    # Paper B's illumination modules (§3.2–3.9), all off in the baseline. relight: the neural
    # relighting net, at inference (eval) and optionally in training; mask: the skin-mask source
    # (none | segmenter | ycbcr) with its model (unet | seg_cnn3), the iResNet stage it modulates
    # (F' = a*M*F + (1-a)*F, a init 0.7) or, for ViTs, per-patch token scaling; attention: SE or
    # CBAM on the same stage instead (paper B Table 8). init_from: the pretrained module's run;
    # freeze_steps: steps it stays frozen before joint fine-tuning (§3.9).
    c.modules = dict(
        relight=dict(enabled=False, init_from="", train=False, eval=True, freeze_steps=0,
                     kwargs={}),
        mask=dict(source="none", model="unet", init_from="", freeze_steps=0, stage=1,
                  alpha_init=0.7, attention="none", kwargs={}),
    )
    c.model_parallel = 1
    c.num_devices = 0   # 0 = all visible devices; N = the first N (tests, debugging)

    if optimizer == "sgd":  # paper B §4.1.3
        c.optim = dict(name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine",
                       warmup_steps=0, clip_norm=0.0, wd_exclude=(), freeze=())
    else:  # paper B §3.9 (AdamW + cosine); arcface_torch ViT recipe: lr 1e-3, wd 0.1
        c.optim = dict(name="adamw", lr=1e-3, weight_decay=0.1, b1=0.9, b2=0.999, eps=1e-8,
                       schedule="cosine", warmup_steps=0, clip_norm=5.0,
                       wd_exclude=(r"(bias|scale|pos_embed)$",), freeze=())
    # Paper B §3.2: photometric augmentation during training (brightness, contrast, gamma,
    # colour temperature), on device inside the step.
    c.augment = dict(enabled=True)
    c.batch_size = 512
    c.total_steps = 20_000
    c.stop_after = 0    # stop (with a checkpoint) at this step; 0 = at total_steps. The schedule
                        # still spans total_steps, so the run resumes exactly where it stopped.
    c.max_nonfinite = 10  # non-finite updates are skipped and counted; stop beyond this many
    c.log_every = 50
    c.eval_every = 2000
    c.ckpt_every = 2000
    c.keep_ckpts = 3
    c.best_metric = "synth_val/acc"
    c.best_mode = "max"
    c.eval_batch_size = 256
    c.num_workers = 0
    c.progress = True
    c.evals = {
        "synth_clean": dict(type="synth_verification", seed=10_003, num_identities=500,
                            images_per_identity=4, size=112, num_pairs=3000, lighting="normal"),
        "synth_val": dict(type="synth_verification", seed=10_001, num_identities=500,
                          images_per_identity=4, size=112, num_pairs=3000, lighting="mixed"),
        "synth_illum": dict(type="synth_verification", seed=10_002, num_identities=500,
                            images_per_identity=4, size=112, num_pairs=3000,
                            lighting="protocol"),
    }

    if scale == "full":
        c.data.num_identities = 20_000
        c.data.images_per_identity = 50
        c.total_steps = 40_000
        c.optim.warmup_steps = 1000
    elif scale in ("cpu", "smoke"):
        small = scale == "smoke"
        size = 32 if small else 64
        c.data.size = size
        c.data.num_identities = 64 if small else 300
        c.data.images_per_identity = 8 if small else 24
        c.batch_size = 16 if small else 64
        c.total_steps = 4 if small else 1200
        c.log_every = 2 if small else 20
        c.eval_every = 2 if small else 300
        c.ckpt_every = 2 if small else 300
        c.eval_batch_size = 32 if small else 128
        c.optim.warmup_steps = 0 if small else 50
        c.partial_fc.sample_rate = 1.0 if small else 0.5
        c.model.kwargs.embed_dim = 64 if small else 128
        for ev in c.evals.values():
            ev.size = size
            ev.num_identities = 24 if small else 150
            ev.num_pairs = 48 if small else 1000
    return c


#: Config arguments every recognition config file accepts (`--config=configs/X.py:data=...`):
#: where the training images come from and which real pair sets evaluate the run.
REAL_DATA_ARGS = dict(data="synth", root="", num_identities=0, val_targets="", lfw_images="")


def real_data(c: ml_collections.ConfigDict, a) -> ml_collections.ConfigDict:
    """Points a recognition config at real data, arcface_torch style (`rec` + `val_targets`).

      data=recordio|image_folder|prepared, root=PATH
          train on an insightface MXNet pack (a folder with train.rec/train.idx), identity
          folders or tools/prepare.py output instead of the synthetic world. num_identities=0
          (default) reads the count from the data: the pack's `property` file
          ("classes,H,W"), else its identity header records / largest label; the folders'
          count; for `prepared` it must be given.
      val_targets=lfw+cfp_fp+agedb_30
          '+'-separated pair sets; a bare name is `<root>/<name>.bin` (where insightface packs
          keep them), anything with a '/' or an extension is a path; a `.txt` is LFW's
          pairs.txt, read with the images in `lfw_images`. Each set T is evaluated twice:
          `T` as stored and `T_illum` through paper B's illumination protocol (the probe of
          each pair relit / darkened, the gallery face kept). They replace the synthetic
          evaluation sets, and `best_metric` becomes the first set's accuracy. Without
          val_targets a run on real data keeps the synthetic held-out sets (the only held-out
          people there are).

    Everything is checked here, at config time, so a wrong path fails in one line before any
    compilation.
    """
    import os

    from lowlight.config_lib import ConfigError

    choice_ok = ("synth", "recordio", "image_folder", "prepared")
    if a.data not in choice_ok:
        raise ConfigError(f"unknown data {a.data!r}; valid: {', '.join(choice_ok)} (paper A's "
                          "UTKFace is configs/paper_a.py's data=utkface)")
    if a.data != "synth":
        if not a.root or not os.path.exists(a.root):
            raise ConfigError(f"data={a.data} needs root=<path>; got root={a.root!r}"
                              + (" (does not exist)" if a.root else ""))
        c.data.name, c.data.root = a.data, a.root
        n = a.num_identities or _count_identities(a.data, a.root)
        if not n:
            raise ConfigError(f"data={a.data}: give num_identities=<classes> (cannot be read "
                              f"from {a.root})")
        c.data.num_identities = int(n)
    elif a.num_identities:
        c.data.num_identities = int(a.num_identities)
    targets = [t for t in a.val_targets.split("+") if t]
    if targets:
        c.evals, names = {}, []
        for t in targets:
            path = pair_set_path(t, a.root)
            if path is None:
                raise ConfigError(f"val_targets: {t!r} is a name, looked up as "
                                  f"<root>/{t}.bin, but root={a.root!r} is not a folder; "
                                  "give the .bin path instead")
            if not os.path.isfile(path):
                raise ConfigError(f"val_targets: no pair set at {path!r} (from {t!r})")
            if path.endswith(".txt") and not os.path.isdir(a.lfw_images):
                raise ConfigError(f"val_targets: {path} is an LFW pairs.txt; give its image "
                                  f"folder as lfw_images=<dir> (got {a.lfw_images!r})")
            name = pair_set_name(path)
            if name in c.evals:
                raise ConfigError(f"val_targets: two sets are named {name!r}")
            names.append(name)
            for suffix, lighting in (("", "as_is"), ("_illum", "protocol")):
                c.evals[name + suffix] = dict(type="pairs", path=os.path.abspath(path),
                                              images=os.path.abspath(a.lfw_images)
                                              if a.lfw_images else "", size=c.data.size,
                                              lighting=lighting, seed=10_002, num_pairs=0)
        c.best_metric = f"{names[0]}/acc"  # (a ConfigDict iterates its keys sorted)
    return c


def pair_set_path(target: str, root: str) -> str | None:
    """Where a `val_targets` entry points: a bare name ("lfw") is `<root>/<name>.bin` (None
    when root is not a folder); anything with a '/' or an extension is a path already."""
    import os

    if "/" in target or "." in target:
        return target
    return os.path.join(root, target + ".bin") if root and os.path.isdir(root) else None


def pair_set_name(path: str) -> str:
    """Evaluator name of a pair set: the file's stem ("lfw" for lfw.bin, "cfp_fp"), "lfw" for
    LFW's pairs*.txt."""
    stem = path.replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return "lfw" if stem.lower().startswith("pairs") else stem


def _count_identities(data: str, root: str) -> int:
    """Identities in a training set, read from the data (0 when it cannot be told)."""
    import os

    if data == "recordio":
        folder = root if os.path.isdir(root) else os.path.dirname(root)
        prop = os.path.join(folder, "property")
        if os.path.isfile(prop):
            with open(prop) as f:
                head = f.read().strip().split(",")[0]
            if head.isdigit():
                return int(head)
        from lowlight.data.recordio import RecordIO

        rec = os.path.join(root, "train.rec") if os.path.isdir(root) else root
        return RecordIO(rec).num_classes
    if data == "image_folder":
        from lowlight.data.image_folder import ImageFolder

        return ImageFolder(root, validate=False).num_classes
    return 0


def resnet(arg, *, loss: str) -> ml_collections.ConfigDict:
    """Body of configs/r100_<loss>.py: iResNet + `loss` (paper B §4.1.3; `depth=50` → r50).

    At scale=cpu/smoke the backbone is iResNet-18 at quarter width (`CPU_IRESNET`) at 64x64 /
    32x32: the same block structure at a size a 2-core CPU trains in minutes; config.depth
    records the requested depth.
    """
    from lowlight import config_lib

    a = config_lib.parse_arg(arg, depth=100, scale="auto", smoke=False, **REAL_DATA_ARGS)
    config_lib.choice("depth", a.depth, (18, 34, 50, 100, 200))
    scale = resolve_scale("smoke" if a.smoke else a.scale)
    model = f"iresnet{a.depth}" if scale == "full" else "iresnet18"
    c = recognition(model=model, loss=loss, scale=scale, optimizer="sgd",
                    model_kwargs=CPU_IRESNET if scale in ("cpu", "smoke") else None)
    c.depth = a.depth
    if scale == "cpu":
        c.optim.lr = 0.05
        c.optim.warmup_steps = 100
        c.optim.clip_norm = 5.0
    return real_data(c, a)


def supervised(task: str, *, model: str, scale: str, model_kwargs: dict | None = None,
               cpu_model_kwargs: dict | None = None) -> ml_collections.ConfigDict:
    """Config of a single-model supervised task (relight, skin_seg) on the synthetic world.

    Adam(W) with cosine decay; the eval set is held-out people (another world seed) rendered
    under every lighting condition, scored per condition against the classic baselines.
    """
    scale = resolve_scale(scale)
    small = scale == "smoke"
    cpu = scale in ("cpu", "smoke")
    c = ml_collections.ConfigDict()
    c.task = task
    c.scale = scale
    c.seed = 0
    c.resume = ""
    c.init_from = ""
    c.num_devices = 0
    size = 32 if small else 64 if cpu else 112
    c.data = dict(name="synth", seed=0, num_identities=5000 if not cpu else 400,
                  images_per_identity=10 if not cpu else 8, size=size, synth={}, root="",
                  split="train", validate=False)
    kwargs = dict(dtype="float32", **(model_kwargs or {}))
    if cpu:
        kwargs.update(cpu_model_kwargs or {})
    c.model = dict(name=model, kwargs=kwargs)
    c.optim = dict(name="adamw", lr=1e-3, weight_decay=1e-4, b1=0.9, b2=0.999, eps=1e-8,
                   schedule="cosine", warmup_steps=0 if small else 100, clip_norm=1.0,
                   wd_exclude=(r"(bias|scale)$",), freeze=())
    c.task_cfg = {}
    c.batch_size = 8 if small else 32 if cpu else 128
    c.total_steps = 3 if small else 600 if cpu else 20_000
    c.stop_after = 0
    c.max_nonfinite = 10
    c.log_every = 1 if small else 20 if cpu else 100
    c.eval_every = 3 if small else 300 if cpu else 2000
    c.ckpt_every = 3 if small else 300 if cpu else 2000
    c.keep_ckpts = 2
    c.best_metric = ""
    c.best_mode = "max"
    c.num_workers = 0
    c.progress = True
    c.evals = {"synth_val": dict(seed=10_001, num_identities=16 if small else 60,
                                 images_per_identity=4 if small else 7, size=size,
                                 num_images=64 if small else 420)}
    return c
