"""Opens the dataset a config names: its records and a random-access image reader per split."""

from __future__ import annotations

import dataclasses
import pathlib

from ctl_jax.errors import ConfigError
import numpy as np

from ctl_jax.data.image_edits import image_reader
from ctl_jax.data.records import RetrievalDataset, Split

SPLITS = ("train", "query", "gallery")


def load_dataset(data_cfg) -> tuple[RetrievalDataset, dict]:
    """Reads the dataset of a config's `data` group.

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

    dataset = _open(data_cfg, data_cfg.name, data_cfg.root)
    eval_name = data_cfg.get("eval_name", "")
    if eval_name:  # train on one dataset, evaluate on another (GLDv2 -> Revisited Oxford)
        evaluation = _open(data_cfg, eval_name, data_cfg.get("eval_root", "") or data_cfg.root)
        dataset = dataclasses.replace(
            evaluation,
            name=f"{dataset.name}+{evaluation.name}",
            train=dataset.train,
            image_edits={k: v for k, v in evaluation.image_edits.items() if k != "train"},
        )
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


def _open(data_cfg, name: str, root) -> RetrievalDataset:
    from ctl_jax.data import benchmarks
    from ctl_jax.data.catalog import open_dataset

    kwargs = benchmarks.reader_options(name, data_cfg)
    if name in ("street2shop", "deepfashion"):
        root_path = pathlib.Path(root)
        kwargs["json_paths"] = {
            split: str(root_path / getattr(data_cfg, f"{split}_json")) for split in SPLITS
        }
    return open_dataset(name, root, **kwargs)


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
