"""The model variables, `{"params", "batch_stats"}`, of a train state or checkpoint state.

The one place that knows which parts of a train state the model itself needs
(`model.apply(variables, images, train=False)`): the rest, optimiser moments, centers, step
and epoch, serves only training.
"""

from __future__ import annotations

from collections.abc import Mapping


def model_variables(source) -> dict:
    """`{"params": ..., "batch_stats": ...}` of a train state or a variables mapping.

    Args:
      source: a `TrainState` (anything with `params` and `batch_stats` attributes), or a
        mapping holding "params" and optionally "batch_stats": the output of `model.init`,
        a checkpoint's state from `CheckpointStore.restore_raw`, or variables already.
        Other entries (optimiser state, centers, step) are left out.

    Returns:
      A new dict; "batch_stats" is {} when the source has none.
    """
    if isinstance(source, Mapping):
        return {"params": source["params"], "batch_stats": source.get("batch_stats", {})}
    return {"params": source.params, "batch_stats": source.batch_stats}
