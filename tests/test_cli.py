"""The command-line tools as a user runs them: one-line errors with a non-zero exit code,
metrics JSON in the format of docs/formats.md, and nothing of the user's overwritten."""

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
from ctl_jax.checkpoints import CheckpointStore
from ctl_jax.configs import config_to_json, load_config
from ctl_jax.evaluation import MODES
from ctl_jax.models.reid import init_variables
from ctl_jax.retrieval.embedding_file import Embeddings

REPO = pathlib.Path(__file__).resolve().parents[1]
METRIC_KEYS = {
    "mAP",
    "mINP",
    "rank1",
    "rank5",
    "rank10",
    "rank20",
    "rank50",
    "num_query",
    "num_gallery",
}


def run(module, *args, cwd=REPO):
    """Runs `python -m module args...` as a user would, with two virtual devices and the
    suite's compilation cache; the other test files' commands run through here too."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(2))
    env.setdefault("CTL_JAX_COMPILATION_CACHE", str(REPO / ".cache" / "jax"))
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
    assert_one_line_error(result, "bse_lr (did you mean base_lr?)")
    assert "\\" not in result.stderr and "'" not in result.stderr  # no raw repr
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "setting, message",
    [
        ("--config.model.gem_p=0", "config model.gem_p=0.0: expected > 0"),
        ("--config.loss.classifier_margin=2.0", "classifier_margin must be in [0, pi/2)"),
    ],
)
def test_bad_head_setting_is_one_line_before_the_workdir(tmp_path, setting, message):
    config = "configs/default.py:" + ("gem" if "gem_p" in setting else "arcface")
    result = run("ctl_jax.train", f"--config={config}", setting, f"--workdir={tmp_path / 'w'}")
    assert_one_line_error(result, message)
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
    assert set(json.loads(out.read_text())) - {"meta", "verification"} == {"instance"}


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
    text = tmp_path / "text.npz"
    text.write_text("this is not numpy\n")
    result = run("ctl_jax.evaluate", f"--query={text}", f"--gallery={tmp_path / 'g.npz'}")
    assert_one_line_error(result, "text.npz", "not an .npz")
    assert "allow_pickle" not in result.stderr  # numpy's advice, unsafe for a foreign file
    empty = tmp_path / "empty.npz"
    _embeddings(rng, 0, 4, 3, 2).save(empty)
    result = run("ctl_jax.evaluate", f"--query={tmp_path / 'g.npz'}", f"--gallery={empty}")
    assert_one_line_error(result, "empty.npz", "no rows")


def test_evaluate_rerank_expansion_verification_and_plots(tmp_path):
    rng = np.random.default_rng(3)
    _embeddings(rng, 20, 8, 5, 3).save(tmp_path / "q.npz")
    _embeddings(rng, 60, 8, 5, 3).save(tmp_path / "g.npz")
    out, plots = tmp_path / "metrics.json", tmp_path / "plots"
    args = [f"--query={tmp_path / 'q.npz'}", f"--gallery={tmp_path / 'g.npz'}"]
    options = ["--rerank", "--rerank_k1=8", "--rerank_k2=3", "--aqe", "--aqe_alpha=2"]
    result = run("ctl_jax.evaluate", *args, *options, f"--output={out}", f"--plot={plots}")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(out.read_text())
    assert metrics["meta"]["rerank"] == {"k1": 8, "k2": 3, "lambda": 0.3}
    assert metrics["meta"]["aqe"] == {"k": 5, "alpha": 2.0, "times": 1}
    assert metrics["meta"]["verification"] is True
    assert set(metrics["verification"]) == set(MODES)
    assert set(metrics["verification"]["instance"]["threshold_at_fpr"]) == {
        "0.0001",
        "0.001",
        "0.01",
    }
    assert sorted(p.name for p in plots.iterdir()) == ["cmc.png", "roc.png"]
    assert "mINP" in result.stdout and "TPR@FPR=0.001" in result.stdout

    plain = run("ctl_jax.evaluate", *args, "--noverification", "--modes=instance")
    assert plain.returncode == 0, plain.stderr
    assert "TPR@FPR" not in plain.stdout

    for bad, message in [
        (["--rerank", "--rerank_k1=0"], "--rerank_k1 must be an integer >= 1"),
        (["--rerank", "--rerank_k1=5", "--rerank_k2=6"], "--rerank_k2 must not exceed"),
        (["--aqe", "--aqe_alpha=-1"], "--aqe_alpha must be >= 0"),
        (["--rerank_k1=5"], "--rerank_k1 need(s) --rerank"),
        ([f"--plot={plots}"], "roc.png exists"),
    ]:
        assert_one_line_error(run("ctl_jax.evaluate", *args, *bad), message)


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


def test_evaluate_checkpoint_flip_test(checkpoint_dir, tmp_path):
    plain, flipped = tmp_path / "plain.json", tmp_path / "flip.json"
    args = [f"--workdir={checkpoint_dir}", "--modes=instance", "--noverification"]
    for out, extra in ((plain, []), (flipped, ["--flip"])):
        result = run("ctl_jax.evaluate", *args, *extra, f"--output={out}")
        assert result.returncode == 0, result.stderr
    plain, flipped = json.loads(plain.read_text()), json.loads(flipped.read_text())
    assert plain["meta"]["flip"] is False and flipped["meta"]["flip"] is True
    assert plain["instance"]["num_query"] == flipped["instance"]["num_query"] > 0
    npz = tmp_path / "e.npz"
    _embeddings(np.random.default_rng(0), 4, 3, 2, 2).save(npz)
    result = run("ctl_jax.evaluate", f"--query={npz}", f"--gallery={npz}", "--flip")
    assert_one_line_error(result, "--flip applies when embedding images")


def test_evaluate_checkpoint_with_whitening(checkpoint_dir, tmp_path):
    from ctl_jax.retrieval.whitening import Whitening, learn_pca

    # Whitened embeddings are unit vectors, and a rotation of unit vectors keeps every cosine
    # and commutes with query expansion's weighted sums: the metrics with a rotation equal
    # those with the identity, a 4-d whitening changes them. So --whitening reaches the
    # embeddings before the options. (Not with --rerank: its k-reciprocal sets flip on the
    # near-ties of this random model's embeddings under float32 rounding.)
    rng = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(rng.normal(size=(512, 512)))
    for name, projection in (("identity", np.eye(512)), ("rotation", rotation)):
        whitening = Whitening("pca", np.zeros(512, np.float32), projection.astype(np.float32))
        whitening.save(tmp_path / f"{name}.npz")
    learn_pca(rng.normal(size=(40, 512)), dim=4).save(tmp_path / "reduced.npz")
    args = [f"--workdir={checkpoint_dir}", "--modes=instance", "--noverification", "--aqe"]
    metrics = {}
    for name in ("identity", "rotation", "reduced"):
        out = tmp_path / f"{name}.json"
        result = run(
            "ctl_jax.evaluate", *args, f"--whitening={tmp_path / name}.npz", f"--output={out}"
        )
        assert result.returncode == 0, result.stderr
        metrics[name] = json.loads(out.read_text())
    assert metrics["rotation"]["meta"]["whitening"] == str(tmp_path / "rotation.npz")
    for key in ("mAP", "mINP", "rank1"):
        want = metrics["identity"]["instance"][key]
        assert metrics["rotation"]["instance"][key] == pytest.approx(want, abs=1e-5)
    assert metrics["reduced"]["instance"]["mAP"] != pytest.approx(
        metrics["identity"]["instance"]["mAP"], abs=1e-6
    )
    learn_pca(rng.normal(size=(40, 64)), dim=4).save(tmp_path / "other.npz")
    result = run("ctl_jax.evaluate", *args, f"--whitening={tmp_path / 'other.npz'}")
    assert_one_line_error(result, "learned on 64-d embeddings", "512-d")


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


def test_evaluate_on_embed_outputs_agrees_with_evaluate_workdir(checkpoint_dir, tmp_path):
    # The gallery folder holds junk (pid -1) images: both paths must leave them out.
    root = pathlib.Path(
        CheckpointStore(checkpoint_dir, read_only=True).read_meta()["config"]["data"]["root"]
    )
    assert any(p.name.startswith("-1_") for p in (root / "bounding_box_test").iterdir())
    files = {}
    for split, folder in (("query", "query"), ("gallery", "bounding_box_test")):
        files[split] = tmp_path / f"{split}.npz"
        result = run(
            "ctl_jax.embed",
            f"--workdir={checkpoint_dir}",
            f"--images={root / folder}",
            f"--output={files[split]}",
            "--noprogress",
        )
        assert result.returncode == 0, result.stderr
    modes = ["--modes=instance,centroid", "--noverification"]
    from_files, from_workdir = tmp_path / "files.json", tmp_path / "workdir.json"
    result = run(
        "ctl_jax.evaluate",
        f"--query={files['query']}",
        f"--gallery={files['gallery']}",
        f"--output={from_files}",
        *modes,
    )
    assert result.returncode == 0, result.stderr
    assert "gallery: left out" in result.stdout
    result = run(
        "ctl_jax.evaluate", f"--workdir={checkpoint_dir}", f"--output={from_workdir}", *modes
    )
    assert result.returncode == 0, result.stderr
    a, b = json.loads(from_files.read_text()), json.loads(from_workdir.read_text())
    for mode in ("instance", "centroid"):
        assert a[mode]["num_gallery"] == b[mode]["num_gallery"], mode
        assert a[mode]["num_query"] == b[mode]["num_query"], mode
        for key in ("mAP", "rank1", "rank5", "mINP"):
            assert a[mode][key] == pytest.approx(b[mode][key], abs=1e-4), (mode, key)


# An entry point's main run through cli.run with one library function replaced, as a user's
# command would run it (absl parses sys.argv; the replacement stands for a bug).
_BROKEN_EVALUATE = """
import sys

