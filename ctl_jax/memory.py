"""The memory this machine can still give, and a one-line refusal before an allocation that
would not fit (instead of the kernel killing the process part-way through)."""

from __future__ import annotations

from ctl_jax.errors import OptionError

MEMINFO = "/proc/meminfo"


def available_bytes(meminfo: str | None = None) -> int | None:
    """`MemAvailable` of /proc/meminfo (or `meminfo`) in bytes (what can be allocated
    without swapping), or None where the file or the field does not exist (not Linux)."""
    meminfo = meminfo or MEMINFO
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the value is in kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def require_memory(estimate: int, what: str, advice: str, meminfo: str | None = None) -> None:
    """Raises `OptionError` when `estimate` bytes exceed the available memory.

    Args:
      estimate: bytes the next step will allocate (an upper bound).
      what: the step, e.g. "re-ranking 9000 items with --rerank_k1=200".
      advice: what to change, e.g. "lower --rerank_k1".
      meminfo: the file to read (default `MEMINFO`, read at call time: tests set it).
    """
    meminfo = meminfo or MEMINFO
    available = available_bytes(meminfo)
    if available is not None and estimate > available:
        raise OptionError(
            f"{what} needs about {_gb(estimate)} of memory, more than the {_gb(available)} "
            f"available (MemAvailable in {meminfo}): {advice}"
        )


def _gb(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.1f} GB"
