"""The original centroids-reid evaluation of two embeddings files, as one command (a leaf).

    PYTHONPATH=DIR python benchmarks/reference_evaluation.py --reference=DIR --query=Q.npz \
        --gallery=G.npz [--num_query=N] [--output=FILE.json]

(`benchmarks/evaluate.py --reference=DIR` runs it so.) DIR is a checkout of the original code
(github.com/mikwieczorek/centroids-reid; it is not part of this repository: `git clone` it
anywhere). Its `utils/reid_metric.py` `R1_mAP.compute` runs unchanged on the files' embeddings,
as its test loop calls it (feat_norm on, Euclidean distance, instance mode: the config
defaults): the torch distance matrix, `np.argsort` of it, and `utils/eval_reid.py` `eval_func`.
`R1_mAP.__init__` needs a PyTorch Lightning module, so its attributes are set directly;
`utils/visrank.py` (needs OpenCV and the datasets package, only for drawing) is replaced by a
stub. Needs torch and tqdm. Writes {"mAP", "rank1", "num_query", "seconds", "peak_rss_mb"} as
JSON (`--output`, else stdout); `--num_query` evaluates only the first N queries (for
extrapolating what does not fit in memory).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types


def peak_rss_mb() -> float:
    """VmHWM of this process from /proc/self/status, in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main():
    start = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", required=True)
    parser.add_argument("--query", required=True)
    parser.add_argument("--gallery", required=True)
    parser.add_argument("--num_query", type=int, default=0)
    parser.add_argument("--output")
    args = parser.parse_args()

    # The checkout's packages (utils/, ...) come from PYTHONPATH=DIR, set by the caller.
    if not os.path.isfile(os.path.join(args.reference, "utils", "reid_metric.py")):
        sys.exit(f"error: --reference={args.reference}: no utils/reid_metric.py (not a checkout)")
    stub = types.ModuleType("utils.visrank")
    stub.visualize_ranked_results = None  # only used with TEST.VISUALIZE == "yes"
    sys.modules["utils.visrank"] = stub
    import numpy as np
    import torch
    from utils.reid_metric import R1_mAP, get_dist_func

    query, gallery = np.load(args.query), np.load(args.gallery)
    n = args.num_query or len(query["pids"])
    q_emb, g_emb = query["embeddings"][:n], gallery["embeddings"]
    feats = torch.from_numpy(np.concatenate([q_emb, g_emb]))
    pids = np.concatenate([query["pids"][:n], gallery["pids"]])
    camids = np.concatenate([query["camids"][:n], gallery["camids"]])
    del q_emb, g_emb

    metric = R1_mAP.__new__(R1_mAP)  # __init__ needs a Lightning module: set what compute uses
    metric.num_query, metric.max_rank, metric.feat_norm = n, 50, True
    metric.dist_func = get_dist_func("euclidean")
    config = types.SimpleNamespace(
        MODEL=types.SimpleNamespace(USE_CENTROIDS=False),
        TEST=types.SimpleNamespace(VISUALIZE="no"),
    )
    metric.hparms = config
    metric.pl_module = types.SimpleNamespace(hparams=config)
    cmc, mean_ap, topk = metric.compute(feats, pids, camids, respect_camids=False)
    record = {
        "mAP": float(mean_ap),
        "rank1": float(cmc[0]),
        "num_query": n,
        "seconds": round(time.perf_counter() - start, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    text = json.dumps(record)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
