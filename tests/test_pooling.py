"""Global pooling (ctl_jax/models/pooling.py) against loop-based NumPy references written from
the papers: GeM (Radenović et al., TPAMI 2018) and R-MAC (Tolias et al., ICLR 2016, with the
region grid of their reference code); the pooling switch of the re-ID model, its learnable
GeM exponent, and loading a model saved before the switch existed."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctl_jax import configs
from ctl_jax.build import build_model
from ctl_jax.checkpoints import CheckpointStore, restore_model
from ctl_jax.errors import ConfigError, InvalidValueError
from ctl_jax.models import pooling
from ctl_jax.models.reid import init_variables

# ---------------------------------------------------------------------------------------------
# NumPy references: explicit loops over images, channels and regions, float64
# ---------------------------------------------------------------------------------------------


def ref_gem(x, p, eps=1e-6):
    n, h, w, c = x.shape
    out = np.zeros((n, c))
    for i in range(n):
        for k in range(c):
            total = 0.0
            for r in range(h):
                for s in range(w):
                    total += max(float(x[i, r, s, k]), eps) ** p
            out[i, k] = (total / (h * w)) ** (1.0 / p)
    return out


def ref_region_grid(h, w, levels):
    """R-MAC regions (top, left, side) as Tolias et al.'s code lays them out: squares of side
    floor(2 min(H, W) / (l + 1)) at level l, l + extra of them along the long side, extra in
    1..6 chosen for an overlap closest to 40% (computed in float32, as there)."""
    f32 = np.float32
    short, long = min(h, w), max(h, w)
    best, extra = None, 0
    for k, steps in enumerate([2, 3, 4, 5, 6, 7]):
        b = f32(long - short) / (f32(steps) - f32(1))
        error = abs((f32(short * short) - f32(short) * b) / f32(short * short) - f32(0.4))
        if best is None or error < best:
            best, extra = error, k + 1
    regions = []
    for level in range(1, levels + 1):
        side = math.floor(2 * short / (level + 1))
        if side == 0:
            continue
        half = math.floor(side / 2 - 1)
        starts = []
        for length, extra_here in ((h, extra if h > w else 0), (w, extra if w > h else 0)):
            count = level + extra_here
            b = 0.0 if count == 1 else (length - side) / (count - 1)
            starts.append(
                [int(math.floor(f32(half) + f32(i) * f32(b))) - half for i in range(count)]
            )
        for top in starts[0]:
            for left in starts[1]:
                regions.append((top, left, side))
    return regions


def ref_rmac(x, levels, eps=1e-6):
    n, h, w, c = x.shape
    out = np.zeros((n, c))
    windows = [(0, 0, h, w)] + [(t, left, s, s) for t, left, s in ref_region_grid(h, w, levels)]
    for i in range(n):
        for top, left, rows, cols in windows:
            v = np.full(c, -np.inf)
            for r in range(top, top + rows):
                for s in range(left, left + cols):
                    v = np.maximum(v, x[i, r, s].astype(np.float64))
            out[i] += v / (np.sqrt(np.sum(v * v)) + eps)
    return out


# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1.0, 3.0, 6.5])
def test_gem_matches_reference_and_limits(p):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 4, 6)).astype(np.float32)  # negatives: clamped to eps
    got = np.asarray(jax.jit(pooling.gem, static_argnums=1)(jnp.asarray(x), p))
    np.testing.assert_allclose(got, ref_gem(x, p), rtol=1e-5, atol=1e-6)
    # A traced exponent (the learnable p) gives the same values.
    traced = np.asarray(jax.jit(pooling.gem)(jnp.asarray(x), jnp.float32(p)))
    np.testing.assert_allclose(traced, got, rtol=1e-5)


def test_gem_between_average_and_max():
    x = jnp.asarray(np.random.default_rng(1).uniform(0.1, 1.0, (2, 4, 3, 5)), jnp.float32)
    np.testing.assert_allclose(pooling.gem(x, 1.0), pooling.avg(x), rtol=1e-5)
    assert (pooling.gem(x, 3.0) > pooling.avg(x)).all()
    assert (pooling.gem(x, 3.0) < pooling.mac(x)).all()
    np.testing.assert_allclose(pooling.gem(x, 200.0), pooling.mac(x), rtol=2e-2)


def test_gem_gradient_in_p_is_finite_and_matches_finite_differences():
    x = jnp.asarray(np.random.default_rng(2).uniform(0.0, 2.0, (2, 3, 3, 4)), jnp.float32)
    x = x.at[0, 0, 0].set(0.0)  # zero activations: the clamp keeps log finite

    def total(p):
        return jnp.sum(pooling.gem(x, p))

    grad = float(jax.grad(total)(jnp.float32(3.0)))
    h = 1e-2
    numeric = (float(total(3.0 + h)) - float(total(3.0 - h))) / (2 * h)
    assert math.isfinite(grad)
    assert grad == pytest.approx(numeric, rel=1e-2)


def test_rmac_region_grid_of_a_tall_map():
    # 16 x 8, 3 levels: 3 regions along the long side at level 1 (overlap closest to 40%:
    # 2 extra), side 8, 5, 4.
    regions = pooling.rmac_regions(16, 8, 3)
    want = [(t, 0, 8) for t in (0, 4, 8)]
    want += [(t, left, 5) for t in (0, 3, 7, 11) for left in (0, 3)]
    want += [(t, left, 4) for t in (0, 3, 6, 9, 12) for left in (0, 2, 4)]
    assert list(regions) == want
    transposed = sorted(pooling.rmac_regions(8, 16, 3))
    assert transposed == sorted((left, t, s) for t, left, s in want)
    # A square map: no extra regions, l x l regions at level l.
    assert len(pooling.rmac_regions(12, 12, 3)) == 1 + 4 + 9


SHAPES = [(7, 7), (16, 8), (8, 16), (9, 5), (5, 13), (24, 10), (3, 3), (2, 1), (1, 4), (1, 1)]


@pytest.mark.parametrize("shape", SHAPES)
def test_rmac_regions_match_reference_and_stay_inside(shape):
    h, w = shape
    for levels in (1, 2, 3, 4):
        regions = pooling.rmac_regions(h, w, levels)
        assert list(regions) == ref_region_grid(h, w, levels)
        for top, left, side in regions:
            assert 0 <= top and top + side <= h and 0 <= left and left + side <= w


def test_rmac_regions_match_reference_on_every_small_map():
    for h in range(1, 41):
        for w in range(1, 41):
            assert list(pooling.rmac_regions(h, w, 3)) == ref_region_grid(h, w, 3), (h, w)


@pytest.mark.parametrize("shape", SHAPES)
def test_rmac_matches_reference(shape):
    h, w = shape
    rng = np.random.default_rng(h * 100 + w)
    x = rng.uniform(0.0, 1.0, (3, h, w, 6)).astype(np.float32)
    x[1] = 0.0  # an all-zero map (a padded image after the ReLU)
    for levels in (1, 3):
        got = np.asarray(jax.jit(pooling.rmac, static_argnums=1)(jnp.asarray(x), levels))
        np.testing.assert_allclose(got, ref_rmac(x, levels), rtol=1e-5, atol=1e-5)


def test_mac_value_and_gradient_at_one_position():
    x = np.random.default_rng(5).normal(size=(2, 3, 4, 5)).astype(np.float32)
    x[1, :, :, 0] = 1.0  # a tie: the whole map of one channel
    np.testing.assert_array_equal(pooling.mac(jnp.asarray(x)), x.max(axis=(1, 2)))
    grad = np.asarray(jax.grad(lambda v: jnp.sum(pooling.mac(v)))(jnp.asarray(x)))
    assert (grad.sum(axis=(1, 2)) == 1.0).all() and set(np.unique(grad)) == {0.0, 1.0}
    flat = x.reshape(2, 12, 5)
    want = np.zeros_like(flat)
    for i in range(2):
        for k in range(5):
            want[i, int(np.argmax(flat[i, :, k])), k] = 1.0
    np.testing.assert_array_equal(grad, want.reshape(x.shape))
    # The same under jit (as in the training step), weighted per channel.
    weights = jnp.arange(1.0, 6.0)
    jitted = jax.jit(jax.grad(lambda v: jnp.sum(pooling.mac(v) * weights)))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(jitted), want.reshape(x.shape) * np.arange(1, 6))


def test_mac_gradient_matches_finite_differences():
    # Distinct values (no ties): MAC is differentiable and its gradient is the exact one.
    x = np.random.default_rng(8).permutation(2 * 3 * 2 * 4).reshape(2, 3, 2, 4) / 10.0
    weights = np.random.default_rng(9).normal(size=4)

    def objective(v):
        return jnp.sum(pooling.mac(v) @ weights)

    grad = np.asarray(jax.jit(jax.grad(objective))(jnp.asarray(x, jnp.float32)))
    numeric = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[index] += 1e-3
        down[index] -= 1e-3
        numeric[index] = (
            (up.max(axis=(1, 2)) @ weights).sum() - (down.max(axis=(1, 2)) @ weights).sum()
        ) / 2e-3
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-5)


def test_rmac_gradient_is_finite_on_zero_regions():
    x = jnp.zeros((2, 4, 3, 5)).at[0, 0, 0].set(1.0)
    grad = jax.grad(lambda v: jnp.sum(pooling.rmac(v, 3) ** 2))(x)
    assert np.isfinite(np.asarray(grad)).all()


@pytest.mark.parametrize("shape", [(8, 4), (4, 8), (7, 7), (2, 1)])
def test_rmac_gradient_under_jit_matches_finite_differences(shape):
    # Regions wider than one cell go through the sliding-window max, whose gradient must
    # linearise under jit (the training step differentiates it there).
    h, w = shape
    x = np.random.default_rng(6).uniform(0.0, 1.0, (2, h, w, 3)).astype(np.float32)
    weights = np.random.default_rng(7).normal(size=3)

    def objective(v):
        return jnp.sum(pooling.rmac(v, 3) @ weights)

    grad = np.asarray(jax.jit(jax.grad(objective))(jnp.asarray(x)))
    numeric = np.zeros_like(x, np.float64)
    step = 1e-4
    for index in np.ndindex(x.shape):
        up, down = x.astype(np.float64), x.astype(np.float64)
        up[index] += step
        down[index] -= step
        numeric[index] = (ref_rmac(up, 3) @ weights - ref_rmac(down, 3) @ weights).sum() / (
            2 * step
        )
    np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-3)


def test_bad_pooling_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="model.pooling='mean' is not one of avg, max, gem, rmac"):
        pooling.check_pooling("mean")
    with pytest.raises(ConfigError, match=r"model.gem_p must be > 0 for GeM pooling, got 0"):
        pooling.check_pooling("gem", gem_p=0)
    with pytest.raises(ConfigError, match="model.rmac_levels must be an integer >= 1, got 0"):
        pooling.check_pooling("rmac", rmac_levels=0)
    with pytest.raises(InvalidValueError, match="GeM exponent p must be > 0"):
        pooling.gem(jnp.ones((1, 2, 2, 1)), -1.0)
    with pytest.raises(InvalidValueError, match="R-MAC levels must be >= 1"):
        pooling.rmac_regions(4, 4, 0)


# ---------------------------------------------------------------------------------------------
# The re-ID model
# ---------------------------------------------------------------------------------------------

H, W, K = 64, 32, 5


def _config(**model):
    config = configs.load_config("configs/default.py")
    config.data.height, config.data.width = H, W
    for key, value in model.items():
        setattr(config.model, key, value)
    return config


def test_model_pooling_switch_and_learnable_p():
    images = jnp.asarray(np.random.default_rng(3).normal(size=(2, H, W, 3)), jnp.float32)
    config = _config(pooling="gem", gem_p=4.0, gem_learnable=True)
    model = build_model(config, K)
    variables = init_variables(model, jax.random.key(0), (H, W, 3))
    assert variables["params"]["pooling"]["p"].shape == (1,)
    assert float(variables["params"]["pooling"]["p"][0]) == 4.0

    fixed = build_model(_config(pooling="gem", gem_p=4.0), K)
    assert "pooling" not in init_variables(fixed, jax.random.key(0), (H, W, 3))["params"]
    # Same features as GeM applied to the backbone's map by hand; the fixed-p model agrees.
    out = model.apply(variables, images, train=False, capture_intermediates=True)
    fmap = out[1]["intermediates"]["backbone"]["__call__"][0]
    np.testing.assert_allclose(
        out[0]["features"], pooling.gem(fmap.astype(jnp.float32), 4.0), rtol=1e-5
    )
    np.testing.assert_allclose(
        fixed.apply(variables, images, train=False)["features"], out[0]["features"], rtol=1e-6
    )
    # p is a trained parameter: the loss has a gradient with respect to it.
    grads = jax.grad(
        lambda params: jnp.sum(
            model.apply({**variables, "params": params}, images, train=False)["features"]
        )
    )(variables["params"])
    assert float(jnp.abs(grads["pooling"]["p"][0])) > 0


def test_model_rejects_bad_pooling_config():
    with pytest.raises(ConfigError, match="model.pooling='sum'"):
        build_model(_config(pooling="sum"), K)
    with pytest.raises(ConfigError, match="model.gem_p must be > 0"):
        build_model(_config(pooling="gem", gem_p=-2.0), K)
    with pytest.raises(ConfigError, match="model.rmac_levels must be an integer >= 1"):
        build_model(_config(pooling="rmac", rmac_levels=0), K)


def test_learnable_gem_checkpoint_and_a_config_saved_before_pooling_existed(tmp_path):
    images = jnp.asarray(np.random.default_rng(4).normal(size=(2, H, W, 3)), jnp.float32)
    config = _config(pooling="gem", gem_learnable=True)
    model = build_model(config, K)
    variables = init_variables(model, jax.random.key(0), (H, W, 3))
    variables["params"]["pooling"]["p"] = jnp.asarray([4.5], jnp.float32)
    meta = {"config": json.loads(configs.config_to_json(config)), "num_classes": K}
    store = CheckpointStore(tmp_path / "gem")
    store.save(0, variables, {"epoch": 0}, meta)
    store.close()
    restored = restore_model(tmp_path / "gem")
    want = model.apply(variables, images, train=False)["bn_features"]
    got = restored.model.apply(restored.variables, images, train=False)["bn_features"]
    np.testing.assert_allclose(got, want, rtol=1e-6)

    # A config.json written before model.pooling existed: average pooling, no mismatch.
    old = json.loads(configs.config_to_json(_config()))
    for key in ("pooling", "gem_p", "gem_learnable", "rmac_levels"):
        del old["model"][key]
    for key in ("metric", "classifier", "scale", "classifier_margin", "easy_margin"):
        del old["loss"][key]
    current = json.loads(configs.config_to_json(_config()))
    assert configs.identity_differences(old, current) == []
    avg_model = build_model(_config(), K)
    avg_vars = init_variables(avg_model, jax.random.key(0), (H, W, 3))
    store = CheckpointStore(tmp_path / "old")
    store.save(0, avg_vars, {"epoch": 0}, {"config": old, "num_classes": K})
    store.close()
    restored = restore_model(tmp_path / "old")
    assert restored.model.pooling == "avg" and restored.model.classifier == "softmax"
    np.testing.assert_allclose(
        restored.model.apply(restored.variables, images, train=False)["bn_features"],
        avg_model.apply(avg_vars, images, train=False)["bn_features"],
        rtol=1e-6,
    )
    # ...and a real change is still reported.
    gem = json.loads(configs.config_to_json(_config(pooling="gem")))
    assert configs.identity_differences(old, gem) == ["model.pooling: saved 'avg', now 'gem'"]
