"""The retrieval heads inside training: the pooling, classifier and metric-loss switches keep
one compiled step, the learnable GeM exponent trains, the margin head's loss is the one of
ctl_jax/margin_losses.py, and bad settings are one-line errors before anything compiles.
Also the configs that use them."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctl_jax import losses, margin_losses, parallel
from ctl_jax.build import build_model
from ctl_jax.configs import load_config
from ctl_jax.errors import ConfigError
from ctl_jax.models.reid import feature_dim, init_variables
from ctl_jax.training.optimizer import make_optimizer
from ctl_jax.training.state import create_train_state
from ctl_jax.training.step import compute_losses, make_train_step

P, M, H, W, K = 4, 4, 32, 16, 10


def _config(**changes):
    config = load_config("configs/default.py")
    config.data.height, config.data.width = H, W
    config.data.num_identities, config.data.num_instances = P, M
    for dotted, value in changes.items():
        group, key = dotted.split("__")
        setattr(config[group], key, value)
    return config


def _batch(seed, num_padded, height=H, width=W):
    rng = np.random.default_rng(seed)
    labels = np.repeat(rng.choice(K, P, replace=False), M).astype(np.int32)
    valid = np.ones(P * M, bool)
    valid[P * M - num_padded :] = False
    images = rng.normal(size=(P * M, height, width, 3)).astype(np.float32)
    images[~valid] = 0.0
    return {"images": images, "labels": labels, "valid": valid}


@pytest.mark.parametrize(
    "changes",
    [
        {"model__pooling": "gem", "model__gem_learnable": True, "loss__classifier": "arcface"},
        # 64x32 images: a 4x2 feature map, whose R-MAC regions span more than one cell.
        {
            "model__pooling": "rmac",
            "loss__classifier": "cosface",
            "loss__metric": "contrastive",
            "data__height": 64,
            "data__width": 32,
        },
    ],
    ids=["gem_arcface", "rmac_cosface_contrastive"],
)
def test_switches_keep_one_compiled_step_and_train(changes):
    config = _config(**changes)
    mesh = parallel.make_mesh(1)
    model = build_model(config, K)
    tx = make_optimizer(config.solver)
    height, width = config.data.height, config.data.width
    variables = init_variables(model, jax.random.key(0), (height, width, 3))
    state = create_train_state(variables, tx, K, feature_dim(config.model.arch), jax.random.key(1))
    state = parallel.replicate(state, mesh)
    step = jax.jit(
        make_train_step(model, tx, config),
        in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
        out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)),
    )
    p0 = np.asarray(state.params["pooling"]["p"]) if "pooling" in state.params else None
    for i in range(3):
        state = state.replace(epoch=parallel.replicate(jnp.int32(i), mesh))
        batch = _batch(i, num_padded=i, height=height, width=width)
        state, metrics = step(state, parallel.put_batch(batch, mesh))
    assert step._cache_size() == 1
    metrics = jax.device_get(metrics)
    assert all(math.isfinite(float(v)) for v in metrics.values())
    assert ("contrastive_loss" in metrics) == (config.loss.metric == "contrastive")
    assert ("triplet_loss" in metrics) == (config.loss.metric == "triplet")
    if p0 is not None:  # the learnable GeM exponent is trained
        assert not np.allclose(np.asarray(state.params["pooling"]["p"]), p0)


def test_margin_head_loss_is_the_margin_cross_entropy():
    config = _config(loss__classifier="arcface", loss__scale=20.0, loss__classifier_margin=0.3)
    rng = np.random.default_rng(0)
    n, d = P * M, 6
    cosine = jnp.asarray(rng.uniform(-0.9, 0.9, (n, K)), jnp.float32)
    outputs = {"features": jnp.asarray(rng.normal(size=(n, d)), jnp.float32), "logits": cosine}
    batch = _batch(0, num_padded=2)
    centers = jnp.zeros((K, d))
    total, metrics = compute_losses(outputs, batch, centers, config.loss, M)
    want = losses.cross_entropy_label_smooth(
        margin_losses.margin_logits(cosine, batch["labels"], "arcface", 20.0, 0.3),
        batch["labels"],
        batch["valid"],
        epsilon=config.loss.label_smoothing,
    )
    assert float(metrics["ce_loss"]) == pytest.approx(float(want), rel=1e-6)
    softmax = _config()
    _, plain = compute_losses(outputs, batch, centers, softmax.loss, M)
    assert float(plain["ce_loss"]) != pytest.approx(float(want), rel=1e-3)


def test_bad_head_settings_fail_before_compiling():
    def step_for(**changes):
        config = _config(**changes)
        model = build_model(config, K)
        return make_train_step(model, make_optimizer(config.solver), config)

    with pytest.raises(ConfigError, match="loss.metric='quadruplet' is not one of"):
        step_for(loss__metric="quadruplet")
    with pytest.raises(ConfigError, match="contrastive loss has no soft margin"):
        step_for(loss__metric="contrastive", loss__soft_margin=True)
    with pytest.raises(ConfigError, match=r"classifier_margin must be in \[0, pi/2\) for arcface"):
        step_for(loss__classifier="arcface", loss__classifier_margin=2.0)
    with pytest.raises(ConfigError, match="loss.classifier='sphereface'"):
        step_for(loss__classifier="sphereface")
    config = _config(loss__classifier="cosface")
    softmax_model = build_model(_config(), K)
    with pytest.raises(ValueError, match="needs the model built with that head"):
        make_train_step(softmax_model, make_optimizer(config.solver), config)


def test_configs_and_variants():
    names = {}
    for variant in ("gem", "max", "rmac", "cosface", "arcface", "contrastive"):
        config = load_config(f"configs/default.py:{variant}")
        names[variant] = config.name
        base = load_config("configs/default.py")
        differences = {
            f"{group}.{key}"
            for group in ("model", "loss")
            for key in base[group]
            if base[group][key] != config[group][key]
        }
        assert differences and differences <= {
            "model.pooling",
            "model.gem_learnable",
            "loss.classifier",
            "loss.metric",
        }
    assert names["gem"] == "default_gem" and names["arcface"] == "default_arcface"
    assert load_config("configs/default.py:gem").model.gem_learnable
    with pytest.raises(ConfigError, match="config variant must be one of"):
        load_config("configs/default.py:sphereface")

    ours = load_config("configs/gem_arcface_market1501.py")
    market = load_config("configs/market1501.py")
    assert (ours.model.pooling, ours.loss.classifier) == ("gem", "arcface")
    assert ours.loss.centroid_weight == market.loss.centroid_weight > 0
    assert ours.data.to_dict() == market.data.to_dict()

    landmarks = load_config("configs/rmac_landmarks.py")
    assert landmarks.data.name == "folder" and landmarks.model.arch == "resnet101"
    assert landmarks.model.pooling == "rmac" and landmarks.loss.metric == "triplet"
    assert landmarks.loss.ce_weight == landmarks.loss.centroid_weight == 0.0
    # Both build (no compilation), with the head they train.
    for config in (ours, landmarks):
        model = build_model(config, 7)
        assert model.pooling == config.model.pooling
        assert model.classifier == config.loss.classifier
