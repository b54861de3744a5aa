"""Do the XLA CPU rewrites pay at this size? ctl_jax with and without them, in one process.

    python benchmarks/fast_ops_ab.py --arch=resnet50 --height=128 --width=64 --rounds=20
    python benchmarks/fast_ops_ab.py --task=inference --arch=resnet18 --height=64 --width=32

Builds the training step (or the embedding function, `--task=inference`) twice, with
`model.fast_ops` and `model.fast_1x1` on and off (the plain lax/flax formulation, same
parameters and results to float rounding), then alternates their timed steps (A, B, B, A,
...) so that both see the same load. Step times on this kind of machine move by 10-15% from
run to run, so only a within-process comparison like this can show a few per cent. Prints
one JSON object: per variant the median and best seconds, and `fast_over_plain`, the ratio
of the plain median to the fast one (> 1: the rewrites pay).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import train_step


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="timed steps per variant")
    args, module, common, rest = train_step.parse_task(parser, argv)
    process = train_step.setup_process(common)
    variants = {}
    for name, flag in (("fast", 1), ("plain", 0)):
        variant_args = module.parse_args(rest + [f"--fast_ops={flag}", f"--fast_1x1={flag}"])
        bench = module.build_jax(variant_args)
        for _ in range(variant_args.warmup):
            bench.run()
        variants[name] = (bench, [])
    order = list(variants)
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            bench, times = variants[name]
            t0 = time.perf_counter()
            bench.run()
            times.append(time.perf_counter() - t0)
    result = {
        "benchmark": "fast_ops_ab",
        "task": args.task,
        "arch": common.arch,
        "height": common.height,
        "width": common.width,
        "rounds": args.rounds,
        **process,
    }
    for name, (bench, times) in variants.items():
        result[name] = {
            "seconds_median": round(statistics.median(times), 4),
            "seconds_min": round(min(times), 4),
            "compile_seconds": round(bench.compile_seconds, 2),
        }
    result["fast_over_plain"] = round(
        result["plain"]["seconds_median"] / result["fast"]["seconds_median"], 3
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
