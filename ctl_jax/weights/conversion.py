"""PyTorch file -> ctl_jax checkpoint directory (the library behind `python -m ctl_jax.convert`).

The output is an ordinary ctl_jax checkpoint (`<output>/checkpoints/0/`, orbax) whose `meta`
carries the full resolved config with the inferred model settings and the class count, so
`restore_model` (embed, evaluate) and `model.init_checkpoint` (training) need no other flags.
Its `state` item holds `params`, `batch_stats` and, for original CTL checkpoints, `centers`.

What each source becomes:
  - original CTL Lightning checkpoint: backbone, BNNeck and classifier as trained, the center
    loss centers, num_classes = the classifier's rows; `model.stem_relu` left automatic (no
    ReLU after the stem for plain ResNets, as the original); last stride and input size taken
    from the pickled training config when present.
  - torchvision / IBN-a ImageNet weights: the backbone; an identity BNNeck (scale 1, running
    mean 0, variance 1, the values a fresh BNNeck has); the ImageNet `fc.weight` as the
    1000-class classifier (its bias has no place: unused). Training from it takes the backbone
    (and the identity BNNeck); the classifier starts fresh because the class count differs.
    `model.stem_relu` is True for torchvision ResNets (they have the stem ReLU), so embedding
    with the converted checkpoint reproduces the torchvision network.
  - timm ViT weights: the backbone, with the position embeddings resampled from the file's
    square grid to the grid of the base config's image size and `model.vit_stride` (timm's
    bicubic, antialiased resampling); an identity BNNeck; `head.weight` as the classifier
    (`head.bias` unused). The embedding is the class token after the final LayerNorm.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import pathlib
import shutil

import ml_collections
import numpy as np

from ctl_jax import configs as config_lib
from ctl_jax import files
from ctl_jax.errors import NotAFolderError, OutputExistsError
from ctl_jax.weights import mapping, torch_pickle


@dataclasses.dataclass
class ConversionReport:
    """What `convert_checkpoint` did; `format_report` renders it for the terminal."""

    source: str
    output: str
    file_format: str
    layout: str
    arch: str
    stem_relu: bool | None
    last_stride: int
    image_size: tuple[int, int]
    num_classes: int
    grid: tuple[int, int] | None
    has_centers: bool
    mapped: int
    unused: list[str]
    ignored: list[str]
    filled: list[str]
    inert_objects: list[str]
    notes: list[str]


def resolve_config(
    config: ml_collections.ConfigDict, source_model: mapping.SourceModel
) -> tuple[ml_collections.ConfigDict, list[str]]:
    """A copy of `config` whose model group describes the source network.

    Returns:
      (config, notes): notes are human-readable remarks on settings taken from the file.
    """
    config = copy.deepcopy(config)
    notes = []
    settings = source_model.settings
    arch = source_model.architecture.arch
    config.model.arch = arch
    config.model.stem_relu = source_model.layout.stem_relu
    config.model.init_checkpoint = ""  # the converted weights are the model itself
    # The PyTorch networks (torchvision, IBN-a, the original CTL) average-pool and have a
    # linear classifier, whatever head the base config would train.
    with config.unlocked():  # a base config may predate these settings
        config.model.pooling = "avg"
        config.model.gem_learnable = False
        config.loss.classifier = "softmax"
    if "last_stride" in settings:
        config.model.last_stride = settings["last_stride"]
        notes.append(f"last stride {settings['last_stride']} from the pickled training config")
    if "image_size" in settings:
        config.data.height, config.data.width = settings["image_size"]
        notes.append(
            "input size {}x{} from the pickled training config (INPUT.SIZE_TEST)".format(
                *settings["image_size"]
            )
        )
    if source_model.skipped:
        notes.append(f"non-tensor state-dict entries left out: {', '.join(source_model.skipped)}")
    if settings.get("name") not in (None, arch):
        notes.append(
            f"the pickled config says MODEL.NAME={settings['name']!r}; the tensors are a "
            f"{arch}, which is what was built"
        )
    return config, notes


def abstract_variable_shapes(
    model, image_shape: tuple[int, int, int] = (64, 64, 3)
) -> dict[str, tuple[int, ...]]:
    """Flat `params/...` and `batch_stats/...` names -> shapes, without computing anything
    (a ViT's position embeddings depend on `image_shape`, a ResNet's variables do not)."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    tree = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
    flat = traverse_util.flatten_dict(tree, sep="/")
    return {name: tuple(leaf.shape) for name, leaf in flat.items()}


