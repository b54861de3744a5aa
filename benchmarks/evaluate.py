"""Times `ctl_jax.evaluation.evaluate` at Market-1501 size against a per-query loop, and
(`--reference=DIR` or `--commands`) the whole `python -m ctl_jax.evaluate --query --gallery`
command against the original centroids-reid evaluation at Market-1501 and MSMT17 scale.

Synthetic clustered embeddings (identity centre + camera offset + noise) so that the metrics
are neither 0 nor 1. The loop baseline is the straightforward per-query NumPy version of
the instance-mode protocol (distances of one query, stable argsort, filter, cumsum); it is
timed on the first `--loop_queries` queries and extrapolated linearly to all queries.
Prints one JSON object.

  python -m benchmarks.evaluate [--num_query 3368 --num_gallery 15913 --dim 2048]

Whole commands (`--commands`, or `--reference=DIR` to also run the original): synthetic
identity-structured embeddings at each of `--scales` are written as embeddings files; then
`python -m ctl_jax.evaluate --query=Q.npz --gallery=G.npz --modes=instance --noverification`
(the original computes instance-mode CMC/mAP only; the default command, all four modes and
verification, is timed too at Market scale) runs in a fresh process, fastest of
`--command_repeats`, peak memory its VmHWM. The original: a checkout of
github.com/mikwieczorek/centroids-reid (`git clone` it anywhere; nothing of it is copied
here), run by `benchmarks/reference_evaluation.py` on the same files (its `R1_mAP.compute`:
torch distance matrix, `np.argsort`, `eval_func`). Its time and peak memory grow linearly
with the queries (the per-query loop; the Q x G distance, index and match matrices), so at a
scale with more than `--reference_max_queries` queries it is run on that many and on half
as many, and both are extrapolated linearly to all queries (said so in the JSON).

  python -m benchmarks.evaluate --reference=../centroids-reid --reference_max_queries=0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
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


SCALES = {  # (queries, gallery, identities, cameras)
    "market": (3368, 15913, 750, 6),
    "msmt17": (11659, 82161, 3060, 15),
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runs a module as `python -m` would and writes the process's VmHWM (MB) to a file at exit.
_WITH_PEAK = (
    "import atexit, runpy, sys\n"
    "peak_file, module = sys.argv[1], sys.argv[2]\n"
    "def peak():\n"
    "    line = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
    "    open(peak_file, 'w').write(str(int(line.split()[1]) / 1024))\n"
    "atexit.register(peak)\n"
    "sys.argv = [module] + sys.argv[3:]\n"
    "runpy.run_module(module, run_name='__main__', alter_sys=True)\n"
)


def write_scale(folder, scale, dim, seed):
    """Synthetic query and gallery embeddings files at `scale`; their paths."""
    from ctl_jax.retrieval.embedding_file import Embeddings

    num_q, num_g, num_pids, num_cams = SCALES[scale]
    q, q_pids, q_cams, g, g_pids, g_cams = synthetic_market(
        num_q, num_g, dim, num_pids, num_cams, seed
    )
    paths = []
    for name, emb, pids, cams in (("query", q, q_pids, q_cams), ("gallery", g, g_pids, g_cams)):
        names = np.array(
            [f"{name}/{p:05d}_c{c}_{i:06d}.jpg" for i, (p, c) in enumerate(zip(pids, cams))]
        )
        path = os.path.join(folder, f"{scale}_{name}.npz")
        Embeddings(emb, pids, cams, names).save(path, overwrite=True)
        paths.append(path)
    return paths


def run_ours(query, gallery, extra, repeats, folder):
    """Fastest wall-clock seconds of the whole command in a fresh process, its peak MB, and
    the metrics it wrote."""
    times, peaks = [], []
    out, peak_file = os.path.join(folder, "metrics.json"), os.path.join(folder, "peak")
    command = [sys.executable, "-c", _WITH_PEAK, peak_file, "ctl_jax.evaluate"]
    command += [f"--query={query}", f"--gallery={gallery}", f"--output={out}", "--overwrite"]
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command + extra, cwd=ROOT, check=True, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        with open(peak_file) as f:
            peaks.append(float(f.read()))
    with open(out) as f:
        metrics = json.load(f)
    return round(min(times), 2), round(max(peaks), 1), metrics


def run_reference(reference, query, gallery, num_query, folder):
    """The original's record (`reference_evaluation.py`) on the first `num_query` queries."""
    out = os.path.join(folder, "reference.json")
    script = os.path.join(ROOT, "benchmarks", "reference_evaluation.py")
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, script, f"--reference={reference}", f"--query={query}"]
        + [f"--gallery={gallery}", f"--num_query={num_query}", f"--output={out}"],
        check=True,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.path.abspath(reference)),
    )
    wall = time.perf_counter() - start
    with open(out) as f:
        record = json.load(f)
    record["wall_seconds"] = round(wall, 2)
    return record


