"""Times embedding (inference) throughput: images in, BNNeck embeddings out.

    python -m benchmarks.inference --arch=resnet50 --height=256 --width=128 --batch=128
    python -m benchmarks.inference --framework=torch ...   # the same model in PyTorch

The ctl_jax path is the one evaluation uses (`ctl_jax.inference.make_embed_fn`: running
batch-norm statistics, float32 `bn_features` and `features` out); the PyTorch one is
`torch_reference.ReidNet` in eval mode under `torch.inference_mode()`. Each timed step embeds
one batch of `--batch` images already in memory and waits for the result on the host. Prints
one JSON line like `train_step.py`.
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
    parser.add_argument("--batch", type=int, default=128)
    return parser.parse_args(argv)


def fake_images(args) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.standard_normal((args.batch, args.height, args.width, 3)).astype(np.float32)


def build_jax(args) -> common.Bench:
    """`make_embed_fn` compiled (timed) for one batch shape; `run` embeds one batch."""
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    from ctl_jax import parallel
    from ctl_jax.build import build_model
    from ctl_jax.inference import make_embed_fn
    from ctl_jax.models.reid import init_variables

    config = common.jax_config(args)
    model = build_model(config, args.num_classes)
    mesh = parallel.make_mesh(1)
    variables = init_variables(model, jax.random.key(0), (args.height, args.width, 3))
    variables = parallel.replicate(variables, mesh)
    embed = make_embed_fn(model, mesh)
    host_images = fake_images(args)
    images = parallel.put_batch({"images": host_images}, mesh)["images"]
    t0 = time.perf_counter()
    compiled = embed.lower(variables, images).compile()
    compile_seconds = time.perf_counter() - t0

    def run():
        # Host -> device -> host, as `embed_split` does for every batch.
        placed = parallel.put_batch({"images": host_images}, mesh)["images"]
        bn_features, _ = compiled(variables, placed)
        return np.asarray(bn_features)

    return common.Bench(run, compile_seconds, common.jax_info(model), compiled)


def build_torch(args) -> common.Bench:
    """`ReidNet` in eval mode; `run` embeds one batch (NHWC numpy -> NCHW tensor -> numpy)."""
    import torch

    try:
        from .torch_reference import ReidNet
    except ImportError:  # run as a file (see common.py)
        from torch_reference import ReidNet

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ReidNet(args.arch, args.num_classes, (args.height, args.width)).eval()
    if args.torch_channels_last:
        model = model.to(memory_format=torch.channels_last)
    host_images = fake_images(args)

    def run():
        with torch.inference_mode():
            x = torch.from_numpy(host_images).permute(0, 3, 1, 2)
            x = x.contiguous(
                memory_format=torch.channels_last
                if args.torch_channels_last
                else torch.contiguous_format
            )
            _, bn_features, _ = model(x)
            return bn_features.numpy()

    info = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    return common.Bench(run, 0.0, info)


def main(argv=None):
    args = parse_args(argv)
    builders = {"jax": build_jax, "torch": build_torch}
    print(json.dumps(common.measure(args, "inference", builders, args.batch)))


if __name__ == "__main__":
    main()
