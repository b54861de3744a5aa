"""Checkpoints of a work directory: saving and reading them (`CheckpointStore`), and
rebuilding a model from one (`restore_model`).

Below training, evaluation, embedding and search, which all read checkpoints; only training
writes the train state and its resume position.
"""

from ctl_jax.checkpoints.restore import RestoredModel, restore_model
from ctl_jax.checkpoints.store import CheckpointError, CheckpointStore
from ctl_jax.checkpoints.variables import model_variables

__all__ = [
    "CheckpointError",
    "CheckpointStore",
    "RestoredModel",
    "model_variables",
    "restore_model",
]
