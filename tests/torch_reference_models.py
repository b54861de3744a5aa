"""PyTorch reference networks for the weight-import tests, in plain torch (torchvision does not
import beside the CPU torch build), and writers for the three file formats ctl_jax imports.

The networks follow the original code's modules key for key:
  - `ResNet`: torchvision layout (`conv1`, `bn1`, `layer{i}.{j}.*`, `downsample.{0,1}`, `fc`),
    with a configurable last stride and a switch for the ReLU after the stem batch norm (the
    original CTL plain ResNet has none; torchvision and IBN-a have it), optionally IBN-a;
  - `CTLModel`: the original CTL Lightning module's parameters: `backbone.base` (the ResNet),
    `bn` (BNNeck, shift frozen at zero), `fc_query` (bias-free classifier),
    `center_loss.centers`.
"""

from __future__ import annotations

import contextlib
import sys
import types

import torch
from torch import nn


class IBN(nn.Module):
    """IBN-a: InstanceNorm (affine) on the first planes // 2 channels, BatchNorm on the rest."""

    def __init__(self, planes: int):
        super().__init__()
        self.half = planes // 2
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(planes - self.half)

    def forward(self, x):
        first, second = torch.split(x, [self.half, x.shape[1] - self.half], 1)
        return torch.cat((self.IN(first.contiguous()), self.BN(second.contiguous())), 1)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, ibn=False):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, ibn=False):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = IBN(planes) if ibn else nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


class ResNet(nn.Module):
    """torchvision-layout ResNet trunk; `forward` returns the last feature map (N, C, h, w)."""

    def __init__(self, block, layers, last_stride=1, stem_relu=True, ibn=False, num_classes=None):
        super().__init__()
        self.stem_relu = stem_relu
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1, ibn)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, ibn)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, ibn)
        self.layer4 = self._make_layer(block, 512, layers[3], last_stride, False)
        if num_classes:  # the ImageNet classifier (torchvision, IBN-a); unused by re-ID
            self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride, ibn):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, ibn)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, ibn=ibn) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        if self.stem_relu:
            x = self.relu(x)
        x = self.maxpool(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def pooled(self, x):
        """(N, 3, H, W) -> (N, C) global average pooled feature f."""
        return self(x).mean(dim=(2, 3))


ARCHS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), False),
    "resnet50": (Bottleneck, (3, 4, 6, 3), False),
    "resnet50_ibn_a": (Bottleneck, (3, 4, 6, 3), True),
}


def make_resnet(arch: str, stem_relu: bool, num_classes=None, last_stride: int = 1) -> ResNet:
    block, layers, ibn = ARCHS[arch]
    return ResNet(block, layers, last_stride, stem_relu, ibn, num_classes)


class Baseline(nn.Module):
    """The original `modelling.baseline.Baseline`: the trunk as `base`."""

    def __init__(self, base: ResNet):
        super().__init__()
        self.base = base


class CenterLoss(nn.Module):
    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, dim))


class CTLModel(nn.Module):
    """The parameters of the original CTL Lightning module and its embedding."""

    def __init__(self, base: ResNet, num_classes: int):
        super().__init__()
        dim = 512 * (4 if isinstance(base.layer1[0], Bottleneck) else 1)
        self.backbone = Baseline(base)
        self.center_loss = CenterLoss(num_classes, dim)
        self.bn = nn.BatchNorm1d(dim)
        self.bn.bias.requires_grad_(False)
        self.fc_query = nn.Linear(dim, num_classes, bias=False)

    def embed(self, x):
        """(N, 3, H, W) -> (N, C) BNNeck output, the retrieval embedding."""
        return self.bn(self.backbone.base.pooled(x))


