"""Fused BatchNorm + activation (`layers.BatchNormAct`, `layers.bn_act`): flax's numbers.

The reference is what the models ran before: `nn.BatchNorm` (`layers.batch_norm`) followed by
the activation as the models write it, differentiated by JAX. Compared: the variable tree, the
output, the updated running statistics and the gradients w.r.t. x, scale, bias and the PReLU
slope — and, through the updated statistics, the cotangents of the batch mean and variance
(nothing in the models differentiates those, but the VJP handles them). In float32 to rounding,
in float64 to 1e-12 (which would expose a wrong term that float32 tolerance might hide), under a
batch sharded over 4 devices, and for whole iResNet / MobileNetV2 train steps.
"""

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lowlight.models import layers as L

RTOL = 1e-5


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


class _BnAct(nn.Module):
    """A parent as the models are: BN `name="bn"` and its PReLU sibling `"prelu"`."""

    activation: str
    impl: str
    use_scale: bool = True
    dtype: object = None

    @nn.compact
    def __call__(self, x, train):
        return L.batch_norm_act(x, train=train, activation=self.activation, impl=self.impl,
                                use_scale=self.use_scale, dtype=self.dtype, name="bn")


def _variables(module, x, rng):
    """init, then every leaf moved off its initial value (slope, scale, bias, running stats)."""
    v = module.init(jax.random.key(0), x, False)
    return jax.tree.map(lambda a: a + jnp.asarray(rng.uniform(0.2, 0.6, a.shape), a.dtype), v)


def _step(module, variables, x, dy, train=True):
    """(y, new batch_stats, d params, d x) of <y, dy> + <new stats, fixed weights>."""
    c = jnp.linspace(-1.0, 1.0, x.shape[-1], dtype=jnp.float32)

    def loss(params, x):
        if train:
            y, upd = module.apply({**variables, "params": params}, x, True,
                                  mutable=["batch_stats"])
        else:
            y, upd = module.apply({**variables, "params": params}, x, False), {}
        stats = sum(jnp.sum(s * c * (i + 1)) for i, s in enumerate(jax.tree.leaves(upd)))
        return jnp.sum(y.astype(jnp.float32) * dy) + stats, (y, upd)

    (g_p, g_x), (y, upd) = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(
        variables["params"], x)
    return y, upd, g_p, g_x


def _data(shape, rng, dtype=jnp.float32):
    # offset and spread so that every activation region is populated (relu6: above 6 too)
    return jnp.asarray(rng.normal(size=shape) * 3.0 + 1.0, dtype)


CASES = [  # (activation, shape, use_scale)
    ("prelu", (4, 5, 6, 8), True),
    ("relu6", (4, 5, 6, 8), True),
    ("relu", (4, 5, 6, 8), True),
    ("none", (4, 5, 6, 8), True),
    ("prelu", (16, 8), True),  # BatchNorm1d-like (N, C)
    ("relu6", (16, 8), True),
    ("none", (16, 8), False),  # the iResNet "features" BN kind: no scale
    ("prelu", (3, 4, 4, 8), False),
]


@pytest.mark.parametrize("one_device", [False, True])
@pytest.mark.parametrize("activation,shape,use_scale", CASES)
def test_matches_flax_batch_norm_and_activation(activation, shape, use_scale, one_device,
                                                monkeypatch):
    """On several devices (conftest fakes 8) the backward is the closed form in JAX ops, on one
    CPU device the compiled kernel (cpu_kernels.bn_act_bwd)."""
    from lowlight.models import fast_conv

    if one_device:
        monkeypatch.setattr(fast_conv, "_multi_device", lambda: False)
    rng = np.random.default_rng(0)
    x = _data(shape, rng)
    ref = _BnAct(activation, "xla", use_scale)
    fused = _BnAct(activation, "fast", use_scale)
    v = ref.init(jax.random.key(0), x, False)
    v_fused = fused.init(jax.random.key(0), x, False)
    # identical variable tree (names, shapes, dtypes, initial values)
    assert jax.tree.structure(v) == jax.tree.structure(v_fused)
    for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(v_fused)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert ("negative_slope" in v["params"].get("prelu", {})) == (activation == "prelu")
    assert ("scale" in v["params"]["bn"]) == use_scale
    # the fused VJP is what runs in train mode
    jaxpr = str(jax.make_jaxpr(lambda x: fused.apply(v, x, True, mutable=["batch_stats"]))(x))
    assert "name=_bn_act" in jaxpr
    grad_jaxpr = str(jax.make_jaxpr(jax.grad(
        lambda x: jnp.sum(fused.apply(v, x, True, mutable=["batch_stats"])[0])))(x))
    assert ("lowlight_bn_act_bwd" in grad_jaxpr) == one_device

    v = _variables(ref, x, rng)
    dy = jnp.asarray(rng.normal(size=shape), jnp.float32)
    for train in (False, True):
        want = _step(ref, v, x, dy, train)
        got = _step(fused, v, x, dy, train)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert _rel(a, b) < RTOL, (train, a, b)
    # train mode moved the running statistics by 0.1 of the (biased) batch statistics
    upd = got[1]["batch_stats"]["bn"]
    xs = np.asarray(x, np.float64).reshape(-1, shape[-1])
    np.testing.assert_allclose(upd["mean"], 0.9 * np.asarray(v["batch_stats"]["bn"]["mean"])
                               + 0.1 * xs.mean(0), rtol=1e-5)
    np.testing.assert_allclose(upd["var"], 0.9 * np.asarray(v["batch_stats"]["bn"]["var"])
                               + 0.1 * xs.var(0), rtol=1e-5)


