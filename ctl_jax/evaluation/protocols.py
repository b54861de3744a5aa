"""The evaluation protocols and how a dataset's embeddings are evaluated under each.

| protocol | datasets | modes | metrics |
| --- | --- | --- | --- |
| `market` | re-ID, fashion, In-Shop | `instance`, `centroid`, `centroid_camera*` | mAP, rank-k |
| `recall_at_k` | SOP, In-Shop, re-ID, fashion, Holidays | `instance`, `centroid` | Recall@K |
| `revisited` | Revisited Oxford / Paris | `instance` | easy/medium/hard mAP, mP@1/5/10 |
| `holidays` | INRIA Holidays | `instance` | mAP |

A dataset lists the protocols it supports in `RetrievalDataset.protocols`, its published
one first; `choose_protocol` picks that one unless another is asked for.
"""

from __future__ import annotations

import numpy as np

from ctl_jax.errors import OptionError
from ctl_jax.evaluation.average_precision import holidays_metrics
from ctl_jax.evaluation.protocol import DEFAULT_MODES, MODES, evaluate
from ctl_jax.evaluation.recall import DEFAULT_RECALL_KS, RECALL_MODES, recall_at_k
from ctl_jax.evaluation.revisited import revisited_metrics

PROTOCOLS = ("market", "recall_at_k", "revisited", "holidays")
PROTOCOL_MODES = {
    "market": MODES,
    "recall_at_k": RECALL_MODES,
    "revisited": ("instance",),
    "holidays": ("instance",),
}
PROTOCOL_DEFAULT_MODES = {
    "market": DEFAULT_MODES,
    "recall_at_k": RECALL_MODES,
    "revisited": ("instance",),
    "holidays": ("instance",),
}


def choose_protocol(supported, requested: str | None = None, what: str = "the dataset") -> str:
    """`requested` if `supported` lists it, else `supported[0]` when nothing is requested.

    Raises:
      ValueError: an unknown protocol, one the dataset does not support, or a dataset with
        no evaluation split.
    """
    supported = tuple(supported)
    if requested:
        if requested not in PROTOCOLS:
            raise OptionError(f"unknown protocol {requested!r}; valid: {', '.join(PROTOCOLS)}")
        if requested not in supported:
            raise OptionError(
                f"protocol {requested!r} does not apply to {what}; it supports: "
                f"{', '.join(supported) or 'none (no query/gallery split)'}"
            )
        return requested
    if not supported:
        raise OptionError(f"{what} has no query/gallery split to evaluate")
    return supported[0]


def check_modes(protocol: str, modes) -> tuple[str, ...]:
    """`modes` (None or empty: the protocol's default ones), checked against the protocol."""
    if isinstance(modes, str):
        modes = [m.strip() for m in modes.split(",") if m.strip()]
    modes = tuple(modes or PROTOCOL_DEFAULT_MODES[protocol])
    valid = PROTOCOL_MODES[protocol]
    unknown = [m for m in modes if m not in valid]
    if unknown:
        raise OptionError(
            f"mode(s) {unknown} do not apply to protocol {protocol!r}; valid: {', '.join(valid)} "
            "(--modes, or eval.modes in the config)"
        )
    return modes


def evaluate_protocol(
    protocol: str,
    query_emb: np.ndarray,
    query,
    gallery_emb: np.ndarray,
    gallery,
    modes=None,
    ground_truth=None,
    ks: tuple[int, ...] | None = None,
) -> dict:
    """Metrics of query against gallery embeddings under `protocol`.

    Args:
      protocol: one of `PROTOCOLS`.
      query_emb, gallery_emb: (Q, D) and (G, D) embeddings, not normalised.
      query, gallery: the splits (anything with `paths`, `pids`, `camids`), in embedding
        order; for "revisited" in `ground_truth` order (qimlist; imlist then distractors).
      modes: the protocol's modes (None: its defaults).
      ground_truth: the `RevisitedGroundTruth` for "revisited"; for "recall_at_k" a dict
        with "recall_ks" may give the dataset's published K.
      ks: Recall@K's K (default: the ground truth's "recall_ks", else `DEFAULT_RECALL_KS`).

    Returns:
      {mode or setting: metrics}, as `ctl_jax.evaluation.evaluate` does.
    """
    modes = check_modes(protocol, modes)
    if protocol == "market":
        return evaluate(
            query_emb, query.pids, query.camids, gallery_emb, gallery.pids, gallery.camids, modes
        )
    if protocol == "recall_at_k":
        if ks is None:
            ks = (ground_truth or {}).get("recall_ks", DEFAULT_RECALL_KS)
        return {
            mode: recall_at_k(
                query_emb,
                query.pids,
                query.paths,
                gallery_emb,
                gallery.pids,
                gallery.paths,
                ks=ks,
                mode=mode,
            )
            for mode in modes
        }
    if protocol == "revisited":
        if ground_truth is None or not hasattr(ground_truth, "qimlist"):
            raise OptionError("protocol 'revisited' needs the ground truth (gnd_*.pkl)")
        return revisited_metrics(query_emb, gallery_emb, ground_truth)
    if protocol == "holidays":
        return {
            "instance": holidays_metrics(
                query_emb, query.pids, query.paths, gallery_emb, gallery.pids, gallery.paths
            )
        }
    raise OptionError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")


def evaluate_dataset(dataset, query_emb, gallery_emb, modes=None, protocol: str | None = None):
    """`evaluate_protocol` for a `RetrievalDataset`'s query and gallery embeddings, under
    `protocol` or the dataset's default one."""
    protocol = choose_protocol(dataset.protocols, protocol, f"dataset {dataset.name!r}")
    return evaluate_protocol(
        protocol,
        query_emb,
        dataset.query,
        gallery_emb,
        dataset.gallery,
        modes=modes,
        ground_truth=dataset.ground_truth,
    )
