"""The command-line tools as a user runs them: one-line errors with a non-zero exit code,
metrics JSON in the INTERFACES.md format, and nothing of the user's overwritten."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from tiny_data import make_tiny_reid
from xla_flags import xla_flags

from ctl_jax.build import build_model
from ctl_jax.configs import config_to_json, load_config
from ctl_jax.evaluation import MODES
from ctl_jax.models.reid import init_variables
from ctl_jax.retrieval.embedding_file import Embeddings
from ctl_jax.training.checkpoints import CheckpointStore

REPO = pathlib.Path(__file__).resolve().parents[1]
METRIC_KEYS = {"mAP", "rank1", "rank5", "rank10", "rank20", "rank50", "num_query", "num_gallery"}


def run(module, *args, cwd=REPO):
    env = dict(os.environ, XLA_FLAGS=xla_flags(2))
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0, result.stdout + result.stderr
    # A library may log its own line first (orbax logs a damaged file); no traceback, and our
    # message is the last line.
    assert "Traceback" not in result.stderr, result.stderr
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in last, last


def test_config_key_typo_is_one_line(tmp_path):
    result = run("ctl_jax.train", "--config.solver.bse_lr=1", f"--workdir={tmp_path / 'w'}")
    assert_one_line_error(result, "bse_lr", "base_lr")
    assert not (tmp_path / "w").exists()


def test_missing_config_file_is_one_line(tmp_path):
    result = run("ctl_jax.train", "--config=configs/no_such.py", f"--workdir={tmp_path}")
    assert_one_line_error(result, "configs/no_such.py")


def test_missing_dataset_folder_is_one_line(tmp_path):
    result = run(
        "ctl_jax.train", f"--config.data.root={tmp_path / 'nope'}", f"--workdir={tmp_path}"
    )
    assert_one_line_error(result, str(tmp_path / "nope"), "bounding_box_train")


def _embeddings(rng, num, dim, num_ids, num_cams):
    return Embeddings(
        embeddings=rng.normal(size=(num, dim)).astype(np.float32),
        pids=rng.integers(0, num_ids, num).astype(np.int64),
        camids=rng.integers(0, num_cams, num).astype(np.int64),
        paths=np.asarray([f"img_{i}.jpg" for i in range(num)]),
    )


def test_evaluate_embedding_files_writes_metrics_json_and_never_overwrites(tmp_path):
    rng = np.random.default_rng(0)
    _embeddings(rng, 20, 8, 5, 3).save(tmp_path / "q.npz")
    _embeddings(rng, 60, 8, 5, 3).save(tmp_path / "g.npz")
    out = tmp_path / "metrics.json"
    args = [f"--query={tmp_path / 'q.npz'}", f"--gallery={tmp_path / 'g.npz'}"]
    result = run("ctl_jax.evaluate", *args, f"--output={out}")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(out.read_text())
    assert set(MODES) <= set(metrics)
    for mode in MODES:
        assert METRIC_KEYS <= set(metrics[mode])
        assert 0.0 <= metrics[mode]["mAP"] <= 1.0
    assert "mAP" in result.stdout  # the readable table

    before = out.read_text()
    again = run("ctl_jax.evaluate", *args, f"--output={out}", "--modes=instance")
    assert_one_line_error(again, str(out), "--overwrite")
    assert out.read_text() == before
    replaced = run("ctl_jax.evaluate", *args, f"--output={out}", "--modes=instance", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert set(json.loads(out.read_text())) - {"meta"} == {"instance"}


def test_evaluate_rejects_bad_embedding_files(tmp_path):
    np.savez(tmp_path / "q.npz", embeddings=np.zeros((3, 4), np.float32))
    rng = np.random.default_rng(1)
    _embeddings(rng, 10, 4, 3, 2).save(tmp_path / "g.npz")
    result = run(
        "ctl_jax.evaluate", f"--query={tmp_path / 'q.npz'}", f"--gallery={tmp_path / 'g.npz'}"
    )
    assert_one_line_error(result, "q.npz", "pids")
    bad_mode = run(
        "ctl_jax.evaluate",
        f"--query={tmp_path / 'g.npz'}",
        f"--gallery={tmp_path / 'g.npz'}",
        "--modes=instance,centroids",
    )
    assert_one_line_error(bad_mode, "centroids")


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """A work directory holding one checkpoint of a tiny random model on a tiny dataset."""
    root = tmp_path_factory.mktemp("tiny_data")
    make_tiny_reid(root, seed=5, num_train_ids=6)
    config = load_config("configs/default.py")
    config.data.root = str(root)
    config.data.height, config.data.width = 32, 16
    workdir = tmp_path_factory.mktemp("run")
    model = build_model(config, 6)
    variables = jax.device_get(init_variables(model, jax.random.key(0), (32, 16, 3)))
    store = CheckpointStore(workdir)
    meta = {"config": json.loads(config_to_json(config)), "num_classes": 6}
    store.save(7, dict(variables), {"epoch": 1}, meta)
    store.close()
    return workdir


def test_evaluate_checkpoint_every_mode(checkpoint_dir, tmp_path):
    out = tmp_path / "m.json"
    result = run("ctl_jax.evaluate", f"--workdir={checkpoint_dir}", f"--output={out}")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(out.read_text())
    assert set(MODES) <= set(metrics)
    assert metrics["meta"]["step"] == 7
    assert metrics["instance"]["num_query"] > 0


def test_evaluate_missing_step_and_corrupt_checkpoint(checkpoint_dir, tmp_path):
    missing = run("ctl_jax.evaluate", f"--workdir={checkpoint_dir}", "--step=3")
    assert_one_line_error(missing, "step 3")

    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(checkpoint_dir), str(broken)], check=True)
    for path in (broken / "checkpoints").rglob("*"):
        if path.is_file() and "meta" not in path.parts:
            path.write_bytes(b"\x00garbage")
    result = run("ctl_jax.evaluate", f"--workdir={broken}")
    assert_one_line_error(result, "checkpoint")
    assert (checkpoint_dir / "checkpoints" / "7").is_dir()
