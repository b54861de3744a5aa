"""The allocator settings the command lines apply (`ctl_jax.malloc`)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# In a fresh interpreter: apply the settings, allocate a 64 MB block and ask glibc
# (mallinfo2) how many more blocks it now serves with mmap. By default a block that large is mmapped
# (and unmapped again on free); tuned, it comes from the heap, where it is reused.
_PROBE = """
import ctypes
import numpy as np
from ctl_jax.malloc import tune_malloc

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
tuned = tune_malloc()
before = libc.mallinfo2().hblks  # numpy's import leaves a few
block = np.ones(1 << 24, np.float32)
print(tuned, libc.mallinfo2().hblks - before)
"""


def _probe(env_value):
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("CTL_JAX_TUNE_MALLOC", None)
    if env_value is not None:
        env["CTL_JAX_TUNE_MALLOC"] = env_value
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True
    )
    tuned, mmapped_blocks = out.stdout.split()
    return tuned == "True", int(mmapped_blocks)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_malloc_keeps_large_blocks_on_the_heap_and_can_be_switched_off():
    assert _probe(None) == (True, 0)
    tuned, mmapped_blocks = _probe("0")
    assert not tuned
    assert mmapped_blocks == 1  # glibc's default: the 64 MB block is mmapped
