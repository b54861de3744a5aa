"""Losses of the CTL model: batch-hard triplet, centroid triplet, center, label-smoothing CE,
and the contrastive loss (an alternative to the triplet loss).

Every loss is a pure function of arrays over a P x M training batch (docs/method.md, 'The P x M
sampler'): rows ``p*M .. p*M+M-1`` belong to identity ``p``, and identities with fewer than M
images are padded at the end of their group with rows marked ``valid=False``. Invalid rows take
part in no loss, no mining and no centroid, and neither their embeddings nor their labels can
change a loss value or a gradient with respect to valid rows (deviation from the original code,
which fed a zero image for them and let it be mined). All functions are jit-able, work in
float32 whatever the input dtype, and give finite values and gradients for any finite valid
input, including zero distances (duplicated rows).

Static arguments under ``jax.jit``: ``distance`` and ``num_instances``. ``margin`` may be traced
(a float margin does not force a recompilation); ``margin=None`` selects the soft margin.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ctl_jax.errors import ConfigError

DISTANCES = ("euclidean", "cosine")

# Lower clamp of squared Euclidean distances, as in the original `euclidean_dist`: keeps sqrt
# (and its gradient) finite when two embeddings coincide.
_SQ_DIST_MIN = 1e-12
# Lower clamp of L2 norms in the cosine distance, so that a zero embedding stays finite.
_NORM_EPS = 1e-8


def _check_distance(distance: str) -> None:
    if distance not in DISTANCES:
        raise ConfigError(f"unknown distance {distance!r}; expected one of {DISTANCES}")


def _pairwise_distance(x: jax.Array, distance: str) -> jax.Array:
    """Distances between all rows of ``x`` (N, D) -> (N, N), float32."""
    if distance == "euclidean":
        sq_norm = jnp.sum(x * x, axis=-1)
        sq_dist = sq_norm[:, None] + sq_norm[None, :] - 2.0 * (x @ x.T)
        return jnp.sqrt(jnp.maximum(sq_dist, _SQ_DIST_MIN))
    # Clamping the squared norm (not the norm) keeps the gradient of sqrt finite at zero.
    norm = jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), _NORM_EPS**2))
    unit = x / norm
    return 1.0 - unit @ unit.T


def _masked_batch_hard(
    x: jax.Array, labels: jax.Array, valid: jax.Array, margin: float | None, distance: str
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Batch-hard triplet loss over the valid rows of one set of points.

    The single implementation behind both triplet losses (the centroid triplet loss vmaps it
    over rounds).

    Args:
      x: (N, D) float32 points; rows with ``valid=False`` must already be zeroed.
      labels: (N,) int identity labels.
      valid: (N,) bool; invalid rows are neither anchors nor positives nor negatives.
      margin: hinge margin (may be traced), or None for the soft margin.
      distance: "euclidean" or "cosine".

    Returns:
      (loss, mean d_ap, mean d_an, number of counted anchors), all float32 scalars. An anchor
      counts when it is valid and has a valid negative; means are over counted anchors and 0
      when none counts.
    """
    n = x.shape[0]
    dist = _pairwise_distance(x, distance)
    pair_valid = valid[:, None] & valid[None, :]
    same = labels[:, None] == labels[None, :]
    not_self = ~jnp.eye(n, dtype=bool)
    pos = pair_valid & same & not_self
    neg = pair_valid & ~same

    # The anchor is its own positive at distance exactly 0 (as in `hard_example_mining`). The
    # computed diagonal is rounding noise (or the 1e-6 clamp), so use 0 as the fill of the max
    # instead; distances are >= 0 (cosine up to rounding), so the max is unchanged otherwise.
    dist_ap = jnp.max(jnp.where(pos, dist, 0.0), axis=1)
    has_neg = jnp.any(neg, axis=1)
    dist_an = jnp.min(jnp.where(neg, dist, jnp.inf), axis=1)
    # Replace the +inf of anchors without negatives before it meets any arithmetic, so that no
    # inf or nan reaches the loss or the gradient (the double-`where` idiom).
    dist_an = jnp.where(has_neg, dist_an, 0.0)

    if margin is None:
        per_anchor = jax.nn.softplus(dist_ap - dist_an)
    else:
        per_anchor = jax.nn.relu(dist_ap - dist_an + margin)

    counted = valid & has_neg
    num = jnp.sum(counted).astype(jnp.float32)
    denom = jnp.maximum(num, 1.0)

    def masked_mean(values: jax.Array) -> jax.Array:
        return jnp.sum(jnp.where(counted, values, 0.0)) / denom

    return masked_mean(per_anchor), masked_mean(dist_ap), masked_mean(dist_an), num


