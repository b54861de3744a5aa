"""Tests for the ResNet backbones and the BNNeck re-ID model (tiny images, tiny depths)."""

import ast
import functools
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ctl_jax import models
from ctl_jax.build import build_model
from ctl_jax.cpu import CPU_LAYERS, cpu_layers
from ctl_jax.models import layers, resnet
from ctl_jax.models.layers import REFERENCE_LAYERS

H, W = 64, 32
# Two one-block stages: the code paths of ResNet-50 (strided block, downsample, IBN) at a
# fraction of the compile time; full depths and stage 4 are checked on shapes only.
SmallBottleneck = functools.partial(resnet.ResNet, stage_sizes=(1, 1), block_cls=resnet.Bottleneck)
SmallIBN = functools.partial(SmallBottleneck, ibn=True, stem_relu=True)


def _cfg(arch, **kw):
    base = dict(arch=arch, last_stride=1, stem_relu=None, dtype="float32")
    base.update(kw)
    return ml_collections.ConfigDict(base)


def _images(n=4, seed=0, h=H, w=W):
    return jax.random.normal(jax.random.key(seed), (n, h, w, 3))


def _abstract_init(model, x, **kw):
    return jax.eval_shape(functools.partial(model.init, train=False, **kw), jax.random.key(0), x)


def _flat_names(tree):
    return {"/".join(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)}


def _reid(backbone=SmallIBN, **kw):
    return models.ReidModel(backbone=backbone, num_classes=5, **kw)


@functools.cache
def _variables(backbone):
    """Variables of `_reid(backbone)`; they depend neither on the batch nor on the dtype."""
    return models.init_variables(_reid(backbone), jax.random.key(0), (H, W, 3))


def _backbone_variables(backbone):
    return {k: v["backbone"] for k, v in _variables(backbone).items()}


@functools.cache
def _train_apply(model):
    @jax.jit
    def run(variables, x, valid):
        return model.apply(variables, x, train=True, valid=valid, mutable=["batch_stats"])

    return run


@pytest.mark.parametrize("arch", [a for a in models.ARCH_NAMES if a.startswith("resnet")])
@pytest.mark.parametrize("last_stride", [1, 2])
def test_output_shapes_every_arch(arch, last_stride):
    """Every ResNet (the ViTs and OSNets: tests/test_vit.py, tests/test_osnet.py)."""
    model = models.model_from_config(_cfg(arch, last_stride=last_stride), num_classes=7)
    x = jnp.zeros((2, H, W, 3))
    variables = _abstract_init(model, x)
    out = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
    dim = models.feature_dim(arch)
    assert out["features"].shape == (2, dim) and out["features"].dtype == jnp.float32
    assert out["bn_features"].shape == (2, dim)
    assert out["logits"].shape == (2, 7)
    backbone = model.backbone()
    fmap = jax.eval_shape(
        lambda v, x: backbone.apply(v, x, train=False),
        {
            "params": variables["params"]["backbone"],
            "batch_stats": variables["batch_stats"]["backbone"],
        },
        x,
    )
    # 64x32 input: /16 with last stride 1, /32 with 2.
    assert fmap.shape == ((2, 4, 2, dim) if last_stride == 1 else (2, 2, 1, dim))


def test_parameter_names_resnet50():
    model = models.model_from_config(_cfg("resnet50"), num_classes=5)
    variables = _abstract_init(model, jnp.zeros((1, H, W, 3)))
    names = _flat_names(variables["params"])
    for name in [
        "backbone/conv1/kernel",
        "backbone/bn1/scale",
        "backbone/bn1/bias",
        "backbone/layer1_0/downsample_conv/kernel",
        "backbone/layer1_0/downsample_bn/scale",
        "backbone/layer3_5/conv3/kernel",
        "backbone/layer4_2/bn3/bias",
        "bnneck/scale",
        "classifier/kernel",
    ]:
        assert name in names, name
    assert "backbone/layer3_6/conv1/kernel" not in names
    assert "backbone/layer1_1/downsample_conv/kernel" not in names
    assert not any(n.startswith("bnneck/") and n.endswith("bias") for n in names)
    assert not any(n.endswith("bias") for n in names if "conv" in n or "classifier" in n)
    stats = _flat_names(variables["batch_stats"])
    assert {"backbone/bn1/mean", "backbone/bn1/var", "bnneck/mean", "bnneck/var"} <= stats
    params = variables["params"]
    assert params["backbone"]["conv1"]["kernel"].shape == (7, 7, 3, 64)
    assert params["backbone"]["layer2_0"]["conv1"]["kernel"].shape == (1, 1, 256, 128)
    assert params["classifier"]["kernel"].shape == (2048, 5)


