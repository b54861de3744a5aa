"""The benchmark scripts: each runs as `python -m benchmarks.X` and as `python benchmarks/X.py`,
none edits `sys.path`, their imports of each other form no cycle, and a step benchmark prints
its JSON record."""

import ast
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
MODULES = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem != "__init__")
# The scripts that import their siblings (the others import only ctl_jax and libraries).
WITH_SIBLINGS = (
    "compare_torch",
    "compare_trees",
    "cpu_fast_path_ab",
    "export",
    "heads_step",
    "inference",
    "input_pipeline",
    "profile_step",
    "roofline",
    "serve_load",
    "step_memory",
    "train_step",
)


def _siblings_imported(module: str) -> set[str]:
    tree = ast.parse((BENCHMARKS / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module is None:  # from . import x
                names |= {alias.name for alias in node.names}
            elif node.level == 1 or node.module == "benchmarks":  # from .x / benchmarks import
                names.add(node.module or "")
            elif node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names & set(MODULES)


def test_no_script_edits_sys_path_and_imports_form_no_cycle():
    graph = {m: _siblings_imported(m) for m in MODULES}
    assert {m for m, deps in graph.items() if deps} == set(WITH_SIBLINGS) | {
        "tasks",
        "torch_reference",
    }
    edits = re.compile(r"sys\.path\s*(\.\s*(insert|append|extend)|\+?=)")
    for module in MODULES:
        assert not edits.search((BENCHMARKS / f"{module}.py").read_text()), module

    def visit(module, path):
        assert module not in path, f"import cycle: {' -> '.join(path + [module])}"
        for dep in graph[module]:
            visit(dep, path + [module])

    for module in MODULES:
        visit(module, [])


def _run(args, timeout=600):
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("module", WITH_SIBLINGS)
def test_runs_as_module_and_as_file(module):
    for args in (["-m", f"benchmarks.{module}", "--help"], [f"benchmarks/{module}.py", "--help"]):
        result = _run(args)
        assert result.returncode == 0, (args, result.stderr[-2000:])
        assert "usage:" in result.stdout


@pytest.mark.slow
def test_train_step_prints_its_json_record():
    result = _run(
        [
            "benchmarks/train_step.py",
            "--arch=resnet18",
            "--height=32",
            "--width=16",
            "--p=2",
            "--m=2",
            "--steps=1",
            "--warmup=0",
            "--threads=1",
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["benchmark"] == "train_step" and record["batch"] == 4
    assert record["cpu_fast_path"] == "auto" and record["cpu_layers"] is True
    assert record["seconds_per_step"] > 0


@pytest.mark.slow
def test_roofline_prints_peak_and_step_flops():
    """The FLOP side of the roofline on the smallest setting: XLA's count and the convolution
    count agree to within the elementwise work, and a step is about three forward passes."""
    args = ["--settings=resnet18_64x32", "--flops_only=1", "--matmul=256", "--peak_repeats=1"]
    result = _run(["-m", "benchmarks.roofline", *args])
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(result.stdout)
    assert record["peak"]["peak_gflops"] >= record["peak"]["median_peak_gflops"] > 0
    (entry,) = record["results"]
    assert 0.9 < entry["conv_matmul_share_of_xla"] < 1.05
    assert 2.8 < entry["step_over_forward"] < 3.05


@pytest.mark.slow
def test_step_memory_measures_compilation_and_steps_apart(tmp_path):
    """`--measure_steps`: the compiled step's buffer, the RSS after compiling (ahead of the
    state), after creating the state, and the steps' own peak, which holds the buffer on top
    of what was resident before them. Run twice with a compilation cache, the second run reads
    the step instead of compiling it, and its compilation phase peaks lower."""
    args = ["--setting=resnet18_64x32", "--measure_steps=1", "--threads=1"]
    cache = f"--compilation_cache={tmp_path / 'cache'}"
    runs = []
    for _ in range(2):
        result = _run(["-m", "benchmarks.step_memory", *args, cache])
        assert result.returncode == 0, result.stderr[-2000:]
        runs.append(json.loads(result.stdout)["measured"])
    for measured in runs:
        assert (measured["p"], measured["m"]) == (8, 4) and measured["temp_mb"] > 0
        assert measured["peak_rss_through_compile_mb"] >= measured["rss_after_compile_mb"]
        assert measured["peak_rss_through_init_mb"] >= measured["rss_after_init_mb"]
        # The state is created after the compilation: resident memory grows by it.
        assert measured["rss_after_init_mb"] > measured["rss_after_compile_mb"]
        if measured["peak_reset"]:
            assert measured["step_peak_rss_mb"] >= measured["rss_after_steps_mb"]
            assert measured["step_peak_rss_mb"] > measured["rss_after_init_mb"]
    first, second = runs
    assert second["compile_seconds"] < first["compile_seconds"]
    assert second["peak_rss_through_compile_mb"] < first["peak_rss_through_compile_mb"]


def _loop_multiply_adds(n, h, w, cin, cout, k, stride, pad):
    """Multiply-adds of a k x k convolution that meet an input pixel (not padding), counted
    one output position and tap at a time."""
    out_h, out_w = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    taps = 0
    for oy in range(out_h):
        for ox in range(out_w):
            for ky in range(k):
                for kx in range(k):
                    y, x = oy * stride - pad + ky, ox * stride - pad + kx
                    taps += 0 <= y < h and 0 <= x < w
    return n * cin * cout * taps


@pytest.mark.parametrize(
    "h, w, k, stride, pad", [(7, 5, 3, 1, 1), (8, 6, 3, 2, 1), (9, 4, 1, 2, 0), (11, 9, 7, 2, 3)]
)
def test_roofline_counts_convolution_flops_like_a_loop(h, w, k, stride, pad):
    """benchmarks/roofline.py's FLOP count of a convolution, forward and backward (input and
    kernel gradients: each forward multiply-add has one in each), against a loop count."""
    import jax
    import jax.numpy as jnp

    from benchmarks.roofline import jaxpr_matmul_flops

    n, cin, cout = 2, 3, 4
    x = jnp.ones((n, h, w, cin))
    kernel = jnp.ones((k, k, cin, cout))

    def conv(x, kernel):
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            (stride, stride),
            [(pad, pad)] * 2,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )

    expected = 2 * _loop_multiply_adds(n, h, w, cin, cout, k, stride, pad)
    assert jaxpr_matmul_flops(jax.make_jaxpr(conv)(x, kernel)) == expected
    step = jax.grad(lambda x, kernel: jnp.sum(conv(x, kernel) ** 2), argnums=(0, 1))
    assert jaxpr_matmul_flops(jax.make_jaxpr(step)(x, kernel)) == 3 * expected
    dense = jax.make_jaxpr(lambda a, b: a @ b)(jnp.ones((5, 6)), jnp.ones((6, 7)))
    assert jaxpr_matmul_flops(dense) == 2 * 5 * 6 * 7


def test_profile_step_counts_the_products_of_the_compiled_program():
    """`product_flops` reads the optimised HLO: a plain product, a product contracting the
    rows of both operands (a kernel gradient's form), a batched product and a 3x3 convolution,
    against their multiply-adds counted by hand."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from benchmarks import profile_step

    def f(a, b, c, x, k):
        plain = a @ b  # (24, 40) @ (40, 16)
        transposed = a.T @ c  # (40, 24) @ (24, 8): contracts axis 0 of both
        batched = jnp.einsum("bij,bjk->bik", x[..., :6].reshape(2, 30, 6), b[:6, :5][None] * 1.0)
        y = lax.conv_general_dilated(
            x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return plain.sum() + transposed.sum() + batched.sum() + y.sum()

    shapes = [(24, 40), (40, 16), (24, 8), (2, 5, 6, 7), (3, 3, 7, 9)]
    args = [jnp.ones(s, jnp.float32) for s in shapes]
    text = jax.jit(f).lower(*args).compile().as_text()
    counted = profile_step.product_flops(text)
    by_hand = 2 * (24 * 40 * 16 + 40 * 24 * 8 + 2 * 30 * 6 * 5 + 2 * 5 * 6 * 9 * 3 * 3 * 7)
    assert sum(counted.values()) == by_hand
    entry = text[text.index("ENTRY") :]
    assert all(f"%{name} = " in entry for name in counted)  # entry ops: the profiler's names


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux /proc only")
def test_worker_peak_rss_is_its_own():
    """A worker started by a process holding much memory reports its own peak, not the
    parent's at the fork (which `getrusage`'s ru_maxrss carries over across exec)."""
    held = np.ones(2**26)  # 512 MiB, touched
    code = "from benchmarks import common; print(common.peak_rss_mb())"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout) < 256, (float(result.stdout), held.nbytes >> 20)


def test_pass_through_options_are_not_abbreviations_of_own_ones():
    """`--p` / `--m` (the step's P x M) go to the step, never to an option of the wrapping
    benchmark that starts the same (`--pause`, `--measure_steps`): argparse's prefix
    matching once turned `compare_trees --p=16` into a 16 s pause at P = 8."""
    import argparse

    from benchmarks import compare_trees, tasks

    own, workers = compare_trees.parse_args(["--trees=a,b", "--p=16", "--m=2"])
    assert own.pause == 0.5 and workers == ["--p=16", "--m=2"]
    parser = argparse.ArgumentParser()
    parser.add_argument("--measure_steps", type=int, default=0)
    parser.add_argument("--pause", type=float, default=0.0)
    own, _, step_args, _ = tasks.parse_task(parser, ["--m=2", "--p=3"])
    assert (own.measure_steps, own.pause, step_args.m, step_args.p) == (0, 0.0, 2, 3)


def _input_pipeline(*args):
    result = _run(
        ["-m", "benchmarks.input_pipeline", "--ids=16", "--images_per_id=4", "--rounds=1"]
        + list(args)
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def test_input_pipeline_prints_its_json_record():
    """A handful of images, in this process and with a worker process (not timed)."""
    record = _input_pipeline("--epochs=2", "--workers=0,1")
    assert record["cpu"] and record["cpu_count"] >= 1
    assert [(r["pipeline"], r["workers"], r["cores"]) for r in record["results"]] == [
        ("ctl_jax", 0, 1),
        ("ctl_jax", 1, 1),
    ]
    for result in record["results"]:
        assert result["images_per_s"] > 0 and result["images_per_cpu_second"] > 0
        # One iterator over both epochs: every batch after its first one is steady.
        assert result["steady_images_per_second_per_core"] > 0
    assert "ctl_jax_over_torchvision" not in record


def test_input_pipeline_against_torchvision():
    """The original's chain beside ours, when this interpreter has torchvision (else the
    benchmark takes another one with --torch_python)."""
    pytest.importorskip("torchvision")
    record = _input_pipeline("--epochs=1", "--workers=0", "--against=torchvision")
    assert [r["pipeline"] for r in record["results"]] == ["ctl_jax", "torchvision"]
    assert record["ctl_jax_over_torchvision"]["workers=0"]["images_per_second_per_core"] > 0


def test_input_pipeline_names_a_bad_torch_python(tmp_path):
    result = _run(
        ["-m", "benchmarks.input_pipeline", "--ids=16", "--images_per_id=4", "--rounds=1"]
        + ["--epochs=1", "--workers=0", "--against=torchvision", "--torch_python=/bin/false"]
    )
    assert result.returncode == 1
    assert "torchvision chain failed under /bin/false" in result.stderr
    assert "Traceback" not in result.stderr
