"""Reading PyTorch `torch.save` files without running their pickled code, and without torch.

A `.pth`/`.ckpt` file is a pickle whose tensors point at raw storages. Unpickling it normally
imports and calls whatever the pickle names, so a hostile file runs arbitrary code, and
`torch.load(weights_only=True)` refuses the original CTL checkpoints because they pickle a
yacs `CfgNode` and a Lightning `AttributeDict` next to the tensors. This reader:

  - materialises tensors as numpy arrays (the storages are read straight from the file, every
    view bounds-checked against its storage), and plain containers (dict, OrderedDict, list,
    tuple, set) and primitives;
  - turns every other name the pickle mentions into an inert `OpaqueObject` subclass that
    records the name, the constructor arguments and the state it was given. Nothing is
    imported and no function outside this module is called, so configuration objects come
    back as data that can be read (`as_mapping`) but never execute.

Both container formats are supported: the zip archive written by PyTorch >= 1.6 and the older
"legacy" pickle stream (e.g. torchvision's `resnet50-19c8e357.pth`).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import math
import pathlib
import pickle
import re
import struct
import zipfile
from typing import Any

import numpy as np

from ctl_jax.errors import MissingFileError, TorchFileError

# First pickle of a legacy file (torch/serialization.py MAGIC_NUMBER, PROTOCOL_VERSION).
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# Python 2 pickles (old legacy files) name modules by their Python 2 names.
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


def _numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes  # a jax dependency; numpy itself has no bfloat16

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


# torch dtype names (as pickled: `torch.float32`, ...) -> numpy dtype names.
_TORCH_DTYPES = {
    "float32": "float32",
    "float": "float32",
    "float64": "float64",
    "double": "float64",
    "float16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "int64": "int64",
    "long": "int64",
    "int32": "int32",
    "int": "int32",
    "int16": "int16",
    "short": "int16",
    "int8": "int8",
    "uint8": "uint8",
    "uint16": "uint16",
    "uint32": "uint32",
    "uint64": "uint64",
    "bool": "bool",
    "complex64": "complex64",
    "cfloat": "complex64",
    "complex128": "complex128",
    "cdouble": "complex128",
}
# Legacy storage classes (`torch.FloatStorage`, `torch.cuda.HalfStorage`, ...) -> dtype.
_STORAGE_TYPES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "UntypedStorage": "uint8",
}
_TORCH_MODULES = ("torch", "torch.cuda", "torch.storage")


class OpaqueObject:
    """Inert stand-in for an object of a class that the pickle names but that is not allowed.

    One subclass per pickled name (`pickled_name`, e.g. "yacs.config.CfgNode"). It accepts
    what unpickling feeds an object (constructor arguments, dict items, list items, state)
    and only stores it; none of it is interpreted. Read it with `as_mapping`.
    """

    pickled_name = "?"

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        self.args, self.kwargs = args, kwargs
        self.state: Any = None
        self.items: dict = {}
        self.elements: list = []
        return self

    def __init__(self, *args, **kwargs):  # everything happened in __new__
        pass

    def __setitem__(self, key, value):
        self.items[key] = value

    def append(self, value):
        self.elements.append(value)

    def extend(self, values):
        self.elements.extend(values)

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self.pickled_name}>"


_OPAQUE_CLASSES: dict[str, type[OpaqueObject]] = {}


def _opaque_class(full_name: str) -> type[OpaqueObject]:
    cls = _OPAQUE_CLASSES.get(full_name)
    if cls is None:
        cls = type("Opaque", (OpaqueObject,), {"pickled_name": full_name})
        _OPAQUE_CLASSES[full_name] = cls
    return cls


def as_mapping(obj: Any) -> dict | None:
    """The key/value content of a dict or of an inert dict-like object (e.g. a CfgNode)."""
    if isinstance(obj, dict):
        return obj
    if isinstance(obj, OpaqueObject):
        if obj.items:
            return obj.items
        if isinstance(obj.state, dict) and obj.state:
            return obj.state
    return None


class _Frozen:
    """Base of this module's own pickle-facing objects: a pickle's BUILD cannot alter them."""

    __slots__ = ()

    def __setstate__(self, state):
        raise pickle.UnpicklingError(f"the file tries to modify a {type(self).__name__}")


class _DType(_Frozen):
    """What a pickled torch dtype or storage class resolves to (not callable)."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, numpy_name: str):
        self.name, self.dtype = name, _numpy_dtype(numpy_name)