def test_parameter_names_ibn():
    model = models.model_from_config(_cfg("resnet50_ibn_a"), num_classes=5)
    variables = _abstract_init(model, jnp.zeros((1, H, W, 3)))
    names = _flat_names(variables["params"])
    bb = variables["params"]["backbone"]
    for layer in ("layer1_0", "layer2_3", "layer3_5"):
        planes = bb[layer]["conv1"]["kernel"].shape[-1]
        assert bb[layer]["bn1"]["IN"]["scale"].shape == (planes // 2,)
        assert bb[layer]["bn1"]["IN"]["bias"].shape == (planes // 2,)
        assert bb[layer]["bn1"]["BN"]["scale"].shape == (planes - planes // 2,)
        assert set(variables["batch_stats"]["backbone"][layer]["bn1"]) == {"BN"}
    assert not any("/IN/" in n for n in names if n.startswith("backbone/layer4"))
    assert "backbone/layer4_0/bn1/scale" in names


def test_model_from_config_errors_and_defaults():
    with pytest.raises(ValueError, match="resnet50_ibn_a"):
        models.model_from_config(_cfg("resnet51"), 3)
    with pytest.raises(ValueError, match="model.dtype"):
        models.model_from_config(_cfg("resnet18", dtype="float16"), 3)
    with pytest.raises(ValueError):
        models.feature_dim("vgg")
    assert models.feature_dim("resnet34") == 512
    assert models.feature_dim("resnet101_ibn_a") == 2048
    assert models.model_from_config(_cfg("resnet50"), 3).backbone().stem_relu is False
    assert models.model_from_config(_cfg("resnet50_ibn_a"), 3).backbone().stem_relu is True
    stem_relu = _cfg("resnet50", stem_relu=True)
    assert models.model_from_config(stem_relu, 3).backbone().stem_relu is True
    # Configs saved by earlier versions hold model.fast_1x1 and model.fast_ops: ignored.
    old = _cfg("resnet18", dtype="bfloat16", fast_1x1=False, fast_ops=False)
    model = models.model_from_config(old, 3)
    assert model.dtype == jnp.bfloat16 and model.layers is REFERENCE_LAYERS


def _full_cfg(dtype="float32", **top):
    return ml_collections.ConfigDict({"model": _cfg("resnet18", dtype=dtype), **top})


@pytest.mark.parametrize(
    "setting, dtype, platform, uses_cpu_layers",
    [
        ("auto", "float32", "cpu", True),
        ("auto", "bfloat16", "cpu", False),
        ("auto", "float32", "cuda", False),
        ("auto", "bfloat16", "tpu", False),
        ("off", "float32", "cpu", False),
        ("on", "bfloat16", "tpu", True),
        (None, "float32", "cpu", True),  # a config saved before cpu_fast_path existed
    ],
)
def test_build_model_picks_the_layer_set(setting, dtype, platform, uses_cpu_layers):
    top = {} if setting is None else {"cpu_fast_path": setting}
    config = _full_cfg(dtype, cpu_winograd_tile=4, **top)
    model = build_model(config, 3, platform=platform)
    assert model.layers is (CPU_LAYERS if uses_cpu_layers else REFERENCE_LAYERS)
    # An explicit setting (restoring with another config's choice) overrides the config's.
    assert build_model(config, 3, cpu_fast_path="off", platform=platform).layers is REFERENCE_LAYERS


def test_build_model_rejects_an_unknown_setting():
    with pytest.raises(ValueError, match="cpu_fast_path: expected one of auto, on, off"):
        build_model(_full_cfg(cpu_fast_path="fast"), 3)


def test_models_package_imports_nothing_of_the_cpu_package():
    """The reference model stands alone: no module of ctl_jax/models imports ctl_jax.cpu,
    asks for the backend or defines a custom gradient."""
    for path in pathlib.Path(models.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                names = []
            assert not any(name.startswith("ctl_jax.cpu") for name in names), path.name
            used = getattr(node, "attr", None) or getattr(node, "id", None)
            assert used not in ("default_backend", "custom_vjp", "custom_jvp"), path.name


def test_stem_relu_and_ibn_change_output():
    x = _images(2)

    def apply(module, variables):
        fn = functools.partial(module.apply, train=True, mutable=["batch_stats"])
        return jax.jit(fn)(variables, x)[0]

    # The stem alone (no stages) is enough to see the ReLU.
    stem = functools.partial(resnet.ResNet, stage_sizes=(), block_cls=resnet.Bottleneck)
    y_plain = apply(stem(), _backbone_variables(stem))
    y_relu = apply(stem(stem_relu=True), _backbone_variables(stem))
    assert y_plain.min() < 0 and y_relu.min() >= 0
    y_bn = apply(SmallBottleneck(stem_relu=True), _backbone_variables(SmallBottleneck))
    y_ibn = apply(SmallIBN(), _backbone_variables(SmallIBN))
    assert y_ibn.shape == y_bn.shape
    assert not np.allclose(y_ibn, y_bn, atol=1e-3)


@pytest.mark.parametrize("winograd_tile, grad_tol", [(2, 1e-5), (4, 1e-4)])
def test_cpu_layers_same_outputs_and_gradients_as_reference(winograd_tile, grad_tol):
    """The whole re-ID model (IBN-a blocks, downsampling, BNNeck) with the CPU layers against
    the reference layers: train-mode outputs, batch statistics and parameter gradients. At
    64x32 the first stage's 16x8 maps take Winograd F(4x4, 3x3) with `winograd_tile=4`."""
    x = _images(4)
    variables = _variables(SmallIBN)
    valid = jnp.array([True, True, False, True])

    def grads(layer_set):
        model = _reid(layers=layer_set)

        def loss(params):
            out, upd = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                x,
                train=True,
                valid=valid,
                mutable=["batch_stats"],
            )
            return jnp.mean(out["logits"] ** 2) + jnp.mean(out["features"] ** 2), (out, upd)

        return jax.jit(jax.grad(loss, has_aux=True))(variables["params"])

    g_fast, (out_fast, upd_fast) = grads(cpu_layers(winograd_tile=winograd_tile))
    g_ref, (out_ref, upd_ref) = grads(REFERENCE_LAYERS)
    for key in ("features", "bn_features", "logits"):
        np.testing.assert_allclose(out_fast[key][valid], out_ref[key][valid], rtol=1e-4, atol=1e-4)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5)
    jax.tree.map(close, upd_fast, upd_ref)
    # One global scale: some gradients are zero in theory (the stem BN shift, which the next
    # batch norms cancel) and pure rounding noise in practice. F(4x4, 3x3) rounds ~10x more
    # than F(2x2, 3x3) (docs/performance.md); its worst here was 1.1e-5-4e-5 (the stem's
    # and the classifier's kernel gradients: every layer's rounding flows into them; the
    # figure moves with the order of the sums, e.g. the kernel transform's). For scale: the
    # reference's own gradients move by ~1e-4 when the images move by 1e-6 (float32
    # rounding); a wrong path is off by O(1).
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_ref))
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a / scale, b / scale, atol=grad_tol)


