"""Evaluation of a model on its dataset's query and gallery splits: embedding
(`ctl_jax.inference`) and metrics (`ctl_jax.evaluation`).

Used during training (`ctl_jax.training.loop`) and by `ctl_jax.evaluate`; above inference and
evaluation, below training.
"""

from __future__ import annotations

import numpy as np

from ctl_jax import evaluation
from ctl_jax.checkpoints.variables import model_variables
from ctl_jax.evaluation.protocols import check_modes, choose_protocol, evaluate_dataset
from ctl_jax.evaluation.query_centroids import evaluate_query_centroids
from ctl_jax.evaluation.report import format_table
from ctl_jax.inference import embed_split, make_embed_fn, place_variables


class Evaluator:
    """Embeds query and gallery with the current weights and computes the metrics per mode.

    Args:
      model: the `ReidModel`.
      dataset: `RetrievalDataset` with query and gallery splits.
      readers: split name -> image reader.
      config: the run config (`data` group for preprocessing and batch size, `eval.flip`).
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
