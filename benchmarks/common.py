"""What the step benchmarks share: arguments, process set-up, timing and the JSON record.

Running a benchmark. Every script runs either way, from the repository root:

    python -m benchmarks.train_step --arch=resnet18 --height=64 --width=32
    python benchmarks/train_step.py --arch=resnet18 --height=64 --width=32

`ctl_jax` must be importable: `-m` finds it in the current directory (the repository root);
the file form needs it installed (`pip install -e .`, as `make` does) or on PYTHONPATH.
No script changes `sys.path`.

Importing a sibling. `python -m benchmarks.X` imports X as part of the `benchmarks` package;
`python benchmarks/X.py` puts benchmarks/ itself on `sys.path` and X has no package. So a
script imports its siblings relatively, and by their plain name when there is no package:

    try:
        from . import common
    except ImportError:  # run as a file: benchmarks/ is on sys.path
        import common

The modules form a tree, never a cycle: `common` <- `train_step`, `inference` <- `tasks` <-
`compare_torch`, `cpu_fast_path_ab`, `profile_step`; `compare_torch` <- `roofline`,
`step_memory`; `train_step` <- `heads_step`;
`torch_reference` is a leaf.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by the train-step and inference benchmarks."""
    parser.add_argument("--framework", choices=("jax", "torch"), default="jax")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    parser.add_argument("--num_classes", type=int, default=751)
    parser.add_argument(
        "--cpu_fast_path",
        choices=("auto", "on", "off"),
        default="auto",
        help="jax only: the config's cpu_fast_path (the CPU layers of ctl_jax/cpu/)",
    )
    parser.add_argument(
        "--cpu_recompute",
        type=int,
        default=1,
        help="jax only: the config's cpu_recompute (1: recompute the CPU layers' elementwise "
        "intermediates in the backward pass, 0: keep them)",
    )
    parser.add_argument(
        "--cpu_winograd_tile",
        type=int,
        choices=(2, 4),
        default=4,
        help="jax only: the config's cpu_winograd_tile (4: Winograd F(4x4, 3x3) on maps of "
        "at least 8x8, 2: F(2x2, 3x3) only)",
    )
    parser.add_argument("--dtype", default="float32", help="jax only: float32 or bfloat16")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for either framework (0: all cores). JAX has no thread-count "
        "option, so the process is pinned to that many cores; torch also gets "
        "torch.set_num_threads.",
    )
    parser.add_argument(
        "--tune_malloc",
        type=int,
        default=None,
        help="keep freed memory in glibc's heap (`ctl_jax.cpu.malloc`, which ctl_jax's "
        "command lines apply); default: on for jax, off for torch",
    )
    parser.add_argument(
        "--torch_channels_last",
        type=int,
        default=0,
        help="torch only: NHWC memory format (not what the plain reference does; for checks)",
    )


@dataclasses.dataclass
class Bench:
    """A ready-to-time benchmark: `run()` does one complete step and waits for its result."""

    run: Callable[[], Any]
    compile_seconds: float
    info: dict
    compiled: Any = None  # jax only: the compiled executable (for HLO / cost inspection)


def jax_config(args):
    """The default config with the benchmark's model, batch and CPU fast-path settings."""
    from ctl_jax.configs import load_config

    config = load_config(os.path.join(ROOT, "configs", "default.py"))
    config.cpu_fast_path = args.cpu_fast_path
    config.cpu_recompute = bool(args.cpu_recompute)
    config.cpu_winograd_tile = args.cpu_winograd_tile
    config.model.arch = args.arch
    config.model.dtype = args.dtype
    config.data.height, config.data.width = args.height, args.width
    if hasattr(args, "p"):
        config.data.num_identities, config.data.num_instances = args.p, args.m
    return config


def jax_info(model) -> dict:
    """The JSON fields describing a ctl_jax benchmark's set-up."""
    import jax

    from ctl_jax.cpu import CPU_LAYERS

    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "cpu_layers": model.layers is CPU_LAYERS,
    }


