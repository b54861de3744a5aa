"""`ctl_jax.Index`: an updated index equals the index rebuilt from all images; bad updates are
one-line errors that leave the index and its file untouched; old index files still load."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

import ctl_jax
from ctl_jax.errors import InvalidValueError, OutputExistsError, UserError
from ctl_jax.retrieval import results
from ctl_jax.retrieval.embedding_file import Embeddings
from ctl_jax.retrieval.labels import pids_for_labels

DIM = 12


def named_embeddings(labels, seed, dim=DIM):
    """Embeddings of images named by identity labels ("" = unknown), varied norms."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels, str)
    emb = rng.standard_normal((len(labels), dim)).astype(np.float32)
    emb *= rng.uniform(0.3, 4.0, (len(labels), 1)).astype(np.float32)
    paths = np.asarray([f"/photos/{label or 'x'}/{seed}_{i}.jpg" for i, label in enumerate(labels)])
    return Embeddings(emb, pids_for_labels(labels), np.full(len(labels), -1), paths, labels)


OLD = named_embeddings(["cat", "dog", "cat", "", "eel", "owl", "owl", "owl"], seed=1)
NEW = named_embeddings(["dog", "fox", "fox", "ant", "", "cat"], seed=2)


def assert_same_index(updated, rebuilt, queries):
    """The same items (compared in label, path order: an update keeps the pids it gave and
    lists new identities last), vectors and search results; one pid per label."""
    assert len(updated) == len(rebuilt)
    first, second = (np.lexsort((i.items.paths, i.labels)) for i in (updated, rebuilt))
    for key in ("labels", "counts", "camids"):
        np.testing.assert_array_equal(
            getattr(updated.items, key)[first], getattr(rebuilt.items, key)[second]
        )
    pairs = set(zip(updated.labels.tolist(), updated.items.pids.tolist()))
    assert len(pairs) == len({label for label, _ in pairs}) == len({p for _, p in pairs})
    if updated.method == "exact":
        np.testing.assert_allclose(updated.vectors[first], rebuilt.vectors[second], atol=1e-6)
    k = min(5, len(rebuilt))
    got, want = updated.search(queries, k), rebuilt.search(queries, k)
    assert [[h["label"] for h in q] for q in got] == [[h["label"] for h in q] for q in want]
    np.testing.assert_allclose(
        [[h["score"] for h in q] for q in got], [[h["score"] for h in q] for q in want], atol=2e-6
    )


@pytest.mark.parametrize("kind", ["centroid", "instance"])
def test_updated_exact_index_equals_the_rebuilt_one(kind, tmp_path):
    queries = np.random.default_rng(3).standard_normal((7, DIM)).astype(np.float32)
    index = ctl_jax.Index.build(OLD, kind=kind)
    index.add(NEW)
    assert_same_index(index, ctl_jax.Index.build(Embeddings.concatenate([OLD, NEW]), kind), queries)

    index.remove(["dog", "owl"])
    both = Embeddings.concatenate([OLD, NEW])
    remaining = both.select(~np.isin(both.labels, ["dog", "owl"]))
    assert_same_index(index, ctl_jax.Index.build(remaining, kind), queries)

    # Saved and loaded, it can still be updated the same way.
    index.save(tmp_path / "index.npz")
    loaded = ctl_jax.Index.load(tmp_path / "index.npz")
    assert_same_index(loaded, index, queries)
    more = named_embeddings(["cat", "yak"], seed=4)
    loaded.add(more)
    rebuilt = ctl_jax.Index.build(Embeddings.concatenate([remaining, more]), kind)
    assert_same_index(loaded, rebuilt, queries)


@pytest.mark.parametrize("kind", ["centroid", "instance"])
def test_an_index_keeps_the_pids_it_gave_across_updates(kind, tmp_path):
    """Integer labels are their pids, as a build numbers them; a named identity added later
    gets the next free number instead of renumbering the others, and removals renumber
    nothing; so a pid of earlier results keeps naming the same identity."""
    numbered = named_embeddings(["2", "10", "10", "7"], seed=5)
    index = ctl_jax.Index.build(numbered, kind=kind)
    assert dict(zip(index.labels, index.items.pids.tolist())) == {"2": 2, "7": 7, "10": 10}
    index.add(named_embeddings(["5"], seed=9))  # still integer labels: its own number
    index.add(named_embeddings(["abc", "", "abc"], seed=6))
    index.add(named_embeddings(["3", "abc"], seed=10))
    want = {"2": 2, "7": 7, "10": 10, "5": 5, "abc": 11, "3": 12}
    index.remove(["7"])
    del want["7"]
    index.save(tmp_path / "index.npz")
    index = ctl_jax.Index.load(tmp_path / "index.npz")
    index.add(named_embeddings(["zz"], seed=11))
    want["zz"] = 13
    known = index.labels != ""
    assert dict(zip(index.labels[known], index.items.pids[known].tolist())) == want
    assert (index.items.pids[~known] == -1).all()
    # Named identities from the start: positions, then new ones after the largest.
    index = ctl_jax.Index.build(named_embeddings(["eel", "cat"], seed=12), kind=kind)
    index.remove(["cat"])
    index.add(named_embeddings(["ant"], seed=13))
    assert dict(zip(index.labels, index.items.pids.tolist())) == {"eel": 1, "ant": 2}


