"""Embedding image files: folder listing, equality with the model applied directly, the embed
command and searching with query images embedded on the fly."""

import json
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image
from test_cli import run

from ctl_jax import configs
from ctl_jax.build import build_model
from ctl_jax.checkpoints import CheckpointStore, restore_model
from ctl_jax.data import transforms
from ctl_jax.embedder import Embedder
from ctl_jax.models.reid import init_variables
from ctl_jax.retrieval.embedding_file import Embeddings
from ctl_jax.retrieval.images import embed_images, list_images, model_directory

REPO = pathlib.Path(__file__).resolve().parents[1]
H, W, NUM_CLASSES = 64, 32, 5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, image_folder):
    """A converted-checkpoint-style directory with a random resnet18 (nothing trained)."""
    config = configs.load_config(str(REPO / "configs" / "default.py"))
    config.data.height, config.data.width = H, W
    config.data.eval_batch_size = 4
    model = build_model(config, NUM_CLASSES)
    variables = init_variables(model, jax.random.key(0), (H, W, 3))
    # Running variances away from 1, so that a forward pass in training mode would differ.
    rng = np.random.default_rng(0)
    batch_stats = jax.tree.map(
        lambda x: np.asarray(x) * rng.uniform(0.5, 2.0, np.shape(x)).astype(np.float32),
        variables["batch_stats"],
    )
    # Pooled features after ReLU share a large positive component: with the BNNeck
    # statistics of these images (as training would set them) the embeddings differ enough
    # to tell the images apart.
    state = {"params": variables["params"], "batch_stats": batch_stats}
    features = np.asarray(
        model.apply(state, preprocessed(image_folder[1]), train=False)["features"]
    )
    batch_stats["bnneck"] = {"mean": features.mean(0), "var": features.var(0) + 1e-6}
    directory = tmp_path_factory.mktemp("checkpoint")
    store = CheckpointStore(directory)
    meta = {"config": json.loads(configs.config_to_json(config)), "num_classes": NUM_CLASSES}
    store.save(0, state, {"epoch": 0}, meta)
    store.close()
    return directory, model, state


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Images of several sizes and formats in a tree, plus files to skip."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    files = {
        "a/0001_c1s1_000001_00.jpg": (70, 40),
        "a/0001_c2s1_000002_00.png": (64, 32),
        "b/c/0002_c3s1_000003_00.jpg": (128, 64),
        "b/c/no_identity.png": (50, 50),
        "z.JPEG": (80, 30),
    }
    for name, (h, w) in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    (root / "notes.txt").write_text("not an image")
    (root / "a" / "labels.json").write_text("{}")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / ".hidden.jpg").write_bytes(b"ignored")
    return root, sorted(str((root / name).resolve()) for name in files)


def preprocessed(paths):
    """(N, H, W, 3) test-time transform of image files, without the input pipeline."""
    return np.stack(
        [transforms.eval_transform(np.asarray(Image.open(p).convert("RGB")), H, W) for p in paths]
    )


def direct_embeddings(model, state, paths):
    """The model applied directly to the test-time transform of each image."""
    return np.asarray(model.apply(state, preprocessed(paths), train=False)["bn_features"])


def normalized(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_list_images_recurses_skips_and_explains(image_folder, tmp_path):
    root, images = image_folder
    listing = list_images(root)
    assert listing.paths == sorted(images + [str((root / "broken.jpg").resolve())])
    assert listing.skipped == {".txt": 1, ".json": 1}
    assert listing.skipped_summary() == "2 non-image file(s) (.txt: 1, .json: 1)"
    assert list_images(images[0]).paths == [images[0]]

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no \.jpg/\.jpeg/\.png images under .*empty$"):
        list_images(tmp_path / "empty")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"\(skipped 1 non-image file\(s\) \(\.txt: 1\)\)"):
        list_images(tmp_path / "text")
    with pytest.raises(ValueError, match=r"notes.txt is not a \.jpg/\.jpeg/\.png image"):
        list_images(root / "notes.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not both"):
        model_directory("a", "b")


