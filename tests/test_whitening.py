"""Whitening (ctl_jax/retrieval/whitening.py, `python -m ctl_jax.whiten`, `evaluate
--whitening`) against loop-based NumPy references written from the papers: PCA whitening
(Jégou and Chum 2012, as used by Gordo et al.) and the learned whitening of Mikolajczyk and
Matas as used by Radenović et al. (Cholesky of the same-identity pair covariance, then a
rotation by the principal directions of the whitened data)."""

import json
import pathlib
import pickle
import re

import numpy as np
import pytest
from test_cli import run

from ctl_jax import evaluation
from ctl_jax.errors import FileContentError, InvalidValueError, MissingFileError
from ctl_jax.retrieval import whitening
from ctl_jax.retrieval.embedding_file import Embeddings

REPO = pathlib.Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# NumPy references: explicit loops over samples and pairs, float64
# ---------------------------------------------------------------------------------------------


def unit(x):
    return np.array([row / np.linalg.norm(row) for row in np.asarray(x, np.float64)])


def ref_pca(x):
    """(mean, P) with P's rows the principal directions / sqrt(eigenvalue), largest first."""
    x = unit(x)
    n, d = x.shape
    mean = sum(x) / n
    cov = np.zeros((d, d))
    for row in x:
        cov += np.outer(row - mean, row - mean)
    cov /= n
    eigval, eigvec = np.linalg.eig(cov)
    order = np.argsort(eigval.real)[::-1]
    eigval, eigvec = eigval.real[order], eigvec.real[:, order]
    return mean, np.diag(1 / np.sqrt(eigval)) @ eigvec.T


def ref_supervised(x, labels):
    x = unit(x)
    n, d = x.shape
    diffs = [
        x[i] - x[j]
        for i in range(n)
        for j in range(i + 1, n)
        if labels[i] >= 0 and labels[i] == labels[j]
    ]
    s = sum(np.outer(v, v) for v in diffs) / len(diffs)
    p = np.linalg.inv(np.linalg.cholesky(s))  # whitens the pair differences
    mean = sum(x) / n
    scatter = sum(np.outer(p @ (row - mean), p @ (row - mean)) for row in x)
    eigval, eigvec = np.linalg.eig(scatter)
    order = np.argsort(eigval.real)[::-1]
    return mean, eigvec.real[:, order].T @ p


def same_up_to_row_signs(a, b, rtol=1e-4, atol=1e-6):
    signs = np.sign(np.sum(a * b, axis=1, keepdims=True))
    np.testing.assert_allclose(a * signs, b, rtol=rtol, atol=atol)


def clustered(seed, num_ids=12, per_id=6, dim=8, spread=0.3):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_ids, dim))
    labels = np.repeat(np.arange(num_ids), per_id)
    x = centres[labels] + spread * rng.normal(size=(len(labels), dim))
    return x.astype(np.float32), labels


# ---------------------------------------------------------------------------------------------


def test_pca_whitening_matches_reference_and_whitens():
    x, _ = clustered(0)
    result = whitening.learn_pca(x)
    mean, projection = ref_pca(x)
    np.testing.assert_allclose(result.mean, mean, rtol=1e-5, atol=1e-6)
    same_up_to_row_signs(result.projection.astype(np.float64), projection)
    assert (result.method, result.input_dim, result.output_dim) == ("pca", 8, 8)
    # The centred, projected training vectors have identity covariance.
    y = (unit(x) - result.mean) @ result.projection.T.astype(np.float64)
    np.testing.assert_allclose(y.T @ y / len(y), np.eye(8), atol=1e-4)
    # Applying: centre, project, normalise; a reduced whitening keeps the first directions.
    applied = result.apply(x[:5])
    np.testing.assert_allclose(applied, unit(y[:5]), rtol=1e-5, atol=1e-6)
    reduced = whitening.learn_pca(x, dim=3)
    same_up_to_row_signs(reduced.projection.astype(np.float64), projection[:3])
    assert reduced.apply(x).shape == (len(x), 3)
    np.testing.assert_allclose(np.linalg.norm(reduced.apply(x), axis=1), 1.0, rtol=1e-5)


