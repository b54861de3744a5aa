"""The P x M identity sampler against the rules of docs/method.md, 'The P x M sampler'."""

import numpy as np
import pytest

from ctl_jax.data.sampler import (
    IdentityBatchSampler,
    identity_batches,
    num_batches,
    shard_batches,
)


def _random_pids(seed: int) -> np.ndarray:
    """A shuffled pid list with 1..20 images per identity (Market-like spread)."""
    rng = np.random.default_rng(seed)
    num_ids = int(rng.integers(10, 40))
    counts = rng.integers(1, 21, size=num_ids)
    counts[:3] = [1, 2, 5]  # always a singleton, a pair and an n % 4 == 1 identity
    pids = np.repeat(rng.permutation(1000)[:num_ids], counts)
    return rng.permutation(pids)


CASES = [(seed, P, M) for seed in range(6) for P, M in [(4, 4), (3, 2), (5, 3), (8, 4)]]


def _check_plan(plan, pids, P, M):
    assert plan.dtype == np.int64 and plan.shape[1] == P * M
    real = plan[plan >= 0]
    assert len(np.unique(real)) == len(real), "an image appears twice in an epoch"
    groups = plan.reshape(len(plan), P, M)
    for batch in groups:
        batch_pids = []
        for group in batch:
            n_real = int((group >= 0).sum())
            assert n_real >= 2, "a group with fewer than two real images"
            assert (group[:n_real] >= 0).all() and (group[n_real:] == -1).all(), (
                "padding must be at the end of a group"
            )
            group_pids = pids[group[:n_real]]
            assert (group_pids == group_pids[0]).all(), "a group mixes identities"
            batch_pids.append(group_pids[0])
        assert len(set(batch_pids)) == P, "identities of a batch must be distinct"
    return real


@pytest.mark.parametrize("seed,P,M", CASES)
def test_plan_rules(seed, P, M):
    pids = _random_pids(seed)
    plan = identity_batches(pids, P, M, seed=seed, epoch=3)
    real = _check_plan(plan, pids, P, M)

    ids, counts = np.unique(pids, return_counts=True)
    used = set(pids[real].tolist())
    # Every identity with >= 2 images is used unless its groups were left over at the end,
    # which happens to fewer than P identities.
    unused = {i for i, c in zip(ids, counts) if c >= 2} - used
    assert len(unused) < P
    assert not ({i for i, c in zip(ids, counts) if c == 1} & used)

    # Per identity: at most n (n - 1 when n % M == 1) images; fewer only for identities
    # whose groups were left over, and those are fewer than P.
    per_id = dict(zip(*np.unique(pids[real], return_counts=True)))
    left_over = 0
    for pid, n in zip(ids, counts):
        usable = n - 1 if n % M == 1 else n
        assert per_id.get(pid, 0) <= usable
        left_over += per_id.get(pid, 0) < usable
    assert left_over < P, "stopped while P identities still had groups"

    # The stopping rule: fewer than P identities keep groups after the last batch.
    total_groups = sum(-(-(c - 1 if c % M == 1 else c) // M) for c in counts)
    assert len(plan) <= total_groups // P


@pytest.mark.parametrize("seed", range(4))
def test_all_usable_images_used_when_nothing_left_over(seed):
    # P identities with the same number of groups: every batch takes all of them, so every
    # usable image is used exactly once.
    rng = np.random.default_rng(seed)
    counts = rng.choice([10, 11, 12, 13], size=4)  # 3 groups each with M=4 (13 -> 12)
    pids = rng.permutation(np.repeat(np.arange(4) * 10, counts))
    plan = identity_batches(pids, 4, 4, seed=seed, epoch=0)
    _check_plan(plan, pids, 4, 4)
    assert len(plan) == 3
    assert (plan >= 0).sum() == sum(c - 1 if c % 4 == 1 else c for c in counts)


def test_deterministic_and_epoch_dependent():
    pids = _random_pids(0)
    a = identity_batches(pids, 4, 4, seed=7, epoch=2)
    b = identity_batches(pids, 4, 4, seed=7, epoch=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, identity_batches(pids, 4, 4, seed=7, epoch=3)[: len(a)])
    assert not np.array_equal(a, identity_batches(pids, 4, 4, seed=8, epoch=2)[: len(a)])
    sampler = IdentityBatchSampler(pids, 4, 4, seed=7)
    np.testing.assert_array_equal(sampler.batches(2), a)
    assert sampler.num_batches(2) == num_batches(pids, 4, 4, 7, 2) == len(a)


def test_identity_with_fewer_than_m_images_is_padded():
    pids = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2])
    plan = identity_batches(pids, 3, 4, seed=0, epoch=0)
    assert plan.shape == (1, 12)
    groups = {int(pids[g[0]]): g for g in plan.reshape(3, 4)}
    assert (groups[0][2:] == -1).all() and (groups[0][:2] >= 0).all()
    assert (groups[1][3:] == -1).all() and (groups[1][:3] >= 0).all()
    assert (groups[2] >= 0).all()


def test_too_few_identities_is_an_error():
    pids = np.array([0, 0, 1, 1, 2])  # identity 2 has one image: only 2 usable identities
    with pytest.raises(ValueError, match=r"P=3.*only 2 identities"):
        identity_batches(pids, 3, 2, seed=0, epoch=0)
    with pytest.raises(ValueError, match="M"):
        identity_batches(pids, 2, 1, seed=0, epoch=0)


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_shard_batches_whole_groups(process_count):
    pids = _random_pids(1)
    P, M = 8, 4
    plan = identity_batches(pids, P, M, seed=0, epoch=0)
    shards = [shard_batches(plan, i, process_count, M=M) for i in range(process_count)]
    np.testing.assert_array_equal(np.concatenate(shards, axis=1), plan)
    for shard in shards:
        assert shard.shape == (len(plan), P * M // process_count)
        _check_plan(shard, pids, P // process_count, M)


def test_shard_batches_errors():
    plan = np.zeros((2, 12), np.int64)  # P=3, M=4
    with pytest.raises(ValueError, match="P=3.*process_count=2"):
        shard_batches(plan, 0, 2, M=4)
    with pytest.raises(ValueError, match="out of range"):
        shard_batches(plan, 3, 3, M=4)
