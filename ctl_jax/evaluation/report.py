"""Metrics reports: the metrics JSON file and terminal tables.

The metrics JSON holds one object per mode (`mAP`, `mINP`, `rank<k>`, `num_query`,
`num_gallery`), optionally `verification` ({mode: pair verification metrics}) and `meta`.
"""

from __future__ import annotations

import json
import math
import os
import pathlib

import numpy as np

from ctl_jax import files

_RANK_COLUMNS = ("rank1", "rank5", "rank10", "rank20", "rank50")
_NOT_MODES = ("meta", "verification")  # top-level keys that are not evaluation modes


def format_table(results: dict) -> str:
    """A readable table of `{mode: metrics}`, one row per mode, metrics as percentages.

    "meta" and "verification" entries, if present, are left out (see `format_verification`).
    Ranks beyond the default ones are shown too.
    """
    rows = {mode: m for mode, m in results.items() if mode not in _NOT_MODES}
    # The default rank columns, unless no mode has rank metrics (other protocols).
    has_ranks = not rows or any(k.startswith("rank") for m in rows.values() for k in m)
    ranks = list(_RANK_COLUMNS) if has_ranks else []
    show_map = not rows or any("mAP" in m for m in rows.values())
    show_minp = any("mINP" in m for m in rows.values())
    for metrics in rows.values():
        for key in metrics:
            if key.startswith("rank") and key[4:].isdigit() and key not in ranks:
                ranks.append(key)
    ranks.sort(key=lambda k: int(k[4:]))
    # Other protocols' metrics (mP@k, recall@k), in the order they come.
    others = []
    for metrics in rows.values():
        for key in metrics:
            if key not in ("mAP", "mINP") and key not in ranks and not key.startswith("num_"):
                if key not in others:
                    others.append(key)
    header = ["mode"] + ["mAP"] * show_map + ["mINP"] * show_minp + [f"R{k[4:]}" for k in ranks]
    header += others + ["queries", "gallery"]
    body = []
    for mode, m in rows.items():
        cells = [mode] + [_percent(m.get("mAP"))] * show_map + [_percent(m.get("mINP"))] * show_minp
        cells += [_percent(m.get(k)) for k in ranks + others]
        cells += [_count(m.get("num_query")), _count(m.get("num_gallery"))]
        body.append(cells)
    return _render(header, body)


def format_verification(results: dict) -> str:
    """A table of the "verification" entry of `results` (empty string if there is none):
    per mode pairs, positives, AUC, and TPR (threshold) at each target FPR."""
    blocks = results.get("verification") or {}
    if not blocks:
        return ""
    keys = []
    for block in blocks.values():
        keys += [k for k in block.get("tpr_at_fpr", {}) if k not in keys]
    header = ["verification", "pairs", "positives", "AUC"]
    header += [f"TPR@FPR={k} (threshold)" for k in keys]
    body = []
    for mode, b in blocks.items():
        cells = [mode, _count(b.get("pairs")), _count(b.get("positives")), _percent(b.get("auc"))]
        for k in keys:
            tpr, thr = b.get("tpr_at_fpr", {}).get(k), b.get("threshold_at_fpr", {}).get(k)
            thr_text = "n/a" if thr is None or not math.isfinite(thr) else f"{thr:.4f}"
            cells.append(f"{_percent(tpr)} ({thr_text})")
        body.append(cells)
    return _render(header, body)


def _render(header: list[str], body: list[list[str]]) -> str:
    """Columns padded to their widest cell; the first left-aligned, the others right."""
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]

    def line(cells):
        first = cells[0].ljust(widths[0])
        return "  ".join([first] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])])

    sep = "-" * len(line(header))
    return "\n".join([line(header), sep] + [line(r) for r in body])


def write_metrics_json(
    path: str | os.PathLike,
    results: dict,
    meta: dict | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes `{mode: metrics, ["verification": {...},] "meta": meta}` as JSON, atomically.

    Non-finite numbers (a mode with no counted query has NaN metrics) are written as null.
    Parent directories are created.

    Raises:
      FileExistsError: `path` exists and `overwrite` is False.
    """
    path = files.refuse_overwrite(path, overwrite)
    payload = {mode: m for mode, m in results.items() if mode != "meta"}
    if meta is None:
        meta = results.get("meta")
    if meta is not None:
        payload["meta"] = meta
    text = json.dumps(_to_json(payload), indent=2, allow_nan=False) + "\n"
    with files.atomic_open(path, "w") as f:
        f.write(text)
    return path


def _to_json(obj):
    """Plain-Python copy of `obj` (numpy scalars/arrays converted, NaN/inf -> None)."""
    if isinstance(obj, dict):
        return {str(k): _to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _to_json(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _percent(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{100.0 * float(value):.1f}"


def _count(value) -> str:
    return "n/a" if value is None else str(int(value))
