"""Sharded embedding: the K/N parts of a sorted image list, and joining part files back into
the file one process would have written (`ctl_jax.retrieval.shards`, `ctl_jax.merge`)."""

import numpy as np
import pytest
from test_cli import assert_one_line_error, run

from ctl_jax.errors import FileContentError, OptionError
from ctl_jax.retrieval.embedding_file import Embeddings
from ctl_jax.retrieval.shards import load_joined, merge, parse_shard, shard_range


@pytest.mark.parametrize("num_items", [0, 1, 7, 10, 1001])
@pytest.mark.parametrize("num_shards", [1, 2, 3, 8])
def test_shards_are_contiguous_balanced_and_cover_every_item_once(num_items, num_shards):
    ranges = [shard_range(num_items, (k, num_shards)) for k in range(num_shards)]
    rows = [list(range(num_items))[r] for r in ranges]
    assert sum(rows, []) == list(range(num_items))  # in order, each item once
    sizes = [len(r) for r in rows]
    assert max(sizes) - min(sizes) <= 1


def test_parse_shard():
    assert parse_shard("0/4") == (0, 4) and parse_shard(" 3 / 4 ") == (3, 4)
    assert parse_shard(None) is None
    for bad in ("4/4", "1/0", "-1/3", "1", "a/b", "1/2/3"):
        with pytest.raises(OptionError, match=r"--shard=.*0 <= K < N"):
            parse_shard(bad)


def single_process_file(model="sha256:0123456789abcdef"):
    """What one process writes: rows in sorted path order, folder identities by name (pids
    are positions among the sorted labels of the whole file)."""
    rng = np.random.default_rng(0)
    labels = np.array(["carol", "alice", "alice", "", "bob", "carol", "alice", "dave", "bob"])
    paths = np.array([f"/g/{i:02d}.jpg" for i in range(len(labels))])
    ref_pids = np.array([2, 0, 0, -1, 1, 2, 0, 3, 1])  # sorted: alice bob carol dave
    return Embeddings(
        rng.standard_normal((len(labels), 6)).astype(np.float32),
        ref_pids,
        rng.integers(0, 3, len(labels)),
        paths,
        labels,
        model=model,
    )


def write_shards(whole, num_shards, folder):
    """The part files `embed --shard=K/N` would write (each numbering its own labels)."""
    paths = []
    for k in range(num_shards):
        part = whole.select(shard_range(len(whole), (k, num_shards)))
        paths.append(_renumbered(part, (k, num_shards)).save(folder / f"part{k}.npz"))
    return paths


def _renumbered(part, shard):
    from ctl_jax.retrieval.labels import pids_for_labels

    return Embeddings(
        part.embeddings,
        pids_for_labels(part.labels),
        part.camids,
        part.paths,
        part.labels,
        model=part.model,
        shard=shard,
    )


def assert_same_file(got, want):
    for key in ("embeddings", "pids", "camids", "paths", "labels"):
        np.testing.assert_array_equal(getattr(got, key), getattr(want, key), err_msg=key)
    assert got.model == want.model and got.shard is None


def test_merged_shards_equal_the_single_process_file(tmp_path):
    whole = single_process_file()
    parts = write_shards(whole, 3, tmp_path)
    # A shard's own pids differ from the whole file's (alice, bob, carol of that shard only).
    assert not np.array_equal(Embeddings.load(parts[1]).pids, whole.pids[3:6])
    assert_same_file(merge(parts[::-1]), whole)  # any order: joined in shard order
    assert_same_file(load_joined(",".join(map(str, parts))), whole)
    merged = Embeddings.load(whole.save(tmp_path / "whole.npz"))
    assert_same_file(merged, whole)  # model survives the round trip


def test_merge_refuses_parts_that_do_not_fit(tmp_path):
    whole = single_process_file()
    a, b, c = write_shards(whole, 3, tmp_path)
    with pytest.raises(FileContentError, match=r"shard\(s\) 1/3 missing: 2 of 3 given"):
        merge([a, c])
    other = _renumbered(Embeddings.load(b), (1, 3))
    other = Embeddings(
        other.embeddings,
        other.pids,
        other.camids,
        other.paths,
        other.labels,
        model="sha256:ffffffffffffffff",
        shard=(1, 3),
    )
    other.save(tmp_path / "other_model.npz")
    with pytest.raises(FileContentError, match=r"differ in the model: .*part0.npz has sha256:0"):
        merge([a, tmp_path / "other_model.npz", c])
    narrow = Embeddings.load(b)
    Embeddings(
        narrow.embeddings[:, :4],
        narrow.pids,
        narrow.camids,
        narrow.paths,
        narrow.labels,
        model=narrow.model,
        shard=(1, 3),
    ).save(tmp_path / "narrow.npz")
    with pytest.raises(FileContentError, match=r"differ in the dimension: .* has 6, .* has 4"):
        merge([a, tmp_path / "narrow.npz", c])
    with pytest.raises(FileContentError, match=r"part1.npz and .*again.npz are both shard 1/3"):
        Embeddings.load(b).save(tmp_path / "again.npz")
        merge([a, b, tmp_path / "again.npz", c])
    plain_a = Embeddings.load(a).select(slice(None))  # not a shard any more
    plain_a.save(tmp_path / "plain_a.npz")
    plain_b = Embeddings.load(b).select(slice(0, 2))
    plain_b = Embeddings(
        plain_b.embeddings,
        plain_b.pids,
        plain_b.camids,
        np.array([plain_a.paths[0], "/g/new.jpg"]),
        plain_b.labels,
        model=plain_b.model,
    )
    plain_b.save(tmp_path / "plain_b.npz")
    with pytest.raises(
        FileContentError, match=r"image /g/00.jpg is in .*plain_a.npz and .*plain_b"
    ):
        merge([tmp_path / "plain_a.npz", tmp_path / "plain_b.npz"])
    with pytest.raises(OptionError, match="at least two"):
        merge([a])


def test_merge_command(tmp_path):
    whole = single_process_file()
    parts = write_shards(whole, 2, tmp_path)
    out = tmp_path / "all.npz"
    result = run("ctl_jax.merge", f"--inputs={parts[1]},{parts[0]}", f"--output={out}")
    assert result.returncode == 0, result.stderr
    assert_same_file(Embeddings.load(out), whole)
    again = run("ctl_jax.merge", f"--inputs={parts[0]},{parts[1]}", f"--output={out}")
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr
    missing = run(
        "ctl_jax.merge",
        f"--inputs={parts[0]},{tmp_path / 'x.npz'}",
        f"--output={tmp_path / 'b.npz'}",
    )
    assert_one_line_error(missing, "x.npz does not exist")
