"""Training input pipeline throughput (images/second) at 256 x 128 with all augmentations.

Writes Market-like JPEGs (default 64 identities x 8 images of 128 x 64) to a temporary
directory and times `make_train_iterator` for P=16, M=4 without and with worker processes.
``steady_images_per_s`` leaves out the first batch of every epoch (worker start-up, filling
the prefetch buffer); ``images_per_s`` counts everything. Prints one JSON object.

    python -m benchmarks.input_pipeline [--epochs 3] [--workers 0,2]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image

from ctl_jax.data.image_io import FileImageReader
from ctl_jax.data.pipeline import TrainPipelineConfig, make_train_iterator
from ctl_jax.data.records import Split


def write_images(root: str, num_ids: int, per_id: int, height: int, width: int) -> Split:
    """Smooth random images (JPEG-compressible like photos) in the Market-1501 naming."""
    rng = np.random.default_rng(0)
    paths, pids, camids = [], [], []
    for pid in range(num_ids):
        for k in range(per_id):
            small = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
            image = Image.fromarray(small).resize((width, height), Image.BILINEAR)
            noise = rng.integers(-12, 13, (height, width, 3))
            pixels = np.clip(np.asarray(image, np.int16) + noise, 0, 255).astype(np.uint8)
            path = os.path.join(root, f"{pid:04d}_c{k % 6 + 1}s1_{k:06d}_00.jpg")
            Image.fromarray(pixels).save(path, quality=90)
            paths.append(path)
            pids.append(pid)
            camids.append(k % 6)
    return Split.from_lists(paths, pids, camids)


def measure(split: Split, cfg: TrainPipelineConfig, epochs: int) -> dict:
    reader = FileImageReader(split.paths)
    images = steady_images = 0
    total = steady = 0.0
    for epoch in range(epochs):
        start = time.perf_counter()
        iterator = make_train_iterator(split, reader, cfg, epoch)
        first = None
        for batch in iterator:
            now = time.perf_counter()
            if first is None:
                first = now
            else:
                steady_images += int(batch["valid"].size)
            images += int(batch["valid"].size)
        end = time.perf_counter()
        total += end - start
        steady += end - first
        del iterator
    return {
        "worker_count": cfg.worker_count,
        "read_threads": cfg.read_threads,
        "images": images,
        "seconds": round(total, 2),
        "images_per_s": round(images / total, 1),
        "steady_images_per_s": round(steady_images / steady, 1) if steady else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=64)
    parser.add_argument("--images-per-id", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--runs", default="0:2,2:1,2:2", help="comma list of worker_count:read_threads"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        split = write_images(root, args.ids, args.images_per_id, 128, 64)
        results = []
        for run in args.runs.split(","):
            workers, threads = (int(x) for x in run.split(":"))
            cfg = TrainPipelineConfig(
                height=256,
                width=128,
                P=16,
                M=4,
                worker_count=workers,
                read_threads=threads,
                prefetch_buffer=max(2, threads),
            )
            results.append(measure(split, cfg, args.epochs))
        # Batches from worker processes live in shared memory that grain releases from a
        # background thread; let it finish before the interpreter exits.
        gc.collect()
        time.sleep(0.5)
    print(
        json.dumps(
            {
                "benchmark": "train_input_pipeline",
                "input": "256x128, flip + pad/crop + normalise + random erasing",
                "dataset": f"{args.ids} ids x {args.images_per_id} JPEGs of 128x64",
                "batch": "P=16 x M=4",
                "cpu_count": os.cpu_count(),
                "runs": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
