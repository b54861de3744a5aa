"""The CPU layers (`ctl_jax.cpu`) against the reference layers (`ctl_jax.models.layers`, plain
Flax/lax): Winograd and patches 3x3 convolutions, kernel gradients as matrix products, the
1x1 convolutions, the stem, masked batch-norm moments and backward pass, and a whole
bottleneck network with each layer set. Outputs and gradients, odd sizes included. (The
max-pool's custom VJP is covered by test_max_pool.py.)"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax import lax

from ctl_jax.build import build_model
from ctl_jax.configs import load_config
from ctl_jax.cpu import CPU_LAYERS, batch_norm, convolution
from ctl_jax.cpu import layers as cpu_layers
from ctl_jax.models import layers, resnet
from ctl_jax.models.layers import REFERENCE_LAYERS


def _direct_conv(x, kernel, strides=1):
    return lax.conv_general_dilated(
        x, kernel, (strides, strides), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _direct_conv_any(x, kernel, strides, padding):
    pad = ((padding, padding), (padding, padding))
    return lax.conv_general_dilated(
        x, kernel, (strides, strides), pad, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _rel_err(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


@pytest.mark.parametrize("tile", convolution.WINOGRAD_TILES)
@pytest.mark.parametrize(
    "shape", [(2, 8, 4, 6, 5), (1, 7, 5, 3, 4), (3, 1, 1, 2, 3), (2, 2, 3, 4, 2), (1, 10, 13, 4, 3)]
)
def test_winograd_matches_direct_convolution(shape, tile):
    """F(2x2, 3x3) and F(4x4, 3x3), outputs and both gradients; sizes that are not a multiple
    of the tile (partial tiles), smaller than a tile, and several tiles. F(4x4, 3x3)'s
    coefficients (up to 8, and 1/24) round more: ~1e-5 relative against ~1e-6."""
    tolerance = {2: 1e-5, 4: 3e-5}[tile]
    n, h, w, cin, cout = shape
    rng = np.random.default_rng(sum(shape))
    x = jnp.asarray(rng.normal(size=(n, h, w, cin)).astype(np.float32))
    kernel = jnp.asarray(rng.normal(size=(3, 3, cin, cout)).astype(np.float32))
    weights = jnp.asarray(rng.normal(size=(n, h, w, cout)).astype(np.float32))
    winograd = functools.partial(convolution.winograd_conv3x3, tile=tile)
    y = jax.jit(winograd)(x, kernel)
    y_ref = _direct_conv(x, kernel)
    assert y.shape == y_ref.shape
    assert _rel_err(y, y_ref) < tolerance

    def loss(conv, inputs, k):
        return jnp.sum(jnp.tanh(conv(inputs, k)) * weights)

    winograd_loss = functools.partial(loss, winograd)
    grads = jax.jit(jax.grad(winograd_loss, argnums=(0, 1)))(x, kernel)
    grads_ref = jax.grad(functools.partial(loss, _direct_conv), argnums=(0, 1))(x, kernel)
    for g, g_ref in zip(grads, grads_ref):
        assert _rel_err(g, g_ref) < tolerance


@pytest.mark.parametrize(
    "hw, cin, strides",
    [
        ((8, 4), 256, 1),  # Winograd F(2x2, 3x3)
        ((9, 5), 256, 1),  # Winograd F(2x2, 3x3), odd sizes
        ((8, 8), 64, 1),  # Winograd F(4x4, 3x3)
        ((11, 9), 16, 1),  # Winograd F(4x4, 3x3), partial tiles
        ((8, 4), 16, 2),  # strided to a 4x2 output: patches
        ((4, 2), 512, 1),  # 4x2 at 512 channels: Winograd F(2x2, 3x3), not the patches
        ((8, 6), 8, 1),  # Winograd forward and kernel gradient, XLA's input gradient
        ((9, 11), 8, 2),  # strided convolution, kernel gradient per tap
    ],
)
def test_conv3x3_module_matches_flax_conv(hw, cin, strides):
    rng = np.random.default_rng(cin + strides)
    x = jnp.asarray(rng.normal(size=(1, *hw, cin)).astype(np.float32))
    ours = CPU_LAYERS.conv3x3(6, strides=strides)
    params = ours.init(jax.random.key(0), x)
    assert params["params"]["kernel"].shape == (3, 3, cin, 6)
    ref = nn.Conv(6, (3, 3), (strides, strides), padding=((1, 1), (1, 1)), use_bias=False)
    plain = REFERENCE_LAYERS.conv3x3(6, strides=strides)

    def loss(module, p, inputs):
        return jnp.sum(jnp.sin(module.apply(p, inputs)))

    y_ref = jax.jit(ref.apply)(params, x)
    g_ref = jax.jit(jax.grad(functools.partial(loss, ref), argnums=(0, 1)))(params, x)
    # Float rounding of sums over 9 * cin terms, summed in another order: up to 1.4e-5 seen
    # for cin 256 on an AVX2 machine (below 1e-5 on an AVX-512 one); a wrong path is O(1).
    tol = 5e-5
    for module in (ours, plain):
        assert _rel_err(jax.jit(module.apply)(params, x), y_ref) < tol
        g = jax.jit(jax.grad(functools.partial(loss, module), argnums=(0, 1)))(params, x)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
            assert _rel_err(a, b) < tol


@pytest.mark.parametrize(
    "shape, size, strides, method",
    [
        ((2, 8, 6, 5, 4), 3, 1, "winograd"),
        ((1, 7, 9, 3, 2), 3, 1, "winograd"),  # odd sizes: partial Winograd tiles
        ((2, 9, 8, 4, 3), 3, 2, "taps"),
        ((2, 8, 8, 4, 3), 3, 2, "taps"),
        ((2, 17, 10, 3, 4), 7, 2, "patches"),  # the stem's shape, odd height
        ((1, 8, 6, 2, 3), 3, 1, "patches"),
    ],
)
def test_cpu_convolution_matches_the_plain_one(shape, size, strides, method):
    n, h, w, cin, cout = shape
    padding = size // 2
    rng = np.random.default_rng(h * w + size)
    x = jnp.asarray(rng.normal(size=(n, h, w, cin)).astype(np.float32))
    kernel = jnp.asarray(rng.normal(size=(size, size, cin, cout)).astype(np.float32))
    y_ref = convolution.conv2d(x, kernel, strides, padding)
    weights = jnp.asarray(rng.normal(size=y_ref.shape).astype(np.float32))

    def loss(conv, inputs, k):
        return jnp.sum(jnp.tanh(conv(inputs, k)) * weights)

    ours = functools.partial(
        convolution.conv2d_cpu, strides=strides, padding=padding, method=method
    )
    assert _rel_err(jax.jit(ours)(x, kernel), y_ref) < 1e-5
    grads = jax.jit(jax.grad(functools.partial(loss, ours), argnums=(0, 1)))(x, kernel)
    plain = functools.partial(_direct_conv_any, strides=strides, padding=padding)
    grads_ref = jax.grad(functools.partial(loss, plain), argnums=(0, 1))(x, kernel)
    for g, g_ref in zip(grads, grads_ref):
        assert g.shape == g_ref.shape
        assert _rel_err(g, g_ref) < 1e-5


def test_stem_matches_flax_conv():
    x = jax.random.normal(jax.random.key(2), (2, 19, 12, 3))
    ref = nn.Conv(8, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False)
    params = ref.init(jax.random.key(0), x)

    def loss(module, p, inputs):
        return jnp.sum(jnp.sin(module.apply(p, inputs)))

    g_ref = jax.jit(jax.grad(functools.partial(loss, ref), argnums=(0, 1)))(params, x)
    for layer_set in (CPU_LAYERS, REFERENCE_LAYERS):
        stem = layer_set.stem_conv(8)
        assert jax.tree.map(jnp.shape, stem.init(jax.random.key(0), x)) == jax.tree.map(
            jnp.shape, params
        )
        assert _rel_err(jax.jit(stem.apply)(params, x), ref.apply(params, x)) < 1e-5
        g = jax.jit(jax.grad(functools.partial(loss, stem), argnums=(0, 1)))(params, x)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
            assert _rel_err(a, b) < 1e-5


@pytest.mark.parametrize("strides", [1, 2])
def test_conv1x1_matches_flax_conv(strides):
    x = jax.random.normal(jax.random.key(0), (2, 9, 6, 3))
    ours = CPU_LAYERS.conv1x1(8, strides=strides)
    params = ours.init(jax.random.key(1), x)
    assert params["params"]["kernel"].shape == (1, 1, 3, 8)
    ref = nn.Conv(8, (1, 1), (strides, strides), padding="VALID", use_bias=False)
    plain = REFERENCE_LAYERS.conv1x1(8, strides=strides)

    def loss(module, p, inputs):
        return jnp.sum(jnp.sin(module.apply(p, inputs)))

    g_ref = jax.grad(functools.partial(loss, ref), argnums=(0, 1))(params, x)
    for module in (ours, plain):
        np.testing.assert_allclose(
            module.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5
        )
        g = jax.grad(functools.partial(loss, module), argnums=(0, 1))(params, x)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("hw", [(4, 2), (2, 1), (5, 2), (6, 4)])
def test_conv3x3_matches_flax_conv_on_small_maps(strides, hw):
    """Maps smaller than the kernel take the patches path; outputs and gradients unchanged."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, *hw, 5)).astype(np.float32))
    ours = CPU_LAYERS.conv3x3(7, strides=strides)
    params = ours.init(jax.random.key(2), x)
    assert params["params"]["kernel"].shape == (3, 3, 5, 7)
    ref = nn.Conv(7, (3, 3), (strides, strides), padding=((1, 1), (1, 1)), use_bias=False)
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)

    def loss(module, p, inputs):
        return jnp.sum(jnp.sin(module.apply(p, inputs)))

    g_ours = jax.grad(functools.partial(loss, ours), argnums=(0, 1))(params, x)
    g_ref = jax.grad(functools.partial(loss, ref), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _computes_a_convolution(module, x) -> bool:
    params = module.init(jax.random.key(0), x)
    return "stablehlo.convolution" in jax.jit(module.apply).lower(params, x).as_text()


def test_winograd_and_kernel_gradient_rewrites_are_float32_only():
    """The rewrites that sum in another order (Winograd here) leave bfloat16 inputs to XLA's
    convolution; float32 inputs with 256 channels take Winograd (no convolution at all)."""
    x32 = jnp.zeros((1, 8, 8, 256), jnp.float32)
    assert not _computes_a_convolution(CPU_LAYERS.conv3x3(4), x32)
    assert _computes_a_convolution(CPU_LAYERS.conv3x3(4, dtype=jnp.bfloat16), x32)
    assert _computes_a_convolution(REFERENCE_LAYERS.conv3x3(4), x32)


def _apply_train(module, params, batch_stats, inputs, valid):
    """Train-mode forward pass: (outputs, updated batch statistics)."""
    variables = {"params": params, "batch_stats": batch_stats}
    return module.apply(variables, inputs, train=True, valid=valid, mutable=["batch_stats"])


def _where_moments(x, valid):
    """The straightforward masked moments: `where` on the full tensor."""
    xf = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mask = valid.reshape((-1,) + (1,) * (x.ndim - 1))
    count = jnp.sum(valid) * np.prod(x.shape[1:-1])
    mean = jnp.sum(jnp.where(mask, xf, 0.0), axes) / count
    var = jnp.sum(jnp.where(mask, jnp.square(xf - mean), 0.0), axes) / count
    return mean, var


@pytest.mark.parametrize("one_pass", [False, True])
@pytest.mark.parametrize("shape", [(5, 3, 2, 4), (6, 7), (4, 1, 3, 2)])
def test_masked_moments_values_and_gradients(shape, one_pass):
    """Two-pass and one-pass moments against `where` on the whole tensor."""
    rng = np.random.default_rng(len(shape))
    x = jnp.asarray(rng.normal(size=shape).astype(np.float32) * 3.0 + 2.0)
    valid = jnp.asarray(np.arange(shape[0]) % 3 != 1)
    moments = batch_norm.one_pass_moments if one_pass else layers.masked_moments
    mean, var, count = moments(x, valid)
    mean_ref, var_ref = _where_moments(x, valid)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, var_ref, rtol=1e-5, atol=1e-6)
    assert float(count) == float(jnp.sum(valid)) * np.prod(shape[1:-1])

    def loss(moments, inputs):
        m, v = moments(inputs, valid)[:2]
        return jnp.sum(jnp.sin(m)) + jnp.sum(jnp.sqrt(v + 1.0))

    g = jax.jit(jax.grad(functools.partial(loss, moments)))(x)
    g_ref = jax.jit(jax.grad(functools.partial(loss, _where_moments)))(x)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)
    # Padded rows neither change the statistics, even when not finite, nor get a gradient.
    mask = valid.reshape((-1,) + (1,) * (x.ndim - 1))
    for fill in (jnp.nan, jnp.inf, 1e30):
        mean_bad, var_bad, _ = moments(jnp.where(mask, x, fill), valid)
        np.testing.assert_array_equal(mean_bad, mean)
        np.testing.assert_array_equal(var_bad, var)
    np.testing.assert_array_equal(g[~np.asarray(valid)], 0.0)


