"""How much memory the training step needs, and the largest P x M that fits a memory budget.

    python -m benchmarks.step_memory --setting=resnet50_256x128 --m=2,4
    python -m benchmarks.step_memory --setting=resnet50_320x320 --budget_gb=16

XLA's CPU runtime allocates one buffer for all of a step's temporaries when the step is
dispatched, so the step's memory is known after compilation, before anything runs:
`compiled.memory_analysis()` gives the temporary buffer and the arguments (train state and
batch). For each M (P fixed by the setting) this compiles the step as training runs it and
records those sizes and the process's resident memory before the first step was compiled
(Python, the libraries, the train state: `base`). The temporary buffer grows linearly with the
batch; a least-squares line through the measured points gives, for `--budget_gb`, the largest batch
whose estimated peak, base + temporary buffer, stays inside it, and that batch as P x M with
the setting's M. Estimates, not measured peaks.

    python -m benchmarks.step_memory --setting=resnet50_128x64 --measure_steps=5

measures instead, in this fresh process, the resident memory of training at the setting's
P x M as the command lines run it (allocator settings, synchronous dispatch, the step
compiled before the train state exists): the peak through compiling the step, the peak
through creating the state (its initialiser is compiled too), the resident memory after
each, and the peak over `--measure_steps` steps (Linux: the peak is reset through
/proc/self/clear_refs before the steps). The process's overall peak (what
`compare_torch.py` reports as peak RSS) is the largest of the three. With
`--compilation_cache=DIR`, run twice, the second run reads both programs from the cache, as
a repeated or resumed training does. Memory sizes and resident memory do not depend on the
machine's load; no timings are taken.
"""

from __future__ import annotations

import argparse
import json
import resource

import numpy as np

try:
    from . import common, compare_torch, train_step
except ImportError:  # run as a file: benchmarks/ is on sys.path (see common.py)
    import common
    import compare_torch
    import train_step


def current_rss_mb() -> float:
    """Resident memory of this process now (Linux /proc), in MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _step_args(arch, height, width, p, m, layer_options):
    """`train_step`'s arguments for the setting, with `layer_options` (its `--cpu_*` flags)."""
    argv = [f"--arch={arch}", f"--height={height}", f"--width={width}", f"--p={p}", f"--m={m}"]
    return train_step.parse_args(argv + list(layer_options))


def measure(arch: str, height: int, width: int, p: int, m: int, layer_options=()) -> dict:
    """XLA's buffer sizes for one compiled training step, in MiB."""
    args = _step_args(arch, height, width, p, m, layer_options)
    step, state, batch, _ = train_step.make_jax_step(args)
    base = current_rss_mb()
    analysis = step.lower(state, batch).compile().memory_analysis()
    return {
        "p": p,
        "m": m,
        "batch": p * m,
        "temp_mb": round(analysis.temp_size_in_bytes / 2**20, 1),
        "argument_mb": round(analysis.argument_size_in_bytes / 2**20, 1),
        "base_rss_mb": round(base, 1),
    }


