"""Vision Transformer backbones (ViT, Dosovitskiy et al. 2021) in plain Flax, for re-ID.

The layout follows timm's `VisionTransformer` (pre-norm blocks, a class token, learned
absolute position embeddings, LayerNorm epsilon 1e-6, exact GELU) so that timm state dicts
map onto it mechanically: `patch_embed/proj`, `cls_token`, `pos_embed`,
`blocks_{i}/{norm1, attn/qkv, attn/proj, norm2, mlp/fc1, mlp/fc2}`, `norm`. The qkv
projection's output columns are [q | k | v], each split into heads as timm splits them.

Two re-ID additions (TransReID, He et al. 2021): the patch embedding may overlap (`stride`
below the patch size: 12 gives a 21x10 grid at 256x128 instead of 16x8), and images need
not be square. The position embeddings are a parameter of the grid the model is built for
(`(H - patch) // stride + 1` by `(W - patch) // stride + 1` plus the class token); weights
trained for another grid are resampled when imported (`ctl_jax.weights.resample`).

Attention is written with einsums and a float32 softmax (no fused or custom kernels), so the
same program lowers for every backend. The backbone returns the class token after the final
LayerNorm, (N, width): the re-ID model takes it as its feature f, without pooling.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from ctl_jax.models.layers import REFERENCE_LAYERS, Dtype, Layers

# timm initialises every linear layer and the position embeddings with a normal distribution
# truncated at 2 standard deviations, std 0.02; biases with zeros.
_trunc_normal = nn.initializers.truncated_normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class ViTSpec:
    """Shape of a ViT: patch size, width (embedding dimension), depth (blocks), heads."""

    patch: int
    width: int
    depth: int
    heads: int
    mlp_ratio: int = 4


# Names follow timm's vit_{tiny,small,base,large}_patch16; `vit_mini8` is the synthetic demo's
# model (8x8 patches, 4 blocks: a 64x32 image is an 8x4 grid).
VIT_SPECS: dict[str, ViTSpec] = {
    "vit_t16": ViTSpec(patch=16, width=192, depth=12, heads=3),
    "vit_s16": ViTSpec(patch=16, width=384, depth=12, heads=6),
    "vit_b16": ViTSpec(patch=16, width=768, depth=12, heads=12),
    "vit_l16": ViTSpec(patch=16, width=1024, depth=24, heads=16),
    "vit_mini8": ViTSpec(patch=8, width=192, depth=4, heads=3),
}


def grid_size(height: int, width: int, patch: int, stride: int) -> tuple[int, int]:
    """(rows, columns) of patches of a `height` x `width` image: a `patch`-sized window moved
    by `stride` without padding, as a VALID convolution."""
    return (height - patch) // stride + 1, (width - patch) // stride + 1


class DropPath(nn.Module):
    """Stochastic depth: in training, a residual branch is dropped for a whole sample with
    probability `rate` and the kept ones are scaled by 1 / (1 - rate) (timm's DropPath)."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """(N, ...) -> (N, ...); draws from the `dropout` RNG stream when it drops."""
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],))
        scale = jnp.where(mask, 1.0 / keep, 0.0).astype(x.dtype)
        return x * scale.reshape((-1,) + (1,) * (x.ndim - 1))


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm's `Attention`)."""

    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(N, T, D) -> (N, T, D)."""
        n, t, d = x.shape
        head_dim = d // self.heads
        dense = functools.partial(
            nn.Dense, dtype=self.dtype, kernel_init=_trunc_normal, bias_init=nn.initializers.zeros
        )
        qkv = dense(3 * d, name="qkv")(x).reshape(n, t, 3, self.heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (N, T, heads, head_dim)
        logits = jnp.einsum("nqhc,nkhc->nhqk", q * (head_dim**-0.5), k)
        # The softmax in float32 whatever the compute dtype: bfloat16 logits lose the
        # differences between nearby scores.
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
        out = jnp.einsum("nhqk,nkhc->nqhc", weights, v).reshape(n, t, d)
        return dense(d, name="proj")(out)


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2 (timm's `Mlp`)."""

    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(N, T, D) -> (N, T, D)."""
        dense = functools.partial(
            nn.Dense, dtype=self.dtype, kernel_init=_trunc_normal, bias_init=nn.initializers.zeros
        )
        y = nn.gelu(dense(self.hidden, name="fc1")(x), approximate=False)
        return dense(x.shape[-1], name="fc2")(y)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(x))."""

    heads: int
    mlp_ratio: int
    drop_path: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """(N, T, D) -> (N, T, D)."""
        norm = functools.partial(nn.LayerNorm, epsilon=1e-6, dtype=self.dtype)
        drop = DropPath(self.drop_path)
        x = x + drop(
            Attention(self.heads, self.dtype, name="attn")(norm(name="norm1")(x)), train=train
        )
        hidden = self.mlp_ratio * x.shape[-1]
        y = Mlp(hidden, self.dtype, name="mlp")(norm(name="norm2")(x))
        return x + drop(y, train=train)


