"""Training input pipeline throughput (images/second) at 256 x 128 with all augmentations.

Writes Market-size JPEGs to a temporary directory (by default as many as Market-1501's
training set: 751 identities x 17 images of 128 x 64, quality 90; 12,767 images) and times
ctl_jax's `make_train_iterator` (P=16, M=4) for each worker count: 0 (in this process), 1
and 2 grain worker processes, ``--read_threads`` threads each (default 1), with one iterator
for all ``--epochs`` (default 1) as the training loop runs it. A run of one such epoch pays
each side's worker start-up once: the original starts its workers every epoch, ctl_jax once
per run, so over a real run of many epochs ours is the cheaper of the two.

With ``--against=torchvision`` the original's chain (`benchmarks/torchvision_chain.py`:
PIL, torchvision transforms, its own random erasing, a torch ``DataLoader`` with the same
worker counts and, as in the original, a new iterator and new workers every epoch) is timed
on the same files, the two interleaved (ours, theirs, ours, theirs ...) for ``--rounds``
rounds so that a load change on a shared machine hits both; the medians of the rounds are
reported, and the ratios are medians of per-round ratios.

What each side does on the host: ctl_jax decodes, resizes, flips and pads + crops to uint8
and draws the erasing rectangle; normalising and the erasing fill run on the device inside
the training step (`ctl_jax.data.on_device`). The original does all of it on the host in
float32.

Fields: ``images_per_s`` (wall clock, everything: worker start-up included), ``cores`` (the
cores the run is given: its worker processes, or 1 in-process, times ctl_jax's
``read_threads``), ``images_per_second_per_core`` (images_per_s / cores),
``images_per_cpu_second`` (images per CPU second used by the process and its workers,
measured: on a loaded machine the figure that moves least); the ``steady_`` fields leave
out each iterator's first batch (worker start-up, filling the buffers).

    python -m benchmarks.input_pipeline [--against=torchvision --torch_python=PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from ctl_jax.data.image_io import FileImageReader
from ctl_jax.data.pipeline import TrainPipelineConfig, make_train_iterator
from ctl_jax.data.records import Split

try:
    from . import torchvision_chain
except ImportError:  # run as a file: benchmarks/ is on sys.path
    import torchvision_chain

BATCH = 64  # P=16 x M=4
RATIO_KEYS = (
    "images_per_second_per_core",
    "images_per_cpu_second",
    "steady_images_per_second_per_core",
    "steady_images_per_cpu_second",
)


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


def cpu_model() -> str:
    """The CPU's model string from /proc/cpuinfo, with AVX-512 when the CPU has it."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return "unknown"
    model = next(
        (line.split(":", 1)[1].strip() for line in text.splitlines() if "model name" in line),
        "unknown",
    )
    return model + (", AVX-512" if " avx512f" in text else "")


def measure_ctl_jax(split: Split, workers: int, threads: int, epochs: int) -> dict:
    """Images, wall and CPU seconds of `epochs` epochs of the training pipeline."""
    reader = FileImageReader(split.paths)
    cfg = TrainPipelineConfig(
        height=256,
        width=128,
        P=16,
        M=4,
        worker_count=workers,
        read_threads=threads,
        prefetch_buffer=2,
    )
    images = steady_images = 0
    cpu_start = torchvision_chain.cpu_seconds()
    start = time.perf_counter()
    first = batch = None
    # One iterator for all epochs, as the training loop runs them: workers start once.
    iterator = make_train_iterator(split, reader, cfg, 0, epochs=epochs)
    for batch in iterator:
        if first is None:
            first, first_cpu = time.perf_counter(), torchvision_chain.cpu_seconds()
        else:
            steady_images += int(batch["valid"].size)
        images += int(batch["valid"].size)
    end, end_cpu = time.perf_counter(), torchvision_chain.cpu_seconds()
    iterator.close()
    # grain unlinks a batch's shared memory when the batch is freed: free the last one (and
    # the iterator, which holds it) now, not at exit after the resource tracker's check.
    del batch, iterator
    gc.collect()
    return {
        "images": images,
        "seconds": end - start,
        "cpu_seconds": end_cpu - cpu_start,
        "steady_images": steady_images,
        "steady_seconds": end - first,
        "steady_cpu_seconds": end_cpu - first_cpu,
    }


