"""k-reciprocal re-ranking: ctl_jax against the reference algorithm, time and peak memory.

The reference is a NumPy port of the `re_ranking(q_g_dist, q_q_dist, g_g_dist, k1, k2,
lambda_value)` that torchreid and fast-reid ship (dense (N, N) original distance, its full
argsort, dense V and its expansion, Python loops over the N = Q + G items), fed as
torchreid's engine feeds it: d = 2 - 2 cos of the L2-normalised embeddings for the
query-gallery, query-query and gallery-gallery pairs (three NumPy matrix products, timed
with it). ctl_jax's `rerank_distances` starts from the same embeddings.

Each method runs in its own subprocess on the same synthetic embeddings (clustered like a
re-ID model's: identity centre, camera shift, noise; a sixth of the gallery distractors), so
that its peak memory is its own: `peak_rss_mb` is the worker's peak resident set
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`), `baseline_rss_mb` its resident set once the
embeddings exist, before the method starts (the difference is what the method adds).
`seconds` is ctl_jax's first call, `seconds_warm` a second one in the same process.
Both distances are ranked with the same instance-mode protocol (`rank_scores`), and compared
element-wise. Wall times (`seconds`) depend on what else runs on the machine; CPU times
(`cpu_seconds`, `getrusage` user + system of the worker, all its threads) much less, and
`speedup_cpu` compares those. Prints one JSON object.

  python -m benchmarks.rerank [--sizes=2000x7000,3368x15913] [--dim=2048]
      [--methods=ctl_jax,reference] [--k1=20] [--k2=6] [--lambda_value=0.3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic_reid(num_query, num_gallery, dim, seed=0, num_cams=6, latent=64):
    """Queries and gallery like Market-1501 (751 test identities at full size, about 18
    gallery images each; a sixth of the gallery are distractors with their own random
    centres). Identities differ in a 64-d latent space (centre, camera shift and noise of
    varying spread), mapped to `dim` dimensions with a little isotropic noise: plain cosine
    ranking gives about 0.6 mAP, 0.8 rank-1, like a re-ID model's embeddings."""
    rng = np.random.default_rng(seed)
    num_pids = max(2, round(751 * num_gallery / 15913))
    pids = np.arange(1, num_pids + 1)
    q_pids = rng.choice(pids, num_query)
    num_distractors = num_gallery // 6
    g_pids = np.concatenate(
        [np.zeros(num_distractors, np.int64), rng.choice(pids, num_gallery - num_distractors)]
    )
    q_cams, g_cams = rng.integers(0, num_cams, num_query), rng.integers(0, num_cams, num_gallery)
    centres = rng.standard_normal((num_pids + 1, latent), dtype=np.float32)
    cam_shift = 0.5 * rng.standard_normal((num_cams, latent), dtype=np.float32)
    spread = rng.uniform(0.8, 1.5, num_pids + 1).astype(np.float32)  # easy and hard ids
    to_dim = rng.standard_normal((latent, dim), dtype=np.float32) / np.float32(np.sqrt(latent))
    iso = np.float32(6.8 / np.sqrt(dim))

    def embed(p, c, extra=0.0):
        z = rng.standard_normal((len(p), latent), dtype=np.float32) * spread[p][:, None]
        z += centres[p] + cam_shift[c] + extra
        return z @ to_dim + iso * rng.standard_normal((len(p), dim), dtype=np.float32)

    q_emb = embed(q_pids, q_cams)
    # Distractors (pid 0) do not share a centre: each gets its own random one.
    own = rng.standard_normal((num_distractors, latent), dtype=np.float32) - centres[0]
    g_emb = np.concatenate(
        [
            embed(g_pids[:num_distractors], g_cams[:num_distractors], own),
            embed(g_pids[num_distractors:], g_cams[num_distractors:]),
        ]
    )
    return q_emb, q_pids, q_cams, g_emb, g_pids, g_cams


def reference_re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3):
    """The reference algorithm as torchreid / fast-reid run it, ported to plain NumPy."""
    num_q = q_g_dist.shape[0]
    dist = np.concatenate(
        [
            np.concatenate([q_q_dist, q_g_dist], axis=1),
            np.concatenate([q_g_dist.T, g_g_dist], axis=1),
        ]
    )
    dist = np.power(dist, 2).astype(np.float32)
    dist = np.transpose(dist / np.max(dist, axis=0))  # each row over its largest value
    num = dist.shape[0]
    v = np.zeros_like(dist, dtype=np.float32)
    rank = np.argsort(dist).astype(np.int32)
    half = int(np.around(k1 / 2.0))

    def reciprocal(i, k):
        forward = rank[i, : k + 1]
        backward = rank[forward, : k + 1]
        return forward[np.where(backward == i)[0]]

    for i in range(num):
        own = reciprocal(i, k1)
        expanded = own
        for candidate in own:
            theirs = reciprocal(candidate, half)
            if len(np.intersect1d(theirs, own)) > 2.0 / 3 * len(theirs):
                expanded = np.append(expanded, theirs)
        expanded = np.unique(expanded)
        weight = np.exp(-dist[i, expanded])
        v[i, expanded] = weight / np.sum(weight)
    dist = dist[:num_q]
    if k2 != 1:
        v_qe = np.zeros_like(v, dtype=np.float32)
        for i in range(num):
            v_qe[i] = np.mean(v[rank[i, :k2]], axis=0)
        v = v_qe
        del v_qe
    rank = None  # freed, as the reference frees it
    inverted = [np.where(v[:, i] != 0)[0] for i in range(num)]
    jaccard = np.zeros_like(dist, dtype=np.float32)
    for i in range(num_q):
        overlap = np.zeros((1, num), dtype=np.float32)
        nonzero = np.where(v[i] != 0)[0]
        for j in nonzero:
            rows = inverted[j]
            overlap[0, rows] += np.minimum(v[i, j], v[rows, j])
        jaccard[i] = 1 - overlap / (2.0 - overlap)
    final = jaccard * (1 - lambda_value) + dist * lambda_value
    return final[:num_q, num_q:]


