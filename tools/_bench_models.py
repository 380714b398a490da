"""The models `tools/bench.py` times, each as a lowlight (JAX) / PyTorch pair.

A `Pair` holds, for one model, everything needed to time it on both sides with the *same*
work: a train step (forward + backward + optimizer update, BatchNorm in training mode) on a
fixed batch, and an inference function (eval mode). Losses and optimizers are the ones the
model is trained with in lowlight (SGD + momentum + weight decay for the iResNets, AdamW for the
ViT, Adam for the others), written identically on both sides; the data are fixed random tensors
(timing does not depend on the values). Models with dropout / stochastic depth / token masking
draw them on both sides. The PyTorch twin runs eagerly (what a PyTorch user runs), with
`channels_last` memory format for the CNNs, which was faster than NCHW for every CNN here.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowlight import models
from lowlight.models.face_embedder import FaceEmbedder

#: Benchmark names -> what they are.
MODELS: dict[str, str] = {
    "iresnet50": "insightface iResNet-50, 112x112, 43.6M params",
    "iresnet100": "insightface iResNet-100, 112x112, 65.2M params",
    "vit_s": "arcface_torch ViT-S (width 512, depth 12), 112x112, 76.0M params",
    "mobilenetv2_se": "paper A MobileNetV2 + SE + 3 heads, 112x112, 2.76M params",
    "unet": "paper B U-Net skin segmenter (64..512), 112x112, 7.7M params",
    "relight": "paper B relighting net (width 208), 112x112, 1.19M params",
    "pipeline": "paper B Fig. 3: relight -> U-Net mask -> iResNet-50 (mask after stage 1)",
}


@dataclasses.dataclass
class Side:
    """One framework's version of a model: callables taking/returning its own arrays."""

    params: int
    train_step: Callable[[], Any] | None  # runs one step on the fixed batch, blocks
    infer: Callable[[int], Callable[[], Any]]  # batch size -> zero-arg blocking call
    train_flops: float | None = None  # per step
    infer_flops: Callable[[int], float] | None = None  # batch size -> per call
    compile_s: float = 0.0
    profile: Callable[[], str] | None = None  # per-op breakdown of the train step (lowlight)


# --------------------------------------------------------------------------------------------
# lowlight side
# --------------------------------------------------------------------------------------------
def _jax_images(n: int, size: int = 112, seed: int = 0) -> jax.Array:
    x = np.random.default_rng(seed).uniform(-1, 1, size=(n, size, size, 3)).astype(np.float32)
    return jnp.asarray(x)


def _cost_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", 0.0))


def _jax_loss(name: str, out: Any, target: Any) -> jax.Array:
    if name in ("iresnet50", "iresnet100", "vit_s"):
        emb, _ = out
        return jnp.mean(jnp.square(emb - target))
    if name == "mobilenetv2_se":
        o, _ = out
        age = jnp.mean(jnp.square(o["age"] - target["age"]))
        gender = jnp.mean(optax.sigmoid_binary_cross_entropy(o["gender_logit"],
                                                             target["gender"]))
        eth = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(o["ethnicity_logits"],
                                                                       target["ethnicity"]))
        return 0.1 * age + gender + eth  # paper A loss weights
    if name == "unet":
        _, aux = out
        return jnp.mean(optax.sigmoid_binary_cross_entropy(aux["logits"], target))
    if name == "relight":
        relit, _ = out
        return jnp.mean(jnp.abs(relit - target))
    raise ValueError(name)


def _jax_target(name: str, n: int):
    rng = np.random.default_rng(1)
    if name in ("iresnet50", "iresnet100", "vit_s"):
        return jnp.asarray(rng.standard_normal((n, 512)).astype(np.float32))
    if name == "mobilenetv2_se":
        return {"age": jnp.asarray(rng.uniform(0, 8, n).astype(np.float32)),
                "gender": jnp.asarray(rng.integers(0, 2, n).astype(np.float32)),
                "ethnicity": jnp.asarray(rng.integers(0, 5, n))}
    if name == "unet":
        return jnp.asarray((rng.uniform(size=(n, 112, 112)) > 0.5).astype(np.float32))
    if name == "relight":
        return jnp.asarray(rng.uniform(-1, 1, (n, 112, 112, 3)).astype(np.float32))
    raise ValueError(name)


