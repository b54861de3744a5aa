"""Time to the first result of `python -m ctl_jax.embed` and `search --images` on a few
images, with the persistent compilation cache cold (an empty cache folder) and warm (the same
folder on the next run), each command a fresh process as a user runs it. Prints one JSON
object.

The model is the config's network with random weights saved as a checkpoint (start-up does
not depend on the weights): by default configs/market1501.py (ResNet-50, 256x128), which
compiles for 20-40 s on a 2-core CPU.

  python -m benchmarks.startup [--config=configs/market1501.py] [--images=10] [--repeats=2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_checkpoint(config_path: str, directory: str) -> None:
    """A checkpoint of `config_path`'s model with random weights (step 0)."""
    import jax

    from ctl_jax import configs
    from ctl_jax.build import build_model
    from ctl_jax.checkpoints import CheckpointStore
    from ctl_jax.models.reid import init_variables

    config = configs.load_config(config_path)
    num_classes = 10
    model = build_model(config, num_classes)
    variables = init_variables(model, jax.random.key(0), (config.data.height, config.data.width, 3))
    meta = {"config": json.loads(configs.config_to_json(config)), "num_classes": num_classes}
    store = CheckpointStore(directory)
    store.save(0, dict(variables), {"epoch": 0}, meta)
    store.close()


def make_images(folder: str, count: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        os.makedirs(os.path.join(folder, f"id{i % 3}"), exist_ok=True)
        pixels = rng.integers(0, 255, (160, 80, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"id{i % 3}", f"{i:03d}.jpg"))


def timed(command: list[str], cache: str) -> float:
    """Wall-clock seconds of `python -m ...command` (exit code 0 required)."""
    env = dict(os.environ, CTL_JAX_COMPILATION_CACHE=cache)
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return round(seconds, 2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "market1501.py"))
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2, help="warm runs (fastest reported)")
    parser.add_argument(
        "--throughput_images",
        type=int,
        default=256,
        help="also embed this many more images (warm): images/s of one process from the "
        "difference of the two runs, start-up excluded (0: skip)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        checkpoint, images = os.path.join(folder, "ckpt"), os.path.join(folder, "images")
        make_checkpoint(args.config, checkpoint)
        make_images(images, args.images)
        gallery = os.path.join(folder, "gallery.npz")
        model = [f"--checkpoint={checkpoint}", f"--images={images}", "--noprogress"]
        commands = {
            "embed": ["ctl_jax.embed", *model, f"--output={gallery}", "--overwrite"],
            "search_images": [
                "ctl_jax.search",
                *model,
                f"--gallery={gallery}",
                f"--output={os.path.join(folder, 'results.json')}",
                "--overwrite",
            ],
        }
        record = {}
        for name, command in commands.items():
            cache = os.path.join(folder, f"cache_{name}")  # empty: cold
            cold = timed(command, cache)
            warm = [timed(command, cache) for _ in range(args.repeats)]
            off = timed(command, "off")
            record[name] = {
                "cold_seconds": cold,
                "warm_seconds": min(warm),
                "warm_runs": warm,
                "cache_off_seconds": off,
            }
        if args.throughput_images:
            more = os.path.join(folder, "more")
            make_images(more, args.images + args.throughput_images)
            command = ["ctl_jax.embed", f"--checkpoint={checkpoint}", f"--images={more}"]
            command += ["--noprogress", f"--output={os.path.join(folder, 'more.npz')}"]
            seconds = timed(command, os.path.join(folder, "cache_embed"))
            extra = seconds - record["embed"]["warm_seconds"]
            record["embed_throughput"] = {
                "images": args.images + args.throughput_images,
                "seconds": seconds,
                "images_per_second": round(args.throughput_images / extra, 1),
                "note": f"{args.throughput_images} more than the warm {args.images}-image run",
            }
    record["images"] = args.images
    record["config"] = os.path.relpath(args.config, ROOT)
    record["loadavg_at_end"] = list(os.getloadavg())
    record["cpu_count"] = os.cpu_count()
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