def _cpu_seconds() -> float:
    """CPU time of this process, all threads (BLAS included), user + system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss_mb() -> float:
    """Current resident set of this process, MB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(method, num_query, num_gallery, dim, out_path, k1, k2, lam):
    """Runs one method on the synthetic data; writes its distances and prints JSON."""
    q, q_pids, q_cams, g, g_pids, g_cams = synthetic_reid(num_query, num_gallery, dim)
    import ctl_jax  # which tree is measured (this repository's, see main)

    result = {"method": method, "ctl_jax_tree": os.path.dirname(os.path.abspath(ctl_jax.__file__))}
    result["baseline_rss_mb"] = round(_rss_mb(), 1)
    if method == "reference":
        from ctl_jax.evaluation.ranking import l2_normalize  # NumPy only, no JAX

        start, cpu = time.perf_counter(), _cpu_seconds()
        qn, gn = l2_normalize(q), l2_normalize(g)
        q_g = 2 - 2 * (qn @ gn.T)
        q_q = 2 - 2 * (qn @ qn.T)
        g_g = 2 - 2 * (gn @ gn.T)
        result["seconds_distances"] = round(time.perf_counter() - start, 2)
        result["cpu_seconds_distances"] = round(_cpu_seconds() - cpu, 2)
        dist = reference_re_ranking(q_g, q_q, g_g, k1, k2, lam)
        result["seconds"] = round(time.perf_counter() - start, 2)
        result["cpu_seconds"] = round(_cpu_seconds() - cpu, 2)
    else:
        from ctl_jax.evaluation.rerank import RerankParams, rerank_distances

        params = RerankParams(k1, k2, lam)
        for suffix in ("", "_warm"):  # a first and a second call
            dist = None
            start, cpu = time.perf_counter(), _cpu_seconds()
            dist = rerank_distances(q, g, params)
            result[f"seconds{suffix}"] = round(time.perf_counter() - start, 2)
            result[f"cpu_seconds{suffix}"] = round(_cpu_seconds() - cpu, 2)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    from ctl_jax.evaluation.ranking import rank_scores

    metrics = rank_scores(-dist, q_pids, q_cams, g_pids, 1 << g_cams)
    result.update(mAP=metrics["mAP"], mINP=metrics["mINP"], rank1=metrics["rank1"])
    np.save(out_path, dist)
    print(json.dumps(result))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="2000x7000,3368x15913", help="QxG,QxG,...")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--methods", default="ctl_jax,reference")
    parser.add_argument("--k1", type=int, default=20)
    parser.add_argument("--k2", type=int, default=6)
    parser.add_argument("--lambda_value", type=float, default=0.3)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [tuple(int(n) for n in s.lower().split("x")) for s in args.sizes.split(",")]
    if args.worker:
        ((num_query, num_gallery),) = sizes
        worker(
            args.worker, num_query, num_gallery, args.dim, args.out,
            args.k1, args.k2, args.lambda_value,
        )  # fmt: skip
        return

    report = {
        "what": "k-reciprocal re-ranking from embeddings",
        "k1": args.k1,
        "k2": args.k2,
        "lambda": args.lambda_value,
        "dim": args.dim,
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "results": [],
    }
    methods = args.methods.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        for num_query, num_gallery in sizes:
            entry = {"num_query": num_query, "num_gallery": num_gallery}
            for method in methods:
                out = os.path.join(tmp, f"{method}.npy")
                # `-m` from the repository root: the worker imports this tree's ctl_jax
                # (run as a file it would import whichever ctl_jax is installed).
                done = subprocess.run(
                    [sys.executable, "-m", "benchmarks.rerank"]
                    + [f"--worker={method}", f"--out={out}"]
                    + [f"--sizes={num_query}x{num_gallery}", f"--dim={args.dim}"]
                    + [f"--k1={args.k1}", f"--k2={args.k2}", f"--lambda_value={args.lambda_value}"],
                    cwd=_REPO,
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if done.returncode != 0:  # e.g. killed for lack of memory (-9)
                    entry[method] = {"failed": done.returncode, "stderr": done.stderr[-2000:]}
                    continue
                entry[method] = json.loads(done.stdout.strip().splitlines()[-1])
            if all("seconds" in entry.get(m, {}) for m in ("ctl_jax", "reference")):
                ours = np.load(os.path.join(tmp, "ctl_jax.npy"))
                theirs = np.load(os.path.join(tmp, "reference.npy"))
                a, b = entry["ctl_jax"], entry["reference"]
                difference = np.abs(ours - theirs)
                entry["max_abs_distance_difference"] = float(difference.max())
                # Entries apart by more than float rounding: where the two orders of a
                # near-tied pair of neighbours differ (docs/evaluation.md, 'Re-ranking at scale').
                entry["distances_differing_over_1e-4"] = int((difference > 1e-4).sum())
                entry["distances"] = int(difference.size)
                del difference
                entry["mAP_difference"] = abs(a["mAP"] - b["mAP"])
                entry["speedup"] = round(b["seconds"] / a["seconds"], 2)
                entry["speedup_warm"] = round(b["seconds"] / a["seconds_warm"], 2)
                entry["speedup_cpu"] = round(b["cpu_seconds"] / a["cpu_seconds"], 2)
                entry["peak_memory_ratio"] = round(b["peak_rss_mb"] / a["peak_rss_mb"], 2)
                del ours, theirs
            report["results"].append(entry)
            print(json.dumps(entry), file=sys.stderr)  # progress
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
