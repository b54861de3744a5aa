"""The exported ONNX model next to ctl_jax: file size and CPU throughput.

    python -m benchmarks.export --arch=resnet50 --height=256 --width=128 --batch=32

Builds a randomly initialised model of the given architecture (the cost does not depend on
the weights), exports it as `python -m ctl_jax.export` does (`ctl_jax.deploy.onnx_graph`,
and with `--stablehlo` also `ctl_jax.deploy.stablehlo`), then times one batch of `--batch`
uint8 images at the input size: onnxruntime (CPU execution provider, default graph
optimisations) against `ctl_jax.Embedder` (the layers `cpu_fast_path` chooses; uint8 in,
embeddings on the host out, as a service calls it). Also reports the lowest cosine similarity
between the two. Prints one JSON line with the load average (the numbers are only comparable
within one run on a busy machine).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

try:
    from . import common
except ImportError:  # run as a file: benchmarks/ is on sys.path (see common.py)
    import common


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--num_classes", type=int, default=751)
    parser.add_argument("--cpu_fast_path", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--threads", type=int, default=0, help="CPU cores (0: all)")
    parser.add_argument("--stablehlo", action="store_true", help="also size the StableHLO")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    args.framework, args.tune_malloc, args.dtype = "jax", None, "float32"
    process = common.setup_process(args)
    import jax

    from ctl_jax.build import build_model
    from ctl_jax.deploy.onnx_graph import build_onnx_model
    from ctl_jax.deploy.verify import cosine_rows, onnx_session
    from ctl_jax.embedder import Embedder
    from ctl_jax.models.reid import init_variables

    config = common.jax_config(args)
    reference = build_model(config, args.num_classes, cpu_fast_path="off")
    variables = init_variables(reference, jax.random.key(0), (args.height, args.width, 3))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch, args.height, args.width, 3), dtype=np.uint8)
    record = {
        "benchmark": "export",
        "arch": args.arch,
        "height": args.height,
        "width": args.width,
        "batch": args.batch,
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        t0 = time.perf_counter()
        data = build_onnx_model(reference, variables, args.height, args.width)
        with open(path, "wb") as f:
            f.write(data.SerializeToString())
        record["onnx_export_seconds"] = round(time.perf_counter() - t0, 2)
        record["onnx_mb"] = round(os.path.getsize(path) / 1e6, 1)
        if args.stablehlo:
            from ctl_jax.deploy.stablehlo import export_stablehlo

            blob = export_stablehlo(reference, variables, args.height, args.width)
            record["stablehlo_mb"] = round(len(blob) / 1e6, 1)
        session = onnx_session(path, threads=args.threads)
        t0 = time.perf_counter()
        onnx_out = session.run(["embeddings"], {"images": images})[0]
        first = time.perf_counter() - t0
        times = common.time_steps(
            common.Bench(lambda: session.run(["embeddings"], {"images": images}), first, {}),
            args.steps,
            args.warmup,
        )
        record["onnxruntime"] = {
            **common.summary(times, args.batch),
            "first_call_s": round(first, 2),
        }
        import onnxruntime

        record["onnxruntime_version"] = onnxruntime.__version__

    model = build_model(config, args.num_classes)
    embedder = Embedder(model, variables, args.height, args.width, batch_size=args.batch)
    t0 = time.perf_counter()
    jax_out = embedder(images)
    first = time.perf_counter() - t0
    times = common.time_steps(common.Bench(lambda: embedder(images), first, {}), args.steps, 1)
    record["ctl_jax"] = {
        **common.summary(times, args.batch),
        "first_call_s": round(first, 2),
        "cpu_fast_path": args.cpu_fast_path,
        **common.jax_info(model),
    }
    record["min_cosine_onnx_vs_ctl_jax"] = round(float(cosine_rows(onnx_out, jax_out).min()), 6)
    record["loadavg"] = common.loadavg()
    record.update(process)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
