"""Pair verification (AUC, TPR at FPR, thresholds), ROC/CMC pictures and open-set search
thresholds, against brute-force references over every pair and every threshold."""

import json

import numpy as np
import pytest
from PIL import Image

from ctl_jax.errors import FileContentError
from ctl_jax.evaluation import (
    MODES,
    build_search_gallery,
    evaluate,
    l2_normalize,
    verification_metrics,
)
from ctl_jax.evaluation.plots import write_plots
from ctl_jax.evaluation.report import format_verification, write_metrics_json
from ctl_jax.evaluation.verification import FPR_TARGETS, VerificationPairs, fpr_key
from ctl_jax.retrieval.open_set import apply_min_score, calibrated_min_score, parse_min_score


# ----------------------------------------------------------------------------- references
def reference_pairs(q_emb, q_pids, q_cams, g_emb, g_pids, g_masks):
    """(scores, is_positive) of every pair the protocol keeps, one pair at a time. The
    cosines are float32 products as a search computes them (a threshold is compared with
    those, to the last bit)."""
    q = l2_normalize(q_emb)
    g = l2_normalize(g_emb)
    cosine = q @ g.T
    scores, positive = [], []
    for i in range(len(q)):
        for j in range(len(g)):
            same = q_pids[i] == g_pids[j]
            if same and (g_masks[j] >> q_cams[i]) & 1:
                continue  # same identity, a camera the item was built from
            scores.append(float(cosine[i, j]))
            positive.append(same)
    return np.array(scores), np.array(positive)


def reference_auc(scores, positive):
    pos, neg = scores[positive], scores[~positive]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def reference_tpr_at_fpr(scores, positive, target):
    """Every score (and +inf) as a threshold "accept score >= t": the largest TPR with
    FPR <= target, and the largest threshold giving it (the smallest FPR for that TPR)."""
    pos, neg = scores[positive], scores[~positive]
    best = (-1.0, None)
    for t in sorted(set(scores.tolist())) + [np.inf]:
        fpr = (neg >= t).sum() / len(neg)
        tpr = (pos >= t).sum() / len(pos)
        if fpr <= target + 1e-12 and (tpr > best[0] or (tpr == best[0] and tpr > 0)):
            best = (tpr, t)
    return best


# ---------------------------------------------------------------------------------- data
def data(seed, num_q=20, num_g=90, dim=6, num_ids=8, quantise=False):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((num_ids, dim))
    q_pids, g_pids = rng.integers(0, num_ids + 2, num_q), rng.integers(0, num_ids, num_g)
    q_emb = centers[q_pids % num_ids] + rng.standard_normal((num_q, dim))
    g_emb = centers[g_pids] + rng.standard_normal((num_g, dim))
    if quantise:  # many exactly tied scores, also between positive and negative pairs
        q_emb, g_emb = tied(rng, q_pids % num_ids, num_ids), tied(rng, g_pids, num_ids)
    return (
        q_emb.astype(np.float32),
        q_pids,
        rng.integers(0, 3, num_q),
        g_emb.astype(np.float32),
        g_pids,
        rng.integers(0, 3, num_g),
    )