def pin_threads(threads: int) -> int:
    """Restricts this process to `threads` cores (0: leave as is); returns the core count.

    Must run before jax or torch start their thread pools. XLA's CPU client sizes its pool
    from the process's CPU affinity, so pinning is how both frameworks get the same count.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if threads and threads < len(cpus):
        cpus = cpus[:threads]
        os.sched_setaffinity(0, cpus)
    return len(cpus)


def setup_process(args) -> dict:
    """Thread pinning, allocator tuning and, for ctl_jax, synchronous CPU dispatch; before
    either framework starts its threads."""
    threads = pin_threads(args.threads)
    if args.framework == "jax":
        import jax

        # As the command lines run (`ctl_jax.cpu.configure_process`). Dispatched
        # asynchronously, a step could allocate its temporary buffer before the last step's
        # was freed, and the never-trimmed heap kept both: ResNet-50 128x64 P8xM4's RSS rose
        # from 1.9 to 2.9 GB on its third step (benchmarks/step_memory.py --measure_steps).
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    tuned = args.tune_malloc if args.tune_malloc is not None else args.framework == "jax"
    if not tuned:
        return {"threads": threads, "tuned_malloc": False}
    from ctl_jax.cpu.malloc import tune_malloc

    return {"threads": threads, "tuned_malloc": tune_malloc()}


def time_steps(bench: Bench, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        bench.run()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        bench.run()
        times.append(time.perf_counter() - t0)
    return times


def page_faults() -> int:
    """Page faults (minor + major) of this process so far. Per step, a large count means the
    step's memory was handed back to the kernel and faulted in again (see ctl_jax.cpu.malloc)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt + usage.ru_majflt


def status_mb(key: str) -> float | None:
    """A memory figure of this process from Linux's /proc/self/status (VmRSS, VmHWM), in
    MiB; None where there is no such file."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def peak_rss_mb() -> float:
    """This process's peak resident memory (MiB) since it started its program.

    Linux: VmHWM. Not `getrusage`'s ru_maxrss, which in a process started by fork + exec
    keeps the parent's resident memory at the fork: a worker spawned by a benchmark that had
    compiled a ResNet step reported the parent's 945 MB as its own peak. Elsewhere ru_maxrss
    (KiB on Linux and BSD, bytes on macOS).
    """
    hwm = status_mb("VmHWM")
    if hwm is not None:
        return hwm
    scale = 2**20 if sys.platform == "darwin" else 1024
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale, 1)


def machine_record(benchmark: str, threads: int, rounds: int) -> dict:
    """The opening fields of a multi-setting benchmark's JSON: what ran where, and the load."""
    import platform

    return {
        "benchmark": benchmark,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "rounds": rounds,
        "loadavg_start": loadavg(),
    }


def loadavg() -> list[float]:
    """The 1-, 5- and 15-minute load averages."""
    return [round(v, 2) for v in os.getloadavg()]


def summary(times: list[float], batch: int) -> dict:
    """Median and min seconds per step and the images/second of the median."""
    seconds = statistics.median(times)
    return {
        "steps": len(times),
        "seconds_per_step": round(seconds, 4),
        "seconds_per_step_min": round(min(times), 4),
        "images_per_second": round(batch / seconds, 2),
        "images_per_second_best": round(batch / min(times), 2),
    }


def measure(args, name: str, builders: dict, batch: int, extra: dict | None = None) -> dict:
    """Sets up the process, builds `builders[args.framework](args)`, times its steps and
    returns the JSON record every step benchmark prints (`extra`: its own fields)."""
    process = setup_process(args)
    bench = builders[args.framework](args)
    times = time_steps(bench, args.steps, args.warmup)
    jax_only = args.framework == "jax"
    return {
        "benchmark": name,
        "framework": args.framework,
        "arch": args.arch,
        "height": args.height,
        "width": args.width,
        "batch": batch,
        "dtype": args.dtype if jax_only else "float32",
        "cpu_fast_path": args.cpu_fast_path if jax_only else None,
        "cpu_recompute": bool(args.cpu_recompute) if jax_only else None,
        "cpu_winograd_tile": args.cpu_winograd_tile if jax_only else None,
        **(extra or {}),
        **summary(times, batch),
        "compile_seconds": round(bench.compile_seconds, 2),
        "peak_rss_mb": peak_rss_mb(),
        "loadavg": loadavg(),
        **process,
        **bench.info,
    }
