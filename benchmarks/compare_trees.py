"""ctl_jax against ctl_jax: the same step from two source trees, timed interleaved.

    git worktree add /tmp/before <commit>
    python -m benchmarks.compare_trees --trees=/tmp/before,. --rounds=8 \
        --arch=resnet50 --height=128 --width=64 --p=8 --m=4 --warmup=2

For an A/B of a change to the model or the CPU layers that has no switch: one worker process
per tree (`compare_torch.py`'s workers, each importing its own tree's `ctl_jax` and
`benchmarks`, so the other tree needs a `benchmarks/compare_torch.py` with the same worker
protocol), built one after the other, then timed steps alternating A, B, B, A, ... so that
both see the same load. Step times on a shared machine move by 10-15% from run to run; only
an interleaved comparison like this shows a few per cent, and even it needs several rounds.
Prints one JSON object: `trees`, then for `first` and `second` (the trees in that order; the
same tree twice measures the noise) the median and best seconds per step, every step's
seconds, the compile seconds and the peak RSS, and `second_over_first`, the ratio of the
medians (> 1: the second tree's step is slower).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

try:
    from . import common, compare_torch
except ImportError:  # run as a file: benchmarks/ is on sys.path (see common.py)
    import common
    import compare_torch


def parse_args(argv=None):
    """(own options, the workers' options: everything else, passed on unchanged)."""
    # No abbreviations: `--p=16` (P identities, a worker option) must not be taken for
    # `--pause=16`.
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--trees", required=True, help="two source trees, comma-separated")
    parser.add_argument("--task", default="train", choices=("train", "inference"))
    parser.add_argument("--rounds", type=int, default=8, help="timed steps per tree")
    parser.add_argument("--pause", type=float, default=0.5, help="seconds between steps")
    args, worker_args = parser.parse_known_args(argv)
    if len(args.trees.split(",")) != 2:
        parser.error(f"--trees: two source trees expected, got {args.trees!r}")
    return args, worker_args


def main(argv=None) -> None:
    args, worker_args = parse_args(argv)
    trees = args.trees.split(",")
    load_before = common.loadavg()
    names = dict(zip(("first", "second"), trees))
    workers, ready = {}, {}
    for name, tree in names.items():  # built one at a time: compilation sees no rival
        workers[name] = compare_torch.Worker(args.task, "jax", worker_args, tree=tree)
        ready[name] = workers[name].read()
    times, _, peak = compare_torch.interleave(workers, args.rounds, args.pause)
    result = {"benchmark": "compare_trees", "task": args.task, "args": worker_args}
    result["trees"] = trees
    for name in names:
        t = times[name]
        result[name] = {
            "seconds_per_step": round(statistics.median(t), 4),
            "seconds_per_step_min": round(min(t), 4),
            "seconds_all": [round(v, 4) for v in t],
            "compile_seconds": round(ready[name]["compile_seconds"], 2),
            "peak_rss_mb": peak[name],
        }
    first, second = (result[name]["seconds_per_step"] for name in names)
    result["second_over_first"] = round(second / first, 3)
    result["loadavg_before"], result["loadavg_after"] = load_before, common.loadavg()
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
