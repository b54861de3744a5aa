"""Metrics reports: the metrics JSON file (docs/formats.md, 'Metrics JSON') and a terminal table."""

from __future__ import annotations

import json
import math
import os
import pathlib

import numpy as np

from ctl_jax import files

_RANK_COLUMNS = ("rank1", "rank5", "rank10", "rank20", "rank50")


def format_table(results: dict) -> str:
    """A readable table of `{mode: metrics}`, one row per mode, metrics as percentages.

    A "meta" entry, if present, is ignored. Ranks beyond the default ones are shown too.
    """
    rows = {mode: m for mode, m in results.items() if mode != "meta"}
    # The default rank columns, unless no mode has rank metrics (other protocols).
    has_ranks = not rows or any(k.startswith("rank") for m in rows.values() for k in m)
    ranks = list(_RANK_COLUMNS) if has_ranks else []
    show_map = not rows or any("mAP" in m for m in rows.values())
    for metrics in rows.values():
        for key in metrics:
            if key.startswith("rank") and key[4:].isdigit() and key not in ranks:
                ranks.append(key)
    ranks.sort(key=lambda k: int(k[4:]))
    # Other protocols' metrics (mP@k, recall@k), in the order they come.
    others = []
    for metrics in rows.values():
        for key in metrics:
            if key != "mAP" and key not in ranks and not key.startswith("num_"):
                if key not in others:
                    others.append(key)
    header = ["mode"] + ["mAP"] * show_map + [f"R{k[4:]}" for k in ranks] + others
    header += ["queries", "gallery"]
    body = []
    for mode, m in rows.items():
        cells = [mode] + [_percent(m.get("mAP"))] * show_map
        cells += [_percent(m.get(k)) for k in ranks + others]
        cells += [_count(m.get("num_query")), _count(m.get("num_gallery"))]
        body.append(cells)
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
    """Writes `{mode: metrics, "meta": meta}` as JSON, atomically.

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
