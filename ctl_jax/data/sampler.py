"""P x M identity batches without resampling (docs/method.md, 'The P x M sampler').

One epoch's plan is an int64 array of dataset indices of shape (num_batches, P * M). Row
slots ``p * M .. p * M + M - 1`` hold one *group* of identity ``p``: between 2 and M of its
images, followed by ``-1`` padding when the group is shorter than M.

How an epoch is built (deterministic given ``(seed, epoch)``):
  1. Every identity's images are shuffled. If ``n % M == 1`` the last shuffled image is
     dropped (so a random one) so that no group has a single image; an identity with exactly
     one image therefore contributes nothing. The remaining images are cut in order into
     ``ceil(n' / M)`` groups of M, the last one possibly shorter (never of size 1).
  2. Batches are drawn like the original ``RandomIdentitySampler``: P distinct identities
     are drawn uniformly without replacement among the identities that still have groups;
     each gives its next group; an identity leaves the pool when its groups run out. This
     stops as soon as fewer than P identities remain, so the groups of the few identities
     with the most images are usually left over.

Number of batches per epoch: at most ``floor(G / P)`` where ``G = sum_i ceil(n'_i / M)`` is
the total number of groups, and exactly that minus the leftover of the last step. The
leftover depends on the draw, so the count can differ by one or two between epochs; call
``num_batches`` / ``IdentityBatchSampler.num_batches(epoch)`` (it builds the plan, a few
milliseconds for Market-1501) rather than guessing it.

Images are never repeated within an epoch; the original code instead resampled identities
with fewer than M images (with replacement) to fill M slots.
"""

from __future__ import annotations

import numpy as np

from ctl_jax.errors import ConfigError

# Distinct SeedSequence entropy for the sampler and for augmentation, so that the two RNG
# streams of one (seed, epoch) never coincide. SeedSequence pads entropy with zeros, so
# (seed, epoch) and (seed, epoch, 0) would collide without an explicit tag.
SAMPLER_STREAM = 1
AUGMENT_STREAM = 2


def _check_seed(seed: int, epoch: int) -> None:
    if seed < 0 or epoch < 0:
        raise ConfigError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")


def identity_groups(pids: np.ndarray, M: int, rng: np.random.Generator) -> list[list[np.ndarray]]:
    """Cuts every identity's images into shuffled groups of 2..M images.

    Args:
      pids: (N,) identity label of every dataset index.
      M: instances per identity in a batch (>= 2).
      rng: source of the shuffles.

    Returns:
      One list of groups per distinct pid (in ascending pid order), each group an int64 array
      of 2..M dataset indices. Identities with a single image get an empty list.
    """
    pids = np.asarray(pids)
    order = np.argsort(pids, kind="stable")
    _, starts = np.unique(pids[order], return_index=True)
    bounds = list(starts[1:]) + [len(pids)]
    groups = []
    for start, stop in zip(starts, bounds):
        images = rng.permutation(order[start:stop]).astype(np.int64)
        if len(images) % M == 1:
            images = images[:-1]
        groups.append([images[i : i + M] for i in range(0, len(images), M)])
    return groups


def identity_batches(pids: np.ndarray, P: int, M: int, seed: int, epoch: int) -> np.ndarray:
    """One epoch's P x M batches of dataset indices.

    Args:
      pids: (N,) identity label of every dataset index (any integers).
      P: identities per batch.
      M: instances per identity (>= 2).
      seed: non-negative run seed.
      epoch: non-negative epoch number; each epoch gives a different plan.

    Returns:
      (num_batches, P * M) int64 dataset indices; -1 marks padding at the end of a group.

    Raises:
      ValueError: if fewer than P identities have at least two images, or P, M are invalid.
    """
    if P < 1:
        raise ConfigError(f"P (identities per batch) must be >= 1, got {P}")
    if M < 2:
        raise ConfigError(
            f"M (instances per identity) must be >= 2 so that no group is a single image, got {M}"
        )
    _check_seed(seed, epoch)
    rng = np.random.default_rng((seed, epoch, SAMPLER_STREAM))
    groups = [g for g in identity_groups(pids, M, rng) if g]
    if len(groups) < P:
        raise ConfigError(
            f"P={P} identities per batch, but only {len(groups)} identities have the two or "
            f"more images needed to form a group (M={M})"
        )
    # Draw like the original RandomIdentitySampler: the pool keeps identities in a list,
    # exhausted ones are removed, P distinct ones are drawn uniformly each batch.
    available = list(range(len(groups)))
    next_group = [0] * len(groups)
    rows = []
    while len(available) >= P:
        chosen = rng.choice(len(available), size=P, replace=False)
        identities = [available[c] for c in chosen]
        row = np.full((P, M), -1, dtype=np.int64)
        for p, ident in enumerate(identities):
            group = groups[ident][next_group[ident]]
            row[p, : len(group)] = group
            next_group[ident] += 1
        for ident in identities:
            if next_group[ident] == len(groups[ident]):
                available.remove(ident)
        rows.append(row.reshape(P * M))
    if not rows:
        return np.zeros((0, P * M), dtype=np.int64)
    return np.stack(rows)


def num_batches(pids: np.ndarray, P: int, M: int, seed: int, epoch: int) -> int:
    """Exact number of batches of epoch ``epoch`` (builds the plan)."""
    return len(identity_batches(pids, P, M, seed, epoch))


def shard_batches(
    batches: np.ndarray, process_index: int, process_count: int, *, M: int | None = None
) -> np.ndarray:
    """This process's contiguous block of columns of every batch.

    Args:
      batches: (num_batches, P * M) plan from `identity_batches`.
      process_index: index of this process in [0, process_count).
      process_count: number of data-parallel processes.
      M: instances per identity. When given, checks that every process receives whole
        identity groups (P divisible by process_count); without it only B divisibility is
        checked.

    Returns:
      (num_batches, P * M // process_count) int64: identities
      ``process_index * P / process_count ..`` of every batch.
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index {process_index} out of range for process_count {process_count}"
        )
    batch_size = batches.shape[1]
    if M is not None:
        if batch_size % M:
            raise ValueError(f"batch of {batch_size} slots is not a multiple of M={M}")
        P = batch_size // M
        if P % process_count:
            raise ConfigError(
                f"P={P} identities per batch must be divisible by process_count="
                f"{process_count} so that every process receives whole identity groups"
            )
    elif batch_size % process_count:
        raise ValueError(
            f"batch of {batch_size} slots is not divisible by process_count={process_count}"
        )
    local = batch_size // process_count
    return batches[:, process_index * local : (process_index + 1) * local]


class IdentityBatchSampler:
    """The P x M plan of a training split, per epoch.

    Attributes:
      pids: (N,) identity labels.
      P: identities per batch.
      M: instances per identity.
      seed: run seed.
    """

    def __init__(self, pids: np.ndarray, P: int, M: int, seed: int):
        self.pids = np.asarray(pids)
        self.P = P
        self.M = M
        self.seed = seed

    def batches(self, epoch: int) -> np.ndarray:
        """(num_batches, P * M) int64 dataset indices of ``epoch``, -1 for padding."""
        return identity_batches(self.pids, self.P, self.M, self.seed, epoch)

    def num_batches(self, epoch: int) -> int:
        return len(self.batches(epoch))

    def local_batches(self, epoch: int, process_index: int, process_count: int) -> np.ndarray:
        """(num_batches, P * M // process_count) this process's part of ``epoch``."""
        return shard_batches(self.batches(epoch), process_index, process_count, M=self.M)
