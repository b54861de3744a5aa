"""The training step compiled ahead of time, before the train state exists.

Why before: compiling a ResNet step takes XLA's CPU compiler 0.6-1 GB of working memory
(LLVM modules of several hundred kernels). Compiled on the first call, as `jax.jit` does,
that memory comes on top of the train state (0.3 GB of ResNet-50 weights and Adam moments)
and of what initialising the state left in the heap, and the process's peak RSS is the
compilation's, not the steps'. Compiled from the abstract state (shapes, dtypes, shardings:
`jax.eval_shape` of the state's initialiser) and the batch's spec
(`ctl_jax.data.pipeline.train_batch_spec`), the compilation runs while the process holds only
its libraries.

Why reloaded (single-process CPU runs): the executable a fresh compilation returns keeps the
compiler's by-products alive with it (about 210 MB for ResNet-50 128x64 against 107 MB for
the same executable deserialised), and JAX's in-memory caches keep a second reference to it.
So the executable is serialised, JAX's caches are cleared and it is loaded back; the program
is the same machine code (docs/performance.md has the measurements). A process that loaded
the step from the persistent compilation cache already holds the deserialised form and
keeps it.
"""

from __future__ import annotations

import gc

import jax

from ctl_jax.cpu.malloc import release_free_memory

# What JAX records when `compile()` read the program from the persistent compilation cache.
_CACHE_HIT = "/jax/compilation_cache/cache_hits"


def abstract_like(tree, sharding):
    """`jax.ShapeDtypeStruct`s of `tree`'s leaves (arrays or abstract values) on `sharding`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def compile_ahead(jitted, state_spec, batch_spec):
    """Compiles `jitted(state, batch)` for these abstract arguments.

    Args:
      jitted: the `jax.jit`-wrapped training step (shardings and donation set).
      state_spec: pytree of `jax.ShapeDtypeStruct` of the train state (`abstract_like`).
      batch_spec: dict of `jax.ShapeDtypeStruct` of a global batch.

    Returns:
      The compiled step, called as `step(state, batch)`; it rejects arguments whose shapes
      or dtypes differ from the specs (a `TypeError` naming them), never recompiles.
    """
    hits = []

    def listen(event: str, **_kwargs) -> None:
        if event == _CACHE_HIT:
            hits.append(event)

    jax.monitoring.register_event_listener(listen)
    try:
        compiled = jitted.lower(state_spec, batch_spec).compile()
    finally:
        jax.monitoring.unregister_event_listener(listen)
    # An executable read from the persistent compilation cache is already a deserialised
    # one, and serialising it again loses kernels in jaxlib 0.10 (the reloaded program fails
    # with "Function ... not found"): only fresh compilations are reloaded.
    if hits or not _reloadable():
        release_compiler_memory()
        return compiled
    # Serialised, the fresh executable dropped (JAX's caches hold it too), the memory
    # released, then the copy loaded: the same program without the compiler's by-products.
    # Imported here: an experimental module, used only on this path.
    from jax.experimental import serialize_executable

    # Loaded onto the devices it was compiled for (by default it would be all of them).
    devices = compiled.runtime_executable().local_devices()
    payload, in_tree, out_tree = serialize_executable.serialize(compiled)
    del compiled
    release_compiler_memory()
    loaded = serialize_executable.deserialize_and_load(
        payload, in_tree, out_tree, execution_devices=devices
    )
    del payload
    release_free_memory()  # what loading used on the way
    return loaded


def release_compiler_memory() -> None:
    """Drops JAX's in-memory caches of compiled programs (what is still in use is held by its
    user) and returns the heap's free pages to the kernel: after one-off compilations, such
    as the step's and the state initialiser's, whose working memory the heap would otherwise
    keep (trimming is off, see ctl_jax/cpu/malloc.py)."""
    jax.clear_caches()
    gc.collect()
    release_free_memory()


def _reloadable() -> bool:
    """Single-process runs on CPU devices only: on accelerators the compiler's memory is the
    host's, not the devices', and a multi-process executable is loaded by every process."""
    return jax.process_count() == 1 and all(d.platform == "cpu" for d in jax.devices())
