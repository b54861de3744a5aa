"""Retrieval cost: instance vs centroid search, exact vs approximate, ours vs faiss.

The paper's Table 2 compares the memory and retrieval time of instance-level and
centroid-based search; this is the same comparison in our setting, on synthetic re-ID-like
embeddings (identities around random directions, varied norms, like BNNeck outputs):

* `market`: a Market-1501-sized gallery (15,913 images of 751 identities, 3,368 queries,
  2048-d as ResNet-50).
* `1M`: 1,000,000 gallery images of 50,000 identities (20 each), 1,000 queries, 512-d (as
  ResNet-18/34; 2048-d would need 8 GB for the vectors alone).

For each gallery: our exact search over instances and over identity centroids, faiss's flat
(exact) index, and the faiss approximate indexes (IVF-Flat, IVF-PQ, HNSW) over instances
with their recall@10 against exact search. Latency is reported two ways: a batch of all
queries divided by their number (throughput), and the median of single-query calls.
`bytes` is what the index holds (vectors or codes, ids, graph, cell centroids; not the
item labels). `top1_identity` is the fraction of queries whose best match has their
identity. Prints one JSON object.

  python -m benchmarks.retrieval           # market + 1M (a few minutes on 2 cores)
  python -m benchmarks.retrieval --small   # a quick check (well under a minute)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

from ctl_jax.retrieval import approximate
from ctl_jax.retrieval.embedding_file import Embeddings
from ctl_jax.retrieval.index import ExactIndex, gallery_vectors

ALL_METHODS = approximate.METHODS
# HNSW's graph build is the slow part of an approximate index: ~3,000 vectors/s at 128-d on
# a busy 2-core machine, so 1M x 512-d would take well over ten minutes. The 1M case skips
# it unless --methods names it.
NO_HNSW = tuple(m for m in ALL_METHODS if m != "hnsw")
CASES = {
    "market": dict(num_ids=751, num_gallery=15_913, num_query=3_368, dim=2048),
    "1M": dict(num_ids=50_000, num_gallery=1_000_000, num_query=500, dim=512),
}
CASE_METHODS = {"market": ALL_METHODS, "1M": NO_HNSW, "market_small": ALL_METHODS}
SMALL_CASES = {
    "market_small": dict(num_ids=751, num_gallery=15_913, num_query=500, dim=256),
    "100k_small": dict(num_ids=5_000, num_gallery=100_000, num_query=200, dim=128),
}


def synthetic(num_ids, num_gallery, num_query, dim, seed=0, noise=1.0):
    """Gallery Embeddings and query vectors/pids of a re-ID-like embedding space.

    An image is its identity's direction plus isotropic noise (|noise| ~ `noise` x
    |direction|), scaled by a random norm; queries are further images of gallery identities.
    Generated in blocks so that 1M x 512 float32 needs no temporary copies.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_ids, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    scale = np.float32(noise / np.sqrt(dim))

    def images(pids):
        out = np.empty((len(pids), dim), np.float32)
        for start in range(0, len(pids), 65_536):
            rows = slice(start, start + 65_536)
            block = rng.standard_normal((len(out[rows]), dim), dtype=np.float32)
            block *= scale
            block += centres[pids[rows]]
            block *= rng.uniform(0.5, 2.0, (len(block), 1)).astype(np.float32)
            out[rows] = block
        return out

    g_pids = np.concatenate(
        [np.arange(num_ids), rng.integers(0, num_ids, num_gallery - num_ids)]
    ).astype(np.int64)
    q_pids = rng.integers(0, num_ids, num_query).astype(np.int64)
    gallery = Embeddings(
        images(g_pids), g_pids, np.zeros_like(g_pids), np.asarray([""] * num_gallery)
    )
    return gallery, images(q_pids), q_pids


def latency(search, queries, num_single):
    """(seconds per query in one batch, median seconds of a single-query call, result)."""
    # Warm up: compiles ours for both query-chunk shapes (256 rows and 1 row); faiss has
    # nothing to compile and is warmed up alike.
    search(queries[:256])
    search(queries[:1])
    start = time.perf_counter()
    result = search(queries)
    batch = (time.perf_counter() - start) / len(queries)
    singles = []
    for i in range(min(num_single, len(queries))):
        start = time.perf_counter()
        search(queries[i : i + 1])
        singles.append(time.perf_counter() - start)
    return batch, statistics.median(singles), result