def check_output(output: pathlib.Path, overwrite: bool) -> None:
    """Refuses to write into a non-empty directory (or over a file) unless `overwrite`."""
    if output.exists() and not output.is_dir():
        raise NotAFolderError(f"--output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"--output {output} is not empty; pass --overwrite to replace its checkpoints/ "
            "or choose another directory"
        )


def convert_checkpoint(
    source: str | pathlib.Path,
    output: str | pathlib.Path,
    config: ml_collections.ConfigDict,
    overwrite: bool = False,
    allow_unsafe_globals: bool = False,
) -> ConversionReport:
    """Converts a PyTorch file into a ctl_jax checkpoint directory.

    Args:
      source: a torchvision / ResNet-IBN-a `.pth` or an original CTL Lightning `.ckpt`.
      output: directory to create; with `overwrite`, an existing `checkpoints/` in it is
        replaced (nothing else in it is touched).
      config: the base config (e.g. `configs/default.py`); its model group is replaced by the
        inferred settings, the rest (dataset, evaluation) is kept.
      allow_unsafe_globals: convert the tensors of a file that names code-executing globals
        (`os.system`, `builtins.eval`, ...) instead of refusing it. They are never called
        either way; this only records the user's consent to use such a file.

    Raises:
      torch_pickle.TorchFileError (a ValueError): unreadable file or unsupported model, or
        a file naming code-executing globals without `allow_unsafe_globals`.
      FileExistsError / NotADirectoryError: see `check_output`.
    """
    from ctl_jax.build import build_model
    from ctl_jax.checkpoints import CheckpointStore

    source, output = pathlib.Path(source), pathlib.Path(output)
    check_output(output, overwrite)
    torch_file = torch_pickle.load(source)
    if torch_file.code_names and not allow_unsafe_globals:
        raise torch_pickle.TorchFileError(
            f"{source} names code-executing globals ({', '.join(torch_file.code_names)}), "
            "which no weights file needs: it was made to run code when loaded by torch.load. "
            "Nothing was run. Pass --allow_unsafe_globals to convert its tensors anyway "
            "(the globals are never called)"
        )
    source_model = mapping.read_source(torch_file.root, str(source))
    resolved, notes = resolve_config(config, source_model)
    model = build_model(resolved, source_model.num_classes)
    image_shape = (int(resolved.data.height), int(resolved.data.width), 3)
    grid = _vit_grid(resolved, str(source))
    weights = mapping.map_state_dict(
        source_model, abstract_variable_shapes(model, image_shape), str(source), grid
    )
    if grid is not None:
        stored = source_model.state_dict["pos_embed"].shape[1] - 1
        if stored != grid[0] * grid[1]:
            notes.append(
                f"position embeddings resampled from {stored} patches to the {grid[0]}x"
                f"{grid[1]} grid of the config's {image_shape[0]}x{image_shape[1]} images"
            )

    state = {"params": weights.params, "batch_stats": weights.batch_stats}
    if weights.centers is not None:
        state["centers"] = weights.centers
    meta = {
        "config": json.loads(config_lib.config_to_json(resolved)),
        "num_classes": source_model.num_classes,
        "source": source.name,
        "source_sha256": torch_file.sha256,
        "converted_from": source_model.layout.name,
        "file_format": torch_file.format,
        "unused": weights.unused,
        "filled": weights.filled,
        "inert_objects": torch_file.inert_names,
    }
    if overwrite and (output / "checkpoints").exists():
        shutil.rmtree(output / "checkpoints")
    files.make_folder(output)  # an unwritable --output is a one-line error
    store = CheckpointStore(output, keep=1)
    try:
        store.save(0, state, {}, meta)
    finally:
        store.close()
    return ConversionReport(
        source=str(source),
        output=str(output),
        file_format=torch_file.format,
        layout=source_model.layout.name,
        arch=source_model.architecture.arch,
        stem_relu=resolved.model.stem_relu,
        last_stride=int(resolved.model.last_stride),
        image_size=(int(resolved.data.height), int(resolved.data.width)),
        num_classes=source_model.num_classes,
        grid=grid,
        has_centers=weights.centers is not None,
        mapped=len(weights.used),
        unused=weights.unused,
        ignored=weights.ignored,
        filled=weights.filled,
        inert_objects=torch_file.inert_names,
        notes=notes,
    )


