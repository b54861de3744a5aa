"""Tests of ctl_jax.losses against plain loop-based NumPy references written from
docs/method.md, 'Losses'.

The references below deliberately share no code with the module: explicit Python loops over
anchors, rounds and identities, float64, distances computed pair by pair.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctl_jax import losses

# ---------------------------------------------------------------------------------------------
# NumPy references (docs/method.md, 'Losses')
# ---------------------------------------------------------------------------------------------


def ref_distance(a, b, distance):
    if distance == "euclidean":
        return np.sqrt(max(float(np.sum((a - b) ** 2)), 1e-12))
    return 1.0 - float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))


def ref_triplet(x, labels, valid, margin, distance):
    """Returns (loss, mean d_ap, mean d_an, number of counted anchors)."""
    rows = [i for i in range(len(x)) if valid[i]]
    per_anchor, aps, ans = [], [], []
    for a in rows:
        pos = [0.0]  # the anchor itself, at distance 0
        neg = []
        for j in rows:
            if j == a:
                continue
            d = ref_distance(x[a], x[j], distance)
            (pos if labels[j] == labels[a] else neg).append(d)
        if not neg:
            continue
        d_ap, d_an = max(pos), min(neg)
        if margin is None:
            per_anchor.append(np.logaddexp(0.0, d_ap - d_an))
        else:
            per_anchor.append(max(0.0, d_ap - d_an + margin))
        aps.append(d_ap)
        ans.append(d_an)
    if not per_anchor:
        return 0.0, 0.0, 0.0, 0
    return np.mean(per_anchor), np.mean(aps), np.mean(ans), len(per_anchor)


def ref_ctl(x, labels, valid, m, margin, distance):
    """Returns (loss, number of counted rounds, mean norm of the centroids used)."""
    p_count = len(x) // m
    round_losses, norms = [], []
    for i in range(m):
        points, point_labels, round_norms = [], [], []
        for p in range(p_count):
            q = p * m + i
            if not valid[q]:
                continue
            others = [x[p * m + j] for j in range(m) if j != i and valid[p * m + j]]
            if not others:
                continue
            centroid = np.mean(others, axis=0)
            points += [x[q], centroid]
            point_labels += [labels[q], labels[q]]
            round_norms.append(np.linalg.norm(centroid))
        if len(round_norms) <= 1:
            continue
        loss, _, _, _ = ref_triplet(
            np.array(points), point_labels, [True] * len(points), margin, distance
        )
        round_losses.append(loss)
        norms += round_norms
    if not round_losses:
        return 0.0, 0, 0.0
    return np.mean(round_losses), len(round_losses), np.mean(norms)


def ref_center(x, labels, centers, valid):
    total, count = 0.0, 0
    for i in range(len(x)):
        if valid[i]:
            total += float(np.sum((x[i] - centers[labels[i]]) ** 2))
            count += 1
    return total / count if count else 0.0


def ref_ce(logits, labels, valid, epsilon):
    total, count = 0.0, 0
    k = logits.shape[1]
    for i in range(len(logits)):
        if not valid[i]:
            continue
        row = logits[i] - np.max(logits[i])
        log_probs = row - np.log(np.sum(np.exp(row)))
        for c in range(k):
            target = (1 - epsilon) * (c == labels[i]) + epsilon / k
            total -= target * log_probs[c]
        count += 1
    return total / count if count else 0.0


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------

# (P, M, valid samples per identity when padded): every padded case has identities with fewer
# than M samples, most have one with a single sample.
CASES = {
    (2, 2): [1, 2],
    (3, 4): [4, 1, 2],
    (5, 5): [5, 3, 1, 5, 2],
    (2, 4): [3, 2],
    (5, 2): [2, 1, 2, 2, 1],
    (3, 5): [2, 5, 4],
}


def make_batch(seed, p, m, counts=None, dim=6):
    """P x M batch with distinct random labels per identity; padding rows get a label that is
    the identity's, 0 or random, and random embeddings."""
    rng = np.random.default_rng(seed)
    counts = [m] * p if counts is None else counts
    pids = rng.choice(1000, size=p, replace=False)
    x = rng.standard_normal((p * m, dim)).astype(np.float32)
    labels = np.repeat(pids, m)
    valid = np.zeros(p * m, dtype=bool)
    for i, c in enumerate(counts):
        valid[i * m : i * m + c] = True
        for j in range(i * m + c, i * m + m):
            labels[j] = rng.choice([pids[i], 0, rng.integers(1000)])
    return x, labels.astype(np.int32), valid


