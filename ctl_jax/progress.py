"""Progress bars: the one place that creates them.

A bar redraws its line with carriage returns. On a terminal that is one line changing; in
a redirected log (`> run.log 2>&1`, a batch system's output file) every redraw stays, and
the log fills with `\\r` frames, with the next table printed on the bar's line. So a bar is
shown only when it is asked for and stderr is a terminal (tqdm's automatic mode,
`disable=None`), or in a notebook, whose widget bar writes no frames.
"""

from __future__ import annotations

from tqdm.auto import tqdm


def progress_bar(iterable=None, *, enabled: bool = True, **kwargs):
    """A tqdm bar (`tqdm.auto`: a widget in a notebook) on stderr, or a silent one.

    Args:
      iterable: what to iterate over (as `tqdm(iterable)`), or None for a manual bar.
      enabled: False: never shown (e.g. --noprogress, or not process 0).
      **kwargs: tqdm's other arguments (total, desc, unit, leave, ...); not `disable`.

    Returns:
      The bar; disabled, it still iterates and accepts update/set_* calls, printing nothing.
    """
    if "disable" in kwargs:
        raise TypeError("progress_bar takes enabled=, not disable=")
    if not enabled:
        disable = True
    elif tqdm.__module__.startswith("tqdm.notebook"):
        disable = False  # a widget: no carriage-return frames
    else:
        disable = None  # tqdm: shown only when its stream (stderr) is a terminal
    return tqdm(iterable, disable=disable, **kwargs)
