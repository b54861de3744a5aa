"""Where training metrics go: a JSON-lines file and TensorBoard events, from process 0 only."""

from __future__ import annotations

import json
import math
import pathlib
import time

import jax
import numpy as np


def flatten_eval(results: dict) -> dict[str, float]:
    """{"mode": {"mAP": x, ...}} -> {"mode/mAP": x, ...} for logging and checkpoint ranking."""
    return {
        f"{mode}/{key}": float(value)
        for mode, metrics in results.items()
        if isinstance(metrics, dict)
        for key, value in metrics.items()
    }


class MetricsLog:
    """Appends one JSON object per logged step or evaluation to `<workdir>/metrics.jsonl` and
    writes the same scalars as TensorBoard events under `<workdir>/tensorboard/`."""

    def __init__(self, workdir: str | pathlib.Path):
        self.active = jax.process_index() == 0
        self._writer = None
        if not self.active:
            return
        workdir = pathlib.Path(workdir)
        self._file = open(workdir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        try:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(workdir / "tensorboard"))
        except ImportError:  # TensorBoard events are optional; the JSON lines are not.
            self._writer = None

    def write(self, kind: str, step: int, scalars: dict, **extra) -> None:
        """Records `scalars` (name -> number) for `step`; `kind` is "train" or "eval"."""
        if not self.active:
            return
        clean = {k: _to_float(v) for k, v in scalars.items()}
        record = {"kind": kind, "step": int(step), "time": time.time(), **extra, **clean}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in clean.items():
                if math.isfinite(value):
                    self._writer.add_scalar(f"{kind}/{name}", value, int(step))
            self._writer.flush()

    def close(self) -> None:
        if self.active:
            self._file.close()
            if self._writer is not None:
                self._writer.close()


def _to_float(value) -> float:
    return float(np.asarray(value))
