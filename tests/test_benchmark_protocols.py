"""The revisited, Holidays and Recall@K protocols against loop-based references written
from their definitions, and `ctl_jax.evaluate --protocol=...` on embedding files."""

import json
import pathlib
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
from test_cli import run

from ctl_jax.data.landmarks import RevisitedGroundTruth
from ctl_jax.evaluation.average_precision import holidays_metrics
from ctl_jax.evaluation.protocols import choose_protocol, evaluate_protocol
from ctl_jax.evaluation.ranking import l2_normalize
from ctl_jax.evaluation.recall import recall_at_k
from ctl_jax.evaluation.revisited import align_by_name, revisited_metrics
from ctl_jax.retrieval.embedding_file import Embeddings

REPO = pathlib.Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------
# References: plain loops, one query at a time.


def _similarities(q, g):
    return l2_normalize(q) @ l2_normalize(g).T


def reference_ap(ranking, ok, junk):
    """Trapezoidal AP and 1-based positions of the positives, junk removed (revisitop)."""
    positions, rank = [], 0  # rank: position among the items that are not junk
    for item in ranking:
        if item in junk:
            continue
        if item in ok:
            positions.append(rank)
        rank += 1
    ap = 0.0
    for j, r in enumerate(positions):
        precision_0 = 1.0 if r == 0 else j / r
        precision_1 = (j + 1) / (r + 1)
        ap += (precision_0 + precision_1) / 2 / len(ok)
    return ap, [r + 1 for r in positions]


def reference_revisited(sim, gnd, ks=(1, 5, 10)):
    results = {}
    for setting in ("easy", "medium", "hard"):
        aps, precisions = [], []
        for i, g in enumerate(gnd):
            ok = {"easy": g["easy"], "medium": g["easy"] + g["hard"], "hard": g["hard"]}[setting]
            junk = {
                "easy": g["junk"] + g["hard"],
                "medium": g["junk"],
                "hard": g["junk"] + g["easy"],
            }[setting]
            if not ok:
                continue  # no positives: left out, as revisitop does
            ranking = list(np.argsort(-sim[i], kind="stable"))
            ap, pos = reference_ap(ranking, set(ok), set(junk))
            aps.append(ap)
            row = []
            for k in ks:
                kq = min(max(pos), k)
                row.append(sum(p <= kq for p in pos) / kq)
            precisions.append(row)
        metrics = {"mAP": float(np.mean(aps)) if aps else float("nan")}
        for j, k in enumerate(ks):
            metrics[f"mP@{k}"] = float(np.mean([p[j] for p in precisions])) if aps else float("nan")
        metrics["num_query"] = len(aps)
        results[setting] = metrics
    return results


def _ground_truth(gnd, num_db):
    return RevisitedGroundTruth(
        source="test",
        imlist=tuple(f"db_{j:03d}" for j in range(num_db)),
        qimlist=tuple(f"q_{i:03d}" for i in range(len(gnd))),
        easy=tuple(np.asarray(g["easy"], np.int64) for g in gnd),
        hard=tuple(np.asarray(g["hard"], np.int64) for g in gnd),
        junk=tuple(np.asarray(g["junk"], np.int64) for g in gnd),
        boxes=np.full((len(gnd), 4), np.nan),
    )


def _assert_metrics_match(ours, reference):
    for setting, expected in reference.items():
        for key, value in expected.items():
            got = ours[setting][key]
            if isinstance(value, float) and np.isnan(value):
                assert np.isnan(got), (setting, key)
            else:
                assert got == pytest.approx(value, abs=1e-12), (setting, key, got, value)


# --------------------------------------------------------------------------------------
# Revisited


