"""Real photos that installed PyPI packages ship, for detector parity tests, benchmarks and demos.

scikit-image's `astronaut` (Eileen Collins, public domain) and matplotlib's `grace_hopper.jpg`
come inside those packages, so nothing is downloaded and no third-party image is committed to
this repository. `dim` is the brightness reduction the detection-vs-brightness table uses.
"""

from __future__ import annotations

import numpy as np


def sample_photos() -> dict[str, np.ndarray]:
    """{"astronaut": (512,512,3), "grace_hopper": (600,512,3)} uint8 RGB."""
    import matplotlib.cbook
    import skimage.data
    from PIL import Image

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = np.asarray(Image.open(f).convert("RGB"))
    return {"astronaut": skimage.data.astronaut(), "grace_hopper": hopper}


def dim(image: np.ndarray, brightness: float) -> np.ndarray:
    """`image` scaled by `brightness` (0.1 = 10% of the light), rounded to uint8."""
    return np.clip(np.rint(np.asarray(image, np.float64) * brightness), 0, 255).astype(np.uint8)
