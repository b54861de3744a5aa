"""Opens the dataset a config names: its records and a random-access image reader per split."""

from __future__ import annotations

import pathlib

from ctl_jax.data.image_io import FileImageReader
from ctl_jax.data.records import RetrievalDataset
from ctl_jax.errors import ConfigError

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

    from ctl_jax.data.readers import open_dataset

    kwargs = {}
    if data_cfg.name in ("street2shop", "deepfashion"):
        root = pathlib.Path(data_cfg.root)
        kwargs["json_paths"] = {
            split: str(root / getattr(data_cfg, f"{split}_json")) for split in SPLITS
        }
    dataset = open_dataset(data_cfg.name, data_cfg.root, **kwargs)
    readers = {split: FileImageReader(getattr(dataset, split).paths) for split in SPLITS}
    return dataset, readers
