"""CosFace / ArcFace heads (ctl_jax/margin_losses.py, ctl_jax/models/classifier.py) against
loop-based NumPy references written from the papers (Wang et al. 2018; Deng et al. 2019 and
the threshold handling of their reference code), values and gradients, at and around the
margin threshold; and the margin heads inside the training step."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctl_jax import losses, margin_losses
from ctl_jax.errors import ConfigError
from ctl_jax.models.classifier import CosineClassifier

# ---------------------------------------------------------------------------------------------
# NumPy references (float64, loops over samples and classes)
# ---------------------------------------------------------------------------------------------


def ref_target(cos, kind, m, easy=False):
    """The target-class logit before scaling, from the angle theta = arccos(cos)."""
    if kind == "cosface":
        return cos - m
    theta = math.acos(min(max(cos, -1.0), 1.0))
    if easy:
        return math.cos(theta + m) if cos > 0 else cos
    # Past theta = pi - m, cos(theta + m) would grow again: the reference code switches to
    # cos(theta) - m sin(m) there.
    return math.cos(theta + m) if theta < math.pi - m else cos - m * math.sin(m)


def ref_loss(cosine, labels, valid, kind, s, m, eps, easy=False):
    """Mean over valid samples of the label-smoothed cross-entropy of the margin logits."""
    n, k = cosine.shape
    total, count = 0.0, 0
    for i in range(n):
        if not valid[i]:
            continue
        logits = [
            s * (ref_target(cosine[i, j], kind, m, easy) if j == labels[i] else cosine[i, j])
            for j in range(k)
        ]
        top = max(logits)
        log_z = top + math.log(sum(math.exp(v - top) for v in logits))
        for j in range(k):
            target = (1 - eps) * (j == labels[i]) + eps / k
            total -= target * (logits[j] - log_z)
        count += 1
    return total / max(count, 1)


def numeric_grad(f, x, h=1e-6):
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[index] += h
        down[index] -= h
        grad[index] = (f(up) - f(down)) / (2 * h)
    return grad


def jax_loss(cosine, labels, valid, kind, s, m, eps, easy=False):
    logits = margin_losses.margin_logits(cosine, labels, kind, s, m, easy)
    return losses.cross_entropy_label_smooth(logits, labels, valid, epsilon=eps)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, m, easy", [("cosface", 0.35, False), ("arcface", 0.5, False), ("arcface", 0.3, True)]
)
def test_margin_loss_and_gradient_match_reference(kind, m, easy):
    rng = np.random.default_rng(0)
    n, k, s, eps = 6, 5, 16.0, 0.1
    cosine = rng.uniform(-0.98, 0.98, (n, k))
    labels = rng.integers(0, k, n)
    labels[-1] = 99  # a padding row's label may be anything
    valid = np.ones(n, bool)
    valid[-1] = False
    got = float(jax_loss(jnp.asarray(cosine, jnp.float32), labels, valid, kind, s, m, eps, easy))
    want = ref_loss(cosine, labels, valid, kind, s, m, eps, easy)
    assert got == pytest.approx(want, rel=1e-5)

    grad = jax.grad(jax_loss)(
        jnp.asarray(cosine, jnp.float32), labels, valid, kind, s, m, eps, easy
    )
    want_grad = numeric_grad(lambda c: ref_loss(c, labels, valid, kind, s, m, eps, easy), cosine)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-3, atol=1e-5)
    assert not np.asarray(grad)[-1].any()  # the padding row gets no gradient


def test_arcface_at_the_threshold():
    m = 0.5
    threshold = math.cos(math.pi - m)  # theta = pi - m
    d = 1e-3
    cos = jnp.asarray([threshold + d, threshold - d, 0.3, 1.0, -1.0], jnp.float32)
    values = np.asarray(margin_losses.arcface_target(cos, m))
    want = [ref_target(float(c), "arcface", m) for c in np.asarray(cos)]
    np.testing.assert_allclose(values, want, rtol=1e-5, atol=1e-5)
    # d target / d cos: cos(m) + sin(m) cos / sin above the threshold (the derivative of
    # cos(theta + m) in cos theta), 1 below it; finite at cos = +-1.
    grads = np.asarray(jax.vmap(jax.grad(lambda c: margin_losses.arcface_target(c, m)))(cos))
    above = [math.cos(m) + math.sin(m) * c / math.sqrt(1 - c * c) for c in np.asarray(cos)[:1]]
    np.testing.assert_allclose(grads[0], above[0], rtol=1e-3)
    assert grads[1] == pytest.approx(1.0)
    numeric = [
        (ref_target(float(c) + 1e-5, "arcface", m) - ref_target(float(c) - 1e-5, "arcface", m))
        / 2e-5
        for c in np.asarray(cos)[:3]
    ]
    np.testing.assert_allclose(grads[:3], numeric, rtol=1e-3)
    assert np.isfinite(grads).all()
    # The easy margin switches at cos = 0.
    easy = np.asarray(margin_losses.arcface_target(jnp.asarray([1e-3, -1e-3]), m, True))
    np.testing.assert_allclose(easy, [math.cos(math.acos(1e-3) + m), -1e-3], rtol=1e-4)


def test_margin_logits_only_touch_the_target_and_scale():
    cosine = jnp.asarray([[0.2, 0.5, -0.1], [0.9, 0.0, 0.3]], jnp.float32)
    labels = jnp.asarray([1, 0])
    cos_logits = np.asarray(margin_losses.margin_logits(cosine, labels, "cosface", 10.0, 0.25))
    np.testing.assert_allclose(cos_logits, 10 * np.array([[0.2, 0.25, -0.1], [0.65, 0.0, 0.3]]))
    arc = np.asarray(margin_losses.margin_logits(cosine, labels, "arcface", 10.0))  # m = 0.5
    assert arc[0, 1] == pytest.approx(10 * math.cos(math.acos(0.5) + 0.5), rel=1e-5)
    np.testing.assert_allclose(arc[0, [0, 2]], [2.0, -1.0], rtol=1e-6)


def test_cosine_classifier_gives_cosines_with_the_linear_classifier_parameter():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)
    head = CosineClassifier(5)
    params = head.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, params) == {"params": {"kernel": (8, 5)}}
    kernel = np.asarray(params["params"]["kernel"], np.float64)
    xs = np.asarray(x, np.float64)
    want = np.array(
        [
            [
                xs[i] @ kernel[:, j] / (np.linalg.norm(xs[i]) * np.linalg.norm(kernel[:, j]))
                for j in range(5)
            ]
            for i in range(4)
        ]
    )
    np.testing.assert_allclose(head.apply(params, x), want, rtol=1e-5, atol=1e-6)
    zero = head.apply(params, jnp.zeros((1, 8)))
    assert np.isfinite(np.asarray(zero)).all()


def test_bad_head_settings_are_one_line_errors():
    check = margin_losses.check_classifier
    with pytest.raises(ConfigError, match="loss.classifier='sphereface' is not one of"):
        check("sphereface")
    with pytest.raises(ConfigError, match=r"loss.scale must be > 0 for arcface, got 0"):
        check("arcface", 0.0)
    with pytest.raises(ConfigError, match=r"must be in \[0, pi/2\) for arcface, got 1.6"):
        check("arcface", 30.0, 1.6)
    with pytest.raises(ConfigError, match=r"must be in \[0, 2\) for cosface, got -0.1"):
        check("cosface", 30.0, -0.1)
    with pytest.raises(ConfigError, match=r"must be in \[0, 2\) for cosface, got 2.0"):
        check("cosface", 30.0, 2.0)
    check("softmax", -1.0, 99.0)  # scale and margin do not apply to the linear head
    check("arcface", 64.0, None)
