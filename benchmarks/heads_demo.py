"""The demo's retrieval heads compared end to end: each variant of configs/default.py trained
with the same seed and epochs, then evaluated without whitening and with the PCA and the
supervised whitening learned from its training-image embeddings.

    python -m benchmarks.heads_demo --data=data/synthetic_reid [--epochs=10]
        [--variants=avg,gem,rmac,cosface,arcface] [--runs=runs/heads]

For each variant V it runs the command lines, one after the other (the commands are in the
JSON, under `commands`):

    python -m ctl_jax.train --config=configs/default.py[:V] --workdir=RUNS/V
        --config.data.root=DATA --config.solver.num_epochs=E --config.train.eval_every_epochs=E
    python -m ctl_jax.embed --workdir=RUNS/V --images=DATA/bounding_box_train
        --output=RUNS/V/train.npz
    python -m ctl_jax.whiten --embeddings=RUNS/V/train.npz --method=pca|supervised --output=...
    python -m ctl_jax.evaluate --workdir=RUNS/V [--whitening=RUNS/V/pca.npz|supervised.npz] ...

A work directory that already holds the finished run is not trained again (delete it to
retrain). `avg` is the demo itself (average pooling, softmax classifier, triplet loss).
Prints one JSON object: per variant and whitening, mAP and rank-1 of the `instance` and
`centroid_camera` modes, and the training wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = ("avg", "max", "gem", "rmac", "cosface", "arcface", "contrastive", "vit", "osnet")
MODES = ("instance", "centroid_camera")
WHITENINGS = ("none", "pca", "supervised")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/synthetic_reid", help="the synthetic set")
    parser.add_argument("--variants", default="avg,gem,rmac,cosface,arcface")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--runs", default="runs/heads", help="parent of the work directories")
    args = parser.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown or not args.variants:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if not (pathlib.Path(args.data) / "bounding_box_train").is_dir():
        parser.error(f"--data={args.data} holds no bounding_box_train/ (python -m ctl_jax.data)")
    return args


def run(command: list[str], log: pathlib.Path) -> float:
    """Runs `python -m ...` in the repository root, output appended to `log`; wall seconds."""
    start = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        done = subprocess.run(
            [sys.executable, *command], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}; see {log}")
    return round(time.perf_counter() - start, 1)


def finished(workdir: pathlib.Path, epochs: int) -> bool:
    """True when the work directory's training log records the last epoch's evaluation."""
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return False
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return any(r.get("kind") == "eval" and r.get("epoch") == epochs for r in records)


def variant_results(args, variant: str) -> dict:
    workdir = pathlib.Path(args.runs) / variant
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir.parent / f"{variant}.log"
    config = "configs/default.py" + ("" if variant == "avg" else f":{variant}")
    data = str(pathlib.Path(args.data))
    train = [
        "-m",
        "ctl_jax.train",
        f"--config={config}",
        f"--workdir={workdir}",
        f"--config.data.root={data}",
        f"--config.solver.num_epochs={args.epochs}",
        f"--config.train.eval_every_epochs={args.epochs}",
    ]
    commands = {"train": " ".join(["python", *train])}
    out = {"config": config}
    if finished(workdir, args.epochs):
        out["train_seconds"] = None  # trained earlier
    else:
        out["train_seconds"] = run(train, log)
    embeddings = workdir / "train.npz"
    embed = [
        "-m",
        "ctl_jax.embed",
        f"--workdir={workdir}",
        f"--images={data}/bounding_box_train",
        f"--output={embeddings}",
        "--overwrite",
        "--noprogress",
    ]
    commands["embed"] = " ".join(["python", *embed])
    run(embed, log)
    metrics = {}
    for whitening in WHITENINGS:
        evaluate = [
            "-m",
            "ctl_jax.evaluate",
            f"--workdir={workdir}",
            f"--modes={','.join(MODES)}",
            "--noverification",
            f"--output={workdir / f'metrics_{whitening}.json'}",
            "--overwrite",
        ]
        if whitening != "none":
            learned = workdir / f"{whitening}.npz"
            whiten = [
                "-m",
                "ctl_jax.whiten",
                f"--embeddings={embeddings}",
                f"--method={whitening}",
                f"--output={learned}",
                "--overwrite",
            ]
            commands[f"whiten_{whitening}"] = " ".join(["python", *whiten])
            run(whiten, log)
            evaluate.append(f"--whitening={learned}")
        commands[f"evaluate_{whitening}"] = " ".join(["python", *evaluate])
        run(evaluate, log)
        results = json.loads((workdir / f"metrics_{whitening}.json").read_text())
        metrics[whitening] = {
            mode: {
                "mAP": round(100 * results[mode]["mAP"], 1),
                "rank1": round(100 * results[mode]["rank1"], 1),
            }
            for mode in MODES
        }
    return {**out, "metrics": metrics, "commands": commands}


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    variants = {v: variant_results(args, v) for v in args.variants}
    print(
        json.dumps(
            {
                "benchmark": "heads_demo",
                "epochs": args.epochs,
                "data": args.data,
                "load_average": [round(x, 2) for x in os.getloadavg()],
                "seconds": round(time.time() - start, 1),
                "variants": variants,
            }
        )
    )


if __name__ == "__main__":
    main()
