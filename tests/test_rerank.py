"""k-reciprocal re-ranking, alpha-weighted query expansion and mINP against loop references.

The references are written from the papers' definitions with dense matrices, Python loops
and stable sorts (ties go to the lower index, the order the implementation promises):
Zhong et al., CVPR 2017 (re-ranking, with the distance conventions of the re_ranking
function torchreid and fast-reid ship), Radenovic et al. / fast-reid's aqe (alpha-QE with
database-side augmentation) and Ye et al., TPAMI 2021 (mINP).
"""

import numpy as np
import pytest

from ctl_jax.errors import OptionError
from ctl_jax.evaluation import (
    MODES,
    QueryExpansionParams,
    RerankParams,
    build_search_gallery,
    evaluate,
    expand_queries,
    rank_metrics,
    rank_scores,
    rerank_distances,
)
from ctl_jax.evaluation.neighbours import nearest_neighbours

RANKS = (1, 5, 10)


# ----------------------------------------------------------------------------- references
def unit(x):
    x = np.asarray(x, np.float64)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def reference_rerank(q_emb, g_emb, k1, k2, lam):
    """Re-ranked (Q, G) distance, one item at a time."""
    x = unit(np.concatenate([q_emb, g_emb]))
    nq, n = len(q_emb), len(x)
    d = np.maximum(np.float32(2) - np.float32(2) * (x @ x.T), np.float32(0))
    d = d * d  # the reference squares the distance it is given
    d = d / d.max(axis=1, keepdims=True)
    order = np.argsort(d, axis=1, kind="stable")

    def reciprocal(i, k):
        return [j for j in order[i, : k + 1] if i in order[j, : k + 1]]

    v = np.zeros((n, n), np.float64)
    half = int(np.around(k1 / 2.0))
    for i in range(n):
        r = reciprocal(i, k1)
        expanded = set(r)
        for c in r:
            rc = reciprocal(c, half)
            if len(set(rc) & set(r)) > 2.0 / 3.0 * len(rc):
                expanded |= set(rc)
        members = sorted(expanded)
        weights = np.exp(-d[i, members].astype(np.float64))
        v[i, members] = weights / weights.sum()
    if k2 != 1:
        v = np.stack([v[order[i, :k2]].mean(axis=0) for i in range(n)])
    out = np.zeros((nq, n - nq))
    for i in range(nq):
        for j in range(nq, n):
            m = np.minimum(v[i], v[j]).sum()
            out[i, j - nq] = (1 - m / (2 - m)) * (1 - lam) + d[i, j] * lam
    return out


def reference_aqe(q_emb, g_emb, k, alpha, times):
    """fast-reid's aqe, one item at a time (negative cosines weigh 0)."""
    feats = np.concatenate([q_emb, g_emb]).astype(np.float64)
    for _ in range(times):
        x = unit(feats).astype(np.float64)
        new = np.zeros_like(feats)
        for i in range(len(x)):
            sims = x @ x[i]
            top = np.argsort(-sims, kind="stable")[:k]
            weights = np.maximum(sims[top], 0) ** alpha
            new[i] = (weights[:, None] * feats[top]).sum(axis=0) / len(top)
        feats = new
    return feats[: len(q_emb)], feats[len(q_emb) :]


def reference_metrics(dist, q_pids, q_cams, g_pids, g_masks, ranks=RANKS):
    """AP, CMC and INP per query from a distance matrix (stable sort: ties by index)."""
    aps, inps, firsts = [], [], []
    for i in range(len(dist)):
        kept = []
        for j in np.argsort(dist[i], kind="stable"):
            if g_pids[j] == q_pids[i] and (g_masks[j] >> q_cams[i]) & 1:
                continue
            kept.append(g_pids[j] == q_pids[i])
        if not any(kept):
            continue
        positions = [r for r, hit in enumerate(kept, start=1) if hit]
        aps.append(np.mean([n / r for n, r in enumerate(positions, start=1)]))
        inps.append(len(positions) / positions[-1])
        firsts.append(positions[0])
    out = {"num_query": len(aps)}
    if aps:
        out["mAP"], out["mINP"] = float(np.mean(aps)), float(np.mean(inps))
        for k in ranks:
            out[f"rank{k}"] = float(np.mean([f <= k for f in firsts]))
    return out


def assert_metrics_close(got, want, tol=1e-9):
    assert got["num_query"] == want["num_query"]
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=tol, atol=tol, err_msg=key)