def tied(rng, pids, num_ids, dim=8):
    """Unit vectors with four entries +-0.5 (inner products are multiples of 1/4, exact in
    float32): an identity's prototype, or with probability 0.4 a random such vector."""

    def draw():
        x = np.zeros(dim)
        x[rng.choice(dim, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
        return x

    prototypes = [draw() for _ in range(num_ids)]
    return np.array([prototypes[p] if rng.random() < 0.6 else draw() for p in pids])


# --------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("quantise", [False, True])
def test_verification_matches_brute_force(quantise):
    q_emb, q_pids, q_cams, g_emb, g_pids, g_cams = data(0, quantise=quantise)
    masks = 1 << g_cams
    scores, positive = reference_pairs(q_emb, q_pids, q_cams, g_emb, g_pids, masks)
    targets = (1e-3, 1e-2, 0.05, 0.3)
    got, curve = verification_metrics(q_emb, q_pids, q_cams, g_emb, g_pids, masks, targets)
    assert got["pairs"] == len(scores) and got["positives"] == positive.sum()
    assert got["auc"] == pytest.approx(reference_auc(scores, positive), abs=1e-6)
    for target in targets:
        tpr, threshold = reference_tpr_at_fpr(scores, positive, target)
        assert got["tpr_at_fpr"][fpr_key(target)] == pytest.approx(tpr, abs=1e-12), target
        if tpr > 0:
            assert got["threshold_at_fpr"][fpr_key(target)] == pytest.approx(threshold, abs=1e-6)
        # The threshold delivers what it promises on these pairs.
        t = np.float32(got["threshold_at_fpr"][fpr_key(target)])
        neg, pos = scores[~positive].astype(np.float32), scores[positive].astype(np.float32)
        assert (neg >= t).mean() <= target and (pos >= t).mean() == pytest.approx(tpr)
    assert np.all(np.diff(curve.tpr) >= 0) and curve.fpr[-1] == pytest.approx(1.0)
    if quantise:
        assert len(np.unique(scores)) < 60  # the tie case really has ties


def test_verification_sampling_keeps_every_strided_query():
    q_emb, q_pids, q_cams, g_emb, g_pids, g_cams = data(1)
    masks = 1 << g_cams
    full, _ = verification_metrics(q_emb[::3], q_pids[::3], q_cams[::3], g_emb, g_pids, masks)
    sampled, _ = verification_metrics(
        q_emb, q_pids, q_cams, g_emb, g_pids, masks, max_pairs=len(q_emb) * len(g_emb) // 3
    )
    assert sampled.pop("queries_used") == len(q_emb[::3])
    assert sampled == full


@pytest.mark.parametrize("block", [1, 4, 7, 20])
def test_pairs_fed_by_blocks_of_all_queries_equal_the_sampled_computation(block):
    """What `evaluate` does: the ranking's similarity blocks of every query, in blocks of
    any size, of which the pairs keep every stride-th query."""
    q_emb, q_pids, q_cams, g_emb, g_pids, g_cams = data(3)
    masks = 1 << g_cams
    max_pairs = len(q_emb) * len(g_emb) // 3
    want, _ = verification_metrics(q_emb, q_pids, q_cams, g_emb, g_pids, masks, max_pairs=max_pairs)
    pairs = VerificationPairs(q_pids, q_cams, g_pids, masks, max_pairs)
    sims = l2_normalize(q_emb) @ l2_normalize(g_emb).T
    for start in range(0, len(q_emb), block):
        pairs.add(start, sims[start : start + block])
    got, _ = pairs.finish()
    assert got.pop("queries_used") == want.pop("queries_used") == len(q_emb[::3])
    for key in ("tpr_at_fpr", "threshold_at_fpr"):  # float rounding of other matmul shapes
        assert got.pop(key) == pytest.approx(want.pop(key), abs=1e-6)
    assert got == pytest.approx(want, abs=1e-6)


def test_verification_without_positives_or_negatives_is_nan():
    emb = np.eye(3, dtype=np.float32)
    none_pos, _ = verification_metrics(emb, [1, 2, 3], [0, 0, 0], emb, [4, 5, 6], [2, 2, 2])
    assert none_pos["positives"] == 0 and none_pos["pairs"] == 9
    assert np.isnan(none_pos["auc"]) and np.isnan(none_pos["tpr_at_fpr"]["0.01"])
    only_pos, _ = verification_metrics(emb[:1], [1], [0], emb, [1, 1, 1], [2, 2, 2])
    assert only_pos["positives"] == 3 and np.isnan(only_pos["auc"])


def test_evaluate_adds_verification_per_mode_and_json_keys(tmp_path):
    q_emb, q_pids, q_cams, g_emb, g_pids, g_cams = data(2)
    res, curves = evaluate(
        q_emb, q_pids, q_cams, g_emb, g_pids, g_cams, MODES, verification=True,
        return_curves=True,
    )  # fmt: skip
    assert list(res) == [*MODES, "verification"]
    for mode in MODES:
        gallery = build_search_gallery(mode, g_emb, g_pids, g_cams, q_pids, q_cams)
        want, _ = verification_metrics(
            q_emb, q_pids, gallery.query_cams, gallery.embeddings, gallery.pids,
            gallery.cam_masks,
        )  # fmt: skip
        assert res["verification"][mode] == want
        assert curves[mode]["cmc"].shape == (50,) and len(curves[mode]["roc"].fpr) > 10
    # Centroid galleries: one pair per query and centroid.
    assert res["verification"]["centroid"]["pairs"] == len(q_pids) * len(np.unique(g_pids))
    path = write_metrics_json(tmp_path / "m.json", res)
    block = json.loads(path.read_text())["verification"]["instance"]
    assert set(block) == {"pairs", "positives", "auc", "tpr_at_fpr", "threshold_at_fpr"}
    assert set(block["tpr_at_fpr"]) == {"0.0001", "0.001", "0.01"} == set(map(fpr_key, FPR_TARGETS))
    table = format_verification(res)
    assert "TPR@FPR=0.001" in table and table.count("\n") == len(MODES) + 1
    # Without the option nothing changes.
    plain = evaluate(q_emb, q_pids, q_cams, g_emb, g_pids, g_cams, MODES)
    assert list(plain) == list(MODES) and format_verification(plain) == ""


def test_plots_are_pictures_and_never_overwritten(tmp_path):
    q_emb, q_pids, q_cams, g_emb, g_pids, g_cams = data(3)
    _, curves = evaluate(
        q_emb, q_pids, q_cams, g_emb, g_pids, g_cams, MODES, verification=True,
        return_curves=True,
    )  # fmt: skip
    written = write_plots(tmp_path / "plots", curves)
    assert [p.name for p in written] == ["roc.png", "cmc.png"]
    for path in written:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 400
            colours = image.convert("RGB").getcolors(1 << 20)
            assert len(colours) > 10  # lines, text and grid, not a blank canvas
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_plots(tmp_path / "plots", curves)
    no_roc = {mode: {"cmc": c["cmc"], "roc": None} for mode, c in curves.items()}
    assert [p.name for p in write_plots(tmp_path / "cmc_only", no_roc)] == ["cmc.png"]


@pytest.mark.parametrize("text", ["1.5", "-2", "abc", "auto:0", "auto:1", "auto:x", "nan"])
def test_bad_min_score_is_a_one_line_error(text):
    with pytest.raises(ValueError, match="--min_score") as info:
        parse_min_score(text)
    assert "\n" not in str(info.value)


def test_min_score_parsing_and_application():
    assert parse_min_score("0.5").value == 0.5 and parse_min_score("-1").value == -1.0
    auto = parse_min_score("auto:0.001")
    assert auto.value is None and auto.fpr == 0.001
    scores = np.array([[0.9, 0.5, 0.2], [0.4, 0.3, 0.1]], np.float32)
    indices = np.array([[3, 1, -1], [0, 2, 4]])
    kept, known = apply_min_score(scores, indices, 0.45)
    np.testing.assert_array_equal(kept, [[3, 1, -1], [-1, -1, -1]])
    np.testing.assert_array_equal(known, [True, False])
    # A threshold equal to a score keeps it (float32 scores, float64 threshold).
    kept, known = apply_min_score(scores, indices, float(np.float32(0.4)))
    assert known.all() and kept[1, 0] == 0


def test_calibration_reads_the_matching_mode(tmp_path):
    q_emb, q_pids, q_cams, g_emb, g_pids, g_cams = data(4)
    res = evaluate(
        q_emb, q_pids, q_cams, g_emb, g_pids, g_cams, ["instance", "centroid"], verification=True
    )
    path = write_metrics_json(tmp_path / "m.json", res)
    value, mode = calibrated_min_score(path, 0.001, "centroid")
    assert (
        mode == "centroid" and value == res["verification"]["centroid"]["threshold_at_fpr"]["0.001"]
    )
    assert calibrated_min_score(path, 0.01, "instance")[0] == pytest.approx(
        res["verification"]["instance"]["threshold_at_fpr"]["0.01"]
    )
    with pytest.raises(ValueError, match="no instance threshold at FPR 0.05"):
        calibrated_min_score(path, 0.05, "instance")

    no_block = write_metrics_json(tmp_path / "plain.json", {"instance": res["instance"]})
    with pytest.raises(ValueError, match="has no verification block"):
        calibrated_min_score(no_block, 0.001, "instance")
    only_camera = write_metrics_json(
        tmp_path / "cam.json", {"verification": {"centroid_camera": {"threshold_at_fpr": {}}}}
    )
    with pytest.raises(ValueError, match="--modes=centroid"):
        calibrated_min_score(only_camera, 0.001, "centroid")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a metrics JSON"):
        calibrated_min_score(tmp_path / "bad.json", 0.001, "instance")
    with pytest.raises(FileNotFoundError, match="--calibration"):
        calibrated_min_score(tmp_path / "missing.json", 0.001, "instance")


@pytest.mark.parametrize(
    "value,message",
    [
        (7.5, "must be a cosine score, a number in [-1, 1], got 7.5"),
        (-1.5, "got -1.5"),
        (True, "got True"),
        ("0.3", "got '0.3'"),
        ([0.3], "got [0.3]"),
        (float("nan"), "has no instance threshold at FPR 0.001 (it is nan; available: auto:0.01)"),
        (float("inf"), "has no instance threshold at FPR 0.001 (it is inf; available: auto:0.01)"),
        (None, "has no instance threshold at FPR 0.001 (available: auto:0.01)"),
    ],
)
def test_calibration_threshold_values_are_checked(tmp_path, value, message):
    path = tmp_path / "m.json"
    block = {"threshold_at_fpr": {"0.001": value, "0.01": 0.25, "0.1": "x"}}
    path.write_text(json.dumps({"verification": {"instance": block}}))
    with pytest.raises(FileContentError) as raised:
        calibrated_min_score(path, 0.001, "instance")
    text = str(raised.value)
    assert "\n" not in text and str(path) in text and message in text, text
    if "must be" in text:
        assert "verification.instance.threshold_at_fpr['0.001']" in text
    assert calibrated_min_score(path, 0.01, "instance") == (0.25, "instance")
    for edge in (-1, 1, 0):  # the ends of the range and an integer are thresholds
        block["threshold_at_fpr"]["0.001"] = edge
        path.write_text(json.dumps({"verification": {"instance": block}}))
        assert calibrated_min_score(path, 0.001, "instance") == (float(edge), "instance")


def test_calibration_thresholds_not_a_mapping(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"verification": {"instance": {"threshold_at_fpr": [0.2]}}}))
    with pytest.raises(FileContentError, match="threshold_at_fpr must map FPR to threshold"):
        calibrated_min_score(path, 0.001, "instance")