triplet_jit = jax.jit(losses.batch_hard_triplet_loss, static_argnames=("distance",))
ctl_jit = jax.jit(losses.centroid_triplet_loss, static_argnames=("num_instances", "distance"))

PM = list(CASES)
MARGINS = [0.3, 0.5, None]
DISTANCES = ["euclidean", "cosine"]
TOL = {"rtol": 1e-4, "atol": 1e-5}


# ---------------------------------------------------------------------------------------------
# Values against the references
# ---------------------------------------------------------------------------------------------


def test_triplet_hand_computed():
    x = np.array([[0.0], [1.0], [3.0], [5.0]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1])
    loss, aux = triplet_jit(x, labels, np.ones(4, bool), margin=0.5)
    # Only anchor 3.0 violates the margin: d_ap = 2, d_an = 2 -> 0.5, mean over 4 anchors.
    np.testing.assert_allclose(loss, 0.125, **TOL)
    np.testing.assert_allclose(aux["dist_ap"], 1.5, **TOL)
    np.testing.assert_allclose(aux["dist_an"], 2.75, **TOL)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("margin", MARGINS)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("pm", PM)
def test_triplet_matches_reference(pm, padded, margin, distance):
    p, m = pm
    x, labels, valid = make_batch(hash((pm, padded)) % 2**32, p, m, CASES[pm] if padded else None)
    loss, aux = triplet_jit(x, labels, valid, margin=margin, distance=distance)
    r_loss, r_ap, r_an, _ = ref_triplet(x.astype(np.float64), labels, valid, margin, distance)
    np.testing.assert_allclose(loss, r_loss, **TOL)
    np.testing.assert_allclose(aux["dist_ap"], r_ap, **TOL)
    np.testing.assert_allclose(aux["dist_an"], r_an, **TOL)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("margin", MARGINS)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("pm", PM)
def test_ctl_matches_reference(pm, padded, margin, distance):
    p, m = pm
    x, labels, valid = make_batch(hash((pm, padded)) % 2**32, p, m, CASES[pm] if padded else None)
    loss, aux = ctl_jit(x, labels, valid, num_instances=m, margin=margin, distance=distance)
    r_loss, r_rounds, r_norm = ref_ctl(x.astype(np.float64), labels, valid, m, margin, distance)
    np.testing.assert_allclose(loss, r_loss, **TOL)
    np.testing.assert_allclose(aux["num_rounds"], r_rounds)
    np.testing.assert_allclose(aux["centroid_norm"], r_norm, **TOL)


def test_ctl_round_with_one_identity_is_skipped():
    # Identity 0 has 1 sample (never a centroid), identity 1 is full: no round has two
    # identities left, so the loss is 0 and no round counts.
    x, labels, valid = make_batch(0, 2, 2, [1, 2])
    loss, aux = ctl_jit(x, labels, valid, num_instances=2)
    assert float(loss) == 0.0 and float(aux["num_rounds"]) == 0.0
    # Identities with 2, 2, 1 samples of M = 3: identity 2 never has a centroid, and slot 2 is
    # padding for all, so rounds 0 and 1 count (identities 0 and 1) and round 2 is skipped.
    x, labels, valid = make_batch(1, 3, 3, [2, 2, 1])
    _, aux = ctl_jit(x, labels, valid, num_instances=3)
    assert float(aux["num_rounds"]) == 2.0