def randomise(model: nn.Module, images: torch.Tensor, seed: int) -> nn.Module:
    """Random weights, random norm affines, then batch-norm statistics measured on `images`.

    Statistics are accumulated over a few batches (momentum None = plain average) so that they
    are non-trivial (far from mean 0 / variance 1) yet keep activations of every depth O(1).
    The BNNeck shift stays zero, as the original keeps it frozen.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen))
                module.weight.mul_((2.0 / fan_in) ** 0.5)
            elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm2d)):
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                if name != "bn":
                    module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=gen))
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.momentum = None
                module.reset_running_stats()
        model.train()
        forward = model.embed if isinstance(model, CTLModel) else model.pooled
        for batch in images.split(4):
            forward(batch)
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.momentum = 0.1
        if isinstance(model, CTLModel):
            model.center_loss.centers.copy_(
                torch.randn(model.center_loss.centers.shape, generator=gen)
            )
    return model.eval()


# --- file writers ------------------------------------------------------------------------


class CfgNode(dict):
    """Stand-in for yacs.config.CfgNode: a dict subclass with attributes in its __dict__."""

    def __init__(self, init=None):
        super().__init__(init or {})
        self.__dict__["__immutable__"] = False
        self.__dict__["__new_allowed__"] = False


class AttributeDict(dict):
    """Stand-in for pytorch_lightning.utilities.parsing.AttributeDict."""


@contextlib.contextmanager
def _pickle_as(*classes_and_modules):
    """Lets pickle name `classes` by the original modules (yacs.config, pytorch_lightning...)
    while saving: pickle checks that the named module really holds the class."""
    added = []
    try:
        for cls, module_name in classes_and_modules:
            parts = module_name.split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                if name not in sys.modules:
                    sys.modules[name] = types.ModuleType(name)
                    added.append(name)
            cls.__module__ = module_name
            setattr(sys.modules[module_name], cls.__name__, cls)
        yield
    finally:
        for name in added:
            del sys.modules[name]


def save_state_dict(model: nn.Module, path, legacy: bool = False) -> None:
    """A torchvision-style `.pth`: the bare state dict (legacy = pre-1.6 stream format)."""
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=not legacy)


def save_ibn_checkpoint(model: nn.Module, path) -> None:
    """An IBN-Net release style `.pth.tar`: {'state_dict': DataParallel keys, 'epoch', ...}."""
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 100, "arch": "resnet50_ibn_a", "state_dict": state}, path)


def save_lightning_checkpoint(
    model: CTLModel, path, arch: str, image_size=(64, 32), last_stride: int = 1
) -> None:
    """An original-CTL style Lightning `.ckpt` with pickled yacs/Lightning config objects."""
    cfg = CfgNode(
        {
            "MODEL": CfgNode({"NAME": arch, "LAST_STRIDE": last_stride, "BACKBONE_EMB_SIZE": 2048}),
            "INPUT": CfgNode({"SIZE_TRAIN": list(image_size), "SIZE_TEST": list(image_size)}),
            "SOLVER": CfgNode({"BASE_LR": 3.5e-4, "MARGIN": 0.5}),
        }
    )
    hparams = AttributeDict({**cfg, "num_classes": model.fc_query.weight.shape[0]})
    first = next(model.parameters())
    checkpoint = {
        "epoch": 119,
        "global_step": 22440,
        "pytorch-lightning_version": "1.1.4",
        "state_dict": model.state_dict(),
        "callbacks": {},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros_like(first)}}}],
        "lr_schedulers": [],
        "hparams_name": "hparams",
        "hyper_parameters": hparams,
    }
    with _pickle_as(
        (CfgNode, "yacs.config"), (AttributeDict, "pytorch_lightning.utilities.parsing")
    ):
        torch.save(checkpoint, path)


class _StorageRef:
    def __init__(self, key: str, numel: int, view=None):
        self.key, self.numel, self.view = key, numel, view


class _OldTensor:
    """Pickles as PyTorch 0.3 did: `torch._utils._rebuild_tensor(storage, offset, size,
    stride)`, the form of torchvision's 2017 files such as resnet50-19c8e357.pth."""

    def __init__(self, storage: _StorageRef, offset: int, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce__(self):
        args = (self.storage, self.offset, torch.Size(self.size), tuple(self.stride))
        return torch._utils._rebuild_tensor, args


def save_pre04_legacy_file(path, tensors: dict, storages: dict, views: dict | None = None):
    """Writes a legacy-format file the way PyTorch 0.3 did, including storage views.

    Args:
      tensors: name -> (storage key, offset, size, stride), in elements.
      storages: root storage key -> 1-D float32 tensor with its elements.
      views: view storage key -> (root key, offset, numel), as old PyTorch wrote for tensors
        built on a slice of a storage.
    """
    import collections
    import pickle
    import struct

    views = views or {}
    refs = {k: _StorageRef(k, v.numel()) for k, v in storages.items()}
    for key, (root, offset, numel) in views.items():
        refs[key] = _StorageRef(root, storages[root].numel(), view=(key, offset, numel))

    class LegacyPickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _StorageRef):
                return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel, obj.view)
            return None

    state = collections.OrderedDict(
        (name, _OldTensor(refs[key], offset, size, stride))
        for name, (key, offset, size, stride) in tensors.items()
    )
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"long": 8}}
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, sys_info):
            pickle.dump(header, f, protocol=2)
        LegacyPickler(f, protocol=2).dump(state)
        keys = sorted(storages)
        pickle.dump(keys, f, protocol=2)
        for key in keys:
            values = storages[key].contiguous().numpy().astype("<f4")
            f.write(struct.pack("<q", values.size))
            f.write(values.tobytes())
