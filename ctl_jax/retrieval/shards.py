"""Embedding a gallery in parts on many machines, and joining the parts.

`python -m ctl_jax.embed ... --shard=K/N` embeds the K-th (0-based) of N parts of the images:
the sorted image list cut into N contiguous runs whose lengths differ by at most one
(`shard_range`). Identities are assigned from the whole list before it is cut, so a label
means the same identity in every part. `merge` joins the part files in shard order and
renumbers the pids from the joint labels, which gives the file one process would have
written, row for row. `load_joined` reads one embeddings file or joins several
(`search --gallery=a.npz,b.npz`, `evaluate --gallery=...`).
"""

from __future__ import annotations

import os
import re

import numpy as np

from ctl_jax.errors import FileContentError, OptionError
from ctl_jax.retrieval.embedding_file import Embeddings

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(value: str | None, flag: str = "--shard") -> tuple[int, int] | None:
    """`"K/N"` (0 <= K < N) -> (K, N); None or "" -> None. Raises OptionError."""
    if not value:
        return None
    match = _SHARD.match(value)
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise OptionError(
            f"{flag}={value}: expected K/N with 0 <= K < N (K 0-based, e.g. --shard=0/4 .. "
            "--shard=3/4)"
        )
    return int(match.group(1)), int(match.group(2))


def shard_range(num_items: int, shard: tuple[int, int]) -> slice:
    """The rows of part K of N over `num_items` sorted items: contiguous, in order, sizes
    differing by at most one, together every item exactly once."""
    k, n = shard
    return slice(k * num_items // n, (k + 1) * num_items // n)


def split_paths(spec: str) -> list[str]:
    """`"a.npz,b.npz"` -> ["a.npz", "b.npz"] (spaces around commas ignored)."""
    return [p.strip() for p in str(spec).split(",") if p.strip()]


def load_joined(spec: str | os.PathLike) -> Embeddings:
    """One embeddings file, or the files of a comma-separated list joined by `merge`."""
    paths = split_paths(os.fspath(spec))
    if len(paths) == 1:
        return Embeddings.load(paths[0])
    return merge(paths)


def merge(paths) -> Embeddings:
    """Joins embeddings files (see the module docstring).

    The files must come from one model (the same `model` fingerprint, and all with one or
    all without) and one dimension, and share no image path. When every file is a shard of
    the same N-part run, all N parts must be there; they are joined in shard order whatever
    the order given. Otherwise the files are joined in the order given.

    Raises:
      OptionError: fewer than two files, or a file given twice.
      FileContentError: a file is unreadable, or the files do not fit together (the
        message names the files and what differs).
    """
    paths = [os.fspath(p) for p in paths]
    if len(paths) < 2:
        raise OptionError(f"merging needs at least two embeddings files, got {paths}")
    repeated = sorted({p for p in paths if paths.count(p) > 1})
    if repeated:
        raise OptionError(f"embeddings file(s) given twice: {', '.join(repeated)}")
    parts = [Embeddings.load(p) for p in paths]
    named = list(zip(paths, parts))
    _check_same(named, lambda e: e.model or "no model recorded", "the model")
    _check_same([(n, p) for n, p in named if len(p)], lambda e: e.dim, "the dimension")
    shards = [p.shard for p in parts]
    if all(s is not None for s in shards):
        _check_same(named, lambda e: e.shard[1], "the number of shards N")
        total = shards[0][1]
        by_index = {}
        for path, shard in zip(paths, shards):
            if shard[0] in by_index:
                raise FileContentError(
                    f"{by_index[shard[0]]} and {path} are both shard {shard[0]}/{total}"
                )
            by_index[shard[0]] = path
        missing = sorted(set(range(total)) - set(by_index))
        if missing:
            raise FileContentError(
                f"shard(s) {', '.join(f'{k}/{total}' for k in missing)} missing: "
                f"{len(paths)} of {total} given"
            )
        order = sorted(range(len(parts)), key=lambda i: shards[i][0])
        paths, parts = [paths[i] for i in order], [parts[i] for i in order]
    _check_no_shared_paths(paths, parts)
    return Embeddings.concatenate(parts)


def _check_same(named, value, what) -> None:
    """One-line error when `value(part)` differs between the (path, part) pairs `named`."""
    values = [value(part) for _, part in named]
    for (path, _), v in zip(named, values):
        if v != values[0]:
            raise FileContentError(
                f"embeddings files differ in {what}: {named[0][0]} has {values[0]}, {path} has "
                f"{v}; they cannot be joined (embed every part with the same model and options)"
            )


def _check_no_shared_paths(paths, parts) -> None:
    """One-line error naming two files that hold the same image path."""
    all_paths = np.concatenate([p.paths for p in parts]).astype(str)
    owner = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
    order = np.argsort(all_paths, kind="stable")
    same = np.flatnonzero(all_paths[order][1:] == all_paths[order][:-1])
    if len(same):
        a, b = order[same[0]], order[same[0] + 1]
        where = (
            f"{paths[owner[a]]} and {paths[owner[b]]}"
            if owner[a] != owner[b]
            else f"{paths[owner[a]]} (twice)"
        )
        raise FileContentError(
            f"image {all_paths[a]} is in {where} ({len(same)} path(s) shared); shards of one "
            "run never overlap: were two runs mixed, or one part given twice?"
        )