@pytest.mark.parametrize("pm", [(3, 4), (5, 2)])
def test_center_loss_matches_reference(pm):
    p, m = pm
    x, labels, valid = make_batch(7, p, m, CASES[pm])
    rng = np.random.default_rng(1)
    labels = np.repeat(rng.permutation(p + 3)[:p], m)  # class indices into centers
    labels[~valid] = rng.integers(-5, 50, size=int((~valid).sum()))  # garbage on padding
    centers = rng.standard_normal((p + 3, x.shape[1])).astype(np.float32)
    center_jit = jax.jit(losses.center_loss)
    loss = center_jit(x, labels, centers, valid)
    np.testing.assert_allclose(loss, ref_center(x, labels, centers, valid), **TOL)
    assert float(center_jit(x, labels, centers, np.zeros_like(valid))) == 0.0


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_cross_entropy_label_smooth_matches_reference(epsilon):
    rng = np.random.default_rng(3)
    logits = (3 * rng.standard_normal((8, 5))).astype(np.float32)
    labels = rng.integers(0, 5, size=8)
    valid = np.array([1, 1, 0, 1, 1, 1, 0, 0], dtype=bool)
    logits[~valid] = np.nan  # padding must not leak
    loss = jax.jit(losses.cross_entropy_label_smooth)(logits, labels, valid, epsilon)
    np.testing.assert_allclose(loss, ref_ce(logits, labels, valid, epsilon), **TOL)
    grad = jax.jit(jax.grad(losses.cross_entropy_label_smooth))(logits, labels, valid, epsilon)
    assert np.all(np.isfinite(grad)) and np.all(grad[~valid] == 0)
    assert float(losses.cross_entropy_label_smooth(logits, labels, np.zeros(8, bool))) == 0.0


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