def test_embed_folder_matches_model_applied_directly(checkpoint, image_folder):
    directory, model, state = checkpoint
    root, images = image_folder
    restored = restore_model(directory)
    assert restored.num_classes == NUM_CLASSES and restored.step == 0
    embedder = Embedder.load(directory, batch_size=3)
    assert embedder.step == 0 and embedder.input_size == (H, W) and embedder.dim == 512
    embeddings, report = embed_images(embedder, root, progress=False)

    assert embeddings.paths.tolist() == images  # the broken image is left out
    assert report.num_embedded == 5 and report.listing.num_skipped == 2
    assert report.unreadable == [str((root / "broken.jpg").resolve())]
    assert "skipped 1 unreadable image(s)" in report.summary()
    # Identities from the folders (not every name is Market-style): the first folder under
    # the root, so b/c/... is "b"; cameras from the names.
    assert embeddings.labels.tolist() == ["a", "a", "b", "b", ""]
    assert embeddings.pids.tolist() == [0, 0, 1, 1, -1]
    assert embeddings.camids.tolist() == [0, 1, 2, -1, -1]
    market, _ = embed_images(embedder, root / "a", progress=False)  # only Market names
    assert market.labels.tolist() == ["1", "1"] and market.pids.tolist() == [1, 1]
    want = direct_embeddings(model, state, images)
    assert embeddings.embeddings.shape == want.shape == (5, 512)
    np.testing.assert_allclose(embeddings.embeddings, want, rtol=1e-4, atol=1e-4)
    # The images are told apart (so the comparison above would catch a mix-up).
    cosine = normalized(want) @ normalized(want).T
    assert (cosine[~np.eye(5, dtype=bool)] < 0.9).all()
    # A single image gives the same embedding as inside the folder.
    single, _ = embed_images(Embedder.load(directory), images[2], progress=False)
    np.testing.assert_allclose(single.embeddings[0], want[2], rtol=1e-4, atol=1e-4)


def test_flip_test_averages_each_image_with_its_mirror(checkpoint, image_folder):
    directory, model, state = checkpoint
    _, images = image_folder
    folder = pathlib.Path(images[0]).parent
    embedder = Embedder.load(directory, batch_size=3, flip=True)
    flipped, _ = embed_images(embedder, folder, progress=False)
    paths = flipped.paths.tolist()
    mirrored = preprocessed(paths)[:, :, ::-1, :]
    direct = model.apply(state, preprocessed(paths), train=False)["bn_features"]
    mirror = model.apply(state, mirrored, train=False)["bn_features"]
    want = (np.asarray(direct) + np.asarray(mirror)) / 2
    np.testing.assert_allclose(flipped.embeddings, want, rtol=1e-4, atol=1e-4)
    assert np.abs(np.asarray(direct) - want).max() > 1e-3  # the mirror changes something


def test_training_time_evaluation_reads_eval_flip(checkpoint):
    from ctl_jax import parallel
    from ctl_jax.evaluator import Evaluator

    _, model, _ = checkpoint
    config = configs.load_config(str(REPO / "configs" / "default.py"))
    config.eval.modes = ()  # no dataset here to check the modes against
    mesh = parallel.make_mesh()
    assert Evaluator(model, None, None, config, mesh).flip is False
    config.eval.flip = True
    assert Evaluator(model, None, None, config, mesh).flip is True
    assert Evaluator(model, None, None, config, mesh, flip=False).flip is False
    del config.eval["flip"]  # a run saved before the key existed
    assert Evaluator(model, None, None, config, mesh).flip is False


def test_nothing_readable_is_an_error(checkpoint, tmp_path):
    embedder = Embedder.load(checkpoint[0])
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"none of the 1 image\(s\) under .* could be decoded"):
        embed_images(embedder, tmp_path, progress=False)


def run_cli(module, *args):
    return run(module, "--noprogress", *args)


