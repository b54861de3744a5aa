"""The benchmark scripts: each runs as `python -m benchmarks.X` and as `python benchmarks/X.py`,
none edits `sys.path`, their imports of each other form no cycle, and a step benchmark prints
its JSON record."""

import ast
import json
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
MODULES = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem != "__init__")
# The scripts that import their siblings (the others import only ctl_jax and libraries).
WITH_SIBLINGS = ("compare_torch", "cpu_fast_path_ab", "inference", "profile_step", "train_step")


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
    assert {m for m, deps in graph.items() if deps} == set(WITH_SIBLINGS) | {"tasks"}
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
