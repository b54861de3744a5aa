"""Times the full CTL training step (steady state; compilation timed separately).

    python benchmarks/train_step.py --arch=resnet50 --height=128 --width=64 --p=8 --m=4
    python benchmarks/train_step.py --framework=torch ...   # the PyTorch reference step

Prints one JSON line: images_per_second, seconds_per_step (median), compile_seconds, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import numpy as np


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", choices=("jax", "torch"), default="jax")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--p", type=int, default=8)
    parser.add_argument("--m", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
    parser.add_argument("--num_classes", type=int, default=751)
    parser.add_argument("--fast_1x1", type=int, default=1, help="jax only: 1x1 convs as matmuls")
    parser.add_argument("--dtype", default="float32", help="jax only: float32 or bfloat16")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: all)")
    return parser.parse_args(argv)


def fake_batch(args, rng):
    n = args.p * args.m
    images = rng.standard_normal((n, args.height, args.width, 3)).astype(np.float32)
    labels = np.repeat(rng.choice(args.num_classes, args.p, replace=False), args.m)
    return images, labels.astype(np.int32)


def time_jax(args):
    import jax

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from ctl_jax.configs import load_config
    from ctl_jax.models.reid import build_model, feature_dim, init_variables
    from ctl_jax.training import sharding
    from ctl_jax.training.optimizer import make_optimizer
    from ctl_jax.training.state import create_train_state
    from ctl_jax.training.step import make_train_step

    config = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "default.py"))
    config.model.arch, config.model.fast_1x1 = args.arch, bool(args.fast_1x1)
    config.model.dtype = args.dtype
    config.data.num_identities, config.data.num_instances = args.p, args.m
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

    def run():
        nonlocal state
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics["total_loss"])

    return run, compile_seconds, {"jax": jax.__version__, "backend": jax.default_backend()}


def time_torch(args):
    import torch

    sys.path.insert(0, os.path.dirname(__file__))
    from torch_reference import ReidNet, make_step

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ReidNet(args.arch, args.num_classes).train()
    step = make_step(model, args.num_classes, args.m)
    images, labels = fake_batch(args, np.random.default_rng(0))
    images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    labels = torch.from_numpy(labels.astype(np.int64))

    def run():
        step(images, labels)

    return run, 0.0, {"torch": torch.__version__, "threads": torch.get_num_threads()}


def main(argv=None):
    args = parse_args(argv)
    run, compile_seconds, versions = (time_jax if args.framework == "jax" else time_torch)(args)
    for _ in range(args.warmup):
        run()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    result = {
        "benchmark": "train_step",
        "framework": args.framework,
        "arch": args.arch,
        "height": args.height,
        "width": args.width,
        "p": args.p,
        "m": args.m,
        "batch": args.p * args.m,
        "dtype": args.dtype if args.framework == "jax" else "float32",
        "fast_1x1": bool(args.fast_1x1) if args.framework == "jax" else None,
        "steps": args.steps,
        "seconds_per_step": round(seconds, 4),
        "seconds_per_step_min": round(min(times), 4),
        "images_per_second": round(args.p * args.m / seconds, 2),
        "compile_seconds": round(compile_seconds, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cpu_count": os.cpu_count(),
        **versions,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