import ctl_jax.evaluation
from ctl_jax import cli, evaluate


def broken(*args, **kwargs):
    raise KeyError("params")  # an internal bug, not the user's mistake


ctl_jax.evaluation.evaluate = broken
sys.argv = ["ctl_jax.evaluate", *sys.argv[1:]]
cli.run(evaluate.main)
"""


def test_internal_error_keeps_its_traceback(tmp_path):
    rng = np.random.default_rng(2)
    for name in ("q", "g"):
        _embeddings(rng, 6, 4, 3, 2).save(tmp_path / f"{name}.npz")
    result = subprocess.run(
        [sys.executable, "-c", _BROKEN_EVALUATE]
        + [f"--query={tmp_path / 'q.npz'}", f"--gallery={tmp_path / 'g.npz'}"],
        cwd=REPO,
        env=dict(os.environ, XLA_FLAGS=xla_flags(2)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode not in (0, 2), result.stderr
    assert "Traceback (most recent call last)" in result.stderr, result.stderr
    assert "KeyError: 'params'" in result.stderr, result.stderr
    assert "in broken" in result.stderr  # the frame that raised
    assert not any(line.startswith("error:") for line in result.stderr.splitlines())


@pytest.mark.parametrize("debug", ["flag", "environment"])
def test_debug_shows_the_traceback_of_a_user_error(tmp_path, debug):
    missing = tmp_path / "missing.npz"
    args = [f"--query={missing}", f"--gallery={missing}"]
    plain = run("ctl_jax.evaluate", *args)
    assert_one_line_error(plain, str(missing), "does not exist")
    if debug == "flag":
        result = run("ctl_jax.evaluate", *args, "--debug")
    else:
        env = dict(os.environ, XLA_FLAGS=xla_flags(2), CTL_JAX_DEBUG="1")
        result = subprocess.run(
            [sys.executable, "-m", "ctl_jax.evaluate", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert result.returncode == 1, result.stderr
    assert "Traceback (most recent call last)" in result.stderr, result.stderr
    assert "MissingFileError" in result.stderr  # the exception's own traceback
    # ... and still the one-line message last.
    assert result.stderr.strip().splitlines()[-1] == plain.stderr.strip().splitlines()[-1]


def test_user_errors_keep_their_builtin_types_and_module_names():
    """Callers that catch the builtin type, or import an error from its old module, still work."""
    from ctl_jax import errors
    from ctl_jax.checkpoints import CheckpointError
    from ctl_jax.data.image_io import UnreadableImageError
    from ctl_jax.data.readers import DatasetError
    from ctl_jax.distributed import DistributedSetupError
    from ctl_jax.retrieval.approximate import FaissUnavailableError
    from ctl_jax.training.loop import NonFiniteLossError, WorkdirMismatchError
    from ctl_jax.weights.torch_pickle import TorchFileError

    builtin = {
        DatasetError: ValueError,
        UnreadableImageError: OSError,
        DistributedSetupError: ValueError,
        FaissUnavailableError: ImportError,
        CheckpointError: RuntimeError,
        NonFiniteLossError: FloatingPointError,
        WorkdirMismatchError: ValueError,
        TorchFileError: ValueError,
        errors.MissingFileError: FileNotFoundError,
        errors.OutputExistsError: FileExistsError,
        errors.NotAFolderError: NotADirectoryError,
        errors.ConfigError: ValueError,
        errors.OptionError: ValueError,
        errors.FileContentError: ValueError,
    }
    for cls, base in builtin.items():
        assert cls is getattr(errors, cls.__name__)
        assert issubclass(cls, errors.UserError) and issubclass(cls, base), cls
    # The message is the first argument, without an OSError's errno or a KeyError's quotes.
    assert errors.message(errors.MissingFileError("index file x.npz does not exist")) == (
        "index file x.npz does not exist"
    )


def test_evaluate_with_a_dataset_config_needs_no_training_images(checkpoint_dir, tmp_path):
    """`evaluate --workdir --config` reads query and gallery only: a Market-1501 folder
    without bounding_box_train/ evaluates, with the metrics of the complete folder."""
    import shutil

    root = pathlib.Path(
        CheckpointStore(checkpoint_dir, read_only=True).read_meta()["config"]["data"]["root"]
    )
    shutil.copytree(
        root, tmp_path / "market1501", ignore=shutil.ignore_patterns("bounding_box_train")
    )
    assert not (tmp_path / "market1501" / "bounding_box_train").exists()
    args = [f"--workdir={checkpoint_dir}", "--modes=instance,centroid_camera", "--noverification"]
    partial, full = tmp_path / "partial.json", tmp_path / "full.json"
    result = run(
        "ctl_jax.evaluate",
        *args,
        "--config=configs/default.py",
        "--config.data.name=market1501",
        f"--config.data.root={tmp_path}",
        "--config.data.height=32",
        "--config.data.width=16",
        f"--output={partial}",
    )
    assert result.returncode == 0, result.stderr
    assert "  train    |     0 |        0 |" in result.stdout
    result = run("ctl_jax.evaluate", *args, f"--output={full}")
    assert result.returncode == 0, result.stderr
    partial, full = json.loads(partial.read_text()), json.loads(full.read_text())
    assert partial["meta"]["dataset"] == "market1501"
    for mode in ("instance", "centroid_camera"):
        assert partial[mode]["num_query"] == full[mode]["num_query"] > 0
        assert partial[mode]["mAP"] == pytest.approx(full[mode]["mAP"], abs=1e-6)


def test_compilation_cache_folder_defaults_to_xdg_and_can_be_turned_off():
    from ctl_jax.cli import compilation_cache_dir

    home = pathlib.Path.home()
    assert compilation_cache_dir({}) == str(home / ".cache" / "ctl_jax" / "jax")
    assert compilation_cache_dir({"XDG_CACHE_HOME": "/x/cache"}) == "/x/cache/ctl_jax/jax"
    # A relative XDG_CACHE_HOME is invalid (XDG base directory spec) and ignored.
    assert compilation_cache_dir({"XDG_CACHE_HOME": "rel"}) == str(home / ".cache/ctl_jax/jax")
    given = {"XDG_CACHE_HOME": "/x/cache", "CTL_JAX_COMPILATION_CACHE": "/y"}
    assert compilation_cache_dir(given) == "/y"
    for off in ("off", "OFF", "0", "false", "none"):
        assert compilation_cache_dir({"CTL_JAX_COMPILATION_CACHE": off}) is None
