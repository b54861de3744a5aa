"""Process-wide settings for running ctl_jax on CPU, applied by the command lines."""

from __future__ import annotations

import jax

from ctl_jax.cpu.malloc import tune_malloc


def configure_process() -> bool:
    """Applies the allocator settings (`ctl_jax.cpu.malloc.tune_malloc`) and runs
    single-device CPU computations synchronously. Returns whether glibc took the settings.

    Call first thing, before JAX starts its thread pools and creates its CPU client (it
    reads the dispatch option when created). Synchronous dispatch runs a computation on the
    calling thread, so a training step has freed its temporary buffer when the call returns;
    dispatched asynchronously, the next step allocated its own while the last one's was still
    being freed, and the heap (never trimmed, see `malloc.py`) kept both. No effect on GPUs,
    TPUs or computations over several CPU devices.
    """
    tuned = tune_malloc()
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return tuned
