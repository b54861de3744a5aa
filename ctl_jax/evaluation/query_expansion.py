"""Alpha-weighted query expansion with database-side augmentation (alpha-QE / DBA).

As fast-reid's `aqe(query, gallery, qe_times, qe_k, alpha)` does: the queries and the
gallery items (images or centroids) form one set of N items; each item's un-normalised
embedding is replaced by

    x'(i) = (1 / k) * sum_{j in N(i, k)} max(cos(i, j), 0)^alpha * x(j)

where N(i, k) are the k items most similar to i by cosine (itself included, ties to the
lower index), and the whole is repeated `times` times, each round on the previous round's
embeddings. The neighbours come from `neighbours.nearest_neighbours` (blocked, bounded
memory), never from an (N, N) similarity matrix.

fast-reid raises a negative cosine to the power alpha, which gives a negative weight for odd
integer alpha and NaN for fractional alpha; a neighbour with a negative cosine gets weight 0
here. This differs only when an item has fewer than k neighbours with a positive cosine.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ctl_jax.errors import OptionError
from ctl_jax.evaluation.neighbours import nearest_neighbours, normalized_rows

_GATHER_BYTES = 64 * 1024 * 1024  # gathered neighbour rows per step


@dataclasses.dataclass(frozen=True)
class QueryExpansionParams:
    """Parameters of alpha-weighted query expansion.

    Attributes:
      k: neighbours averaged (the item itself included), >= 1.
      alpha: exponent of the cosine weights, >= 0 (0: plain average).
      times: rounds of expansion, >= 1.
    """

    k: int = 5
    alpha: float = 3.0
    times: int = 1

    def __post_init__(self):
        if isinstance(self.k, bool) or int(self.k) != self.k or self.k < 1:
            raise OptionError(f"--aqe_k must be an integer >= 1, got {self.k}")
        if not np.isfinite(self.alpha) or self.alpha < 0:
            raise OptionError(f"--aqe_alpha must be >= 0, got {self.alpha}")
        if isinstance(self.times, bool) or int(self.times) != self.times or self.times < 1:
            raise OptionError(f"--aqe_times must be an integer >= 1, got {self.times}")

    def as_dict(self) -> dict:
        return {"k": int(self.k), "alpha": float(self.alpha), "times": int(self.times)}


def expand_queries(
    query_emb: np.ndarray,
    gallery_emb: np.ndarray,
    params: QueryExpansionParams = QueryExpansionParams(),
) -> tuple[np.ndarray, np.ndarray]:
    """Expanded query and gallery embeddings.

    Args:
      query_emb: (Q, D) query embeddings, un-normalised.
      gallery_emb: (G, D) gallery item embeddings (images or centroids), un-normalised.
      params: k, alpha, times.

    Returns:
      (Q, D) and (G, D) float32 expanded embeddings, un-normalised.
    """
    q = np.asarray(query_emb, np.float32)
    g = np.asarray(gallery_emb, np.float32)
    features = np.concatenate([q, g])
    num, dim = features.shape
    if num == 0:
        return q, g
    k = min(int(params.k), num)
    alpha = np.float32(params.alpha)
    for _ in range(int(params.times)):
        nn = nearest_neighbours(normalized_rows(features), k)
        weights = np.maximum(nn.similarity, np.float32(0)) ** alpha  # (N, k); 0^0 = 1
        expanded = np.empty_like(features)
        step = max(1, _GATHER_BYTES // (4 * k * max(dim, 1)))
        for s in range(0, num, step):
            rows = slice(s, s + step)
            gathered = features[nn.index[rows]]  # (n, k, D)
            expanded[rows] = np.einsum("nk,nkd->nd", weights[rows], gathered) / np.float32(k)
        features = expanded
    return features[: len(q)], features[len(q) :]
