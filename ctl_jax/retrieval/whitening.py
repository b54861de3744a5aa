"""Whitening of retrieval embeddings, learned after training (Gordo et al. 2017; Radenović
et al. 2018), and its file format.

Embeddings are L2-normalised before a whitening is learned and before it is applied (the
descriptors of the papers are unit vectors); applying it centres, projects and L2-normalises:
y = normalise(P (normalise(x) - m)), with P of shape (d, D), d <= D.

- `learn_pca` (unsupervised, Jégou and Chum 2012 as used by Gordo et al.): m the mean, P the
  principal directions scaled by 1 / sqrt(eigenvalue), largest first.
- `learn_supervised` ("learned whitening", Mikolajczyk and Matas 2007 as used by Radenović et
  al.): P = V^T S^(-1/2), where S is the covariance of the differences of same-identity pairs
  (every unordered pair of rows with the same label >= 0), and V the principal directions of
  the embeddings after whitening by S^(-1/2) (a rotation, no second scaling). It whitens the
  intra-identity variation and then orders directions by how much the whole set varies along
  them, i.e. by how well they separate identities.

A whitening file (`.npz`) holds `format` ("ctl_jax.whitening"), `version` (1), `method`,
`mean` (D,) float32, `projection` (d, D) float32 and `num_embeddings` (learned from).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import zipfile

import numpy as np

from ctl_jax import files
from ctl_jax.errors import FileContentError, InvalidValueError, MissingFileError
from ctl_jax.retrieval.identities import folder_identities

FORMAT, VERSION = "ctl_jax.whitening", 1
METHODS = ("pca", "supervised")

# Eigenvalues below this fraction of the largest one count as zero (the data do not span
# that direction): whitening would divide by rounding noise there.
_RANK_TOLERANCE = 1e-10
_NORM_EPS = 1e-12


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows of x (N, D) scaled to unit length (zero rows stay zero)."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, _NORM_EPS)


@dataclasses.dataclass(frozen=True)
class Whitening:
    """A learned whitening: y = normalise(projection @ (normalise(x) - mean)).

    Attributes:
      method: "pca" or "supervised".
      mean: (D,) float32.
      projection: (d, D) float32, rows ordered by importance (the first k rows are the
        whitening reduced to k dimensions).
      num_embeddings: number of embeddings it was learned from.
    """

    method: str
    mean: np.ndarray
    projection: np.ndarray
    num_embeddings: int = 0

    @property
    def input_dim(self) -> int:
        return self.projection.shape[1]

    @property
    def output_dim(self) -> int:
        return self.projection.shape[0]

    def check_input_dim(self, dim: int, what: str = "the embeddings") -> None:
        """Raises InvalidValueError unless the whitening applies to `dim`-d embeddings."""
        if dim != self.input_dim:
            raise InvalidValueError(
                f"the whitening was learned on {self.input_dim}-d embeddings but {what} "
                f"gives {dim}-d ones; learn it from embeddings of the same model"
            )

    def apply(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, D) embeddings -> (N, d) float32 whitened unit vectors.

        Raises:
          InvalidValueError: the embeddings are not D-dimensional.
        """
        x = np.asarray(embeddings, np.float64)
        if x.ndim != 2:
            raise InvalidValueError(f"embeddings to whiten must be (N, D), got shape {x.shape}")
        self.check_input_dim(x.shape[1])
        y = (l2_normalise(x) - self.mean) @ self.projection.T.astype(np.float64)
        return l2_normalise(y).astype(np.float32)

    def apply_to(self, embeddings):
        """An `Embeddings` object (`ctl_jax.retrieval.embedding_file`) with whitened vectors."""
        return dataclasses.replace(embeddings, embeddings=self.apply(embeddings.embeddings))

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> pathlib.Path:
        """Writes the whitening file atomically; refuses to replace a file unless `overwrite`."""
        path = files.refuse_overwrite(path, overwrite)
        with files.atomic_open(path) as f:
            np.savez(
                f,
                format=np.array(FORMAT),
                version=np.array(VERSION),
                method=np.array(self.method),
                mean=self.mean.astype(np.float32),
                projection=self.projection.astype(np.float32),
                num_embeddings=np.array(self.num_embeddings),
            )
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Whitening:
        """Reads a whitening file; a missing (MissingFileError), unreadable or malformed
        (FileContentError) file is a one-line error naming it."""
        path = pathlib.Path(path)
        if not path.is_file():
            raise MissingFileError(f"whitening file {path} does not exist")
        # Not a zip/.npy: numpy would read it as a pickle and advise loading it unsafely.
        files.require_numpy_file(path, "whitening file")
        try:
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise FileContentError(
                    f"whitening file {path} is not a readable .npz: it holds a single array, "
                    "not the named arrays of python -m ctl_jax.whiten"
                )
            with data:
                arrays = {k: data[k] for k in data.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            if isinstance(e, FileContentError):
                raise
            raise FileContentError(f"whitening file {path} is not a readable .npz: {e}") from e
        if str(arrays.get("format", "")) != FORMAT:
            raise FileContentError(
                f"{path} is not a whitening file (no format={FORMAT!r}; create one with "
                f"python -m ctl_jax.whiten)"
            )
        if int(arrays.get("version", -1)) != VERSION:
            raise FileContentError(
                f"whitening file {path} has version {arrays.get('version')}, expected {VERSION}"
            )
        mean, projection = arrays.get("mean"), arrays.get("projection")
        if (
            mean is None
            or projection is None
            or mean.ndim != 1
            or projection.ndim != 2
            or projection.shape[1] != mean.shape[0]
            or not (np.isfinite(mean).all() and np.isfinite(projection).all())
        ):
            raise FileContentError(
                f"whitening file {path} needs finite 'mean' (D,) and 'projection' (d, D)"
            )
        return cls(
            method=str(arrays.get("method", "")),
            mean=mean.astype(np.float32),
            projection=projection.astype(np.float32),
            num_embeddings=int(arrays.get("num_embeddings", 0)),
        )


def _check_dim(dim: int | None, input_dim: int, available: int, what: str) -> int:
    """The output dimension: `dim`, or all `available` directions when None."""
    if dim is None:
        dim = min(input_dim, available)
    if not isinstance(dim, (int, np.integer)) or dim < 1:
        raise InvalidValueError(f"whitening dimension must be an integer >= 1, got {dim!r}")
    if dim > input_dim:
        raise InvalidValueError(
            f"whitening dimension {dim} is larger than the embedding dimension {input_dim}"
        )
    if dim > available:
        raise InvalidValueError(
            f"whitening dimension {dim}: {what} span only {available} dimensions; "
            f"give a dimension <= {available}"
        )
    return int(dim)


def _descending_eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors (columns) of a symmetric matrix."""
    eigval, eigvec = np.linalg.eigh((matrix + matrix.T) / 2)
    return eigval[::-1], eigvec[:, ::-1]


def _numerical_rank(eigval: np.ndarray) -> int:
    top = max(float(eigval[0]), 0.0)
    return int(np.sum(eigval > _RANK_TOLERANCE * top)) if top > 0 else 0


def _as_matrix(embeddings: np.ndarray, minimum: int) -> np.ndarray:
    x = np.asarray(embeddings, np.float64)
    if x.ndim != 2:
        raise InvalidValueError(f"embeddings must be (N, D), got shape {x.shape}")
    if len(x) < minimum:
        raise InvalidValueError(
            f"learning a whitening needs at least {minimum} embeddings, got {len(x)}"
        )
    if not np.isfinite(x).all():
        raise InvalidValueError("embeddings contain NaN or infinite values")
    return l2_normalise(x)


def learn_pca(embeddings: np.ndarray, dim: int | None = None) -> Whitening:
    """PCA whitening of (N, D) embeddings, reduced to `dim` dimensions (default: all the
    directions the centred data span, at most D, i.e. min(D, N - 1) for generic data).

    Raises:
      InvalidValueError: fewer than 2 embeddings, or `dim` < 1, > D, or more than the data span.
    """
    x = _as_matrix(embeddings, minimum=2)
    mean = x.mean(axis=0)
    centred = x - mean
    covariance = centred.T @ centred / len(x)
    eigval, eigvec = _descending_eigh(covariance)
    dim = _check_dim(dim, x.shape[1], _numerical_rank(eigval), "the centred embeddings")
    projection = eigvec[:, :dim].T / np.sqrt(eigval[:dim])[:, None]
    return Whitening("pca", mean.astype(np.float32), projection.astype(np.float32), len(x))


def same_identity_scatter(x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Sum over unordered same-label pairs {i, j} (labels >= 0) of (x_i - x_j)(x_i - x_j)^T.

    Computed per identity c without forming the pairs: n_c sum_i x_i x_i^T - s_c s_c^T, with
    s_c the sum of c's rows.

    Returns:
      ((D, D) float64 scatter, number of pairs).
    """
    labels = np.asarray(labels)
    keep = labels >= 0
    x, labels = x[keep], labels[keep]
    _, index, counts = np.unique(labels, return_inverse=True, return_counts=True)
    sums = np.zeros((len(counts), x.shape[1]))
    np.add.at(sums, index, x)
    scatter = (x * counts[index][:, None]).T @ x - sums.T @ sums
    num_pairs = int(np.sum(counts * (counts - 1) // 2))
    return scatter, num_pairs


def learn_supervised(
    embeddings: np.ndarray,
    labels: np.ndarray,
    dim: int | None = None,
    shrinkage: float = 0.0,
) -> Whitening:
    """Learned (supervised) whitening from the same-identity pairs of labelled embeddings.

    Args:
      embeddings: (N, D).
      labels: (N,) int identities; rows with label < 0 take part in the mean and the final
        rotation but in no pair.
      dim: output dimension (default D).
      shrinkage: alpha in [0, 1): the pair covariance S becomes (1 - alpha) S + alpha
        (trace(S) / D) I, which makes it invertible when the pairs do not span every
        direction (fewer pairs than dimensions).

    Raises:
      InvalidValueError: bad labels or shrinkage, no pair, a singular pair covariance (with the
        advice to set a shrinkage), or a bad `dim`.
    """
    x = _as_matrix(embeddings, minimum=2)
    labels = np.asarray(labels)
    if labels.shape != (len(x),) or not np.issubdtype(labels.dtype, np.integer):
        raise InvalidValueError(f"labels must be {len(x)} integers, got shape {labels.shape}")
    if not 0.0 <= shrinkage < 1.0:
        raise InvalidValueError(f"shrinkage must be in [0, 1), got {shrinkage}")
    scatter, num_pairs = same_identity_scatter(x, labels)
    if num_pairs == 0:
        raise InvalidValueError(
            "supervised whitening needs same-identity pairs: no identity has two embeddings"
        )
    d_in = x.shape[1]
    dim = _check_dim(dim, d_in, d_in, "the embeddings")
    pair_cov = scatter / num_pairs
    if shrinkage:
        pair_cov = (1.0 - shrinkage) * pair_cov + shrinkage * np.trace(pair_cov) / d_in * np.eye(
            d_in
        )
    eigval, eigvec = _descending_eigh(pair_cov)
    rank = _numerical_rank(eigval)
    if rank < d_in:
        raise InvalidValueError(
            f"the {num_pairs} same-identity pairs span only {rank} of the {d_in} dimensions, "
            f"so their covariance cannot be inverted; give a shrinkage (e.g. 0.1) or more pairs"
        )
    inverse_sqrt = eigvec.T / np.sqrt(eigval)[:, None]  # S^(-1/2) up to a rotation
    mean = x.mean(axis=0)
    whitened = (x - mean) @ inverse_sqrt.T
    _, rotation = _descending_eigh(whitened.T @ whitened)
    projection = rotation[:, :dim].T @ inverse_sqrt
    return Whitening("supervised", mean.astype(np.float32), projection.astype(np.float32), len(x))


def learn(
    embeddings: np.ndarray,
    method: str = "pca",
    labels: np.ndarray | None = None,
    dim: int | None = None,
    shrinkage: float = 0.0,
) -> Whitening:
    """`learn_pca` or `learn_supervised` by name (`labels` required for "supervised")."""
    if method == "pca":
        return learn_pca(embeddings, dim)
    if method == "supervised":
        if labels is None:
            raise InvalidValueError("--method=supervised needs identity labels")
        return learn_supervised(embeddings, labels, dim, shrinkage)
    raise InvalidValueError(f"whitening method {method!r} is not one of {', '.join(METHODS)}")


def identity_labels(
    pids: np.ndarray, paths: np.ndarray, source: str, root: str | None = None
) -> np.ndarray:
    """(N,) int labels from pids (`source="pids"`, -1 = unknown) or from folders
    (`source="folders"`): the first folder under `root` (default: the deepest folder the
    images share), the rule of `embed --identity=folder` (`identities.folder_identities`);
    -1 for an image directly in the root."""
    if source == "pids":
        return np.asarray(pids, np.int64)
    folders = folder_identities(paths, root)
    known = np.asarray([f is not None for f in folders], bool)
    labels = np.full(len(folders), -1, np.int64)
    if known.any():
        names = np.asarray([f for f in folders if f is not None], dtype=str)
        labels[known] = np.unique(names, return_inverse=True)[1].reshape(-1)
    return labels
