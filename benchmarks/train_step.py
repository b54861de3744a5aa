"""Times the full CTL training step (steady state; compilation timed separately).

    python -m benchmarks.train_step --arch=resnet50 --height=128 --width=64 --p=8 --m=4
    python -m benchmarks.train_step --framework=torch ...   # the PyTorch reference step

Prints one JSON line: images_per_second, seconds_per_step (median and min), compile_seconds,
peak RSS. The ctl_jax step is the one training uses (`make_train_step`, jitted with the train
state donated, as in `ctl_jax/training/loop.py`, with the layers `ctl_jax.build.build_model`
picks for `--cpu_fast_path`); the PyTorch step is `torch_reference.py`. To compare the two
fairly on a busy machine use `compare_torch.py`, which runs both in separate processes with
the same thread count and interleaves their timed steps.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

try:
    from . import common
except ImportError:  # run as a file: benchmarks/ is on sys.path (see common.py)
    import common


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser)
    parser.add_argument("--p", type=int, default=8)
    parser.add_argument("--m", type=int, default=4)
    return parser.parse_args(argv)


def fake_batch(args, rng):
    n = args.p * args.m
    images = rng.standard_normal((n, args.height, args.width, 3)).astype(np.float32)
    labels = np.repeat(rng.choice(args.num_classes, args.p, replace=False), args.m)
    return images, labels.astype(np.int32)


def _jax_parts(args, config):
    """The pieces of the ctl_jax step: (jitted step, state initialiser, batch, mesh, model)."""
    import jax

    from ctl_jax import parallel
    from ctl_jax.build import build_model
    from ctl_jax.models.reid import feature_dim, init_variables
    from ctl_jax.training.optimizer import make_optimizer
    from ctl_jax.training.state import create_train_state
    from ctl_jax.training.step import make_train_step

    config = common.jax_config(args) if config is None else config
    model = build_model(config, args.num_classes)
    tx = make_optimizer(config.solver)
    mesh = parallel.make_mesh(1)

    def init_state():
        variables = init_variables(model, jax.random.key(0), (args.height, args.width, 3))
        return create_train_state(
            variables, tx, args.num_classes, feature_dim(args.arch), jax.random.key(1)
        )

    rep = parallel.replicated(mesh)
    step = jax.jit(
        make_train_step(model, tx, config),
        in_shardings=(rep, parallel.batch_sharded(mesh)),
        out_shardings=(rep, rep),
        donate_argnums=0,
    )
    images, labels = fake_batch(args, np.random.default_rng(0))
    batch = parallel.put_batch(
        {"images": images, "labels": labels, "valid": np.ones(len(labels), bool)}, mesh
    )
    return step, init_state, batch, mesh, model


def make_jax_step(args, config=None):
    """The ctl_jax training step as training jits it (train state donated), with its inputs:
    of `config` when given (its model and batch settings must match `args`), else of the
    default config with the benchmark's settings (`common.jax_config`).

    Returns:
      (jitted step, replicated train state, batch on the mesh, model).
    """
    from ctl_jax import parallel

    step, init_state, batch, mesh, model = _jax_parts(args, config)
    return step, parallel.replicate(init_state(), mesh), batch, model


def make_compiled_jax_step(args, config=None):
    """The ctl_jax training step compiled as the training loop compiles it: ahead of the
    train state, from its abstract value (`ctl_jax.training.ahead`); the state is created
    afterwards.

    Returns:
      (compiled step, `make_state()` -> replicated train state, batch on the mesh, model,
      compile seconds).
    """
    import jax

    from ctl_jax import parallel
    from ctl_jax.training import ahead

    step, init_state, batch, mesh, model = _jax_parts(args, config)
    state_spec = ahead.abstract_like(jax.eval_shape(init_state), parallel.replicated(mesh))
    batch_spec = ahead.abstract_like(batch, parallel.batch_sharded(mesh))
    t0 = time.perf_counter()
    compiled = ahead.compile_ahead(step, state_spec, batch_spec)
    compile_seconds = time.perf_counter() - t0

    def make_state():
        state = parallel.replicate(init_state(), mesh)
        ahead.release_compiler_memory()  # as the training loop does once the state exists
        return state

    return compiled, make_state, batch, model, compile_seconds


def build_jax(args) -> common.Bench:
    """The ctl_jax training step, compiled (timed) and ready to run on a fixed batch."""
    import jax

    # Cold compilation is part of what we report: never read a persistent cache here.
    jax.config.update("jax_enable_compilation_cache", False)
    compiled, make_state, batch, model, compile_seconds = make_compiled_jax_step(args)
    state = make_state()

    def run():
        nonlocal state
        state, metrics = compiled(state, batch)
        # All of it, as the training loop does on CPU before dispatching the next step
        # (`loop._run_epoch`): two steps in flight hold two temporary buffers.
        jax.block_until_ready((state, metrics))

    return common.Bench(run, compile_seconds, common.jax_info(model), compiled)


def build_torch(args) -> common.Bench:
    """The PyTorch reference step (eager, float32) on a fixed batch."""
    import torch

    try:
        from .torch_reference import ReidNet, make_step
    except ImportError:  # run as a file (see common.py)
        from torch_reference import ReidNet, make_step

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ReidNet(args.arch, args.num_classes, (args.height, args.width)).train()
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
    return common.Bench(run, 0.0, info)


def main(argv=None):
    args = parse_args(argv)
    builders = {"jax": build_jax, "torch": build_torch}
    extra = {"p": args.p, "m": args.m}
    print(json.dumps(common.measure(args, "train_step", builders, args.p * args.m, extra)))


if __name__ == "__main__":
    main()
