"""glibc allocator settings that make XLA's CPU runtime reuse memory between steps.

XLA's CPU runtime allocates each execution's temporary buffer (hundreds of MB for a ResNet-50
step) and its output buffers afresh. glibc serves such large blocks from thread arenas with
`mmap` and unmaps them on free, so every step page-faults its whole working set back in. One
arena, no mmap and no trimming make glibc reuse the blocks instead. Trimming must be off
altogether, not just above a large threshold (mallopt takes a C int, so at most 2^31 - 1): a
large step frees more than 2 GiB at the top of the heap, which glibc would then return to the
kernel every step. The price is that the process keeps its peak heap (RSS does not shrink
after a step), which a training or embedding process does not need anyway.

The command lines apply `tune_malloc()` first thing (`ctl_jax.cpu.configure_process`); set
`CTL_JAX_TUNE_MALLOC=0` to leave glibc's defaults alone. Because nothing is trimmed, memory
freed once and not needed again (the compiler's working memory, an evaluation's buffers)
would stay resident; the training loop hands it back with `release_free_memory()` at those
points. docs/performance.md has the measurements.
"""

from __future__ import annotations

import ctypes
import os

ENV = "CTL_JAX_TUNE_MALLOC"

# mallopt parameter numbers, from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def tune_malloc() -> bool:
    """Applies the settings above; True if glibc accepted them all (False elsewhere: musl,
    macOS, Windows, or `CTL_JAX_TUNE_MALLOC=0`).

    Call before JAX (or torch) starts its thread pools: arenas that already exist stay.
    """
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_ARENA_MAX, 1) == 1
    ok &= mallopt(_M_MMAP_MAX, 0) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, -1) == 1  # -1: never trim (glibc's malloc.c)
    return bool(ok)


def release_free_memory() -> bool:
    """Returns the heap's free pages to the kernel (glibc's `malloc_trim(0)`, which also
    releases free pages in the middle of the heap, not just at its top). False where there is
    no glibc. Pages used again later are faulted back in once, so call it after one-off work,
    not between steps.
    """
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False
