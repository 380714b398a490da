r"""iResNet-100 + magface with Partial FC on the synthetic world (paper B §4.1.3).

Commands:
  python -m lowlight.main --config=configs/r100_magface.py --workdir=runs/r100_magface
  python -m lowlight.main --config=configs/r100_magface.py:depth=50 --workdir=runs/r50_magface
  python -m lowlight.main --config=configs/r100_magface.py:smoke --workdir=/tmp/smoke

Arguments: depth = 18 | 34 | 50 | 100 | 200; scale = auto | full | cpu | smoke; smoke.
At scale=cpu/smoke the backbone is iResNet-18 at quarter width, 64x64 / 32x32 (same blocks).
"""

from lowlight import recipes


def get_config(arg=None):
    return recipes.resnet(arg, loss="magface")