def _reset_peak_rss() -> bool:
    """Resets this process's peak RSS (VmHWM) to its current RSS; False if Linux refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_rss(
    arch: str,
    height: int,
    width: int,
    p: int,
    m: int,
    layer_options,
    steps: int,
    compilation_cache: str = "",
):
    """Measured resident memory (MiB) of compiling the step, creating the train state and
    running `steps` training steps, in the training loop's order (the step is compiled ahead
    of the state, `ctl_jax.training.ahead`)."""
    import jax

    args = _step_args(arch, height, width, p, m, layer_options)
    if compilation_cache:  # as the command lines run: a second run reads the cache
        jax.config.update("jax_compilation_cache_dir", compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    else:  # compile here, as a first run
        jax.config.update("jax_enable_compilation_cache", False)
    compiled, make_state, batch, _, seconds = train_step.make_compiled_jax_step(args)
    out = {
        "p": p,
        "m": m,
        "temp_mb": round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1),
        "compile_seconds": round(seconds, 1),
        "peak_rss_through_compile_mb": common.status_mb("VmHWM"),
        "rss_after_compile_mb": common.status_mb("VmRSS"),
    }
    state = make_state()
    out["peak_rss_through_init_mb"] = common.status_mb("VmHWM")
    out["rss_after_init_mb"] = common.status_mb("VmRSS")
    out["peak_reset"] = _reset_peak_rss()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
    key = "step_peak_rss_mb" if out["peak_reset"] else "peak_rss_mb"
    out[key] = common.status_mb("VmHWM")
    out["rss_after_steps_mb"] = common.status_mb("VmRSS")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--setting", default="resnet50_256x128", help=", ".join(compare_torch.SETTINGS)
    )
    parser.add_argument("--m", default="2,4", help="instances per identity to compile at")
    parser.add_argument("--budget_gb", type=float, default=16.0)
    parser.add_argument("--cpu_fast_path", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--cpu_winograd_tile", type=int, choices=(2, 4), default=4)
    parser.add_argument("--threads", type=int, default=0, help="0: all cores")
    parser.add_argument(
        "--compilation_cache",
        default="",
        help="with --measure_steps: use this persistent compilation cache directory (run twice: "
        "the second run reads the step from it, as a resumed or repeated training does); "
        "default: none, a first run's compilation",
    )
    parser.add_argument(
        "--measure_steps",
        type=int,
        default=0,
        help="> 0: measure resident memory over this many steps at the setting's P x M instead",
    )
    args = parser.parse_args(argv)
    if args.setting not in compare_torch.SETTINGS:
        parser.error(
            f"--setting: unknown {args.setting!r}; expected one of {list(compare_torch.SETTINGS)}"
        )
    common.pin_threads(args.threads)
    from ctl_jax.cpu import configure_process

    configure_process()  # allocator settings and synchronous dispatch, as the command lines
    arch, height, width, p, setting_m, _ = compare_torch.SETTINGS[args.setting]
    layer_options = [
        f"--cpu_fast_path={args.cpu_fast_path}",
        f"--cpu_winograd_tile={args.cpu_winograd_tile}",
    ]
    layers_record = {
        "cpu_fast_path": args.cpu_fast_path,
        "cpu_winograd_tile": args.cpu_winograd_tile,
    }
    if args.measure_steps > 0:
        measured = measure_rss(
            arch,
            height,
            width,
            p,
            setting_m,
            layer_options,
            args.measure_steps,
            args.compilation_cache,
        )
        record = {"benchmark": "step_memory", "setting": args.setting, "steps": args.measure_steps}
        record |= layers_record | {"loadavg": common.loadavg()}
        print(json.dumps(record | {"measured": measured}, indent=1))
        return
    points = [measure(arch, height, width, p, int(m), layer_options) for m in args.m.split(",")]
    out = {
        "benchmark": "step_memory",
        "setting": args.setting,
        **layers_record,
        "loadavg": common.loadavg(),
        "points": points,
    }
    if len({pt["batch"] for pt in points}) >= 2:
        batch = np.array([pt["batch"] for pt in points], float)
        temp = np.array([pt["temp_mb"] for pt in points], float)
        per_image, fixed = np.polyfit(batch, temp, 1)
        # The first point's: later points' base holds what the earlier compilations left.
        base = points[0]["base_rss_mb"]
        budget = args.budget_gb * 1024
        largest = int((budget - base - fixed) // per_image)
        out["temp_mb_per_image"] = round(per_image, 2)
        out["temp_mb_fixed"] = round(fixed, 1)
        out["estimated_peak_mb_at_setting"] = round(base + fixed + per_image * p * setting_m, 1)
        out["budget_gb"] = args.budget_gb
        out["largest_batch_in_budget"] = largest
        out["largest_p_x_m_in_budget"] = f"{largest // setting_m}x{setting_m}"
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
