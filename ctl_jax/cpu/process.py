"""Process-wide settings for running ctl_jax on CPU, applied by the command lines."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

from ctl_jax.cpu.malloc import tune_malloc

# JAX options every command line sets. Synchronous dispatch: see `configure_process`.
JAX_SETTINGS = {"jax_cpu_enable_async_dispatch": False}


def apply_jax_settings(settings: dict) -> None:
    """Sets JAX options now if JAX is imported, else right after it is first imported, so
    that a command line that never needs JAX (evaluate or search on .npz files) does not
    import it (~1 s). JAX reads its options' environment variables only for some options
    (not `jax_cpu_enable_async_dispatch`), hence the import hook.

    Args:
      settings: {"jax_<option>": value}; later calls add to or override earlier ones.
    """
    if "jax" in sys.modules:
        import jax

        for name, value in settings.items():
            jax.config.update(name, value)
        return
    _PENDING.update(settings)
    if not any(isinstance(f, _AfterJaxImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterJaxImport())


_PENDING: dict = {}


class _AfterJaxImport(importlib.abc.MetaPathFinder):
    """Finds `jax` through the other finders and applies `_PENDING` once its module has
    run (removes itself on first use)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "jax":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_configure(module):
            exec_module(module)
            for name, value in _PENDING.items():
                module.config.update(name, value)
            _PENDING.clear()

        spec.loader.exec_module = exec_and_configure
        return spec


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