def test_float64_closed_form_and_degenerate_channels():
    """In float64 the closed-form VJP equals autodiff of flax's ops to 1e-12, also for a
    constant channel (flax clips the variance at 0 and its gradient halves there)."""
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        for activation in ("prelu", "relu6", "none"):
            x = rng.normal(size=(6, 3, 4, 5)) * 3.0 + 1.0
            x[..., 0] = 0.0  # E[x²] - E[x]² is exactly 0
            x[..., 1] = 2.5  # ... or round-off around 0
            x[..., 2] = 0.1  # (not representable: the mean is off by round-off)
            x = jnp.asarray(x, jnp.float64)
            kw = dict(activation=activation, use_scale=True, dtype=jnp.float64)
            ref, fused = _BnAct(impl="xla", **kw), _BnAct(impl="fast", **kw)
            v = jax.tree.map(lambda a: a.astype(jnp.float64), _variables(ref, x, rng))
            # constant channels output their bias: put it on the activation's kinks, where
            # jnp.clip's derivative is 1/2 and PReLU's that of the positive side
            bias = v["params"]["bn"]["bias"].at[0].set(0.0).at[1].set(6.0)
            v["params"]["bn"]["bias"] = bias
            dy = jnp.asarray(rng.normal(size=x.shape), jnp.float64)
            for a, b in zip(jax.tree.leaves(_step(fused, v, x, dy)),
                            jax.tree.leaves(_step(ref, v, x, dy))):
                assert a.dtype == b.dtype
                assert _rel(a, b) < 1e-12, (activation, a, b)


def test_bfloat16_compute_dtype():
    """dtype=bfloat16 as the models' mixed precision: bf16 output, float32 statistics and
    parameter gradients; close to flax (whose slope gradient is summed in bf16, ours in f32)."""
    rng = np.random.default_rng(2)
    x = _data((4, 6, 6, 8), rng, jnp.bfloat16)
    ref = _BnAct("prelu", "xla", dtype=jnp.bfloat16)
    fused = _BnAct("prelu", "fast", dtype=jnp.bfloat16)
    v = _variables(ref, x, rng)
    dy = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    got, want = _step(fused, v, x, dy), _step(ref, v, x, dy)
    assert got[0].dtype == jnp.bfloat16 and got[3].dtype == jnp.bfloat16
    assert jax.tree.map(lambda a: a.dtype, got) == jax.tree.map(lambda a: a.dtype, want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert _rel(a.astype(jnp.float32), b.astype(jnp.float32)) < 3e-2


def test_global_statistics_under_a_sharded_batch():
    """Batch sharded over 4 devices under jit: the same output, statistics and gradients as
    unsharded, i.e. the sums are over the global batch. Each shard has its own mean and spread,
    so per-shard statistics could not pass."""
    assert jax.device_count() >= 4
    mesh = Mesh(np.array(jax.devices()[:4]), ("batch",))
    rng = np.random.default_rng(3)
    shift = np.repeat(np.arange(4.0), 2)[:, None, None, None]
    x = jnp.asarray(rng.normal(size=(8, 5, 5, 16)) * (1 + shift) + 2 * shift, jnp.float32)
    dy = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    fused = _BnAct("prelu", "fast")
    v = _variables(fused, x, rng)

    def step(v, x, dy, module=fused):
        def loss(params, x):
            y, upd = module.apply({**v, "params": params}, x, True, mutable=["batch_stats"])
            return jnp.sum(y * dy), (y, upd)
        return jax.grad(loss, argnums=(0, 1), has_aux=True)(v["params"], x)

    want = jax.jit(step)(v, x, dy)
    batch = NamedSharding(mesh, P("batch"))
    xs, dys = jax.device_put(x, batch), jax.device_put(dy, batch)
    assert len(xs.addressable_shards) == 4
    got = jax.jit(step)(jax.device_put(v, NamedSharding(mesh, P())), xs, dys)
    (_, g_x), (y, upd) = got
    assert y.sharding.is_equivalent_to(batch, y.ndim)  # computed sharded, not gathered
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert _rel(a, b) < RTOL
    # and the per-shard statistics really differ from the global ones
    shard_mean = np.asarray(x[:2]).reshape(-1, 16).mean(0)
    assert _rel(shard_mean, upd["batch_stats"]["bn"]["mean"]) > 0.1
    # and so does flax, unsharded
    flax_ref = jax.jit(lambda v, x, dy: step(v, x, dy, _BnAct("prelu", "xla")))(v, x, dy)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(flax_ref)):
        assert _rel(a, b) < RTOL