def test_revisited_matches_reference_on_random_data():
    rng = np.random.default_rng(0)
    num_q, num_db, extra = 12, 60, 15  # extra: distractors after the database
    q = rng.normal(size=(num_q, 8)).astype(np.float32)
    g = rng.normal(size=(num_db + extra, 8)).astype(np.float32)
    gnd = []
    for i in range(num_q):
        items = rng.permutation(num_db)
        sizes = rng.integers(0, 6, size=3)
        if i == 0:
            sizes[:2] = 0  # no positives in any setting: left out everywhere
        if i == 1:
            sizes[1] = 0  # no hard positives: left out of the hard setting only
        a, b = sizes[0], sizes[0] + sizes[1]
        gnd.append(
            {
                "easy": items[:a].tolist(),
                "hard": items[a:b].tolist(),
                "junk": items[b : b + sizes[2]].tolist(),
            }
        )
    ours = revisited_metrics(q, g, _ground_truth(gnd, num_db))
    reference = reference_revisited(_similarities(q, g), gnd)
    _assert_metrics_match(ours, reference)
    assert ours["hard"]["num_query"] < num_q and ours["easy"]["num_gallery"] == num_db + extra


def test_revisited_ties_and_junk_at_rank_zero():
    # One-hot embeddings: similarities are exactly 1 or 0, so most of the ranking is ties,
    # broken by database order.
    eye = np.eye(4, dtype=np.float32)
    q = eye[[0, 1, 2]]
    g = eye[[1, 0, 0, 3, 0, 1, 2, 2]]
    gnd = [
        # Junk (item 1) ranked first; positives tied with it and with a negative (item 2).
        {"easy": [5], "hard": [2], "junk": [1]},
        # A positive tied at the top with junk ahead of it in database order.
        {"easy": [5], "hard": [], "junk": [0]},
        # Positives among the last items, all other items tied at zero similarity.
        {"easy": [3], "hard": [7, 6], "junk": []},
    ]
    ours = revisited_metrics(q, g, _ground_truth(gnd, len(g)))
    reference = reference_revisited(_similarities(q, g), gnd)
    _assert_metrics_match(ours, reference)
    # Query 1: junk item 0 first, positive 5 next: it counts as rank 0, AP 1.
    assert reference["easy"]["num_query"] == 3
    # A hand check of query 0, medium setting: ranking [1, 2, 4, 0, 3, 5, 6, 7]; without
    # junk 1: positive 2 at rank 0, positive 5 at rank 4 -> AP = (1 + 1)/2/2 + (1/4 + 2/5)/2/2.
    medium_q0 = (1 + 1) / 4 + (1 / 4 + 2 / 5) / 4
    single = revisited_metrics(q[:1], g, _ground_truth(gnd[:1], len(g)))
    assert single["medium"]["mAP"] == pytest.approx(medium_q0)


def test_revisited_no_query_with_positives_is_nan():
    gnd = [{"easy": [], "hard": [], "junk": [0]}]
    out = revisited_metrics(
        np.ones((1, 2), np.float32), np.ones((3, 2), np.float32), _ground_truth(gnd, 3)
    )
    assert np.isnan(out["medium"]["mAP"]) and out["medium"]["num_query"] == 0


def test_align_by_name():
    gt = _ground_truth([{"easy": [0], "hard": [], "junk": []}] * 2, 3)
    q_idx, g_idx = align_by_name(
        gt, ["x/q_001.jpg", "x/q_000.jpg"], ["db_002.jpg", "db_000.jpg", "db_001.jpg", "d.jpg"], 1
    )
    assert q_idx.tolist() == [1, 0] and g_idx.tolist() == [1, 2, 0, 3]
    with pytest.raises(
        ValueError, match=r"gallery embeddings lack 1 image\(s\) of test, e.g. 'db_001'"
    ):
        align_by_name(gt, ["q_000.jpg", "q_001.jpg"], ["db_002.jpg", "db_000.jpg"])
    with pytest.raises(ValueError, match=r"gallery embeddings hold 1 image\(s\) not in test"):
        align_by_name(
            gt, ["q_000.jpg", "q_001.jpg"], ["db_002.jpg", "db_000.jpg", "db_001.jpg", "d.jpg"]
        )


# --------------------------------------------------------------------------------------
# Holidays


