"""Opens the dataset a config names: its records and a random-access image reader per split."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from ctl_jax.data.image_edits import image_reader
from ctl_jax.data.records import SPLITS, RetrievalDataset, Split
from ctl_jax.errors import ConfigError, DatasetError

# The splits an evaluation reads: training images need not be on disk to evaluate.
EVALUATION_SPLITS = ("query", "gallery")


def load_dataset(data_cfg, splits=SPLITS) -> tuple[RetrievalDataset, dict]:
    """Reads the dataset of a config's `data` group.

    Args:
      data_cfg: the config's `data` group.
      splits: the splits to read (`EVALUATION_SPLITS` to evaluate); the others are empty
        and their files are not needed. With `data.eval_name`, the training split comes
        from `data.name` and query/gallery from `data.eval_name`: only the datasets that
        give a requested split are opened.

    Returns:
      (dataset, readers): the records, and for each split an object with `read(index) ->
      bytes` giving the encoded image of row `index` (picklable, for grain worker processes).
    """
    if data_cfg.source == "tfds":
        from ctl_jax.data.tfds_builders import load_tfds

        if not data_cfg.tfds_data_dir:
            raise ConfigError("data.source='tfds' needs data.tfds_data_dir (the prepared build)")
        return load_tfds(data_cfg.name, data_cfg.tfds_data_dir)
    if data_cfg.source != "folder":
        raise ConfigError(f"data.source must be 'folder' or 'tfds', got {data_cfg.source!r}")

    splits = tuple(splits)
    eval_name = data_cfg.get("eval_name", "")
    if eval_name:  # train on one dataset, evaluate on another (GLDv2 -> Revisited Oxford)
        eval_splits = tuple(s for s in splits if s != "train")
        eval_root = data_cfg.get("eval_root", "") or data_cfg.root
        evaluation = _open(data_cfg, eval_name, eval_root, eval_splits or SPLITS)
        train = Split.empty()
        if "train" in splits:
            train = _open(data_cfg, data_cfg.name, data_cfg.root, ("train",)).train
        dataset = dataclasses.replace(
            evaluation,
            name=f"{data_cfg.name}+{evaluation.name}",
            train=train,
            image_edits={k: v for k, v in evaluation.image_edits.items() if k != "train"},
        )
    else:
        dataset = _open(data_cfg, data_cfg.name, data_cfg.root, splits)
    if data_cfg.get("small_identities", "pad") == "drop":
        dataset = dataclasses.replace(
            dataset, train=drop_small_identities(dataset.train, int(data_cfg.num_instances))
        )
    elif data_cfg.get("small_identities", "pad") != "pad":
        raise ConfigError(
            f"data.small_identities must be 'pad' or 'drop', got {data_cfg.small_identities!r}"
        )
    readers = {
        split: image_reader(getattr(dataset, split).paths, dataset.image_edits.get(split))
        for split in SPLITS
    }
    return dataset, readers


def _open(data_cfg, name: str, root, splits=SPLITS) -> RetrievalDataset:
    from ctl_jax.data import benchmarks
    from ctl_jax.data.catalog import open_dataset

    kwargs = benchmarks.reader_options(name, data_cfg)
    if name in ("street2shop", "deepfashion"):
        root_path = pathlib.Path(root)
        unset = [f"data.{split}_json" for split in SPLITS if not getattr(data_cfg, f"{split}_json")]
        if unset:
            raise ConfigError(
                f"dataset {name!r} needs its annotation files: set {', '.join(unset)} (JSON "
                f"file names relative to data.root, e.g. --config.data.train_json=train.json)"
            )
        kwargs["json_paths"] = {
            split: str(root_path / getattr(data_cfg, f"{split}_json")) for split in SPLITS
        }
    try:
        return open_dataset(name, root, splits=splits, **kwargs)
    except DatasetError as error:
        hint = _folder_layout_hint(name, root, splits)
        if hint is None:
            raise
        raise DatasetError(f"{error}; {hint}") from error


def _folder_layout_hint(name: str, root, splits) -> str | None:
    """A hint when a Market-style dataset's folders are missing but `root` holds the
    `train/ query/ gallery/` folders of a folder per identity (`data.name='folder'`)."""
    from ctl_jax.data import readers

    if name not in readers.MARKET_STYLE_DIRS:
        return None
    root = pathlib.Path(root).expanduser()
    base = readers.market_style_dir(root, name)
    market = [base / readers.MARKET_SPLIT_FOLDERS[s] for s in splits]
    if all(folder.is_dir() for folder in market):
        return None  # the Market layout is there: the error is about its contents
    if not all((root / split).is_dir() for split in splits):
        return None
    return (
        f"{root} has the {', '.join(f'{s}/' for s in splits)} folders of one folder per "
        f"identity: pass --config.data.name=folder to read them"
    )


def drop_small_identities(train: Split, min_images: int) -> Split:
    """The training split without identities of fewer than `min_images` images, relabelled
    to 0..K-1 (`data.small_identities="drop"`; "pad" keeps them: the sampler pads their
    groups with masked slots)."""
    labels, counts = np.unique(train.pids, return_counts=True)
    kept = train.subset(np.isin(train.pids, labels[counts >= min_images]))
    _, relabelled = np.unique(kept.pids, return_inverse=True)
    return Split(kept.paths, relabelled.astype(np.int64), kept.camids)


def check_trainable(dataset: RetrievalDataset, evaluates: bool = True) -> None:
    """Raises a one-line error when `dataset` cannot be trained on (and, if `evaluates`,
    evaluated on)."""
    from ctl_jax.data.readers import DatasetError

    if len(dataset.train) == 0:
        raise DatasetError(
            f"dataset {dataset.name!r} has no training split (an evaluation-only benchmark): "
            "train on another dataset and evaluate with ctl_jax.evaluate, or set "
            "data.eval_name to evaluate on it while training"
        )
    if evaluates and (len(dataset.query) == 0 or len(dataset.gallery) == 0):
        raise DatasetError(
            f"dataset {dataset.name!r} has no query/gallery split (a training source): set "
            "data.eval_name (and data.eval_root) to the dataset to evaluate on, e.g. roxford5k"
        )