class _Storage(_Frozen):
    """A flat run of `numel` elements of `dtype`, backed by bytes read from the file.

    Legacy files store the bytes after the pickle, so `buffer` is filled in afterwards; a view
    storage (legacy only) refers to elements [offset, offset + numel) of its `root`.
    """

    __slots__ = ("key", "dtype", "numel", "byteorder", "buffer", "root", "offset")

    def __init__(
        self, key: str, dtype: np.dtype, numel: int, byteorder: str, root=None, offset: int = 0
    ):
        self.key, self.numel = key, numel
        self.byteorder = byteorder  # "<" or ">": how the file stores multi-byte elements
        self.dtype = dtype.newbyteorder(byteorder)
        self.buffer: bytes | None = None
        self.root, self.offset = root, offset

    def elements(self, path: pathlib.Path) -> np.ndarray:
        """The storage as a 1-D array (a view of the file bytes; not writeable)."""
        if self.root is not None:
            base = self.root.elements(path)
            if self.offset < 0 or self.offset + self.numel > base.size:
                raise TorchFileError(f"{path}: storage view {self.key} lies outside its storage")
            return base[self.offset : self.offset + self.numel]
        if self.buffer is None:
            raise TorchFileError(f"{path}: no data for storage {self.key}")
        needed = self.numel * self.dtype.itemsize
        if len(self.buffer) < needed:
            raise TorchFileError(
                f"{path}: storage {self.key} has {len(self.buffer)} bytes, needs {needed} "
                "(truncated file?)"
            )
        return np.frombuffer(self.buffer, self.dtype, count=self.numel)


class _TensorRef(_Frozen):
    """A tensor described by the pickle; turned into a numpy array once storages are read."""

    __slots__ = ("storage", "offset", "size", "stride", "dtype", "negate", "conjugate")

    def __init__(self, storage, offset, size, stride, dtype=None, metadata=None):
        if not isinstance(storage, _Storage):
            raise pickle.UnpicklingError(f"a tensor refers to {storage!r}, not a storage")
        self.storage = storage
        self.offset = _as_int(offset)
        self.size = tuple(_as_int(s) for s in size)
        self.stride = tuple(_as_int(s) for s in stride)
        if len(self.size) != len(self.stride):
            raise pickle.UnpicklingError("a tensor's size and stride differ in length")
        if dtype is not None and not isinstance(dtype, _DType):
            name = getattr(dtype, "pickled_name", repr(dtype))
            raise pickle.UnpicklingError(f"unsupported tensor dtype {name}")
        self.dtype = dtype.dtype if dtype is not None else None
        metadata = metadata if isinstance(metadata, dict) else {}
        # torch's lazy negation / conjugation bits (`torch._utils.get_tensor_metadata`).
        self.negate, self.conjugate = bool(metadata.get("neg")), bool(metadata.get("conj"))

    def to_numpy(self, path: pathlib.Path) -> np.ndarray:
        base = self.storage.elements(path)
        if self.dtype is not None and self.dtype != base.dtype:
            # `_rebuild_tensor_v3` gives the dtype separately (storage of raw bytes, which
            # carry the byte order of the file's record).
            dtype = self.dtype.newbyteorder(self.storage.byteorder)
            usable = base.nbytes - base.nbytes % dtype.itemsize
            base = base.view(np.uint8)[:usable].view(dtype)
        if self.offset < 0 or any(s < 0 for s in self.size) or any(s < 0 for s in self.stride):
            raise TorchFileError(f"{path}: a tensor has a negative size, stride or offset")
        if math.prod(self.size) == 0:
            return np.zeros(self.size, base.dtype.newbyteorder("="))
        # The largest element index the view touches must lie inside the storage; as_strided
        # itself would read whatever memory follows.
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if last >= base.size:
            raise TorchFileError(
                f"{path}: a tensor of size {self.size} reaches element {last} of a storage "
                f"with {base.size} elements"
            )
        item = base.dtype.itemsize
        array = np.lib.stride_tricks.as_strided(
            base[self.offset :], self.size, tuple(s * item for s in self.stride), writeable=False
        )
        array = np.array(array, dtype=base.dtype.newbyteorder("="), copy=True)
        if self.negate:
            array = -array
        if self.conjugate:
            array = np.conj(array)
        return array