class PatchEmbed(nn.Module):
    """The patch embedding: a `patch` x `patch` convolution with bias moved by `stride`."""

    width: int
    patch: int
    stride: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(N, H, W, 3) -> (N, rows * columns, width), patches in row-major order."""
        y = nn.Conv(
            self.width,
            (self.patch, self.patch),
            strides=self.stride,
            padding="VALID",
            dtype=self.dtype,
            name="proj",
        )(x)
        return y.reshape(y.shape[0], -1, self.width)


class ViT(nn.Module):
    """ViT trunk without the classification head; returns the normalised class token.

    Attributes:
      patch, width, depth, heads, mlp_ratio: the shape (`VIT_SPECS`).
      stride: step of the patch embedding; None or `patch` for non-overlapping patches.
      drop_path: stochastic depth rate of the last block (block i: rate * i / (depth - 1),
        timm's linear rule); training with a rate above 0 needs a `dropout` RNG.
      dtype: compute dtype; parameters stay float32.
      layers: accepted for the interface the re-ID model calls backbones with; a ViT has no
        convolution or batch norm of the ResNet layer sets, so it uses none of them.
    """

    patch: int
    width: int
    depth: int
    heads: int
    mlp_ratio: int = 4
    stride: int | None = None
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32
    layers: Layers = REFERENCE_LAYERS

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, valid: jax.Array | None = None):
        """Computes the class-token feature.

        Args:
          x: (N, H, W, 3) images; the position embeddings are created for this H x W.
          train: stochastic depth on if True.
          valid: ignored (a ViT has no batch statistics); accepted for the interface.

        Returns:
          (N, width) class token after the final LayerNorm, in `dtype`.
        """
        del valid
        stride = self.stride or self.patch
        x = jnp.asarray(x, self.dtype)
        tokens = PatchEmbed(self.width, self.patch, stride, self.dtype, name="patch_embed")(x)
        n, num_patches, _ = tokens.shape
        cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, self.width))
        pos = self.param("pos_embed", _trunc_normal, (1, num_patches + 1, self.width))
        cls = jnp.broadcast_to(cls.astype(self.dtype), (n, 1, self.width))
        x = jnp.concatenate([cls, tokens], axis=1) + pos.astype(self.dtype)
        for i in range(self.depth):
            rate = self.drop_path * i / max(self.depth - 1, 1)
            x = Block(self.heads, self.mlp_ratio, rate, self.dtype, name=f"blocks_{i}")(
                x, train=train
            )
        x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)
        return x[:, 0]


def vit(arch: str, **kwargs) -> functools.partial:
    """The `ViT` of a `VIT_SPECS` name, as a partial taking `dtype=`, `layers=`, `name=`."""
    spec = VIT_SPECS[arch]
    return functools.partial(
        ViT,
        patch=spec.patch,
        width=spec.width,
        depth=spec.depth,
        heads=spec.heads,
        mlp_ratio=spec.mlp_ratio,
        **kwargs,
    )
