"""The optimiser and learning-rate schedule (docs/method.md, 'Optimiser and schedule').

Adam with *L2* weight decay (PyTorch `torch.optim.Adam(weight_decay=...)` semantics: the decay
term is added to the gradient before the moment estimates, unlike AdamW), and a learning rate
that is a function of the epoch, not of the step: the original steps its scheduler once per
epoch, and with the no-resampling sampler the number of steps per epoch varies a little, so a
step-based schedule could not reproduce it.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax


def learning_rate(epoch, solver_cfg):
    """Learning rate for a (0-based) epoch: linear warm-up, then step decay.

    lr = base * min(1, (epoch + 1) / warmup_epochs) * gamma ** (number of milestones <= epoch).

    Args:
      epoch: int or int array (any shape), 0-based epoch index.
      solver_cfg: config with `base_lr`, `warmup_epochs`, `milestones`, `gamma`.

    Returns:
      float32 array of the same shape as `epoch`.
    """
    epoch = jnp.asarray(epoch, jnp.float32)
    warmup = max(int(solver_cfg.warmup_epochs), 0)
    factor = jnp.minimum(1.0, (epoch + 1.0) / warmup) if warmup > 0 else jnp.ones_like(epoch)
    milestones = jnp.asarray(tuple(solver_cfg.milestones) or (jnp.inf,), jnp.float32)
    num_decays = jnp.sum(epoch[..., None] >= milestones, axis=-1)
    return (solver_cfg.base_lr * factor * solver_cfg.gamma**num_decays).astype(jnp.float32)


def make_optimizer(solver_cfg) -> optax.GradientTransformation:
    """Adam + L2 decay *without* the learning-rate scaling.

    The returned transformation produces the Adam direction; the train step multiplies it by
    `-learning_rate(epoch)` itself because the learning rate depends on the epoch held in the
    train state rather than on optax's step counter.
    """
    return optax.chain(
        optax.add_decayed_weights(solver_cfg.weight_decay),
        optax.scale_by_adam(b1=solver_cfg.beta1, b2=solver_cfg.beta2, eps=solver_cfg.eps),
    )
