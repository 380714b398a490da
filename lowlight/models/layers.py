"""Small building blocks shared by the identity backbones (iresnet.py, vit.py).

What lives here and why:
  * `PReLU` — per-channel PReLU as `torch.nn.PReLU(C)` (flax's `nn.PReLU` has one scalar slope).
  * `batch_norm` — BatchNorm with PyTorch's defaults (eps 1e-5, momentum 0.1, i.e. flax
    momentum 0.9). Under `jax.jit` with a batch sharded over devices the batch statistics are
    already global (the compiler inserts the cross-device reduction), so no `axis_name`/`pmean`.
    One difference to torch remains: flax keeps the *biased* batch variance in the running
    average, torch the unbiased one (factor n/(n-1)); it only changes training-time running
    statistics on small batches, never a forward pass given the same statistics.
  * `frozen_scale_batch_norm` — the insightface "features" BatchNorm1d whose weight is fixed at
    1.0 (`features.weight.requires_grad = False`): no scale parameter at all (so it is not in
    `params`, not trained, not weight-decayed) and behaves as scale 1; bias trainable.
  * `count_params` / `param_shapes` — parameter counting without allocating (jax.eval_shape).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# torch.nn.BatchNorm defaults: running = 0.9 * running + 0.1 * batch.
TORCH_BN_MOMENTUM = 0.9
TORCH_BN_EPS = 1e-5


class PReLU(nn.Module):
    """Per-channel PReLU over the last axis, slope initialised to 0.25 as in PyTorch."""

    init_slope: float = 0.25
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        slope = self.param(
            "negative_slope",
            nn.initializers.constant(self.init_slope),
            (x.shape[-1],),
            self.param_dtype,
        )
        return jnp.where(x >= 0, x, slope.astype(x.dtype) * x)


def batch_norm(
    *,
    train: bool,
    eps: float = TORCH_BN_EPS,
    dtype: Any = None,
    name: str | None = None,
    use_scale: bool = True,
) -> nn.BatchNorm:
    """`nn.BatchNorm` over the last axis with PyTorch defaults; running stats in `batch_stats`."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=TORCH_BN_MOMENTUM,
        epsilon=eps,
        dtype=dtype,
        use_scale=use_scale,
        name=name,
    )


def frozen_scale_batch_norm(
    *, train: bool, eps: float = TORCH_BN_EPS, dtype: Any = None, name: str | None = None
) -> nn.BatchNorm:
    """BatchNorm1d with its scale frozen at 1 (insightface iResNet `features`): bias only."""
    return batch_norm(train=train, eps=eps, dtype=dtype, name=name, use_scale=False)


def torch_linear_init(fan_in: int):
    """PyTorch's default nn.Linear init for weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def l2_norm(x: jax.Array) -> jax.Array:
    """L2 norm over the last axis, computed in float32, shape x.shape[:-1]."""
    return jnp.linalg.norm(x.astype(jnp.float32), axis=-1)


def count_params(variables_or_shapes: Any) -> int:
    """Number of scalars in a pytree of arrays or `jax.ShapeDtypeStruct`s.

    Pass `variables["params"]` for the trainable count (BatchNorm running statistics live in
    `batch_stats`, and the frozen BN1d scale of the iResNets exists nowhere).
    """
    leaves = jax.tree_util.tree_leaves(variables_or_shapes)
    return int(sum(int(np.prod(leaf.shape)) for leaf in leaves))


def param_shapes(model: nn.Module, image_size: int = 112, batch: int = 1, **call_kwargs: Any):
    """Abstract variables (`ShapeDtypeStruct`s) of an image model, nothing allocated."""
    x = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    return jax.eval_shape(lambda r, x: model.init(r, x, train=False, **call_kwargs), rngs, x)


# --------------------------------------------------------------------------------------------
# PyTorch state_dict -> flax variables
# --------------------------------------------------------------------------------------------
def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch.Tensor; torch itself is never imported here
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def _set(tree: dict, path: list[str], value: np.ndarray) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    if path[-1] in tree:
        raise ValueError(f"duplicate target {'/'.join(path)}")
    tree[path[-1]] = value


def convert_torch_state(
    state_dict: Any,
    rename,
    *,
    frozen_unit_scales: tuple[str, ...] = (),
    slope_modules: tuple[str, ...] = ("prelu",),
) -> dict:
    """Converts a PyTorch `state_dict` to `{"params": ..., "batch_stats": ...}` numpy trees.

    Layout rules (torch -> flax): Conv2d weight (O,I,kh,kw) -> kernel (kh,kw,I,O); Linear weight
    (out,in) -> kernel (in,out); BatchNorm/LayerNorm weight -> scale; running_mean/var ->
    batch_stats mean/var; PReLU weight (modules named in `slope_modules`) -> negative_slope.
    Other parameters (e.g. ViT `pos_embed`) are copied as they are.

    Args:
      state_dict: name -> tensor or array (torch tensors are converted without importing torch).
      rename: maps the torch module path (list of dotted parts, leaf excluded) to the flax path.
      frozen_unit_scales: torch module paths ("features") whose weight is frozen at 1 and has no
        flax counterpart; a value other than 1 is refused rather than silently dropped.
      slope_modules: last path parts that denote PReLU modules.
    """
    params: dict = {}
    stats: dict = {}
    for key, value in state_dict.items():
        array = _to_numpy(value)
        *module, leaf = key.split(".")
        if leaf == "num_batches_tracked":
            continue
        if ".".join(module) in frozen_unit_scales and leaf == "weight":
            if not np.allclose(array, 1.0):
                raise ValueError(
                    f"{key} is frozen at 1 in this model but the checkpoint has other values"
                )
            continue
        path = list(rename(module)) if module else []
        if leaf == "running_mean":
            _set(stats, path + ["mean"], array)
        elif leaf == "running_var":
            _set(stats, path + ["var"], array)
        elif leaf == "bias":
            _set(params, path + ["bias"], array)
        elif leaf == "weight" and array.ndim == 4:
            _set(params, path + ["kernel"], array.transpose(2, 3, 1, 0))
        elif leaf == "weight" and array.ndim == 2:
            _set(params, path + ["kernel"], array.T)
        elif leaf == "weight" and module and module[-1] in slope_modules:
            _set(params, path + ["negative_slope"], array)
        elif leaf == "weight":
            _set(params, path + ["scale"], array)
        else:
            _set(params, path + [leaf], array)
    return {"params": params, "batch_stats": stats}
