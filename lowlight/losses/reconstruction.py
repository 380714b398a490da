"""Image reconstruction losses for the relighting network (paper B §3.4: "a combination of L1
reconstruction and structural similarity (SSIM) losses").

* `ssim` — single-scale SSIM (Wang et al. 2004) with a Gaussian window, via `dm_pix.ssim`. The
  window slides over the *valid* region only (no padding), the SSIM map is averaged over that
  region and over channels. That is exactly scikit-image's `structural_similarity(...,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=max_val,
  channel_axis=-1)`: skimage filters with reflected borders but then discards a border of
  (win_size - 1) // 2 = 5 pixels before averaging, i.e. keeps the same valid region (its window
  for sigma 1.5 and truncate 3.5 is 11 taps, like ours). Tested to agree to ~1e-6. The one
  difference: dm-pix clamps variances at float32 eps² and |covariance| at sqrt(var_a·var_b),
  which only matters for rounding noise in flat patches.
* `l1_ssim_loss` — `alpha·(1 − SSIM) + (1 − alpha)·L1`. Paper B gives no weighting; we take
  alpha = 0.84 from Zhao, Gallo, Frosio & Kautz, "Loss Functions for Image Restoration with
  Neural Networks" (IEEE TCI 2017), the standard L1 + SSIM mix for restoration (they pair it with
  MS-SSIM; paper B names plain SSIM, so we use single-scale SSIM). Both terms are 0 for a
  perfect prediction and of order 0.01–0.5 for typical errors on [0, 1] images, so the mix keeps
  SSIM's sensitivity to structure and local contrast while L1 anchors absolute brightness and
  colour, which SSIM (insensitive to a small uniform shift in bright regions) under-constrains.

Inputs are float images in [0, 1] (convert model outputs with `(x + 1) / 2`), (H, W, C) or
(N, H, W, C), at least `filter_size` pixels on each side.
"""

from __future__ import annotations

import dm_pix
import jax
import jax.numpy as jnp

#: Weight of (1 - SSIM) in `l1_ssim_loss` (Zhao et al. 2017); L1 gets 1 - ALPHA.
ALPHA = 0.84


def _check_pair(a: jax.Array, b: jax.Array, filter_size: int) -> tuple[jax.Array, jax.Array]:
    a = jnp.asarray(a)
    b = jnp.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"expected images of equal shape, got {a.shape} and {b.shape}")
    if a.ndim not in (3, 4):
        raise ValueError(f"expected (H, W, C) or (N, H, W, C) images, got shape {a.shape}")
    if min(a.shape[-3:-1]) < filter_size:
        raise ValueError(f"images of size {a.shape[-3:-1]} are smaller than the SSIM window "
                         f"({filter_size})")
    dtype = jnp.promote_types(jnp.result_type(a, b), jnp.float32)
    return a.astype(dtype), b.astype(dtype)


def ssim(a: jax.Array, b: jax.Array, *, max_val: float = 1.0, filter_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> jax.Array:
    """Mean SSIM of each image pair (valid-region Gaussian-window SSIM, averaged over channels).

    Args:
      a, b: images of equal shape, (H, W, C) or (N, H, W, C), values in [0, max_val].
      max_val: dynamic range (1.0 for [0, 1] images, 255.0 for uint8 values).
      filter_size: Gaussian window side in pixels.
      sigma: Gaussian window std in pixels.
      k1, k2: SSIM stabilisers; c1 = (k1·max_val)², c2 = (k2·max_val)².

    Returns:
      () for one image, (N,) for a batch; 1.0 for identical images.
    """
    a, b = _check_pair(a, b, filter_size)
    return dm_pix.ssim(a, b, max_val=max_val, filter_size=filter_size, filter_sigma=sigma,
                       k1=k1, k2=k2)


def l1_ssim_terms(pred: jax.Array, target: jax.Array, *, alpha: float = ALPHA,
                  filter_size: int = 11, sigma: float = 1.5) -> dict[str, jax.Array]:
    """`l1_ssim_loss` and its two terms, for logging: {"loss", "l1", "ssim"} (scalars)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: expected a weight in [0, 1], got {alpha}")
    pred, target = _check_pair(pred, target, filter_size)
    l1 = jnp.mean(jnp.abs(pred - target))
    s = jnp.mean(ssim(pred, target, filter_size=filter_size, sigma=sigma))
    return {"loss": alpha * (1.0 - s) + (1.0 - alpha) * l1, "l1": l1, "ssim": s}


def l1_ssim_loss(pred: jax.Array, target: jax.Array, *, alpha: float = ALPHA,
                 filter_size: int = 11, sigma: float = 1.5) -> jax.Array:
    """Relighting loss of paper B §3.4: `alpha·(1 − SSIM) + (1 − alpha)·L1`, batch mean.

    Args:
      pred, target: float images in [0, 1], (H, W, C) or (N, H, W, C).
      alpha: weight of the SSIM term in [0, 1] (0.84, Zhao et al. 2017; see module docstring).
      filter_size, sigma: SSIM window.

    Returns:
      Scalar loss: 0 for identical images, > 0 otherwise. `l1_ssim_terms` also gives the terms.
    """
    return l1_ssim_terms(pred, target, alpha=alpha, filter_size=filter_size, sigma=sigma)["loss"]
