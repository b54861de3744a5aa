"""The contrastive loss (Hadsell, Chopra, LeCun 2006) of ctl_jax/losses.py against a loop-based
NumPy reference over explicit pairs, with padded P x M batches."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctl_jax import losses
from ctl_jax.errors import ConfigError


def ref_contrastive(x, labels, valid, margin, distance):
    """(loss, mean positive distance, mean negative distance) over unordered valid pairs."""
    terms, pos, neg = [], [], []
    n = len(x)
    for i in range(n):
        for j in range(i + 1, n):
            if not (valid[i] and valid[j]):
                continue
            a, b = x[i].astype(np.float64), x[j].astype(np.float64)
            if distance == "euclidean":
                d = math.sqrt(max(float(np.sum((a - b) ** 2)), 1e-12))
            else:
                d = 1.0 - float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))
            if labels[i] == labels[j]:
                sq = float(np.sum((a - b) ** 2)) if distance == "euclidean" else d * d
                terms.append(0.5 * sq)
                pos.append(d)
            else:
                terms.append(0.5 * max(0.0, margin - d) ** 2)
                neg.append(d)
    mean = lambda v: float(np.mean(v)) if v else 0.0  # noqa: E731
    return mean(terms), mean(pos), mean(neg)


def make_batch(seed, p=4, m=3, counts=(3, 1, 2, 3), dim=5, scale=0.4):
    rng = np.random.default_rng(seed)
    x = (scale * rng.standard_normal((p * m, dim))).astype(np.float32)
    labels = np.repeat(rng.choice(100, p, replace=False), m).astype(np.int32)
    valid = np.zeros(p * m, bool)
    for i, c in enumerate(counts):
        valid[i * m : i * m + c] = True
    labels[~valid] = rng.integers(0, 100, (~valid).sum())  # padding labels: anything
    return x, labels, valid


contrastive_jit = jax.jit(losses.contrastive_loss, static_argnames=("distance",))


@pytest.mark.parametrize(
    "distance, margin", [("euclidean", 1.0), ("euclidean", 0.3), ("cosine", 0.7)]
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_contrastive_matches_reference_with_padding(seed, distance, margin):
    x, labels, valid = make_batch(seed)
    loss, aux = contrastive_jit(x, labels, valid, margin, distance=distance)
    want, want_pos, want_neg = ref_contrastive(x, labels, valid, margin, distance)
    assert float(loss) == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert float(aux["dist_pos"]) == pytest.approx(want_pos, rel=1e-5)
    assert float(aux["dist_neg"]) == pytest.approx(want_neg, rel=1e-5)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_contrastive_gradient_and_padding_rows(distance):
    x, labels, valid = make_batch(3)
    margin = 1.0 if distance == "euclidean" else 0.7
    grad = np.asarray(
        jax.grad(lambda v: contrastive_jit(v, labels, valid, margin, distance=distance)[0])(x)
    )
    h = 1e-3
    numeric = np.zeros_like(grad)
    for index in np.ndindex(x.shape):
        up, down = x.astype(np.float64), x.astype(np.float64)
        up[index] += h
        down[index] -= h
        f_up = ref_contrastive(up, labels, valid, margin, distance)[0]
        f_down = ref_contrastive(down, labels, valid, margin, distance)[0]
        numeric[index] = (f_up - f_down) / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=2e-3, atol=2e-4)
    assert not grad[~valid].any()
    # Whatever the padding rows hold (even NaN), nothing changes.
    garbage = x.copy()
    garbage[~valid] = np.nan
    np.testing.assert_allclose(
        contrastive_jit(garbage, labels, valid, margin, distance=distance)[0],
        contrastive_jit(x, labels, valid, margin, distance=distance)[0],
        rtol=1e-6,
    )


def test_contrastive_hand_computed_and_degenerate_cases():
    x = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]], np.float32)
    labels = np.array([1, 2, 1])
    valid = np.ones(3, bool)
    # Pairs: (0, 1) and (1, 2) negatives at d = 5 < margin 6, each 0.5 (6 - 5)^2 = 0.5;
    # (0, 2) a positive at d = 0, 0. Mean 1/3.
    loss, aux = losses.contrastive_loss(x, labels, valid, margin=6.0)
    assert float(loss) == pytest.approx(1.0 / 3.0, rel=1e-6)
    assert float(aux["dist_neg"]) == pytest.approx(5.0, rel=1e-6)
    grad = jax.grad(lambda v: losses.contrastive_loss(v, labels, valid, 6.0)[0])(jnp.asarray(x))
    assert np.isfinite(np.asarray(grad)).all()  # coincident positives: no 0/0
    # No valid pair at all: 0, finite gradient.
    loss, _ = losses.contrastive_loss(x, labels, np.array([True, False, False]), margin=1.0)
    assert float(loss) == 0.0
    with pytest.raises(ConfigError, match="unknown distance"):
        losses.contrastive_loss(x, labels, valid, distance="manhattan")
