"""Every writer turns an output it cannot write into one line, `error: cannot write <path>:
<reason>` with exit code 1 (ctl_jax/files.py `writing`), not a traceback.

The tests run as root, for whom permissions do not apply: the unwritable place is a path
under a regular file (`blocker/...`), which the kernel refuses for anyone (ENOTDIR/EEXIST).
"""

import numpy as np
import pytest
import torch_reference_models as trm
from test_cli import assert_one_line_error, run
from tiny_model import random_images, save_random_model

from ctl_jax import files
from ctl_jax.errors import UnwritableOutputError
from ctl_jax.retrieval.embedding_file import Embeddings


def assert_cannot_write(result, path, blocker):
    assert_one_line_error(result, f"cannot write {path}: {blocker} is a file, not a folder")
    assert result.returncode == 1


@pytest.fixture
def blocker(tmp_path):
    path = tmp_path / "blocker"
    path.write_text("a file where a folder is expected")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    save_random_model(directory)
    return directory


@pytest.fixture(scope="module")
def embeddings_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    pids = np.repeat(np.arange(4), 3)
    emb = Embeddings(
        rng.standard_normal((12, 8)).astype(np.float32),
        pids,
        np.arange(12) % 2,
        np.asarray([f"{p:04d}_c{i % 2 + 1}s1_{i:06d}_00.jpg" for i, p in enumerate(pids)]),
    )
    path = tmp_path_factory.mktemp("emb") / "e.npz"
    emb.save(path)
    return path


def test_the_library_raises_an_oserror_that_is_a_user_error(blocker):
    target = blocker / "sub" / "out.npz"
    with pytest.raises(UnwritableOutputError, match=f"cannot write {target}: {blocker} is a"):
        with files.atomic_open(target) as f:
            f.write(b"x")
    with pytest.raises(OSError):  # code catching the builtin type keeps working
        files.make_folder(blocker / "d")
    with pytest.raises(UnwritableOutputError, match=f"cannot write {blocker}: {blocker} is a"):
        files.make_folder(blocker)  # the folder itself is a file
    folder = blocker.parent / "folder"
    folder.mkdir()
    with pytest.raises(UnwritableOutputError, match=f"cannot write {folder}: Is a directory"):
        with files.atomic_open(folder) as f:  # a folder where the file goes
            f.write(b"x")
    assert [p.name for p in blocker.parent.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("flag", ["--output", "--save_index", "--visualize"])
def test_search(flag, embeddings_file, blocker):
    path = blocker / "out"
    args = [f"--gallery={embeddings_file}", f"{flag}={path}"]
    if flag != "--save_index":
        args.append(f"--query={embeddings_file}")
    assert_cannot_write(run("ctl_jax.search", "--noprogress", *args), path, blocker)


def test_whiten(embeddings_file, blocker):
    path = blocker / "w.npz"
    done = run("ctl_jax.whiten", f"--embeddings={embeddings_file}", f"--output={path}")
    assert_cannot_write(done, path, blocker)


@pytest.mark.parametrize("flag", ["--output", "--plot"])
def test_evaluate(flag, embeddings_file, blocker):
    path = blocker / "out"
    done = run(
        "ctl_jax.evaluate",
        f"--query={embeddings_file}",
        f"--gallery={embeddings_file}",
        f"{flag}={path}",
    )
    expected = path / "roc.png" if flag == "--plot" else path
    assert_cannot_write(done, expected, blocker)


def test_train(blocker):
    path = blocker / "run"
    assert_cannot_write(run("ctl_jax.train", f"--workdir={path}"), path, blocker)


def test_embed(model_dir, blocker, tmp_path):
    from PIL import Image

    image = tmp_path / "0001_c1s1_000001_00.png"
    Image.fromarray(random_images(1, 32, 16)[0]).save(image)
    path = blocker / "e.npz"
    done = run(
        "ctl_jax.embed", f"--checkpoint={model_dir}", f"--images={image}", f"--output={path}"
    )
    assert_cannot_write(done, path, blocker)


def test_export(model_dir, blocker):
    path = blocker / "model.stablehlo"
    done = run(
        "ctl_jax.export", f"--checkpoint={model_dir}", "--format=stablehlo", f"--output={path}"
    )
    assert_cannot_write(done, path, blocker)


def test_convert(blocker, tmp_path):
    source = tmp_path / "r18.pth"
    trm.save_state_dict(trm.make_resnet("resnet18", stem_relu=True), source)
    path = blocker / "converted"
    assert_cannot_write(
        run("ctl_jax.convert", f"--source={source}", f"--output={path}"), path, blocker
    )
