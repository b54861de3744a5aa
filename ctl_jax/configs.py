"""Loading `configs/<name>.py` files outside of absl flags, and config helpers shared by the
entry points (train, evaluate, embed, convert)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import ml_collections

from ctl_jax.errors import MissingFileError


def load_module(path: str | pathlib.Path):
    """Imports a Python file as a module (configs are files, not an installed package)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingFileError(f"config file {path} does not exist")
    name = f"ctl_jax_config_{path.stem}_{abs(hash(str(path.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def base_config(config_file: str, name: str = "default") -> ml_collections.ConfigDict:
    """The config of a sibling file, for variants that start from another config.

    Usage in `configs/market1501.py`: `config = base_config(__file__)`.
    """
    return load_module(pathlib.Path(config_file).with_name(f"{name}.py")).get_config()


def load_config(path: str, argument: str | None = None) -> ml_collections.ConfigDict:
    """Loads `get_config([argument])` from a config file; `path:arg` syntax is accepted."""
    if argument is None and ":" in str(path):
        path, argument = str(path).split(":", 1)
    module = load_module(path)
    return module.get_config(argument) if argument else module.get_config()


def config_to_json(config: ml_collections.ConfigDict) -> str:
    """A stable JSON rendering of a config (the `config.json` of a work directory)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


# Fields that define what a checkpoint *is*. A work directory whose saved config differs in
# any of these holds a different model or training run and must not be resumed silently.
IDENTITY_FIELDS = (
    "seed",
    "data.name",
    "data.height",
    "data.width",
    "data.num_identities",
    "data.num_instances",
    "model.arch",
    "model.last_stride",
    "model.stem_relu",
    "model.pooling",
    "model.gem_p",
    "model.gem_learnable",
    "model.rmac_levels",
    "model.vit_stride",
    "model.drop_path",
    "loss",
    "solver.base_lr",
    "solver.weight_decay",
    "solver.warmup_epochs",
    "solver.milestones",
    "solver.gamma",
    "solver.optimizer",
    "solver.schedule",
)


# Settings added after work directories were first saved, with the value that a config saved
# without them used, so that such a run still resumes and its checkpoints still load.
ADDED_DEFAULTS = {
    "cpu_recompute": True,
    "cpu_winograd_tile": 2,
    "model.pooling": "avg",
    "model.gem_p": 3.0,
    "model.gem_learnable": False,
    "model.rmac_levels": 3,
    "loss.metric": "triplet",
    "loss.classifier": "softmax",
    "loss.scale": 30.0,
    "loss.classifier_margin": None,
    "loss.easy_margin": False,
    "model.vit_stride": None,
    "model.drop_path": 0.0,
    "solver.optimizer": "adam",
    "solver.momentum": 0.9,
    "solver.schedule": "step",
    "solver.min_lr_factor": 0.0,
}


def with_added_defaults(tree: dict) -> dict:
    """A copy of a config dict with the `ADDED_DEFAULTS` it lacks filled in."""
    tree = json.loads(json.dumps(tree, default=str))
    for dotted, value in ADDED_DEFAULTS.items():
        *groups, key = dotted.split(".")
        node = tree
        for group in groups:
            node = node.get(group) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.setdefault(key, value)
    return tree


def _lookup(tree: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def identity_differences(saved: dict, current: dict) -> list[str]:
    """Lists the identity fields in which two config dicts differ, as readable strings
    (a setting one of them predates counts as its `ADDED_DEFAULTS` value)."""
    saved, current = with_added_defaults(saved), with_added_defaults(current)
    diffs = []
    for field in IDENTITY_FIELDS:
        a, b = _lookup(saved, field), _lookup(current, field)
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            diffs.append(f"{field}: saved {a!r}, now {b!r}")
    return diffs
