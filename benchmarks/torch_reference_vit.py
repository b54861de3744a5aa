"""A PyTorch reference ViT in plain torch, following timm's `VisionTransformer` (timm 1.0)
module for module: its state-dict names, LayerNorm epsilon 1e-6, the fused qkv projection
split as (3, heads, head_dim), exact GELU, pre-norm blocks, the class token after the final
norm as the feature. timm itself cannot be the reference here: it imports torchvision, and
PyPI's torchvision does not import beside this CPU torch build.

`resample_abs_pos_embed` is timm's position-embedding resampling (`F.interpolate`, bicubic,
align_corners=False, antialias as timm's checkpoint loading: True), written with torch ops.
An overlapping patch embedding (TransReID) is the same convolution with a smaller stride.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
        x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=stride)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, rows * columns, dim)


class VisionTransformer(nn.Module):
    """timm's VisionTransformer (class token, learned absolute position embeddings)."""

    def __init__(self, img_size, patch, dim, depth, heads, stride=None, num_classes=1000):
        super().__init__()
        stride = stride or patch
        self.grid = ((img_size[0] - patch) // stride + 1, (img_size[1] - patch) // stride + 1)
        self.patch_embed = PatchEmbed(dim, patch, stride)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], dim))
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward_features(self, x):
        """(N, 3, H, W) -> (N, dim): the class token after the final norm."""
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))[:, 0]


def resample_abs_pos_embed(posemb, new_size, old_size, antialias=True):
    """timm's resampling: the class token kept, the grid interpolated bicubically."""
    prefix, grid = posemb[:, :1], posemb[:, 1:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, old_size[0], old_size[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(
        grid, size=new_size, mode="bicubic", align_corners=False, antialias=antialias
    )
    return torch.cat([prefix, grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def load_resampled(model: VisionTransformer, state_dict: dict, old_grid) -> VisionTransformer:
    """Loads a state dict saved for another grid into `model`, as timm's loading does."""
    state = dict(state_dict)
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], model.grid, old_grid)
    model.load_state_dict(state)
    return model


def randomise_vit(model: VisionTransformer, seed: int) -> VisionTransformer:
    """Random weights everywhere, norm scales in [0.5, 1.5), non-zero biases and tokens,
    so that no parameter is trivially 1 or 0; scaled to keep activations O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen))
                module.weight.mul_(fan_in**-0.5)
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
            elif isinstance(module, nn.LayerNorm):
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=gen))
        model.cls_token.copy_(torch.randn(model.cls_token.shape, generator=gen))
        model.pos_embed.copy_(0.5 * torch.randn(model.pos_embed.shape, generator=gen))
    return model.eval()
