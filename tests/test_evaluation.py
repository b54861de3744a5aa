"""Evaluation: centroid galleries per mode and CMC/mAP against loop-based references.

The references below are deliberately naive and independent of the implementation: a
per-query loop over the ranking written straight from the Market-1501 protocol, and a
transcription of the original `validation_create_centroids` with Python lists and sets.
"""

import json
from collections import defaultdict

import numpy as np
import pytest

from ctl_jax.evaluation import (
    MODES,
    build_search_gallery,
    evaluate,
    format_table,
    rank_metrics,
    write_metrics_json,
)

RANKS = (1, 5, 10, 20, 50)


# ----------------------------------------------------------------------------- references
def reference_centroids(mode, g_emb, g_pids, g_cams, q_pids, q_cams):
    """List of (embedding, pid, camera set) and the query cameras the filter sees."""
    g_emb = np.asarray(g_emb, np.float64)
    g_pids, g_cams = list(map(int, g_pids)), list(map(int, g_cams))
    q_pids, q_cams = list(map(int, q_pids)), list(map(int, q_cams))
    if mode == "instance":
        items = [(g_emb[j], g_pids[j], {g_cams[j]}) for j in range(len(g_pids))]
        return items, q_cams
    labels2idx = defaultdict(list)
    for idx, label in enumerate(g_pids):
        labels2idx[label].append(idx)
    labels2idx_q = defaultdict(list)
    for idx, label in enumerate(q_pids):
        labels2idx_q[label].append(idx)
    items = []
    if mode == "centroid":
        for label in sorted(labels2idx):
            items.append((g_emb[labels2idx[label]].mean(axis=0), label, {1}))
        return items, [0] * len(q_pids)
    if mode == "centroid_camera":
        camids = g_cams
    else:  # the original's slip: gallery-relative indices into [query; gallery] cameras
        camids = q_cams + g_cams
    for label in sorted(labels2idx):
        inds = labels2idx[label]
        inds_q = labels2idx_q[label]
        selected_camids_g = [camids[j] for j in inds]
        if not inds_q:
            if mode == "centroid_camera":
                items.append((g_emb[inds].mean(axis=0), label, set(selected_camids_g)))
            continue
        seen = set()
        for current in sorted({q_cams[i] for i in inds_q}):
            camid_inds = [k for k, c in enumerate(selected_camids_g) if c != current]
            if not camid_inds:
                continue
            used = tuple(sorted({selected_camids_g[k] for k in camid_inds}))
            if used in seen:
                continue
            seen.add(used)
            members = [inds[k] for k in camid_inds]
            items.append((g_emb[members].mean(axis=0), label, set(used)))
    return items, q_cams


def reference_metrics(q_emb, q_pids, q_cams, items, ranks=RANKS):
    """Per-query loop: Euclidean distance of normalised vectors, stable sort, filter."""
    q = np.asarray(q_emb, np.float64)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = np.array([e for e, _, _ in items], np.float64).reshape(len(items), q.shape[1])
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    aps, inps, first_hits = [], [], []
    for i in range(len(q)):
        dist = np.sqrt(((g - q[i]) ** 2).sum(axis=1))
        kept_matches = []
        for j in np.argsort(dist, kind="stable"):
            _, pid, cams = items[j]
            if pid == q_pids[i] and q_cams[i] in cams:
                continue
            kept_matches.append(pid == q_pids[i])
        if not any(kept_matches):
            continue
        hits, precisions = 0, []
        for r, is_match in enumerate(kept_matches, start=1):
            if is_match:
                hits += 1
                precisions.append(hits / r)
                last = r
        aps.append(np.mean(precisions))
        inps.append(hits / last)  # mINP: correct matches / position of the hardest one
        first_hits.append(kept_matches.index(True) + 1)
    out = {"mAP": float(np.mean(aps)) if aps else float("nan")}
    out["mINP"] = float(np.mean(inps)) if aps else float("nan")
    for k in ranks:
        out[f"rank{k}"] = float(np.mean([f <= k for f in first_hits])) if aps else float("nan")
    out["num_query"] = len(aps)
    return out


