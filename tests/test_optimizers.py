"""The recipe optimisers and the cosine schedule against PyTorch's optimisers and a loop.

SGD with momentum and AMSGrad (`solver.optimizer`), applied as the train step applies them
(the optax direction times -learning_rate), follow `torch.optim.SGD(momentum=...,
weight_decay=...)` and `torch.optim.Adam(amsgrad=True, weight_decay=...)` step for step on
the same gradients; the cosine schedule follows its formula evaluated in plain Python.
"""

import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ctl_jax.errors import ConfigError
from ctl_jax.training.optimizer import learning_rate, make_optimizer

torch = pytest.importorskip("torch")


def _solver(**overrides):
    solver = ml_collections.ConfigDict(
        {
            "optimizer": "adam",
            "momentum": 0.9,
            "schedule": "step",
            "min_lr_factor": 0.0,
            "base_lr": 0.01,
            "weight_decay": 1e-3,
            "beta1": 0.9,
            "beta2": 0.999,
            "eps": 1e-8,
            "warmup_epochs": 0,
            "milestones": (),
            "gamma": 0.1,
            "num_epochs": 10,
        }
    )
    solver.update(overrides)
    return solver


@pytest.mark.parametrize("name", ["sgd", "amsgrad"])
def test_optimizer_steps_like_pytorch(name):
    solver = _solver(optimizer=name)
    rng = np.random.default_rng(0)
    start = rng.standard_normal(6).astype(np.float32)
    # Gradients that shrink and grow, so that AMSGrad's running maximum matters.
    grads = [rng.standard_normal(6).astype(np.float32) * s for s in (3.0, 0.1, 2.0, 0.05, 1.0)]
    param = torch.tensor(start, requires_grad=True)
    if name == "sgd":
        opt = torch.optim.SGD([param], lr=0.01, momentum=0.9, weight_decay=1e-3)
    else:
        opt = torch.optim.Adam([param], lr=0.01, weight_decay=1e-3, amsgrad=True, eps=1e-8)
    tx = make_optimizer(solver)
    ours = jnp.asarray(start)
    state = tx.init(ours)
    for g in grads:
        param.grad = torch.from_numpy(g.copy())
        opt.step()
        direction, state = tx.update(jnp.asarray(g), state, ours)
        ours = ours - 0.01 * direction
        np.testing.assert_allclose(np.asarray(ours), param.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_cosine_schedule_follows_its_formula():
    solver = _solver(schedule="cosine", warmup_epochs=3, min_lr_factor=0.002, num_epochs=120)
    for epoch in (0, 1, 2, 3, 50, 119):
        warm = min(1.0, (epoch + 1) / 3)
        cosine = 0.002 + (1 - 0.002) * 0.5 * (1 + math.cos(math.pi * epoch / 120))
        expected = 0.01 * warm * cosine
        assert float(learning_rate(epoch, solver)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("key", "value"), [("optimizer", "lamb"), ("schedule", "linear")])
def test_unknown_optimizer_or_schedule_is_a_config_error(key, value):
    solver = _solver(**{key: value})
    with pytest.raises(ConfigError, match=f"solver.{key}"):
        make_optimizer(solver) if key == "optimizer" else learning_rate(0, solver)


@pytest.mark.parametrize("name", ["adam", "sgd", "amsgrad"])
def test_optimizer_state_can_be_donated(name):
    """The train step donates the train state: no two leaves of the optimiser state may
    share a buffer (XLA refuses to donate one buffer twice)."""
    import jax

    params = {"a": jnp.ones((3,)), "b": jnp.ones((2, 2))}
    state = make_optimizer(_solver(optimizer=name)).init(params)
    bump = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
    jax.block_until_ready(bump(state))
