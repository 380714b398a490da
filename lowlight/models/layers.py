"""Small building blocks shared by the backbones (iresnet.py, mobilenetv2.py, vit.py, ...).

What lives here and why:
  * `PReLU` — per-channel PReLU as `torch.nn.PReLU(C)` (flax's `nn.PReLU` has one scalar slope).
    `PReLU.negative_slope(C)` hands its parameter to a fused BatchNorm + PReLU (below) without
    moving it.
  * `batch_norm` — BatchNorm with PyTorch's defaults (eps 1e-5, momentum 0.1, i.e. flax
    momentum 0.9). Under `jax.jit` with a batch sharded over devices the batch statistics are
    already global (the compiler inserts the cross-device reduction), so no `axis_name`/`pmean`.
    One difference to torch remains: flax keeps the *biased* batch variance in the running
    average, torch the unbiased one (factor n/(n-1)); it only changes training-time running
    statistics on small batches, never a forward pass given the same statistics.
  * `frozen_scale_batch_norm` — the insightface "features" BatchNorm1d whose weight is fixed at
    1.0 (`features.weight.requires_grad = False`): no scale parameter at all (so it is not in
    `params`, not trained, not weight-decayed) and behaves as scale 1; bias trainable.
  * `batch_norm_act` / `BatchNormAct` / `bn_act` — BatchNorm followed by PReLU, ReLU6, ReLU or
    nothing, with a hand-written `jax.custom_vjp` for train mode. Why: on XLA:CPU, after
    `fast_conv`, XLA's per-op profile charged ~54% of the iResNet-50 train step to memory-bound
    passes that `nn.BatchNorm` + activation and their automatic derivative make as separate
    elementwise and reduction ops. A later whole-step ablation (`tools/_bench_ablate.py`,
    docs/performance.md) found the fused backward costs only 5-8% of the step. The closed-form
    backward
        g = dy * act'(h),  dbias = sum(g),  dscale = sum(g * x̂),
        dx = scale * rstd * (g - dbias / n - x̂ * dscale / n)
    (plus the cotangents of the returned batch statistics) saves only x and per-channel vectors
    and recomputes x̂ and h from x. Ideally one reduction pass and one elementwise pass; XLA:CPU
    (jax 0.10) runs each reduction as its own YNNPACK op over a materialised operand, so x̂ and
    g are written once and read by the sums and by dx: per BN + PReLU 9 activation-sized ops
    (4 writes, 5 reductions) against autodiff's 12, per BN + ReLU6 7 against 9, forward
    included (`tools/_bench_bn.py` times both). The numbers are flax's to float32 rounding:
    the same forward ops (statistics in float32 with `use_fast_variance`, i.e. E[x²] - E[x]²
    clipped at 0; biased variance in the running average; the output in `dtype`), the same
    derivative conventions (jnp.clip's 1/2 at the bounds, PReLU's positive side at 0, flax's
    clip of the variance), and the same variables as `batch_norm` under the same module name,
    the PReLU slope staying in its own `PReLU` module — checkpoints and the torch converters
    are unchanged (tests/test_fused_bn.py). Eval mode and symbolic shapes use plain ops.
    Selected per model by `bn_impl` (default: follow `conv_impl`; "auto" is the fused form on
    the CPU backend and flax's elsewhere, where it was not measured).
  * `count_params` / `param_shapes` — parameter counting without allocating (jax.eval_shape).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowlight.models import cpu_kernels, fast_conv

# torch.nn.BatchNorm defaults: running = 0.9 * running + 0.1 * batch.
TORCH_BN_MOMENTUM = 0.9
TORCH_BN_EPS = 1e-5


class PReLU(nn.Module):
    """Per-channel PReLU over the last axis, slope initialised to 0.25 as in PyTorch.

    `negative_slope(channels)` returns the slope parameter alone (declaring it if needed), so a
    parent can hand it to the fused `batch_norm_act` while it stays at `<parent>/prelu/
    negative_slope` — the same variable whether the activation runs here or fused into the BN.
    """

    init_slope: float = 0.25
    param_dtype: Any = jnp.float32

    @nn.compact
    def negative_slope(self, channels: int) -> jax.Array:
        return self.param(
            "negative_slope",
            nn.initializers.constant(self.init_slope),
            (channels,),
            self.param_dtype,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        slope = self.negative_slope(x.shape[-1])
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


# --------------------------------------------------------------------------------------------
# BatchNorm + activation with a hand-written VJP (train mode on XLA:CPU)
# --------------------------------------------------------------------------------------------
#: Activations `batch_norm_act` / `BatchNormAct` apply after the normalisation.
BN_ACTIVATIONS: tuple[str, ...] = ("none", "prelu", "relu", "relu6")


def resolve_bn_impl(impl: str) -> str:
    """`bn_impl` -> "xla" (`nn.BatchNorm` + activation, differentiated by JAX) or "fast"
    (`BatchNormAct`, fused VJP); "auto" is "fast" on the CPU backend (`fast_conv.resolve_impl`)."""
    if impl not in fast_conv.CONV_IMPLS:
        raise ValueError(f"bn_impl {impl!r}; valid: {', '.join(fast_conv.CONV_IMPLS)}")
    return fast_conv.resolve_impl(impl)


def _activate(h: jax.Array, activation: str, slope: jax.Array | None) -> jax.Array:
    """The activations as the models write them (so autodiff gives the same derivatives)."""
    if activation == "prelu":
        return jnp.where(h >= 0, h, slope.astype(h.dtype) * h)
    if activation == "relu6":
        return jnp.clip(h, 0.0, 6.0)
    if activation == "relu":
        return nn.relu(h)
    return h


def _channels(v: jax.Array, ndim: int) -> jax.Array:
    """A per-channel vector broadcast against a (..., C) array of rank `ndim`."""
    return v.reshape((1,) * (ndim - 1) + (v.shape[-1],))


def _moments(x: jax.Array, stats_dtype: Any) -> tuple[jax.Array, jax.Array]:
    """flax's `_compute_stats` (use_fast_variance): mean and E[x²] - mean², not yet clipped at 0,
    over every axis but the last, in `stats_dtype`; both sums come from one pass over x."""
    axes = tuple(range(x.ndim - 1))
    x = x.astype(stats_dtype)
    mean = jnp.mean(x, axes)
    return mean, jnp.mean(lax.square(x), axes) - lax.square(mean)


def _normalize(x, mean, var, scale, bias, eps: float, dtype: Any) -> jax.Array:
    """flax's `_normalize`, the same ops in the same order: (x - mean) * (rsqrt(var + eps) *
    scale) + bias, in the promoted dtype (float32 for bf16 x), then cast to `dtype`."""
    y = x - _channels(mean, x.ndim)
    mul = lax.rsqrt(_channels(var, x.ndim) + eps)
    if scale is not None:
        mul = mul * _channels(scale, x.ndim)
    y = y * mul
    y = y + _channels(bias, x.ndim)
    return y.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _bn_act(x, scale, bias, slope, activation, eps, dtype, stats_dtype):
    return _bn_act_fwd(x, scale, bias, slope, activation, eps, dtype, stats_dtype)[0]


def _bn_act_fwd(x, scale, bias, slope, activation, eps, dtype, stats_dtype):
    mean, var_raw = _moments(x, stats_dtype)
    var = jnp.maximum(0.0, var_raw)  # flax clips round-off negatives
    y = _activate(_normalize(x, mean, var, scale, bias, eps, dtype), activation, slope)
    # Only x and per-channel vectors are kept: the backward recomputes x̂ and the
    # pre-activation from x in the loops that read it anyway.
    return (y, mean, var), (x, mean, var_raw, scale, bias, slope)


def _bn_act_bwd(activation, eps, dtype, stats_dtype, res, cts):
    x, mean, var_raw, scale, bias, slope = res
    dy, dmean, dvar = cts
    if (fast_conv._one_cpu_device()
            and cpu_kernels.bn_act_supported(x.dtype, jnp.dtype(dtype), jnp.dtype(stats_dtype),
                                             activation)):
        # the same closed form in two passes over (x, dy) (kernels/bn_act_bwd.cc); one device:
        # with a sharded batch the sums below are global across devices, the kernel's not
        dx, dscale, dbias, dslope = cpu_kernels.bn_act_bwd(
            x, dy, mean, var_raw, scale, bias, slope, dmean, dvar, activation=activation,
            eps=eps)
        return (dx.astype(x.dtype), None if scale is None else dscale.astype(scale.dtype),
                dbias.astype(bias.dtype),
                dslope.astype(slope.dtype) if activation == "prelu" else None)
    return _bn_act_bwd_jnp(activation, eps, dtype, stats_dtype, x, mean, var_raw, scale, bias,
                           slope, dy, dmean, dvar)


def _bn_act_bwd_jnp(activation, eps, dtype, stats_dtype, x, mean, var_raw, scale, bias, slope,
                    dy, dmean, dvar):
    axes = tuple(range(x.ndim - 1))
    n = math.prod(x.shape[:-1])
    var = jnp.maximum(0.0, var_raw)
    rstd = lax.rsqrt(var + eps)
    h = _normalize(x, mean, var, scale, bias, eps, dtype)  # the forward's pre-activation
    xhat = (x.astype(stats_dtype) - _channels(mean, x.ndim)) * _channels(rstd, x.ndim)
    # the activation's derivative, in `dtype` as autodiff of `_activate` computes it (jnp.clip
    # and jnp.maximum give 1/2 where the input equals the bound; jax.nn.relu gives 0 at 0)
    dslope = None
    if activation == "prelu":
        neg = h < 0
        g = jnp.where(neg, slope.astype(dtype) * dy, dy)
        dslope = jnp.sum(jnp.where(neg, dy * h, 0).astype(stats_dtype), axes).astype(slope.dtype)
    elif activation == "relu6":  # (a factor, not where(.., 0.5 * dy, ..): XLA would write 0.5*dy)
        g = dy * jnp.where((h > 0) & (h < 6), 1.0, jnp.where((h == 0) | (h == 6), 0.5, 0.0)
                           ).astype(dtype)
    elif activation == "relu":
        g = jnp.where(h > 0, dy, 0)
    else:
        g = dy
    g = g.astype(stats_dtype)
    dbias = jnp.sum(g, axes)  # one pass over (x, dy) for all three sums
    dscale = jnp.sum(g * xhat, axes)
    # closed form of autodiff through flax's statistics: with s = scale * rstd,
    #   dx = s*(g - dbias/n - x̂*k*dscale/n) + dmean/n + k*dvar*2*(x - mean)/n,
    # k = d max(0, var_raw) / d var_raw (1 above 0, 1/2 at 0, 0 below: flax's clip), and
    # dmean, dvar the cotangents of the returned statistics (zero unless something
    # differentiates the running averages). One elementwise pass with per-channel a, b, c:
    s = rstd if scale is None else rstd * scale
    k = jnp.where(var_raw > 0, 1.0, jnp.where(var_raw == 0, 0.5, 0.0))
    b = k * (2.0 * dvar / rstd - s * dscale) / n
    c = (dmean - s * dbias) / n
    dx = _channels(s, x.ndim) * g + xhat * _channels(b, x.ndim) + _channels(c, x.ndim)
    return (dx.astype(x.dtype), None if scale is None else dscale.astype(scale.dtype),
            dbias.astype(bias.dtype), dslope)


_bn_act.defvjp(_bn_act_fwd, _bn_act_bwd)


def bn_act(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array,
    negative_slope: jax.Array | None = None,
    *,
    activation: str = "none",
    eps: float = TORCH_BN_EPS,
    dtype: Any = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Train-mode BatchNorm over every axis but the last, then `activation`, with a fused VJP.

    Returns `(y, mean, var)`: the output and the batch statistics (float32, biased variance) to
    fold into the running averages. The same numbers as `nn.BatchNorm(dtype=dtype)` followed by
    the activation (float32 rounding); the backward is the closed form — one pass over (x, dy)
    for d bias, d scale and d slope, one elementwise pass for dx — instead of the separate
    passes automatic differentiation of flax's ops makes. `scale=None` is BatchNorm without a
    scale; `negative_slope` (C,) is required for "prelu" and ignored otherwise. Plain jnp inside,
    so under `jax.jit` with a sharded batch the sums are global like flax's.
    """
    if activation not in BN_ACTIVATIONS:
        raise ValueError(f"activation {activation!r}; valid: {', '.join(BN_ACTIVATIONS)}")
    if activation == "prelu" and negative_slope is None:
        raise ValueError("activation 'prelu' needs negative_slope")
    if activation != "prelu":
        negative_slope = None
    stats_dtype = jnp.promote_types(dtype if dtype is not None else jnp.result_type(x),
                                    jnp.float32)
    out_dtype = nn.dtypes.canonicalize_dtype(*(a for a in (x, scale, bias) if a is not None),
                                             dtype=dtype)
    return _bn_act(x, scale, bias, negative_slope, activation, float(eps), out_dtype, stats_dtype)


