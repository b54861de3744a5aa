"""The allocator settings the command lines apply (`ctl_jax.cpu.malloc`)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# In a fresh interpreter: apply the settings, allocate a 64 MB block and ask glibc
# (mallinfo2) how many more blocks it now serves with mmap. By default a block that large is mmapped
# (and unmapped again on free); tuned, it comes from the heap, where it is reused. Then free a
# 3 GB block (never touched, so it costs no memory) and check that the heap keeps it: with a
# trim threshold, even 2^31 - 1, glibc handed it back to the kernel, and a ResNet-50 256x128
# step page-faulted its whole working set in again.
_PROBE = """
import ctypes
import numpy as np
from ctl_jax.cpu.malloc import tune_malloc

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
tuned = tune_malloc()
before = libc.mallinfo2().hblks  # numpy's import leaves a few
block = np.ones(1 << 24, np.float32)
mmapped = libc.mallinfo2().hblks - before
big = np.empty(3 << 30, np.uint8)
heap = libc.mallinfo2().arena
del big
print(tuned, mmapped, libc.mallinfo2().arena >= heap)
"""


def _probe(env_value):
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("CTL_JAX_TUNE_MALLOC", None)
    if env_value is not None:
        env["CTL_JAX_TUNE_MALLOC"] = env_value
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True
    )
    tuned, mmapped_blocks, heap_kept = out.stdout.split()
    return tuned == "True", int(mmapped_blocks), heap_kept == "True"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_malloc_keeps_large_blocks_on_the_heap_and_can_be_switched_off():
    assert _probe(None) == (True, 0, True)
    tuned, mmapped_blocks, _ = _probe("0")
    assert not tuned
    assert mmapped_blocks == 1  # glibc's default: the 64 MB block is mmapped


# Tuned: touch a 256 MB block, free it (it stays resident: nothing is trimmed), then release.
_RELEASE_PROBE = """
import resource
import numpy as np
from ctl_jax.cpu.malloc import release_free_memory, tune_malloc

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20

assert tune_malloc()
block = np.ones(1 << 26, np.float32)
with_block = rss_mb()
del block
freed = rss_mb()
released = release_free_memory()
print(with_block, freed, rss_mb(), released)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_free_memory_hands_the_tuned_heaps_free_pages_back():
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("CTL_JAX_TUNE_MALLOC", None)
    out = subprocess.run(
        [sys.executable, "-c", _RELEASE_PROBE], env=env, capture_output=True, text=True, check=True
    )
    with_block, freed, after, released = out.stdout.split()
    assert float(freed) > float(with_block) - 16  # kept: trimming is off
    assert float(after) < float(freed) - 200  # 256 MB handed back
    assert released == "True"