def measure(name, index, queries, q_pids, k, num_single, build_seconds, exact_indices=None):
    batch, single, (scores, indices) = latency(lambda q: index.search(q, k), queries, num_single)
    row = {
        "index": name,
        "items": len(index),
        "bytes": int(index.nbytes - index.items.nbytes),
        "build_s": round(build_seconds, 3),
        "batch_ms_per_query": round(1e3 * batch, 4),
        "single_query_ms": round(1e3 * single, 3),
        "top1_identity": round(float((index.items.pids[indices[:, 0]] == q_pids).mean()), 4),
    }
    if exact_indices is not None:
        row[f"recall_at_{k}"] = round(approximate.recall_at_k(indices, exact_indices), 4)
    print(f"  {json.dumps(row)}", file=sys.stderr, flush=True)
    return row, indices


def run_case(name, spec, methods, k, num_single, seed):
    print(f"{name}: {spec}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    gallery, queries, q_pids = synthetic(**spec, seed=seed)
    generate_s = time.perf_counter() - start
    rows = []

    start = time.perf_counter()
    exact = ExactIndex(*gallery_vectors(gallery, centroids=False)[:2])
    row, exact_indices = measure(
        "exact instances (ours)",
        exact,
        queries,
        q_pids,
        k,
        num_single,
        time.perf_counter() - start,
    )
    rows.append(row)

    start = time.perf_counter()
    centroid = ExactIndex(*gallery_vectors(gallery, centroids=True)[:2])
    rows.append(
        measure(
            "exact centroids (ours)",
            centroid,
            queries,
            q_pids,
            k,
            num_single,
            time.perf_counter() - start,
        )[0]
    )
    del centroid, gallery  # the normalised instance vectors are all that is needed now

    items, vectors = exact.items, exact.vectors
    for method in methods:
        start = time.perf_counter()
        index = approximate.build(items, vectors, method, seed=seed)
        row, _ = measure(
            f"faiss {method} instances",
            index,
            queries,
            q_pids,
            k,
            num_single,
            time.perf_counter() - start,
            exact_indices,
        )
        row["params"] = index.params
        rows.append(row)
        del index
    return {
        "gallery_images": spec["num_gallery"],
        "identities": spec["num_ids"],
        "queries": spec["num_query"],
        "dim": spec["dim"],
        "generate_s": round(generate_s, 2),
        "results": rows,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="small sizes, a quick check")
    parser.add_argument("--cases", default=None, help="comma-separated subset of the cases")
    parser.add_argument(
        "--methods",
        default=None,
        help="faiss methods to compare in every case (default: all; no hnsw at 1M)",
    )
    parser.add_argument("--top_k", type=int, default=10)
    parser.add_argument("--single_queries", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cases = SMALL_CASES if args.small else CASES
    if args.cases:
        unknown = sorted(set(args.cases.split(",")) - set(cases))
        if unknown:
            parser.error(f"unknown --cases {unknown}; valid: {', '.join(cases)}")
        cases = {name: cases[name] for name in args.cases.split(",")}
    if args.methods is None:
        methods = {name: CASE_METHODS.get(name, ALL_METHODS) for name in cases}
    else:
        chosen = [m for m in args.methods.split(",") if m]
        unknown = sorted(set(chosen) - set(ALL_METHODS))
        if unknown:
            parser.error(f"unknown --methods {unknown}; valid: {', '.join(ALL_METHODS)}")
        methods = {name: chosen for name in cases}
    faiss_version = None
    if any(methods.values()):
        faiss_version = approximate.require_faiss().__version__
    import jax

    report = {
        "benchmark": "retrieval",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_1min": round(os.getloadavg()[0], 2),
        },
        "versions": {"jax": jax.__version__, "numpy": np.__version__, "faiss": faiss_version},
        "top_k": args.top_k,
        "cases": {},
    }
    start = time.perf_counter()
    for name, spec in cases.items():
        report["cases"][name] = run_case(
            name, spec, methods[name], args.top_k, args.single_queries, args.seed
        )
    report["total_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
