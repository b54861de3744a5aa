"""The cosine classifier of the margin heads (CosFace, ArcFace).

Same parameter as the linear classifier (`kernel` of shape (C, num_classes), no bias), so
checkpoints and weight import do not depend on the head; its outputs are cosines in [-1, 1].
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

# Lower clamp of the norms (as torch.nn.functional.normalize): a zero vector stays zero.
_NORM_EPS = 1e-12


def l2_normalise(x: jax.Array, axis: int = -1) -> jax.Array:
    """x / max(|x|, 1e-12) along `axis`."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
    return x / jnp.maximum(norm, _NORM_EPS)


class CosineClassifier(nn.Module):
    """cos(theta) between each L2-normalised row of x and each L2-normalised class weight.

    Attributes:
      num_classes: K.
    """

    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(N, C) -> (N, K) float32 cosines."""
        x = jnp.asarray(x, jnp.float32)
        kernel = self.param(
            "kernel",
            nn.initializers.normal(stddev=0.001),
            (x.shape[-1], self.num_classes),
            jnp.float32,
        )
        return l2_normalise(x) @ l2_normalise(kernel, axis=0)