def bn_variables(module: nn.Module, channels: int, use_scale: bool, param_dtype: Any):
    """A BatchNorm's variables, created in `module` (inside its compact method) with
    `nn.BatchNorm`'s names and initialisers: (running mean, running var) as flax variables in
    `batch_stats`, then the params `scale` (None unless `use_scale`) and `bias`."""
    shape = (channels,)
    ra_mean = module.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), shape)
    ra_var = module.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), shape)
    scale = (module.param("scale", nn.initializers.ones, shape, param_dtype) if use_scale
             else None)
    bias = module.param("bias", nn.initializers.zeros, shape, param_dtype)
    return ra_mean, ra_var, scale, bias


class BatchNormAct(nn.Module):
    """`nn.BatchNorm` (last axis) + activation with the fused VJP of `bn_act` in train mode.

    A drop-in for `batch_norm(...)` followed by the activation: the same variables (params
    `scale` (unless `use_scale=False`) and `bias`, `batch_stats` `mean` and `var`, float32),
    initialisers, running-average update (`momentum` * running + (1 - `momentum`) * batch,
    biased variance, not during `init`), epsilon and dtype handling (statistics in float32,
    output in `dtype`). The PReLU slope is not a variable of this module: the caller passes it
    (`PReLU.negative_slope`), so it stays where the un-fused model keeps it. With
    `use_running_average` (eval) or `fused=False` (symbolic shapes) it runs as plain ops.
    """

    use_running_average: bool
    activation: str = "none"
    momentum: float = TORCH_BN_MOMENTUM
    epsilon: float = TORCH_BN_EPS
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_scale: bool = True
    fused: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, negative_slope: jax.Array | None = None) -> jax.Array:
        if self.activation not in BN_ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r}; valid: {', '.join(BN_ACTIVATIONS)}")
        if (self.activation == "prelu") != (negative_slope is not None):
            raise ValueError("negative_slope is required with activation 'prelu' and only then")
        ra_mean, ra_var, scale, bias = bn_variables(self, x.shape[-1], self.use_scale,
                                                    self.param_dtype)
        if self.use_running_average:
            dtype = nn.dtypes.canonicalize_dtype(
                *(a for a in (x, scale, bias) if a is not None), dtype=self.dtype)
            h = _normalize(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon, dtype)
            return _activate(h, self.activation, negative_slope)
        if self.fused:
            y, mean, var = bn_act(x, scale, bias, negative_slope, activation=self.activation,
                                  eps=self.epsilon, dtype=self.dtype)
        else:
            stats_dtype = jnp.promote_types(
                self.dtype if self.dtype is not None else jnp.result_type(x), jnp.float32)
            dtype = nn.dtypes.canonicalize_dtype(
                *(a for a in (x, scale, bias) if a is not None), dtype=self.dtype)
            mean, var = _moments(x, stats_dtype)
            var = jnp.maximum(0.0, var)
            y = _activate(_normalize(x, mean, var, scale, bias, self.epsilon, dtype),
                          self.activation, negative_slope)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y


