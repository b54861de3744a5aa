"""Search a gallery: `python -m ctl_jax.search (--gallery=G.npz [--centroids] | --index=I.npz)
[--add=NEW.npz] [--remove=label1,label2] (--query=Q.npz | --images=PATH (--workdir=DIR |
--checkpoint=DIR)) [--query_centroids] [--top_k=10] [--output=FILE.json] [--visualize=DIR]
[--save_index=I.npz [--lock_wait=30]] [--method=exact|flat|ivf_flat|ivf_pq|hnsw]
[--overwrite]`.

The index is a `ctl_jax.Index` (`ctl_jax.retrieval.updatable_index`), the one the Python API
gives: `--add` adds the images of embeddings files to it (images it already holds, by path, are
refused), `--remove` drops identities by label, and `--save_index` writes the result
(`--index=I.npz --add=NEW.npz --save_index=I.npz --overwrite` updates an index in place; a
centroid index updated so searches like the one rebuilt from all images). An index keeps the
pid of each identity across updates; the label is the key across indexes. Writing
`--save_index` holds the file's lock (`<file>.lock`, ctl_jax/retrieval/index_lock.py) from
before the index is loaded until it is written: a second update of the same file waits up to
`--lock_wait` seconds, then stops with an error naming the holder. `--query_centroids` searches
once per query identity with the centroid of its images (a tracklet, several photos of one
product).

The gallery holds the images of an embeddings file, or with --centroids one centroid per
identity (mean of its un-normalised embeddings, then normalised; docs/method.md, 'Evaluation
modes'). Queries come from an embeddings file or are embedded on the fly from images. Each
query gets its top-k gallery items by cosine similarity, written as the search-results JSON
(docs/formats.md, 'Search results JSON') with `--output`, else printed as a table.
`--save_index` stores the built index (exact vectors or a faiss index) so later searches can
start from it with `--index`; with only `--gallery` and `--save_index` the command just builds
and saves. The faiss methods need `pip install -e '.[faiss]'`; `--check_recall` also runs the
exact search and reports the approximate recall@k.

Open-set search: `--min_score=S` drops matches scoring below S (a cosine in [-1, 1]); a
query with no match left is "known": false in the results. `--min_score=auto:F` with
`--calibration=metrics.json` takes the threshold at false-positive rate F from the
verification block of an evaluation (`ctl_jax.retrieval.open_set`).
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time

from absl import flags

from ctl_jax import cli
from ctl_jax.retrieval.identities import FLAG_HELP

_GALLERY = flags.DEFINE_string(
    "gallery", None, "Gallery embeddings .npz to build the index from (a,b,...: joined)."
)
_INDEX = flags.DEFINE_string("index", None, "Index file saved earlier with --save_index.")
_CENTROIDS = flags.DEFINE_bool(
    "centroids", False, "Search identity centroids instead of gallery images."
)
_QUERY = flags.DEFINE_string("query", None, "Query embeddings .npz.")
_IMAGES = flags.DEFINE_string("images", None, "Query image or folder, embedded on the fly.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training work directory (with --images).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Converted checkpoint (with --images).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Images per batch with --images.")
_FLIP = flags.DEFINE_bool(
    "flip", False, "With --images: average each query's embedding with its mirror's."
)
_IDENTITY = flags.DEFINE_string("identity", None, "With --images: " + FLAG_HELP)
_ADD = flags.DEFINE_list("add", [], "Embeddings .npz file(s) whose images are added to the index.")
_REMOVE = flags.DEFINE_list("remove", [], "Identity labels to remove from the index.")
_QUERY_CENTROIDS = flags.DEFINE_bool(
    "query_centroids",
    False,
    "Group the queries by identity label and search once per group with the centroid of its "
    "embeddings (queries of unknown identity stay single).",
)
_TOP_K = flags.DEFINE_integer("top_k", 10, "Matches per query.")
_OUTPUT = flags.DEFINE_string("output", None, "Search results .json to write.")
_VISUALIZE = flags.DEFINE_string("visualize", None, "Folder for one ranked-results PNG per query.")
_SAVE_INDEX = flags.DEFINE_string("save_index", None, "Write the built index to this .npz.")
_METHOD = flags.DEFINE_enum(
    "method",
    "exact",
    ["exact", "flat", "ivf_flat", "ivf_pq", "hnsw"],
    "exact (ours, chunked) or a faiss index: flat (exact), ivf_flat, ivf_pq, hnsw.",
)
_NLIST = flags.DEFINE_integer("nlist", 0, "IVF cells (0: about sqrt(gallery size)).")
_NPROBE = flags.DEFINE_integer("nprobe", 0, "IVF cells visited per query (0: nlist / 8).")
_PQ_M = flags.DEFINE_integer("pq_m", 0, "PQ sub-vectors (0: dimension / 16).")
_PQ_BITS = flags.DEFINE_integer("pq_bits", 0, "Bits per PQ code (0: 8, fewer on tiny data).")
_HNSW_M = flags.DEFINE_integer("hnsw_m", 0, "HNSW neighbours per node (0: 32).")
_EF_CONSTRUCTION = flags.DEFINE_integer("ef_construction", 0, "HNSW build beam (0: 40).")
_EF_SEARCH = flags.DEFINE_integer("ef_search", 0, "HNSW search beam (0: 64, at least top_k).")
_CHECK_RECALL = flags.DEFINE_bool(
    "check_recall", False, "With a faiss --method: also search exactly and report recall@k."
)
_MIN_SCORE = flags.DEFINE_string(
    "min_score",
    None,
    "Drop matches scoring below S (cosine in [-1, 1]); auto:F takes the threshold at "
    "false-positive rate F from --calibration. Queries left without a match are unknown.",
)
_CALIBRATION = flags.DEFINE_string(
    "calibration", None, "Metrics JSON of python -m ctl_jax.evaluate, for --min_score=auto:F."
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Allow replacing existing output files.")
_LOCK_WAIT = flags.DEFINE_float(
    "lock_wait",
    30.0,
    "Seconds to wait while another process updates the --save_index file (0: refuse at once).",
)
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")


def _faiss_params() -> dict:
    return {
        "nlist": _NLIST.value,
        "nprobe": _NPROBE.value,
        "pq_m": _PQ_M.value,
        "pq_bits": _PQ_BITS.value,
        "hnsw_m": _HNSW_M.value,
        "ef_construction": _EF_CONSTRUCTION.value,
        "ef_search": _EF_SEARCH.value,
    }


def _check_flags() -> None:
    """Every flag combination problem, before any work is done."""
    if bool(_GALLERY.value) == bool(_INDEX.value):
        cli.fail("give the gallery: either --gallery=G.npz or --index=INDEX.npz")
    if _QUERY.value and _IMAGES.value:
        cli.fail("give either --query=Q.npz or --images=PATH, not both")
    has_queries = bool(_QUERY.value or _IMAGES.value)
    if not has_queries and not _SAVE_INDEX.value:
        cli.fail(
            "give queries (--query=Q.npz or --images=PATH), or --save_index to only build or "
            "update an index"
        )
    if not has_queries and (_OUTPUT.value or _VISUALIZE.value):
        cli.fail("--output/--visualize need queries: --query=Q.npz or --images=PATH")
    if _IMAGES.value and not (_WORKDIR.value or _CHECKPOINT.value):
        cli.fail("--images needs the model: --workdir=DIR or --checkpoint=DIR")
    if (_WORKDIR.value or _CHECKPOINT.value) and not _IMAGES.value:
        cli.fail("--workdir/--checkpoint are only used with --images")
    if _FLIP.value and not _IMAGES.value:
        cli.fail("--flip applies when embedding --images (embed the .npz files with --flip)")
    if _TOP_K.value < 1:
        cli.fail(f"--top_k must be >= 1, got {_TOP_K.value}")
    changes = bool(_ADD.value or _REMOVE.value)
    if _INDEX.value and _SAVE_INDEX.value and not changes:
        cli.fail(
            "--save_index with --index needs a change (--add=NEW.npz or --remove=LABELS); "
            "the --index file is already saved"
        )
    if _IDENTITY.value and not _IMAGES.value:
        cli.fail("--identity applies when embedding --images (embed the .npz files with it)")
    if _CHECK_RECALL.value and changes:
        cli.fail("--check_recall compares a freshly built index; drop --add/--remove")
    if _INDEX.value and _METHOD.present:
        cli.fail("--method applies when building from --gallery; an --index keeps its method")
    if _LOCK_WAIT.value < 0:
        cli.fail(f"--lock_wait must be >= 0 seconds, got {_LOCK_WAIT.value:g}")
    if _CHECK_RECALL.value and (_METHOD.value == "exact" or _INDEX.value):
        cli.fail("--check_recall compares a faiss --method built from --gallery with exact search")
    if _MIN_SCORE.value is not None:
        from ctl_jax.retrieval.open_set import parse_min_score

        if not has_queries:
            cli.fail("--min_score needs queries: --query=Q.npz or --images=PATH")
        try:
            auto = parse_min_score(_MIN_SCORE.value).fpr is not None
        except ValueError as e:  # a bad command line: exit 2
            cli.fail(str(e))
        if auto and not _CALIBRATION.value:
            cli.fail(f"--min_score={_MIN_SCORE.value} needs --calibration=metrics.json")
        if not auto and _CALIBRATION.value:
            cli.fail("--calibration is read only with --min_score=auto:F")
    elif _CALIBRATION.value:
        cli.fail("--calibration needs --min_score=auto:F (e.g. auto:0.001)")
    for flag in (_OUTPUT, _SAVE_INDEX):
        path = flag.value and pathlib.Path(flag.value)
        if path and path.exists() and not _OVERWRITE.value:
            cli.fail(
                f"{path} exists; pass --overwrite to replace it or choose another --{flag.name}"
            )


def _load_or_build_index():
    """(index, exact index for --check_recall or None, description line), with --add and
    --remove applied."""
    from ctl_jax import Index
    from ctl_jax.retrieval.embedding_file import Embeddings
    from ctl_jax.retrieval.shards import load_joined

    if _INDEX.value:
        index = Index.load(_INDEX.value, **_faiss_params())
        kind = index.kind
        if _CENTROIDS.present and _CENTROIDS.value != (kind == "centroid"):
            cli.fail(
                f"--index={_INDEX.value} holds {kind} items; "
                f"{'omit --centroids' if kind == 'instance' else 'it was built with --centroids'}"
            )
        described = f"{index.items.describe()} from index {_INDEX.value} ({index.method})"
        exact = None
    else:
        embeddings = load_joined(_GALLERY.value)  # a.npz or a.npz,b.npz,... (shards)
        kind = "centroid" if _CENTROIDS.value else "instance"
        options = _faiss_params() if _METHOD.value != "exact" else {}
        source = str(_GALLERY.value)
        index = Index.build(
            embeddings, kind, _METHOD.value, progress=_PROGRESS.value, source=source, **options
        )
        exact = Index.build(embeddings, kind, source=source) if _CHECK_RECALL.value else None
        dropped = int((embeddings.labels == "").sum()) if kind == "centroid" else 0
        note = f" ({dropped:,} image(s) of unknown identity left out)" if dropped else ""
        if kind == "centroid":
            note = f" of {int(index.items.counts.sum()):,} images" + note
        described = f"{index.items.describe()}{note} from {_GALLERY.value} ({index.method})"
    for path in _ADD.value:
        before = len(index)
        added = Embeddings.load(path)
        index.add(added, name=str(path))
        described += f"; added {len(added):,} image(s) from {path} ({len(index) - before:+,} items)"
    if _REMOVE.value:
        before = len(index)
        index.remove(_REMOVE.value)
        described += f"; removed {len(_REMOVE.value)} identities ({len(index) - before:+,} items)"
    return index, exact, described


def _update_index_file():
    """Builds or updates the index and writes it to --save_index, all under the lock of
    that file (ctl_jax/retrieval/index_lock.py): a concurrent update of the same file waits
    for this one and then loads its result, so no update that reports success is lost.

    Returns (index, exact index or None, min_score, min_score meta), as `main` uses them."""
    from ctl_jax.retrieval.index_lock import index_lock

    target = _SAVE_INDEX.value
    changes = [f"--add={','.join(_ADD.value)}"] if _ADD.value else []
    changes += [f"--remove={','.join(_REMOVE.value)}"] if _REMOVE.value else []
    command = " ".join(["search", *changes, f"--save_index={target}"])

    def on_wait(holder: str) -> None:
        print(
            f"waiting up to {_LOCK_WAIT.value:g} s (--lock_wait) for {holder} to finish "
            f"updating {target}",
            file=sys.stderr,
            flush=True,
        )

    with index_lock(target, command=command, wait_seconds=_LOCK_WAIT.value, on_wait=on_wait):
        index, exact, described = _load_or_build_index()
        print(f"gallery: {described}, {index.dim}-d")
        min_score, min_score_meta = _min_score(index.items.kind)  # fails before the write
        index.save(target, overwrite=_OVERWRITE.value)
    print(f"index written to {target}")
    return index, exact, min_score, min_score_meta


def _queries():
    """The query Embeddings, from --query or by embedding --images."""
    from ctl_jax.retrieval.embedding_file import Embeddings

    if _QUERY.value:
        return Embeddings.load(_QUERY.value), f"{_QUERY.value}"
    from ctl_jax.embedder import Embedder
    from ctl_jax.retrieval.images import embed_images, list_images, model_directory

    directory = model_directory(_WORKDIR.value, _CHECKPOINT.value)
    from ctl_jax.retrieval.identities import IdentitySource, assign_identities

    # A bad --images or --identity fails before the model is loaded.
    identity = IdentitySource.parse(_IDENTITY.value)
    assign_identities(list_images(_IMAGES.value).paths, _IMAGES.value, identity)
    embedder = Embedder.load(
        directory, step=_STEP.value, batch_size=_BATCH_SIZE.value, flip=_FLIP.value
    )
    queries, report = embed_images(
        embedder, _IMAGES.value, progress=_PROGRESS.value, identity=identity
    )
    if not (queries.labels != "").any():  # say nothing about identities the queries lack
        report = dataclasses.replace(report, identities="")
    flipped = " (flip test)" if _FLIP.value else ""
    print(f"queries: {report.summary()}{flipped} with {directory} (step {embedder.step})")
    return queries, f"{_IMAGES.value}"


def _min_score(kind: str) -> tuple[float | None, dict | None]:
    """The --min_score threshold for a gallery of `kind`, and what meta records of it."""
    if _MIN_SCORE.value is None:
        return None, None
    from ctl_jax.retrieval.open_set import calibrated_min_score, parse_min_score

    parsed = parse_min_score(_MIN_SCORE.value)
    if parsed.fpr is None:
        return parsed.value, {"value": parsed.value}
    value, mode = calibrated_min_score(_CALIBRATION.value, parsed.fpr, kind)
    return value, {
        "value": value,
        "fpr": parsed.fpr,
        "calibration": str(_CALIBRATION.value),
        "calibration_mode": mode,
    }


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    _check_flags()
    from ctl_jax.retrieval import results
    from ctl_jax.retrieval.gallery import check_queries

    start = time.time()
    if _SAVE_INDEX.value:
        index, exact, min_score, min_score_meta = _update_index_file()
    else:
        index, exact, described = _load_or_build_index()
        print(f"gallery: {described}, {index.dim}-d")
        # Before any embedding or search: a bad --calibration fails fast.
        min_score, min_score_meta = _min_score(index.items.kind)
    if not (_QUERY.value or _IMAGES.value):
        return

    queries, query_source = _queries()
    members = None
    if _QUERY_CENTROIDS.value:
        from ctl_jax.retrieval.query_groups import query_centroids

        num_images = len(queries)
        queries, members = query_centroids(queries)
        print(f"queries: {num_images:,} image(s) grouped by identity into {len(queries):,}")
    top_k = _TOP_K.value
    # Checked here too (search checks again) so the message names the query file.
    check_queries(
        queries.embeddings, index.dim, top_k, len(index), f"query embeddings ({query_source})"
    )
    search_start = time.time()
    scores, indices = index.search_rows(queries.embeddings, top_k, progress=_PROGRESS.value)
    seconds = time.time() - search_start
    meta = {
        "gallery": index.items.source or None,
        "index": _INDEX.value,
        "queries": query_source,
        "kind": index.items.kind,
        "method": index.method,
        "num_gallery": len(index),
        "num_queries": len(queries),
        "query_centroids": bool(_QUERY_CENTROIDS.value),
        "added": list(_ADD.value) or None,
        "removed": list(_REMOVE.value) or None,
        "top_k": top_k,
        "search_seconds": round(seconds, 4),
    }
    if index.method != "exact":
        meta["params"] = dict(index.params)
    lines = [
        f"searched {len(queries):,} queries in {seconds:.2f} s "
        f"({1e3 * seconds / max(1, len(queries)):.2f} ms/query, top_k={top_k})"
    ]
    if exact is not None:
        from ctl_jax.retrieval.approximate import recall_at_k

        _, exact_indices = exact.search_rows(queries.embeddings, top_k)
        meta[f"recall_at_{top_k}"] = round(recall_at_k(indices, exact_indices), 6)
        lines.append(
            f"recall@{top_k} of {index.method} against exact search: "
            f"{meta[f'recall_at_{top_k}']:.4f}"
        )
    known = None
    if min_score is not None:  # after the recall check, which compares full top-k lists
        from ctl_jax.retrieval.open_set import apply_min_score

        indices, known = apply_min_score(scores, indices, min_score)
        meta["min_score"] = min_score_meta
        lines.append(
            f"{int(known.sum()):,} of {len(known):,} queries known (a match scoring >= "
            f"{min_score:.4f}), {int((~known).sum()):,} unknown"
        )
    # Identities compared by label: files with named identities number them independently.
    labelled = (queries.labels != "") & (indices[:, 0] >= 0)
    if labelled.any():
        top1 = index.labels[indices[labelled, 0]] == queries.labels[labelled]
        lines.append(
            f"top-1 match has the query's identity for {int(top1.sum()):,} of "
            f"{int(labelled.sum()):,} queries with known identity (no camera filtering)"
        )
    document = results.results_document(
        queries.paths,
        queries.pids,
        scores,
        indices,
        index.items,
        meta,
        known=known,
        query_labels=queries.labels,
        query_members=members,
    )
    if _OUTPUT.value:
        results.write_json(_OUTPUT.value, document, overwrite=_OVERWRITE.value)
        lines.append(f"results written to {_OUTPUT.value}")
    else:  # on the terminal, before the summary lines
        print(results.format_table(document))
    if _VISUALIZE.value:
        from ctl_jax.retrieval.visualize import write_strips

        files = write_strips(
            _VISUALIZE.value,
            queries.paths,
            queries.pids,
            indices,
            scores,
            index.items,
            overwrite=_OVERWRITE.value,
            progress=_PROGRESS.value,
            query_labels=queries.labels,
        )
        lines.append(f"{len(files):,} result picture(s) written to {_VISUALIZE.value}")
    lines.append(f"total {time.time() - start:.1f} s")
    print("\n".join(lines))


if __name__ == "__main__":
    cli.run(main)
