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
The `products` entry adds what the ops compute: the multiply-adds of every matrix product and
convolution the compiled program runs (`product_flops`, read from its optimised HLO, so after
the CPU layers' rewrites: Winograd's products count their own, smaller, size), the time those
ops take, their rate (GFLOP/s while they run) and the `--top` slowest with their shapes. With
`--threads=1` op time is core time, and the rate compares with one core's peak
(`roofline.py --threads=1`); with two threads a product's event spans both threads' share of
it. `--trace_dir` keeps the trace for Perfetto's UI (ui.perfetto.dev opens the .json.gz) or
TensorBoard's profile plugin.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import math
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


# Reading the optimised HLO text (`compiled.as_text()`): instruction and parameter shapes,
# the computations fusions call, and the multiply-adds of dots and convolutions.
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \((.*)\) -> .* \{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+\[[\d,]*\])?\S*\s*([\w\-]+)\((.*)$")
_PARAM = re.compile(r"%?([\w.\-]+): (\w+\[[\d,]*\])")
_DIMS = re.compile(r"\w+\[([\d,]*)\]")


def _dims(shape: str) -> tuple[int, ...]:
    """ "f32[32,64]" -> (32, 64)."""
    return tuple(int(d) for d in _DIMS.match(shape).group(1).split(",") if d)


def _operands(rest: str) -> list[str]:
    """Operand names of an instruction, from the text after its opening parenthesis."""
    depth = 1
    for position, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return re.findall(r"%([\w.\-]+)", rest[:position])
    return re.findall(r"%([\w.\-]+)", rest)


def _product_flops(op: str, shape: tuple[int, ...], operands, attrs: str, shapes) -> int:
    """2 x multiply-adds of a `dot` or `convolution` (0 for other ops). A convolution counts
    every kernel tap at every output position (an input-dilated one, the transposed
    convolution of a strided one's input gradient, also counts the taps on inserted zeros)."""
    out = math.prod(shape)
    if op == "dot":
        lhs = shapes[operands[0]]
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs).group(1)
        return 2 * out * math.prod(lhs[int(d)] for d in contracting.split(",") if d)
    if op == "convolution":
        kernel = shapes[operands[1]]
        labels = re.search(r"dim_labels=\w+_(\w+)->", attrs).group(1)
        taps = math.prod(kernel[i] for i, label in enumerate(labels) if label.isdigit())
        return 2 * out * taps * kernel[labels.index("i")]
    return 0


def product_flops(hlo_text: str) -> dict[str, int]:
    """FLOPs (2 x multiply-adds) of each op of an optimised HLO module's entry computation
    that runs matrix products or convolutions: the dots and convolutions themselves, and the
    fusions (e.g. YNNPACK's) by the products in the computations they call. Other ops are
    left out. Op names are those of the profiler's events."""
    shapes, bodies, calls, entry, current = {}, {}, {}, None, None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = header.group(1)
            bodies[current] = []
            if line.startswith("ENTRY"):
                entry = current
            shapes.update((name, _dims(shape)) for name, shape in _PARAM.findall(header.group(2)))
            continue
        instruction = _INSTRUCTION.match(line) if current else None
        if instruction:
            name, shape, op, rest = instruction.groups()
            if shape:
                shapes[name] = _dims(shape)
            bodies[current].append((name, op, rest))
            called = re.search(r"calls=%?([\w.\-]+)", rest)
            if called:
                calls[name] = called.group(1)

    def flops_of(computation: str) -> int:
        total = 0
        for name, op, rest in bodies.get(computation, ()):
            total += _product_flops(op, shapes.get(name, ()), _operands(rest), rest, shapes)
            if name in calls:
                total += flops_of(calls[name])
        return total

    result = {}
    for name, op, rest in bodies.get(entry, ()):
        flops = _product_flops(op, shapes.get(name, ()), _operands(rest), rest, shapes)
        flops += flops_of(calls[name]) if name in calls else 0
        if flops:
            result[name] = flops
    return result


def products_summary(per_op_ms: dict[str, float], flops: dict[str, int], top: int) -> dict:
    """Time, FLOPs and rate of the product ops, and the `top` slowest single ones."""
    timed = {name: ms for name, ms in per_op_ms.items() if name in flops and ms > 0}
    ms = sum(timed.values())
    gflop = sum(flops[name] for name in timed) / 1e9
    slowest = sorted(timed, key=timed.get, reverse=True)[:top]

    def rate(name):
        return flops[name] / timed[name] / 1e6  # FLOP per ms -> GFLOP/s

    return {
        "gflop_per_step": round(gflop, 2),
        "ms_per_step": round(ms, 1),
        "gflop_per_second": round(gflop / ms * 1e3, 1) if ms else None,
        "slowest": [
            {"op": n, "ms": round(timed[n], 2), "gflop_per_second": round(rate(n), 1)}
            for n in slowest
        ],
    }


def read_events(trace_dir: pathlib.Path) -> list[dict]:
    """The complete ("X") events of the newest Perfetto trace under `trace_dir`."""
    traces = sorted(trace_dir.rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not traces:
        raise SystemExit(f"no perfetto_trace.json.gz under {trace_dir}: did the trace run?")
    with gzip.open(traces[-1], "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def op_milliseconds(events: list[dict], steps: int) -> collections.Counter:
    """Milliseconds per step of each XLA op (by HLO instruction name)."""
    per_op = collections.Counter()
    for event in events:
        name = event.get("name", "")
        if _HLO_OP.match(name) and not name.startswith("jit_"):
            per_op[name] += event["dur"] / 1e3 / steps  # microseconds -> ms per step
    return per_op


def summarise(events: list[dict], steps: int, wall_seconds: float, top: int) -> dict:
    """Per-step milliseconds by op kind and for the slowest single ops."""
    per_op = op_milliseconds(events, steps)
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
        "products": products_summary(
            op_milliseconds(events, bench_args.steps),
            product_flops(bench.compiled.as_text()),
            args.top,
        ),
    }
    if args.trace_dir:
        result["trace_dir"] = str(trace_dir)
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
