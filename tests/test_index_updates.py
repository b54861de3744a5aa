"""Updating an index file from the command line: concurrent updates are all kept (one writer
at a time, the second waits or is refused naming the holder), a killed writer's lock never
blocks and its temporary file is removed by the next write, re-added images are refused.
Also `search` without --output (a table on the terminal) and its smaller messages."""

import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest
from test_cli import REPO, assert_one_line_error, run

import ctl_jax
from ctl_jax import files
from ctl_jax.retrieval.embedding_file import Embeddings
from ctl_jax.retrieval.labels import pids_for_labels

DIM = 8


def embeddings(labels, seed, folder="g"):
    """Embeddings of images named by labels, each image path unique to (folder, seed, i)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels, str)
    emb = rng.standard_normal((len(labels), DIM)).astype(np.float32)
    paths = np.asarray([f"/{folder}/{label}/{seed}_{i}.jpg" for i, label in enumerate(labels)])
    return Embeddings(emb, pids_for_labels(labels), np.full(len(labels), -1), paths, labels)


def search(*args):
    return run("ctl_jax.search", "--noprogress", *args)


def _start_search(*args):
    env = dict(os.environ)
    env.setdefault("CTL_JAX_COMPILATION_CACHE", str(REPO / ".cache" / "jax"))
    return subprocess.Popen(
        [sys.executable, "-m", "ctl_jax.search", "--noprogress", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_concurrent_updates_of_one_index_are_all_kept(tmp_path):
    """Two real `search --add --save_index` of the same file started together, three times:
    both exit 0 and the file holds the identities of both (without the lock the second
    save dropped the first one's, 4 times in 7 in the issue)."""
    index_file = tmp_path / "I.npz"
    ctl_jax.Index.build(embeddings(["a", "b"], seed=0), kind="centroid").save(index_file)
    want = {"a", "b"}
    for round_ in range(3):
        procs = []
        for side in ("x", "y"):
            label = f"{side}{round_}"
            added = tmp_path / f"{label}.npz"
            embeddings([label, label], seed=10 + round_, folder=side).save(added)
            want.add(label)
            procs.append(
                _start_search(
                    f"--index={index_file}",
                    f"--add={added}",
                    f"--save_index={index_file}",
                    "--overwrite",
                )
            )
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
            assert "index written" in out
        assert set(ctl_jax.Index.load(index_file).labels.tolist()) == want
    assert not pathlib.Path(f"{index_file}.lock").exists()  # removed by the last writer
    assert [p.name for p in tmp_path.glob(".I.npz.*")] == []


_HOLD = (
    "import sys, time\n"
    "from ctl_jax.retrieval.index_lock import index_lock\n"
    "with index_lock(sys.argv[1], command='search --add=slow.npz'):\n"
    "    print('held', flush=True); time.sleep(600)\n"
)


def test_a_held_index_is_refused_naming_the_holder_and_a_killed_holder_never_blocks(tmp_path):
    index_file = tmp_path / "I.npz"
    ctl_jax.Index.build(embeddings(["a", "b"], seed=0), kind="instance").save(index_file)
    embeddings(["c"], seed=1).save(tmp_path / "c.npz")
    update = (
        f"--index={index_file}",
        f"--add={tmp_path / 'c.npz'}",
        f"--save_index={index_file}",
        "--overwrite",
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(index_file)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = search(*update, "--lock_wait=0")
        assert_one_line_error(refused, f"index {index_file} is being updated by pid {holder.pid}")
        assert "`search --add=slow.npz`" in refused.stderr
        waited = search(*update, "--lock_wait=0.3")
        assert_one_line_error(waited, "after waiting 0.3 s")
        assert f"waiting up to 0.3 s (--lock_wait) for pid {holder.pid}" in waited.stderr
    finally:
        holder.kill()
        holder.wait()
    assert sorted(ctl_jax.Index.load(index_file).labels.tolist()) == ["a", "b"]  # untouched
    assert pathlib.Path(f"{index_file}.lock").exists()  # left by the killed holder ...
    done = search(*update)  # ... and it does not block
    assert done.returncode == 0, done.stderr
    assert sorted(ctl_jax.Index.load(index_file).labels.tolist()) == ["a", "b", "c"]
    assert search(*update, "--lock_wait=-1").returncode == 2


_KILLED_WRITER = (
    "import os, sys, time\n"
    "from ctl_jax import files\n"
    "with files.atomic_open(sys.argv[1]) as f:\n"
    "    f.write(b'half an index'); f.flush(); print('writing', flush=True); time.sleep(600)\n"
)


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    """Only `.NAME.<pid>.<8 random>.tmp` of a process that no longer runs is removed: not a
    living writer's, nor a user's file that merely looks similar, nor another target's."""
    index_file = tmp_path / "I.npz"
    writer = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(index_file)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout.readline().strip() == "writing"
    living = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(index_file)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert living.stdout.readline().strip() == "writing"
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        left = sorted(tmp_path.glob(f".I.npz.{writer.pid}.*.tmp"))
        assert len(left) == 1 and left[0].read_bytes() == b"half an index"
        kept = [
            tmp_path / ".I.npz.notes.tmp",
            tmp_path / f".I.npz.{writer.pid}.short.tmp",
            tmp_path / f".I.npz.{writer.pid}.abcdefgh.tmp.bak",
            tmp_path / f".J.npz.{writer.pid}.abcdefgh.tmp",
            tmp_path / f"I.npz.{writer.pid}.abcdefgh.tmp",
        ]
        for path in kept:
            path.write_text("mine")
        ctl_jax.Index.build(embeddings(["a"], seed=0), kind="instance").save(index_file)
        assert not left[0].exists()
        assert all(path.read_text() == "mine" for path in kept)
        assert len(list(tmp_path.glob(f".I.npz.{living.pid}.*.tmp"))) == 1  # still writing
    finally:
        living.kill()
        living.wait()
    assert ctl_jax.Index.load(index_file).labels.tolist() == ["a"]
    # The same for any writer through atomic_open, e.g. the results JSON of `search`.
    stale = tmp_path / f".r.json.{living.pid}.abcdefgh.tmp"
    stale.write_text("{")
    with files.atomic_open(tmp_path / "r.json", "w") as f:
        f.write("{}")
    assert not stale.exists()


def test_re_adding_images_is_refused_from_the_command_line(tmp_path):
    index_file = tmp_path / "I.npz"
    first = embeddings(["a", "a", "b"], seed=0)
    first.save(tmp_path / "first.npz")
    ctl_jax.Index.build(first, kind="centroid").save(index_file)
    before = index_file.read_bytes()
    retried = search(
        f"--index={index_file}",
        f"--add={tmp_path / 'first.npz'}",
        f"--save_index={index_file}",
        "--overwrite",
    )
    assert_one_line_error(retried, "first.npz: 3 image(s) already in the index", "/g/a/0_0.jpg")
    assert retried.returncode == 1
    assert index_file.read_bytes() == before


def test_search_without_output_prints_the_top_matches(tmp_path):
    """A table per query (rank, score, label, path) against a NumPy cosine ranking; nothing
    is written; no identity summary for queries without identities."""
    gallery = embeddings(["a", "a", "b", "c", "c", "d"], seed=3)
    gallery.save(tmp_path / "g.npz")
    rng = np.random.default_rng(4)
    queries = Embeddings(
        rng.standard_normal((2, DIM)).astype(np.float32),
        np.full(2, -1),
        np.full(2, -1),
        np.asarray(["/q/one.jpg", "/q/two.jpg"]),
    )
    queries.save(tmp_path / "q.npz")
    before = sorted(tmp_path.iterdir())
    done = search(f"--gallery={tmp_path / 'g.npz'}", f"--query={tmp_path / 'q.npz'}", "--top_k=3")
    assert done.returncode == 0, done.stderr
    assert sorted(tmp_path.iterdir()) == before
    g = gallery.embeddings / np.linalg.norm(gallery.embeddings, axis=1, keepdims=True)
    q = queries.embeddings / np.linalg.norm(queries.embeddings, axis=1, keepdims=True)
    similarity = q @ g.T
    lines = done.stdout.splitlines()
    for number, path in enumerate(["/q/one.jpg", "/q/two.jpg"]):
        start = lines.index(f"query {number + 1}/2: {path}")
        rows = [line.split() for line in lines[start + 2 : start + 5]]
        order = np.argsort(-similarity[number])[:3]
        assert [r[0] for r in rows] == ["1", "2", "3"]
        assert [r[2] for r in rows] == gallery.labels[order].tolist()
        assert [r[3] for r in rows] == gallery.paths[order].tolist()
        scores = [float(r[1]) for r in rows]
        np.testing.assert_allclose(scores, similarity[number, order], atol=1e-4)
    assert "identities" not in done.stdout


def test_search_messages_bad_min_score_and_empty_index(tmp_path):
    gallery = embeddings(["a", "b"], seed=5)
    gallery.save(tmp_path / "g.npz")
    base = (f"--gallery={tmp_path / 'g.npz'}", f"--query={tmp_path / 'g.npz'}")
    bad = search(*base, "--min_score=high")
    assert_one_line_error(bad, "--min_score=high: expected a cosine score")
    assert bad.returncode == 2
    empty = search(*base, "--remove=a,b")
    assert_one_line_error(empty, "the gallery index is empty")
    assert "top_k <=" not in empty.stderr


def test_searching_one_image_prints_its_matches_and_no_identity_summary(tmp_path):
    """The issue's case: one query image, no --output: its top matches on the terminal, and
    no 'identities from folder names: 0 of 1 image(s)' line for a query without identity."""
    from PIL import Image
    from tiny_model import random_images, save_random_model

    model_dir = tmp_path / "model"
    save_random_model(model_dir)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, pixels in enumerate(random_images(3, 32, 16, seed=1)):
        Image.fromarray(pixels).save(folder / f"photo{i}.png")
    gallery = tmp_path / "g.npz"
    done = run(
        "ctl_jax.embed", f"--checkpoint={model_dir}", f"--images={folder}", f"--output={gallery}"
    )
    assert done.returncode == 0, done.stderr
    query = folder / "photo1.png"
    done = search(
        f"--gallery={gallery}", f"--images={query}", f"--checkpoint={model_dir}", "--top_k=2"
    )
    assert done.returncode == 0, done.stderr
    assert "identities" not in done.stdout
    lines = done.stdout.splitlines()
    start = lines.index(f"query 1/1: {query.resolve()}")
    first = lines[start + 2].split()
    assert first[0] == "1" and first[3] == str(query.resolve())
    assert float(first[1]) == pytest.approx(1.0, abs=1e-4)
