"""The Revisited Oxford / Paris protocol (Radenović et al., CVPR 2018).

Three settings from one ranking of the database per query:

| setting | positives | junk (removed from the ranking) |
| --- | --- | --- |
| easy | easy | junk + hard |
| medium | easy + hard | junk |
| hard | hard | junk + easy |

Each reports mAP and mean precision at 1, 5 and 10 (`average_precision`), over the queries
that have positives in that setting, as revisitop's `example_evaluate.py` does. Gallery
items past the annotated database (the +1M distractors) are negatives in every setting.

The ground truth is any object with `imlist`, `qimlist`, `easy`, `hard` and `junk` (per
query arrays of indices into imlist), e.g. `ctl_jax.data.landmarks.RevisitedGroundTruth`.
"""

from __future__ import annotations

import os

import numpy as np

from ctl_jax.errors import FileContentError
from ctl_jax.evaluation.average_precision import average_precision, ranked_positions

SETTINGS = ("easy", "medium", "hard")
PRECISION_KS = (1, 5, 10)


def _setting_lists(gt, setting: str, i: int) -> tuple[np.ndarray, np.ndarray]:
    easy, hard, junk = gt.easy[i], gt.hard[i], gt.junk[i]
    if setting == "easy":
        return easy, np.concatenate([junk, hard])
    if setting == "medium":
        return np.concatenate([easy, hard]), junk
    return hard, np.concatenate([junk, easy])


def _pairs(lists):
    """(rows, items) of per-query index lists, each item once per query."""
    uniq = [np.unique(np.asarray(x, np.int64)) for x in lists]
    rows = np.repeat(np.arange(len(uniq)), [len(u) for u in uniq])
    items = np.concatenate(uniq) if uniq else np.zeros(0, np.int64)
    return rows, items.astype(np.int64)


def revisited_metrics(
    query_emb: np.ndarray, gallery_emb: np.ndarray, ground_truth, ks=PRECISION_KS
) -> dict:
    """Metrics of the three settings.

    Args:
      query_emb: (Q, D) embeddings of the (cropped) queries, in `ground_truth.qimlist` order.
      gallery_emb: (G, D) embeddings of the database in `ground_truth.imlist` order,
        optionally followed by distractors (G >= len(imlist)).
      ground_truth: see the module docstring.
      ks: the k of mean precision at k.

    Returns:
      {"easy" | "medium" | "hard": {"mAP", "mP@<k>"..., "num_query", "num_gallery"}}, the
      metrics as fractions (NaN when no query has positives in the setting).
    """
    num_q, num_db = len(ground_truth.qimlist), len(ground_truth.imlist)
    if len(query_emb) != num_q:
        raise FileContentError(
            f"{len(query_emb)} query embeddings for {num_q} queries in the ground truth"
        )
    if len(gallery_emb) < num_db:
        raise FileContentError(
            f"{len(gallery_emb)} gallery embeddings for {num_db} ground-truth database images"
        )
    # Every annotated item of every query, ranked once.
    annotated = [
        np.concatenate([ground_truth.easy[i], ground_truth.hard[i], ground_truth.junk[i]])
        for i in range(num_q)
    ]
    rows, items = _pairs(annotated)
    positions = ranked_positions(query_emb, gallery_emb, rows, items)
    key_positions = dict(zip((rows * num_db + items).tolist(), positions.tolist()))

    def located(lists):
        r, it = _pairs(lists)
        pos = np.asarray([key_positions[k] for k in (r * num_db + it).tolist()], np.int64)
        return r, pos

    results = {}
    for setting in SETTINGS:
        ok, junk = zip(*(_setting_lists(ground_truth, setting, i) for i in range(num_q)))
        ok_rows, ok_pos = located(ok)
        junk_rows, junk_pos = located(junk)
        ap, precision = average_precision(
            num_q, ok_rows, ok_pos, [len(x) for x in ok], junk_rows, junk_pos, tuple(ks)
        )
        valid = ~np.isnan(ap)
        metrics = {"mAP": float(ap[valid].mean()) if valid.any() else float("nan")}
        for i, k in enumerate(ks):
            metrics[f"mP@{k}"] = float(precision[valid, i].mean()) if valid.any() else float("nan")
        metrics["num_query"] = int(valid.sum())
        metrics["num_gallery"] = len(gallery_emb)
        results[setting] = metrics
    return results


def _stem(path) -> str:
    return os.path.splitext(os.path.basename(str(path)))[0]


def align_by_name(ground_truth, query_paths, gallery_paths, distractor_count: int = 0):
    """Orders precomputed embeddings by the ground truth, matching file name stems.

    Args:
      ground_truth: see the module docstring.
      query_paths: (Q',) paths of the query embeddings (`.../all_souls_000013.jpg`).
      gallery_paths: (G',) paths of the gallery embeddings; the last `distractor_count`
        are distractors and are not matched.

    Returns:
      (query index (Q,), gallery index (len(imlist) + distractor_count,)): rows of the
      query and gallery arrays in `qimlist`, then `imlist` (then distractor) order.

    Raises:
      ValueError: a name of the ground truth without embedding, a name given twice, or
        gallery embeddings that are neither in imlist nor distractors.
    """
    source = getattr(ground_truth, "source", "the ground truth")

    def index(paths, names, what):
        position = {}
        for i, path in enumerate(paths):
            stem = _stem(path)
            if stem in position:
                raise FileContentError(f"{what} embeddings hold {stem!r} twice")
            position[stem] = i
        missing = [n for n in names if n not in position]
        if missing:
            raise FileContentError(
                f"{what} embeddings lack {len(missing)} image(s) of {source}, e.g. {missing[0]!r}"
                " (matched by file name without extension)"
            )
        extra = len(position) - len(names)
        if extra:
            known = set(names)
            example = next(p for p in paths if _stem(p) not in known)
            raise FileContentError(
                f"{what} embeddings hold {extra} image(s) not in {source}, e.g. {example!r}"
                + (" (give the +1M distractors as a separate file)" if what == "gallery" else "")
            )
        return np.asarray([position[n] for n in names], np.int64)

    query_index = index(list(query_paths), list(ground_truth.qimlist), "query")
    num_annotated = len(gallery_paths) - distractor_count
    gallery_index = index(list(gallery_paths)[:num_annotated], list(ground_truth.imlist), "gallery")
    distractors = np.arange(num_annotated, len(gallery_paths), dtype=np.int64)
    return query_index, np.concatenate([gallery_index, distractors])
