"""How close to the machine's limit a training step runs: FLOPs, measured peak, fraction.

    python -m benchmarks.roofline                                # the standard settings
    python -m benchmarks.roofline --settings=resnet50_128x64 --rounds=6 --skip_torch=1

Three measurements, one JSON object:

1. **Peak.** The float32 matmul rate of this machine with the benchmark's threads: a
   `--matmul`-sized square product through NumPy's BLAS and through XLA (jitted `jnp.dot`),
   best of `--peak_repeats`; the better of the two is the peak (`median_peak_gflops`: the
   median run instead of the best). Measured again after each setting's timed steps
   (`peak_after`, and `fraction_of_peak_after` against it): on a shared virtual machine the
   peak drifts between the start and the end of a run.
2. **FLOPs per training step**, counted on the *reference* step (`cpu_fast_path='off'`: the
   plain convolutions, so the CPU fast path's Winograd savings count as speed, not as less
   work): XLA's cost analysis of the lowered step (`Lowered.cost_analysis()["flops"]`), and,
   as a cross-check, a count of the multiply-adds of every convolution and matrix product in
   the step's jaxpr (forward and backward; `jaxpr_matmul_flops`). The two differ by the
   elementwise work (batch norm, ReLU, losses, optimizer) that only the first counts.
3. **Achieved rate.** Each framework's median seconds per step from `compare_torch`'s
   interleaved timing (separate processes, same threads, A/B/B/A), with the ctl_jax step as
   training runs it (`cpu_fast_path='auto'`). `fraction_of_peak` = XLA's FLOP count /
   seconds / peak, for ctl_jax and for the PyTorch reference (same FLOP count: same network,
   same losses). Peak RSS of each worker comes along from `compare_torch`.

The 1-minute load average is recorded at the start and around every timing: other work on
the machine lowers every fraction, so read them together.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

try:
    from . import common, compare_torch
except ImportError:  # run as a file: benchmarks/ is on sys.path (see common.py)
    import common
    import compare_torch

SETTINGS = compare_torch.SETTINGS
DEFAULT_SETTINGS = "resnet50_128x64,resnet50_256x128,resnet18_64x32"


def matmul_peak(size: int, repeats: int) -> dict:
    """GFLOP/s of a (size x size) @ (size x size) float32 product, NumPy and XLA, best run."""
    import jax
    import jax.numpy as jnp

    flops = 2.0 * size**3
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)

    def rates(fn) -> tuple[float, float]:
        fn()  # warm-up (XLA: compilation; BLAS: thread start-up)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return flops / min(times) / 1e9, flops / float(np.median(times)) / 1e9

    numpy_best, numpy_median = rates(lambda: np.dot(a, b))
    dot = jax.jit(jnp.dot)
    ja, jb = jax.device_put(a), jax.device_put(b)
    xla_best, xla_median = rates(lambda: dot(ja, jb).block_until_ready())
    return {
        "matmul_size": size,
        "numpy_gflops": round(numpy_best, 1),
        "xla_gflops": round(xla_best, 1),
        "peak_gflops": round(max(numpy_best, xla_best), 1),
        # The median run of the better library: on a shared or turbo-boosting machine the
        # best run can be a burst the minutes of timed steps do not see.
        "median_peak_gflops": round(max(numpy_median, xla_median), 1),
    }


def _valid_taps(
    size: int,
    out_size: int,
    kernel: int,
    stride: int,
    pad_lo: int,
    lhs_dilation: int,
    rhs_dilation: int,
) -> int:
    """Over one spatial dimension: the (output position, kernel tap) pairs that land on an
    input element, not on padding nor on a zero inserted by input dilation."""
    o = np.arange(out_size)[:, None]
    k = np.arange(kernel)[None, :]
    i = o * stride - pad_lo + k * rhs_dilation  # position in the dilated, unpadded input
    valid = (i >= 0) & (i <= (size - 1) * lhs_dilation) & (i % lhs_dilation == 0)
    return int(valid.sum())


def _conv_flops(eqn) -> float:
    """2 x multiply-adds of one `conv_general_dilated`, counting only the kernel taps that
    meet an input element: taps on padding, and on the zeros that input dilation inserts (the
    transposed convolution of a strided layer's input gradient), are multiplications by zero
    that no implementation does. Spatial dimensions are independent, so the count is the
    product of per-dimension counts, times batch, output features and input features per
    group."""
    lhs, rhs, out = eqn.invars[0].aval, eqn.invars[1].aval, eqn.outvars[0].aval
    dn = eqn.params["dimension_numbers"]  # specs: (batch/feature dims, spatial...)
    p = eqn.params
    taps = 1
    for j in range(len(dn.rhs_spec) - 2):
        taps *= _valid_taps(
            lhs.shape[dn.lhs_spec[2 + j]],
            out.shape[dn.out_spec[2 + j]],
            rhs.shape[dn.rhs_spec[2 + j]],
            p["window_strides"][j],
            p["padding"][j][0],
            p["lhs_dilation"][j],
            p["rhs_dilation"][j],
        )
    batch, features = out.shape[dn.out_spec[0]], out.shape[dn.out_spec[1]]
    return 2.0 * batch * features * rhs.shape[dn.rhs_spec[1]] * taps


def _dot_flops(eqn) -> float:
    """2 x multiply-adds of one `dot_general`: output elements x contracted size."""
    lhs, out = eqn.invars[0].aval, eqn.outvars[0].aval
    (contract, _), _ = eqn.params["dimension_numbers"]
    return 2.0 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in contract)


def jaxpr_matmul_flops(jaxpr) -> float:
    """FLOPs of the convolutions and matrix products in a (closed) jaxpr, sub-jaxprs included
    (jit, custom VJP, remat, control flow bodies counted once)."""
    from jax.extend import core as jcore

    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "dot_general":
            total += _dot_flops(eqn)
        for sub in jcore.jaxprs_in_params(eqn.params):
            total += jaxpr_matmul_flops(sub)
    return total


def step_flops(arch: str, height: int, width: int, p: int, m: int) -> dict:
    """FLOPs of one reference training step and one forward pass (in train mode)."""
    import jax

    argv = [f"--arch={arch}", f"--height={height}", f"--width={width}", f"--p={p}", f"--m={m}"]
    argv += ["--cpu_fast_path=off"]
    args = compare_torch.tasks.train_step.parse_args(argv)
    step, state, batch, model = compare_torch.tasks.train_step.make_jax_step(args)
    xla = step.lower(state, batch).cost_analysis()["flops"]
    count = jaxpr_matmul_flops(jax.make_jaxpr(step)(state, batch))

    def forward(params, batch_stats, images):
        variables = {"params": params, "batch_stats": batch_stats}
        return model.apply(variables, images, train=True, mutable=["batch_stats"])

    forward_jaxpr = jax.make_jaxpr(forward)(state.params, state.batch_stats, batch["images"])
    forward_count = jaxpr_matmul_flops(forward_jaxpr)
    return {
        "step_gflop_xla": round(xla / 1e9, 2),
        "step_gflop_conv_matmul": round(count / 1e9, 2),
        "forward_gflop_conv_matmul": round(forward_count / 1e9, 2),
        "step_over_forward": round(count / forward_count, 3),
        "conv_matmul_share_of_xla": round(count / xla, 3),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help=", ".join(SETTINGS))
    parser.add_argument("--rounds", type=int, default=6, help="timed steps per framework")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="0: all cores")
    parser.add_argument("--matmul", type=int, default=4096, help="peak: square matmul size")
    parser.add_argument("--peak_repeats", type=int, default=5)
    parser.add_argument("--skip_torch", type=int, default=0, help="1: time ctl_jax only")
    parser.add_argument("--flops_only", type=int, default=0, help="1: peak and FLOPs, no timing")
    args = parser.parse_args(argv)
    threads = common.pin_threads(args.threads)
    out = {
        **common.machine_record("roofline", threads, args.rounds),
        "peak": matmul_peak(args.matmul, args.peak_repeats),
        "results": [],
    }
    peak = out["peak"]["peak_gflops"]
    print(json.dumps({"peak": out["peak"]}), file=sys.stderr)
    for name in args.settings.split(","):
        if name not in SETTINGS:
            parser.error(f"--settings: unknown setting {name!r}; expected some of {list(SETTINGS)}")
        arch, height, width, p, m, _ = SETTINGS[name]
        entry = {"setting": name, "arch": arch, "height": height, "width": width, "p": p, "m": m}
        entry.update(step_flops(arch, height, width, p, m))
        if not args.flops_only:
            shared = compare_torch.setting_args(name, threads, args.warmup)
            shared += [f"--p={p}", f"--m={m}"]
            frameworks = ("jax",) if args.skip_torch else ("jax", "torch")
            timing = compare_torch.compare(
                "train",
                shared,
                {"jax": ["--tune_malloc=1"], "torch": ["--tune_malloc=0"]},
                args.rounds,
                0.2,
                p * m,
                frameworks=frameworks,
            )
            gflop = entry["step_gflop_xla"]
            # The peak again, right after this setting's steps: the machine's state then.
            entry["peak_after"] = matmul_peak(args.matmul, args.peak_repeats)
            after = entry["peak_after"]["peak_gflops"]
            for framework in frameworks:
                seconds = timing[framework]["seconds_per_step"]
                timing[framework]["gflops"] = round(gflop / seconds, 1)
                timing[framework]["fraction_of_peak"] = round(gflop / seconds / peak, 3)
                best = gflop / timing[framework]["seconds_per_step_min"]
                timing[framework]["fraction_of_peak_best"] = round(best / peak, 3)
                timing[framework]["fraction_of_peak_after"] = round(gflop / seconds / after, 3)
            entry["train"] = timing
        print(json.dumps(entry), file=sys.stderr)
        out["results"].append(entry)
    out["loadavg_end"] = common.loadavg()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
