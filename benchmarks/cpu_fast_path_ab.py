"""Does the CPU fast path pay at this size? ctl_jax with the CPU layers and with the
reference layers, in one process.

    python -m benchmarks.cpu_fast_path_ab --arch=resnet50 --height=128 --width=64 --rounds=20
    python -m benchmarks.cpu_fast_path_ab --task=inference --arch=resnet18 --height=64 --width=32

Builds the training step (or the embedding function, `--task=inference`) twice, with
`cpu_fast_path` on (the CPU layers of ctl_jax/cpu/) and off (the reference layers: plain
Flax/lax, same parameters and results to float rounding), then alternates their timed steps
(A, B, B, A, ...) so that both see the same load. Step times on a shared machine move by
10-15% from run to run, so only a within-process comparison like this can show a few per
cent. Prints one JSON object: per variant the median and best seconds, and `on_over_off`,
the ratio of the reference layers' median to the CPU layers' (> 1: the fast path pays).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

try:
    from . import common, tasks
except ImportError:  # run as a file: benchmarks/ is on sys.path (see common.py)
    import common
    import tasks

VARIANTS = ("on", "off")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="timed steps per variant")
    args, module, bench_args, rest = tasks.parse_task(parser, argv)
    process = common.setup_process(bench_args)
    load_before = common.loadavg()
    variants = {}
    for name in VARIANTS:
        variant_args = module.parse_args(rest + [f"--cpu_fast_path={name}"])
        bench = module.build_jax(variant_args)
        for _ in range(variant_args.warmup):
            bench.run()
        variants[name] = (bench, [])
    for r in range(args.rounds):
        for name in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            bench, times = variants[name]
            t0 = time.perf_counter()
            bench.run()
            times.append(time.perf_counter() - t0)
    result = {
        "benchmark": "cpu_fast_path_ab",
        "task": args.task,
        "arch": bench_args.arch,
        "height": bench_args.height,
        "width": bench_args.width,
        "dtype": bench_args.dtype,
        "rounds": args.rounds,
        "loadavg_before": load_before,
        "loadavg_after": common.loadavg(),
        **process,
    }
    for name, (bench, times) in variants.items():
        result[name] = {
            "seconds_median": round(statistics.median(times), 4),
            "seconds_min": round(min(times), 4),
            "compile_seconds": round(bench.compile_seconds, 2),
            "cpu_layers": bench.info["cpu_layers"],
        }
    result["on_over_off"] = round(
        result["off"]["seconds_median"] / result["on"]["seconds_median"], 3
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
