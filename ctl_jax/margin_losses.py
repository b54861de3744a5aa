"""Margin-based classifier heads: CosFace and ArcFace logits from cosine similarities.

The classifier of a margin head compares the L2-normalised BNNeck feature with L2-normalised
class weights (`ReidModel(classifier="cosface"|"arcface")` outputs these cosines as its
`logits`); the margin is applied to the target class only, during training, and the result
scaled by s, then fed to the usual label-smoothed cross-entropy:

- CosFace (Wang et al., CVPR 2018, "large margin cosine loss"): s * (cos(theta_y) - m).
- ArcFace (Deng et al., CVPR 2019, "additive angular margin"): s * cos(theta_y + m), with the
  reference code's handling of large angles: where theta_y + m would pass pi (cos(theta_y) <=
  cos(pi - m)), cos(theta_y + m) stops decreasing in theta_y, so the target logit becomes
  cos(theta_y) - m sin(m) instead; with `easy_margin`, the margin is applied only where
  cos(theta_y) > 0 and the logit is cos(theta_y) elsewhere.

All functions are pure and jit-able; `kind`, `scale`, `margin` and `easy_margin` are static.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ctl_jax.errors import ConfigError

CLASSIFIERS = ("softmax", "cosface", "arcface")
MARGIN_CLASSIFIERS = ("cosface", "arcface")

# The margin each paper recommends, used when `loss.classifier_margin` is None.
DEFAULT_MARGINS = {"cosface": 0.35, "arcface": 0.5}

# Lower clamp of sin^2: keeps the square root's gradient finite when cos(theta) = +-1.
_SIN2_MIN = 1e-12


def resolve_margin(kind: str, margin: float | None) -> float:
    """The margin of a head: `margin`, or the paper's value when None."""
    return DEFAULT_MARGINS[kind] if margin is None else float(margin)


def check_classifier(kind: str, scale: float = 30.0, margin: float | None = None) -> None:
    """Raises a one-line ConfigError for an unknown head or a scale/margin outside its range.

    CosFace needs 0 <= m < 2: with m >= 2 the target logit cos - m is below -1, under every
    other class's cosine, so no feature could be classified correctly. ArcFace needs
    0 <= m < pi/2: cos(theta + m) must decrease over the angles it is applied to, which with
    the easy margin (theta < pi/2) holds only for m <= pi/2.
    """
    if kind not in CLASSIFIERS:
        raise ConfigError(f"loss.classifier={kind!r} is not one of {', '.join(CLASSIFIERS)}")
    if kind == "softmax":
        return
    if not (isinstance(scale, (int, float)) and scale > 0):
        raise ConfigError(f"loss.scale must be > 0 for {kind}, got {scale!r}")
    m = resolve_margin(kind, margin)
    if kind == "cosface" and not 0.0 <= m < 2.0:
        raise ConfigError(f"loss.classifier_margin must be in [0, 2) for cosface, got {m}")
    if kind == "arcface" and not 0.0 <= m < math.pi / 2:
        raise ConfigError(f"loss.classifier_margin must be in [0, pi/2) for arcface, got {m}")


def arcface_target(cosine: jax.Array, margin: float, easy_margin: bool = False) -> jax.Array:
    """The ArcFace target logit (before scaling) for cosines `cosine` (any shape), float32.

    cos(theta + m) = cos(theta) cos(m) - sin(theta) sin(m) where cos(theta) > threshold,
    else the fallback; threshold and fallback as in the module docstring.
    """
    cosine = jnp.asarray(cosine, jnp.float32)
    sine = jnp.sqrt(jnp.maximum(1.0 - cosine * cosine, _SIN2_MIN))
    phi = cosine * math.cos(margin) - sine * math.sin(margin)
    if easy_margin:
        return jnp.where(cosine > 0.0, phi, cosine)
    threshold = math.cos(math.pi - margin)
    return jnp.where(cosine > threshold, phi, cosine - math.sin(math.pi - margin) * margin)


def margin_logits(
    cosine: jax.Array,
    labels: jax.Array,
    kind: str,
    scale: float,
    margin: float | None = None,
    easy_margin: bool = False,
) -> jax.Array:
    """Scaled logits of a margin head.

    Args:
      cosine: (N, K) cosines between normalised features and normalised class weights.
      labels: (N,) int target classes; a label outside [0, K) (padding rows) gets no margin.
      kind: "cosface" or "arcface".
      scale: s > 0.
      margin: m, or None for the paper's value (`DEFAULT_MARGINS`).
      easy_margin: ArcFace only, see `arcface_target`.

    Returns:
      (N, K) float32: s * cosine, with the target column replaced by s * target(cosine).
    """
    check_classifier(kind, scale, margin)
    if kind not in MARGIN_CLASSIFIERS:
        raise ConfigError(f"margin_logits needs a margin head, got {kind!r}")
    m = resolve_margin(kind, margin)
    cosine = jnp.asarray(cosine, jnp.float32)
    if kind == "cosface":
        target = cosine - m
    else:
        target = arcface_target(cosine, m, easy_margin)
    is_target = jax.nn.one_hot(labels, cosine.shape[-1], dtype=bool)
    return scale * jnp.where(is_target, target, cosine)
