"""A straightforward PyTorch implementation of the CTL training step, for speed comparisons.

The same model (torchvision-layout ResNet, last stride 1, or the timm-layout ViT / torchreid
OSNet of `torch_reference_vit.py` / `torch_reference_osnet.py`; BNNeck, bias-free classifier), the
same four losses (batch-hard triplet, label-smoothed CE, center, centroid triplet) and the same
optimisers (Adam with L2 decay; SGD for the centers) as ctl_jax, written the way a PyTorch user
would: eager mode, NCHW, float32, no padding slots (every identity has M images).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:
    from . import torch_reference_osnet, torch_reference_vit
except ImportError:  # run as a file: benchmarks/ is on sys.path (see common.py)
    import torch_reference_osnet
    import torch_reference_vit


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = self.downsample(x) if self.downsample is not None else x
        return F.relu(out + identity)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = self.downsample(x) if self.downsample is not None else x
        return F.relu(out + identity)


STAGES = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


class ResNet(nn.Module):
    """torchvision layout; like the original CTL backbone: no ReLU after the stem BN."""

    def __init__(self, arch="resnet50", last_stride=1):
        super().__init__()
        block, layers = STAGES[arch]
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], last_stride)
        self.out_dim = 512 * block.expansion

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _backbone(arch: str, image_size: tuple[int, int]) -> tuple[nn.Module, int]:
    """(module returning a feature map or, for a ViT, the class token; feature width); a
    ViT's position embeddings are made for `image_size`."""
    if arch.startswith("vit_"):
        from ctl_jax.models.vit import VIT_SPECS

        spec = VIT_SPECS[arch]
        vit = torch_reference_vit.VisionTransformer(
            image_size, spec.patch, spec.width, spec.depth, spec.heads
        )
        return _ClassToken(vit, spec.width), spec.width
    if arch.startswith("osnet_"):
        osnet = torch_reference_osnet.OSNet(arch)
        dim = torch_reference_osnet.CHANNELS[arch][-1]
        return _OSNetMap(osnet, dim), dim
    resnet = ResNet(arch)
    return resnet, resnet.out_dim


class _ClassToken(nn.Module):
    def __init__(self, vit, out_dim):
        super().__init__()
        self.vit, self.out_dim = vit, out_dim

    def forward(self, x):
        return self.vit.forward_features(x)


class _OSNetMap(nn.Module):
    def __init__(self, osnet, out_dim):
        super().__init__()
        self.osnet, self.out_dim = osnet, out_dim

    def forward(self, x):
        o = self.osnet
        x = F.max_pool2d(o.conv1(x), 3, stride=2, padding=1)
        return o.conv5(o.conv4(o.conv3(o.conv2(x))))


class ReidNet(nn.Module):
    def __init__(self, arch, num_classes, image_size=(256, 128)):
        super().__init__()
        self.backbone, dim = _backbone(arch, tuple(image_size))
        self.bn = nn.BatchNorm1d(dim)
        self.bn.bias.requires_grad_(False)
        self.fc_query = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.fc_query.weight, std=0.001)

    def forward(self, x):
        f = self.backbone(x)
        f = f.mean(dim=(2, 3)) if f.ndim == 4 else f
        bn = self.bn(f)
        return f, bn, self.fc_query(bn)


def euclidean(x, y):
    d = (x * x).sum(1, keepdim=True) + (y * y).sum(1)[None] - 2 * x @ y.T
    return d.clamp(min=1e-12).sqrt()


def batch_hard(dist, labels, margin):
    same = labels[:, None] == labels[None]
    d_ap = (dist * same).max(1).values
    d_an = (dist + same * 1e9).min(1).values
    return F.relu(d_ap - d_an + margin).mean()


def ctl_loss(features, labels, m, margin):
    """All rounds at once: query i of each identity vs the mean of its other samples."""
    p = features.shape[0] // m
    grouped = features.view(p, m, -1)
    centroids = (grouped.sum(1, keepdim=True) - grouped) / (m - 1)  # (P, M, D)
    pid = labels.view(p, m)[:, 0]
    losses = []
    for i in range(m):  # M is 4: a loop over rounds is what a PyTorch user would write
        points = torch.cat([grouped[:, i], centroids[:, i]])
        lab = torch.cat([pid, pid])
        losses.append(batch_hard(euclidean(points, points), lab, margin))
    return torch.stack(losses).mean()


def make_step(model, num_classes, m, lr=3.5e-4):
    centers = nn.Parameter(torch.randn(num_classes, model.backbone.out_dim))
    opt = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=5e-4
    )
    opt_centers = torch.optim.SGD([centers], lr=0.5)

    def step(images, labels):
        opt.zero_grad(set_to_none=True)
        opt_centers.zero_grad(set_to_none=True)
        f, _, logits = model(images)
        triplet = batch_hard(euclidean(f, f), labels, 0.5)
        log_probs = F.log_softmax(logits, 1)
        targets = torch.full_like(log_probs, 0.1 / num_classes)
        targets.scatter_(1, labels[:, None], 0.9 + 0.1 / num_classes)
        ce = -(targets * log_probs).sum(1).mean()
        center = ((f - centers[labels]) ** 2).sum(1).mean()
        total = triplet + ce + 5e-4 * center + ctl_loss(f, labels, m, 0.5)
        total.backward()
        centers.grad.mul_(1.0 / 5e-4)
        opt.step()
        opt_centers.step()
        return total

    return step
