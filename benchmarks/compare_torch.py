"""ctl_jax vs the PyTorch reference: training step and embedding throughput, same machine.

    python -m benchmarks.compare_torch                      # the three standard settings
    python -m benchmarks.compare_torch --settings=resnet18_64x32 --rounds=9 --threads=2

For every setting and task (train, inference) this starts two worker processes, one per
framework, pinned to the same `--threads` cores (torch also gets `set_num_threads`). Each
builds its step (ctl_jax compiles; the compile time is measured cold, without the persistent
cache), runs `--warmup` untimed steps, then the parent asks them for one timed step at a time,
alternating A, B, B, A, ... so that both see the same load over the same time window; only one
worker computes at any moment. Medians and minima of the per-step times are reported, and the
1-minute load average before and after each pair (other work on the machine shows up there).

Prints one JSON object: per setting and task, each framework's images/second (median and
best step), seconds per step, each step's seconds and page faults, compile seconds and peak
RSS, and `jax_over_torch`, the ratio of median images/second (> 1: ctl_jax is faster), plus
`jax_over_torch_best` from the minima.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

try:
    from . import common, tasks
except ImportError:  # run as a file: benchmarks/ is on sys.path (see common.py)
    import common
    import tasks

# name -> (arch, height, width, P, M, inference batch).
SETTINGS = {
    "resnet50_128x64": ("resnet50", 128, 64, 8, 4, 128),
    "resnet50_256x128": ("resnet50", 256, 128, 16, 4, 128),
    "resnet18_64x32": ("resnet18", 64, 32, 8, 4, 128),
    "resnet18_256x128": ("resnet18", 256, 128, 16, 4, 128),
    # The fashion recipe's input and batch (configs/street2shop.py: 320x320, P12 x M4).
    "resnet50_320x320": ("resnet50", 320, 320, 12, 4, 64),
    # The other backbones at the re-ID size (docs/backbones.md; no CPU kernels for them).
    "vit_s16_256x128": ("vit_s16", 256, 128, 16, 4, 128),
    "osnet_x1_0_256x128": ("osnet_x1_0", 256, 128, 16, 4, 128),
}
DEFAULT_SETTINGS = "resnet50_128x64,resnet50_256x128,resnet18_64x32"
PROTOCOL = "@@ "  # prefix of the worker's protocol lines on stdout (anything else is ignored)


def worker(argv: list[str]) -> None:
    """Worker process: builds one benchmark, then runs timed steps on request.

    Reads commands from stdin: `run` (one timed step, answers its seconds) and `quit`
    (answers peak RSS and exits).
    """
    _, module, args, _ = tasks.parse_task(argparse.ArgumentParser(), argv, jax_only=False)
    process = common.setup_process(args)
    bench = (module.build_jax if args.framework == "jax" else module.build_torch)(args)
    common.time_steps(bench, 0, args.warmup)

    def say(obj):
        sys.stdout.write(PROTOCOL + json.dumps(obj) + "\n")
        sys.stdout.flush()

    say({"ready": True, "compile_seconds": bench.compile_seconds, **process, **bench.info})
    for line in sys.stdin:
        if line.strip() == "run":
            faults = common.page_faults()
            t0 = time.perf_counter()
            bench.run()
            seconds = time.perf_counter() - t0
            say({"seconds": seconds, "page_faults": common.page_faults() - faults})
        else:
            break
    say({"peak_rss_mb": common.peak_rss_mb()})


def setting_args(name: str, threads: int, warmup: int) -> list[str]:
    """The worker flags every task of setting `name` shares (model, input size, threads,
    warm-up steps)."""
    arch, height, width, *_ = SETTINGS[name]
    return [
        f"--arch={arch}",
        f"--height={height}",
        f"--width={width}",
        f"--threads={threads}",
        f"--warmup={warmup}",
    ]


class Worker:
    """Parent-side handle of one worker process."""

    def __init__(self, task: str, framework: str, args: list[str], tree: str | None = None):
        """`tree`: run the worker from another source tree (its `benchmarks` and `ctl_jax`,
        e.g. an older commit checked out with `git worktree add`); default: this one."""
        # The worker is this script, started the way this process was (see common.py).
        script = ["-m", __spec__.name] if __package__ else [os.path.abspath(__file__)]
        env = None
        if tree:
            script = ["-m", "benchmarks.compare_torch"]
            env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
        cmd = [sys.executable, *script, "--worker", f"--task={task}"]
        cmd += [f"--framework={framework}", *args]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tree, env=env
        )

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL) :])
        raise RuntimeError(f"worker exited with code {self.proc.wait()}")

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> dict:
        result = self.ask("quit")
        self.proc.wait()
        return result


def interleave(workers: dict[str, Worker], rounds: int, pause: float):
    """Times `rounds` steps of each ready worker, alternating A, B, B, A, ... so that all see
    the same load, then closes them. Returns per worker name the steps' seconds, their page
    faults and the worker's peak RSS (MB)."""
    names = list(workers)
    times = {name: [] for name in names}
    faults = {name: [] for name in names}
    try:
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                time.sleep(pause)  # let the other worker's spinning threads go to sleep
                answer = workers[name].ask("run")
                times[name].append(answer["seconds"])
                faults[name].append(answer["page_faults"])
    finally:
        peak = {name: w.close()["peak_rss_mb"] for name, w in workers.items()}
    return times, faults, peak


