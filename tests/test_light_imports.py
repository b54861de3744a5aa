"""Commands and APIs that work on embedding arrays never import the model stack: evaluate,
search, whiten and merge on .npz files, `import ctl_jax.evaluation` and `ctl_jax.Index` (JAX, Flax,
Orbax, grain and TFDS are ~1 s of start-up, more than evaluating Market-1501 takes)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from ctl_jax.retrieval.embedding_file import Embeddings

REPO = pathlib.Path(__file__).resolve().parents[1]
HEAVY = ("jax", "jaxlib", "flax", "orbax", "grain", "tensorflow_datasets", "tensorflow")


def imported_heavy(args) -> tuple[set, subprocess.CompletedProcess]:
    """Runs `python -X importtime args` from the repository root; the heavy top-level
    packages the process imported (importtime lists every import on stderr)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *args],
        cwd=REPO,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    names = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    return names & set(HEAVY), result


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("light")
    rng = np.random.default_rng(0)
    for name, n in (("q", 6), ("g", 20)):
        pids = rng.integers(1, 4, n)
        Embeddings(
            rng.standard_normal((n, 8)).astype(np.float32),
            pids,
            rng.integers(0, 3, n),
            np.array([f"{name}/{p:04d}_c1_{i}.jpg" for i, p in enumerate(pids)]),
        ).save(folder / f"{name}.npz")
    return folder


def test_python_api_imports_no_model_stack():
    code = "import ctl_jax, ctl_jax.evaluation; ctl_jax.Index; import ctl_jax.retrieval.whitening"
    heavy, result = imported_heavy(["-c", code])
    assert result.returncode == 0, result.stderr[-2000:]
    assert heavy == set()


def test_evaluate_search_whiten_on_npz_import_no_model_stack(files, tmp_path):
    q, g = files / "q.npz", files / "g.npz"
    commands = {
        "evaluate": ["--query", q, "--gallery", g, "--output", tmp_path / "m.json"],
        "search": ["--query", q, "--gallery", g, "--output", tmp_path / "s.json"],
        "whiten": ["--embeddings", g, "--output", tmp_path / "w.npz", "--dim", "4"],
        "merge": ["--inputs", f"{q},{g}", "--output", tmp_path / "all.npz"],
    }
    for command, args in commands.items():
        heavy, result = imported_heavy(["-m", f"ctl_jax.{command}", *map(str, args)])
        assert result.returncode == 0, result.stderr[-2000:]
        assert heavy == set(), command
    # The commands did their work (the metrics are those of the files).
    assert json.loads((tmp_path / "m.json").read_text())["instance"]["num_query"] > 0