def test_supervised_whitening_matches_reference():
    x, labels = clustered(1)
    labels[:3] = -1  # unknown identities: in the mean and the rotation, in no pair
    result = whitening.learn_supervised(x, labels)
    mean, projection = ref_supervised(x, labels)
    np.testing.assert_allclose(result.mean, mean, rtol=1e-5, atol=1e-6)
    same_up_to_row_signs(result.projection.astype(np.float64), projection, rtol=1e-3, atol=1e-4)
    # The pair differences are whitened: their covariance becomes the identity.
    scatter, num_pairs = whitening.same_identity_scatter(unit(x), labels)
    p = result.projection.astype(np.float64)
    np.testing.assert_allclose(p @ (scatter / num_pairs) @ p.T, np.eye(8), atol=1e-3)
    assert whitening.learn_supervised(x, labels, dim=2).output_dim == 2


def test_same_identity_scatter_is_the_sum_over_pairs():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(9, 3))
    labels = np.array([0, 1, 0, 2, 1, 0, -1, -1, 3])
    scatter, num_pairs = whitening.same_identity_scatter(x, labels)
    want, count = np.zeros((3, 3)), 0
    for i in range(9):
        for j in range(i + 1, 9):
            if labels[i] >= 0 and labels[i] == labels[j]:
                want += np.outer(x[i] - x[j], x[i] - x[j])
                count += 1
    np.testing.assert_allclose(scatter, want, atol=1e-10)
    assert num_pairs == count == 4


def test_whitening_improves_retrieval_of_anisotropic_noise():
    # Identities differ along a few directions; the same-identity noise is strong along
    # others. Learned whitening must shrink the noise directions and help retrieval.
    rng = np.random.default_rng(3)
    dim, num_ids = 16, 40
    centres = np.zeros((num_ids, dim))
    centres[:, :4] = rng.normal(size=(num_ids, 4))
    noise_scale = np.r_[np.full(4, 0.2), np.full(dim - 4, 2.0)]

    def sample(per_id):
        labels = np.repeat(np.arange(num_ids), per_id)
        return centres[labels] + 3 + noise_scale * rng.normal(size=(len(labels), dim)), labels

    train, train_labels = sample(8)
    query, q_labels = sample(1)
    gallery, g_labels = sample(5)
    learned = whitening.learn_supervised(train, train_labels, dim=8)

    def map_of(q, g):
        cams = np.zeros(len(q), np.int64), np.ones(len(g), np.int64)
        result = evaluation.evaluate(
            q, q_labels, cams[0], g, g_labels, cams[1], modes=("instance",)
        )
        return result["instance"]["mAP"]

    plain = map_of(query, gallery)
    assert map_of(learned.apply(query), learned.apply(gallery)) > plain + 0.2


