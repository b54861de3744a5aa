"""Embedding files (`.npz`, docs/formats.md, 'Embeddings .npz') and Market-style file-name parsing.

Keys: `embeddings` float32 (N, D), the BNNeck output, not normalised; `pids` int64 (N,),
-1 where unknown; `camids` int64 (N,), 0-based, -1 where unknown; `paths` unicode (N,);
`labels` unicode (N,), the identity names ("" where unknown; `ctl_jax.retrieval.labels`).
`labels` is optional on reading: files written before it existed get labels from their pids.
Files are written atomically and read with allow_pickle=False.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import pathlib
import zipfile

import numpy as np

from ctl_jax import files
from ctl_jax.data import readers
from ctl_jax.errors import FileContentError, InvalidValueError, MissingFileError
from ctl_jax.retrieval.labels import check_labels, labels_from_pids, pids_for_labels

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
      labels: (N,) unicode identity names, "" where unknown; one label per pid and one pid
        per label. None (the default) derives them from the pids ("2" for pid 2).
      model: fingerprint of the model that embedded the rows ("" when unknown).
      shard: (K, N) when the rows are the K-th (0-based) of N parts of one run, else None.
    """

    embeddings: np.ndarray
    pids: np.ndarray
    camids: np.ndarray
    paths: np.ndarray
    labels: np.ndarray | None = None
    model: str = ""
    shard: tuple[int, int] | None = None

    def __post_init__(self):
        arrays = _validated(
            {
                "embeddings": self.embeddings,
                "pids": self.pids,
                "camids": self.camids,
                "paths": self.paths,
                "labels": self.labels,
            },
            source="Embeddings",
        )
        for key, value in arrays.items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "model", str(self.model))
        if self.shard is not None:
            k, n = (int(v) for v in self.shard)
            if not 0 <= k < n:
                raise ValueError(f"Embeddings: shard must be (K, N) with 0 <= K < N, got {k}/{n}")
            object.__setattr__(self, "shard", (k, n))

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
        extra = {}
        if self.model:
            extra["model"] = np.asarray(self.model)
        if self.shard is not None:
            extra["shard"] = np.asarray(self.shard, np.int64)
        with files.atomic_open(path) as f:
            np.savez(
                f,
                embeddings=self.embeddings,
                pids=self.pids,
                camids=self.camids,
                paths=self.paths,
                labels=self.labels,
                **extra,
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
        if path.is_dir():
            raise FileContentError(
                f"embeddings file {path} is a folder, not an .npz (images are embedded with "
                "ctl_jax.embed, or search --images=FOLDER)"
            )
        if not path.is_file():
            raise MissingFileError(f"embeddings file {path} does not exist")
        files.require_numpy_file(path, "embeddings file")
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
                arrays["labels"] = data["labels"] if "labels" in data.files else None
                model = data["model"] if "model" in data.files else np.asarray("")
                shard = data["shard"] if "shard" in data.files else None
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
                raise FileContentError(f"embeddings file {path} is not a readable .npz: {e}") from e
        try:
            if model.ndim != 0 or model.dtype.kind not in "US":
                raise ValueError(f"embeddings file {path}: 'model' must be a string scalar")
            if shard is not None and (shard.shape != (2,) or shard.dtype.kind not in "iu"):
                raise ValueError(f"embeddings file {path}: 'shard' must be 2 integers [K, N]")
            return cls(
                **_validated(arrays, source=f"embeddings file {path}"),
                model=str(model),
                shard=None if shard is None else tuple(shard.tolist()),
            )
        except ValueError as e:  # arrays of the wrong shape or type: the file is at fault
            raise FileContentError(str(e)) from e

    def with_joint_pids(self, pids: np.ndarray) -> Embeddings:
        """A copy with `pids` (N,) int64 from `labels.pids_for_labels` of a label set that
        includes this file's labels (so still one pid per label), without validating the
        arrays again (a pass over the embeddings)."""
        pids = np.asarray(pids, np.int64)
        if pids.shape != self.pids.shape or not np.array_equal(pids < 0, self.pids < 0):
            raise ValueError(f"pids of shape {pids.shape} do not fit these {len(self)} rows")
        renumbered = copy.copy(self)
        object.__setattr__(renumbered, "pids", pids)
        return renumbered

    def select(self, index) -> Embeddings:
        """The rows `index` (a mask, indices or slice) as new Embeddings (same model; no
        longer a shard)."""
        return Embeddings(
            self.embeddings[index],
            self.pids[index],
            self.camids[index],
            self.paths[index],
            self.labels[index],
            model=self.model,
        )

    @classmethod
    def concatenate(cls, parts) -> Embeddings:
        """The rows of several Embeddings one after the other. The pids are renumbered from
        the labels (`labels.pids_for_labels`), since files with named identities number them
        independently. The result records the parts' model when they all share one."""
        parts = list(parts)
        dims = sorted({p.dim for p in parts if len(p)})
        if len(dims) > 1:
            raise InvalidValueError(
                f"embeddings of different dimensions cannot be joined: {dims}; embed them "
                "with the same model"
            )
        labels = np.concatenate([p.labels for p in parts]).astype(str)
        return cls(
            np.concatenate([p.embeddings for p in parts]).reshape(-1, dims[0] if dims else 0),
            pids_for_labels(labels),
            np.concatenate([p.camids for p in parts]),
            np.concatenate([p.paths for p in parts]).astype(str),
            labels,
            model=parts[0].model if len({p.model for p in parts}) == 1 else "",
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
    labels = arrays.get("labels")
    out["labels"] = (
        labels_from_pids(out["pids"])
        if labels is None
        else check_labels(labels, out["pids"], source)
    )
    lengths = {k: len(v) for k, v in out.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{source}: arrays differ in length: {lengths}")
    if not np.isfinite(out["embeddings"]).all():
        bad = int((~np.isfinite(out["embeddings"])).any(axis=1).sum())
        raise ValueError(f"{source}: 'embeddings' has NaN or infinite values in {bad} row(s)")
    return out