@pytest.mark.parametrize("first_valid", [0, 2])
def test_one_pass_moments_keep_precision_far_from_zero(first_valid):
    """Mean 1e4 and standard deviation 1 (mean^2 / var = 1e8): an unshifted one-pass
    variance is off by a factor of 10-30 here; the shifted one is as close to float64 NumPy
    as the two-pass one (1.3e-4: the float32 rounding of x itself)."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(4, 6, 5, 3)) + 1e4
    valid = np.arange(4) >= first_valid
    mean, var, _ = batch_norm.one_pass_moments(jnp.asarray(x, jnp.float32), valid)
    kept = x[valid].reshape(-1, 3)
    np.testing.assert_allclose(mean, kept.mean(0), rtol=1e-6)
    np.testing.assert_allclose(var, kept.var(0), rtol=5e-4)


@pytest.mark.parametrize(
    "shape, masked, use_bias",
    [((5, 3, 2, 4), True, True), ((6, 7), False, False), ((4, 1, 3, 2), True, False)],
)
def test_batchnorm_custom_backward_matches_autodiff(shape, masked, use_bias):
    """The CPU batch norm's hand-written backward pass against autodiff of the reference
    one: outputs, running averages, and gradients for x, scale and bias; padded rows get
    only the direct term of the gradient."""
    rng = np.random.default_rng(len(shape))
    x = jnp.asarray(rng.normal(size=shape).astype(np.float32) * 3.0 + 2.0)
    valid = jnp.asarray(np.arange(shape[0]) % 3 != 1) if masked else None
    fast = CPU_LAYERS.norm(use_bias=use_bias)
    plain = REFERENCE_LAYERS.norm(use_bias=use_bias)
    assert isinstance(fast, cpu_layers.BatchNorm) and isinstance(fast, layers.BatchNorm)
    variables = plain.init(jax.random.key(0), x, train=False)
    params = jax.tree.map(
        lambda p: jnp.asarray(rng.normal(size=p.shape).astype(np.float32)), variables["params"]
    )
    weights = jnp.asarray(rng.normal(size=shape).astype(np.float32))

    def loss(module, p, inputs):
        y, updates = _apply_train(module, p, variables["batch_stats"], inputs, valid)
        return jnp.sum(jnp.sin(y) * weights), (y, updates)

    def run(module):
        grad = jax.grad(functools.partial(loss, module), argnums=(0, 1), has_aux=True)
        return jax.jit(grad)(params, x)

    g_fast, aux_fast = run(fast)
    g_plain, aux_plain = run(plain)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)
    jax.tree.map(close, aux_fast, aux_plain)
    jax.tree.map(close, g_fast, g_plain)
    assert set(g_fast[0]) == ({"scale", "bias"} if use_bias else {"scale"})


def test_bottleneck_network_cpu_layers_same_outputs_and_gradients():
    """Three one-block stages at 64x64, CPU layers against reference layers: the stem's
    patches kernel gradient and custom max-pool, Winograd forward with matmul kernel
    gradients in stages 1-2, the strided per-tap kernel gradients, whole Winograd in stage 3
    (256 channels, 4x4 map), the 1x1 matmuls, the batch norms. Train mode with a padded
    row."""
    net = functools.partial(resnet.ResNet, stage_sizes=(1, 1, 1), block_cls=resnet.Bottleneck)
    fast, plain = net(layers=CPU_LAYERS), net(layers=REFERENCE_LAYERS)
    x = jax.random.normal(jax.random.key(0), (3, 64, 64, 3))
    valid = jnp.array([True, False, True])
    variables = jax.jit(functools.partial(plain.init, train=False))(jax.random.key(1), x)

    def run(model, images, params):
        y, updates = _apply_train(model, params, variables["batch_stats"], images, valid)
        return jnp.mean(jnp.sin(y[valid])), (y, updates)

    def grads(model, images):
        loss = functools.partial(run, model, images)
        return jax.jit(jax.grad(loss, has_aux=True))(variables["params"])

    g_fast, (y_fast, upd_fast) = grads(fast, x)
    g_plain, (y_plain, upd_plain) = grads(plain, x)
    assert y_fast.shape == (3, 4, 4, 1024)
    assert _rel_err(y_fast[valid], y_plain[valid]) < 1e-4
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), upd_fast, upd_plain
    )
    # This network's gradients are ill-conditioned (ReLU kinks, batch norm over two images):
    # the plain model's own gradients move by ~3e-3 of their largest value when its input
    # moves by 1e-6, the size of float32 rounding. The rewrites only reorder sums, so they
    # may differ by as much, not more; a wrong gradient would be off by O(1).
    noise = 1e-6 * jax.random.normal(jax.random.key(5), x.shape)
    g_nudged, _ = grads(plain, x * (1.0 + noise))
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_plain))

    def worst(grads_a):
        pairs = zip(jax.tree.leaves(grads_a), jax.tree.leaves(g_plain))
        return max(float(jnp.max(jnp.abs(a - b))) for a, b in pairs) / scale

    assert worst(g_nudged) < 2e-2
    assert worst(g_fast) < 3 * worst(g_nudged) + 2e-5


def _winograd_points(layer_set, x, forward_only=False):
    """The batch sizes of the Winograd products in a 3x3 convolution's lowered training
    step (or forward pass): 16 for F(2x2, 3x3), 36 for F(4x4, 3x3)."""
    conv = layer_set.conv3x3(8)
    params = conv.init(jax.random.key(0), x)
    step = conv.apply if forward_only else jax.grad(lambda p, i: jnp.sum(conv.apply(p, i)))
    hlo = jax.jit(step).lower(params, x).as_text()
    batches = set()
    for line in hlo.splitlines():
        if "stablehlo.dot_general" in line and "batching_dims = [0] x [0]" in line:
            batches.add(int(line.rsplit("-> tensor<", 1)[1].split("x", 1)[0]))
    return batches


def test_winograd_tile_switch_picks_the_transform():
    """`cpu_winograd_tile`: F(4x4, 3x3) on maps of at least 8x8 (and not below), F(2x2, 3x3)
    only with 2; other values are a config error naming the key."""
    large = jnp.ones((2, 8, 8, 4), jnp.float32)
    small = jnp.ones((2, 8, 4, 256), jnp.float32)  # 8x4: F(2x2, 3x3) at 256 channels
    assert _winograd_points(cpu_layers.cpu_layers(winograd_tile=4), large) == {36}
    assert _winograd_points(cpu_layers.cpu_layers(winograd_tile=2), large) == {16}
    assert _winograd_points(cpu_layers.cpu_layers(winograd_tile=4), small) == {16}
    assert CPU_LAYERS.conv3x3.keywords["winograd_tile"] == 4
    # From the config; a config saved before the key existed trained with F(2x2, 3x3).
    config = load_config("configs/default.py")
    config.cpu_fast_path = "on"
    assert build_model(config, 5).layers.conv3x3.keywords["winograd_tile"] == 4
    config.cpu_winograd_tile = 2
    assert build_model(config, 5).layers.conv3x3.keywords["winograd_tile"] == 2
    saved = ml_collections.ConfigDict(
        {key: value for key, value in config.to_dict().items() if key != "cpu_winograd_tile"}
    )
    assert build_model(saved, 5).layers.conv3x3.keywords["winograd_tile"] == 2
    with pytest.raises(ValueError, match="cpu_winograd_tile: expected 2 or 4, got 3"):
        cpu_layers.cpu_layers(winograd_tile=3)


def test_small_maps_take_winograd_only_where_it_is_faster():
    """Maps with a side of 2-3 take the patches, except the forward pass of even-sided ones
    with at least 512 input channels, or 256 with at least 128 tiles (`conv3x3`'s
    `WINOGRAD_SMALL_MAP_*`), which F(2x2, 3x3) tiles exactly; their gradients stay the
    patches' (no Winograd product in the backward pass)."""
    x = jnp.ones((2, 4, 2, 512), jnp.float32)
    assert _winograd_points(CPU_LAYERS, x, forward_only=True) == {16}
    conv = CPU_LAYERS.conv3x3(8)
    params = conv.init(jax.random.key(0), x)
    vjp_only = jax.jit(lambda p, i, g: jax.vjp(conv.apply, p, i)[1](g))
    text = vjp_only.lower(params, x, jnp.ones((2, 4, 2, 8))).as_text()
    batched = [line for line in text.splitlines() if "batching_dims = [0] x [0]" in line]
    assert "stablehlo.dot_general" in text and not batched  # the patches' plain products
    for shape in [(2, 4, 2, 256), (63, 4, 2, 256), (64, 4, 2, 128), (2, 3, 2, 512), (2, 2, 1, 512)]:
        x = jnp.ones(shape, jnp.float32)
        assert _winograd_points(CPU_LAYERS, x, forward_only=True) == set(), shape
    for shape in [(64, 4, 2, 256), (128, 2, 2, 256)]:  # 128 tiles
        x = jnp.ones(shape, jnp.float32)
        assert _winograd_points(CPU_LAYERS, x, forward_only=True) == {16}, shape