def test_selection_and_errors():
    assert L.resolve_bn_impl("auto") == ("fast" if jax.default_backend() == "cpu" else "xla")
    assert L.resolve_bn_impl("xla") == "xla"
    with pytest.raises(ValueError, match="bn_impl 'cudnn'; valid: auto, xla, fast"):
        L.resolve_bn_impl("cudnn")
    x = jnp.zeros((2, 3, 3, 4))
    with pytest.raises(ValueError, match="activation 'gelu'"):
        _BnAct("gelu", "fast").init(jax.random.key(0), x, True)
    with pytest.raises(ValueError, match="needs negative_slope"):
        L.bn_act(x, None, jnp.zeros(4), activation="prelu")


def test_symbolic_batch_uses_plain_ops():
    """jax.export with a symbolic batch in train mode: plain ops, same numbers."""
    from jax import export

    rng = np.random.default_rng(4)
    x = _data((3, 4, 4, 8), rng)
    m = _BnAct("relu6", "fast")
    v = _variables(m, x, rng)

    def f(x):
        return m.apply(v, x, True, mutable=["batch_stats"])

    (b,) = export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((b, 4, 4, 8), jnp.float32)
    assert "name=_bn_act" not in str(jax.make_jaxpr(f)(spec))
    exp = export.export(jax.jit(f))(spec)
    for a, b_ in zip(jax.tree.leaves(exp.call(x)), jax.tree.leaves(f(x))):
        assert _rel(a, b_) < RTOL


@pytest.mark.parametrize("name", ["iresnet50", "mobilenetv2"])
def test_models_keep_their_variable_tree(name):
    """bn_impl changes no variable name, shape or dtype (checkpoints, torch converters) and no
    parameter count."""
    from lowlight import models

    plain, fused = (L.param_shapes(models.create(name, bn_impl=impl)) for impl in ("xla", "fast"))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), plain) == jax.tree.map(
        lambda a: (a.shape, a.dtype), fused)
    if name == "iresnet50":
        assert L.count_params(fused["params"]) == 43_590_336  # insightface r50


def _uses_fused(model, x):
    jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False)))
    return "name=_bn_act" in str(jaxpr)  # the fused BN's custom_vjp (fast_conv has others)


def test_bn_impl_follows_conv_impl_in_iresnet_and_mobilenetv2():
    from lowlight.models import iresnet

    x = jnp.zeros((2, 16, 16, 3))
    mk = lambda **kw: iresnet.IResNet(layers=(1,), widths=(8,), embed_dim=8, **kw)  # noqa: E731
    assert not _uses_fused(mk(conv_impl="xla"), x)
    assert _uses_fused(mk(conv_impl="xla", bn_impl="fast"), x)
    assert not _uses_fused(mk(conv_impl="fast", bn_impl="xla"), x)
    assert _uses_fused(mk(conv_impl="auto"), x) == (jax.default_backend() == "cpu")
    # MobileNetV2's BN + ReLU6 units likewise (with the compiled backward kernels the fused
    # form measured faster there too)
    from lowlight.models import mobilenetv2

    mk2 = lambda **kw: mobilenetv2.MobileNetV2Features(alpha=0.25, **kw)  # noqa: E731
    x2 = jnp.zeros((1, 32, 32, 3))
    assert _uses_fused(mk2(conv_impl="fast"), x2)
    assert not _uses_fused(mk2(conv_impl="xla"), x2)
    assert not _uses_fused(mk2(conv_impl="fast", bn_impl="xla"), x2)
    assert _uses_fused(mk2(conv_impl="xla", bn_impl="fast"), x2)