def _vit_grid(config: ml_collections.ConfigDict, source: str) -> tuple[int, int] | None:
    """A ViT's patch grid at the config's image size and stride; None for a ResNet."""
    from ctl_jax.models import vit

    spec = vit.VIT_SPECS.get(config.model.arch)
    if spec is None:
        return None
    stride = config.model.get("vit_stride", None) or spec.patch
    height, width = int(config.data.height), int(config.data.width)
    grid = vit.grid_size(height, width, spec.patch, stride)
    if min(grid) < 1:
        raise torch_pickle.TorchFileError(
            f"{source}: the config's {height}x{width} images are smaller than one "
            f"{spec.patch}x{spec.patch} patch of {config.model.arch}"
        )
    return grid


def _stem(stem_relu: bool | None, arch: str) -> str:
    if stem_relu is None:
        return "on (automatic for IBN-a)" if "ibn" in arch else "off (automatic, as the original)"
    return "on" if stem_relu else "off"


def format_report(report: ConversionReport) -> str:
    """A short multi-line summary of a conversion."""
    if report.grid is not None:
        shape = f"patch grid {report.grid[0]}x{report.grid[1]}"
    elif report.layout == "torchreid_osnet":
        shape = "conv5 map average-pooled (torchreid's fc layer left out)"
    else:
        shape = (
            f"stem ReLU {_stem(report.stem_relu, report.arch)}, last stride {report.last_stride}"
        )
    lines = [
        f"converted {report.source} ({report.file_format} file, {report.layout} layout)",
        f"  model: {report.arch}, {shape}, input {report.image_size[0]}x{report.image_size[1]}, "
        f"{report.num_classes} classes{', center-loss centers' if report.has_centers else ''}",
        f"  tensors mapped: {report.mapped}; num_batches_tracked ignored: {len(report.ignored)}",
        f"  unused: {', '.join(report.unused) or 'none'}",
        f"  missing (set to defaults): {', '.join(report.filled) or 'none'}",
        "  pickled objects left inert (never executed): "
        + (", ".join(report.inert_objects) or "none"),
    ]
    lines += [f"  note: {n}" for n in report.notes]
    lines.append(f"written to {report.output}")
    return "\n".join(lines)


def inspect_source(source: str | pathlib.Path) -> str:
    """Describes a PyTorch file without converting it (and without executing any of it)."""
    source = pathlib.Path(source)
    torch_file = torch_pickle.load(source)  # raises on a damaged file or a wrong name hash
    by_kind: dict[str, list[str]] = {}
    for name, kind in sorted(torch_file.names.items()):
        by_kind.setdefault(kind, []).append(name)
    lines = [
        f"file: {source} ({source.stat().st_size:,} bytes, {torch_file.format} format)",
        f"sha256: {torch_file.sha256}"
        + (" (starts with the hash in its name)" if torch_pickle.name_hash(source) else ""),
        "objects the pickle names:",
        f"  tensor machinery (rebuilt as numpy arrays): {len(by_kind.get('tensor', []))}",
        f"  plain containers: {', '.join(by_kind.get('container', [])) or 'none'}",
        "  anything else, kept as inert placeholders (never imported or run): "
        + (", ".join(by_kind.get("inert", [])) or "none"),
    ]
    if torch_file.code_names:
        lines.append(
            f"  code-executing globals (convert refuses the file without "
            f"--allow_unsafe_globals): {', '.join(torch_file.code_names)}"
        )
    try:
        source_model = mapping.read_source(torch_file.root, str(source))
    except torch_pickle.TorchFileError as e:
        lines.append(f"not convertible: {e}")
        return "\n".join(lines)
    tensors = source_model.state_dict
    count = sum(int(np.prod(v.shape)) for v in tensors.values())
    arch = source_model.architecture
    lines += [
        f"state dict: {len(tensors)} tensors, {count:,} values",
        f"layout: {source_model.layout.name}; architecture: {arch.arch} "
        f"({arch.describe()}); classes: {source_model.num_classes}",
    ]
    if source_model.settings:
        lines.append(f"pickled training config: {source_model.settings}")
    return "\n".join(lines)