# ---------------------------------------------------------------------------------- data
def clustered(seed, num_q=24, num_g=70, dim=12, num_ids=12):
    """Queries and gallery of `num_ids` identities over 3 cameras, plus the awkward cases:
    gallery identities with one image, queries whose identity has no gallery image."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((num_ids + 3, dim))
    g_pids = np.concatenate([rng.integers(0, num_ids, num_g - 3), [num_ids, num_ids + 1, 0]])
    q_pids = np.concatenate([rng.integers(0, num_ids, num_q - 2), [num_ids + 2, num_ids]])
    g_cams, q_cams = rng.integers(0, 3, num_g), rng.integers(0, 3, num_q)
    g_emb = centers[g_pids] + 0.9 * rng.standard_normal((num_g, dim))
    q_emb = centers[q_pids] + 0.9 * rng.standard_normal((num_q, dim))
    scale = rng.uniform(0.5, 2.0, (num_q + num_g, 1))  # norms vary
    return (
        (q_emb * scale[:num_q]).astype(np.float32),
        q_pids,
        q_cams,
        (g_emb * scale[num_q:]).astype(np.float32),
        g_pids,
        g_cams,
    )


def tied(seed, num, dim=8):
    """Unit vectors with four entries +-0.5: every inner product is a multiple of 1/4,
    exact in float32 whatever the summation order, so many similarities tie exactly."""
    rng = np.random.default_rng(seed)
    x = np.zeros((num, dim), np.float32)
    for row in x:
        row[rng.choice(dim, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    return x


# --------------------------------------------------------------------------------- tests
@pytest.mark.parametrize(
    "k1,k2,lam", [(20, 6, 0.3), (5, 3, 0.0), (7, 1, 1.0), (1, 1, 0.5), (4, 4, 0.3)]
)
def test_rerank_matches_the_loop_reference(k1, k2, lam):
    q_emb, _, _, g_emb, _, _ = clustered(0)
    got = rerank_distances(q_emb, g_emb, RerankParams(k1, k2, lam))
    want = reference_rerank(q_emb, g_emb, k1, k2, lam)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_rerank_with_exact_ties_follows_the_index_order():
    x = tied(1, 40)
    q_emb, g_emb = x[:12], x[12:]
    sims = unit(x) @ unit(x).T
    assert len(np.unique(sims)) < 10  # heavily tied
    for k1, k2 in [(20, 6), (6, 3)]:
        got = rerank_distances(q_emb, g_emb, RerankParams(k1, k2, 0.3))
        np.testing.assert_allclose(got, reference_rerank(q_emb, g_emb, k1, k2, 0.3), atol=2e-6)


@pytest.mark.parametrize("num_q,num_g", [(3, 2), (1, 1), (2, 15), (30, 12)])
def test_rerank_k1_as_large_as_the_gallery(num_q, num_g):
    # k1 = G: the neighbourhoods of size k1 + 1 hold every item when Q is small.
    q_emb, _, _, g_emb, _, _ = clustered(2, num_q=max(num_q, 24))
    q_emb, g_emb = q_emb[:num_q], g_emb[:num_g]
    k2 = min(6, num_g)
    got = rerank_distances(q_emb, g_emb, RerankParams(num_g, k2, 0.3))
    want = reference_rerank(q_emb, g_emb, num_g, k2, 0.3)
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_rerank_k1_above_the_gallery_is_refused():
    q_emb, _, _, g_emb, _, _ = clustered(2)
    with pytest.raises(OptionError, match=r"--rerank_k1=71 exceeds the 70 items of the gallery"):
        rerank_distances(q_emb, g_emb, RerankParams(71, 6, 0.3))


@pytest.mark.parametrize("k1,k2", [(20, 6), (60, 30), (70, 1)])
def test_rerank_in_small_chunks_matches_the_reference(monkeypatch, k1, k2):
    # Chunks of a few rows (some rows alone above the budget) give the same V.
    from ctl_jax.evaluation import rerank

    monkeypatch.setattr(rerank, "_CHUNK_ENTRIES", 50)
    q_emb, _, _, g_emb, _, _ = clustered(4)
    got = rerank_distances(q_emb, g_emb, RerankParams(k1, k2, 0.3))
    np.testing.assert_allclose(got, reference_rerank(q_emb, g_emb, k1, k2, 0.3), atol=2e-6)


def test_rerank_refuses_an_estimate_above_the_available_memory(tmp_path, monkeypatch):
    from ctl_jax import memory
    from ctl_jax.evaluation import rerank

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1000 kB\nMemAvailable:     100 kB\n")
    monkeypatch.setattr(memory, "MEMINFO", str(meminfo))
    q_emb, _, _, g_emb, _, _ = clustered(5)
    with pytest.raises(OptionError) as raised:
        rerank_distances(q_emb, g_emb, RerankParams(20, 6, 0.3))
    message = str(raised.value)
    assert "\n" not in message and "needs about" in message and "0.0 GB available" in message
    assert "--rerank_k1" in message
    # The estimate at k1 = 20 of ~100 items is well below a GB: fits a normal machine.
    assert rerank._fixed_bytes(24, 70, 12, 21) < 2**30


def test_rerank_and_expansion_over_several_neighbour_blocks(monkeypatch):
    from ctl_jax.evaluation import neighbours

    # 94 items (24 queries): five blocks, one across the query-gallery boundary, the last
    # padded.
    monkeypatch.setattr(neighbours, "_BLOCK", 20)
    monkeypatch.setattr(neighbours, "_UPDATE_COLUMNS", 16)  # strips merged in parts
    q_emb, _, _, g_emb, _, _ = clustered(9)
    got = rerank_distances(q_emb, g_emb, RerankParams(20, 6, 0.3))
    np.testing.assert_allclose(got, reference_rerank(q_emb, g_emb, 20, 6, 0.3), atol=2e-6)
    q_got, g_got = expand_queries(q_emb, g_emb, QueryExpansionParams(5, 3.0, 2))
    q_want, g_want = reference_aqe(q_emb, g_emb, 5, 3.0, 2)
    np.testing.assert_allclose(q_got, q_want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(g_got, g_want, rtol=2e-5, atol=2e-5)


def test_rerank_empty_inputs():
    assert rerank_distances(np.zeros((0, 4)), np.ones((3, 4))).shape == (0, 3)
    assert rerank_distances(np.ones((2, 4)), np.zeros((0, 4))).shape == (2, 0)


@pytest.mark.parametrize(
    "k,alpha,times", [(5, 3.0, 1), (3, 0.0, 2), (1, 3.0, 1), (200, 2.5, 1), (4, 1.0, 3)]
)
def test_query_expansion_matches_the_loop_reference(k, alpha, times):
    q_emb, _, _, g_emb, _, _ = clustered(3)
    q_got, g_got = expand_queries(q_emb, g_emb, QueryExpansionParams(k, alpha, times))
    q_want, g_want = reference_aqe(q_emb, g_emb, min(k, len(q_emb) + len(g_emb)), alpha, times)
    np.testing.assert_allclose(q_got, q_want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(g_got, g_want, rtol=2e-5, atol=2e-5)


def test_query_expansion_with_exact_ties():
    x = tied(4, 30) * np.linspace(0.5, 2.0, 30)[:, None].astype(np.float32)
    q_got, g_got = expand_queries(x[:10], x[10:], QueryExpansionParams(6, 3.0, 2))
    q_want, g_want = reference_aqe(x[:10], x[10:], 6, 3.0, 2)
    np.testing.assert_allclose(q_got, q_want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_got, g_want, rtol=1e-5, atol=1e-6)


def test_nearest_neighbours_are_exact_with_ties_to_the_lower_index():
    x = unit(tied(5, 300))
    nn = nearest_neighbours(x, 7, block=64)  # several blocks, the last one padded
    sims = x @ x.T
    want = np.argsort(-sims, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(nn.index, want)
    np.testing.assert_array_equal(nn.similarity, np.take_along_axis(sims, want, 1))
    np.testing.assert_array_equal(nn.min_similarity, sims.min(axis=1))


@pytest.mark.parametrize("mode", MODES)
def test_evaluate_with_rerank_and_expansion_matches_references(mode):
    q_emb, q_pids, q_cams, g_emb, g_pids, g_cams = clustered(6)
    gallery = build_search_gallery(mode, g_emb, g_pids, g_cams, q_pids, q_cams)
    labels = (q_pids, gallery.query_cams, gallery.pids, gallery.cam_masks)
    aqe, rerank = QueryExpansionParams(4, 3.0, 1), RerankParams(10, 4, 0.3)

    got = evaluate(q_emb, q_pids, q_cams, g_emb, g_pids, g_cams, [mode], RANKS, rerank=rerank)
    want = reference_metrics(reference_rerank(q_emb, gallery.embeddings, 10, 4, 0.3), *labels)
    assert_metrics_close(got[mode], want)
    assert 0 < want["num_query"] < len(q_pids)  # queries without a match are skipped

    both = evaluate(
        q_emb, q_pids, q_cams, g_emb, g_pids, g_cams, [mode], RANKS,
        query_expansion=aqe, rerank=rerank,
    )  # fmt: skip
    q_x, g_x = reference_aqe(q_emb, gallery.embeddings, 4, 3.0, 1)
    want = reference_metrics(reference_rerank(q_x, g_x, 10, 4, 0.3), *labels)
    assert_metrics_close(both[mode], want)

    only_aqe = evaluate(
        q_emb, q_pids, q_cams, g_emb, g_pids, g_cams, [mode], RANKS, query_expansion=aqe
    )
    want = reference_metrics(1 - unit(q_x) @ unit(g_x).T, *labels)
    assert_metrics_close(only_aqe[mode], want)


def test_minp_matches_the_loop_reference_with_ties():
    x = tied(7, 90)
    rng = np.random.default_rng(7)
    q_pids, g_pids = rng.integers(0, 6, 20), rng.integers(0, 6, 70)
    q_cams, g_masks = rng.integers(0, 3, 20), 1 << rng.integers(0, 3, 70)
    sims = unit(x[:20]) @ unit(x[20:]).T
    want = reference_metrics(-sims, q_pids, q_cams, g_pids, g_masks)
    got = rank_metrics(x[:20], q_pids, q_cams, x[20:], g_pids, g_masks, ranks=RANKS)
    assert_metrics_close(got, want)
    # The precomputed-score path ranks the same way, in any chunking.
    for chunk in (None, 1, 7):
        got = rank_scores(sims, q_pids, q_cams, g_pids, g_masks, ranks=RANKS, chunk_size=chunk)
        assert_metrics_close(got, want)


def test_minp_hand_made():
    # Kept ranking of the query: correct, wrong, correct, wrong, correct -> INP = 3 / 5.
    g_emb = np.array([[np.cos(a), np.sin(a)] for a in np.radians([10, 20, 30, 40, 50])])
    m = rank_metrics(np.array([[1.0, 0.0]]), [1], [0], g_emb, [1, 2, 1, 3, 1], [2] * 5)
    assert m["mINP"] == pytest.approx(3 / 5)
    assert m["mAP"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)


def test_cmc_curve():
    q_emb, q_pids, q_cams, g_emb, g_pids, g_cams = clustered(8)
    m = rank_metrics(q_emb, q_pids, q_cams, g_emb, g_pids, 1 << g_cams, cmc_curve=50)
    assert m["cmc"].shape == (50,)
    assert np.all(np.diff(m["cmc"]) >= 0)
    for k in (1, 5, 10, 20, 50):
        assert m["cmc"][k - 1] == pytest.approx(m[f"rank{k}"])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"k1": 0}, "--rerank_k1 must be an integer >= 1"),
        ({"k1": 5, "k2": 6}, "--rerank_k2 must not exceed --rerank_k1"),
        ({"k2": 0}, "--rerank_k2 must be an integer >= 1"),
        ({"lambda_value": 1.5}, "--rerank_lambda must lie in"),
        ({"k1": 2.5}, "--rerank_k1"),
    ],
)
def test_bad_rerank_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RerankParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"alpha": -1.0}, "--aqe_alpha must be >= 0"),
        ({"k": 0}, "--aqe_k must be an integer >= 1"),
        ({"times": 0}, "--aqe_times must be an integer >= 1"),
    ],
)
def test_bad_query_expansion_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QueryExpansionParams(**kwargs)


def test_evaluate_lowers_k1_above_the_gallery_with_a_note(capsys):
    q_emb, q_pids, q_cams, g_emb, g_pids, g_cams = clustered(6)
    modes = ["instance", "centroid"]
    got = evaluate(
        q_emb, q_pids, q_cams, g_emb, g_pids, g_cams, modes, RANKS,
        rerank=RerankParams(100000, 8, 0.3),
    )  # fmt: skip
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 2 and all(n.startswith("note: --rerank_k1=100000") for n in notes)
    for mode, note in zip(modes, notes):
        gallery = build_search_gallery(mode, g_emb, g_pids, g_cams, q_pids, q_cams)
        g = len(gallery)
        assert f"the {g} items of the {mode} gallery" in note
        assert f"k1={g}, k2={min(8, g)}" in note
        want = reference_rerank(q_emb, gallery.embeddings, g, min(8, g), 0.3)
        labels = (q_pids, gallery.query_cams, gallery.pids, gallery.cam_masks)
        assert_metrics_close(got[mode], reference_metrics(want, *labels))


def test_available_memory_reading(tmp_path):
    from ctl_jax import memory

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 2048 kB\nMemFree: 1024 kB\nMemAvailable: 1536 kB\n")
    assert memory.available_bytes(str(meminfo)) == 1536 * 1024
    memory.require_memory(1536 * 1024, "x", "y", str(meminfo))  # fits exactly
    with pytest.raises(OptionError, match=r"x needs about 0.0 GB of memory, .*: y$"):
        memory.require_memory(1536 * 1024 + 1, "x", "y", str(meminfo))
    # Without the field or the file (not Linux): nothing is known, nothing is refused.
    meminfo.write_text("MemTotal: 2048 kB\n")
    assert memory.available_bytes(str(meminfo)) is None
    assert memory.available_bytes(str(tmp_path / "missing")) is None
    memory.require_memory(10**18, "x", "y", str(tmp_path / "missing"))
