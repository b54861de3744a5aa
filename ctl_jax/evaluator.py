"""Evaluation of a model on its dataset's query and gallery splits: embedding
(`ctl_jax.inference`) and metrics (`ctl_jax.evaluation`).

Used during training (`ctl_jax.training.loop`) and by `ctl_jax.evaluate`; above inference and
evaluation, below training.
"""

from __future__ import annotations

import copy

import numpy as np

from ctl_jax import evaluation
from ctl_jax.checkpoints.variables import model_variables
from ctl_jax.errors import ConfigError
from ctl_jax.evaluation.protocol import MODES
from ctl_jax.evaluation.protocols import (
    PROTOCOL_DEFAULT_MODES,
    check_modes,
    choose_protocol,
    evaluate_dataset,
)
from ctl_jax.evaluation.query_centroids import evaluate_query_centroids
from ctl_jax.evaluation.recall import DEFAULT_RECALL_KS
from ctl_jax.evaluation.report import format_table
from ctl_jax.inference import embed_split, make_embed_fn, place_variables

# `eval.modes = ("auto",)` and `train.monitor = "auto"` follow the data (see
# `resolve_evaluation`); any other value is used as it is.
AUTO = "auto"
# The Market-protocol modes of "auto": all four when the data has camera ids; without them
# the camera-aware modes would split and filter by cameras the reader made up (query 0,
# gallery 1), so only the camera-free ones.
AUTO_MARKET_MODES = {True: MODES, False: ("instance", "centroid")}
# The Market-protocol mode whose mAP an "auto" monitor follows: the first one evaluated.
_MONITOR_ORDER = {
    True: ("centroid_camera", "centroid", "instance", "centroid_camera_reference"),
    False: ("centroid", "instance", "centroid_camera", "centroid_camera_reference"),
}


def resolve_evaluation(config, dataset, describe_monitor: bool = True):
    """The config with "auto" evaluation settings chosen for `dataset`, and one line that
    says what is used.

    `eval.modes == ("auto",)`: under the Market protocol every mode when the dataset has
    real camera ids (`RetrievalDataset.has_cameras`), else `instance` and `centroid`; under
    another protocol its default modes. `train.monitor == "auto"`: the mAP of the first of
    the modes evaluated in `_MONITOR_ORDER` (Recall@K: recall at the first K; Revisited:
    medium mAP; Holidays: mAP). A config that names its modes or monitor keeps them, camera
    modes on data without cameras included (the line says so).

    Args:
      config: the run config (`eval.modes`, `eval.protocol`, `train.monitor`); not changed.
      dataset: the `RetrievalDataset` evaluated.
      describe_monitor: whether the line names the monitor (training) or not (evaluating).

    Returns:
      (config, line): a copy with `eval.modes` and `train.monitor` resolved (the config
      itself when the dataset has no evaluation protocol, e.g. a training source), and
      e.g. "evaluation modes: instance, centroid (auto: the data has no camera ids);
      monitor: centroid/mAP (auto)".
    """
    modes = tuple(config.eval.modes)
    has_monitor = "train" in config and "monitor" in config.train
    monitor = config.train.monitor if has_monitor else None
    if AUTO in modes and len(modes) > 1:
        raise ConfigError(f"eval.modes: 'auto' stands alone, got {list(modes)}")
    if not dataset.protocols:
        return config, ""
    protocol = choose_protocol(
        dataset.protocols, config.eval.get("protocol", ""), f"dataset {dataset.name!r}"
    )
    cameras = bool(dataset.has_cameras)
    no_cameras = "the data has no camera ids"
    if modes == (AUTO,):
        if protocol == "market":
            modes = AUTO_MARKET_MODES[cameras]
            why = "auto: " + ("the data has camera ids" if cameras else no_cameras)
        else:
            modes = PROTOCOL_DEFAULT_MODES[protocol]
            why = f"auto: protocol {protocol}"
    else:
        camera_modes = protocol == "market" and any("camera" in m for m in modes)
        why = "eval.modes" + (f"; {no_cameras}" if camera_modes and not cameras else "")
    line = f"evaluation modes: {', '.join(modes) or 'none'} ({why})"
    config = copy.deepcopy(config)
    with config.unlocked():
        config.eval.modes = modes
        if has_monitor:
            if monitor == AUTO:
                monitor = _auto_monitor(protocol, modes, cameras, dataset.ground_truth)
                config.train.monitor = monitor
                why = "auto"
            else:
                why = "train.monitor"
            if describe_monitor:
                line += f"; monitor: {monitor} ({why})"
    return config, line