def _prepare(embeddings: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cast to float32 and zero invalid rows, so that even a nan/inf in a padding row cannot
    leak into a matmul (0 * nan = nan) or into the gradient of valid rows."""
    valid = jnp.asarray(valid, dtype=bool)
    x = jnp.asarray(embeddings, dtype=jnp.float32)
    return jnp.where(valid[:, None], x, 0.0), valid


def batch_hard_triplet_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    valid: jax.Array,
    margin: float | None = 0.5,
    distance: str = "euclidean",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Batch-hard triplet loss (Hermans et al.) over the valid samples of a batch.

    Per valid anchor: d_ap = max distance to a valid sample with its label (itself included, at
    distance 0), d_an = min distance to a valid sample with another label; loss = mean over
    anchors of max(0, d_ap - d_an + margin), or softplus(d_ap - d_an) when ``margin`` is None.
    Anchors without a valid negative are not counted; if no anchor counts the loss is 0.

    Args:
      embeddings: (N, D) features.
      labels: (N,) int identity labels (ignored on invalid rows).
      valid: (N,) bool mask of real samples.
      margin: hinge margin, or None for the soft margin.
      distance: "euclidean" (sqrt of squared distance clamped at 1e-12) or "cosine"
        (1 - cosine similarity). Static under jit.

    Returns:
      (loss, aux): loss a float32 scalar; aux = {"dist_ap", "dist_an"}, the mean hardest-positive
      and hardest-negative distances over counted anchors.
    """
    _check_distance(distance)
    x, valid = _prepare(embeddings, valid)
    loss, dist_ap, dist_an, _ = _masked_batch_hard(x, jnp.asarray(labels), valid, margin, distance)
    return loss, {"dist_ap": dist_ap, "dist_an": dist_an}


def contrastive_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    valid: jax.Array,
    margin: float = 0.5,
    distance: str = "euclidean",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Contrastive loss (Hadsell, Chopra, LeCun 2006) over every valid pair of a batch.

    For each unordered pair {i, j}, i != j, of valid rows with distance d: 0.5 * d^2 if the
    labels agree (pulled together), 0.5 * max(0, margin - d)^2 if they differ (pushed beyond
    the margin); the loss is the mean over all such pairs (0 if there is none). Vectorised
    over the (N, N) distance matrix like the triplet loss; invalid rows take part in no pair.

    Args:
      embeddings: (N, D) features.
      labels: (N,) int identity labels (ignored on invalid rows).
      valid: (N,) bool mask of real samples.
      margin: the distance negatives are pushed beyond (may be traced).
      distance: "euclidean" or "cosine". Static under jit.

    Returns:
      (loss, aux): loss a float32 scalar; aux = {"dist_pos", "dist_neg"}, the mean distance
      of positive and of negative pairs (0 when there is none).
    """
    _check_distance(distance)
    x, valid = _prepare(embeddings, valid)
    labels = jnp.asarray(labels)
    n = x.shape[0]
    dist = _pairwise_distance(x, distance)
    pair = valid[:, None] & valid[None, :] & ~jnp.eye(n, dtype=bool)
    same = labels[:, None] == labels[None, :]
    pos, neg = pair & same, pair & ~same
    # A positive pair's term is the squared distance: for the Euclidean distance it is taken
    # before the square root (exact, and its gradient needs no clamp at d = 0).
    if distance == "euclidean":
        sq_norm = jnp.sum(x * x, axis=-1)
        pos_term = jnp.maximum(sq_norm[:, None] + sq_norm[None, :] - 2.0 * (x @ x.T), 0.0)
    else:
        pos_term = jnp.square(dist)
    per_pair = 0.5 * jnp.where(pos, pos_term, jnp.square(jax.nn.relu(margin - dist)))
    # Each unordered pair appears twice in the symmetric matrix; the mean is unchanged.
    num_pairs = jnp.sum(pair).astype(jnp.float32)
    loss = jnp.sum(jnp.where(pair, per_pair, 0.0)) / jnp.maximum(num_pairs, 1.0)

    def mean_over(mask: jax.Array) -> jax.Array:
        total = jnp.sum(jnp.where(mask, jax.lax.stop_gradient(dist), 0.0))
        return total / jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)

    return loss, {"dist_pos": mean_over(pos), "dist_neg": mean_over(neg)}


def centroid_triplet_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    valid: jax.Array,
    num_instances: int,
    margin: float | None = 0.5,
    distance: str = "euclidean",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Centroid triplet loss (Wieczorek et al. 2021) over a P x M batch, all rounds at once.

    Round i (0 <= i < M): the query of identity p is its i-th sample, its centroid the mean of
    p's other valid samples. An identity whose query is invalid or that has no other valid
    sample drops out of the round. The batch-hard triplet loss runs on the 2P points
    {queries} U {centroids} of the round, each labelled with its identity's label (the label
    of the query row). A round counts when at least one anchor has a negative, i.e. (with
    distinct labels per identity) when at least two identities are left; the loss is the mean
    over counted rounds, 0 if none.

    Args:
      embeddings: (N, D) features, N = P * M, rows grouped by identity.
      labels: (N,) int labels (ignored on invalid rows).
      valid: (N,) bool mask; padding sits at the end of an identity's group.
      num_instances: M, a static Python int dividing N.
      margin: hinge margin, or None for the soft margin.
      distance: "euclidean" or "cosine". Static under jit.

    Returns:
      (loss, aux): loss a float32 scalar; aux = {"centroid_norm": mean L2 norm of the centroids
      that took part in counted rounds, "num_rounds": number of counted rounds (float32)}.
    """
    _check_distance(distance)
    n, dim = jnp.shape(embeddings)
    m = int(num_instances)
    if m < 1 or n % m:
        raise ValueError(f"batch of {n} rows is not a whole number of groups of {m} instances")
    x, valid = _prepare(embeddings, valid)
    p = n // m
    x = x.reshape(p, m, dim)
    valid = valid.reshape(p, m)
    labels = jnp.asarray(labels).reshape(p, m)

    # others[p, i, j]: sample j of identity p belongs to the centroid of round i. A masked mean
    # (rather than (sum - x_i) / (count - 1)) avoids cancellation and needs no special case.
    others = valid[:, None, :] & ~jnp.eye(m, dtype=bool)[None]
    num_others = jnp.sum(others, axis=-1)  # (P, M)
    weights = others / jnp.maximum(num_others, 1)[..., None]
    centroids = jnp.einsum("pij,pjd->pid", weights, x)  # (P, M, D): round i's centroid of p
    in_round = valid & (num_others > 0)  # (P, M)

    # Round-major point sets: (M, 2P, ...), queries first, then centroids.
    points = jnp.swapaxes(jnp.concatenate([x, centroids], axis=0), 0, 1)
    point_labels = jnp.concatenate([labels, labels], axis=0).T
    point_valid = jnp.concatenate([in_round, in_round], axis=0).T

    triplet = functools.partial(_masked_batch_hard, margin=margin, distance=distance)
    round_loss, _, _, round_anchors = jax.vmap(triplet)(points, point_labels, point_valid)
    counted = round_anchors > 0  # (M,)
    num_rounds = jnp.sum(counted).astype(jnp.float32)
    loss = jnp.sum(jnp.where(counted, round_loss, 0.0)) / jnp.maximum(num_rounds, 1.0)

    # Monitoring only: no gradient flows through the norms.
    used = in_round & counted[None, :]
    norms = jnp.linalg.norm(jax.lax.stop_gradient(centroids), axis=-1)
    centroid_norm = jnp.sum(jnp.where(used, norms, 0.0)) / jnp.maximum(jnp.sum(used), 1)
    return loss, {"centroid_norm": centroid_norm, "num_rounds": num_rounds}


def center_loss(
    embeddings: jax.Array, labels: jax.Array, centers: jax.Array, valid: jax.Array
) -> jax.Array:
    """Center loss (Wen et al.): mean over valid samples of |x - c_label|^2.

    The original clamps every entry of the (batch x classes) masked distance matrix to
    [1e-12, 1e12] before summing, which adds (num_classes - 1) * 1e-12 per sample and cuts the
    gradient of a sample sitting on its center; both are negligible artefacts and are not
    reproduced here.

    Args:
      embeddings: (N, D) features.
      labels: (N,) int class indices in [0, num_classes) (ignored on invalid rows).
      centers: (num_classes, D) class centers.
      valid: (N,) bool mask.

    Returns:
      float32 scalar: sum over valid samples of the squared distance, divided by the number of
      valid samples (0 if none). Differentiable in both embeddings and centers.
    """
    x, valid = _prepare(embeddings, valid)
    centers = jnp.asarray(centers, dtype=jnp.float32)
    # Padding labels may be anything, including out of range: gather class 0 for them instead.
    own = centers[jnp.where(valid, labels, 0)]
    sq_dist = jnp.sum(jnp.square(x - own), axis=-1)
    num = jnp.sum(valid)
    return jnp.sum(jnp.where(valid, sq_dist, 0.0)) / jnp.maximum(num, 1).astype(jnp.float32)


def cross_entropy_label_smooth(
    logits: jax.Array, labels: jax.Array, valid: jax.Array, epsilon: float = 0.1
) -> jax.Array:
    """Cross-entropy with label smoothing (Szegedy et al.), mean over valid samples.

    Targets are (1 - epsilon) * onehot(label) + epsilon / K; the per-sample loss is
    -sum(targets * log_softmax(logits)).

    Args:
      logits: (N, K) classifier outputs.
      labels: (N,) int class indices in [0, K) (ignored on invalid rows).
      valid: (N,) bool mask.
      epsilon: smoothing weight (may be traced).

    Returns:
      float32 scalar, 0 if no sample is valid.
    """
    logits, valid = _prepare(logits, valid)
    num_classes = logits.shape[-1]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    targets = (1.0 - epsilon) * jax.nn.one_hot(labels, num_classes) + epsilon / num_classes
    per_sample = -jnp.sum(targets * log_probs, axis=-1)
    num = jnp.sum(valid)
    return jnp.sum(jnp.where(valid, per_sample, 0.0)) / jnp.maximum(num, 1).astype(jnp.float32)