def _as_int(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise pickle.UnpicklingError(f"expected an integer in a tensor header, got {value!r}")
    return value


# The callables a file may invoke. Each only builds `_TensorRef`s or plain containers.
def _rebuild_tensor(storage, storage_offset, size, stride):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
    return _TensorRef(storage, storage_offset, size, stride, metadata=metadata)


def _rebuild_tensor_v3(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
):
    return _TensorRef(storage, storage_offset, size, stride, dtype=dtype, metadata=metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    # `func` came through find_class, so it is one of these functions or an inert class.
    return func(*args)


def codecs_encode(text, encoding="utf-8"):
    # Protocol-2 pickles store Python 3 bytes as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise pickle.UnpicklingError(f"unexpected _codecs.encode({encoding!r}) call")
    return text.encode(encoding)


def _reconstructor(cls, base, state):
    # copyreg._reconstructor: how protocol 0/1 pickles build objects of (here: inert) classes.
    if not (isinstance(cls, type) and issubclass(cls, OpaqueObject)):
        raise pickle.UnpicklingError(f"copyreg._reconstructor on {cls!r}")
    obj = cls.__new__(cls)
    obj.state = state
    return obj


_CONTAINERS = {
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.dict": dict,
    "builtins.list": list,
    "builtins.tuple": tuple,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.complex": complex,
    "_codecs.encode": codecs_encode,
    "copyreg._reconstructor": _reconstructor,
    "torch.Size": tuple,
}
_TENSOR_FUNCTIONS = {
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter_with_state,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
}
# Modules whose functions run programs or code, or reach files, processes and the network.
# A weights file has no reason to name any of them (nor any builtin besides the containers
# above): one that does was made to run code when loaded with an ordinary unpickler. This
# reader never calls them either, but converting such a file needs the user's explicit
# consent (`TorchFile.code_names`).
_CODE_MODULES = frozenset(
    {
        "builtins", "os", "posix", "nt", "posixpath", "ntpath", "sys", "subprocess", "pty",
        "shutil", "importlib", "runpy", "code", "codeop", "pickle", "_pickle", "marshal",
        "ctypes", "types", "operator", "functools", "socket", "multiprocessing", "threading",
        "_thread", "signal", "webbrowser", "pdb", "timeit", "asyncio", "io", "_io",
        "tempfile", "pathlib", "urllib", "http", "ftplib", "smtplib", "platform", "commands",
        "numpy.testing", "torch.hub", "torch.jit",
    }
)  # fmt: skip
# Names that only appear as arguments of the functions above (ignored there).
_TENSOR_MARKERS = ("torch.Tensor", "torch.nn.parameter.Parameter")


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose `find_class` never imports: allowed names or inert classes."""

    def __init__(self, file, path: pathlib.Path, storages: dict, legacy: bool, names: dict):
        super().__init__(file, encoding="utf-8")
        self._path, self._storages, self._legacy, self._names = path, storages, legacy, names
        self.byteorder = "<"

    def find_class(self, module: str, name: str):
        module = _PY2_MODULES.get(module, module)
        full = f"{module}.{name}"
        if full in _CONTAINERS:
            self._names[full] = "container"
            return _CONTAINERS[full]
        if full in _TENSOR_FUNCTIONS:
            self._names[full] = "tensor"
            return _TENSOR_FUNCTIONS[full]
        if module in _TORCH_MODULES and (name in _STORAGE_TYPES or name in _TORCH_DTYPES):
            self._names[full] = "tensor"
            return _DType(full, _STORAGE_TYPES.get(name) or _TORCH_DTYPES[name])
        if full in _TENSOR_MARKERS:
            self._names[full] = "tensor"
            return _opaque_class(full)
        self._names[full] = "inert"
        return _opaque_class(full)

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module" and self._legacy:  # legacy whole-module pickles: (cls, file, src)
            return pid[1]
        if kind != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id type {kind!r}")
        if self._legacy:
            if len(pid) != 6:
                raise pickle.UnpicklingError(f"unexpected storage record {pid!r}")
            storage_type, key, _, numel, view = pid[1:]
        else:
            if len(pid) != 5:
                raise pickle.UnpicklingError(f"unexpected storage record {pid!r}")
            storage_type, key, _, numel = pid[1:]
            view = None
        if not isinstance(storage_type, _DType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        key, numel = str(key), _as_int(numel)
        dtype = storage_type.dtype
        storage = self._storages.get(key)
        if storage is None:
            storage = self._storages[key] = self._new_storage(key, dtype, numel)
        if view is not None:  # legacy storage views: (view_key, offset, size) in elements
            view_key, offset, size = view
            view_key = str(view_key)
            if view_key not in self._storages:
                self._storages[view_key] = _Storage(
                    view_key,
                    dtype,
                    _as_int(size),
                    self.byteorder,
                    root=storage,
                    offset=_as_int(offset),
                )
            return self._storages[view_key]
        return storage

    def _new_storage(self, key: str, dtype: np.dtype, numel: int) -> _Storage:
        return _Storage(key, dtype, numel, self.byteorder)


class _ZipUnpickler(_RestrictedUnpickler):
    """Reads each storage's bytes from `<archive>/data/<key>` when the pickle first names it."""

    def __init__(self, file, path, archive: zipfile.ZipFile, prefix: str, names: dict):
        super().__init__(file, path, {}, legacy=False, names=names)
        self._archive, self._prefix = archive, prefix

    def _new_storage(self, key, dtype, numel):
        member = f"{self._prefix}data/{key}"
        try:
            data = self._archive.read(member)
        except KeyError:
            raise TorchFileError(f"{self._path}: storage {member} is missing") from None
        storage = _Storage(key, dtype, numel, self.byteorder)
        storage.buffer = data
        return storage


@dataclasses.dataclass
class TorchFile:
    """What a PyTorch file holds, read without executing it.

    Attributes:
      path: the file.
      format: "zip" (PyTorch >= 1.6) or "legacy" (older pickle stream).
      root: the unpickled object: dicts, lists, tuples, primitives, numpy arrays for tensors,
        and `OpaqueObject`s for everything else.
      names: every global name the pickle referred to -> "tensor" (tensor machinery),
        "container" (plain containers) or "inert" (never imported; became an OpaqueObject).
      sha256: hex digest of the file.
    """

    path: pathlib.Path
    format: str
    root: Any
    names: dict[str, str]
    sha256: str

    @property
    def inert_names(self) -> list[str]:
        return sorted(n for n, kind in self.names.items() if kind == "inert")

    @property
    def code_names(self) -> list[str]:
        """The inert names of functions that run code or reach the system (`os.system`,
        `builtins.eval`, `subprocess.Popen`, ...); none in an honest weights file."""
        return [n for n in self.inert_names if is_code_name(n)]


def is_code_name(full_name: str) -> bool:
    """True for a global (`module.name`) from a module that runs code or reaches the system
    (see `_CODE_MODULES`), e.g. "posix.system", "builtins.eval", "subprocess.run"."""
    parts = full_name.split(".")
    return any(".".join(parts[:i]) in _CODE_MODULES for i in range(1, len(parts)))


def load(path: str | pathlib.Path) -> TorchFile:
    """Reads a `torch.save` file safely (see the module docstring).

    Raises:
      FileNotFoundError: no such file.
      TorchFileError: not a PyTorch file, or damaged, or truncated; or its name carries a
        hash prefix (torch.hub convention, `resnet50-19c8e357.pth`) that its content does not
        match.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingFileError(f"--source {path} does not exist or is not a file")
    digest = _sha256(path)
    _check_name_hash(path, digest)
    with open(path, "rb") as f:
        head = f.read(512)
    names: dict[str, str] = {}
    try:
        if head.startswith(b"PK\x03\x04") or zipfile.is_zipfile(path):
            fmt, root = "zip", _load_zip(path, names)
        elif head[:1] == b"\x80":
            fmt, root = "legacy", _load_legacy(path, names)
        elif len(head) > 262 and head[257:262] == b"ustar":
            raise TorchFileError(
                f"{path}: a tar archive (the PyTorch < 0.4 format), which is not supported; "
                "load and re-save it with a recent torch"
            )
        else:
            raise TorchFileError(
                f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle stream)"
            )
        root = _materialise(root, path, {})
    except TorchFileError:
        raise
    except (EOFError, zipfile.BadZipFile, struct.error) as e:
        raise TorchFileError(f"{path}: damaged or truncated PyTorch file ({e})") from e
    except pickle.UnpicklingError as e:
        raise TorchFileError(f"{path}: unreadable pickle data ({e})") from e
    except (TypeError, AttributeError, KeyError, IndexError, ValueError, OverflowError) as e:
        # Malformed pickle programs surface as errors of the operation they misuse.
        raise TorchFileError(f"{path}: malformed pickle data ({type(e).__name__}: {e})") from e
    return TorchFile(path, fmt, root, names, digest)


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# At least one letter, so that dates (`model-20210511.pth`) are not taken for hashes.
_NAME_HASH = re.compile(r"-((?=[0-9a-f]*[a-f])[0-9a-f]{8,64})\.")


def name_hash(path: pathlib.Path) -> str | None:
    """The sha256 prefix in a torch.hub style name (`resnet50-19c8e357.pth`), if any."""
    match = _NAME_HASH.search(path.name)
    return match.group(1) if match else None


def _check_name_hash(path: pathlib.Path, digest: str) -> None:
    """torch.hub names files `<name>-<first sha256 hex digits>.<ext>`; check that prefix."""
    expected = name_hash(path)
    if expected and not digest.startswith(expected):
        raise TorchFileError(
            f"{path}: its SHA-256 {digest[:16]}... does not start with {expected}, the "
            "hash in its name: the file is damaged or not the published one (download it again)"
        )


def _load_zip(path: pathlib.Path, names: dict) -> Any:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise TorchFileError(f"{path}: truncated or damaged zip archive ({e})") from e
    with archive:
        members = archive.namelist()
        pickles = [m for m in members if m == "data.pkl" or re.fullmatch(r"[^/]+/data\.pkl", m)]
        if len(pickles) != 1:
            raise TorchFileError(f"{path}: a zip archive without a torch.save data.pkl record")
        prefix = pickles[0][: -len("data.pkl")]
        if f"{prefix}constants.pkl" in members or any(
            m.startswith(f"{prefix}code/") for m in members
        ):
            raise TorchFileError(
                f"{path}: a TorchScript archive (torch.jit.save), not torch.save weights; "
                "save `model.state_dict()` with torch.save instead"
            )
        order = archive.read(f"{prefix}byteorder") if f"{prefix}byteorder" in members else b"little"
        if order not in (b"little", b"big"):
            raise TorchFileError(f"{path}: unknown byte order record {order!r}")
        unpickler = _ZipUnpickler(
            io.BytesIO(archive.read(pickles[0])), path, archive, prefix, names
        )
        unpickler.byteorder = "<" if order == b"little" else ">"
        return unpickler.load()


def _load_legacy(path: pathlib.Path, names: dict) -> Any:
    data = path.read_bytes()
    stream = io.BytesIO(data)
    storages: dict[str, _Storage] = {}

    def header():
        return _RestrictedUnpickler(stream, path, {}, legacy=True, names={}).load()

    if header() != _LEGACY_MAGIC:
        raise TorchFileError(f"{path}: a pickle, but not a PyTorch file (no torch magic number)")
    if header() != _LEGACY_PROTOCOL:
        raise TorchFileError(f"{path}: unsupported legacy PyTorch protocol version")
    header()  # sys_info: endianness and C type sizes; storages are little-endian regardless
    root = _RestrictedUnpickler(stream, path, storages, legacy=True, names=names).load()
    keys = header()
    if not isinstance(keys, list):
        raise TorchFileError(f"{path}: damaged storage index")
    # Raw storages follow in `keys` order: int64 element count, then the elements.
    position = stream.tell()
    for key in keys:
        storage = storages.get(str(key))
        if storage is None or storage.root is not None:
            raise TorchFileError(f"{path}: storage {key} is listed but never used")
        if position + 8 > len(data):
            raise TorchFileError(f"{path}: truncated file (storage {key} is missing)")
        (count,) = struct.unpack_from("<q", data, position)
        nbytes = count * storage.dtype.itemsize
        if count != storage.numel:
            raise TorchFileError(
                f"{path}: storage {key} has {count} elements, expected {storage.numel}"
            )
        if position + 8 + nbytes > len(data):
            raise TorchFileError(f"{path}: truncated file (storage {key} is incomplete)")
        storage.buffer = memoryview(data)[position + 8 : position + 8 + nbytes]
        position += 8 + nbytes
    return root


def _materialise(obj: Any, path: pathlib.Path, seen: dict[int, Any]) -> Any:
    """Replaces every `_TensorRef` in a container tree by its numpy array (shared refs once)."""
    key = id(obj)
    if key in seen:
        return seen[key]
    if isinstance(obj, _TensorRef):
        seen[key] = obj.to_numpy(path)
        return seen[key]
    if isinstance(obj, dict):
        seen[key] = obj
        for k in list(obj):
            obj[k] = _materialise(obj[k], path, seen)
    elif isinstance(obj, list):
        seen[key] = obj
        obj[:] = [_materialise(v, path, seen) for v in obj]
    elif isinstance(obj, tuple):
        seen[key] = obj  # placeholder against cycles through mutable members
        seen[key] = type(obj)(_materialise(v, path, seen) for v in obj)
    elif isinstance(obj, OpaqueObject):
        seen[key] = obj
        obj.args = _materialise(obj.args, path, seen)
        obj.kwargs = _materialise(obj.kwargs, path, seen)
        obj.state = _materialise(obj.state, path, seen)
        obj.items = _materialise(obj.items, path, seen)
        obj.elements = _materialise(obj.elements, path, seen)
    return seen[key] if key in seen else obj