# ---------------------------------------------------------------------------------- data
def make_data(seed, dim=16):
    """Clustered embeddings with every awkward case of the protocol.

    - pids 1..11 have queries and gallery images over 4 cameras, uneven counts;
    - pid 12 has only same-camera gallery images (its query is skipped in instance mode);
    - pids 13, 14 have queries but no gallery image;
    - pids 0, 20..24 are gallery-only distractors (pid 0 = Market background).
    """
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((25, dim)) * 1.0
    q_pids, q_cams, g_pids, g_cams = [], [], [], []
    for pid in range(1, 12):
        for _ in range(rng.integers(1, 4)):
            q_pids.append(pid)
            q_cams.append(int(rng.integers(0, 4)))
        for _ in range(rng.integers(1, 9)):
            g_pids.append(pid)
            g_cams.append(int(rng.integers(0, 4)))
    q_pids += [12, 13, 14, 13]
    q_cams += [2, 0, 3, 1]
    g_pids += [12, 12]
    g_cams += [2, 2]
    for pid in [0, 0, 0, 20, 21, 21, 22, 23, 23, 23, 24]:
        g_pids.append(pid)
        g_cams.append(int(rng.integers(0, 4)))
    q_pids, q_cams = np.array(q_pids), np.array(q_cams)
    g_pids, g_cams = np.array(g_pids), np.array(g_cams)
    perm = rng.permutation(len(g_pids))
    g_pids, g_cams = g_pids[perm], g_cams[perm]
    scale_q = rng.uniform(0.5, 3.0, (len(q_pids), 1))  # norms vary: centroids average raw
    scale_g = rng.uniform(0.5, 3.0, (len(g_pids), 1))
    q_emb = scale_q * (centers[q_pids] + 0.9 * rng.standard_normal((len(q_pids), dim)))
    g_emb = scale_g * (centers[g_pids] + 0.9 * rng.standard_normal((len(g_pids), dim)))
    return (
        q_emb.astype(np.float32),
        q_pids,
        q_cams,
        g_emb.astype(np.float32),
        g_pids,
        g_cams,
    )


def assert_metrics_close(got, want):
    assert got["num_query"] == want["num_query"]
    for key in ["mAP", "mINP"] + [f"rank{k}" for k in RANKS]:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-9, atol=1e-12, err_msg=key)


# --------------------------------------------------------------------------------- tests
def test_hand_made_example():
    # Points on the unit circle; gallery listed out of rank order on purpose.
    def at(deg):
        return [np.cos(np.radians(deg)), np.sin(np.radians(deg))]

    #            angle pid cam   (rank for query 0 at 0 degrees)
    gallery = [
        (50, 1, 2),  # 5th: correct
        (10, 2, 3),  # 1st: wrong pid
        (40, 3, 0),  # 4th: wrong pid
        (20, 1, 0),  # 2nd: same pid and camera as query 0 -> removed
        (30, 1, 1),  # 3rd: correct
    ]
    g_emb = np.array([at(a) for a, _, _ in gallery])
    g_pids = np.array([p for _, p, _ in gallery])
    g_cams = np.array([c for _, _, c in gallery])
    q_emb = 2.0 * np.array([at(0), at(40), at(0), at(10)])
    q_pids = np.array([1, 3, 4, 2])  # pid 4: no gallery match; pid 2: only same camera
    q_cams = np.array([0, 1, 0, 3])
    m = evaluate(q_emb, q_pids, q_cams, g_emb, g_pids, g_cams, modes=["instance"])["instance"]
    # Query 0 kept ranking: wrong, correct (2), wrong, correct (4): AP = (1/2 + 2/4) / 2.
    # Query 1: its only correct item comes first: AP = 1. Queries 2 and 3 are skipped.
    assert m["num_query"] == 2
    assert m["num_gallery"] == 5
    assert m["mAP"] == pytest.approx(0.75)
    assert m["rank1"] == pytest.approx(0.5)
    assert m["rank5"] == m["rank50"] == pytest.approx(1.0)