def measure_torchvision(python: str, root: str, workers: int, epochs: int) -> dict:
    """`measure_ctl_jax` for the original's chain, run by ``python`` in a subprocess."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchvision_chain.py")
    command = [python, script, "--root", root, "--workers", str(workers)]
    command += ["--epochs", str(epochs), "--batch", str(BATCH)]
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    except OSError as e:
        raise SystemExit(f"error: --torch_python={python!r} cannot be run: {e}") from None
    if done.returncode:
        lines = done.stderr.strip().splitlines() or ["no output"]
        raise SystemExit(f"error: the torchvision chain failed under {python}: {lines[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def rates(run: dict, cores: int) -> dict:
    """Throughput fields of one run (see the module docstring); the steady ones are None
    when every iterator yielded a single batch."""
    per_s = run["images"] / run["seconds"]
    out = {
        "images_per_s": per_s,
        "images_per_second_per_core": per_s / cores,
        "images_per_cpu_second": run["images"] / run["cpu_seconds"],
    }
    steady = run["steady_images"] / run["steady_seconds"] if run["steady_images"] else None
    out["steady_images_per_s"] = steady
    out["steady_images_per_second_per_core"] = steady and steady / cores
    out["steady_images_per_cpu_second"] = (
        run["steady_images"] / run["steady_cpu_seconds"] if steady else None
    )
    return out


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(name: str, workers: int, runs: list[dict], threads: int = 1) -> dict:
    """Medians over the rounds of one pipeline and worker count."""
    cores = max(1, workers) * threads
    each = [rates(run, cores) for run in runs]
    out = {"pipeline": name, "workers": workers, "cores": cores, "rounds": len(runs)}
    for key in each[0]:
        value = _median(r[key] for r in each)
        out[key] = None if value is None else round(value, 1)
    out["images_per_s_each_round"] = [round(r["images_per_s"], 1) for r in each]
    return out


def per_round_ratio(
    ours: list[dict], theirs: list[dict], key: str, cores: int, threads: int = 1
) -> float | None:
    """Median over the rounds of ours / theirs of one field (None without values); ours
    runs ``threads`` threads in each of its ``cores`` processes, theirs one."""
    pairs = [(rates(a, cores * threads)[key], rates(b, cores)[key]) for a, b in zip(ours, theirs)]
    value = _median(a / b if a and b else None for a, b in pairs)
    return None if value is None else round(value, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=751)
    parser.add_argument("--images_per_id", type=int, default=17)
    parser.add_argument("--epochs", type=int, default=1, help="epochs per timed run")
    parser.add_argument(
        "--read_threads", type=int, default=1, help="ctl_jax's threads in each process"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--workers", default="0,1,2", help="comma list of worker counts")
    parser.add_argument("--against", choices=("none", "torchvision"), default="none")
    parser.add_argument(
        "--torch_python",
        default=sys.executable,
        help="interpreter with torch and torchvision for --against=torchvision",
    )
    args = parser.parse_args()
    try:
        worker_counts = [int(w) for w in args.workers.split(",")]
    except ValueError:
        parser.error(f"--workers={args.workers!r}: expected a comma list of integers")
    if min(worker_counts) < 0 or min(args.rounds, args.epochs, args.read_threads) < 1:
        parser.error("--workers must be >= 0, --rounds, --epochs and --read_threads >= 1")
    threads = args.read_threads
    against = args.against == "torchvision"
    load_start = [round(v, 2) for v in os.getloadavg()]
    ours = {w: [] for w in worker_counts}
    theirs = {w: [] for w in worker_counts}
    with tempfile.TemporaryDirectory() as root:
        split = write_images(root, args.ids, args.images_per_id, 128, 64)
        versions = None
        for _ in range(args.rounds):
            for workers in worker_counts:
                ours[workers].append(measure_ctl_jax(split, workers, threads, args.epochs))
                if against:
                    run = measure_torchvision(args.torch_python, root, workers, args.epochs)
                    versions = run.pop("versions")
                    theirs[workers].append(run)
    record = {
        "benchmark": "train_input_pipeline",
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": load_start,
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "input": "256x128: resize, flip, pad 10 + random crop, normalise, random erasing",
        "dataset": f"{args.ids} ids x {args.images_per_id} JPEGs of 128x64, quality 90",
        "batch": f"P=16 x M=4 = {BATCH}",
        "epochs_per_run": args.epochs,
        "ctl_jax_read_threads": threads,
        "ctl_jax_host_output": "uint8 + erasing rectangles (normalised and erased on device)",
        "results": [summarise("ctl_jax", w, ours[w], threads) for w in worker_counts],
    }
    if against:
        record["torchvision_versions"] = versions
        record["results"] += [summarise("torchvision", w, theirs[w]) for w in worker_counts]
        record["ctl_jax_over_torchvision"] = {
            f"workers={w}": {
                key: per_round_ratio(ours[w], theirs[w], key, max(1, w), threads)
                for key in RATIO_KEYS
            }
            for w in worker_counts
        }
    if 1 in worker_counts and 2 in worker_counts:
        sides = {"ctl_jax": ours, "torchvision": theirs} if against else {"ctl_jax": ours}
        record["two_workers_over_one"] = {
            name: {
                key: per_round_ratio(runs[2], runs[1], key, 1)
                for key in ("images_per_s", "steady_images_per_s")
            }
            for name, runs in sides.items()
        }
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
