"""The Colab TPU notebook: committed without outputs, in sync with its generator, and it runs
top to bottom in smoke mode (tiny synthetic run on CPU) in a kernel of this interpreter."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from xla_flags import xla_flags

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "ctl_jax_colab_tpu.ipynb"
KERNEL = "ctl_jax_test_python"


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "no code cells"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
    assert nb.metadata["accelerator"] == "TPU"


def test_notebook_matches_its_generator():
    result = subprocess.run(
        [sys.executable, str(REPO / "notebooks" / "build_notebook.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _kernel_spec(folder: pathlib.Path) -> pathlib.Path:
    """A kernel spec that starts exactly this interpreter (not whatever `python3` a user-wide
    Jupyter installation points to)."""
    spec = folder / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "ctl_jax test kernel",
                "language": "python",
            }
        )
    )
    return folder


def test_notebook_runs_in_smoke_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(_kernel_spec(tmp_path / "jupyter")))
    monkeypatch.setenv("CTL_JAX_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("CTL_JAX_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    # Two CPU devices: the batch is sharded across them as across TPU cores.
    monkeypatch.setenv("XLA_FLAGS", xla_flags(2))
    monkeypatch.setenv(
        "CTL_JAX_COMPILATION_CACHE",
        os.environ.get("CTL_JAX_COMPILATION_CACHE", str(REPO / ".cache" / "jax")),
    )
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=KERNEL,
        timeout=600,
        resources={"metadata": {"path": str(REPO / "notebooks")}},
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"notebook cell failed:\n{e}")

    text = "\n".join(
        output.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.get("output_type") == "stream"
    )
    assert f"python: {sys.executable}" in text, "the kernel is not this interpreter"
    assert "smoke mode: True" in text
    assert "2 CPU device(s)" in text
    for mode in ("instance", "centroid", "centroid_camera", "centroid_camera_reference"):
        assert f"\n{mode} " in text, f"no {mode} row in the evaluation table"
    images = [
        output
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if "image/png" in output.get("data", {})
    ]
    assert len(images) >= 3, "expected the sample grid and ranked-result pictures"
    work = tmp_path / "work"
    export = work / "export" / "notebook_smoke"
    for name in ("config.json", "metrics.json", "query.npz", "gallery.npz"):
        assert (export / name).is_file(), name
    metrics = json.loads((export / "metrics.json").read_text())
    assert {"instance", "centroid_camera"} <= set(metrics)
    assert (work / "export" / "notebook_smoke.zip").is_file()
