"""Evaluation of a model on its dataset's query and gallery splits (used during training and
by `ctl_jax.evaluate`)."""

from __future__ import annotations

import numpy as np

from ctl_jax import evaluation
from ctl_jax.evaluation.report import format_table
from ctl_jax.inference import embed_split, make_embed_fn


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
    """

    def __init__(self, model, dataset, readers, config, mesh, flip: bool | None = None):
        self.dataset, self.readers, self.config, self.mesh = dataset, readers, config, mesh
        self.flip = bool(config.eval.get("flip", False)) if flip is None else bool(flip)
        self._embed = make_embed_fn(model, mesh, flip=self.flip)

    def embeddings(self, variables) -> tuple[np.ndarray, np.ndarray]:
        """(query (Q, D), gallery (G, D)) BNNeck embeddings, not normalised."""
        out = []
        for name in ("query", "gallery"):
            out.append(
                embed_split(
                    self._embed,
                    variables,
                    getattr(self.dataset, name),
                    self.readers[name],
                    self.config.data,
                    self.mesh,
                    description=f"embedding {name}",
                )
            )
        return out[0], out[1]

    def run(self, state_or_variables, modes, **options) -> dict:
        """Metrics {mode: {"mAP", "rank1", ...}} for the given train state or variables;
        `options` (re-ranking, query expansion, verification, curves) go to
        `evaluation.evaluate`."""
        variables = _variables(state_or_variables)
        query, gallery = self.embeddings(variables)
        q, g = self.dataset.query, self.dataset.gallery
        return evaluation.evaluate(
            query, q.pids, q.camids, gallery, g.pids, g.camids, modes=tuple(modes), **options
        )

    @staticmethod
    def table(results: dict) -> str:
        return format_table(results)


def _variables(state_or_variables) -> dict:
    if isinstance(state_or_variables, dict):
        return state_or_variables
    return {"params": state_or_variables.params, "batch_stats": state_or_variables.batch_stats}