def _jax_module(name: str, conv_impl: str | None, bn_impl: str | None = None):
    kw = {} if conv_impl is None else {"conv_impl": conv_impl}
    if bn_impl and name in ("iresnet50", "iresnet100", "mobilenetv2_se"):
        kw["bn_impl"] = bn_impl  # (default: follows conv_impl; lowlight.models.layers)
    if name == "mobilenetv2_se":
        return models.create("mobilenetv2", attention="se", **kw)
    if name in ("iresnet50", "iresnet100", "unet", "relight"):
        return models.create(name, **kw)
    return models.create(name)


def _jax_tx(name: str):
    if name in ("iresnet50", "iresnet100"):
        return optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
    if name == "vit_s":
        return optax.adamw(1e-3, weight_decay=0.1)
    return optax.adam(1e-3)


def lowlight_side(name: str, *, train_batch: int, conv_impl: str | None, timer,
                  bn_impl: str | None = None) -> Side:
    """The lowlight model `name` with a jitted, donating train step and jitted inference."""
    if name == "pipeline":
        return _lowlight_pipeline(conv_impl, timer)
    module = _jax_module(name, conv_impl, bn_impl)
    x = _jax_images(train_batch)
    variables = module.init({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                            x[:1], train=False)
    params, stats = variables["params"], variables.get("batch_stats", {})
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    tx = _jax_tx(name)
    target = _jax_target(name, train_batch)

    def step(state, x, target, key):
        params, stats, opt_state = state

        def loss_fn(p):
            out, upd = module.apply({"params": p, "batch_stats": stats}, x, train=True,
                                    rngs={"dropout": key}, mutable=["batch_stats"])
            return _jax_loss(name, out, target), upd.get("batch_stats", stats)

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), new_stats, opt_state), loss

    state = [(params, stats, tx.init(params))]
    key = jax.random.key(2)
    jstep = jax.jit(step, donate_argnums=0)
    with timer() as t:
        compiled = jstep.lower(state[0], x, target, key).compile()
    train_flops = _cost_flops(compiled)

    def train_call():
        state[0], loss = compiled(state[0], x, target, key)
        jax.block_until_ready((state[0], loss))

    # A copy: the train step donates (invalidates) the arrays it was given.
    infer_vars = jax.tree.map(jnp.copy, {"params": params, "batch_stats": stats})
    apply = jax.jit(lambda v, x: module.apply(v, x, train=False)[0])
    cache: dict[int, Any] = {}

    def compiled_infer(n):
        if n not in cache:
            xb = _jax_images(n)
            cache[n] = (apply.lower(infer_vars, xb).compile(), xb)
        return cache[n]

    def infer(n):
        c, xb = compiled_infer(n)
        return lambda: jax.block_until_ready(c(infer_vars, xb))

    def profile():
        import _bench_profile as P

        # A non-donating jit of the same step: the profiler calls it repeatedly on one state.
        b = P.breakdown(jax.jit(step), state[0], x, target, key, runs=2)
        return P.format_breakdown(f"{name} train step, batch {train_batch}", b)

    return Side(n_params, train_call, infer, train_flops,
                lambda n: _cost_flops(compiled_infer(n)[0]), t.seconds, profile)


def _pipeline_embedder(conv_impl: str | None) -> FaceEmbedder:
    kw = {} if conv_impl is None else {"conv_impl": conv_impl}
    return FaceEmbedder(models.create("iresnet50", mask_stage=1, **kw),
                        models.create("relight", **kw), models.create("unet", **kw),
                        mask_source="segmenter")


