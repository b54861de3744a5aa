"""Your own images: identities from folders and CSV files, multi-image queries (search and
evaluation against loop-based references), and updating an index from the command line."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from PIL import Image
from test_cli import run

from ctl_jax import evaluation
from ctl_jax.errors import UserError
from ctl_jax.evaluation.query_centroids import evaluate_query_centroids, group_queries
from ctl_jax.retrieval.embedding_file import Embeddings
from ctl_jax.retrieval.identities import assign_identities
from ctl_jax.retrieval.images import list_images
from ctl_jax.retrieval.labels import pids_for_labels
from ctl_jax.retrieval.query_groups import query_centroids

REPO = pathlib.Path(__file__).resolve().parents[1]


def write_images(root: pathlib.Path, names) -> list[str]:
    """Tiny PNG/JPEG files at `root/name`; returns the sorted absolute paths."""
    rng = np.random.default_rng(0)
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 4, 3), dtype=np.uint8)).save(path)
    return list_images(root).paths


def one_line_error(call) -> str:
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_folder_per_identity_image_set(tmp_path):
    root = tmp_path / "gallery"
    paths = write_images(
        root, ["red_mug/1.jpg", "red_mug/2.png", "blue vase/a.jpg", "0007_c3s1_0_00.jpg"]
    )
    found = assign_identities(paths, root)  # default: not all Market names -> folders
    by_name = dict(zip([pathlib.Path(p).relative_to(root).as_posix() for p in paths], found.labels))
    assert by_name == {
        "0007_c3s1_0_00.jpg": "",  # directly in the root: no identity folder
        "blue vase/a.jpg": "blue vase",
        "red_mug/1.jpg": "red_mug",
        "red_mug/2.png": "red_mug",
    }
    assert found.camids.tolist() == [2, -1, -1, -1]  # the camera of a Market-style name
    np.testing.assert_array_equal(pids_for_labels(found.labels), [-1, 0, 1, 1])
    message = one_line_error(lambda: assign_identities(paths, root, "folder"))
    assert (
        "--identity=folder:" in message and "0007_c3s1_0_00.jpg is not in a sub-folder" in message
    )
    message = one_line_error(lambda: assign_identities(paths, root, "market"))
    assert (
        message.startswith("--identity=market: ") and "does not follow the Market-style" in message
    )
    # All Market names: their pids (junk -1 stays unknown) and cameras.
    market_root = tmp_path / "market"
    market = write_images(market_root, ["0002_c1s1_01.jpg", "-1_c2s1_02.jpg", "x/0010_c6s2_3.jpg"])
    found = assign_identities(market, market_root)
    assert found.mode == "market names"
    assert found.labels.tolist() == ["", "2", "10"] and found.camids.tolist() == [1, 0, 5]
    np.testing.assert_array_equal(pids_for_labels(found.labels), [-1, 2, 10])
    one_line_error(lambda: assign_identities(market, market_root, "csv:missing.csv"))
    one_line_error(lambda: assign_identities(market, market_root, "names"))


@pytest.mark.parametrize("mode", [None, "folder"])
def test_nested_identity_folders_take_the_first_folder(tmp_path, mode):
    # Same sub-folder names under different identities must not merge them, and one
    # identity's images at mixed depths stay one identity.
    root = tmp_path / "gallery"
    names = ["alice/2019/a.jpg", "bob/2019/b.jpg", "alice/c.png", "bob/2020/deep/d.jpg"]
    paths = write_images(root, names)
    found = assign_identities(paths, root, mode)
    by_name = dict(zip([pathlib.Path(p).relative_to(root).as_posix() for p in paths], found.labels))
    assert by_name == {
        "alice/2019/a.jpg": "alice",
        "alice/c.png": "alice",
        "bob/2019/b.jpg": "bob",
        "bob/2020/deep/d.jpg": "bob",
    }
    # An image directly in the root is still refused by --identity=folder.
    paths = write_images(root, names + ["e.jpg"])
    if mode == "folder":
        message = one_line_error(lambda: assign_identities(paths, root, mode))
        assert "e.jpg is not in a sub-folder" in message
    else:
        assert (
            sorted(assign_identities(paths, root).labels.tolist())
            == [""] + ["alice"] * 2 + ["bob"] * 2
        )


def test_identities_from_a_csv_file_and_its_errors(tmp_path):
    root = tmp_path / "photos"
    paths = write_images(root, ["a.jpg", "b.jpg", "sub/c.png", "d.jpg"])
    (tmp_path / "outside.jpg").write_bytes((root / "a.jpg").read_bytes())
    table = tmp_path / "ids.csv"
    table.write_text(f"path,identity,camera\na.jpg,sku 1,0\nsub/c.png,sku 2,\n{paths[1]},sku 1,3\n")
    found = assign_identities(paths, root, f"csv:{table}")
    assert found.labels.tolist() == ["sku 1", "sku 1", "", "sku 2"]  # d.jpg has no row
    assert found.camids.tolist() == [0, 3, -1, -1]

    def error(text):
        table.write_text(text)
        return one_line_error(lambda: assign_identities(paths, root, f"csv:{table}"))

    assert error("a.jpg,x\nnope.jpg,y\n") == (
        f"--identity=csv:{table} line 2: nope.jpg does not exist ({root / 'nope.jpg'})"
    )
    assert "line 3: a.jpg is listed twice (lines 1 and 3)" in error("a.jpg,x\nb.jpg,y\na.jpg,z\n")
    assert "line 1: ../outside.jpg is not one of the" in error("../outside.jpg,x\n")
    assert "line 1: expected path,identity[,camera], got 4" in error("a.jpg,x,1,2\n")
    assert "line 1: camera must be an integer" in error("a.jpg,x,cam1\n")
    assert "must not be empty" in error("a.jpg,\n")


def loop_reference_groups(embeddings, keys):
    """Per distinct key in order of first appearance: the mean embedding (float64 loop)."""
    groups = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    means = [np.mean(embeddings[rows].astype(np.float64), axis=0) for rows in groups.values()]
    return np.asarray(means), list(groups.values())


def test_search_query_centroids_against_a_loop_reference():
    rng = np.random.default_rng(0)
    labels = np.asarray(["b", "a", "", "b", "c", "", "a", "b"])
    emb = (rng.standard_normal((8, 6)) * rng.uniform(0.5, 3, (8, 1))).astype(np.float32)
    cams = np.asarray([0, 1, 2, 0, 3, 4, 1, 5])
    queries = Embeddings(
        emb, pids_for_labels(labels), cams, [f"q{i}.jpg" for i in range(8)], labels
    )
    grouped, members = query_centroids(queries)
    keys = [label or f"unknown {i}" for i, label in enumerate(labels)]
    want, rows = loop_reference_groups(emb, keys)
    np.testing.assert_allclose(grouped.embeddings, want, rtol=1e-6)
    assert grouped.labels.tolist() == ["b", "a", "", "c", ""]
    assert members == [[f"q{i}.jpg" for i in r] for r in rows]
    assert grouped.paths.tolist() == [m[0] for m in members]
    assert grouped.camids.tolist() == [-1, 1, 2, 3, 4]  # "b" spans cameras 0 and 5


def test_evaluation_query_centroids_against_a_loop_reference():
    rng = np.random.default_rng(1)
    num_ids, dim = 6, 8
    centers = rng.standard_normal((num_ids, dim))
    q_pids = np.asarray([0, 0, 1, 1, 1, 2, 3, 3, -1, 4])
    q_cams = np.asarray([0, 0, 1, 2, 1, 0, 3, 3, 2, 5])
    g_pids = np.repeat(np.arange(num_ids), 4)
    g_cams = np.tile(np.arange(4), num_ids)
    q_emb = (centers[np.maximum(q_pids, 0)] + rng.standard_normal((10, dim))).astype(np.float32)
    g_emb = (centers[g_pids] + rng.standard_normal((len(g_pids), dim))).astype(np.float32)

    for by_camera in (False, True):
        keys = [
            (p, c if by_camera else 0) if p >= 0 else ("unknown", i)
            for i, (p, c) in enumerate(zip(q_pids, q_cams))
        ]
        want, rows = loop_reference_groups(q_emb, keys)
        got, pids, cams = group_queries(q_emb, q_pids, q_cams, by_camera)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        assert pids.tolist() == [int(q_pids[r[0]]) for r in rows]
        assert cams.tolist() == [int(q_cams[r[0]]) for r in rows]

    modes = ("instance", "centroid", "centroid_camera")
    results = evaluate_query_centroids(
        q_emb, q_pids, q_cams, g_emb, g_pids, g_cams, modes, verification=True
    )
    assert list(results) == [*modes, "verification"]
    by_identity = group_queries(q_emb, q_pids, q_cams, False)
    by_tracklet = group_queries(q_emb, q_pids, q_cams, True)
    want = evaluation.evaluate(
        *by_identity, g_emb, g_pids, g_cams, modes=("centroid",), verification=True
    )
    assert results["centroid"] == want["centroid"]
    assert results["verification"]["centroid"] == want["verification"]["centroid"]
    want = evaluation.evaluate(
        *by_tracklet, g_emb, g_pids, g_cams, modes=modes[::2], verification=True
    )
    assert results["instance"] == want["instance"]
    assert results["centroid_camera"] == want["centroid_camera"]
    assert results["centroid"]["num_query"] <= 5  # identities with a gallery match


def test_evaluate_files_with_named_identities_and_query_centroids(tmp_path):
    """Query and gallery files number their named identities independently; evaluation
    compares them by label. With query centroids, one query per identity (no cameras)."""
    from ctl_jax.evaluate import evaluate_embedding_files

    rng = np.random.default_rng(0)
    centers = {"lamp": rng.standard_normal(8), "mug": rng.standard_normal(8)}
    centers["vase"] = rng.standard_normal(8)

    def files(labels, cams):
        emb = np.asarray([centers[label] + 0.1 * rng.standard_normal(8) for label in labels])
        paths = [f"{label}_{i}.jpg" for i, label in enumerate(labels)]
        return Embeddings(emb.astype(np.float32), pids_for_labels(labels), cams, paths, labels)

    gallery = files(["mug", "vase", "mug", "lamp", "vase"], [1, 1, 1, 1, 1])
    queries = files(["vase", "vase", "mug"], [0, 0, 0])
    # "mug" is 0 and "vase" 1 in the query file, but 1 and 2 in the gallery file.
    assert queries.pids.tolist() == [1, 1, 0] and gallery.pids.tolist() == [1, 2, 1, 0, 2]
    queries.save(tmp_path / "q.npz")
    gallery.save(tmp_path / "g.npz")
    results, _ = evaluate_embedding_files(
        tmp_path / "q.npz", tmp_path / "g.npz", ["centroid"], options={"verification": False}
    )
    assert results["centroid"]["num_query"] == 3 and results["centroid"]["rank1"] == 1.0
    grouped, _ = evaluate_embedding_files(
        tmp_path / "q.npz",
        tmp_path / "g.npz",
        ["centroid"],
        options={"verification": False, "query_centroids": True},
    )
    assert grouped["centroid"]["num_query"] == 2 and grouped["centroid"]["mAP"] == 1.0


def run_cli(module, *args):
    return run(module, "--noprogress", *args)


def named(labels, seed):
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    emb = (rng.standard_normal((len(labels), 16)) + 2 * (np.arange(16) == seed)).astype(np.float32)
    paths = [f"/shop/{label}/{seed}_{i}.jpg" for i, label in enumerate(labels)]
    return Embeddings(emb, pids_for_labels(labels), np.full(len(labels), -1), paths, labels)


def test_search_command_updates_an_index(tmp_path):
    old, new = named(["mug", "vase", "mug", "lamp"], 1), named(["vase", "sofa", "sofa"], 2)
    queries = named(["mug", "sofa", "sofa", "vase"], 3)
    for name, embeddings in (("old", old), ("new", new), ("q", queries)):
        embeddings.save(tmp_path / f"{name}.npz")
    Embeddings.concatenate([old, new]).save(tmp_path / "all.npz")
    npz = {name: str(tmp_path / f"{name}.npz") for name in ("old", "new", "q", "all")}

    done = run_cli(
        "ctl_jax.search",
        f"--gallery={npz['old']}",
        "--centroids",
        f"--save_index={tmp_path / 'i.npz'}",
    )
    assert done.returncode == 0, done.stderr
    done = run_cli(
        "ctl_jax.search",
        f"--index={tmp_path / 'i.npz'}",
        f"--add={npz['new']}",
        "--remove=lamp",
        f"--save_index={tmp_path / 'i2.npz'}",
        f"--query={npz['q']}",
        "--query_centroids",
        "--top_k=3",
        f"--output={tmp_path / 'updated.json'}",
    )
    assert done.returncode == 0, done.stderr
    assert "grouped by identity into 3" in done.stdout
    rebuilt = run_cli(
        "ctl_jax.search",
        f"--gallery={npz['all']}",
        "--centroids",
        "--remove=lamp",
        f"--query={npz['q']}",
        "--query_centroids",
        "--top_k=3",
        f"--output={tmp_path / 'rebuilt.json'}",
    )
    assert rebuilt.returncode == 0, rebuilt.stderr
    updated = json.loads((tmp_path / "updated.json").read_text())["queries"]
    want = json.loads((tmp_path / "rebuilt.json").read_text())["queries"]
    assert [q["label"] for q in updated] == ["mug", "sofa", "vase"]
    assert updated[1]["paths"] == queries.paths[1:3].tolist()
    for got, expected in zip(updated, want):
        assert [m["label"] for m in got["matches"]] == [m["label"] for m in expected["matches"]]
        np.testing.assert_allclose(
            [m["score"] for m in got["matches"]],
            [m["score"] for m in expected["matches"]],
            atol=2e-6,
        )

    # Bad updates: one line, nothing written.
    target = tmp_path / "never.npz"
    for args, expected in (
        (["--remove=lamp,zebra"], "error: cannot remove unknown label(s) 'lamp', 'zebra'"),
        ([f"--add={tmp_path / 'small.npz'}"], "have dimension 4 but the index has 16"),
    ):
        Embeddings(np.ones((1, 4), np.float32), [0], [0], ["x.jpg"]).save(
            tmp_path / "small.npz", overwrite=True
        )
        bad = run_cli(
            "ctl_jax.search", f"--index={tmp_path / 'i2.npz'}", *args, f"--save_index={target}"
        )
        assert bad.returncode == 1
        last = bad.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and expected in last
        assert not target.exists() and not list(tmp_path.glob(".never.npz*"))


def folder_per_identity_from_synthetic(synthetic_root, root):
    """The tiny synthetic set as one folder per identity with plain file names (no camera
    ids): `root/{train,query,gallery}/person_<pid>/<n>.jpg`; junk and background left out."""
    from ctl_jax.data.readers import read_market_style

    dataset = read_market_style(synthetic_root, "synthetic")
    raw_train = sorted({int(p.rsplit("/", 1)[1].split("_")[0]) for p in dataset.train.paths})
    for split in ("train", "query", "gallery"):
        records = getattr(dataset, split)
        for n, (path, pid) in enumerate(zip(records.paths, records.pids)):
            pid = raw_train[pid] if split == "train" else int(pid)
            if pid <= 0:
                continue
            target = root / split / f"person_{pid:04d}" / f"{n}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(pathlib.Path(path).read_bytes())
    return root


def test_own_folder_workflow_train_evaluate_embed_index_search(tmp_path):
    """The quick start for one's own folder of images, command by command, on the tiny
    synthetic set laid out as train/ query/ gallery/ identity folders (tiny sizes; the
    quick start itself uses the default ones)."""
    from tiny_data import make_tiny_reid

    root = folder_per_identity_from_synthetic(
        make_tiny_reid(tmp_path / "synthetic", seed=4, num_train_ids=6), tmp_path / "my_images"
    )
    workdir = tmp_path / "runs" / "my_images"
    tiny = [
        "--config.data.height=32",
        "--config.data.width=16",
        "--config.data.num_identities=4",
        "--config.data.num_instances=4",
        "--config.data.pad=2",
        "--config.solver.warmup_epochs=1",
        "--config.solver.num_epochs=1",
    ]
    # 1. Train (a left-out data.name is the synthetic demo's Market layout: a hint).
    wrong = run("ctl_jax.train", f"--config.data.root={root}", f"--workdir={workdir}", *tiny)
    assert wrong.returncode == 1 and "--config.data.name=folder" in wrong.stderr
    done = run(
        "ctl_jax.train",
        "--config.data.name=folder",
        f"--config.data.root={root}",
        f"--workdir={workdir}",
        *tiny,
    )
    assert done.returncode == 0, done.stderr
    assert "(no camera ids in the data)" in done.stdout
    line = (
        "evaluation modes: instance, centroid (auto: the data has no camera ids); "
        "monitor: centroid/mAP (auto)"
    )
    assert done.stdout.count(line) == 1
    evaluations = [
        json.loads(x)
        for x in (workdir / "metrics.jsonl").read_text().splitlines()
        if '"kind": "eval"' in x
    ]
    assert evaluations and "centroid/mAP" in evaluations[-1]
    assert not any("camera" in key for e in evaluations for key in e)
    # 2. Evaluate: the same two modes, every query counted.
    done = run("ctl_jax.evaluate", f"--workdir={workdir}", f"--output={tmp_path / 'm.json'}")
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert {"instance", "centroid"} <= set(metrics) and "centroid_camera" not in metrics
    num_queries = len(list((root / "query").rglob("*.jpg")))
    assert metrics["centroid"]["num_query"] == metrics["instance"]["num_query"] == num_queries
    # 3. Embed the gallery (identities from the folder names), 4. build an index of
    # identity centroids, 5. search it with the query images.
    npz, index, results = tmp_path / "gallery.npz", tmp_path / "index.npz", tmp_path / "r.json"
    done = run_cli(
        "ctl_jax.embed", f"--workdir={workdir}", f"--images={root / 'gallery'}", f"--output={npz}"
    )
    assert done.returncode == 0, done.stderr
    done = run_cli("ctl_jax.search", f"--gallery={npz}", "--centroids", f"--save_index={index}")
    assert done.returncode == 0, done.stderr
    done = run_cli(
        "ctl_jax.search",
        f"--index={index}",
        f"--workdir={workdir}",
        f"--images={root / 'query'}",
        "--top_k=3",
        f"--output={results}",
    )
    assert done.returncode == 0, done.stderr
    queries = json.loads(results.read_text())["queries"]
    gallery = Embeddings.load(npz)
    identities = sorted(p.name for p in (root / "gallery").iterdir())
    assert sorted(set(gallery.labels.tolist())) == identities
    assert len(queries) == num_queries
    # Against a NumPy reference: the centroids of the gallery embeddings per label, ranked
    # by cosine with the query embeddings embed gives.
    query_npz = tmp_path / "query.npz"
    done = run_cli(
        "ctl_jax.embed",
        f"--workdir={workdir}",
        f"--images={root / 'query'}",
        f"--output={query_npz}",
    )
    assert done.returncode == 0, done.stderr
    embedded = Embeddings.load(query_npz)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    centroids = unit(
        np.stack([gallery.embeddings[gallery.labels == name].mean(0) for name in identities])
    )
    scores = unit(embedded.embeddings) @ centroids.T
    by_path = {q["path"]: q for q in queries}
    for path, row in zip(embedded.paths, scores):
        want = [identities[i] for i in np.argsort(-row, kind="stable")[:3]]
        got = by_path[path]["matches"]
        assert [m["label"] for m in got] == want
        np.testing.assert_allclose([m["score"] for m in got], np.sort(row)[::-1][:3], atol=1e-4)