def test_search_hits_follow_the_results_json():
    index = ctl_jax.Index.build(OLD, kind="instance")
    queries = OLD.embeddings[:3]
    hits = index.search(queries, 4)
    scores, rows = index.search_rows(queries, 4)
    document = results.results_document(
        OLD.paths[:3], OLD.pids[:3], scores, rows, index.items, query_labels=OLD.labels[:3]
    )
    assert hits == [q["matches"] for q in document["queries"]]
    assert hits[0][0] == {
        "label": "cat",
        "pid": int(OLD.pids[0]),
        "path": OLD.paths[0],
        "score": 1.0,
    }
    assert [q["label"] for q in document["queries"]] == ["cat", "dog", "cat"]
    # One vector and a threshold.
    assert len(index.search(queries[0], 2, min_score=0.999)) == 1
    assert len(index.search(queries[0], 2, min_score=0.999)[0]) == 1
    centroid_hits = ctl_jax.Index.build(OLD).search(queries, 2)
    assert all(h["path"] is None for q in centroid_hits for h in q)


def test_bad_updates_are_one_line_errors_and_change_nothing(tmp_path):
    index = ctl_jax.Index.build(OLD, kind="centroid")
    path = index.save(tmp_path / "index.npz")
    before = path.read_bytes()
    vectors = index.vectors.copy()
    with pytest.raises(InvalidValueError, match="dimension 5 but the index has 12"):
        index.add(named_embeddings(["cat"], seed=7, dim=5))
    with pytest.raises(InvalidValueError, match=r"unknown label\(s\) 'zebra'.*holds 4 identities"):
        index.remove(["cat", "zebra"])
    np.testing.assert_array_equal(index.vectors, vectors)
    np.testing.assert_array_equal(index.labels, ["cat", "dog", "eel", "owl"])
    with pytest.raises(OutputExistsError, match="already exists"):
        index.save(path)
    assert path.read_bytes() == before
    for error in (
        lambda: ctl_jax.Index.build(OLD, kind="centroids"),
        lambda: ctl_jax.Index.build(OLD, method="annoy"),
        lambda: ctl_jax.Index.build(OLD, nlists=4),
    ):
        with pytest.raises(UserError) as info:
            error()
        assert "\n" not in str(info.value)


def test_old_index_files_load_and_say_what_an_update_needs(tmp_path):
    """Version-1 files (no labels, no sums) still load and search; a centroid one cannot be
    added to and says to rebuild."""
    index = ctl_jax.Index.build(named_embeddings(["3", "5", "5", "9"], seed=8))
    path = tmp_path / "v1.npz"
    items = index.items
    np.savez(
        path,
        format=np.asarray("ctl_jax.index"),
        version=np.asarray(1),
        kind=np.asarray("centroid"),
        method=np.asarray("exact"),
        pids=items.pids,
        camids=items.camids,
        paths=items.paths,
        counts=items.counts,
        source=np.asarray("g.npz"),
        vectors=index.vectors,
    )
    old = ctl_jax.Index.load(path)
    np.testing.assert_array_equal(old.labels, ["3", "5", "9"])
    queries = np.random.default_rng(9).standard_normal((2, DIM))
    assert old.search(queries, 3) == index.search(queries, 3)
    assert not old.updatable
    with pytest.raises(InvalidValueError, match="format version 1.*rebuild"):
        old.add(named_embeddings(["5"], seed=10))
    old.remove(["5"])
    np.testing.assert_array_equal(old.labels, ["3", "9"])