def compare(
    task: str,
    shared: list[str],
    extra: dict,
    rounds: int,
    pause: float,
    batch: int,
    frameworks: tuple[str, ...] = ("jax", "torch"),
) -> dict:
    """Interleaved timing of one task for `frameworks` (both by default); returns the JSON
    fragment (`jax_over_torch` only when both ran)."""
    import statistics

    load_before = common.loadavg()
    workers, ready = {}, {}
    for framework in frameworks:  # built one at a time: compilation sees no rival
        workers[framework] = Worker(task, framework, shared + extra[framework])
        ready[framework] = workers[framework].read()
    times, faults, peak = interleave(workers, rounds, pause)
    result = {"batch": batch}
    for framework in frameworks:
        t = times[framework]
        result[framework] = {
            "images_per_second": round(batch / statistics.median(t), 2),
            "images_per_second_best": round(batch / min(t), 2),
            "seconds_per_step": round(statistics.median(t), 4),
            "seconds_per_step_min": round(min(t), 4),
            "seconds_all": [round(v, 4) for v in t],
            "page_faults_all": faults[framework],
            "compile_seconds": round(ready[framework]["compile_seconds"], 2),
            "peak_rss_mb": peak[framework],
            "threads": ready[framework]["threads"],
            "tuned_malloc": ready[framework]["tuned_malloc"],
        }
    result["loadavg_before"], result["loadavg_after"] = load_before, common.loadavg()
    if len(frameworks) < 2:
        return result
    result["jax_over_torch"] = round(
        result["jax"]["images_per_second"] / result["torch"]["images_per_second"], 3
    )
    result["jax_over_torch_best"] = round(
        result["jax"]["images_per_second_best"] / result["torch"]["images_per_second_best"], 3
    )
    return result


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        worker(argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help=", ".join(SETTINGS))
    parser.add_argument("--tasks", default="train,inference")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per framework")
    # PyTorch needs a few steps: glibc raises its mmap threshold only after freeing the first
    # large tensors, and until then every activation is page-faulted in afresh (steps of
    # 6-11 s against 0.85 s for ResNet-50 128x64 on this machine).
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per framework")
    parser.add_argument("--threads", type=int, default=0, help="0: all cores")
    parser.add_argument("--dtype", default="float32", help="ctl_jax compute dtype")
    parser.add_argument("--infer_batch", type=int, default=0, help="0: the setting's default")
    parser.add_argument("--pause", type=float, default=0.2, help="seconds idle before a step")
    parser.add_argument("--tune_malloc_jax", type=int, default=1, help="see train_step.py")
    parser.add_argument("--tune_malloc_torch", type=int, default=0)
    args = parser.parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    out = {
        **common.machine_record("compare_torch", threads, args.rounds),
        "dtype_jax": args.dtype,
        "results": [],
    }
    for name in args.settings.split(","):
        arch, height, width, p, m, infer_batch = SETTINGS[name]
        infer_batch = args.infer_batch or infer_batch
        shared = setting_args(name, threads, args.warmup) + [f"--dtype={args.dtype}"]
        entry = {"setting": name, "arch": arch, "height": height, "width": width, "p": p, "m": m}
        for task in args.tasks.split(","):
            if task == "train":
                extra, batch = [f"--p={p}", f"--m={m}"], p * m
            else:
                extra, batch = [f"--batch={infer_batch}"], infer_batch
            per_framework = {
                "jax": [f"--tune_malloc={args.tune_malloc_jax}"],
                "torch": [f"--tune_malloc={args.tune_malloc_torch}"],
            }
            entry[task] = compare(
                task, shared + extra, per_framework, args.rounds, args.pause, batch
            )
            print(json.dumps({"setting": name, "task": task, **entry[task]}), file=sys.stderr)
        out["results"].append(entry)
    out["loadavg_end"] = common.loadavg()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
