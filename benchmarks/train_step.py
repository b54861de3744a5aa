"""Times the full CTL training step (steady state; compilation timed separately).

    python benchmarks/train_step.py --arch=resnet50 --height=128 --width=64 --p=8 --m=4
    python benchmarks/train_step.py --framework=torch ...   # the PyTorch reference step

Prints one JSON line: images_per_second, seconds_per_step (median and min), compile_seconds,
peak RSS. The ctl_jax step is the one training uses (`make_train_step`, jitted with the train
state donated, as in `ctl_jax/training/loop.py`); the PyTorch step is `torch_reference.py`.
To compare the two fairly on a busy machine use `compare_torch.py`, which runs both in
separate processes with the same thread count and interleaves their timed steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by the train-step and inference benchmarks."""
    parser.add_argument("--framework", choices=("jax", "torch"), default="jax")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    parser.add_argument("--num_classes", type=int, default=751)
    parser.add_argument("--fast_1x1", type=int, default=1, help="jax only: 1x1 convs as matmuls")
    parser.add_argument(
        "--fast_ops", type=int, default=1, help="jax only: the other CPU rewrites (cpu_ops.py)"
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
        help="keep freed memory in glibc's heap (`ctl_jax.malloc`, which ctl_jax's command "
        "lines apply); default: on for jax, off for torch",
    )
    parser.add_argument(
        "--torch_channels_last",
        type=int,
        default=0,
        help="torch only: NHWC memory format (not what the plain reference does; for checks)",
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--p", type=int, default=8)
    parser.add_argument("--m", type=int, default=4)
    return parser.parse_args(argv)


@dataclasses.dataclass
class Bench:
    """A ready-to-time benchmark: `run()` does one complete step and waits for its result."""

    run: Callable[[], Any]
    compile_seconds: float
    info: dict
    compiled: Any = None  # jax only: the compiled executable (for HLO / cost inspection)


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


def fake_batch(args, rng):
    n = args.p * args.m
    images = rng.standard_normal((n, args.height, args.width, 3)).astype(np.float32)
    labels = np.repeat(rng.choice(args.num_classes, args.p, replace=False), args.m)
    return images, labels.astype(np.int32)


def jax_config(args):
    """The default config with the benchmark's model and batch settings."""
    sys.path.insert(0, ROOT)
    from ctl_jax.configs import load_config

    config = load_config(os.path.join(ROOT, "configs", "default.py"))
    config.model.arch, config.model.fast_1x1 = args.arch, bool(args.fast_1x1)
    config.model.fast_ops = bool(args.fast_ops)
    config.model.dtype = args.dtype
    config.data.height, config.data.width = args.height, args.width
    if hasattr(args, "p"):
        config.data.num_identities, config.data.num_instances = args.p, args.m
    return config


def build_jax(args) -> Bench:
    """The ctl_jax training step, compiled (timed) and ready to run on a fixed batch."""
    import jax

    # Cold compilation is part of what we report: never read a persistent cache here.
    jax.config.update("jax_enable_compilation_cache", False)
    sys.path.insert(0, ROOT)
    from ctl_jax.malloc import release_free_memory
    from ctl_jax.models.reid import build_model, feature_dim, init_variables
    from ctl_jax.training import sharding
    from ctl_jax.training.optimizer import make_optimizer
    from ctl_jax.training.state import create_train_state
    from ctl_jax.training.step import make_train_step

    config = jax_config(args)
    model = build_model(config.model, args.num_classes)
    tx = make_optimizer(config.solver)
    mesh = sharding.make_mesh(1)
    variables = init_variables(model, jax.random.key(0), (args.height, args.width, 3))
    state = create_train_state(
        variables, tx, args.num_classes, feature_dim(args.arch), jax.random.key(1)
    )
    state = sharding.replicate(state, mesh)
    rep = sharding.replicated(mesh)
    step = jax.jit(
        make_train_step(model, tx, config),
        in_shardings=(rep, sharding.batch_sharded(mesh)),
        out_shardings=(rep, rep),
        donate_argnums=0,
    )
    images, labels = fake_batch(args, np.random.default_rng(0))
    batch = sharding.put_batch(
        {"images": images, "labels": labels, "valid": np.ones(len(labels), bool)}, mesh
    )
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - t0
    release_free_memory()  # as the training loop does after compiling its step

    def run():
        nonlocal state
        state, metrics = compiled(state, batch)
        # All of it, as the training loop does on CPU before dispatching the next step
        # (`loop._run_epoch`): two steps in flight hold two temporary buffers.
        jax.block_until_ready((state, metrics))

    info = {"jax": jax.__version__, "backend": jax.default_backend()}
    return Bench(run, compile_seconds, info, compiled)


def build_torch(args) -> Bench:
    """The PyTorch reference step (eager, float32) on a fixed batch."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from torch_reference import ReidNet, make_step

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ReidNet(args.arch, args.num_classes).train()
    images, labels = fake_batch(args, np.random.default_rng(0))
    images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    if args.torch_channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    step = make_step(model, args.num_classes, args.m)
    labels = torch.from_numpy(labels.astype(np.int64))

    def run():
        step(images, labels)

    info = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    return Bench(run, 0.0, info)


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
    step's memory was handed back to the kernel and faulted in again (see ctl_jax.malloc)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt + usage.ru_majflt


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def summary(args, times: list[float], batch: int) -> dict:
    """Median and min seconds per step and the images/second of the median."""
    seconds = statistics.median(times)
    return {
        "steps": len(times),
        "seconds_per_step": round(seconds, 4),
        "seconds_per_step_min": round(min(times), 4),
        "images_per_second": round(batch / seconds, 2),
        "images_per_second_best": round(batch / min(times), 2),
    }


def parse_task(parser: argparse.ArgumentParser, argv=None, jax_only: bool = True):
    """For the scripts that run either step: adds `--task` (train: this module's step,
    inference: `inference.py`'s) to `parser`, which parses its own options; that benchmark's
    parser takes the rest (`jax_only`: `--framework` must stay jax). Returns (own args,
    benchmark module, benchmark args, the rest of argv, to parse again with other settings)."""
    import inference  # imports this module

    parser.add_argument("--task", choices=("train", "inference"), default="train")
    args, rest = parser.parse_known_args(argv)
    module = sys.modules[__name__] if args.task == "train" else inference
    common = module.parse_args(rest)
    if jax_only and common.framework != "jax":
        parser.error("this studies ctl_jax alone; --framework must stay jax")
    return args, module, common, rest


def setup_process(args) -> dict:
    """Thread pinning and allocator tuning; before either framework starts its threads."""
    threads = pin_threads(args.threads)
    tuned = args.tune_malloc if args.tune_malloc is not None else args.framework == "jax"
    if not tuned:
        return {"threads": threads, "tuned_malloc": False}
    sys.path.insert(0, ROOT)
    from ctl_jax.malloc import tune_malloc

    return {"threads": threads, "tuned_malloc": tune_malloc()}


def measure(args, name: str, builders: dict, batch: int, extra: dict | None = None) -> dict:
    """Sets up the process, builds `builders[args.framework](args)`, times its steps and
    returns the JSON record every benchmark here prints (`extra`: its own fields)."""
    process = setup_process(args)
    bench = builders[args.framework](args)
    times = time_steps(bench, args.steps, args.warmup)
    return {
        "benchmark": name,
        "framework": args.framework,
        "arch": args.arch,
        "height": args.height,
        "width": args.width,
        "batch": batch,
        "dtype": args.dtype if args.framework == "jax" else "float32",
        **(extra or {}),
        **summary(args, times, batch),
        "compile_seconds": round(bench.compile_seconds, 2),
        "peak_rss_mb": peak_rss_mb(),
        **process,
        **bench.info,
    }


def main(argv=None):
    args = parse_args(argv)
    jax_only = args.framework == "jax"
    extra = {
        "p": args.p,
        "m": args.m,
        "fast_1x1": bool(args.fast_1x1) if jax_only else None,
        "fast_ops": bool(args.fast_ops) if jax_only else None,
    }
    builders = {"jax": build_jax, "torch": build_torch}
    print(json.dumps(measure(args, "train_step", builders, args.p * args.m, extra)))


if __name__ == "__main__":
    main()
