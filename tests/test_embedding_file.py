"""Embedding .npz files: round trip, refusal to overwrite, validation messages."""

import numpy as np
import pytest

from ctl_jax.retrieval.embedding_file import Embeddings, parse_market_name


def make_embeddings(n=5, dim=3):
    rng = np.random.default_rng(0)
    return Embeddings(
        embeddings=rng.standard_normal((n, dim)).astype(np.float32),
        pids=np.arange(n),
        camids=np.arange(n) % 2,
        paths=[f"img/{i:04d}_c1s1_000001_01.jpg" for i in range(n)],
    )


def write_npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def test_round_trip(tmp_path):
    emb = make_embeddings()
    path = emb.save(tmp_path / "deep" / "q.npz")
    loaded = Embeddings.load(path)
    assert loaded.embeddings.dtype == np.float32 and loaded.embeddings.shape == (5, 3)
    assert loaded.pids.dtype == np.int64 and loaded.camids.dtype == np.int64
    assert loaded.paths.dtype.kind == "U"
    for key in ("embeddings", "pids", "camids", "paths"):
        np.testing.assert_array_equal(getattr(loaded, key), getattr(emb, key))
    assert len(loaded) == 5 and loaded.dim == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["q.npz"]  # no temp file


def test_save_keeps_the_exact_name_and_refuses_to_overwrite(tmp_path):
    emb = make_embeddings()
    path = emb.save(tmp_path / "emb")  # no .npz suffix added
    assert path.name == "emb" and path.exists()
    with pytest.raises(FileExistsError, match="--overwrite"):
        make_embeddings(n=2).save(path)
    assert len(Embeddings.load(path)) == 5
    make_embeddings(n=2).save(path, overwrite=True)
    assert len(Embeddings.load(path)) == 2


def test_empty_embeddings_round_trip(tmp_path):
    emb = Embeddings(np.zeros((0, 4), np.float32), [], [], [])
    loaded = Embeddings.load(emb.save(tmp_path / "e.npz"))
    assert len(loaded) == 0 and loaded.dim == 4


def test_missing_key_names_file_and_key(tmp_path):
    path = write_npz(tmp_path / "bad.npz", embeddings=np.zeros((2, 3), np.float32), pids=[1, 2])
    with pytest.raises(ValueError, match=r"bad\.npz.*missing key\(s\) \['camids', 'paths'\]"):
        Embeddings.load(path)


def test_length_mismatch(tmp_path):
    path = write_npz(
        tmp_path / "len.npz",
        embeddings=np.zeros((3, 2), np.float32),
        pids=np.arange(3),
        camids=np.arange(2),
        paths=np.array(["a", "b", "c"]),
    )
    with pytest.raises(ValueError, match=r"len\.npz.*differ in length.*'camids': 2"):
        Embeddings.load(path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"embeddings": np.zeros(3, np.float32)}, "2-D"),
        ({"embeddings": np.zeros((3, 2), np.int32)}, "floating point"),
        ({"embeddings": np.full((3, 2), np.nan, np.float32)}, "NaN or infinite"),
        ({"pids": np.array([0.5, 1.0, 2.0])}, "'pids' must be integers"),
        ({"paths": np.array([1, 2, 3])}, "'paths' must be strings"),
    ],
)
def test_invalid_arrays(tmp_path, change, message):
    arrays = {
        "embeddings": np.zeros((3, 2), np.float32),
        "pids": np.arange(3),
        "camids": np.arange(3),
        "paths": np.array(["a", "b", "c"]),
    }
    arrays.update(change)
    path = write_npz(tmp_path / "x.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        Embeddings.load(path)
    with pytest.raises(ValueError, match=message):
        Embeddings(**arrays)


def test_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Embeddings.load(tmp_path / "nope.npz")
    text = tmp_path / "text.npz"
    text.write_text("not numpy")
    with pytest.raises(ValueError, match="is not an .npz") as error:
        Embeddings.load(text)
    assert "allow_pickle" not in str(error.value)  # numpy's advice, unsafe for such a file
    with pytest.raises(ValueError, match="is a folder"):
        Embeddings.load(tmp_path)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="single array"):
        Embeddings.load(single)
    pickled = write_npz(
        tmp_path / "obj.npz",
        embeddings=np.zeros((1, 2), np.float32),
        pids=np.arange(1),
        camids=np.arange(1),
        paths=np.array([{"a": 1}], dtype=object),
    )
    with pytest.raises(ValueError, match="not a readable .npz"):
        Embeddings.load(pickled)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("0002_c1s1_000451_03.jpg", (2, 0)),
        ("/data/market1501/query/1501_c6s4_001902_01.jpg", (1501, 5)),
        ("-1_c3s2_000001_00.jpg", (-1, 2)),
        ("0000_c2s1_000001_00.jpg", (0, 1)),
        ("0005_c2_f0046985.jpg", (5, 1)),  # DukeMTMC-reID
        ("holiday.jpg", (-1, -1)),
    ],
)
def test_parse_market_name(name, expected):
    assert parse_market_name(name) == expected
