"""The protocols beyond Market-1501 on precomputed embedding files (`ctl_jax.evaluate
--query=Q.npz --gallery=G.npz --protocol=...`).

- `revisited`: the embeddings are matched to the ground truth pickle's `qimlist` / `imlist`
  by file name without extension (`.../all_souls_000013.jpg` -> `all_souls_000013`); the
  query embeddings must come from the cropped queries. `--distractors=D.npz` appends the
  +1M distractors to the gallery.
- `holidays`: groups come from the Holidays file names (`100301.jpg` -> group 1003).
- `recall_at_k`: the files' pids are the classes; a gallery item with the query's path is
  the query's own image and is left out (so `--query` and `--gallery` may be one file).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ctl_jax.errors import FileContentError
from ctl_jax.evaluation.protocols import evaluate_protocol


def evaluate_embeddings(
    protocol, query, gallery, modes, ground_truth=None, distractors=None, ks=None, load=None
):
    """(results, meta) of `Embeddings` query and gallery under `protocol`; `load` reads the
    distractors file (default `Embeddings.load`; `ctl_jax.evaluate` passes one that whitens
    them like the query and gallery)."""
    meta = {}
    gt = None
    if protocol == "revisited":
        from ctl_jax.data.landmarks import load_revisited_ground_truth
        from ctl_jax.evaluation.revisited import align_by_name
        from ctl_jax.retrieval.embedding_file import Embeddings

        gt = load_revisited_ground_truth(ground_truth)
        meta["ground_truth"] = str(ground_truth)
        count = 0
        if distractors:
            extra = (load or Embeddings.load)(distractors)
            count = len(extra)
            meta["distractors"] = str(distractors)
            gallery = Embeddings(
                np.concatenate([gallery.embeddings, extra.embeddings]),
                np.concatenate([gallery.pids, extra.pids]),
                np.concatenate([gallery.camids, extra.camids]),
                np.concatenate([gallery.paths, extra.paths]),
            )
        q_index, g_index = align_by_name(gt, query.paths, gallery.paths, count)
        query, gallery = query.select(q_index), gallery.select(g_index)
    elif protocol == "holidays":
        query, gallery = (
            _with_holidays_groups(query, "query"),
            _with_holidays_groups(gallery, "gallery"),
        )
    results = evaluate_protocol(
        protocol,
        query.embeddings,
        query,
        gallery.embeddings,
        gallery,
        modes=modes,
        ground_truth=gt,
        ks=ks,
    )
    return results, meta


def _with_holidays_groups(embeddings, what):
    from ctl_jax.data.landmarks import holidays_group

    groups = [holidays_group(p) for p in embeddings.paths]
    bad = [p for p, g in zip(embeddings.paths, groups) if g is None]
    if bad:
        raise FileContentError(
            f"{what} embeddings: {len(bad)} path(s) are not Holidays names NNNNNN.jpg, "
            f"e.g. {bad[0]!r}"
        )
    return dataclasses.replace(embeddings, pids=np.asarray(groups, np.int64), labels=None)
