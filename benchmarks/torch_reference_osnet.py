"""A PyTorch reference OSNet in plain torch with torchreid's state-dict names (Zhou et al.,
ICCV 2019; torchreid's `models/osnet.py`): `conv1.{conv,bn}`, `conv{2,3,4}.{0,1}` omni-scale
blocks (`conv1`, `conv2a`, `conv2b.{0,1}`, `conv2c.{0-2}`, `conv2d.{0-3}`, one shared `gate`
with `fc1`/`fc2`, `conv3`, `downsample`, `IN` for the IBN variant's first stage),
`conv{2,3}.2.0` the transitions before a 2x2 average pool, `conv5`, then torchreid's
embedding `fc` (Linear, BatchNorm1d, ReLU) and `classifier`, which are not the backbone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CHANNELS = {
    "osnet_x1_0": (64, 256, 384, 512),
    "osnet_x0_5": (32, 128, 192, 256),
    "osnet_x0_25": (16, 64, 96, 128),
    "osnet_ibn_x1_0": (64, 256, 384, 512),
}


class ConvBN(nn.Module):
    def __init__(self, cin, cout, kernel=1, stride=1, padding=0, relu=True, instance=False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.InstanceNorm2d(cout, affine=True) if instance else nn.BatchNorm2d(cout)
        self.relu = relu

    def forward(self, x):
        x = self.bn(self.conv(x))
        return F.relu(x) if self.relu else x


class LightConv3x3(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 1, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False, groups=channels)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return F.relu(self.bn(self.conv2(self.conv1(x))))


class ChannelGate(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // 16, 1)
        self.fc2 = nn.Conv2d(channels // 16, channels, 1)

    def forward(self, x):
        g = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(g))))


class OSBlock(nn.Module):
    def __init__(self, cin, cout, instance=False):
        super().__init__()
        mid = cout // 4
        self.conv1 = ConvBN(cin, mid)
        self.conv2a = LightConv3x3(mid)
        self.conv2b = nn.Sequential(*[LightConv3x3(mid) for _ in range(2)])
        self.conv2c = nn.Sequential(*[LightConv3x3(mid) for _ in range(3)])
        self.conv2d = nn.Sequential(*[LightConv3x3(mid) for _ in range(4)])
        self.gate = ChannelGate(mid)
        self.conv3 = ConvBN(mid, cout, relu=False)
        self.downsample = ConvBN(cin, cout, relu=False) if cin != cout else None
        self.IN = nn.InstanceNorm2d(cout, affine=True) if instance else None

    def forward(self, x):
        x1 = self.conv1(x)
        streams = (self.conv2a, self.conv2b, self.conv2c, self.conv2d)
        out = self.conv3(sum(self.gate(s(x1)) for s in streams))
        out = out + (self.downsample(x) if self.downsample is not None else x)
        if self.IN is not None:
            out = self.IN(out)
        return F.relu(out)


class OSNet(nn.Module):
    def __init__(self, arch: str, num_classes: int = 1000):
        super().__init__()
        c = CHANNELS[arch]
        ibn = "ibn" in arch
        self.conv1 = ConvBN(3, c[0], 7, 2, 3, instance=ibn)
        self.conv2 = self._stage(c[0], c[1], True, ibn)
        self.conv3 = self._stage(c[1], c[2], True, False)
        self.conv4 = self._stage(c[2], c[3], False, False)
        self.conv5 = ConvBN(c[3], c[3])
        self.fc = nn.Sequential(nn.Linear(c[3], 512), nn.BatchNorm1d(512), nn.ReLU())
        self.classifier = nn.Linear(512, num_classes)

    @staticmethod
    def _stage(cin, cout, reduce, instance):
        layers = [OSBlock(cin, cout, instance), OSBlock(cout, cout, instance)]
        if reduce:
            layers.append(nn.Sequential(ConvBN(cout, cout), nn.AvgPool2d(2, stride=2)))
        return nn.Sequential(*layers)

    def pooled(self, x):
        """(N, 3, H, W) -> (N, C): the globally average-pooled conv5 map (the backbone
        feature; torchreid's `fc` comes after it)."""
        x = F.max_pool2d(self.conv1(x), 3, stride=2, padding=1)
        x = self.conv5(self.conv4(self.conv3(self.conv2(x))))
        return x.mean(dim=(2, 3))
