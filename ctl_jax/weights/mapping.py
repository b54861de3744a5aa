"""PyTorch state-dict layouts -> the ctl_jax Flax variable tree; architecture inference.

Three layouts are understood:
  - `torchvision_resnet`: torchvision ImageNet ResNets, `conv1.weight`, `bn1.*`,
    `layer{1-4}.{j}.{conv,bn}{1,2,3}.*`, `layer{k}.0.downsample.{0,1}.*`, `fc.{weight,bias}`;
  - `resnet_ibn_a`: the same with `layer{1-3}.{j}.bn1.{IN,BN}.*` (IBN-Net's ResNet-IBN-a);
  - `ctl_lightning`: the original CTL code's Lightning checkpoints, the backbone under
    `backbone.base.`, then `bn.*` (BNNeck), `fc_query.weight` (classifier, no bias) and
    `center_loss.centers`;
  - `timm_vit`: timm's VisionTransformer, `patch_embed.proj.*`, `cls_token`, `pos_embed`,
    `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`, `norm.*`, `head.*`
    (`vit_mapping.py`); the position embeddings are resampled to the model's patch grid;
  - `torchreid_osnet`: torchreid's OSNet, `conv1.{conv,bn}`, `conv{2-4}.{j}.*`, `conv5.*`,
    then `fc.*` and `classifier.*`, which are not the backbone (`osnet_mapping.py`).
A common `module.` prefix (DataParallel) is removed first.

Names map mechanically because the Flax model mirrors torchvision: `layer1_0` <-> `layer1.0`,
`downsample_conv`/`downsample_bn` <-> `downsample.0`/`downsample.1`, BatchNorm `scale`/`bias`/
`mean`/`var` <-> `weight`/`bias`/`running_mean`/`running_var`. Convolution kernels go from
PyTorch's OIHW to Flax's HWIO, linear weights (out, in) to Dense kernels (in, out).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from ctl_jax.weights import osnet_mapping, resample, vit_mapping
from ctl_jax.weights.torch_pickle import OpaqueObject, TorchFileError, as_mapping

# (blocks per stage, bottleneck blocks, IBN-a) -> ctl_jax architecture name.
_ARCHITECTURES = {
    ((2, 2, 2, 2), False, False): "resnet18",
    ((3, 4, 6, 3), False, False): "resnet34",
    ((3, 4, 6, 3), True, False): "resnet50",
    ((3, 4, 23, 3), True, False): "resnet101",
    ((3, 8, 36, 3), True, False): "resnet152",
    ((3, 4, 6, 3), True, True): "resnet50_ibn_a",
    ((3, 4, 23, 3), True, True): "resnet101_ibn_a",
}
_BN_LEAVES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the parts of the re-ID model live in a state dict.

    Attributes:
      name: `torchvision_resnet`, `resnet_ibn_a` or `ctl_lightning`.
      backbone_prefix: prefix of the ResNet keys ("" or "backbone.base.").
      bnneck: module name of the BNNeck batch norm, or None (then an identity BNNeck is used).
      classifier: module name of the linear classifier, or None (then zeros).
      centers: key of the center-loss centers, or None.
      stem_relu: the `model.stem_relu` setting that reproduces the source network: None where
        ctl_jax's automatic choice already does (no ReLU for plain ResNets, ReLU for IBN-a),
        True for torchvision, whose plain ResNets have the ReLU.
    """

    name: str
    backbone_prefix: str
    bnneck: str | None
    classifier: str | None
    centers: str | None
    stem_relu: bool | None


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A ResNet or ViT variant inferred from state-dict keys (`arch` is a ctl_jax ARCH_NAMES
    entry); a ViT has no stages and its `width`, `patch`, `depth` set."""

    arch: str
    stage_sizes: tuple[int, ...]
    bottleneck: bool
    ibn: bool
    width: int = 0
    patch: int = 0
    depth: int = 0

    @property
    def feature_dim(self) -> int:
        return self.width or 512 * (4 if self.bottleneck else 1)

    def describe(self) -> str:
        """E.g. `blocks (3, 4, 6, 3), bottleneck` or `16x16 patches, width 768, depth 12`."""
        if self.width:
            return f"{self.patch}x{self.patch} patches, width {self.width}, depth {self.depth}"
        kind = "bottleneck" if self.bottleneck else "basic"
        return f"blocks {self.stage_sizes}, {kind}{', IBN-a' if self.ibn else ''}"


@dataclasses.dataclass
class SourceModel:
    """Everything about a state dict needed to build and fill the ctl_jax model.

    Attributes:
      state_dict: tensor name -> numpy array (prefix `module.` removed).
      layout, architecture: see the classes above.
      num_classes: rows of the classifier weight (1 when the file has no classifier).
      settings: model/input settings read from a pickled training config, when the file has
        one: `name` (the original MODEL.NAME), `last_stride`, `image_size` (height, width).
      skipped: names of non-tensor entries of the state dict (left out).
    """

    state_dict: dict[str, np.ndarray]
    layout: Layout
    architecture: Architecture
    num_classes: int
    settings: dict[str, Any]
    skipped: list[str]


@dataclasses.dataclass
class MappedWeights:
    """The Flax variables built from a state dict, and what was (not) used.

    Attributes:
      params, batch_stats: nested dicts of float32 arrays, shaped like the Flax model's.
      centers: (num_classes, feature_dim) float32 center-loss centers, or None.
      used: state-dict keys that went into the variables (or were checked, as the BNNeck's
        frozen zero bias).
      unused: state-dict keys with no place in the model (e.g. the ImageNet `fc.bias`).
      ignored: `num_batches_tracked` counters, which ctl_jax does not keep.
      filled: Flax variable names absent from the file and set to defaults (identity BNNeck,
        zero classifier).
    """

    params: dict
    batch_stats: dict
    centers: np.ndarray | None
    used: list[str]
    unused: list[str]
    ignored: list[str]
    filled: list[str]


def describe(obj: Any) -> str:
    if isinstance(obj, OpaqueObject):
        return f"a pickled {obj.pickled_name} object"
    return f"a {type(obj).__name__}"


def read_source(root: Any, source: str) -> SourceModel:
    """Finds the state dict in an unpickled file and infers layout and architecture.

    Args:
      root: `TorchFile.root`.
      source: the file name, for error messages.

    Raises:
      TorchFileError: no state dict, not a ResNet, or a ResNet variant ctl_jax lacks.
    """
    top = as_mapping(root)
    if top is None:
        raise TorchFileError(f"{source}: holds {describe(root)}, not a dict of tensors")
    hparams = None
    for key in ("state_dict", "model", "model_state_dict"):
        inner = as_mapping(top.get(key))
        if inner is not None and any(isinstance(v, np.ndarray) for v in inner.values()):
            hparams = as_mapping(top.get("hyper_parameters")) or as_mapping(top.get("hparams"))
            top = inner
            break
    tensors = {k: v for k, v in top.items() if isinstance(k, str) and isinstance(v, np.ndarray)}
    skipped = sorted(str(k) for k in top if k not in tensors)
    if not tensors:
        raise TorchFileError(
            f"{source}: no tensors found (top-level keys: {_examples(map(str, top))}); "
            "expected a state dict or a checkpoint with a `state_dict` entry"
        )
    if all(k.startswith("module.") for k in tensors):  # saved from nn.DataParallel
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    layout = detect_layout(tensors, source)
    if layout.name == vit_mapping.LAYOUT:
        architecture = vit_mapping.infer_architecture(tensors, source, Architecture)
    elif layout.name == osnet_mapping.LAYOUT:
        architecture = osnet_mapping.infer_architecture(tensors, source, Architecture)
    else:
        architecture = infer_architecture(tensors, layout.backbone_prefix, source)
    num_classes = 1
    if layout.classifier and f"{layout.classifier}.weight" in tensors:
        num_classes = int(tensors[f"{layout.classifier}.weight"].shape[0])
    settings = read_settings(hparams) if hparams else {}
    return SourceModel(tensors, layout, architecture, num_classes, settings, skipped)


def detect_layout(tensors: dict[str, np.ndarray], source: str) -> Layout:
    """Which of the known layouts the keys follow (see the module docstring)."""
    if osnet_mapping.is_osnet_layout(tensors):
        # torchreid's classifier acts on its `fc` embedding, not on the backbone feature.
        return Layout(osnet_mapping.LAYOUT, "", None, None, None, None)
    if vit_mapping.is_vit_layout(tensors):
        return Layout(
            name=vit_mapping.LAYOUT,
            backbone_prefix="",
            bnneck=None,
            classifier="head" if "head.weight" in tensors else None,
            centers=None,
            stem_relu=None,
        )
    if "backbone.base.conv1.weight" in tensors:
        return Layout(
            name="ctl_lightning",
            backbone_prefix="backbone.base.",
            bnneck="bn",
            classifier="fc_query",
            centers="center_loss.centers",
            stem_relu=None,
        )
    if "conv1.weight" in tensors and any(k.startswith("layer1.") for k in tensors):
        ibn = any(".bn1.IN." in k for k in tensors)
        return Layout(
            name="resnet_ibn_a" if ibn else "torchvision_resnet",
            backbone_prefix="",
            bnneck=None,
            classifier="fc" if "fc.weight" in tensors else None,
            centers=None,
            stem_relu=None if ibn else True,
        )
    nested = sorted(k[: -len("conv1.weight")] for k in tensors if k.endswith("conv1.weight"))
    nested = [p for p in nested if f"{p}layer1.0.conv1.weight" in tensors]
    if nested:
        raise TorchFileError(
            f"{source}: a ResNet under the key prefix {nested[0]!r}, a layout ctl_jax does "
            "not know (known: torchvision/IBN-a state dicts, original CTL Lightning checkpoints)"
        )
    raise TorchFileError(
        f"{source}: neither a ResNet, a timm ViT nor a torchreid OSNet state dict (no "
        "conv1.weight and layer1.* keys, no patch_embed.proj.weight and cls_token, no "
        "conv1.conv.weight and conv2.0.* keys; its "
        f"{len(tensors)} tensors are named like {_examples(tensors)})"
    )


def infer_architecture(tensors: dict[str, np.ndarray], prefix: str, source: str) -> Architecture:
    """Depth, block type and IBN-a from the keys under `prefix`."""
    stem = tensors.get(f"{prefix}conv1.weight")
    if stem is None or stem.shape != (64, 3, 7, 7):
        raise TorchFileError(
            f"{source}: {prefix}conv1.weight has shape {getattr(stem, 'shape', None)}, "
            "expected the ResNet stem (64, 3, 7, 7)"
        )
    sizes = []
    for stage in range(1, 5):
        pattern = re.compile(rf"{re.escape(prefix)}layer{stage}\.(\d+)\.")
        blocks = {int(m.group(1)) for k in tensors if (m := pattern.match(k))}
        if not blocks or blocks != set(range(max(blocks) + 1)):
            raise TorchFileError(
                f"{source}: stage layer{stage} is missing or has gaps (blocks {sorted(blocks)})"
            )
        sizes.append(len(blocks))
    bottleneck = f"{prefix}layer1.0.conv3.weight" in tensors
    ibn = f"{prefix}layer1.0.bn1.IN.weight" in tensors
    key = (tuple(sizes), bottleneck, ibn)
    arch = _ARCHITECTURES.get(key)
    if arch is None:
        kind = ("bottleneck" if bottleneck else "basic") + (" IBN-a" if ibn else "")
        raise TorchFileError(
            f"{source}: a ResNet with {kind} blocks {tuple(sizes)}, which ctl_jax does not "
            f"build (known: {', '.join(sorted(set(_ARCHITECTURES.values())))})"
        )
    return Architecture(arch, tuple(sizes), bottleneck, ibn)


def read_settings(hparams: dict) -> dict[str, Any]:
    """Model and input settings from the original code's pickled yacs config (read as data).

    Returns a dict with any of `name` (MODEL.NAME), `last_stride` (MODEL.LAST_STRIDE) and
    `image_size` ((height, width) from INPUT.SIZE_TEST) that the config holds with valid values.
    """
    settings: dict[str, Any] = {}
    model = as_mapping(hparams.get("MODEL")) or {}
    inputs = as_mapping(hparams.get("INPUT")) or {}
    if isinstance(model.get("NAME"), str):
        settings["name"] = model["NAME"]
    if model.get("LAST_STRIDE") in (1, 2):
        settings["last_stride"] = int(model["LAST_STRIDE"])
    size = inputs.get("SIZE_TEST")
    if (
        isinstance(size, (list, tuple))
        and len(size) == 2
        and all(isinstance(s, int) and s > 0 for s in size)
    ):
        settings["image_size"] = (int(size[0]), int(size[1]))
    return settings


def torch_key(name: str, layout: Layout) -> str | None:
    """The state-dict key of a flat Flax variable name such as `params/backbone/conv1/kernel`.

    Returns None for head variables the layout does not have.
    """
    collection, module, *rest = name.split("/")
    leaf = rest[-1]
    if leaf in ("cls_token", "pos_embed"):  # ViT parameters, named as in timm
        torch_leaf = leaf
    elif leaf == "kernel":
        torch_leaf = "weight"
    elif collection == "batch_stats" or leaf in ("scale", "bias"):
        torch_leaf = _BN_LEAVES[leaf]
    else:
        raise ValueError(f"no PyTorch name for Flax variable {name}")
    if module == "backbone":
        parts = []
        for part in rest[:-1]:
            if re.search(r"_\d", part):  # a Sequential index: layer1_0, blocks_3, conv2_2_0
                parts += re.sub(r"_(\d+)", r".\1", part).split(".")
            elif part == "downsample_conv":
                parts += ["downsample", "0"]
            elif part == "downsample_bn":
                parts += ["downsample", "1"]
            else:
                parts.append(part)
        return layout.backbone_prefix + ".".join([*parts, torch_leaf])
    head = {"bnneck": layout.bnneck, "classifier": layout.classifier}.get(module)
    if module not in ("bnneck", "classifier"):
        raise ValueError(f"no PyTorch name for Flax variable {name}")
    return f"{head}.{torch_leaf}" if head else None


def _to_flax(array: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    """PyTorch layout -> Flax layout: OIHW -> HWIO for 4-d kernels, (out, in) -> (in, out)."""
    array = np.asarray(array, np.float32)
    if array.ndim == 4:
        array = array.transpose(2, 3, 1, 0)
    elif array.ndim == 2 and len(target_shape) == 2:
        array = array.T
    return np.ascontiguousarray(array)


def _default(name: str, shape: tuple[int, ...]) -> np.ndarray:
    # Identity BNNeck (scale 1, running mean 0, variance 1) and a zero classifier.
    if name.endswith(("/scale", "/var")):
        return np.ones(shape, np.float32)
    return np.zeros(shape, np.float32)


def map_state_dict(
    source_model: SourceModel,
    targets: dict[str, tuple[int, ...]],
    source: str,
    grid: tuple[int, int] | None = None,
) -> MappedWeights:
    """Fills every Flax variable from the state dict.

    Args:
      source_model: from `read_source`.
      targets: flat Flax variable name (`params/...` or `batch_stats/...`) -> shape, for the
        model built from the inferred architecture and `num_classes`.
      source: the file name, for error messages.
      grid: a ViT's patch grid (rows, columns) for the configured image size and stride; the
        file's (square) position embeddings are resampled to it (`resample.py`).

    Raises:
      TorchFileError: a backbone tensor is missing, a shape does not fit, a value is not
        finite, or the BNNeck has a non-zero shift (ctl_jax's BNNeck has none).
    """
    tensors, layout = source_model.state_dict, source_model.layout
    flat: dict[str, np.ndarray] = {}
    used, missing, filled, mismatched = set(), [], [], []
    for name, shape in targets.items():
        key = torch_key(name, layout)
        if key is None:  # a head part the source model does not have
            flat[name] = _default(name, shape)
            filled.append(name)
            continue
        if key not in tensors:
            missing.append(key)
            continue
        value = _to_flax(tensors[key], shape)
        if key == "pos_embed" and grid is not None and value.shape != tuple(shape):
            value = _resampled_pos_embed(value, grid, source)
        if value.shape != tuple(shape):
            mismatched.append(f"{key} {tensors[key].shape} -> {name} {tuple(shape)}")
            continue
        if not np.all(np.isfinite(value)):
            raise TorchFileError(f"{source}: {key} contains NaN or infinite values")
        flat[name] = value
        used.add(key)
    if missing:
        raise TorchFileError(
            f"{source}: {len(missing)} tensors of the {source_model.architecture.arch} model "
            f"are missing, e.g. {_examples(missing)}"
        )
    if mismatched:
        raise TorchFileError(
            f"{source}: {len(mismatched)} tensors do not fit the "
            f"{source_model.architecture.arch} model: {_examples(mismatched, 3)}"
        )
    if layout.bnneck:
        bias_key = f"{layout.bnneck}.bias"
        if bias_key in tensors:
            if np.any(np.asarray(tensors[bias_key]) != 0):
                raise TorchFileError(
                    f"{source}: {bias_key} is not zero (max |bias| "
                    f"{np.abs(tensors[bias_key]).max():.3g}); the BNNeck shift is frozen at "
                    "zero in CTL and ctl_jax has none"
                )
            used.add(bias_key)
    centers = None
    if layout.centers and layout.centers in tensors:
        centers = np.asarray(tensors[layout.centers], np.float32)
        expected = (source_model.num_classes, source_model.architecture.feature_dim)
        if centers.shape != expected:
            raise TorchFileError(
                f"{source}: {layout.centers} has shape {centers.shape}, expected {expected} "
                "(classes x feature dimension)"
            )
        used.add(layout.centers)
    ignored = sorted(k for k in tensors if k.endswith("num_batches_tracked"))
    unused = sorted(k for k in tensors if k not in used and k not in ignored)
    params: dict = {}
    batch_stats: dict = {}
    for name, value in flat.items():
        collection, *path = name.split("/")
        node = params if collection == "params" else batch_stats
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return MappedWeights(params, batch_stats, centers, sorted(used), unused, ignored, filled)


def _resampled_pos_embed(value: np.ndarray, grid: tuple[int, int], source: str) -> np.ndarray:
    """The file's position embeddings on `grid`, from the square grid timm stores."""
    stored = resample.source_grid(value.shape[1])
    if value.ndim != 3 or stored is None:
        raise TorchFileError(
            f"{source}: pos_embed has shape {value.shape}, not a class token and a square grid"
        )
    return resample.resample_pos_embed(value, stored, grid)


def _examples(items, n: int = 4) -> str:
    items = list(items)
    shown = ", ".join(items[:n])
    return shown + (f" (+{len(items) - n} more)" if len(items) > n else "")