def reference_holidays(sim, q_pids, q_paths, g_pids, g_paths):
    aps = []
    for i in range(len(q_pids)):
        ranking = [j for j in np.argsort(-sim[i], kind="stable") if g_paths[j] != q_paths[i]]
        ok = {j for j in ranking if g_pids[j] == q_pids[i]}
        if not ok:
            continue
        aps.append(reference_ap(ranking, ok, set())[0])
    return float(np.mean(aps)), len(aps)


def test_holidays_matches_reference():
    rng = np.random.default_rng(1)
    groups = [1000, 1000, 1000, 1001, 1001, 1002, 1003, 1003, 1003, 1003]
    names = [
        "100000",
        "100001",
        "100002",
        "100100",
        "100101",
        "100200",
        "100300",
        "100301",
        "100302",
        "100303",
    ]
    g_paths = np.array([f"jpg/{n}.jpg" for n in names])
    g_pids = np.array(groups)
    is_query = np.array([int(n) % 100 == 0 for n in names])
    g = rng.normal(size=(len(names), 5)).astype(np.float32)
    g[7] = g[6]  # a tie with the query itself
    out = holidays_metrics(g[is_query], g_pids[is_query], g_paths[is_query], g, g_pids, g_paths)
    expected, counted = reference_holidays(
        _similarities(g[is_query], g), g_pids[is_query], g_paths[is_query], g_pids, g_paths
    )
    assert out["mAP"] == pytest.approx(expected, abs=1e-12)
    assert out["num_query"] == counted == 3  # group 1002 has no other image


# --------------------------------------------------------------------------------------
# Recall@K


def reference_recall(q, q_pids, q_paths, g, g_pids, g_paths, ks, centroid):
    hits, counted = {k: 0 for k in ks}, 0
    for i in range(len(q)):
        keep = [j for j in range(len(g)) if g_paths[j] != q_paths[i]]
        if centroid:
            classes = sorted({g_pids[j] for j in keep})
            items = np.stack(
                [g[[j for j in keep if g_pids[j] == c]].astype(np.float64).mean(0) for c in classes]
            )
            labels = classes
        else:
            items, labels = g[keep], [g_pids[j] for j in keep]
        sim = _similarities(q[i : i + 1], items.astype(np.float32))[0]
        ranked = [labels[j] for j in np.argsort(-sim, kind="stable")]
        if q_pids[i] not in ranked:
            continue
        counted += 1
        first = ranked.index(q_pids[i])
        for k in ks:
            hits[k] += first < k
    return {f"recall@{k}": hits[k] / counted for k in ks}, counted


@pytest.mark.parametrize("mode", ["instance", "centroid"])
def test_recall_leave_one_out_matches_reference(mode):
    # SOP: query and gallery are the same images; class 9 has a single image (no positive).
    rng = np.random.default_rng(2)
    pids = np.array([1, 1, 1, 2, 2, 3, 3, 3, 3, 9, 4, 4])
    paths = np.array([f"img_{i}.jpg" for i in range(len(pids))])
    emb = rng.normal(size=(len(pids), 6)).astype(np.float32)
    ks = (1, 2, 3, 5)
    out = recall_at_k(emb, pids, paths, emb, pids, paths, ks=ks, mode=mode, chunk_size=5)
    expected, counted = reference_recall(emb, pids, paths, emb, pids, paths, ks, mode == "centroid")
    assert out["num_query"] == counted == len(pids) - 1
    for key, value in expected.items():
        assert out[key] == pytest.approx(value), key


@pytest.mark.parametrize("mode", ["instance", "centroid"])
def test_recall_query_against_gallery_with_ties(mode):
    # In-Shop: disjoint query and gallery; one-hot embeddings give exact ties.
    eye = np.eye(3, dtype=np.float32)
    q, q_pids = eye[[0, 1, 2, 0]], np.array([5, 6, 7, 8])
    g, g_pids = eye[[0, 0, 1, 2, 1]], np.array([6, 5, 6, 7, 5])
    q_paths, g_paths = [f"q{i}" for i in range(4)], [f"g{i}" for i in range(5)]
    ks = (1, 2, 3)
    out = recall_at_k(q, q_pids, q_paths, g, g_pids, g_paths, ks=ks, mode=mode)
    expected, counted = reference_recall(
        q, q_pids, q_paths, g, g_pids, g_paths, ks, mode == "centroid"
    )
    assert out["num_query"] == counted == 3  # pid 8 has no gallery image
    for key, value in expected.items():
        assert out[key] == pytest.approx(value), key