def batch_norm_act(
    x: jax.Array,
    *,
    train: bool,
    activation: str,
    impl: str = "auto",
    eps: float = TORCH_BN_EPS,
    dtype: Any = None,
    name: str,
    use_scale: bool = True,
    prelu_name: str = "prelu",
) -> jax.Array:
    """`batch_norm(name=name)` then `activation`, called inside a parent's compact method.

    `impl` (a model's `bn_impl`): "xla" is `nn.BatchNorm` + the activation as before, "fast"
    `BatchNormAct` (fused VJP; plain ops in eval mode and for symbolic shapes), "auto" "fast"
    on the CPU backend (`resolve_bn_impl`). Both create the same variables: the BN's under
    `name`, a PReLU's slope under `prelu_name` (`PReLU`'s own path).
    """
    if activation not in BN_ACTIVATIONS:
        raise ValueError(f"activation {activation!r}; valid: {', '.join(BN_ACTIVATIONS)}")
    if resolve_bn_impl(impl) == "xla":
        y = batch_norm(train=train, eps=eps, dtype=dtype, name=name, use_scale=use_scale)(x)
        if activation == "prelu":
            return PReLU(name=prelu_name)(y)
        return _activate(y, activation, None)
    slope = (PReLU(name=prelu_name).negative_slope(x.shape[-1]) if activation == "prelu"
             else None)
    return BatchNormAct(use_running_average=not train, activation=activation, epsilon=eps,
                        dtype=dtype, use_scale=use_scale, fused=fast_conv._static(x.shape),
                        name=name)(x, slope)


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
