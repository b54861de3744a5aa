"""The CPU fast path: layers and process settings that make ctl_jax fast on XLA's CPU backend.

The model itself (`ctl_jax.models`) is plain Flax and knows nothing of this package. What
is here only changes how the same computation runs:

- `CPU_LAYERS` (`layers.py`): a layer set with the reference layers' parameters, computing
  the same values and gradients up to float rounding (convolutions as matrix products or by
  Winograd, kernel gradients as matrix products, the batch norm's one-pass moments and
  hand-written backward pass, the max pool's backward pass), whose backward passes recompute
  their elementwise intermediates instead of keeping them (`recompute.py`: half the step's
  temporary buffer at ResNet-50).
- `model_layers(setting, dtype, platform)`: the one place that picks the layer set, from
  the config's `cpu_fast_path` ("auto": the CPU layers on the CPU backend in float32, the
  reference layers elsewhere; "on"; "off"), `cpu_recompute` (recompute or keep the
  backward passes' intermediates) and `cpu_winograd_tile` (Winograd F(4x4, 3x3) on large
  maps, or F(2x2, 3x3) only). `ctl_jax.build.build_model` calls it.
- `configure_process()` (`process.py`): glibc allocator settings (`malloc.py`) and
  synchronous CPU dispatch, which every command line applies first.

docs/performance.md has the measurements behind each choice.

JAX and the layers are imported on first use (module `__getattr__`), so that a command line
that never runs a model (`evaluate`/`search` on .npz files) can apply the process settings
without importing JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ctl_jax.errors import ConfigError

if TYPE_CHECKING:
    from ctl_jax.models.layers import Layers

SETTINGS = ("auto", "on", "off")

_LAZY = {
    "CPU_LAYERS": "ctl_jax.cpu.layers",
    "cpu_layers": "ctl_jax.cpu.layers",
    "configure_process": "ctl_jax.cpu.process",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ctl_jax.cpu' has no attribute {name!r}")


def use_cpu_layers(setting: str, dtype: str, platform: str | None = None) -> bool:
    """Whether `model_layers` picks the CPU layers.

    Args:
      setting: the config's `cpu_fast_path`: "auto", "on" or "off".
      dtype: the model's compute dtype (the config's `model.dtype`, e.g. "float32").
      platform: the platform the model will run on ("cpu", "cuda", "rocm", "tpu"); default
        JAX's default backend.
    """
    if setting not in SETTINGS:
        raise ConfigError(
            f"config cpu_fast_path: expected one of {', '.join(SETTINGS)}, got {setting!r}"
        )
    if setting != "auto":
        return setting == "on"
    import jax
    import jax.numpy as jnp

    platform = platform if platform is not None else jax.default_backend()
    return platform == "cpu" and jnp.dtype(dtype) == jnp.float32


def model_layers(
    setting: str,
    dtype: str,
    platform: str | None = None,
    recompute: bool = True,
    winograd_tile: int = 4,
) -> Layers:
    """The CPU layers (`cpu_layers(recompute, winograd_tile)`, see there) or
    `REFERENCE_LAYERS`, see `use_cpu_layers`."""
    from ctl_jax.cpu.layers import CPU_LAYERS, cpu_layers
    from ctl_jax.models.layers import REFERENCE_LAYERS

    if not use_cpu_layers(setting, dtype, platform):
        return REFERENCE_LAYERS
    if recompute and winograd_tile == 4:
        return CPU_LAYERS
    return cpu_layers(recompute=recompute, winograd_tile=winograd_tile)


__all__ = [
    "CPU_LAYERS",
    "SETTINGS",
    "configure_process",
    "cpu_layers",
    "model_layers",
    "use_cpu_layers",
]