def _random_variables(model, x, rng):
    """Variables of `model` with random values (no init compile): convs / dense ~N(0, 0.2²),
    BN scale 1 ± 0.2, running variance in [0.5, 1.5], slopes 0.25 ± 0.1."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))

    def value(path, s):
        leaf = path[-1].key
        if leaf in ("scale", "var"):
            return jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype)
        if leaf == "negative_slope":
            return jnp.asarray(rng.uniform(0.15, 0.35, s.shape), s.dtype)
        return jnp.asarray(rng.normal(size=s.shape) * 0.2, s.dtype)

    return jax.tree_util.tree_map_with_path(value, shapes)


@pytest.mark.parametrize("one_device", [False, True])
@pytest.mark.parametrize("name", ["iresnet", "mobilenetv2"])
def test_whole_model_train_step_matches(name, one_device, monkeypatch):
    """A train step of a small iResNet (stem, a strided stage with shortcut, a plain block,
    head) and of MobileNetV2 (all 17 blocks at alpha 0.25): loss gradients and new batch
    statistics with the fused BN + activation equal flax's (the same convolutions); on one
    device through the compiled BatchNorm backward kernel."""
    from lowlight.models import fast_conv, iresnet, mobilenetv2

    if one_device:
        monkeypatch.setattr(fast_conv, "_multi_device", lambda: False)

    if name == "iresnet":
        make = lambda impl: iresnet.IResNet(layers=(2, 1), widths=(8, 16), embed_dim=16,  # noqa: E731
                                            conv_impl="xla", bn_impl=impl)
        x_shape = (8, 16, 16, 3)
    else:
        make = lambda impl: mobilenetv2.MobileNetV2(alpha=0.25, attention="none",  # noqa: E731
                                                    dropout=0.0, conv_impl="xla", bn_impl=impl)
        # 32 values per channel in the last stage's BatchNorms (2x2 maps): over 16 (4 x 48²
        # inputs) the compiled kernel's summation order moved the gradient by 4e-5, rounding
        # amplified by the BN's cancellation (the same order of effect as test_fast_conv's note)
        x_shape = (8, 64, 64, 3)
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.uniform(-1, 1, x_shape), jnp.float32)
    ref, fused = make("xla"), make("fast")
    v = _random_variables(ref, x, rng)
    assert _uses_fused(fused, x) and not _uses_fused(ref, x)

    def step(model):
        def loss(params):
            out, upd = model.apply({**v, "params": params}, x, train=True,
                                   mutable=["batch_stats"])
            # linear in the outputs with fixed random weights
            return sum(jnp.sum(y * jax.random.normal(jax.random.key(i), y.shape))
                       for i, y in enumerate(jax.tree.leaves(out))), upd

        # LLVM's optimisations off: a third of the compile time, the same HLO and fusions
        return jax.jit(jax.grad(loss, has_aux=True)).lower(v["params"]).compile(
            {"xla_backend_optimization_level": 0})(v["params"])

    (g, upd), (g_ref, upd_ref) = step(fused), step(ref)
    assert jax.tree.structure(upd["batch_stats"]) == jax.tree.structure(upd_ref["batch_stats"]) \
        == jax.tree.structure(v["batch_stats"])
    for a, b in zip(jax.tree.leaves(upd), jax.tree.leaves(upd_ref)):
        assert _rel(a, b) < RTOL
    got, want = (jax.flatten_util.ravel_pytree(t)[0] for t in (g, g_ref))
    assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < RTOL
    # leaf by leaf, against the size of the whole gradient (some leaves, e.g. biases feeding
    # a BatchNorm, have a true gradient of 0 and hold only round-off)
    scale = float(jnp.max(jnp.abs(want)))
    for path, a in jax.tree_util.tree_leaves_with_path(g):
        b = dict(jax.tree_util.tree_leaves_with_path(g_ref))[path]
        assert float(jnp.max(jnp.abs(a - b))) < RTOL * scale, jax.tree_util.keystr(path)
