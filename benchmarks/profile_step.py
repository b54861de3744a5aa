"""Where does a ctl_jax step spend its time? XLA ops by kind, from a profiler trace.

    python -m benchmarks.profile_step --arch=resnet50 --height=128 --width=64 --steps=3
    python -m benchmarks.profile_step --task=inference --arch=resnet18 --height=64 --width=32

Builds the training step (or the embedding function, `--task=inference`) as
`benchmarks/train_step.py` (`inference.py`) does, runs the warm-up steps, then traces
`--steps` steps with `jax.profiler.trace(..., create_perfetto_trace=True)` and reads the
Perfetto JSON it writes. Every XLA CPU op (a fusion, a dot, a convolution, a custom call
...) is one trace event; the script sums their durations per step, groups them by kind (the
op name without its numeric suffix, e.g. `loop_multiply_fusion.12` -> `loop_multiply_fusion`,
so the elementwise fusions add up) and prints one JSON object: the wall time per step, the
op time per step (both threads' events summed, so it can exceed wall time), the shares of
three groups (matmul_conv, elementwise_reduce, data_movement: see `op_group`), the `--top`
kinds with their share, and the `--top` single ops. Tracing slows the steps down (wall time
per step here is not a benchmark figure; use train_step.py or compare_torch.py for those).
`--trace_dir` keeps the trace for Perfetto's UI (ui.perfetto.dev opens the .json.gz) or
TensorBoard's profile plugin.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import sys
import tempfile
import time

try:
    from . import common, tasks
except ImportError:  # run as a file: benchmarks/ is on sys.path (see common.py)
    import common
    import tasks

# XLA op events carry the HLO instruction's name (lower case, `-`/`_`, numeric suffixes);
# the runtime's own events (`SlinkyThreadPool::Await`, `ParseArguments`, `end: ...`) do not.
_HLO_OP = re.compile(r"^[a-z][a-z0-9_\-]*(\.\d+)*$")


def op_kind(name: str) -> str:
    """`loop_multiply_fusion.12` -> `loop_multiply_fusion`; `dot.3` -> `dot`."""
    return re.sub(r"(\.\d+)+$", "", name)


_MATMUL = ("ynn_fusion", "dot", "dot_general", "convolution", "custom-call")
_MOVES = {"bitcast", "pad", "slice", "concatenate", "copy", "transpose", "stack", "reshape"}


def op_group(kind: str) -> str:
    """ "matmul_conv" (YNNPACK fusions, dots, convolutions), "data_movement" (copies, pads,
    slices, concatenations, transposes) or "elementwise_reduce" (the other fusions)."""
    if kind.startswith(_MATMUL):
        return "matmul_conv"
    words = set(re.split(r"[_\-]", kind)) - {"fusion", "loop", "input", "base"}
    return "data_movement" if words <= _MOVES else "elementwise_reduce"


def read_events(trace_dir: pathlib.Path) -> list[dict]:
    """The complete ("X") events of the newest Perfetto trace under `trace_dir`."""
    traces = sorted(trace_dir.rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not traces:
        raise SystemExit(f"no perfetto_trace.json.gz under {trace_dir}: did the trace run?")
    with gzip.open(traces[-1], "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def summarise(events: list[dict], steps: int, wall_seconds: float, top: int) -> dict:
    """Per-step milliseconds by op kind and for the slowest single ops."""
    per_op = collections.Counter()
    for event in events:
        name = event.get("name", "")
        if _HLO_OP.match(name) and not name.startswith("jit_"):
            per_op[name] += event["dur"] / 1e3 / steps  # microseconds -> ms per step
    per_kind, per_group = collections.Counter(), collections.Counter()
    for name, ms in per_op.items():
        per_kind[op_kind(name)] += ms
        per_group[op_group(op_kind(name))] += ms
    total = sum(per_kind.values())
    if not total:
        raise SystemExit("the trace holds no XLA op events (is this the CPU backend?)")
    return {
        "wall_ms_per_step": round(wall_seconds * 1e3 / steps, 1),
        "op_ms_per_step": round(total, 1),
        "groups": {g: round(ms / total, 4) for g, ms in per_group.most_common()},
        "kinds": [
            {"kind": k, "ms": round(ms, 2), "share": round(ms / total, 4)}
            for k, ms in per_kind.most_common(top)
        ],
        "top_ops": [{"op": k, "ms": round(ms, 2)} for k, ms in per_op.most_common(top)],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=25, help="kinds and single ops listed")
    parser.add_argument("--trace_dir", default=None, help="keep the trace here (default: temp)")
    args, module, bench_args, _ = tasks.parse_task(parser, argv)
    process = common.setup_process(bench_args)
    bench = module.build_jax(bench_args)
    for _ in range(bench_args.warmup):
        bench.run()

    import jax

    with tempfile.TemporaryDirectory() as tmp:
        trace_dir = pathlib.Path(args.trace_dir or tmp)
        t0 = time.perf_counter()
        with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
            for _ in range(bench_args.steps):
                bench.run()
        wall = time.perf_counter() - t0
        events = read_events(trace_dir)
    result = {
        "benchmark": "profile_step",
        "task": args.task,
        "arch": bench_args.arch,
        "height": bench_args.height,
        "width": bench_args.width,
        "steps": bench_args.steps,
        "cpu_fast_path": bench_args.cpu_fast_path,
        **process,
        **bench.info,
        **summarise(events, bench_args.steps, wall, args.top),
    }
    if args.trace_dir:
        result["trace_dir"] = str(trace_dir)
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
