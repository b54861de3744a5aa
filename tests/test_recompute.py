"""`ctl_jax.cpu.recompute`: recomputing a layer's intermediates in the backward pass gives
the values and gradients of plain autodiff, leaves values untouched, and makes the compiled
step's temporary buffer smaller (XLA's own `memory_analysis`, a deterministic size)."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ctl_jax.cpu import batch_norm, recompute
from ctl_jax.cpu import layers as cpu_layers
from ctl_jax.models import layers


def test_after_leaves_values_unchanged_whatever_the_gradient_holds():
    x = jnp.array([[1.5, -2.0], [0.0, 3.25e-30]], jnp.float32)
    kernel = jnp.arange(6.0, dtype=jnp.bfloat16).reshape(2, 3)
    for g in (jnp.ones((2, 4)), jnp.array([[jnp.nan, 1.0], [jnp.inf, -jnp.inf]]), jnp.float32(2)):
        out = jax.jit(recompute.after)(g, {"x": x, "k": kernel})
        np.testing.assert_array_equal(out["x"], x)
        assert out["k"].dtype == jnp.bfloat16
        np.testing.assert_array_equal(out["k"], kernel)


def _tree_close(a, b, rtol=1e-6, atol=1e-6):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(u, v, rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "shape, strides",
    [
        ((2, 6, 4, 256, 3), 1),  # Winograd forward and backward (at least 256 channels)
        ((2, 8, 6, 5, 4), 1),  # Winograd forward, `conv2d_cpu`
        ((3, 4, 2, 5, 7), 1),  # patches (a 4x2 output)
        ((2, 9, 7, 4, 3), 2),  # strided: per-tap kernel gradient
    ],
)
def test_recomputed_conv3x3_matches_autodiff(shape, strides):
    """Each path of `layers.conv3x3`: `recomputed` against plain `jax.vjp` of the same
    function (same operations, so equal to float rounding) and against lax's convolution."""
    n, h, w, cin, cout = shape
    rng = np.random.default_rng(h * w + cin)
    x = jnp.asarray(rng.normal(size=(n, h, w, cin)).astype(np.float32))
    kernel = jnp.asarray(rng.normal(size=(3, 3, cin, cout)).astype(np.float32))
    fn = functools.partial(cpu_layers.conv3x3, strides=strides)
    y, vjp = jax.vjp(jax.jit(functools.partial(recompute.recomputed, fn)), x, kernel)
    y_ref, vjp_ref = jax.vjp(fn, x, kernel)
    g = jnp.asarray(rng.normal(size=y.shape).astype(np.float32))
    _tree_close(y, y_ref)
    _tree_close(vjp(g), vjp_ref(g), rtol=1e-5, atol=1e-5)
    _, vjp_lax = jax.vjp(lambda a, b: cpu_layers.convolution.conv2d(a, b, strides, 1), x, kernel)
    _tree_close(vjp(g), vjp_lax(g), rtol=1e-4, atol=1e-4)