def reference_record(args, scale, query, gallery, folder):
    """The original at `scale`: run on all queries, or extrapolated (module docstring)."""
    num_q = SCALES[scale][0]
    cap = args.reference_max_queries
    if not cap or num_q <= cap:
        return {**run_reference(args.reference, query, gallery, num_q, folder), "measured": True}
    small, large = (
        run_reference(args.reference, query, gallery, n, folder) for n in (cap // 2, cap)
    )

    def line(key):  # straight line through the two runs, evaluated at all queries
        slope = (large[key] - small[key]) / (large["num_query"] - small["num_query"])
        return round(large[key] + slope * (num_q - large["num_query"]), 1)

    return {
        "wall_seconds": line("wall_seconds"),
        "peak_rss_mb": line("peak_rss_mb"),
        "measured": False,
        "note": (
            f"extrapolated linearly to {num_q} queries from runs on {small['num_query']} "
            f"and {large['num_query']}"
        ),
        "runs": [small, large],
    }


def command_comparison(args) -> dict:
    """Whole-command records per scale (see the module docstring)."""
    results = {}
    with tempfile.TemporaryDirectory(dir=args.files_dir) as folder:
        for scale in args.scales.split(","):
            query, gallery = write_scale(folder, scale, args.dim, args.seed)
            plain = ["--modes=instance", "--noverification"]
            seconds, peak, metrics = run_ours(query, gallery, plain, args.command_repeats, folder)
            record = {
                "sizes": dict(
                    zip(("num_query", "num_gallery", "num_pids", "num_cams"), SCALES[scale]),
                    dim=args.dim,
                ),
                "ctl_jax": {
                    "command": "python -m ctl_jax.evaluate --query=Q.npz --gallery=G.npz "
                    + " ".join(plain),
                    "seconds": seconds,
                    "peak_rss_mb": peak,
                    "mAP": metrics["instance"]["mAP"],
                    "rank1": metrics["instance"]["rank1"],
                },
            }
            if scale == "market":
                seconds_all, peak_all, _ = run_ours(query, gallery, [], 1, folder)
                record["ctl_jax_default_command"] = {
                    "command": "all four modes and verification (no --modes)",
                    "seconds": seconds_all,
                    "peak_rss_mb": peak_all,
                }
            if args.reference:
                ref = reference_record(args, scale, query, gallery, folder)
                record["original"] = ref
                record["speedup"] = round(ref["wall_seconds"] / seconds, 1)
                record["peak_memory_fraction"] = round(peak / ref["peak_rss_mb"], 3)
                if ref["measured"]:
                    record["mAP_minus_original"] = round(record["ctl_jax"]["mAP"] - ref["mAP"], 6)
            results[scale] = record
            for path in (query, gallery):
                os.remove(path)
    return results


def machine() -> dict:
    cpu = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), ""
            )
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "loadavg_at_end": list(os.getloadavg()),
        "numpy": np.__version__,
        "machine": platform.machine(),
    }


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
    parser.add_argument(
        "--commands", action="store_true", help="time the whole evaluate command per scale"
    )
    parser.add_argument(
        "--reference", help="checkout of the original centroids-reid (implies --commands)"
    )
    parser.add_argument("--scales", default="market,msmt17", help="of: " + ",".join(SCALES))
    parser.add_argument("--command_repeats", type=int, default=3)
    parser.add_argument(
        "--reference_max_queries",
        type=int,
        default=3400,
        help="run the original on at most this many queries, extrapolating (0: all; the "
        "original needs ~20 GB at MSMT17 scale)",
    )
    parser.add_argument("--files_dir", default=None, help="where the embeddings files go")
    args = parser.parse_args()
    if args.reference or args.commands:
        unknown = set(args.scales.split(",")) - set(SCALES)
        if unknown:
            parser.error(f"unknown --scales {sorted(unknown)}; valid: {', '.join(SCALES)}")
        record = {"commands": command_comparison(args), "machine": machine()}
        print(json.dumps(record, indent=1))
        return

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
        first_call[mode] = round(times[0], 3)
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