def central_differences(f, x, h=1e-5):
    grad = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        plus, minus = x.copy(), x.copy()
        plus[idx] += h
        minus[idx] -= h
        grad[idx] = (f(plus) - f(minus)) / (2 * h)
    return grad


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("margin", [0.5, None])
def test_triplet_gradient_matches_finite_differences(margin, distance):
    x, labels, valid = make_batch(11, 3, 4, [4, 2, 3], dim=4)
    grad = jax.jit(
        jax.grad(lambda e: losses.batch_hard_triplet_loss(e, labels, valid, margin, distance)[0])
    )
    ref = central_differences(
        lambda e: ref_triplet(e, labels, valid, margin, distance)[0], x.astype(np.float64)
    )
    assert np.abs(ref).max() > 1e-3  # the check is not vacuous
    np.testing.assert_allclose(grad(x), ref, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("margin", [0.5, None])
def test_ctl_gradient_matches_finite_differences(margin, distance):
    x, labels, valid = make_batch(12, 3, 4, [4, 2, 3], dim=4)
    grad = jax.jit(
        jax.grad(lambda e: losses.centroid_triplet_loss(e, labels, valid, 4, margin, distance)[0])
    )
    ref = central_differences(
        lambda e: ref_ctl(e, labels, valid, 4, margin, distance)[0], x.astype(np.float64)
    )
    assert np.abs(ref).max() > 1e-3
    np.testing.assert_allclose(grad(x), ref, rtol=1e-3, atol=1e-4)


def test_center_loss_gradient():
    x, _, valid = make_batch(5, 3, 2, [2, 1, 2], dim=3)
    labels = np.repeat(np.arange(3), 2)
    centers = np.random.default_rng(0).standard_normal((3, 3)).astype(np.float32)
    g_x, g_c = jax.jit(jax.grad(losses.center_loss, argnums=(0, 2)))(x, labels, centers, valid)
    n = valid.sum()
    want_x = np.where(valid[:, None], 2 * (x - centers[labels]) / n, 0)
    np.testing.assert_allclose(g_x, want_x, **TOL)
    want_c = np.zeros_like(centers)
    np.add.at(want_c, labels[valid], -want_x[valid])
    np.testing.assert_allclose(g_c, want_c, **TOL)


# ---------------------------------------------------------------------------------------------
# Degenerate inputs: zero distances, nearly empty batches, padding
# ---------------------------------------------------------------------------------------------


@functools.cache
def both_losses(distance, margin):
    """Jitted value_and_grad (wrt embeddings) of both triplet losses, M = 3."""
    triplet = lambda e, lab, v: losses.batch_hard_triplet_loss(e, lab, v, margin, distance)[0]
    ctl = lambda e, lab, v: losses.centroid_triplet_loss(e, lab, v, 3, margin, distance)[0]
    return {
        name: jax.jit(jax.value_and_grad(fn)) for name, fn in [("triplet", triplet), ("ctl", ctl)]
    }


def degenerate_batches():
    x, labels, valid = make_batch(21, 3, 3, [3, 2, 3], dim=4)
    same_within = np.repeat(x[::3], 3, axis=0)  # every identity's rows identical
    all_same = np.tile(x[:1], (9, 1))  # negatives at distance zero too
    zeros = np.zeros_like(x)  # zero vectors: the cosine norm clamp is exercised
    one_valid = np.zeros(9, dtype=bool)
    one_valid[0] = True
    return {
        "same_within": (same_within, labels, valid),
        "all_same": (all_same, labels, valid),
        "zeros": (zeros, labels, valid),
        "one_valid": (x, labels, one_valid),
        "none_valid": (x, labels, np.zeros(9, dtype=bool)),
    }


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("margin", [0.5, None])
@pytest.mark.parametrize("name", list(degenerate_batches()))
def test_degenerate_inputs_are_finite(name, margin, distance):
    x, labels, valid = degenerate_batches()[name]
    for loss_name, value_and_grad in both_losses(distance, margin).items():
        value, grad = value_and_grad(x, labels, valid)
        assert np.isfinite(value), (loss_name, value)
        assert np.all(np.isfinite(grad)), (loss_name, grad)
        if name in ("one_valid", "none_valid"):
            assert float(value) == 0.0 and np.all(grad == 0), loss_name


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("margin", [0.5, None])
def test_invalid_rows_are_ignored(margin, distance):
    x, labels, valid = make_batch(31, 3, 3, [3, 1, 2])
    rng = np.random.default_rng(0)
    x2, labels2 = x.copy(), labels.copy()
    x2[~valid] = rng.standard_normal(x2[~valid].shape) * 100
    x2[np.flatnonzero(~valid)[0]] = np.nan
    labels2[~valid] = labels[valid][: (~valid).sum()]  # collide with real identities
    for name, value_and_grad in both_losses(distance, margin).items():
        value, grad = value_and_grad(x, labels, valid)
        value2, grad2 = value_and_grad(x2, labels2, valid)
        np.testing.assert_allclose(value2, value, rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(grad2, grad, rtol=1e-6, atol=1e-7, err_msg=name)
        assert np.all(grad2[~valid] == 0), name


# ---------------------------------------------------------------------------------------------
# jit and interface
# ---------------------------------------------------------------------------------------------


def test_margin_is_traced_not_recompiled():
    traces = []

    @functools.partial(jax.jit, static_argnames=("distance",))
    def both(x, labels, valid, margin, distance):
        traces.append(distance)
        triplet, _ = losses.batch_hard_triplet_loss(x, labels, valid, margin, distance)
        ctl, _ = losses.centroid_triplet_loss(x, labels, valid, 3, margin, distance)
        return triplet, ctl

    x, labels, valid = make_batch(41, 3, 3, [3, 2, 3])
    results = [both(x, labels, valid, margin, "euclidean") for margin in (0.3, 0.5, 0.7)]
    assert len(traces) == 1
    for margin, (triplet, ctl) in zip((0.3, 0.5, 0.7), results):
        want_triplet = ref_triplet(x, labels, valid, margin, "euclidean")[0]
        np.testing.assert_allclose(triplet, want_triplet, **TOL)
        np.testing.assert_allclose(ctl, ref_ctl(x, labels, valid, 3, margin, "euclidean")[0], **TOL)


def test_inputs_are_cast_to_float32():
    x, labels, valid = make_batch(51, 2, 2)
    loss, _ = triplet_jit(jnp.asarray(x, jnp.bfloat16), labels, valid)
    assert loss.dtype == jnp.float32
    loss, _ = ctl_jit(jnp.asarray(x, jnp.bfloat16), labels, valid, num_instances=2)
    assert loss.dtype == jnp.float32


def test_bad_arguments_raise():
    x, labels, valid = make_batch(61, 2, 3)
    with pytest.raises(ValueError, match="distance"):
        losses.batch_hard_triplet_loss(x, labels, valid, distance="manhattan")
    with pytest.raises(ValueError, match="distance"):
        losses.centroid_triplet_loss(x, labels, valid, 3, distance="manhattan")
    with pytest.raises(ValueError, match="groups"):
        losses.centroid_triplet_loss(x, labels, valid, num_instances=4)
