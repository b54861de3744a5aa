"""The model a config describes, with the layers this process should run it with.

Every application builds its model here (training, restoring a checkpoint, weight
conversion, the benchmarks): `ctl_jax.models` defines the model from a layer set, and
`ctl_jax.cpu.model_layers` picks the set from the config's `cpu_fast_path`.
"""

from __future__ import annotations

from typing import Any

from ctl_jax import cpu
from ctl_jax.models.reid import ReidModel, model_from_config


def build_model(
    config: Any,
    num_classes: int,
    *,
    cpu_fast_path: str | None = None,
    platform: str | None = None,
) -> ReidModel:
    """Builds the `ReidModel` of `config.model` with the layer set for `platform`, and the
    classifier head `config.loss.classifier` ("softmax" when the config has no such key).

    Args:
      config: a full config (`configs/*.py`, or the `config.json` of a work directory; one
        saved before `cpu_fast_path` existed counts as "auto" (and before `cpu_recompute`
        as True, before `cpu_winograd_tile` as 2), one saved before the pooling
        and classifier settings as average pooling and a linear classifier).
      num_classes: number of training identities (classifier width).
      cpu_fast_path: overrides `config.cpu_fast_path` ("auto", "on" or "off") when given.
      platform: where the model will run; default JAX's default backend.
    """
    setting = cpu_fast_path or config.get("cpu_fast_path", None) or "auto"
    recompute = bool(config.get("cpu_recompute", True))
    winograd_tile = config.get("cpu_winograd_tile", 2)
    layers = cpu.model_layers(setting, config.model.dtype, platform, recompute, winograd_tile)
    loss = config.get("loss", None)
    classifier = loss.get("classifier", "softmax") if loss is not None else "softmax"
    return model_from_config(config.model, num_classes, layers, classifier=classifier)
