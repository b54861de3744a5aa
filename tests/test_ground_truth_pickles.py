"""Revisitop ground-truth pickles: numpy arrays and scalars accepted through the allow-list,
every other global refused without being called, damaged files one error class."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest

from ctl_jax.data.landmarks import load_revisited_ground_truth
from ctl_jax.data.plain_pickle import PlainPickleError, load_plain_pickle
from ctl_jax.data.readers import DatasetError
from ctl_jax.evaluation.revisited import revisited_metrics


def random_ground_truth(seed, num_q=6, num_db=30):
    """A revisitop-shaped ground truth of plain lists (as the published files hold)."""
    rng = np.random.default_rng(seed)
    gnd = []
    for _ in range(num_q):
        order = rng.permutation(num_db).tolist()
        easy, hard, junk = order[:4], order[4:7], order[7:9]
        box = [float(v) for v in rng.uniform(0, 50, 4).round(1)]
        gnd.append({"bbx": box, "easy": easy, "hard": hard, "junk": junk})
    return {
        "imlist": [f"db_{i:03d}" for i in range(num_db)],
        "qimlist": [f"q_{i:03d}" for i in range(num_q)],
        "gnd": gnd,
    }


def with_numpy(gnd, int_dtype=np.int64):
    """The same ground truth as numpy arrays (easy/hard/junk, bbx) and numpy scalars (bbx of
    every other query), as a NumPy re-save of the files holds them."""
    out = dict(gnd, gnd=[])
    for i, entry in enumerate(gnd["gnd"]):
        box = np.asarray(entry["bbx"], np.float64)
        out["gnd"].append(
            {
                "bbx": box if i % 2 else [np.float64(v) for v in box],
                "easy": np.asarray(entry["easy"], int_dtype),
                "hard": np.asarray(entry["hard"], int_dtype),
                "junk": np.asarray(entry["junk"], int_dtype).astype(int_dtype),
            }
        )
    # A big-endian array and an empty one read as well.
    out["gnd"][0]["junk"] = out["gnd"][0]["junk"].astype(">i4")
    out["gnd"][1]["hard"] = np.zeros(0, int_dtype)
    return out


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("int_dtype", [np.int64, np.int32, np.uint16])
def test_numpy_arrays_and_scalars_read_and_evaluate_like_lists(tmp_path, protocol, int_dtype):
    plain = random_ground_truth(protocol)
    plain["gnd"][1]["hard"] = []
    numpy_gnd = with_numpy(plain, int_dtype)
    lists_path, arrays_path = tmp_path / "gnd_lists.pkl", tmp_path / "gnd_arrays.pkl"
    lists_path.write_bytes(pickle.dumps(plain, protocol=protocol))
    arrays_path.write_bytes(pickle.dumps(numpy_gnd, protocol=protocol))
    assert b"numpy" in arrays_path.read_bytes()  # numpy's reconstructors are named
    want = load_revisited_ground_truth(lists_path)
    got = load_revisited_ground_truth(arrays_path)
    assert got.imlist == want.imlist and got.qimlist == want.qimlist
    np.testing.assert_array_equal(got.boxes, want.boxes)
    for key in ("easy", "hard", "junk"):
        for a, b in zip(getattr(got, key), getattr(want, key)):
            assert type(a) is np.ndarray and a.dtype == np.int64
            np.testing.assert_array_equal(a, b)
    rng = np.random.default_rng(1)
    q, g = rng.standard_normal((6, 8)), rng.standard_normal((30, 8))
    assert revisited_metrics(q, g, got) == revisited_metrics(q, g, want)


class _Calls:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_a_named_function_is_refused_without_being_called(tmp_path, protocol):
    marker = tmp_path / "created"
    path = tmp_path / "gnd_evil.pkl"
    for evil in (
        _Calls(os.system, f"touch {marker}"),
        _Calls(open, str(marker), "w"),
        # An allowed reconstructor around a refused one: still refused first.
        [np.arange(3), _Calls(os.system, f"touch {marker}")],
    ):
        path.write_bytes(pickle.dumps({"imlist": [], "evil": evil}, protocol=protocol))
        with pytest.raises(PlainPickleError, match=r"refused: it names (posix|os|builtins|io)\."):
            load_plain_pickle(path)
        assert not marker.exists()
        with pytest.raises(DatasetError, match="refused"):
            load_revisited_ground_truth(path)
        assert not marker.exists()


@pytest.mark.parametrize(
    "value,message",
    [
        (np.array(["a"]), r"numpy.dtype\('U1'\)"),
        (np.array([1, None], dtype=object), r"numpy.dtype\('O8'\)"),
        (np.zeros(2, [("a", "i4"), ("b", "f4")]), r"numpy.dtype\('V8'\)"),
        (np.complex64(1j), r"numpy.dtype\('c8'\)"),
        (np.datetime64("2020-01-01"), r"numpy.dtype\('M8'\)"),
    ],
)
def test_non_numeric_numpy_values_are_refused(tmp_path, value, message):
    path = tmp_path / "gnd.pkl"
    path.write_bytes(pickle.dumps({"x": value}, protocol=2))
    with pytest.raises(PlainPickleError, match=message):
        load_plain_pickle(path)


def test_array_data_must_match_its_shape(tmp_path):
    # An array state whose shape asks for far more bytes than it carries: refused before
    # numpy allocates anything for the shape.
    good = pickle.dumps(np.arange(4, dtype=np.int64), protocol=2)
    evil = good.replace(b"K\x04\x85", b"J\x00\x00\x00\x40\x85")  # shape (4,) -> (2**30,)
    assert evil != good
    path = tmp_path / "gnd.pkl"
    path.write_bytes(evil)
    with pytest.raises(PlainPickleError, match="32 bytes of data where its shape needs 8589934592"):
        load_plain_pickle(path)


def test_huge_declared_sizes_are_refused_before_allocation(tmp_path):
    path = tmp_path / "gnd.pkl"
    cases = {
        # BINBYTES8 / BINUNICODE8 declaring 2**60 bytes, then a few.
        "bytes": b"\x80\x04\x8e" + struct.pack("<Q", 2**60) + b"abc",
        "unicode": b"\x80\x04\x8d" + struct.pack("<Q", 2**60) + b"abc",
        # LONG_BINPUT at memo index 2**32 - 1: the C unpickler would size its memo by it.
        "memo": b"\x80\x02]r\xff\xff\xff\xff.",
        "frame": b"\x80\x04\x95" + struct.pack("<Q", 2**62) + b"N.",
    }
    for name, data in cases.items():
        path.write_bytes(data)
        with pytest.raises(PlainPickleError, match="not a readable pickle") as raised:
            load_plain_pickle(path)
        assert "\n" not in str(raised.value), name


def test_damaged_pickles_give_one_error_class(tmp_path):
    """Truncations and bit flips of plain and numpy ground truths: each loads (a flip in a
    string or number can leave a valid pickle) or raises DatasetError, never anything else."""
    rng = np.random.default_rng(0)
    plain = random_ground_truth(3)
    sources = [
        pickle.dumps(plain, protocol=2),
        pickle.dumps(plain, protocol=4),
        pickle.dumps(with_numpy(plain), protocol=2),
        pickle.dumps(with_numpy(plain), protocol=4),
    ]
    path = tmp_path / "gnd_fuzz.pkl"
    outcomes = {"loaded": 0, "refused": 0}
    for trial in range(400):
        data = bytearray(sources[trial % len(sources)])
        if trial % 3 == 0:
            data = data[: rng.integers(0, len(data))]
        for _ in range(rng.integers(1, 4)):
            data[rng.integers(0, len(data) or 1) % max(len(data), 1)] ^= 1 << rng.integers(0, 8)
        path.write_bytes(bytes(data))
        try:
            load_revisited_ground_truth(path)
            outcomes["loaded"] += 1
        except DatasetError as e:
            assert "\n" not in str(e) and str(path) in str(e)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 200  # the damage was mostly detected
