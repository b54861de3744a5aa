"""tensorflow-datasets builders for the Market-style re-ID datasets (no TensorFlow needed).

Each builder reads a manually downloaded folder with the readers of `ctl_jax.data.readers`
and writes `array_record` files with, per image, the encoded file bytes (`image`, exactly
the bytes of the original file), `pid`, `camid` (0-based) and the original `path`. Splits
are `train` (pids relabelled), `query` and `gallery` (raw pids), in the order of the folder
reader (shuffling is disabled), so record i of a split is image i of the folder reader.

Random access uses `builder.as_data_source(split)`, which needs no TensorFlow; building
with `tfds.features.Tensor(shape=(), dtype=np.object_)` bytes does not either.

    builder = prepare_tfds("synthetic", manual_dir="data/synthetic_reid", data_dir="data/tfds")
    dataset, readers = load_tfds("synthetic", data_dir="data/tfds")
    jpeg_bytes = readers["query"].read(0)   # dataset.query.paths[0] is the original path
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from ctl_jax.data.catalog import open_dataset
from ctl_jax.errors import DatasetError
from ctl_jax.data.records import RetrievalDataset, Split

SPLITS = ("train", "query", "gallery")

_INSTRUCTIONS = """\
Pass the folder as the manual download directory (`prepare_tfds(name, manual_dir, ...)` or
`DownloadConfig(manual_dir=...)`). It must contain {layout}, i.e. the folders
`bounding_box_train/`, `query/` and `bounding_box_test/` with Market-style file names
(`0002_c1s1_000451_00.jpg`).
"""


class _MarketStyleBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared builder: one example per image of the folder reader."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Encoded image bytes, pid, camid (0-based), original path."}
    READER_NAME = ""  # name for `open_dataset`

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "pid": tfds.features.Scalar(dtype=np.int64),
                    "camid": tfds.features.Scalar(dtype=np.int64),
                    "path": tfds.features.Tensor(shape=(), dtype=np.object_),
                }
            ),
            disable_shuffling=True,  # record i == image i of the folder reader
        )

    def _split_generators(self, dl_manager):
        dataset = open_dataset(self.READER_NAME, dl_manager.manual_dir)
        return {split: self._generate_examples(getattr(dataset, split)) for split in SPLITS}

    def _generate_examples(self, split: Split):
        for i, (path, pid, camid) in enumerate(zip(split.paths, split.pids, split.camids)):
            with open(path, "rb") as f:
                data = f.read()
            yield i, {"image": data, "pid": int(pid), "camid": int(camid), "path": str(path)}


class CtlMarket1501(_MarketStyleBuilder):
    """Market-1501 (manual download)."""

    READER_NAME = "market1501"
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS.format(
        layout="`market1501/` (or is that folder itself)"
    )


class CtlDukemtmc(_MarketStyleBuilder):
    """DukeMTMC-reID (manual download)."""

    READER_NAME = "dukemtmc"
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS.format(
        layout="`DukeMTMC-reID/` (or is that folder itself)"
    )


class CtlSynthetic(_MarketStyleBuilder):
    """The synthetic re-ID set of `ctl_jax.data.synthetic` (generate it first)."""

    READER_NAME = "synthetic"
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS.format(
        layout="the output of `python -m ctl_jax.data.synthetic --output=DIR`"
    )


BUILDERS = {"market1501": CtlMarket1501, "dukemtmc": CtlDukemtmc, "synthetic": CtlSynthetic}


def _builder_class(name: str):
    if name not in BUILDERS:
        raise DatasetError(f"No tfds builder for {name!r}; known: {sorted(BUILDERS)}")
    return BUILDERS[name]


def prepare_tfds(name: str, manual_dir, data_dir) -> tfds.core.DatasetBuilder:
    """Builds dataset `name` from the folder `manual_dir` into `data_dir` (once)."""
    builder = _builder_class(name)(data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
    )
    return builder


class RecordReader:
    """Picklable random access to the encoded image bytes of one split.

    The data source is opened lazily in each process, so the reader can be sent to
    grain worker processes.
    """

    def __init__(self, name: str, data_dir, split: str):
        self.name, self.data_dir, self.split = name, os.fspath(data_dir), split
        self._source = None

    def _data_source(self):
        if self._source is None:
            builder = _builder_class(self.name)(data_dir=self.data_dir)
            self._source = builder.as_data_source(self.split)
        return self._source

    def __len__(self) -> int:
        return len(self._data_source())

    def read(self, index: int) -> bytes:
        """Encoded image bytes (the original file's bytes) of record `index`."""
        return self._data_source()[int(index)]["image"]

    def __getstate__(self):
        return {"name": self.name, "data_dir": self.data_dir, "split": self.split}

    def __setstate__(self, state):
        self.__init__(**state)


def load_tfds(name: str, data_dir) -> tuple[RetrievalDataset, dict[str, RecordReader]]:
    """Records and byte readers of a prepared dataset.

    Returns (dataset, readers): `dataset.<split>.paths` are the original file paths stored
    at build time (they need not exist any more); `readers[split].read(i)` gives the bytes
    of image i of that split.
    """
    builder = _builder_class(name)(data_dir=os.fspath(data_dir))
    if not builder.is_prepared():
        raise DatasetError(f"{name!r} is not prepared in {data_dir}; run prepare_tfds first")
    splits, readers = {}, {}
    for split in SPLITS:
        source = builder.as_data_source(split)
        # One pass over the records for the metadata (the bytes are read, not decoded).
        rows = [source[i] for i in range(len(source))]
        splits[split] = Split.from_lists(
            [_as_str(r["path"]) for r in rows], [r["pid"] for r in rows], [r["camid"] for r in rows]
        )
        readers[split] = RecordReader(name, data_dir, split)
    return RetrievalDataset(name=name, **splits), readers


def _as_str(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