def test_file_round_trip_and_bad_files(tmp_path):
    x, labels = clustered(4)
    result = whitening.learn_supervised(x, labels, dim=5)
    path = result.save(tmp_path / "w.npz")
    loaded = whitening.Whitening.load(path)
    assert loaded.method == "supervised" and loaded.num_embeddings == len(x)
    np.testing.assert_array_equal(loaded.projection, result.projection)
    np.testing.assert_array_equal(loaded.apply(x), result.apply(x))
    with pytest.raises(FileExistsError, match="--overwrite"):
        result.save(path)
    np.savez(tmp_path / "other.npz", embeddings=x)
    with pytest.raises(FileContentError, match="is not a whitening file"):
        whitening.Whitening.load(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(FileContentError, match="junk.npz is not an .npz"):
        whitening.Whitening.load(tmp_path / "junk.npz")
    # Never numpy's advice to load a pickle unsafely (allow_pickle), whatever the file.
    (tmp_path / "pickled.npz").write_bytes(pickle.dumps({"mean": [1.0]}))
    np.save(tmp_path / "single.npy", x)
    np.savez(tmp_path / "objects.npz", mean=np.array([1.0, None], dtype=object))
    for name, message in [
        ("pickled.npz", "is not an .npz (not a zip archive)"),
        ("single.npy", "holds a single array"),
        ("objects.npz", "not a readable .npz"),
    ]:
        with pytest.raises(FileContentError, match=re.escape(message)) as raised:
            whitening.Whitening.load(tmp_path / name)
        text = str(raised.value)
        assert name in text and "\n" not in text
        assert "unsafe" not in text and "allow_pickle=`" not in text and "pickle.load" not in text
    with pytest.raises(MissingFileError, match="does not exist"):
        whitening.Whitening.load(tmp_path / "missing.npz")
    with pytest.raises(InvalidValueError, match="learned on 8-d embeddings but the embeddings"):
        loaded.apply(np.ones((2, 7)))


def test_bad_whitening_settings_are_one_line_errors():
    x, labels = clustered(5, num_ids=3, per_id=2, dim=8)  # 6 embeddings, 3 pairs
    with pytest.raises(InvalidValueError, match="dimension 9 is larger than the embedding dim"):
        whitening.learn_pca(x, dim=9)
    with pytest.raises(InvalidValueError, match=r"span only 5 dimensions; give a dimension <= 5"):
        whitening.learn_pca(x, dim=6)
    assert whitening.learn_pca(x).output_dim == 5  # N - 1 directions by default
    with pytest.raises(InvalidValueError, match="must be an integer >= 1, got 0"):
        whitening.learn_pca(x, dim=0)
    with pytest.raises(InvalidValueError, match="3 same-identity pairs span only 3 of the 8"):
        whitening.learn_supervised(x, labels)
    shrunk = whitening.learn_supervised(x, labels, shrinkage=0.1)
    assert np.isfinite(shrunk.projection).all()
    with pytest.raises(InvalidValueError, match="no identity has two embeddings"):
        whitening.learn_supervised(x, np.arange(6))
    with pytest.raises(InvalidValueError, match=r"shrinkage must be in \[0, 1\)"):
        whitening.learn_supervised(x, labels, shrinkage=1.0)
    with pytest.raises(InvalidValueError, match="not one of pca, supervised"):
        whitening.learn(x, "zca")


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def last_error_line(result):
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if line.strip()][-1]


def _file(x, labels, cams, prefix):
    return Embeddings(
        x, labels.astype(np.int64), cams, np.asarray([f"{prefix}/{i}.jpg" for i in range(len(x))])
    )


def test_whiten_and_evaluate_commands(tmp_path):
    x, labels = clustered(6, num_ids=20, per_id=6, dim=8)
    train = _file(x, labels, np.zeros(len(x), np.int64), "train")
    train.save(tmp_path / "train.npz")
    q, q_labels = clustered(6, num_ids=20, per_id=1, dim=8, spread=0.5)
    g, g_labels = clustered(6, num_ids=20, per_id=3, dim=8, spread=0.5)
    _file(q, q_labels, np.zeros(len(q), np.int64), "q").save(tmp_path / "q.npz")
    _file(g, g_labels, np.ones(len(g), np.int64), "g").save(tmp_path / "g.npz")

    out = tmp_path / "w.npz"
    done = run(
        "ctl_jax.whiten",
        f"--embeddings={tmp_path / 'train.npz'}",
        f"--output={out}",
        "--method=supervised",
        "--dim=6",
    )
    assert done.returncode == 0, done.stderr
    assert "supervised whitening learned from 120 embeddings (8-d -> 6-d)" in done.stdout
    learned = whitening.Whitening.load(out)
    np.testing.assert_allclose(
        learned.projection, whitening.learn_supervised(x, labels, dim=6).projection, rtol=1e-5
    )

    metrics = tmp_path / "m.json"
    args = [f"--query={tmp_path / 'q.npz'}", f"--gallery={tmp_path / 'g.npz'}", "--modes=instance"]
    done = run("ctl_jax.evaluate", *args, f"--whitening={out}", f"--output={metrics}")
    assert done.returncode == 0, done.stderr
    got = json.loads(metrics.read_text())
    want = evaluation.evaluate(
        learned.apply(q),
        q_labels,
        np.zeros(20),
        learned.apply(g),
        g_labels,
        np.ones(60),
        modes=("instance",),
    )
    assert got["instance"]["mAP"] == pytest.approx(want["instance"]["mAP"], abs=1e-6)
    assert got["meta"]["whitening"] == str(out)

    # One-line errors.
    line = last_error_line(
        run("ctl_jax.whiten", f"--embeddings={tmp_path / 'train.npz'}", f"--output={out}")
    )
    assert "exists; pass --overwrite" in line
    line = last_error_line(
        run(
            "ctl_jax.whiten",
            f"--embeddings={tmp_path / 'train.npz'}",
            f"--output={out}.2",
            "--dim=9",
        )
    )
    assert line.startswith("error: ") and "larger than the embedding dimension 8" in line
    unlabelled = _file(x, np.full(len(x), -1), np.zeros(len(x), np.int64), "folder_a")
    unlabelled.save(tmp_path / "unlabelled.npz")
    line = last_error_line(
        run(
            "ctl_jax.whiten",
            f"--embeddings={tmp_path / 'unlabelled.npz'}",
            f"--output={out}.3",
            "--method=supervised",
        )
    )
    assert "no Market-style pids" in line and "--labels=folders" in line
    line = last_error_line(run("ctl_jax.evaluate", *args, f"--whitening={tmp_path / 'q.npz'}"))
    assert "is not a whitening file" in line