@pytest.mark.parametrize("method", ["flat", "ivf_flat", "ivf_pq", "hnsw"])
@pytest.mark.parametrize("kind", ["centroid", "instance"])
def test_faiss_indexes_update_with_their_own_add_and_remove(method, kind, tmp_path):
    pytest.importorskip("faiss")
    options = {"nlist": 1} if method.startswith("ivf") else {}
    if method == "ivf_pq":
        options.update(pq_m=4, pq_bits=2)
    queries = np.random.default_rng(11).standard_normal((5, DIM)).astype(np.float32)
    index = ctl_jax.Index.build(OLD, kind=kind, method=method, **options)
    if method == "hnsw" and kind == "centroid":
        with pytest.raises(InvalidValueError, match="hnsw.*exact, flat, ivf_flat, ivf_pq"):
            index.add(NEW)  # "dog" and "cat" are in the index: their centroids would change
        index.add(named_embeddings(["gnu"], seed=12))
        assert "gnu" in index.labels
        return
    index.add(NEW)
    both = Embeddings.concatenate([OLD, NEW])
    if method in ("flat", "ivf_flat"):  # exact scores: the same results as a rebuild
        rebuilt = ctl_jax.Index.build(both, kind=kind, method=method, **options)
        got, want = index.search(queries, 4), rebuilt.search(queries, 4)
        assert [[h["label"] for h in q] for q in got] == [[h["label"] for h in q] for q in want]
    assert sorted(index.labels.tolist()) == sorted(
        ctl_jax.Index.build(both, kind=kind).labels.tolist()
    )
    if method == "hnsw":
        with pytest.raises(InvalidValueError, match="cannot remove.*exact, flat, ivf_flat"):
            index.remove(["dog"])
        return
    index.remove(["dog"])
    assert "dog" not in index.labels
    remaining = both.select(both.labels != "dog")
    if method in ("flat", "ivf_flat"):  # rows still map to the right items (faiss ids)
        rebuilt = ctl_jax.Index.build(remaining, kind=kind, method=method, **options)
        got, want = index.search(queries, 4), rebuilt.search(queries, 4)
        assert [[h["label"] for h in q] for q in got] == [[h["label"] for h in q] for q in want]
    index.save(tmp_path / "faiss.npz")
    loaded = ctl_jax.Index.load(tmp_path / "faiss.npz")
    assert loaded.search(queries, 3) == index.search(queries, 3)
    if method != "ivf_pq":  # (PQ codes do not give exact scores)
        dog = named_embeddings(["dog"], seed=13)
        loaded.add(dog)
        assert loaded.search(dog.embeddings, 1)[0][0]["label"] == "dog"


@pytest.mark.parametrize("kind", ["centroid", "instance"])
def test_adding_images_the_index_holds_is_refused_and_changes_nothing(kind, tmp_path):
    """A retried update: every image of OLD is held already (centroid: also after a save and
    load); an image listed twice is refused too; removing the identity first allows it."""
    index = ctl_jax.Index.build(OLD, kind=kind)
    path = index.save(tmp_path / "index.npz")
    if kind == "centroid":  # the member keys of docs/formats.md, computed independently
        with np.load(path) as data:
            got = sorted(zip(data["member_keys"].tolist(), data["member_pids"].tolist()))
        pid_of = dict(zip(index.labels.tolist(), index.items.pids.tolist()))
        digest = lambda p: hashlib.blake2b(p.encode(), digest_size=8).digest()  # noqa: E731
        want = [
            (int.from_bytes(digest(p), "little"), pid_of[label])
            for p, label in zip(OLD.paths.tolist(), OLD.labels.tolist())
            if label
        ]
        assert got == sorted(want)
    index = ctl_jax.Index.load(path)
    labels, counts = index.labels.copy(), index.items.counts.copy()
    known = OLD.labels != ""
    held = OLD.select(known) if kind == "centroid" else OLD
    with pytest.raises(InvalidValueError, match=rf"{len(held)} image\(s\) already in the index"):
        index.add(held)
    retried = Embeddings.concatenate([NEW, OLD.select(np.arange(len(OLD)) == 2)])
    with pytest.raises(InvalidValueError, match=rf"1 image\(s\) .*\({OLD.paths[2]}\)"):
        index.add(retried)
    with pytest.raises(InvalidValueError, match=r"listed twice"):
        index.add(Embeddings.concatenate([NEW, NEW.select(np.arange(len(NEW)) == 0)]))
    np.testing.assert_array_equal(index.labels, labels)
    np.testing.assert_array_equal(index.items.counts, counts)
    index.remove(["cat"])  # its images may come again now
    index.add(OLD.select(OLD.labels == "cat"))
    assert int(index.items.counts[index.labels == "cat"].sum()) == 2