def _lowlight_pipeline(conv_impl, timer) -> Side:
    fe = _pipeline_embedder(conv_impl)
    params, stats = fe.init(jax.random.key(0), _jax_images(1))
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    apply = jax.jit(lambda p, s, x: fe.apply(p, s, x, train=False)[0])
    cache: dict[int, Any] = {}

    def compiled_infer(n):
        if n not in cache:
            xb = _jax_images(n)
            cache[n] = (apply.lower(params, stats, xb).compile(), xb)
        return cache[n]

    def infer(n):
        c, xb = compiled_infer(n)
        return lambda: jax.block_until_ready(c(params, stats, xb))

    return Side(n_params, None, infer, None, lambda n: _cost_flops(compiled_infer(n)[0]))


# --------------------------------------------------------------------------------------------
# PyTorch side
# --------------------------------------------------------------------------------------------
def torch_side(name: str, *, train_batch: int, frozen_convs: bool = False) -> Side:
    """The PyTorch twin of `name`. `frozen_convs` turns off the convolution kernels' gradients
    (autograd then skips computing them): `tools/_bench_ablate.py` uses it to measure what
    those gradients cost PyTorch."""
    import _bench_torch as T
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    builders = {
        "iresnet50": lambda: T.IResNet((3, 4, 14, 3)),
        "iresnet100": lambda: T.IResNet((3, 13, 30, 3)),
        "vit_s": lambda: T.ViT(width=512, depth=12, heads=8),
        "mobilenetv2_se": T.MobileNetV2Attr,
        "unet": T.UNet,
        "relight": T.RelightNet,
        "pipeline": lambda: T.Pipeline((3, 4, 14, 3)),
    }
    model = builders[name]()
    if frozen_convs:
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
                m.weight.requires_grad_(False)
    channels_last = name != "vit_s"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    n_params = T.trainable_params(model)

    def images(n, seed=0):
        g = torch.Generator().manual_seed(seed)
        return (torch.rand(n, 3, 112, 112, generator=g) * 2 - 1).contiguous(memory_format=fmt)

    x = images(train_batch)
    g = torch.Generator().manual_seed(1)
    if name in ("iresnet50", "iresnet100", "vit_s"):
        target = torch.randn(train_batch, 512, generator=g)
        loss_fn = lambda out: F.mse_loss(out, target)  # noqa: E731
    elif name == "mobilenetv2_se":
        age = torch.rand(train_batch, generator=g) * 8
        gender = torch.randint(0, 2, (train_batch,), generator=g).float()
        eth = torch.randint(0, 5, (train_batch,), generator=g)

        def loss_fn(out):
            a, gl, el = out
            return (0.1 * F.mse_loss(a, age) + F.binary_cross_entropy_with_logits(gl, gender)
                    + F.cross_entropy(el, eth))
    elif name == "unet":
        mask = (torch.rand(train_batch, 112, 112, generator=g) > 0.5).float()
        loss_fn = lambda out: F.binary_cross_entropy_with_logits(out[1], mask)  # noqa: E731
    elif name == "relight":
        tgt = (torch.rand(train_batch, 3, 112, 112, generator=g) * 2 - 1)
        tgt = tgt.contiguous(memory_format=fmt)
        loss_fn = lambda out: (out - tgt).abs().mean()  # noqa: E731
    else:
        loss_fn = None

    train_call = train_flops = None
    if loss_fn is not None:
        if name in ("iresnet50", "iresnet100"):
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        elif name == "vit_s":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        else:
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def train_call():
            model.train()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x))
            loss.backward()
            opt.step()

        with FlopCounterMode(display=False) as counter:
            train_call()
        train_flops = float(counter.get_total_flops())

    inputs: dict[int, Any] = {}

    def infer(n):
        if n not in inputs:
            inputs[n] = images(n)
        xb = inputs[n]

        def call():
            model.eval()
            with torch.inference_mode():
                return model(xb)

        return call

    def infer_flops(n):
        with FlopCounterMode(display=False) as counter:
            infer(n)()
        return float(counter.get_total_flops())

    return Side(n_params, train_call, infer, train_flops, infer_flops)


@functools.cache
def describe(name: str) -> str:
    return MODELS[name]
