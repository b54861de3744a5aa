"""Where a run stands in its input: the resume position saved with every checkpoint.

Stored as the checkpoint's `data` item (JSON), in the format of the first ctl_jax releases so
that their checkpoints resume:

    {"epoch": 3, "iterator": {"batches_done": 17}, "batches_done": 17}  mid-epoch
    {"epoch": 4, "iterator": null}                                      end of an epoch
    {"epoch": 4, "iterator": null, "evaluation_pending": true}          ... whose evaluation
                                                                         is still to run
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

# The JSON key of `DataPosition.evaluation_pending`.
EVALUATION_PENDING = "evaluation_pending"


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """The input pipeline's position in a run.

    Attributes:
      epoch: the 0-based epoch to run (or to continue, mid-epoch); after the last epoch,
        the number of epochs.
      iterator: not None mid-epoch, None at an epoch boundary: ``{"batches_done": n}``
        (checkpoints of earlier releases hold a grain iterator state there). Resuming uses
        `batches_done` only: the run's iterator starts at that batch of `epoch`.
      batches_done: batches of `epoch` already trained (mid-epoch only). The same in every
        process: each holds the position in its own share of the epoch.
      evaluation_pending: the epoch before `epoch` ended on a stop request before its due
        evaluation ran (the checkpoint does not wait for it); the resumed run evaluates first.
    """

    epoch: int = 0
    iterator: dict | None = None
    batches_done: int = 0
    evaluation_pending: bool = False

    @property
    def mid_epoch(self) -> bool:
        return self.iterator is not None

    def to_json(self) -> dict:
        """The checkpoint's `data` item (keys present only where the old format had them)."""
        data = {"epoch": int(self.epoch), "iterator": self.iterator}
        if self.mid_epoch:
            data["batches_done"] = int(self.batches_done)
        if self.evaluation_pending:
            data[EVALUATION_PENDING] = True
        return data

    @classmethod
    def from_json(cls, data: Mapping) -> DataPosition:
        """Reads a checkpoint's `data` item (see the module docstring)."""
        return cls(
            epoch=int(data["epoch"]),
            iterator=data.get("iterator"),
            batches_done=int(data.get("batches_done", 0)),
            evaluation_pending=bool(data.get(EVALUATION_PENDING, False)),
        )
