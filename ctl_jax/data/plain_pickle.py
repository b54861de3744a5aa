"""Reading pickles that may hold only plain data: the ground truth of Revisited Oxford/Paris.

`gnd_roxford5k.pkl` and `gnd_rparis6k.pkl` are Python pickles of lists, dicts, strings and
numbers. Unpickling can run arbitrary code (any importable callable can be named in the
file), so `load_plain_pickle` resolves no global at all: a file that names a class or a
function (a numpy array, a custom object, `os.system`, ...) is refused before anything of
it is built, and the result is checked to hold nothing but plain containers and scalars.
"""

from __future__ import annotations

import io
import os
import pickle

from ctl_jax.errors import MissingFileError

# Types a plain pickle may produce without naming any global.
PLAIN_TYPES = (dict, list, tuple, str, int, float, bool, type(None))


class PlainPickleError(ValueError):
    """A pickle names a class or function, or holds something other than plain data."""


class _Refused(pickle.UnpicklingError):
    """The pickle names something that is not plain data."""


class _NoGlobalsUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global (classes, functions, copyreg extensions).

    Objects other than the built-in containers and scalars can only enter a pickle through
    `find_class` (opcodes GLOBAL, STACK_GLOBAL, INST, EXT*) or `persistent_load`; both refuse.
    """

    def find_class(self, module, name):
        raise _Refused(f"it names {module}.{name}")

    def persistent_load(self, pid):
        raise _Refused("it holds a persistent id")


def load_plain_pickle(path: str | os.PathLike):
    """The object in the pickle file `path`, which may hold only plain data.

    Raises:
      FileNotFoundError: no such file.
      PlainPickleError: the file is not a pickle, names a class or function (which would
        run code when loaded), or holds other types than dict, list, tuple, str, int,
        float, bool and None; the message names the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"ground-truth file {path} does not exist")
    with open(path, "rb") as f:
        data = f.read()
    try:
        obj = _NoGlobalsUnpickler(io.BytesIO(data)).load()
    except _Refused as e:
        raise PlainPickleError(
            f"{path}: refused: {e}; only lists, dicts, strings and numbers are accepted"
        ) from e
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        OverflowError,
    ) as e:
        raise PlainPickleError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from e
    bad = _first_non_plain(obj)
    if bad is not None:
        raise PlainPickleError(
            f"{path}: holds a {type(bad).__name__}; only lists, dicts, strings and numbers "
            "are accepted"
        )
    return obj


def _first_non_plain(obj):
    """The first value in `obj` (searched depth first, without recursion) that is not plain.

    A pickle can build containers that hold themselves; each container is visited once.
    """
    stack, seen = [obj], set()
    while stack:
        item = stack.pop()
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