@pytest.mark.parametrize("layer_set", [REFERENCE_LAYERS, CPU_LAYERS], ids=["reference", "cpu"])
def test_padded_rows_are_ignored(layer_set):
    model = _reid(layers=layer_set)
    x = _images(6)
    variables = _variables(SmallIBN)
    valid = jnp.array([True, True, False, True, False, True])
    run = _train_apply(model)
    out, stats = run(variables, x, valid)
    # Different garbage (and a NaN) in the padded rows.
    x2 = x.at[2].set(100.0).at[4].set(jnp.nan)
    out2, stats2 = run(variables, x2, valid)
    for key in ("features", "bn_features", "logits"):
        np.testing.assert_allclose(out[key][valid], out2[key][valid], rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats, stats2)
    # Statistics equal those of the valid rows alone.
    out3, stats3 = run(variables, x[valid], None)
    np.testing.assert_allclose(out["bn_features"][valid], out3["bn_features"], rtol=1e-4, atol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), stats, stats3)


@pytest.mark.parametrize("layer_set", [REFERENCE_LAYERS, CPU_LAYERS], ids=["reference", "cpu"])
def test_batchnorm_matches_pytorch_semantics(layer_set):
    x = jax.random.normal(jax.random.key(3), (5, 3, 2, 4)) * 2.0 + 1.0
    valid = jnp.array([True, False, True, True, True])
    bn = layer_set.norm()
    variables = bn.init(jax.random.key(0), x, train=False)
    y, upd = bn.apply(variables, x, train=True, valid=valid, mutable=["batch_stats"])
    xv = np.asarray(x)[np.asarray(valid)].reshape(-1, 4)
    mean, var = xv.mean(0), xv.var(0)
    np.testing.assert_allclose(y[valid], ((x[valid] - mean) / np.sqrt(var + 1e-5)), atol=1e-5)
    n = xv.shape[0]
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * mean, atol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * var * n / (n - 1), atol=1e-6)
    # No valid row at all: the running averages stay as they were.
    _, upd0 = bn.apply(variables, x, train=True, valid=jnp.zeros(5, bool), mutable=["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, upd0["batch_stats"], variables["batch_stats"])


def test_batch_stats_over_global_batch_when_sharded():
    model = _reid(SmallBottleneck)
    x = _images(8)
    valid = jnp.array([True, True, True, False, True, True, False, True])
    variables = _variables(SmallBottleneck)
    run = _train_apply(model)
    out, stats = run(variables, x, valid)
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    shard = NamedSharding(mesh, P("data"))
    xs, vs = jax.device_put(x, shard), jax.device_put(valid, shard)
    out_s, stats_s = run(jax.device_put(variables, NamedSharding(mesh, P())), xs, vs)
    np.testing.assert_allclose(out["bn_features"], out_s["bn_features"], rtol=1e-4, atol=1e-4)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), stats, stats_s
    )


