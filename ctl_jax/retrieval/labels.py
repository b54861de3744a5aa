"""Identity labels: the strings a user names identities by, and the integer pids behind them.

Every embeddings file and index carries both: `labels` (str, "" where the identity is
unknown) for people, `pids` (int64, -1 where unknown) for the evaluation code. The pids are
a function of the label set (`pids_for_labels`), so files, indexes and updated indexes
number identities the same way:

* when every known label is a non-negative integer written plainly ("2", "1501"; Market-style
  names give these), the pid is that integer;
* otherwise the pid is the label's position among the sorted distinct known labels.

Files written before labels existed get `labels_from_pids` ("2" for pid 2, "" for -1).
"""

from __future__ import annotations

import numpy as np

UNKNOWN = ""


def labels_from_pids(pids: np.ndarray) -> np.ndarray:
    """(N,) str labels of (N,) int pids: str(pid), "" where pid < 0."""
    pids = np.asarray(pids, np.int64)
    labels = pids.astype(str)
    labels[pids < 0] = UNKNOWN
    return labels.astype(str)


def is_plain_integer(label: str) -> bool:
    return label.isdigit() and label.isascii() and (label == "0" or not label.startswith("0"))


def pids_for_labels(labels: np.ndarray) -> np.ndarray:
    """(N,) int64 pids of (N,) str labels (see the module docstring); -1 for ""."""
    labels = np.asarray(labels).astype(str)
    pids = np.full(len(labels), -1, np.int64)
    known = labels != UNKNOWN
    if not known.any():
        return pids
    distinct, inverse = np.unique(labels[known], return_inverse=True)
    if all(is_plain_integer(label) for label in distinct.tolist()):
        pids[known] = np.asarray([int(label) for label in distinct], np.int64)[inverse]
    else:
        pids[known] = inverse
    return pids


def check_labels(labels: np.ndarray, pids: np.ndarray, source: str) -> np.ndarray:
    """Validates labels against pids: "" exactly where pid < 0, and one pid per label and one
    label per pid. Returns the labels as a str array.

    Raises:
      ValueError: the message names `source` and an offending label or pid.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{source}: 'labels' must be 1-D, got shape {labels.shape}")
    if labels.size and labels.dtype.kind not in "US":
        raise ValueError(f"{source}: 'labels' must be strings, got {labels.dtype}")
    labels = labels.astype(str)
    pids = np.asarray(pids, np.int64)
    if len(labels) != len(pids):
        raise ValueError(f"{source}: 'labels' has {len(labels)} rows but 'pids' has {len(pids)}")
    unknown = labels == UNKNOWN
    mismatch = unknown != (pids < 0)
    if mismatch.any():
        i = int(np.flatnonzero(mismatch)[0])
        raise ValueError(
            f"{source}: row {i} has label {labels[i]!r} but pid {int(pids[i])}; the label "
            "must be empty exactly where the pid is -1 (unknown)"
        )
    pairs = np.unique(np.stack([labels[~unknown], pids[~unknown].astype(str)], axis=1), axis=0)
    for column, what, other in ((0, "label", "pids"), (1, "pid", "labels")):
        values, counts = np.unique(pairs[:, column], return_counts=True)
        if (counts > 1).any():
            bad = values[counts > 1][0]
            shown = sorted(pairs[pairs[:, column] == bad, 1 - column].tolist())[:3]
            raise ValueError(
                f"{source}: {what} {bad!r} has several {other} ({', '.join(shown)}); "
                "each identity needs one label and one pid"
            )
    return labels
