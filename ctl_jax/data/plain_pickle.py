"""Reading pickles that may hold only plain data: the ground truth of Revisited Oxford/Paris.

`gnd_roxford5k.pkl` and `gnd_rparis6k.pkl` are Python pickles of lists, dicts, strings and
numbers, and copies of them re-saved with NumPy hold numpy arrays and scalars. Unpickling
can run arbitrary code (any importable callable can be named in the file), so
`load_plain_pickle` resolves globals from an allow-list only, as the PyTorch reader does
(`ctl_jax.weights.torch_pickle`): numpy's array, scalar and dtype reconstructors, each
behind a guard that checks its arguments (numeric dtypes only, data exactly as long as the
shape says; numpy's own dtype `__setstate__` is never run) before numpy builds anything,
and `_codecs.encode` and an argument-less `bytes()` (how protocol-2 pickles carry bytes and
b""). Protocol-5 array pickles (`numpy._core.numeric._frombuffer`) are not accepted. A file
that names anything else (a custom class, `os.system`, ...) is refused before that name is
resolved, and the result is checked to hold nothing but plain containers, scalars and
numeric arrays.

A damaged file is one `PlainPickleError` whatever the damage: the opcodes are scanned first
(`pickletools`, which reads only the bytes present), so a huge declared length or memo
index is refused before the C unpickler would allocate for it.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import pickletools
import re

import numpy as np

from ctl_jax.errors import MissingFileError
from ctl_jax.weights.torch_pickle import codecs_encode

# Types a plain pickle may produce without naming any global.
PLAIN_TYPES = (dict, list, tuple, str, int, float, bool, type(None))
# numpy dtype kinds accepted: bool, signed and unsigned integers, floats.
_NUMERIC_KINDS = "biuf"
# What numpy passes to numpy.dtype when it pickles a numeric dtype: "i8", "f4", "b1", "?".
_DTYPE_CODE = re.compile(r"[biuf]\d{1,2}|\?")
_ACCEPTED = "only lists, dicts, strings, numbers and numeric numpy arrays are accepted"


class PlainPickleError(ValueError):
    """A pickle names a class or function, or holds something other than plain data."""


class _Refused(pickle.UnpicklingError):
    """The pickle names something that is not plain data."""


def _numeric(dtype) -> bool:
    """A dtype numpy may build an array or scalar of here: bool, int, uint or float."""
    return (
        isinstance(dtype, np.dtype)
        and dtype.kind in _NUMERIC_KINDS
        and dtype.fields is None
        and dtype.subdtype is None
    )


def _raw_bytes(data, expected: int, what: str) -> bytes:
    """`data` as bytes (a Python 2 pickle's str arrives as latin-1 text), of `expected`
    length exactly: checked before numpy sees it, so a shape never sizes an allocation."""
    if isinstance(data, str):
        data = data.encode("latin1")
    if not isinstance(data, bytes):
        raise _Refused(f"{what}: its data is a {type(data).__name__}, not bytes")
    if len(data) != expected:
        raise _Refused(f"{what}: {len(data)} bytes of data where its shape needs {expected}")
    return data


class _DType:
    """What `numpy.dtype(code, align, copy)` gives here: the code, and the byte order the
    pickle's state then sets. numpy's own `dtype.__setstate__` is never called: a damaged
    state (its flags, sizes, fields) would corrupt the dtype numpy then computes with."""

    def __init__(self, code, align=False, copy=True):
        if not isinstance(code, str) or not _DTYPE_CODE.fullmatch(code):
            raise _Refused(f"it builds numpy.dtype({code!r}), not a numeric dtype")
        self.code, self.order = code, "="

    def __setstate__(self, state):
        # numpy writes (3, order, None, None, None, -1, -1, 0) for these dtypes.
        if (
            not isinstance(state, tuple)
            or len(state) != 8
            or state[0] not in (3, 4)
            or state[1] not in ("<", ">", "|", "=")
            or state[2:] != (None, None, None, -1, -1, 0)
        ):
            raise _Refused(f"numpy.dtype({self.code!r}) with an unexpected state")
        self.order = state[1]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.code).newbyteorder(self.order)


def _as_dtype(spec, what: str) -> np.dtype:
    if not isinstance(spec, _DType):
        raise _Refused(f"{what} of dtype {spec!r}")
    return spec.dtype


def _scalar(dtype, data):
    """Guarded `numpy.core.multiarray.scalar(dtype, data)`: a numeric dtype and exactly
    its itemsize of bytes."""
    dtype = _as_dtype(dtype, "a numpy scalar")
    data = _raw_bytes(data, dtype.itemsize, "a numpy scalar")
    return np.frombuffer(data, dtype)[0]


class _Array(np.ndarray):
    """The empty array `_reconstruct` gives; pickle's BUILD then calls `__setstate__`,
    which checks the state before numpy's own fills the array."""

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _Refused("a numpy array with an unexpected state")
        shape, dtype, fortran, data = state[-4:]
        if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
            raise _Refused(f"a numpy array of shape {shape!r}")
        dtype = _as_dtype(dtype, "a numpy array")
        size = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
        data = _raw_bytes(data, size, f"a numpy array of shape {shape}")
        super().__setstate__((shape, dtype, bool(fortran), data))


def _reconstruct(subtype, shape, dtype):
    """Guarded `numpy.core.multiarray._reconstruct`: an empty ndarray (numpy always pickles
    `_reconstruct(ndarray, (0,), b"b")`), filled by `_Array.__setstate__`."""
    if subtype is not np.ndarray:
        raise _Refused(f"it reconstructs {subtype!r}, not a numpy.ndarray")
    return np.ndarray.__new__(_Array, (0,), np.uint8)


def _empty_bytes(*args):
    """Guarded `bytes()`: how protocol-2 pickles write b"" (an empty array's data)."""
    if args:
        raise _Refused("it calls bytes() with arguments")
    return b""


# The only globals a ground-truth pickle may name (numpy 1.x and 2.x module names).
_ALLOWED = {
    "numpy.core.multiarray._reconstruct": _reconstruct,
    "numpy._core.multiarray._reconstruct": _reconstruct,
    "numpy.core.multiarray.scalar": _scalar,
    "numpy._core.multiarray.scalar": _scalar,
    "numpy.ndarray": np.ndarray,
    "numpy.dtype": _DType,
    "_codecs.encode": codecs_encode,
    "__builtin__.bytes": _empty_bytes,
    "builtins.bytes": _empty_bytes,
}


class _AllowListUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the `_ALLOWED` names and refuses every other global.

    Objects other than the built-in containers and scalars can only enter a pickle through
    `find_class` (opcodes GLOBAL, STACK_GLOBAL, INST, EXT*) or `persistent_load`.
    """

    def find_class(self, module, name):
        found = _ALLOWED.get(f"{module}.{name}")
        if found is None:
            raise _Refused(f"it names {module}.{name}")
        return found

    def persistent_load(self, pid):
        raise _Refused("it holds a persistent id")


def _check_opcodes(data: bytes) -> None:
    """Scans the opcodes (reading only the bytes present) and refuses a memo index beyond
    the number of opcodes before it: the C unpickler sizes its memo by the index, and a
    declared length longer than the file is refused here (pickletools reads no further)."""
    count = 0
    for opcode, arg, _ in pickletools.genops(data):
        count += 1
        if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and not 0 <= int(arg) <= count:
            raise ValueError(f"memo index {arg} at opcode {count}")


def load_plain_pickle(path: str | os.PathLike):
    """The object in the pickle file `path`, which may hold only plain data.

    Raises:
      FileNotFoundError: no such file.
      PlainPickleError: the file is not a pickle or is damaged, names a class or function
        other than numpy's array and scalar reconstructors (which would run code when
        loaded), or holds other types than dict, list, tuple, str, int, float, bool, None
        and numeric numpy arrays and scalars; one line naming the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"ground-truth file {path} does not exist")
    with open(path, "rb") as f:
        data = f.read()
    try:
        _check_opcodes(data)
        # latin-1: Python 2 pickles' str (names, and numpy data) decode byte for byte.
        obj = _AllowListUnpickler(io.BytesIO(data), encoding="latin1").load()
    except _Refused as e:
        raise PlainPickleError(f"{path}: refused: {e}; {_ACCEPTED}") from e
    except Exception as e:  # noqa: BLE001 - nothing but the allow-list can run: damage
        # A damaged stream fails in many ways (AttributeError from BUILD or APPEND on the
        # wrong object, RecursionError, struct and Unicode errors, ...).
        raise PlainPickleError(
            f"{path}: not a readable pickle ({type(e).__name__}: {_first_line(e)})"
        ) from e
    bad = _first_non_plain(obj)
    if bad is not None:
        raise PlainPickleError(f"{path}: holds a {type(bad).__name__}; {_ACCEPTED}")
    return obj


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else ""


def _first_non_plain(obj):
    """The first value in `obj` (searched depth first, without recursion) that is not plain
    data or a numeric numpy array or scalar.

    A pickle can build containers that hold themselves; each container is visited once.
    """
    stack, seen = [obj], set()
    while stack:
        item = stack.pop()
        if isinstance(item, (np.ndarray, np.generic)):
            if not _numeric(item.dtype):
                return item
            continue
        if type(item) not in PLAIN_TYPES:
            return item
        if isinstance(item, (dict, list, tuple)):
            if id(item) in seen:
                continue
            seen.add(id(item))
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return None
