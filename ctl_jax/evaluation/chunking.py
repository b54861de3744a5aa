"""How many queries' rows of a (queries x gallery) similarity matrix to compute at once.

A chunk's matmul (rows, D) @ (D, G) reads the whole (G, D) gallery once, so a chunk of few
rows is bound by memory bandwidth rather than arithmetic: at G = 82,161 and D = 2048 on a
2-core Xeon with OpenBLAS, 64 rows ran at 172 GFLOP/s, 256 at 317 and 512 at 359, and ranking
MSMT17-size files took 1.7x less time with 256-row chunks than with the former 51 (a fixed 4M
elements). Each row costs G elements of every buffer a caller keeps per chunk, so the rows
are also bounded by the buffers' bytes.
"""

from __future__ import annotations

MIN_ROWS = 256  # below this the gallery's reading dominates the matmul
TARGET_ELEMENTS = 4 * 1024 * 1024  # small galleries: about this many (rows x G) elements
MAX_BUFFER_BYTES = 256 * 1024 * 1024  # large galleries: at most this in the chunk's buffers


def query_chunk_rows(num_gallery: int, bytes_per_element: int) -> int:
    """Rows per chunk for a gallery of ``num_gallery`` items when the caller's buffers take
    ``bytes_per_element`` bytes per (query, gallery) element; at least 1."""
    num_gallery = max(int(num_gallery), 1)
    rows = max(MIN_ROWS, TARGET_ELEMENTS // num_gallery)
    cap = MAX_BUFFER_BYTES // (num_gallery * bytes_per_element)
    return max(1, min(rows, cap))