def test_protocol_choice():
    assert choose_protocol(("holidays", "recall_at_k")) == "holidays"
    assert choose_protocol(("market", "recall_at_k"), "recall_at_k") == "recall_at_k"
    with pytest.raises(
        ValueError, match=r"protocol 'market' does not apply to .*supports: revisited"
    ):
        choose_protocol(("revisited",), "market")
    with pytest.raises(
        ValueError, match=r"mode\(s\) \['centroid_camera'\] do not apply to protocol 'recall_at_k'"
    ):
        split = SimpleNamespace(paths=np.array(["a"]), pids=np.array([0]), camids=np.array([0]))
        evaluate_protocol(
            "recall_at_k", np.ones((1, 2)), split, np.ones((1, 2)), split, ["centroid_camera"]
        )


# --------------------------------------------------------------------------------------
# The command line on embedding files


def _run(*args):
    return run("ctl_jax.evaluate", *args)


def _embeddings(paths, emb):
    n = len(paths)
    return Embeddings(
        emb.astype(np.float32), -np.ones(n, np.int64), -np.ones(n, np.int64), np.array(paths)
    )


def test_evaluate_revisited_on_embedding_files(tmp_path):
    rng = np.random.default_rng(3)
    gnd = {
        "imlist": [f"all_souls_{j:06d}" for j in range(9)],
        "qimlist": ["all_souls_000013", "radcliffe_camera_000519", "magdalen_000078"],
        "gnd": [
            {"bbx": [1.0, 2.0, 30.5, 40.0], "easy": [0, 4], "hard": [2], "junk": [1]},
            {"bbx": [0.0, 0.0, 5.0, 5.0], "easy": [3], "hard": [], "junk": [5, 6]},
            {"bbx": [0.0, 0.0, 5.0, 5.0], "easy": [], "hard": [7, 8], "junk": []},
        ],
    }
    gnd_path = tmp_path / "gnd_roxford5k.pkl"
    gnd_path.write_bytes(pickle.dumps(gnd, protocol=2))
    q = rng.normal(size=(3, 4))
    g = rng.normal(size=(9, 4))
    d = rng.normal(size=(4, 4))
    # Files in another order than the ground truth: matched by file name.
    q_order, g_order = [2, 0, 1], list(rng.permutation(9))
    _embeddings([f"/data/jpg/{gnd['qimlist'][i]}.jpg" for i in q_order], q[q_order]).save(
        tmp_path / "Q.npz"
    )
    _embeddings([f"jpg/{gnd['imlist'][j]}.jpg" for j in g_order], g[g_order]).save(
        tmp_path / "G.npz"
    )
    _embeddings([f"jpg/r1m_{i}.jpg" for i in range(4)], d).save(tmp_path / "D.npz")
    out = tmp_path / "m.json"
    result = _run(
        f"--query={tmp_path / 'Q.npz'}",
        f"--gallery={tmp_path / 'G.npz'}",
        "--protocol=revisited",
        f"--ground_truth={gnd_path}",
        f"--distractors={tmp_path / 'D.npz'}",
        f"--output={out}",
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads(out.read_text())
    assert set(metrics) == {"easy", "medium", "hard", "meta"}
    assert set(metrics["medium"]) == {"mAP", "mP@1", "mP@5", "mP@10", "num_query", "num_gallery"}
    assert metrics["meta"]["protocol"] == "revisited" and metrics["medium"]["num_gallery"] == 13
    ground_truth = _ground_truth(gnd["gnd"], 9)
    expected = revisited_metrics(q, np.concatenate([g, d]), ground_truth)
    for setting in ("easy", "medium", "hard"):
        for key in ("mAP", "mP@1", "mP@5", "mP@10", "num_query"):
            assert metrics[setting][key] == pytest.approx(expected[setting][key], abs=1e-6)
    assert metrics["easy"]["num_query"] == 2  # the third query has no easy positive

    # --whitening applies to the query, the gallery and the distractors alike.
    from ctl_jax.retrieval.whitening import learn_pca

    whitening = learn_pca(rng.normal(size=(30, 4)), dim=3)
    whitening.save(tmp_path / "w.npz")
    result = _run(
        f"--query={tmp_path / 'Q.npz'}",
        f"--gallery={tmp_path / 'G.npz'}",
        "--protocol=revisited",
        f"--ground_truth={gnd_path}",
        f"--distractors={tmp_path / 'D.npz'}",
        f"--whitening={tmp_path / 'w.npz'}",
        f"--output={out}",
        "--overwrite",
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads(out.read_text())
    database = whitening.apply(np.concatenate([g, d]))
    expected = revisited_metrics(whitening.apply(q), database, ground_truth)
    for setting in ("easy", "medium", "hard"):
        assert metrics[setting]["mAP"] == pytest.approx(expected[setting]["mAP"], abs=1e-6)

    # A gallery that misses an annotated image: one line naming it.
    _embeddings([f"{n}.jpg" for n in gnd["imlist"][:-1]], g[:-1]).save(tmp_path / "G2.npz")
    bad = _run(
        f"--query={tmp_path / 'Q.npz'}",
        f"--gallery={tmp_path / 'G2.npz'}",
        f"--ground_truth={gnd_path}",
    )
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert last.startswith("error: ") and "all_souls_000008" in last and "gnd_roxford5k.pkl" in last
    # A ground truth that would run code.
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(b"cos\nsystem\n(S'true'\ntR.")
    refused = _run(
        f"--query={tmp_path / 'Q.npz'}", f"--gallery={tmp_path / 'G.npz'}", f"--ground_truth={evil}"
    )
    last = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode != 0 and "evil.pkl: refused: it names os.system" in last


# --------------------------------------------------------------------------------------
# Datasets carry their protocol and ground truth to the evaluation


def test_datasets_choose_their_published_protocol(tmp_path):
    from benchmark_fixtures import make_holidays, make_inshop, make_revisited, make_sop

    from ctl_jax.data.catalog import open_dataset
    from ctl_jax.evaluation.protocols import evaluate_dataset

    rng = np.random.default_rng(4)

    def embeddings(ds):
        return rng.normal(size=(len(ds.query), 4)), rng.normal(size=(len(ds.gallery), 4))

    oxford = open_dataset("roxford5k", make_revisited(tmp_path))
    q, g = embeddings(oxford)
    assert evaluate_dataset(oxford, q, g) == revisited_metrics(q, g, oxford.ground_truth)
    with pytest.raises(
        ValueError, match=r"protocol 'market' does not apply to dataset 'roxford5k'"
    ):
        evaluate_dataset(oxford, q, g, protocol="market")

    holidays = open_dataset("holidays", make_holidays(tmp_path))
    q, g = embeddings(holidays)
    out = evaluate_dataset(holidays, q, g)
    assert set(out) == {"instance"} and out["instance"]["num_query"] == 2  # group 1002: alone
    recall = evaluate_dataset(holidays, q, g, protocol="recall_at_k")
    assert recall["instance"]["num_query"] == 2 and set(recall) == {"instance", "centroid"}

    sop = open_dataset("sop", make_sop(tmp_path))
    q = rng.normal(size=(len(sop.query), 4))
    out = evaluate_dataset(sop, q, q)  # the same images: each leaves itself out
    assert list(out["instance"])[:4] == ["recall@1", "recall@10", "recall@100", "recall@1000"]
    assert out["instance"]["num_query"] == 5 and out["instance"]["recall@10"] == 1.0

    inshop = open_dataset("inshop", make_inshop(tmp_path))
    q, g = embeddings(inshop)
    assert "recall@50" in evaluate_dataset(inshop, q, g)["centroid"]
    assert "rank1" in evaluate_dataset(inshop, q, g, ["instance"], protocol="market")["instance"]
