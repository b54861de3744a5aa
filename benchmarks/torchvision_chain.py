"""The original's training input chain (centroids-reid / reid-strong-baseline), timed.

Runs as a script under any interpreter with torch and torchvision; it imports nothing from
ctl_jax, so `benchmarks.input_pipeline --against=torchvision --torch_python=PATH` can run it
in a separate environment (torchvision from PyPI does not import beside the torch that
ctl_jax pins; docs/performance.md, 'Input pipeline', has the install command).

The chain, written from the original's ``datasets/transforms/build.py``,
``datasets/transforms/random_erasing.py`` and ``datasets/bases.py``: ``pil_loader`` (open,
``convert('RGB')``) -> ``T.Resize((256, 128))`` -> ``T.RandomHorizontalFlip(0.5)`` ->
``T.Pad(10)`` -> ``T.RandomCrop((256, 128))`` -> ``T.ToTensor()`` -> ``T.Normalize`` ->
RandomErasing (its own class: Python ``random``, up to 100 attempts, fill = the ImageNet
mean), batched by a torch ``DataLoader`` (a new iterator, so new workers, every epoch, as
there) whose collate stacks the float tensors.

    python benchmarks/torchvision_chain.py --root DIR --workers 2 --epochs 3

Prints one JSON object: images, wall seconds, CPU seconds of this process and its workers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time


class RandomErasing:
    """The original's random erasing on a normalised (3, H, W) tensor, in place."""

    def __init__(self, probability=0.5, sl=0.02, sh=0.4, r1=0.3, mean=(0.485, 0.456, 0.406)):
        self.probability, self.sl, self.sh, self.r1, self.mean = probability, sl, sh, r1, mean

    def __call__(self, img):
        if random.uniform(0, 1) >= self.probability:
            return img
        height, width = img.size()[1], img.size()[2]
        for _ in range(100):
            target_area = random.uniform(self.sl, self.sh) * height * width
            aspect_ratio = random.uniform(self.r1, 1 / self.r1)
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < width and h < height:
                x1 = random.randint(0, height - h)
                y1 = random.randint(0, width - w)
                for c in range(3):
                    img[c, x1 : x1 + h, y1 : y1 + w] = self.mean[c]
                return img
        return img


def train_transform(height: int, width: int):
    import torchvision.transforms as T

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    return T.Compose(
        [
            T.Resize((height, width)),
            T.RandomHorizontalFlip(p=0.5),
            T.Pad(10),
            T.RandomCrop((height, width)),
            T.ToTensor(),
            T.Normalize(mean=mean, std=std),
            RandomErasing(probability=0.5, mean=mean),
        ]
    )


class ImageFiles:
    """Map-style dataset: the original's ``pil_loader`` then the transform."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        from PIL import Image

        with open(self.paths[index], "rb") as f:
            image = Image.open(f).convert("RGB")
        return self.transform(image), index


def cpu_seconds() -> float:
    """CPU seconds used so far by this process and its child processes (the loader's
    workers): its own and its reaped children's from ``os.times``, plus those of the live
    children from /proc. A difference of two readings is the CPU a run cost on any core."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():  # ppid; then utime, stime in clock ticks
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def measure(paths, workers: int, epochs: int, batch: int, height: int, width: int) -> dict:
    import torch

    # One core for the main process, as one DataLoader worker has (torch sets one thread in
    # its workers): "per core" then means the same thing on both sides.
    torch.set_num_threads(1)
    dataset = ImageFiles(paths, train_transform(height, width))
    batches = [list(range(i, i + batch)) for i in range(0, len(paths) - batch + 1, batch)]
    images = steady_images = 0
    wall = steady = steady_cpu = 0.0
    cpu_start = cpu_seconds()
    for _ in range(epochs):
        start = time.perf_counter()
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers)
        first = None
        for x, _ in loader:
            if first is None:
                first, first_cpu = time.perf_counter(), cpu_seconds()
            else:
                steady_images += x.shape[0]
            images += x.shape[0]
        end, end_cpu = time.perf_counter(), cpu_seconds()
        wall += end - start
        steady += end - first
        steady_cpu += end_cpu - first_cpu
        del loader
    return {
        "images": images,
        "seconds": wall,
        "cpu_seconds": cpu_seconds() - cpu_start,
        "steady_images": steady_images,
        "steady_seconds": steady,
        "steady_cpu_seconds": steady_cpu,
        "versions": {"torch": torch.__version__, "torchvision": _torchvision_version()},
    }


def _torchvision_version() -> str:
    import torchvision

    return torchvision.__version__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="folder of the JPEGs")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    args = parser.parse_args()
    paths = sorted(os.path.join(args.root, n) for n in os.listdir(args.root))
    result = measure(paths, args.workers, args.epochs, args.batch, args.height, args.width)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
