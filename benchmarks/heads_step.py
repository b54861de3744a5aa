"""What each retrieval head costs per training step: the demo variants of configs/default.py
(pooling avg / max / GeM / R-MAC, classifier softmax / CosFace / ArcFace, triplet or
contrastive loss), timed in one process with their steps interleaved round by round, so
that all of them see the same machine load.

    python -m benchmarks.heads_step [--variants=avg,gem,rmac,cosface,arcface] [--rounds=10]
        [--arch=resnet18 --height=64 --width=32 --p=8 --m=4]

The step is the one training runs (`make_train_step`, jitted with the state donated, the
layers `ctl_jax.build.build_model` picks). Prints one JSON object: per variant the median and
best seconds per step, the median relative to the first variant, and the compile time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

try:
    from . import train_step
except ImportError:  # run as a file: benchmarks/ is on sys.path (see common.py)
    import train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("avg", "max", "gem", "rmac", "cosface", "arcface", "contrastive")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="avg,gem,rmac,cosface,arcface")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--p", type=int, default=8)
    parser.add_argument("--m", type=int, default=4)
    parser.add_argument("--num_classes", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    args = parser.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown or not args.variants:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    return args


def build_step(args, variant: str):
    """(run one step and wait for it, compile seconds) for one demo variant."""
    import jax

    from ctl_jax.configs import load_config

    config = load_config(
        os.path.join(ROOT, "configs", "default.py"), None if variant == "avg" else variant
    )
    config.model.arch = args.arch
    config.data.height, config.data.width = args.height, args.width
    config.data.num_identities, config.data.num_instances = args.p, args.m
    step, state, batch, _ = train_step.make_jax_step(args, config)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start

    def run():
        nonlocal state
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))

    return run, compile_seconds


def main(argv=None):
    args = parse_args(argv)
    import jax

    from ctl_jax.cpu.malloc import release_free_memory, tune_malloc

    tune_malloc()
    jax.config.update("jax_cpu_enable_async_dispatch", False)  # as the command lines run
    jax.config.update("jax_enable_compilation_cache", False)  # compile time is reported
    steps, compile_seconds = {}, {}
    for variant in args.variants:
        steps[variant], compile_seconds[variant] = build_step(args, variant)
        for _ in range(args.warmup):
            steps[variant]()
    release_free_memory()
    times = {v: [] for v in args.variants}
    for r in range(args.rounds):
        order = args.variants[r % len(args.variants) :] + args.variants[: r % len(args.variants)]
        for variant in order:
            start = time.perf_counter()
            steps[variant]()
            times[variant].append(time.perf_counter() - start)
    first = statistics.median(times[args.variants[0]])
    result = {
        "benchmark": "heads_step",
        "arch": args.arch,
        "height": args.height,
        "width": args.width,
        "batch": args.p * args.m,
        "rounds": args.rounds,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "variants": {
            v: {
                "seconds_per_step": round(statistics.median(t), 4),
                "seconds_per_step_min": round(min(t), 4),
                "relative": round(statistics.median(t) / first, 3),
                "compile_seconds": round(compile_seconds[v], 1),
            }
            for v, t in times.items()
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