def test_folder_labels():
    from ctl_jax.retrieval.whitening import identity_labels

    paths = np.asarray(["/d/train/eiffel/1.jpg", "/d/train/louvre/2.jpg", "/d/train/eiffel/3.jpg"])
    labels = identity_labels(np.full(3, -1), paths, "folders")
    assert labels[0] == labels[2] != labels[1]
    assert identity_labels(np.array([4, -1, 4]), paths, "pids").tolist() == [4, -1, 4]


def test_folder_labels_take_the_first_folder_under_the_root():
    from ctl_jax.retrieval.whitening import identity_labels

    paths = np.asarray(
        [
            "/d/train/alice/2019/1.jpg",
            "/d/train/bob/2019/2.jpg",
            "/d/train/alice/3.jpg",
            "/d/train/bob/2020/x/4.jpg",
        ]
    )
    for root in (None, "/d/train"):  # the shared folder is the root by default
        labels = identity_labels(np.full(4, -1), paths, "folders", root)
        assert labels[0] == labels[2] != labels[1] == labels[3]
        assert (labels >= 0).all()
    # With a root above the identity folders the first folder is "train" for all; an image
    # directly in the root has no identity (-1).
    assert len(set(identity_labels(np.full(4, -1), paths, "folders", "/d").tolist())) == 1
    with_loose = np.append(paths, "/d/train/5.jpg")
    labels = identity_labels(np.full(5, -1), with_loose, "folders")
    assert labels[4] == -1 and labels[0] == labels[2] != labels[1] == labels[3] >= 0


def test_whiten_folder_labels_with_nested_folders(tmp_path):
    # Every identity holds the same sub-folders: the old parent-folder rule merged all the
    # identities into "sub0" and "sub1"; the first folder under the root keeps them apart.
    x, labels = clustered(7, num_ids=20, per_id=6, dim=8)
    root = tmp_path / "train"
    paths = [
        str(root / f"id{label}" / f"sub{i % 2}" / f"{i}.jpg") for i, label in enumerate(labels)
    ]
    unknown = np.full(len(x), -1, np.int64)
    Embeddings(x, unknown, np.zeros(len(x), np.int64), np.asarray(paths)).save(tmp_path / "t.npz")
    out = tmp_path / "w.npz"
    common = [f"--embeddings={tmp_path / 't.npz'}", "--method=supervised", "--dim=6"]
    done = run("ctl_jax.whiten", *common, f"--output={out}", "--labels=folders")
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(
        whitening.Whitening.load(out).projection,
        whitening.learn_supervised(x, labels, dim=6).projection,
        rtol=1e-5,
    )
    line = last_error_line(run("ctl_jax.whiten", *common, f"--output={out}.2", f"--images={root}"))
    assert line == "error: --images needs --labels=folders"
    line = last_error_line(
        run(
            "ctl_jax.whiten",
            *common,
            f"--output={out}.3",
            "--labels=folders",
            f"--images={root / 'id0' / 'sub0'}",
        )
    )
    assert "--labels=folders: no image of" in line and "lies in a sub-folder of" in line