def test_bnneck_shift_frozen():
    model = _reid()
    x = _images(4)
    variables = _variables(SmallIBN)
    assert set(variables["params"]["bnneck"]) == {"scale"}

    def loss(params):
        out, upd = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.mean(out["logits"] ** 2) + jnp.mean(out["bn_features"]), upd

    grads, upd = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
    assert set(grads["bnneck"]) == {"scale"}
    params = jax.tree.map(lambda p, g: p - 10.0 * g, variables["params"], grads)
    # Whatever the parameters, a feature equal to the running mean maps to exactly zero.
    bnneck = layers.BatchNorm(use_bias=False)
    stats = upd["batch_stats"]["bnneck"]
    y = bnneck.apply(
        {"params": params["bnneck"], "batch_stats": stats}, stats["mean"][None], train=False
    )
    np.testing.assert_allclose(y, 0.0, atol=1e-6)


def test_bfloat16_runs_and_params_stay_float32():
    model = _reid(dtype=jnp.bfloat16)
    x = _images(4)
    abstract = _abstract_init(model, x)
    assert {leaf.dtype for leaf in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}
    out, stats = _train_apply(model)(_variables(SmallIBN), x, None)
    assert all(v.dtype == jnp.float32 for v in out.values())
    assert all(np.isfinite(np.asarray(v)).all() for v in out.values())
    assert {leaf.dtype for leaf in jax.tree.leaves(stats)} == {jnp.dtype(jnp.float32)}
    fmap = jax.eval_shape(
        functools.partial(SmallIBN(dtype=jnp.bfloat16).apply, train=False),
        _backbone_variables(SmallIBN),
        x,
    )
    assert fmap.dtype == jnp.bfloat16


def test_classifier_and_conv_init():
    model = models.ReidModel(backbone=SmallBottleneck, num_classes=300)
    variables = models.init_variables(model, jax.random.key(0), (32, 16, 3))
    kernel = np.asarray(variables["params"]["classifier"]["kernel"])
    assert kernel.shape == (512, 300)
    assert abs(kernel.std() - 0.001) < 0.00003 and abs(kernel.mean()) < 0.00002
    # torchvision's kaiming normal, fan_out: std sqrt(2 / (k * k * Cout)).
    conv = np.asarray(variables["params"]["backbone"]["layer2_0"]["conv2"]["kernel"])
    assert abs(conv.std() / np.sqrt(2 / (9 * 128)) - 1) < 0.03
    bn = variables["params"]["backbone"]["layer2_0"]["bn2"]
    np.testing.assert_array_equal(bn["scale"], 1.0)
    np.testing.assert_array_equal(bn["bias"], 0.0)
    np.testing.assert_array_equal(variables["batch_stats"]["bnneck"]["var"], 1.0)