def _auto_monitor(protocol: str, modes, cameras: bool, ground_truth) -> str:
    """The metric an "auto" `train.monitor` follows (see `resolve_evaluation`)."""
    if protocol == "revisited":
        return "medium/mAP"
    if protocol == "holidays":
        return "instance/mAP"
    if protocol == "recall_at_k":
        ks = (ground_truth or {}).get("recall_ks", DEFAULT_RECALL_KS)
        mode = "instance" if "instance" in modes or not modes else modes[0]
        return f"{mode}/recall@{ks[0]}"
    order = _MONITOR_ORDER[cameras]
    return f"{next((m for m in order if m in modes), order[0])}/mAP"


class Evaluator:
    """Embeds query and gallery with the current weights and computes the metrics per mode.

    Args:
      model: the `ReidModel`.
      dataset: `RetrievalDataset` with query and gallery splits.
      readers: split name -> image reader.
      config: the run config (`data` group for preprocessing and batch size, `eval.flip`;
        "auto" `eval.modes` are resolved against `dataset`, see `resolve_evaluation`).
      mesh: the device mesh the embedding runs on.
      flip: flip test (mean embedding of each image and its mirror); default the config's
        `eval.flip` (False when the config predates it).
      whitening: a learned whitening (`ctl_jax.retrieval.whitening.Whitening`, anything with
        `apply((N, D)) -> (N, d)`) applied to query and gallery embeddings, so that every
        protocol and option sees whitened vectors; None (training) for the raw embeddings.
    """

    def __init__(
        self, model, dataset, readers, config, mesh, flip: bool | None = None, whitening=None
    ):
        if dataset is not None:  # "auto" modes follow the data (`resolve_evaluation`)
            config, _ = resolve_evaluation(config, dataset)
        self.dataset, self.readers, self.config, self.mesh = dataset, readers, config, mesh
        self.whitening = whitening
        if config.eval.modes:  # a protocol or mode that does not fit fails now, not later
            protocol = choose_protocol(
                dataset.protocols, config.eval.get("protocol", ""), f"dataset {dataset.name!r}"
            )
            check_modes(protocol, config.eval.modes)
        self.flip = bool(config.eval.get("flip", False)) if flip is None else bool(flip)
        self._embed = make_embed_fn(model, mesh, flip=self.flip)

    def embeddings(self, variables) -> tuple[np.ndarray, np.ndarray]:
        """(query (Q, D), gallery (G, D)) BNNeck embeddings, not normalised; with a
        whitening, (Q, d) and (G, d) whitened unit vectors.

        Args:
          variables: {"params", "batch_stats"} (or a train state, see `model_variables`).
        """
        variables = place_variables(model_variables(variables), self.mesh)  # once for both
        data = self.config.data
        out = []
        for name in ("query", "gallery"):
            embeddings, _ = embed_split(
                self._embed,
                variables,
                getattr(self.dataset, name),
                self.readers[name],
                int(data.height),
                int(data.width),
                int(data.eval_batch_size),
                self.mesh,
                description=f"embedding {name}",
            )
            out.append(embeddings if self.whitening is None else self.whitening.apply(embeddings))
        return out[0], out[1]

    def run(self, state_or_variables, modes, protocol: str | None = None, **options) -> dict:
        """Metrics {mode: {"mAP", "rank1", ...}} for the given train state or variables.

        `protocol` (default: the config's `eval.protocol`, else the dataset's published
        one) chooses among the protocols of `ctl_jax.evaluation.protocols`. `options`
        (re-ranking, query expansion, verification, curves) go to `evaluation.evaluate`
        under the Market protocol; `query_centroids=True` evaluates query centroids instead
        of single queries (`evaluation.query_centroids`).
        """
        query_centroids = options.pop("query_centroids", False)
        protocol = choose_protocol(
            self.dataset.protocols,
            protocol or self.config.eval.get("protocol", ""),
            f"dataset {self.dataset.name!r}",
        )
        query, gallery = self.embeddings(state_or_variables)
        if protocol != "market":
            return evaluate_dataset(self.dataset, query, gallery, modes, protocol)
        q, g = self.dataset.query, self.dataset.gallery
        evaluate = evaluate_query_centroids if query_centroids else evaluation.evaluate
        return evaluate(
            query, q.pids, q.camids, gallery, g.pids, g.camids, modes=tuple(modes), **options
        )

    @staticmethod
    def table(results: dict) -> str:
        return format_table(results)