def test_embed_and_search_images_commands(checkpoint, image_folder, tmp_path):
    directory, model, state = checkpoint
    root, images = image_folder
    out = tmp_path / "emb.npz"
    done = run_cli(
        "ctl_jax.embed", f"--checkpoint={directory}", f"--images={root}", f"--output={out}"
    )
    assert done.returncode == 0, done.stderr
    assert "embedded 5 image(s)" in done.stdout and "skipped 2 non-image" in done.stdout
    embeddings = Embeddings.load(out)
    assert embeddings.paths.tolist() == images
    # Not every name is Market-style, so the identity is the first folder under --images
    # (b/c/... is "b"; none for z.JPEG, directly in --images); the camera still comes from
    # Market-style names.
    assert embeddings.labels.tolist() == ["a", "a", "b", "b", ""]
    assert embeddings.pids.tolist() == [0, 0, 1, 1, -1]
    assert embeddings.camids.tolist() == [0, 1, 2, -1, -1]
    assert "identities from folder names: 4 of 5 image(s) in 2 identities" in done.stdout
    bad = run_cli(
        "ctl_jax.embed",
        f"--checkpoint={directory}",
        f"--images={root}",
        f"--output={tmp_path / 'market.npz'}",
        "--identity=market",
    )
    assert bad.returncode == 1 and not (tmp_path / "market.npz").exists()
    assert bad.stderr.strip().splitlines()[-1] == (
        f"error: --identity=market: {images[3]} does not follow the Market-style naming "
        "PPPP_cC...jpg (e.g. 0002_c1s1_000451_03.jpg); use --identity=folder or "
        "--identity=csv:FILE"
    )
    np.testing.assert_allclose(
        embeddings.embeddings, direct_embeddings(model, state, images), rtol=1e-4, atol=1e-4
    )

    again = run_cli(
        "ctl_jax.embed", f"--checkpoint={directory}", f"--images={root}", f"--output={out}"
    )
    assert again.returncode != 0 and "exists; pass --overwrite" in again.stderr
    flipped = tmp_path / "flipped.npz"
    done = run_cli(
        "ctl_jax.embed",
        f"--checkpoint={directory}",
        f"--images={root}",
        f"--output={flipped}",
        "--flip",
    )
    assert done.returncode == 0 and "(flip test)" in done.stdout, done.stderr
    mirrored = preprocessed(images)[:, :, ::-1, :]
    mirror = np.asarray(model.apply(state, mirrored, train=False)["bn_features"])
    want = (direct_embeddings(model, state, images) + mirror) / 2
    np.testing.assert_allclose(Embeddings.load(flipped).embeddings, want, rtol=1e-4, atol=1e-4)
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = run_cli(
        "ctl_jax.embed", f"--workdir={directory}", f"--images={empty}", f"--output={out}.2"
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --images: no .jpg/.jpeg/.png")

    # Query images embedded on the fly find themselves first in the gallery they came from.
    results = tmp_path / "r.json"
    done = run_cli(
        "ctl_jax.search",
        f"--gallery={out}",
        f"--images={root / 'a'}",
        f"--checkpoint={directory}",
        "--top_k=2",
        f"--output={results}",
    )
    assert done.returncode == 0, done.stderr
    queries = json.loads(results.read_text())["queries"]
    assert [q["path"] for q in queries] == images[:2]
    assert [q["pid"] for q in queries] == [1, 1]
    for q in queries:
        assert q["matches"][0]["path"] == q["path"]
        assert q["matches"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    # With --flip the queries find their own flip-test embeddings.
    done = run_cli(
        "ctl_jax.search",
        f"--gallery={flipped}",
        f"--images={root / 'a'}",
        f"--checkpoint={directory}",
        "--flip",
        "--top_k=2",
        f"--output={results}",
        "--overwrite",
    )
    assert done.returncode == 0, done.stderr
    for q in json.loads(results.read_text())["queries"]:
        assert q["matches"][0]["path"] == q["path"]
        assert q["matches"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    bad = run_cli(
        "ctl_jax.search", f"--gallery={out}", f"--query={out}", "--flip", f"--output={results}.2"
    )
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --flip applies when embedding")


def test_embed_with_whitening(checkpoint, image_folder, tmp_path):
    from ctl_jax.retrieval.whitening import learn_pca

    directory, model, state = checkpoint
    root, images = image_folder
    rng = np.random.default_rng(2)
    learned = learn_pca(rng.normal(size=(40, 512)).astype(np.float32), dim=6)
    learned.save(tmp_path / "w.npz")
    out = tmp_path / "emb.npz"
    done = run_cli(
        "ctl_jax.embed",
        f"--checkpoint={directory}",
        f"--images={root}",
        f"--output={out}",
        f"--whitening={tmp_path / 'w.npz'}",
    )
    assert done.returncode == 0, done.stderr
    got = Embeddings.load(out)
    assert got.embeddings.shape == (5, 6) and got.paths.tolist() == images
    want = learned.apply(direct_embeddings(model, state, images))
    np.testing.assert_allclose(got.embeddings, want, rtol=1e-3, atol=1e-4)

    bad = run_cli(
        "ctl_jax.embed",
        f"--checkpoint={directory}",
        f"--images={root}",
        f"--output={out}.2",
        f"--whitening={tmp_path / 'missing.npz'}",
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith("error: whitening file")
    assert not pathlib.Path(f"{out}.2").exists()

    # A whitening learned on other embeddings than this model's: one line, before embedding.
    learn_pca(rng.normal(size=(40, 64)).astype(np.float32), dim=6).save(tmp_path / "w64.npz")
    bad = run_cli(
        "ctl_jax.embed",
        f"--checkpoint={directory}",
        f"--images={root}",
        f"--output={out}.3",
        f"--whitening={tmp_path / 'w64.npz'}",
    )
    assert bad.returncode == 1
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the whitening was learned on 64-d embeddings"), last
    assert not pathlib.Path(f"{out}.3").exists()


def test_sharded_embedding_merges_into_the_single_process_file(checkpoint, image_folder, tmp_path):
    """Two array-job parts (folder identity "a" is numbered by each part on its own; the
    unreadable image falls in one) joined by `ctl_jax.merge` give the single-process file
    row for row."""
    directory, _, _ = checkpoint
    root, _ = image_folder
    common = [f"--checkpoint={directory}", f"--images={root}", "--batch_size=2"]
    single = tmp_path / "single.npz"
    assert run_cli("ctl_jax.embed", *common, f"--output={single}").returncode == 0
    parts = []
    for k in (1, 0):
        part = tmp_path / f"part{k}.npz"
        done = run_cli("ctl_jax.embed", *common, f"--output={part}", f"--shard={k}/2")
        assert done.returncode == 0 and f"(shard {k}/2)" in done.stdout, done.stderr
        parts.append(part)
    assert Embeddings.load(parts[0]).shard == (1, 2)
    merged = tmp_path / "merged.npz"
    done = run("ctl_jax.merge", f"--inputs={parts[0]},{parts[1]}", f"--output={merged}")
    assert done.returncode == 0, done.stderr
    want, got = Embeddings.load(single), Embeddings.load(merged)
    assert want.model.startswith("sha256:") and got.model == want.model
    for key in ("pids", "camids", "paths", "labels"):
        np.testing.assert_array_equal(getattr(got, key), getattr(want, key), err_msg=key)
    # Each image is embedded alone in the network: rows agree to float rounding (a batch of
    # another size may run other XLA kernels).
    np.testing.assert_allclose(got.embeddings, want.embeddings, rtol=1e-5, atol=1e-6)
    bad = run_cli("ctl_jax.embed", *common, f"--output={tmp_path / 'x.npz'}", "--shard=2/2")
    assert bad.returncode == 1 and "error: --shard=2/2: expected K/N" in bad.stderr
