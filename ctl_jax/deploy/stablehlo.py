"""The re-ID model as serialised StableHLO (`jax.export`), for JAX/XLA consumers.

    exported = jax.export.deserialize(open("model.stablehlo", "rb").read())
    embeddings = exported.call(images)   # uint8 (N, H, W, 3) -> float32 (N, D)

The function is uint8 images -> `transforms.normalize` -> the model (reference layers, weights
embedded as constants) -> BNNeck output; the batch dimension is symbolic, so one artifact
serves every batch size. It is lowered for CPU, CUDA and TPU at once.
"""

from __future__ import annotations

import jax
import numpy as np

from ctl_jax.data import transforms

PLATFORMS = ("cpu", "cuda", "tpu")


def uint8_embed_fn(model, variables):
    """`fn(images) -> embeddings`: uint8 (N, H, W, 3) RGB -> (N, D) float32 BNNeck output,
    ImageNet normalisation inside (the function both exports compute)."""
    variables = jax.tree.map(np.asarray, variables)

    def embed(images):
        return model.apply(variables, transforms.normalize(images), train=False)["bn_features"]

    return embed


def export_stablehlo(model, variables, height: int, width: int, platforms=PLATFORMS) -> bytearray:
    """Serialised `jax.export.Exported` of `uint8_embed_fn` with a symbolic batch "N"."""
    (batch,) = jax.export.symbolic_shape("N")
    spec = jax.ShapeDtypeStruct((batch, height, width, 3), np.uint8)
    exported = jax.export.export(jax.jit(uint8_embed_fn(model, variables)), platforms=platforms)(
        spec
    )
    return exported.serialize()
