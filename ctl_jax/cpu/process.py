"""Process-wide settings for running ctl_jax on CPU, applied by the command lines."""

from __future__ import annotations

import os
import sys

from ctl_jax.cpu.malloc import tune_malloc

# JAX options every command line sets. Synchronous dispatch: see `configure_process`.
JAX_SETTINGS = {"jax_cpu_enable_async_dispatch": False}


def apply_jax_settings(settings: dict, environ=None) -> None:
    """Sets JAX options now if JAX is imported, else through the environment variables JAX
    reads when it is first imported (`JAX_<OPTION>`), so that a command line that never
    needs JAX (evaluate or search on .npz files) does not import it (~1 s).

    Args:
      settings: {"jax_<option>": value} with bool, int, float or str values.
      environ: the environment to write (default `os.environ`; inherited by child
        processes, which then start with the same settings).
    """
    if "jax" in sys.modules:
        import jax

        for name, value in settings.items():
            jax.config.update(name, value)
        return
    environ = os.environ if environ is None else environ
    for name, value in settings.items():
        environ[name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)


def configure_process() -> bool:
    """Applies the allocator settings (`ctl_jax.cpu.malloc.tune_malloc`) and runs
    single-device CPU computations synchronously. Returns whether glibc took the settings.

    Call first thing, before JAX starts its thread pools and creates its CPU client (it
    reads the dispatch option when created). Synchronous dispatch runs a computation on the
    calling thread, so a training step has freed its temporary buffer when the call returns;
    dispatched asynchronously, the next step allocated its own while the last one's was still
    being freed, and the heap (never trimmed, see `malloc.py`) kept both. No effect on GPUs,
    TPUs or computations over several CPU devices. Does not import JAX (see
    `apply_jax_settings`).
    """
    tuned = tune_malloc()
    apply_jax_settings(JAX_SETTINGS)
    return tuned
