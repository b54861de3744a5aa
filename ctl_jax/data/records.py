"""Plain records describing a retrieval dataset: what every reader returns.

A reader (Market-1501, DukeMTMC-reID, COCO-JSON fashion, folder-per-identity, synthetic)
turns files on disk into a `RetrievalDataset`; the samplers, the grain pipeline and the
evaluation only ever see these records, never the on-disk layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

# The evaluation protocols (`ctl_jax.evaluation.protocols`) of datasets with identity labels
# (re-ID, fashion): the Market-1501 protocol first (their default), then Recall@K.
IDENTITY_PROTOCOLS = ("market", "recall_at_k")
# The splits of every dataset; a reader asked for some of them (`splits=`) leaves the others
# empty without touching their files (an evaluation reads query and gallery only).
SPLITS = ("train", "query", "gallery")


def check_splits(splits) -> frozenset[str]:
    """`splits` (names from `SPLITS`) as a set; ValueError for an unknown name."""
    chosen = frozenset(splits)
    if not chosen <= set(SPLITS):
        raise ValueError(f"unknown split(s) {sorted(chosen - set(SPLITS))}; valid: {SPLITS}")
    return chosen


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a dataset as parallel arrays (length N each).

    Attributes:
      paths: (N,) str, absolute or dataset-relative image paths.
      pids: (N,) int64 identity labels. Training splits are relabelled to
        0..num_classes-1; query/gallery splits keep raw identity values.
      camids: (N,) int64 camera ids, 0-based.
    """

    paths: np.ndarray
    pids: np.ndarray
    camids: np.ndarray

    def __post_init__(self):
        n = len(self.paths)
        if len(self.pids) != n or len(self.camids) != n:
            raise ValueError(
                f"Split arrays differ in length: paths {n}, pids {len(self.pids)}, "
                f"camids {len(self.camids)}"
            )

    @classmethod
    def from_lists(cls, paths, pids, camids) -> Split:
        return cls(
            paths=np.asarray(paths, dtype=str),
            pids=np.asarray(pids, dtype=np.int64),
            camids=np.asarray(camids, dtype=np.int64),
        )

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, index) -> Split:
        """The rows `index` (a boolean mask or indices) as a new Split."""
        return Split(self.paths[index], self.pids[index], self.camids[index])

    @classmethod
    def empty(cls) -> Split:
        """A split with no images (the training split of an evaluation-only dataset)."""
        return cls.from_lists([], [], [])

    @property
    def num_ids(self) -> int:
        return len(np.unique(self.pids))

    @property
    def num_cams(self) -> int:
        return len(np.unique(self.camids))


@dataclasses.dataclass(frozen=True)
class RetrievalDataset:
    """Train / query / gallery splits of one dataset.

    Attributes:
      name: dataset name, e.g. "market1501".
      train: training split, pids relabelled to 0..num_classes-1.
      query: query split, raw pids.
      gallery: gallery split, raw pids.
      protocols: evaluation protocols the dataset supports, the default (its published
        one) first: "market", "recall_at_k", "revisited", "holidays".
      ground_truth: what a protocol needs beyond pids, or None (the `RevisitedGroundTruth`
        of Revisited Oxford/Paris).
      image_edits: split name -> `ImageEdits` (per-image crop boxes or rotations applied
        when the images are read, e.g. the query boxes of Revisited Oxford); empty for
        datasets whose images are used as they are.
      has_cameras: whether the query and gallery camera ids are real (read from the data:
        Market-style names, list files). False when the reader made them up (camera 0 for
        query, 1 for gallery, so that the same-camera filter removes nothing): then the
        camera-aware evaluation modes have nothing to work with, and "auto" evaluation
        settings leave them out (`ctl_jax.evaluator.resolve_evaluation`).
    """

    name: str
    train: Split
    query: Split
    gallery: Split
    protocols: tuple[str, ...] = IDENTITY_PROTOCOLS
    ground_truth: Any = None
    image_edits: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    has_cameras: bool = True

    @property
    def num_classes(self) -> int:
        return int(self.train.pids.max()) + 1 if len(self.train) else 0

    def statistics_table(self) -> str:
        """The dataset statistics table the original code prints; "-" for the cameras of a
        dataset whose camera ids are not real (`has_cameras` False)."""
        rows = [("train", self.train), ("query", self.query), ("gallery", self.gallery)]
        lines = [
            f"Dataset statistics: {self.name}",
            "  ----------------------------------------",
            "  subset   | # ids | # images | # cameras",
            "  ----------------------------------------",
        ]
        for label, split in rows:
            cameras = str(split.num_cams) if self.has_cameras else "-"
            lines.append(f"  {label:<8} | {split.num_ids:5d} | {len(split):8d} | {cameras:>9}")
        lines.append("  ----------------------------------------")
        if not self.has_cameras:
            lines.append("  (no camera ids in the data)")
        return "\n".join(lines)
