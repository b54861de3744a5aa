"""The CPU layers' stem max-pool (custom backward pass) against the reference layers'
`flax.linen.max_pool` (values and gradients, ties included), on even and odd map sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctl_jax.cpu import CPU_LAYERS
from ctl_jax.models import resnet
from ctl_jax.models.layers import REFERENCE_LAYERS

POOLS = {True: CPU_LAYERS.max_pool, False: REFERENCE_LAYERS.max_pool}


@pytest.mark.parametrize("shape", [(2, 8, 6, 3), (2, 7, 5, 4), (1, 3, 2, 2), (2, 16, 9, 5)])
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_values_and_gradients_match_flax(shape, ties):
    rng = np.random.default_rng(sum(shape))
    x = rng.normal(size=shape).astype(np.float32)
    if ties:  # after a ReLU many window entries are equal zeros
        x = np.maximum(x, 0.0)
        x[:, ::2, ::2, :] = 0.0
    x = jnp.asarray(x)
    weights = jnp.asarray(rng.normal(size=POOLS[False](x).shape))

    def loss(fast, inputs):
        return jnp.sum(POOLS[fast](inputs) * weights)

    np.testing.assert_array_equal(POOLS[True](x), POOLS[False](x))
    g_fast = jax.grad(loss, argnums=1)(True, x)
    g_ref = jax.grad(loss, argnums=1)(False, x)
    np.testing.assert_allclose(g_fast, g_ref, rtol=1e-6, atol=1e-6)


def test_max_pool_gradient_under_jit_and_in_the_model():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 16, 3)).astype(np.float32))
    fast = resnet.ResNet18(layers=CPU_LAYERS)
    slow = resnet.ResNet18(layers=REFERENCE_LAYERS)
    variables = fast.init(jax.random.key(0), x, train=False)

    def loss(model, params):
        y = model.apply({**variables, "params": params}, x, train=False)
        return jnp.sum(jnp.sin(y))

    g_fast = jax.jit(jax.grad(lambda p: loss(fast, p)))(variables["params"])
    g_slow = jax.jit(jax.grad(lambda p: loss(slow, p)))(variables["params"])
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_slow)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("explicit", [False, True])
def test_max_pool_gradient_with_the_batch_sharded(explicit):
    """The phase reshapes must keep working when the batch axis is sharded, with the mesh's
    axis type Auto (as the trainer builds it) or Explicit (`jax.make_mesh`'s default)."""
    kind = jax.sharding.AxisType.Explicit if explicit else jax.sharding.AxisType.Auto
    mesh = jax.make_mesh((len(jax.devices()),), ("data",), axis_types=(kind,))
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(8, 9, 6, 3)).astype(np.float32))
    weights = jnp.asarray(rng.normal(size=(8, 5, 3, 3)).astype(np.float32))
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

    def loss(fast, inputs, w):
        return jnp.sum(POOLS[fast](inputs) * w)

    g_ref = jax.grad(loss, argnums=1)(False, x, weights)
    g_sharded = jax.jit(jax.grad(loss, argnums=1), static_argnums=0)(
        True, jax.device_put(x, shard), jax.device_put(weights, shard)
    )
    np.testing.assert_allclose(np.asarray(g_sharded), np.asarray(g_ref), rtol=1e-6, atol=1e-6)
