"""Embedding files (`.npz`, docs/formats.md, 'Embeddings .npz') and Market-style file-name parsing.

Keys: `embeddings` float32 (N, D), the BNNeck output, not normalised; `pids` int64 (N,),
-1 where unknown; `camids` int64 (N,), 0-based, -1 where unknown; `paths` unicode (N,).
Files are written atomically and read with allow_pickle=False.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import zipfile

import numpy as np

from ctl_jax import files
from ctl_jax.data import readers
from ctl_jax.errors import FileContentError, MissingFileError

REQUIRED_KEYS = ("embeddings", "pids", "camids", "paths")


def parse_market_name(filename: str | os.PathLike) -> tuple[int, int]:
    """(pid, 0-based camid) from a Market-1501 / DukeMTMC-style name like `0002_c1s1_...jpg`;
    (-1, -1), the embeddings file's "unknown", when it does not match."""
    return readers.parse_market_name(filename) or (-1, -1)


@dataclasses.dataclass(frozen=True)
class Embeddings:
    """Embeddings of N images with their identities, cameras and paths.

    Attributes:
      embeddings: (N, D) float32, not normalised.
      pids: (N,) int64, -1 where unknown.
      camids: (N,) int64, 0-based, -1 where unknown.
      paths: (N,) unicode.
    """

    embeddings: np.ndarray
    pids: np.ndarray
    camids: np.ndarray
    paths: np.ndarray

    def __post_init__(self):
        arrays = _validated(
            {
                "embeddings": self.embeddings,
                "pids": self.pids,
                "camids": self.camids,
                "paths": self.paths,
            },
            source="Embeddings",
        )
        for key, value in arrays.items():
            object.__setattr__(self, key, value)

    def __len__(self) -> int:
        return len(self.pids)

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> pathlib.Path:
        """Writes the file atomically (exactly at `path`, no suffix added).

        Raises:
          FileExistsError: `path` exists and `overwrite` is False.
        """
        path = files.refuse_overwrite(path, overwrite)
        with files.atomic_open(path) as f:
            np.savez(
                f, embeddings=self.embeddings, pids=self.pids, camids=self.camids, paths=self.paths
            )
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Embeddings:
        """Reads and validates an embeddings file.

        Raises:
          MissingFileError: no such file (a FileNotFoundError).
          FileContentError: not a readable .npz, missing keys, or invalid arrays (a
            ValueError); the message names the file and the problem.
        """
        path = pathlib.Path(path)
        if not path.is_file():
            raise MissingFileError(f"embeddings file {path} does not exist")
        try:
            data = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise FileContentError(f"embeddings file {path} is not a readable .npz: {e}") from e
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise FileContentError(
                f"embeddings file {path} is not a readable .npz: it holds a single array, "
                f"not the named arrays {list(REQUIRED_KEYS)}"
            )
        with data:
            missing = [k for k in REQUIRED_KEYS if k not in data.files]
            if missing:
                raise FileContentError(
                    f"embeddings file {path} is missing key(s) {missing} "
                    f"(it has {sorted(data.files)}; needs {list(REQUIRED_KEYS)})"
                )
            try:
                arrays = {k: data[k] for k in REQUIRED_KEYS}
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
                raise FileContentError(f"embeddings file {path} is not a readable .npz: {e}") from e
        try:
            return cls(**_validated(arrays, source=f"embeddings file {path}"))
        except ValueError as e:  # arrays of the wrong shape or type: the file is at fault
            raise FileContentError(str(e)) from e

    def select(self, index) -> Embeddings:
        """The rows `index` (a mask, indices or slice) as new Embeddings."""
        return Embeddings(
            self.embeddings[index], self.pids[index], self.camids[index], self.paths[index]
        )


def _validated(arrays: dict, source: str) -> dict:
    """Checks shapes, dtypes and finiteness; returns the arrays in their canonical dtypes."""
    emb = np.asarray(arrays["embeddings"])
    if emb.ndim != 2:
        raise ValueError(f"{source}: 'embeddings' must be 2-D (N, D), got shape {emb.shape}")
    if not np.issubdtype(emb.dtype, np.floating):
        raise ValueError(f"{source}: 'embeddings' must be floating point, got {emb.dtype}")
    out = {"embeddings": emb.astype(np.float32, copy=False)}
    for key in ("pids", "camids"):
        value = np.asarray(arrays[key])
        if value.ndim != 1:
            raise ValueError(f"{source}: '{key}' must be 1-D, got shape {value.shape}")
        if value.size and not np.issubdtype(value.dtype, np.integer):
            raise ValueError(f"{source}: '{key}' must be integers, got {value.dtype}")
        out[key] = value.astype(np.int64, copy=False)
    paths = np.asarray(arrays["paths"])
    if paths.ndim != 1:
        raise ValueError(f"{source}: 'paths' must be 1-D, got shape {paths.shape}")
    if paths.size and paths.dtype.kind not in "US":
        raise ValueError(f"{source}: 'paths' must be strings, got {paths.dtype}")
    out["paths"] = paths.astype(str)
    lengths = {k: len(v) for k, v in out.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{source}: arrays differ in length: {lengths}")
    if not np.isfinite(out["embeddings"]).all():
        bad = int((~np.isfinite(out["embeddings"])).any(axis=1).sum())
        raise ValueError(f"{source}: 'embeddings' has NaN or infinite values in {bad} row(s)")
    return out
