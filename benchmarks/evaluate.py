"""Times `ctl_jax.evaluation.evaluate` at Market-1501 size against a per-query loop.

Synthetic clustered embeddings (identity centre + camera offset + noise) so that the metrics
are neither 0 nor 1. The loop baseline is the straightforward per-query NumPy version of
the instance-mode protocol (distances of one query, stable argsort, filter, cumsum); it is
timed on the first `--loop_queries` queries and extrapolated linearly to all queries.
Prints one JSON object.

  python -m benchmarks.evaluate [--num_query 3368 --num_gallery 15913 --dim 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from ctl_jax.evaluation import MODES, evaluate, l2_normalize


def synthetic_market(num_query, num_gallery, dim, num_pids, num_cams, seed):
    """Queries and gallery like Market-1501: every query pid is in the gallery, about one
    gallery image in six is a pid-0 distractor, and cameras shift embeddings a little."""
    rng = np.random.default_rng(seed)
    pids = np.arange(1, num_pids + 1)
    q_pids = rng.choice(pids, num_query)
    q_pids[:num_pids] = pids[: min(num_pids, num_query)]
    num_distractors = num_gallery // 6
    g_pids = np.concatenate(
        [np.zeros(num_distractors, np.int64), rng.choice(pids, num_gallery - num_distractors)]
    )
    g_pids[num_distractors : num_distractors + num_pids] = pids[
        : min(num_pids, num_gallery - num_distractors)
    ]
    q_cams = rng.integers(0, num_cams, num_query)
    g_cams = rng.integers(0, num_cams, num_gallery)
    centres = rng.standard_normal((num_pids + 1, dim), dtype=np.float32)
    cam_shift = 0.5 * rng.standard_normal((num_cams, dim), dtype=np.float32)
    spread = rng.uniform(2.0, 6.0, num_pids + 1).astype(np.float32)  # easy and hard ids

    def embed(p, c):
        x = rng.standard_normal((len(p), dim), dtype=np.float32)
        x *= spread[p][:, None]
        x += centres[p]
        x += cam_shift[c]
        return x

    g_emb = embed(g_pids, g_cams)
    # Distractors (pid 0) do not share a centre: each gets its own random one.
    g_emb[:num_distractors] += rng.standard_normal((num_distractors, dim), dtype=np.float32)
    g_emb[:num_distractors] -= centres[0]
    return embed(q_pids, q_cams), q_pids, q_cams, g_emb, g_pids, g_cams


def loop_instance(q_emb, q_pids, q_cams, g_emb, g_pids, g_cams, num_queries):
    """Straightforward per-query NumPy implementation of the instance-mode protocol."""
    q = l2_normalize(q_emb)
    g = l2_normalize(g_emb)
    aps, first = [], []
    for i in range(num_queries):
        dist = 2.0 - 2.0 * (g @ q[i])  # squared Euclidean distance of unit vectors
        order = np.argsort(dist, kind="stable")
        same_pid = g_pids[order] == q_pids[i]
        keep = ~(same_pid & (g_cams[order] == q_cams[i]))
        matches = same_pid[keep]
        if not matches.any():
            continue
        hits = np.cumsum(matches)
        aps.append((hits / np.arange(1, len(matches) + 1))[matches].mean())
        first.append(np.argmax(matches) + 1)
    return {"mAP": float(np.mean(aps)), "rank1": float(np.mean(np.array(first) <= 1))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_query", type=int, default=3368)
    parser.add_argument("--num_gallery", type=int, default=15913)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--num_pids", type=int, default=750)
    parser.add_argument("--num_cams", type=int, default=6)
    parser.add_argument(
        "--loop_queries", type=int, default=200, help="queries timed for the loop baseline"
    )
    parser.add_argument("--repeats", type=int, default=3, help="report the fastest of N runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = synthetic_market(
        args.num_query, args.num_gallery, args.dim, args.num_pids, args.num_cams, args.seed
    )
    seconds, first_call, metrics = {}, {}, {}
    for mode in MODES:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            res = evaluate(*data, modes=[mode])[mode]
            times.append(time.perf_counter() - start)
        first_call[mode] = round(times[0], 3)  # includes compiling the XLA similarity
        seconds[mode] = round(min(times), 3)
        metrics[mode] = {k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}

    n_loop = min(args.loop_queries, args.num_query)
    loop_times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        loop_metrics = loop_instance(*data, n_loop)
        loop_times.append(time.perf_counter() - start)
    loop_measured = min(loop_times)
    loop_total = loop_measured * args.num_query / n_loop
    # Same queries through the vectorised path, to show both compute the same thing.
    q_emb, q_pids, q_cams, *gallery = data
    check = evaluate(q_emb[:n_loop], q_pids[:n_loop], q_cams[:n_loop], *gallery, ["instance"])

    print(
        json.dumps(
            {
                "sizes": {
                    "num_query": args.num_query,
                    "num_gallery": args.num_gallery,
                    "dim": args.dim,
                    "num_pids": args.num_pids,
                    "num_cams": args.num_cams,
                },
                "seconds": seconds,
                "seconds_note": f"fastest of {args.repeats} calls of evaluate(modes=[mode])",
                "first_call_seconds": first_call,
                "loop_instance_seconds": round(loop_total, 3),
                "loop_note": (
                    f"per-query loop timed on {n_loop} queries (fastest of {args.repeats}: "
                    f"{loop_measured:.2f} s) and extrapolated linearly to {args.num_query}"
                ),
                "speedup_instance": round(loop_total / seconds["instance"], 1),
                # Same queries through both; differences come only from float32 rounding of
                # the similarities (matvec vs matmul) reordering near-ties.
                "loop_minus_vectorised_on_loop_queries": {
                    k: round(loop_metrics[k] - check["instance"][k], 6) for k in loop_metrics
                },
                "metrics": metrics,
                "cpu_count": os.cpu_count(),
                "numpy": np.__version__,
                "machine": platform.machine(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
