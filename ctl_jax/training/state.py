"""The train state: a plain pytree of arrays, nothing static, so it can be donated to the
jitted step, sharded, and saved/restored by orbax as is."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import optax

from ctl_jax.checkpoints.variables import model_variables


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training.

    Attributes:
      step: int32 scalar, number of optimisation steps taken.
      epoch: int32 scalar, the current 0-based epoch; the learning rate is a function of it.
      params: model parameters (float32).
      batch_stats: batch-norm running statistics.
      opt_state: optax state of the model optimiser (Adam moments).
      centers: (num_classes, D) float32 center-loss centers, updated by their own SGD.
    """

    step: jax.Array
    epoch: jax.Array
    params: flax.core.FrozenDict | dict
    batch_stats: flax.core.FrozenDict | dict
    opt_state: optax.OptState
    centers: jax.Array


def create_train_state(
    variables: dict, tx: optax.GradientTransformation, num_classes: int, feature_dim: int, rng
) -> TrainState:
    """Builds the initial state from model variables.

    Args:
      variables: {"params": ..., "batch_stats": ...} from `model.init` or a checkpoint.
      tx: the model optimiser (see `optimizer.make_optimizer`).
      num_classes: number of training identities (rows of `centers`).
      feature_dim: D, the dimension of the pooled features the center loss acts on.
      rng: PRNG key for the centers, which start N(0, 1) as in the original.
    """
    variables = model_variables(variables)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        epoch=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(params),
        centers=jax.random.normal(rng, (num_classes, feature_dim), jnp.float32),
    )
