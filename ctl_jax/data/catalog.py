"""Every dataset ctl_jax reads, by name: `open_dataset(name, root)`.

Above the readers (`readers` for Market-1501/DukeMTMC-reID, the fashion sets and a folder
per identity; `benchmarks` for the other benchmark datasets), so that the readers need not
know one another.
"""

from __future__ import annotations

import os

from ctl_jax.data import benchmarks, readers
from ctl_jax.data.records import SPLITS, RetrievalDataset, check_splits
from ctl_jax.errors import DatasetError

DATASET_NAMES = (
    "market1501",
    "dukemtmc",
    "synthetic",
    "street2shop",
    "deepfashion",
    "folder",
    # `ctl_jax.data.benchmarks`:
    "msmt17",
    "cuhk03_detected",
    "cuhk03_labeled",
    "veri776",
    "roxford5k",
    "rparis6k",
    "holidays",
    "gldv2",
    "sop",
    "inshop",
)
# Datasets whose reader has no choice of splits: evaluation-only benchmarks (no training
# split) and a training-only source. They are read whole whatever `splits` asks.
_WHOLE = ("roxford5k", "rparis6k", "holidays", "gldv2")


def open_dataset(
    name: str, root: str | os.PathLike, *, splits=SPLITS, **kwargs
) -> RetrievalDataset:
    """Reads dataset `name` from `root`.

    Names: "market1501" (`<root>/market1501/`), "dukemtmc" (`<root>/DukeMTMC-reID/`),
    "synthetic" (`root` holds `bounding_box_train/` etc.), "street2shop" and "deepfashion"
    (`read_coco_fashion`; pass `json_paths=`), "folder" (`read_folder_per_identity`), and
    the benchmarks of `ctl_jax.data.benchmarks` (MSMT17, CUHK03-NP, VeRi-776, Revisited
    Oxford/Paris, Holidays, Google Landmarks v2, Stanford Online Products, In-Shop), which
    read `root` as their unpacked download. Extra keyword arguments go to the reader.

    `splits`: the splits to read; the others are empty and their files are not needed
    (an evaluation reads ("query", "gallery")). The landmark benchmarks are read whole.
    """
    if check_splits(splits) != set(SPLITS) and name not in _WHOLE:
        kwargs["splits"] = tuple(splits)
    if name in readers.MARKET_STYLE_DIRS:
        return readers.read_market_style(root, name, **kwargs)
    if name in ("street2shop", "deepfashion"):
        return readers.read_coco_fashion(root, name=name, **kwargs)
    if name == "folder":
        return readers.read_folder_per_identity(root, **kwargs)
    if name in benchmarks.READERS:
        return benchmarks.READERS[name](root, **kwargs)
    raise DatasetError(f"Unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)}")