def test_ties_are_broken_by_gallery_index():
    g_emb = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])  # items 0 and 1 tie
    q_emb = np.array([[1.0, 0.0]])
    cams = np.array([1, 1, 1])
    wrong_first = rank_metrics(q_emb, [5], [0], g_emb, [7, 5, 5], 1 << cams)
    right_first = rank_metrics(q_emb, [5], [0], g_emb, [5, 7, 5], 1 << cams)
    assert wrong_first["rank1"] == 0.0 and right_first["rank1"] == 1.0
    assert wrong_first["mAP"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_fewer_kept_items_than_k_uses_all_kept():
    g_emb = np.eye(3)
    q_emb = np.array([[0.0, 0.0, 1.0]])
    m = rank_metrics(q_emb, [1], [0], g_emb, [2, 3, 1], [2, 2, 2])
    assert m["rank1"] == 1.0 and m["rank50"] == 1.0 and m["num_query"] == 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_modes_match_loop_reference(mode, seed):
    q_emb, q_pids, q_cams, g_emb, g_pids, g_cams = make_data(seed)
    items, ref_q_cams = reference_centroids(mode, g_emb, g_pids, g_cams, q_pids, q_cams)

    gallery = build_search_gallery(mode, g_emb, g_pids, g_cams, q_pids, q_cams)
    assert len(gallery) == len(items)
    np.testing.assert_array_equal(gallery.pids, [p for _, p, _ in items])
    np.testing.assert_array_equal(gallery.cam_masks, [sum(1 << c for c in s) for _, _, s in items])
    np.testing.assert_allclose(gallery.embeddings, [e for e, _, _ in items], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(gallery.query_cams, ref_q_cams)

    want = reference_metrics(q_emb, q_pids, ref_q_cams, items)
    got = evaluate(q_emb, q_pids, q_cams, g_emb, g_pids, g_cams, modes=[mode])[mode]
    assert_metrics_close(got, want)
    assert got["num_gallery"] == len(items)
    assert 0 < got["num_query"] < len(q_pids)  # some queries are skipped, some counted


def test_data_covers_the_awkward_cases():
    q_emb, q_pids, q_cams, g_emb, g_pids, g_cams = make_data(0)

    def counted(pids, mode):
        sel = np.isin(q_pids, pids)
        res = evaluate(q_emb[sel], q_pids[sel], q_cams[sel], g_emb, g_pids, g_cams, [mode])
        return res[mode]["num_query"]

    # pid 12 has only same-camera matches: skipped unless cameras are off.
    assert counted([12], "instance") == 0 and counted([12], "centroid") == 1
    assert counted([12], "centroid_camera") == 0
    # pids 13 and 14 have no gallery image: always skipped.
    assert all(counted([13, 14], mode) == 0 for mode in MODES)
    # Distractors (one centroid each) are in the honest gallery only.
    distractors = {0, 20, 21, 22, 23, 24}
    honest = build_search_gallery("centroid_camera", g_emb, g_pids, g_cams, q_pids, q_cams)
    slipped = build_search_gallery(
        "centroid_camera_reference", g_emb, g_pids, g_cams, q_pids, q_cams
    )
    assert sorted(p for p in honest.pids.tolist() if p in distractors) == sorted(distractors)
    assert not distractors & set(slipped.pids.tolist())


def test_chunking_does_not_change_results():
    q_emb, q_pids, q_cams, g_emb, g_pids, g_cams = make_data(3)
    masks = 1 << g_cams
    full = rank_metrics(q_emb, q_pids, q_cams, g_emb, g_pids, masks)
    for chunk in (1, 2, 7):
        assert rank_metrics(q_emb, q_pids, q_cams, g_emb, g_pids, masks, chunk_size=chunk) == full


def test_reference_mode_reproduces_the_camera_slip():
    def at(deg):
        return [np.cos(np.radians(deg)), np.sin(np.radians(deg))]

    # Queries of pid 1 from cameras 0 and 1. Gallery: g0 (camera 1), g1 (camera 0) of
    # pid 1 and a distractor g2. The original reads g0's camera at concat[0] = 0 (query 0)
    # and g1's at concat[1] = 1, so each query is shown its SAME-camera image.
    q_emb = np.array([at(0), at(90)])
    q_pids, q_cams = np.array([1, 1]), np.array([0, 1])
    g_emb = np.array([at(60), at(5), at(30)])
    g_pids, g_cams = np.array([1, 1, 9]), np.array([1, 0, 0])
    res = evaluate(q_emb, q_pids, q_cams, g_emb, g_pids, g_cams, modes=MODES)

    honest = build_search_gallery("centroid_camera", g_emb, g_pids, g_cams, q_pids, q_cams)
    slipped = build_search_gallery(
        "centroid_camera_reference", g_emb, g_pids, g_cams, q_pids, q_cams
    )
    # Honest: the camera-0 query gets the centroid of g0 (camera 1) and vice versa.
    np.testing.assert_allclose(honest.embeddings[:2], g_emb[[0, 1]], atol=1e-7)
    np.testing.assert_array_equal(honest.cam_masks, [1 << 1, 1 << 0, 1 << 0])
    # Slipped: same masks, swapped images, and the distractor is gone.
    np.testing.assert_allclose(slipped.embeddings, g_emb[[1, 0]], atol=1e-7)
    np.testing.assert_array_equal(slipped.cam_masks, [1 << 1, 1 << 0])

    # Honest: the distractor (30 deg) beats each query's correct centroid: AP 1/2 each.
    assert res["centroid_camera"]["mAP"] == pytest.approx(0.5)
    assert res["centroid_camera"]["rank1"] == 0.0
    # Slipped: same-camera images come first: perfect scores.
    assert res["centroid_camera_reference"]["mAP"] == pytest.approx(1.0)
    assert res["centroid_camera_reference"]["rank1"] == 1.0
    assert res["centroid_camera"]["num_gallery"] == 3
    assert res["centroid_camera_reference"]["num_gallery"] == 2


def test_centroids_average_unnormalised_embeddings():
    g_emb = np.array([[10.0, 0.0], [0.0, 1.0]])
    gallery = build_search_gallery("centroid", g_emb, [3, 3], [0, 1], [3], [0])
    np.testing.assert_allclose(gallery.embeddings, [[5.0, 0.5]])


def test_unknown_mode_names_the_valid_ones():
    q_emb, q_pids, q_cams, g_emb, g_pids, g_cams = make_data(0)
    with pytest.raises(ValueError, match="centroid_camera_reference"):
        evaluate(q_emb, q_pids, q_cams, g_emb, g_pids, g_cams, modes=["centroids"])


def test_mismatched_inputs_are_rejected():
    q_emb, q_pids, q_cams, g_emb, g_pids, g_cams = make_data(0)
    with pytest.raises(ValueError, match="query pids"):
        evaluate(q_emb, q_pids[:-1], q_cams, g_emb, g_pids, g_cams)
    with pytest.raises(ValueError, match="gallery camids"):
        evaluate(q_emb, q_pids, q_cams, g_emb, g_pids, g_cams[1:])
    with pytest.raises(ValueError, match="dimension"):
        evaluate(q_emb[:, :8], q_pids, q_cams, g_emb, g_pids, g_cams)
    with pytest.raises(ValueError, match="0..62"):
        evaluate(q_emb, q_pids, q_cams, g_emb, g_pids, g_cams + 63)
    with pytest.raises(ValueError, match="NaN"):
        evaluate(q_emb * np.nan, q_pids, q_cams, g_emb, g_pids, g_cams)


def test_no_counted_query_gives_nan_and_null_in_json(tmp_path):
    res = evaluate(np.ones((1, 2)), [1], [0], np.ones((1, 2)), [2], [0], modes=["instance"])
    assert res["instance"]["num_query"] == 0 and np.isnan(res["instance"]["mAP"])
    path = write_metrics_json(tmp_path / "m.json", res)
    assert json.loads(path.read_text())["instance"]["mAP"] is None
    assert "n/a" in format_table(res)


def test_metrics_json_round_trip_and_no_overwrite(tmp_path):
    q_emb, q_pids, q_cams, g_emb, g_pids, g_cams = make_data(0)
    res = evaluate(q_emb, q_pids, q_cams, g_emb, g_pids, g_cams, modes=MODES)
    path = tmp_path / "sub" / "metrics.json"
    meta = {"config": "default", "step": np.int64(7)}
    write_metrics_json(path, res, meta=meta)
    loaded = json.loads(path.read_text())
    assert list(loaded) == [*MODES, "meta"]
    assert loaded["meta"] == {"config": "default", "step": 7}
    for mode in MODES:
        assert loaded[mode] == pytest.approx(res[mode])
        assert set(loaded[mode]) >= {"mAP", "rank1", "rank50", "num_query", "num_gallery"}
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_metrics_json(path, {"instance": res["instance"]})
    assert json.loads(path.read_text()) == loaded  # untouched
    write_metrics_json(path, {"instance": res["instance"]}, overwrite=True)
    assert list(json.loads(path.read_text())) == ["instance"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]  # no temp file


def test_format_table_lists_modes_as_percentages():
    res = {
        "instance": {
            "mAP": 0.859,
            "mINP": 0.612,
            **{f"rank{k}": 0.945 for k in RANKS},
            "num_query": 3368,
            "num_gallery": 15913,
        },
        "meta": {"step": 1},
    }
    table = format_table(res)
    lines = table.splitlines()
    assert "mAP" in lines[0] and "mINP" in lines[0] and "R50" in lines[0]
    assert lines[-1].startswith("instance") and "85.9" in lines[-1] and "94.5" in lines[-1]
    assert "61.2" in lines[-1] and "15913" in lines[-1] and "meta" not in table
    res["verification"] = {"instance": {"pairs": 5, "positives": 1, "auc": 0.5}}
    assert format_table(res) == table  # verification has its own table


@pytest.mark.parametrize("seed", [10, 11])
def test_larger_random_galleries_match_loop_reference(seed):
    rng = np.random.default_rng(seed)
    num_pids, dim = 60, 8
    centers = rng.standard_normal((num_pids, dim))
    g_pids = rng.integers(0, num_pids, 400)
    g_cams = rng.integers(0, 6, 400)
    q_pids = rng.integers(0, num_pids + 5, 90)  # a few pids without gallery images
    q_cams = rng.integers(0, 6, 90)
    g_emb = centers[g_pids] + rng.standard_normal((400, dim))
    q_emb = centers[q_pids % num_pids] + rng.standard_normal((90, dim))
    for mode in MODES:
        items, ref_q_cams = reference_centroids(mode, g_emb, g_pids, g_cams, q_pids, q_cams)
        want = reference_metrics(q_emb, q_pids, ref_q_cams, items)
        gallery = build_search_gallery(mode, g_emb, g_pids, g_cams, q_pids, q_cams)
        got = rank_metrics(
            q_emb,
            q_pids,
            gallery.query_cams,
            gallery.embeddings,
            gallery.pids,
            gallery.cam_masks,
            chunk_size=16,
        )
        assert_metrics_close(got, want)


def test_jax_and_numpy_backends_agree():
    q_emb, q_pids, q_cams, g_emb, g_pids, g_cams = make_data(4)
    masks = 1 << g_cams
    args = (q_emb, q_pids, q_cams, g_emb, g_pids, masks)
    on_numpy = rank_metrics(*args, backend="numpy")
    on_jax = rank_metrics(*args, backend="jax", chunk_size=7)  # last chunk is padded
    assert_metrics_close(on_jax, on_numpy)
    with pytest.raises(ValueError, match="backend"):
        rank_metrics(*args, backend="torch")


@pytest.mark.parametrize(
    "case",
    ["no queries", "queries not in gallery", "empty gallery", "all one camera"],
)
def test_degenerate_inputs_count_no_query(case):
    g_emb = np.random.default_rng(0).standard_normal((4, 3))
    g_pids, g_cams = [1, 1, 2, 2], [0, 1, 0, 1]
    q_emb, q_pids, q_cams = g_emb[:2], [1, 2], [0, 0]
    if case == "no queries":
        q_emb, q_pids, q_cams = np.zeros((0, 3)), [], []
    elif case == "queries not in gallery":
        q_pids = [7, 8]
    elif case == "empty gallery":
        g_emb, g_pids, g_cams = np.zeros((0, 3)), [], []
    else:
        g_cams = [0, 0, 0, 0]
    res = evaluate(q_emb, q_pids, q_cams, g_emb, g_pids, g_cams, modes=MODES)
    for mode in ("instance", "centroid_camera", "centroid_camera_reference"):
        assert res[mode]["num_query"] == 0 and np.isnan(res[mode]["mAP"])
    if case == "all one camera":  # nothing left to build a camera-aware centroid from
        assert res["centroid_camera"]["num_gallery"] == 0
        assert res["centroid"]["num_query"] == 2


def test_query_chunks_have_enough_rows_for_the_matmul_and_bounded_buffers():
    """Chunks of at least 256 queries (a chunk's matmul reads the whole gallery), fewer only
    when the chunk's buffers would pass 256 MB; never zero."""
    from ctl_jax.evaluation.chunking import MAX_BUFFER_BYTES, query_chunk_rows

    assert query_chunk_rows(15_913, 8) == 263  # Market-1501: 4M elements
    assert query_chunk_rows(82_161, 8) == 256  # MSMT17: 51 rows before
    assert query_chunk_rows(10, 8) == 4 * 1024 * 1024 // 10
    huge = query_chunk_rows(2_000_000, 20)
    assert 1 <= huge < 256 and huge * 2_000_000 * 20 <= MAX_BUFFER_BYTES
    assert query_chunk_rows(10**9, 20) == 1 and query_chunk_rows(0, 8) >= 256
