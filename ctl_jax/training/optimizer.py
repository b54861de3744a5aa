"""The optimiser and learning-rate schedule (docs/method.md, 'Optimiser and schedule').

Adam with *L2* weight decay (PyTorch `torch.optim.Adam(weight_decay=...)` semantics: the decay
term is added to the gradient before the moment estimates, unlike AdamW), and a learning rate
that is a function of the epoch, not of the step: the original steps its scheduler once per
epoch, and with the no-resampling sampler the number of steps per epoch varies a little, so a
step-based schedule could not reproduce it.

Two further choices serve recipes from other codebases (TransReID's ViT recipe): SGD with
momentum (`solver.optimizer = "sgd"`, PyTorch's `torch.optim.SGD(momentum=..., weight_decay=...)`:
the L2 term added to the gradient, then the momentum buffer m = momentum * m + g) and a cosine
schedule (`solver.schedule = "cosine"`). Configs without these keys are Adam with step decay.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ctl_jax.errors import ConfigError

OPTIMIZERS = ("adam", "amsgrad", "sgd")
SCHEDULES = ("step", "cosine")


def learning_rate(epoch, solver_cfg):
    """Learning rate for a (0-based) epoch: linear warm-up, then step or cosine decay.

    step (default): lr = base * min(1, (epoch + 1) / warmup_epochs) * gamma ** (number of
    milestones <= epoch).
    cosine: lr = base * min(1, (epoch + 1) / warmup_epochs) * (f + (1 - f) * (1 + cos(pi *
    epoch / num_epochs)) / 2), f = `min_lr_factor` (timm's epoch-wise CosineLRScheduler,
    whose cosine also counts the warm-up epochs, with ctl_jax's warm-up ramp).

    Args:
      epoch: int or int array (any shape), 0-based epoch index.
      solver_cfg: config with `base_lr`, `warmup_epochs`, `milestones`, `gamma`; for the
        cosine schedule `schedule`, `num_epochs` and `min_lr_factor`.

    Returns:
      float32 array of the same shape as `epoch`.
    """
    epoch = jnp.asarray(epoch, jnp.float32)
    warmup = max(int(solver_cfg.warmup_epochs), 0)
    factor = jnp.minimum(1.0, (epoch + 1.0) / warmup) if warmup > 0 else jnp.ones_like(epoch)
    schedule = solver_cfg.get("schedule", "step")
    if schedule not in SCHEDULES:
        raise ConfigError(
            f"config solver.schedule: expected one of {', '.join(SCHEDULES)}, got {schedule!r}"
        )
    if schedule == "cosine":
        floor = float(solver_cfg.get("min_lr_factor", 0.0))
        progress = epoch / max(int(solver_cfg.num_epochs), 1)
        decay = floor + (1.0 - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return (solver_cfg.base_lr * factor * decay).astype(jnp.float32)
    milestones = jnp.asarray(tuple(solver_cfg.milestones) or (jnp.inf,), jnp.float32)
    num_decays = jnp.sum(epoch[..., None] >= milestones, axis=-1)
    return (solver_cfg.base_lr * factor * solver_cfg.gamma**num_decays).astype(jnp.float32)


def make_optimizer(solver_cfg) -> optax.GradientTransformation:
    """Adam (or AMSGrad, `solver.optimizer = "amsgrad"`, or SGD with momentum, "sgd") + L2
    decay *without* the learning-rate scaling.

    The returned transformation produces the update direction; the train step multiplies it
    by `-learning_rate(epoch)` itself because the learning rate depends on the epoch held in
    the train state rather than on optax's step counter.
    """
    name = solver_cfg.get("optimizer", "adam")
    if name not in OPTIMIZERS:
        raise ConfigError(
            f"config solver.optimizer: expected one of {', '.join(OPTIMIZERS)}, got {name!r}"
        )
    if name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(solver_cfg.weight_decay),
            optax.trace(decay=float(solver_cfg.momentum), nesterov=False),
        )
    if name == "amsgrad":  # torchreid's OSNet recipe: torch.optim.Adam(amsgrad=True)
        return optax.chain(
            optax.add_decayed_weights(solver_cfg.weight_decay),
            scale_by_torch_amsgrad(solver_cfg.beta1, solver_cfg.beta2, solver_cfg.eps),
        )
    return optax.chain(
        optax.add_decayed_weights(solver_cfg.weight_decay),
        optax.scale_by_adam(b1=solver_cfg.beta1, b2=solver_cfg.beta2, eps=solver_cfg.eps),
    )


class AmsgradState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    nu_max: optax.Updates


def scale_by_torch_amsgrad(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """AMSGrad as `torch.optim.Adam(amsgrad=True)` computes it: the running maximum is taken
    of the *uncorrected* second moment and bias-corrected afterwards, direction =
    (mu / (1 - b1^t)) / (sqrt(max nu) / sqrt(1 - b2^t) + eps). (optax's `scale_by_amsgrad`
    keeps the maximum of the corrected moments, which differs in the first steps.)"""

    def init(params):
        # Three separate trees: the train state is donated to the step, and one buffer may
        # not be donated twice.
        def zeros():
            return jax.tree.map(jnp.zeros_like, params)

        return AmsgradState(jnp.zeros((), jnp.int32), zeros(), zeros(), zeros())

    def update(updates, state, params=None):
        del params
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
        nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu)
        t = count.astype(jnp.float32)
        c1, c2 = 1 - b1**t, 1 - b2**t
        direction = jax.tree.map(
            lambda m, v: (m / c1) / (jnp.sqrt(v) / jnp.sqrt(c2) + eps), mu, nu_max
        )
        return direction, AmsgradState(count, mu, nu, nu_max)

    return optax.GradientTransformation(init, update)
