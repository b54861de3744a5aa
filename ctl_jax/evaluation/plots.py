"""ROC and CMC pictures of an evaluation, drawn with Pillow (no plotting library needed).

`write_plots(directory, curves)` writes `roc.png` (true-positive against false-positive rate
of pair verification, log FPR axis, one line per mode) and `cmc.png` (CMC@k for k = 1..50,
one line per mode). `curves` is the second value of
`ctl_jax.evaluation.evaluate(..., return_curves=True)`.
"""

from __future__ import annotations

import math
import os
import pathlib

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ctl_jax import files

_SIZE = (840, 520)
_MARGIN = (78, 44, 250, 62)  # left, top, right (legend), bottom
_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
_GRID = (225, 225, 225)
_AXIS = (60, 60, 60)
_TEXT = (20, 20, 20)


def write_plots(
    directory: str | os.PathLike, curves: dict, overwrite: bool = False
) -> list[pathlib.Path]:
    """Writes roc.png (modes with a ROC curve) and cmc.png into `directory`.

    Args:
      directory: created if needed.
      curves: {mode: {"cmc": (K,) CMC@1..K, "roc": RocCurve or None}}.
      overwrite: replace existing pictures.

    Returns:
      The paths written.

    Raises:
      FileExistsError: a picture exists and `overwrite` is False.
    """
    directory = pathlib.Path(directory)
    written = []
    roc = {mode: c["roc"] for mode, c in curves.items() if c.get("roc") is not None}
    roc = {mode: r for mode, r in roc.items() if len(r.fpr)}
    if roc:
        lows = [float(r.fpr[0]) for r in roc.values()]
        x_min = 10 ** math.floor(math.log10(min(lows)))
        series = {mode: (r.fpr, r.tpr) for mode, r in roc.items()}
        image = line_chart(
            series,
            title="Verification ROC (cosine score, query-gallery pairs)",
            x_label="false-positive rate",
            y_label="true-positive rate",
            x_range=(x_min, 1.0),
            y_range=(0.0, 1.0),
            log_x=True,
        )
        written.append(_save(image, directory / "roc.png", overwrite))
    cmc = {mode: np.asarray(c["cmc"]) for mode, c in curves.items() if c.get("cmc") is not None}
    if cmc:
        top = max(len(v) for v in cmc.values())
        series = {mode: (np.arange(1, len(v) + 1), v) for mode, v in cmc.items()}
        finite = [v[np.isfinite(v)] for v in cmc.values()]
        low = min([float(v.min()) for v in finite if len(v)] or [0.0])
        image = line_chart(
            series,
            title="CMC (rank-k accuracy)",
            x_label="rank k",
            y_label="queries with a correct match in the top k",
            x_range=(1.0, float(top)),
            y_range=(math.floor(low * 10) / 10, 1.0),
            log_x=False,
        )
        written.append(_save(image, directory / "cmc.png", overwrite))
    return written


def _save(image: Image.Image, path: pathlib.Path, overwrite: bool) -> pathlib.Path:
    files.refuse_overwrite(path, overwrite, flag="--plot")
    with files.atomic_open(path) as f:
        image.save(f, format="PNG")
    return path


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def line_chart(
    series: dict,
    title: str,
    x_label: str,
    y_label: str,
    x_range: tuple[float, float],
    y_range: tuple[float, float],
    log_x: bool,
) -> Image.Image:
    """An RGB line chart with grid, ticks, axis labels and a legend.

    Args:
      series: {name: (x (P,), y (P,))}; non-finite points are skipped.
      title, x_label, y_label: texts.
      x_range, y_range: axis limits (x > 0 with `log_x`).
      log_x: logarithmic x axis (ticks at powers of ten).
    """
    width, height = _SIZE
    left, top, right, bottom = _MARGIN
    x0, x1 = left, width - right
    y0, y1 = height - bottom, top  # pixel rows: y0 at the bottom
    image = Image.new("RGB", _SIZE, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font, small = _font(15), _font(12)

    def fx(x):
        lo, hi = x_range
        if log_x:
            x, lo, hi = np.log10(np.maximum(x, 1e-300)), math.log10(lo), math.log10(hi)
        return x0 + (np.asarray(x, np.float64) - lo) / max(hi - lo, 1e-12) * (x1 - x0)

    def fy(y):
        lo, hi = y_range
        return y0 - (np.asarray(y, np.float64) - lo) / max(hi - lo, 1e-12) * (y0 - y1)

    # Grid and ticks.
    if log_x:
        lo, hi = math.floor(math.log10(x_range[0])), math.ceil(math.log10(x_range[1]))
        x_ticks = [10.0**e for e in range(lo, hi + 1)]
        x_text = [f"1e{e}" if e < -2 else f"{10.0**e:g}" for e in range(lo, hi + 1)]
    else:
        step = _nice_step(x_range[1] - x_range[0])
        x_ticks = [x_range[0]] + list(np.arange(step, x_range[1] + 1e-9, step))
        x_text = [f"{t:g}" for t in x_ticks]
    y_step = _nice_step(y_range[1] - y_range[0])
    y_ticks = list(np.arange(y_range[0], y_range[1] + 1e-9, y_step))
    for t, label in zip(x_ticks, x_text):
        px = float(fx(t))
        draw.line((px, y1, px, y0), fill=_GRID)
        draw.line((px, y0, px, y0 + 5), fill=_AXIS)
        draw.text((px, y0 + 8), label, fill=_TEXT, font=small, anchor="ma")
    for t in y_ticks:
        py = float(fy(t))
        draw.line((x0, py, x1, py), fill=_GRID)
        draw.line((x0 - 5, py, x0, py), fill=_AXIS)
        draw.text((x0 - 8, py), f"{t:.1f}", fill=_TEXT, font=small, anchor="rm")
    draw.rectangle((x0, y1, x1, y0), outline=_AXIS)

    # Lines.
    for i, (x, y) in enumerate(series.values()):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        ok = np.isfinite(x) & np.isfinite(y) & ((x > 0) if log_x else True)
        points = list(zip(fx(x[ok]).tolist(), fy(y[ok]).tolist()))
        color = _COLORS[i % len(_COLORS)]
        if len(points) > 1:
            draw.line(points, fill=color, width=3, joint="curve")
        elif points:
            px, py = points[0]
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=color)

    # Texts and legend.
    draw.text(((x0 + x1) / 2, 12), title, fill=_TEXT, font=font, anchor="ma")
    draw.text(((x0 + x1) / 2, height - 22), x_label, fill=_TEXT, font=font, anchor="ma")
    label = Image.new("RGB", (y0 - y1, 22), (255, 255, 255))
    ImageDraw.Draw(label).text(((y0 - y1) / 2, 2), y_label, fill=_TEXT, font=font, anchor="ma")
    image.paste(label.rotate(90, expand=True), (8, y1))
    for i, name in enumerate(series):
        ly = y1 + 10 + 24 * i
        color = _COLORS[i % len(_COLORS)]
        draw.line((x1 + 16, ly + 8, x1 + 42, ly + 8), fill=color, width=3)
        draw.text((x1 + 50, ly), str(name), fill=_TEXT, font=small)
    return image


def _nice_step(span: float) -> float:
    """A 1/2/5 x 10^n tick step giving 4-10 ticks over `span`."""
    if span <= 0:
        return 1.0
    raw = span / 6
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * power:
            return factor * power
    return 10 * power