def test_recomputed_through_a_custom_vjp_and_relu():
    """A batch norm (its own custom VJP, statistics from the input) and a ReLU, recomputed:
    the gradients of autodiff through the reference batch norm."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(4, 3, 2, 5)).astype(np.float32))
    scale = jnp.asarray(rng.normal(size=5).astype(np.float32))
    bias = jnp.asarray(rng.normal(size=5).astype(np.float32))
    weights = jnp.array([1.0, 1.0, 0.0, 1.0])
    valid = weights.astype(bool)

    def ours(x, scale, bias):
        mean, var, count = batch_norm.one_pass_moments(jax.lax.stop_gradient(x), valid)
        return recompute.recomputed(_bn_relu, x, scale, bias, weights, mean, var, count)

    def reference(x, scale, bias):
        mean, var, _ = layers.masked_moments(x, valid)
        return jax.nn.relu(layers.normalize(x, scale, bias, mean, var, 1e-5))

    out = jax.random.normal(jax.random.key(0), x.shape)

    def loss(f, *args):
        return jnp.sum(jnp.sin(f(*args)) * out)

    _tree_close(jax.jit(ours)(x, scale, bias), reference(x, scale, bias), 1e-5, 1e-5)
    grads = jax.jit(jax.grad(functools.partial(loss, ours), argnums=(0, 1, 2)))(x, scale, bias)
    grads_ref = jax.grad(functools.partial(loss, reference), argnums=(0, 1, 2))(x, scale, bias)
    _tree_close(grads, grads_ref, 1e-5, 1e-5)


def _bn_relu(x, scale, bias, weights, mean, var, count):
    y = batch_norm.normalize_train(x, scale, bias, weights, mean, var, count, 1e-5)
    return jax.nn.relu(y)


def _temp_bytes(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_recomputing_keeps_the_buffer_from_growing_with_depth():
    """Chains of 3x3 convolutions on 4x2 maps (the patches path: 9x its input as a
    product's operand) with ReLUs between them. Kept from the forward pass, every layer's
    patches stay until the backward pass reaches it: the buffer grows by one patches array
    per layer. Recomputed after the gradient, only the layers' inputs are kept."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64, 4, 2, 32)).astype(np.float32))
    patches = x.size * 9 * 4  # bytes of one convolution's patches

    def network(conv, kernels, x):
        for k in kernels:
            x = jax.nn.relu(conv(x, k))
        return jnp.sum(jnp.sin(x))

    def kept(x, k):  # plain autodiff: the patches are the product's saved operand
        patches = cpu_layers.convolution.conv_patches(x, 3, 1, 1)
        return jnp.einsum("nhwp,pc->nhwc", patches, k.reshape(-1, k.shape[-1]))

    def recomputed(x, k):
        return recompute.recomputed(kept, x, k)

    def cpu_layer(x, k):  # the CPU layers' 3x3 convolution, which recomputes on small maps
        return cpu_layers.conv3x3(x, k, 1)

    def cpu_layer_kept(x, k):  # the same with `cpu_recompute=False`
        return cpu_layers.conv3x3(x, k, 1, recompute_=False)

    temp = {}
    for depth in (2, 8):
        kernels = [
            jnp.asarray(0.1 * rng.normal(size=(3, 3, 32, 32)).astype(np.float32))
            for _ in range(depth)
        ]
        for conv in (kept, recomputed, cpu_layer, cpu_layer_kept):
            grad = jax.grad(functools.partial(network, conv), argnums=(0, 1))
            temp[conv, depth] = _temp_bytes(grad, kernels, x)
        g_ours = jax.jit(jax.grad(functools.partial(network, recomputed)))(kernels, x)
        g_kept = jax.jit(jax.grad(functools.partial(network, kept)))(kernels, x)
        _tree_close(g_ours, g_kept, 1e-5, 1e-5)
    # Six more layers: about six more patches arrays kept, against six more inputs (1/9).
    assert temp[kept, 8] - temp[kept, 2] > 5 * patches, temp
    assert temp[recomputed, 8] - temp[recomputed, 2] < 1.5 * patches, temp
    assert temp[recomputed, 8] < temp[kept, 8] - 3 * patches, temp
    # The CPU layer leaves its kernel untied (`untied`): that made the 2-layer buffer smaller
    # (3.08 -> 2.49 MB), the 8-layer one unchanged, so its growth is measured from lower.
    assert temp[cpu_layer, 8] - temp[cpu_layer, 2] < 2 * patches, temp
    assert temp[cpu_layer, 8] <= temp[recomputed, 8], temp
    assert temp[cpu_layer_kept, 8] - temp[cpu_layer_kept, 2] > 5 * patches, temp


@pytest.mark.parametrize("recompute_setting", [True, False])
def test_the_config_switch_reaches_every_cpu_layer(recompute_setting):
    """`cpu_recompute` picks the CPU layer set, and a config saved before the key existed
    counts as True."""
    from ctl_jax.build import build_model
    from ctl_jax.configs import load_config

    config = load_config("configs/default.py")
    config.model.arch = "resnet18"
    config.cpu_fast_path = "on"
    config.cpu_recompute = recompute_setting
    layers_used = build_model(config, 5).layers
    for name in ("stem_conv", "conv3x3", "norm"):
        assert getattr(layers_used, name).keywords["recompute"] is recompute_setting, name
    saved = ml_collections.ConfigDict(
        {key: value for key, value in config.to_dict().items() if key != "cpu_recompute"}
    )
    assert build_model(saved, 5).layers.conv3x3.keywords["recompute"] is True


def test_untied_arguments_are_not_copied():
    """`untied` leaves an argument out of the tie to the gradient: the patches path's kernel,
    read as it is by the input gradient's product, is then not copied (tied, the addition
    `after` puts on it has no loop to fuse into and becomes a kernel-sized copy)."""
    x = jnp.ones((8, 4, 2, 16), jnp.float32)
    kernel = jnp.ones((3, 3, 16, 8), jnp.float32)
    fn = functools.partial(cpu_layers._patches_conv3x3, strides=1, precision=None)

    def kernel_sized_loops(untied):
        def loss(x, k):
            return jnp.sum(jnp.sin(recompute.recomputed(fn, x, k, untied=untied)))

        text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, kernel).compile().as_text()
        shapes = ("f32[3,3,16,8]", "f32[144,8]")
        return [
            line
            for line in text.splitlines()
            if "kind=kLoop" in line and any(f"= {s}" in line for s in shapes)
        ]

    assert kernel_sized_loops(untied=()), "tied: expected the kernel's copy"
    assert not kernel_sized_loops(untied=(1,))
    grads = jax.grad(lambda x, k: jnp.sum(jnp.sin(fn(x, k))), argnums=(0, 1))(x, kernel)
    untied_grads = jax.grad(
        lambda x, k: jnp.sum(jnp.sin(recompute.recomputed(fn, x, k, untied=(1,)))), argnums=(0, 1)
    )(x, kernel)
    _tree_close(untied_grads, grads)
