"""Shared pytest set-up: several virtual CPU devices and a persistent compilation cache.

Both must be configured before jax initialises its backends, hence at import time here.
"""

import os
import pathlib

from xla_flags import xla_flags

# Four virtual CPU devices for the sharding tests; unoptimised code (see xla_flags.py).
os.environ.setdefault("XLA_FLAGS", xla_flags(4))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

_CACHE = os.environ.get(
    "CTL_JAX_COMPILATION_CACHE",
    str(pathlib.Path(__file__).resolve().parents[1] / ".cache" / "jax"),
)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
