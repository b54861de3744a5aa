"""Open-set search: "is this person in the database at all?" as a score threshold.

`python -m ctl_jax.search ... --min_score=S` keeps only matches whose cosine score is at
least S; a query left without a match is reported as unknown ("known": false). The
threshold is either given (a cosine in [-1, 1]) or calibrated: `--min_score=auto:F
--calibration=metrics.json` reads the threshold at false-positive rate F from the
verification block that `python -m ctl_jax.evaluate ... --output=metrics.json` wrote for the
matching kind of gallery (mode `instance` for image galleries, `centroid` for centroid
galleries, which is how `search --centroids` builds them).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import numpy as np

from ctl_jax.errors import FileContentError, MissingFileError, OptionError

# The evaluation mode whose verification block calibrates each kind of search gallery.
CALIBRATION_MODES = {"instance": "instance", "centroid": "centroid"}


@dataclasses.dataclass(frozen=True)
class MinScore:
    """A parsed --min_score: a fixed threshold, or a target FPR to calibrate.

    Attributes:
      value: the threshold (None until calibrated).
      fpr: the target false-positive rate of "auto:F" (None for a fixed threshold).
    """

    value: float | None
    fpr: float | None = None


def parse_min_score(text: str) -> MinScore:
    """ "0.62" -> MinScore(0.62); "auto:0.001" -> MinScore(None, 0.001).

    Raises:
      ValueError: not a number in [-1, 1], nor auto:F with 0 < F < 1.
    """
    text = str(text).strip()
    if text.startswith("auto:"):
        try:
            fpr = float(text[len("auto:") :])
        except ValueError:
            fpr = math.nan
        if not 0 < fpr < 1:
            raise OptionError(
                f"--min_score={text}: expected auto:F with a false-positive rate 0 < F < 1, "
                "e.g. auto:0.001"
            )
        return MinScore(None, fpr)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not -1.0 <= value <= 1.0:
        raise OptionError(
            f"--min_score={text}: expected a cosine score in [-1, 1] or auto:F (e.g. auto:0.001)"
        )
    return MinScore(value)


def calibrated_min_score(path: str | pathlib.Path, fpr: float, kind: str) -> tuple[float, str]:
    """The threshold at false-positive rate `fpr` from a metrics JSON's verification block.

    Args:
      path: a metrics JSON written by `python -m ctl_jax.evaluate --output`.
      fpr: the target false-positive rate (one of the file's targets).
      kind: the search gallery kind, "instance" or "centroid".

    Returns:
      (threshold, the evaluation mode it was read from).

    Raises:
      FileNotFoundError / ValueError: no such file, not JSON, no verification block for the
        mode, or no threshold for that FPR; one line naming the file.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingFileError(f"--calibration={path} does not exist")
    try:
        metrics = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FileContentError(f"--calibration={path} is not a metrics JSON file: {e}") from e
    blocks = metrics.get("verification") if isinstance(metrics, dict) else None
    if not isinstance(blocks, dict) or not blocks:
        raise FileContentError(
            f"--calibration={path} has no verification block; write one with "
            "python -m ctl_jax.evaluate ... --output=FILE (verification is on by default)"
        )
    mode = CALIBRATION_MODES[kind]
    block = blocks.get(mode)
    if not isinstance(block, dict):
        raise FileContentError(
            f"--calibration={path} has verification for {sorted(blocks)} but not for mode "
            f"{mode!r}, which calibrates a {kind} gallery; evaluate with --modes={mode}"
        )
    where = f"--calibration={path}: verification.{mode}.threshold_at_fpr"
    thresholds = block.get("threshold_at_fpr")
    thresholds = {} if thresholds is None else thresholds
    if not isinstance(thresholds, dict):
        raise FileContentError(
            f"{where} must map FPR to threshold, got {type(thresholds).__name__}"
        )
    key = str(float(fpr))
    value = thresholds.get(key)
    # null, NaN or an infinity: what the evaluation writes where it could not reach the FPR
    # (no positive or no negative pair).
    unreachable = value is None or (_is_number(value) and not math.isfinite(value))
    if unreachable:
        have = ", ".join(f"auto:{k}" for k, v in thresholds.items() if _is_threshold(v))
        raise FileContentError(
            f"--calibration={path} has no {mode} threshold at FPR {key} "
            f"({'it is ' + repr(value) + '; ' if value is not None else ''}"
            f"available: {have or 'none'})"
        )
    if not _is_threshold(value):
        raise FileContentError(
            f"{where}[{key!r}] must be a cosine score, a number in [-1, 1], got {value!r}"
        )
    return float(value), mode


def _is_number(value) -> bool:
    """An int or float read from JSON, not a bool (JSON true is no threshold)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_threshold(value) -> bool:
    """A usable cosine threshold: a finite number in [-1, 1]."""
    return _is_number(value) and math.isfinite(value) and -1.0 <= value <= 1.0


def apply_min_score(
    scores: np.ndarray, indices: np.ndarray, min_score: float
) -> tuple[np.ndarray, np.ndarray]:
    """Drops the matches scoring below `min_score`.

    Args:
      scores: (Q, k) match scores, best first.
      indices: (Q, k) gallery rows, -1 for no match.
      min_score: the threshold (a match is kept iff score >= min_score).

    Returns:
      indices (Q, k) with dropped matches set to -1, and known (Q,) bool: at least one
      match left.
    """
    kept = (np.asarray(indices) >= 0) & (np.asarray(scores) >= np.float32(min_score))
    indices = np.where(kept, indices, -1)
    return indices, kept.any(axis=1)
