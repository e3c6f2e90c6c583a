"""A restricted unpickler for torch checkpoints: tensors and metadata come out, no pickled code ever runs.

`torch.load(weights_only=True)` refuses files whose pickle names a class it does not know (the official
XTTS-v2 `model.pth` pickles a `TTS.tts.configs.xtts_config.XttsConfig`; older files hold numpy scalars,
`argparse.Namespace`, OmegaConf configs). This unpickler reads them without importing or calling anything
from the file:

* Allow-list. Only constructors known to be harmless run: `collections.OrderedDict`/`Counter`, torch dtypes,
  `torch.Size`, `torch.device`, the tensor rebuild functions (`torch._utils._rebuild_tensor[_v2|_v3]`,
  `_rebuild_parameter[_with_state]`, `torch._tensor._rebuild_from_type_v2`, `torch.nn.Parameter(tensor)`
  (it is its tensor), numpy scalar/array/dtype
  reconstruction (numpy's own parsers on bytes), `datetime`, `set`, `frozenset`, `complex`, `bytearray`,
  `_codecs.encode(str, "latin1")`, `copyreg._reconstructor`/`__newobj__` over inert classes.
* Tensors are never built. A tensor rebuild yields a `TensorRecord` (storage key, element offset, shape,
  stride, dtype) and a storage (torch's persistent id) yields a `StorageRecord`; the format readers map those
  to byte offsets in the file and read through `MappedFile`, like every other format.
* Inert records. Any other global is resolved to a stand-in class named after it; the named module is never
  imported. Building one (NEWOBJ, or REDUCE/INST with arguments when the name looks like a class, i.e. its
  last dotted part starts with an upper-case letter after any underscores) gives an `InertObject` holding the
  class name, the constructor arguments and the BUILD state. Nothing of the real class runs.
* Refusals (`CheckpointError` naming the file and the global): any reference to a module that can run
  commands, touch files or load code (`os`, `posix`, `subprocess`, `builtins` beyond the plain types,
  `shutil`, `sys`, `importlib`, `pty`, `socket`, `pickle`, `marshal`, `functools`, `operator`, `io`, ...),
  and any call of a global that looks like a function (lower-case last part) outside the allow-list.
  A stand-in used as a plain value (never called) is kept as a reference record.

JSON shape of what comes out (`to_jsonable` in containers.py; `plain_config` there strips the markers):

* inert object: ``{"__class__": "module.Qualname", **fields}`` where `fields` is the BUILD state when it is
  a dict (or the merged ``(dict, slots)`` pair); optional extra keys: ``"__args__": [...]`` (constructor
  arguments), ``"__state__": value`` (a BUILD state that is not a dict), ``"__items__": {...}`` (items set on
  a dict subclass), ``"__list__": [...]`` (items appended to a list or set subclass). An OmegaConf
  `DictConfig`/`ListConfig` keeps its `__class__` marker but its fields are its content, with nodes
  replaced by their values.
* a global named but never called: ``{"__global__": "module.name"}``.
* numpy scalars become Python scalars; small numpy arrays lists; datetimes ISO strings; torch dtypes strings.
"""

from __future__ import annotations

import _compat_pickle
import collections
import datetime
import io
import math
import pickle
import struct
from pathlib import Path
from typing import Callable

import torch

from streammerge.errors import CheckpointError
from streammerge.io.mapped import MappedFile, TensorInfo, check_span
from streammerge.memory import MemoryCheckedFile


# Top-level modules that can run commands, touch files or load code: even naming one refuses the file.
DANGEROUS_MODULES = {
    "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "_posixsubprocess", "sys", "builtins",
    "__builtin__", "shutil", "importlib", "imp", "pkgutil", "zipimport", "runpy", "code", "codeop", "pty", "tty",
    "termios", "socket", "_socket", "ssl", "select", "selectors", "asyncio", "http", "urllib", "urllib2",
    "ftplib", "smtplib", "telnetlib", "xmlrpc", "webbrowser", "ctypes", "_ctypes", "cffi", "pickle", "_pickle",
    "cPickle", "marshal", "dill", "cloudpickle", "shelve", "dbm", "sqlite3", "types", "functools", "operator",
    "_operator", "io", "_io", "tempfile", "glob", "zipfile", "tarfile", "multiprocessing", "threading",
    "_thread", "signal", "resource", "fcntl", "mmap", "gc", "weakref", "atexit", "inspect", "site", "sysconfig",
    "distutils", "setuptools", "pip", "pdb", "bdb", "timeit", "trace", "ast", "linecache", "tokenize", "codecs",
    "_codecs", "copyreg", "copy_reg", "copy", "platform", "logging", "warnings", "_winapi", "winreg", "msvcrt",
    "commands", "popen2", "pexpect", "paramiko", "requests",
}

# Plain builtin types that may be named (as the base in copyreg._reconstructor and the like) but not called.
BUILTIN_TYPE_NAMES = {"object", "dict", "list", "tuple", "int", "float", "str", "bool", "bytes", "NoneType"}

# Torch tensor kinds streammerge does not read: named so the refusal says what the file holds.
UNSUPPORTED_REBUILDS = {
    "_rebuild_qtensor": "a quantized tensor",
    "_rebuild_sparse_tensor": "a sparse tensor",
    "_rebuild_nested_tensor": "a nested tensor",
    "_rebuild_meta_tensor_no_storage": "a meta tensor (no data)",
    "_rebuild_wrapper_subclass": "a tensor subclass without storage",
    "_rebuild_device_tensor_from_numpy": "a device tensor stored through numpy",
    "_rebuild_device_tensor_from_cpu_tensor": "a device tensor",
    "_rebuild_xla_tensor": "an XLA tensor",
    "_rebuild_mtia_tensor": "an MTIA tensor",
}

STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexDoubleStorage": torch.complex128, "ComplexFloatStorage": torch.complex64,
    "UntypedStorage": torch.uint8,
}
TORCH_DTYPES = {str(t).removeprefix("torch."): t for t in vars(torch).values() if isinstance(t, torch.dtype)}


# ---------------------------------------------------------------------------------------------------------------
# What the unpickler produces instead of live objects

class StorageType:
    """A torch storage class named in a persistent id (`torch.FloatStorage`, `torch.UntypedStorage`, ...)."""

    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype

    def __repr__(self):
        return f"torch.{self.name}"


class StorageRecord:
    """One storage of the file: its key (zip member `data/<key>`, or legacy storage key) and its size."""

    __slots__ = ("key", "dtype", "numel", "location", "view_offset")

    def __init__(self, key: str, dtype: torch.dtype, numel: int, location: str, view_offset: int = 0):
        self.key, self.dtype, self.numel, self.location, self.view_offset = key, dtype, numel, location, view_offset

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class TensorRecord:
    """A tensor as the pickle describes it; its data is never read here."""

    __slots__ = ("storage", "offset", "shape", "stride", "dtype")

    def __init__(self, storage: StorageRecord, offset: int, shape: tuple, stride: tuple, dtype: torch.dtype):
        self.storage, self.offset, self.shape, self.stride, self.dtype = storage, offset, shape, stride, dtype

    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel() * self.dtype.itemsize

    @property
    def is_contiguous(self) -> bool:
        expected = 1
        for n, s in reversed(list(zip(self.shape, self.stride))):
            if n != 1 and s != expected:
                return self.numel() == 0
            expected *= n
        return True

    def __repr__(self):
        return f"TensorRecord(shape={list(self.shape)}, dtype={self.dtype}, storage={self.storage.key!r})"


class _InertMeta(type):
    """Metaclass of the stand-ins: calling one (REDUCE, INST) builds an inert record only for class names."""

    def __call__(cls, *args, **kwargs):
        if not looks_like_class(cls._global_name):
            raise cls._refuse_call()
        return cls.__new__(cls, *args, **kwargs)


class InertObject(metaclass=_InertMeta):
    """An instance of a class that was never imported: its class name and what the pickle gave it, as data."""

    __slots__ = ("args", "kwargs", "fields", "state", "items", "listitems")
    _global_name = "InertObject"
    _refuse_call: Callable = None

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.args, self.kwargs = args, kwargs
        self.fields, self.state, self.items, self.listitems = {}, None, {}, []
        return self

    @property
    def class_name(self) -> str:
        return type(self)._global_name

    # The pickle protocol's hooks, so BUILD/SETITEMS/APPENDS on a dict, list or set subclass land as data.
    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            for part in state:
                self.fields.update(part or {})
        elif isinstance(state, dict):
            self.fields.update(state)
        else:
            self.state = state

    def __setitem__(self, key, value):
        self.items[key] = value

    def append(self, value):
        self.listitems.append(value)

    def extend(self, values):
        self.listitems.extend(values)

    add = append

    def __repr__(self):
        return f"<inert {self.class_name}>"


def looks_like_class(global_name: str) -> bool:
    return global_name.rpartition(".")[2].lstrip("_")[:1].isupper()


def is_inert_class(obj) -> bool:
    return isinstance(obj, type) and issubclass(obj, InertObject)


# ---------------------------------------------------------------------------------------------------------------
# The unpickler

class RestrictedUnpickler(pickle._Unpickler):
    """An unpickler whose globals come only from the allow-list or inert stand-ins.

    Built on pickle's Python implementation, whose memo is a dict: the C unpickler keeps its memo as an array
    sized by the largest index a pickle names, so a 9-byte pickle holding LONG_BINPUT 2**25 made it allocate
    and clear 512 MiB (2**31: 16 GiB) before reading anything else. About half as fast as the C one on a state
    dict's pickle (tensor records cost more than opcodes), and only files torch's weights_only loader refuses
    come here."""

    def __init__(self, file, path: Path, persistent_load: Callable | None = None):
        super().__init__(file)
        self.path = Path(path)
        self._persistent = persistent_load
        self._stubs: dict[str, type] = {}
        self._safe = self._safe_globals()

    # -- errors --------------------------------------------------------------------------------------------------
    def refuse(self, global_name: str, why: str) -> CheckpointError:
        return CheckpointError(
            f"{self.path}: the checkpoint's pickle {why} '{global_name}'. streammerge never runs code from a "
            "checkpoint, so it refuses this file (nothing from it was executed). If the file may come from "
            "someone you do not trust, do not load it with torch.load(weights_only=False) either; if you trust "
            "it, re-save only its tensors and plain data (e.g. torch.save({'model': ckpt['model']}, path)).")

    # -- globals -------------------------------------------------------------------------------------------------
    def find_class(self, module: str, name: str):
        if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names written by protocol 0-2 pickles
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        if full in self._safe:
            return self._safe[full]
        if module in ("torch._utils", "torch._tensor") and name in UNSUPPORTED_REBUILDS:
            raise CheckpointError(
                f"{self.path}: the checkpoint holds {UNSUPPORTED_REBUILDS[name]} ({full}), which streammerge does "
                "not read. Convert it to plain dense tensors first (e.g. tensor.dequantize() / .to_dense()).")
        if module in ("builtins", "__builtin__") and name in BUILTIN_TYPE_NAMES:
            return self._stub(full)
        if module.partition(".")[0] in DANGEROUS_MODULES:
            raise self.refuse(full, f"refers to a global of module '{module}', which can run commands, touch files "
                              "or load code:")
        return self._stub(full)

    def _stub(self, full: str) -> type:
        stub = self._stubs.get(full)
        if stub is None:
            module, _, qualname = full.rpartition(".")
            def refuse(full=full):
                return self.refuse(full, "calls a function (only classes become inert records; functions are never "
                                         "called):")
            stub = _InertMeta(qualname, (InertObject,), {
                "__slots__": (), "__module__": module, "__qualname__": qualname,
                "_global_name": full, "_refuse_call": staticmethod(refuse)})
            self._stubs[full] = stub
        return stub

    def persistent_load(self, pid):
        if self._persistent is None:
            raise CheckpointError(f"{self.path}: the pickle refers to external data ({str(pid)[:80]}) but this "
                                  "file format has none; the file is corrupt.")
        return self._persistent(pid)

    # -- the allow-list ------------------------------------------------------------------------------------------
    def _safe_globals(self) -> dict:
        safe = {
            "collections.OrderedDict": collections.OrderedDict,
            "collections.Counter": collections.Counter,
            "collections.defaultdict": _defaultdict,
            "collections.deque": _deque,
            "builtins.set": _checked(set, "set", (list, tuple, set, frozenset)),
            "builtins.frozenset": _checked(frozenset, "frozenset", (list, tuple, set, frozenset)),
            "builtins.complex": _checked(complex, "complex", (int, float)),
            "builtins.slice": _checked(slice, "slice", (int, type(None))),
            "builtins.bytearray": _bytearray,
            "_codecs.encode": self._latin1_encode,
            "copyreg._reconstructor": self._reconstructor,
            "copyreg.__newobj__": self._newobj,
            "copyreg.__newobj_ex__": self._newobj_ex,
            "torch.Size": _torch_size,
            "torch.device": _torch_device,
            "torch._utils._rebuild_tensor": self._rebuild_tensor,
            "torch._utils._rebuild_tensor_v2": self._rebuild_tensor_v2,
            "torch._utils._rebuild_tensor_v3": self._rebuild_tensor_v3,
            "torch._utils._rebuild_parameter": self._rebuild_parameter,
            "torch._utils._rebuild_parameter_with_state": self._rebuild_parameter_with_state,
            "torch._tensor._rebuild_from_type_v2": self._rebuild_from_type_v2,
            # A Parameter built by REDUCE (`Parameter(tensor, requires_grad)`) is its tensor, as torch.load
            # returns it; only a tensor record is accepted as its data.
            "torch.nn.parameter.Parameter": self._parameter,
            "torch.nn.Parameter": self._parameter,
            "datetime.datetime": datetime.datetime,
            "datetime.date": datetime.date,
            "datetime.time": datetime.time,
            "datetime.timedelta": datetime.timedelta,
            "datetime.timezone": datetime.timezone,
        }
        for name, dtype in TORCH_DTYPES.items():
            safe[f"torch.{name}"] = dtype
        for name, dtype in STORAGE_DTYPES.items():
            safe[f"torch.{name}"] = StorageType(name, dtype)
        safe["torch.storage.UntypedStorage"] = StorageType("UntypedStorage", torch.uint8)
        try:
            safe.update(_numpy_globals(self))
        except ImportError:  # pragma: no cover  (numpy is a dependency)
            pass
        return safe

    def _latin1_encode(self, text, encoding="utf-8", errors="strict"):
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise self.refuse("_codecs.encode", "calls with arguments other than (str, 'latin1')")
        return text.encode("latin1")

    def _reconstructor(self, cls, base, state):
        if not is_inert_class(cls):
            raise self.refuse("copyreg._reconstructor", f"rebuilds {getattr(cls, '__name__', cls)!r} through")
        obj = cls.__new__(cls)
        if state is not None:
            obj.state = state
        return obj

    def _newobj(self, cls, *args):
        if not is_inert_class(cls):
            raise self.refuse("copyreg.__newobj__", f"constructs {getattr(cls, '__name__', cls)!r} through")
        return cls.__new__(cls, *args)

    def _newobj_ex(self, cls, args, kwargs):
        if not is_inert_class(cls):
            raise self.refuse("copyreg.__newobj_ex__", f"constructs {getattr(cls, '__name__', cls)!r} through")
        return cls.__new__(cls, *args, **kwargs)

    # -- tensors -------------------------------------------------------------------------------------------------
    def _tensor(self, storage, storage_offset, size, stride, dtype=None) -> TensorRecord:
        if not isinstance(storage, StorageRecord):
            raise CheckpointError(f"{self.path}: a tensor in the pickle has no storage in the file "
                                  f"({type(storage).__name__}); the file is corrupt or not a torch checkpoint.")
        try:
            shape = tuple(int(n) for n in size)
            strides = tuple(int(s) for s in stride)
            offset = int(storage_offset)
        except (TypeError, ValueError):
            raise CheckpointError(f"{self.path}: a tensor in the pickle has a malformed shape or stride "
                                  f"({size!r}, {stride!r}); the file is corrupt.") from None
        if len(shape) != len(strides) or min(shape + strides + (offset,), default=0) < 0:
            raise CheckpointError(f"{self.path}: a tensor in the pickle has shape {list(shape)}, stride "
                                  f"{list(strides)}, offset {offset}; the file is corrupt.")
        dtype = storage.dtype if dtype is None else dtype
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{self.path}: a tensor in the pickle has dtype {dtype!r}; the file is corrupt.")
        return TensorRecord(storage, offset, shape, strides, dtype)

    def _rebuild_tensor(self, storage, storage_offset, size, stride):
        return self._tensor(storage, storage_offset, size, stride)

    def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                           metadata=None):
        return self._tensor(storage, storage_offset, size, stride)

    def _rebuild_tensor_v3(self, storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                           metadata=None):
        return self._tensor(storage, storage_offset, size, stride, dtype)

    def _parameter(self, data=None, requires_grad=True):
        if not isinstance(data, TensorRecord):
            raise CheckpointError(f"{self.path}: the pickle builds a torch Parameter from {type(data).__name__}, "
                                  "not from a tensor; the file is corrupt or not a torch checkpoint.")
        return data

    def _rebuild_parameter(self, data, requires_grad=True, backward_hooks=None):
        return data

    def _rebuild_parameter_with_state(self, data, requires_grad, backward_hooks, state):
        return data

    def _rebuild_from_type_v2(self, func, new_type, args, state):
        rebuilds = (self._rebuild_tensor, self._rebuild_tensor_v2, self._rebuild_tensor_v3,
                    self._rebuild_parameter, self._rebuild_parameter_with_state)
        if func not in rebuilds:
            raise self.refuse("torch._tensor._rebuild_from_type_v2", f"rebuilds a tensor with {func!r} through")
        return func(*args)


def _checked(ctor, name: str, arg_types: tuple):
    def build(*args):
        if not all(isinstance(a, arg_types) for a in args):
            raise pickle.UnpicklingError(f"builtins.{name} called with {[type(a).__name__ for a in args]}")
        return ctor(*args)
    return build


def _bytearray(data=b"", *rest):
    if isinstance(data, str) and rest:
        return bytearray(data, *rest[:2])
    if not isinstance(data, (bytes, bytearray, list)):
        raise pickle.UnpicklingError(f"builtins.bytearray called with {type(data).__name__}")
    return bytearray(data)


def _defaultdict(default_factory=None, *items):
    """A defaultdict comes out as a plain dict: its factory is never kept, let alone called."""
    return dict(*items)


def _deque(items=(), maxlen=None):
    return list(items)


def _torch_size(dims=()):
    return tuple(int(d) for d in dims)


def _torch_device(kind, index=None):
    return f"{kind}:{index}" if index is not None else str(kind)


def _numpy_globals(unpickler: RestrictedUnpickler) -> dict:
    """numpy's scalar, array and dtype reconstruction: numpy's own parsers over bytes, nothing else."""
    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray

    def reconstruct(subtype, shape, dtype_code):
        if subtype is ndarray_ref:  # numpy always writes an empty array here, then BUILD fills it
            if tuple(shape) != (0,):
                raise pickle.UnpicklingError(f"numpy array reconstruction with shape {shape!r}")
            return multiarray._reconstruct(np.ndarray, (0,), dtype_code)
        if is_inert_class(subtype):
            return subtype.__new__(subtype)
        raise unpickler.refuse("numpy.core.multiarray._reconstruct", f"rebuilds {subtype!r} through")

    def scalar(dtype, data=None):
        if not isinstance(dtype, np.dtype):
            raise pickle.UnpicklingError(f"numpy scalar of dtype {dtype!r}")
        if dtype.hasobject:
            return data
        return multiarray.scalar(dtype, data)

    def make_dtype(spec, align=False, copy=False):
        if not isinstance(spec, str):
            raise pickle.UnpicklingError(f"numpy dtype from {type(spec).__name__}")
        return np.dtype(spec, align, copy)

    ndarray_ref = unpickler._stub("numpy.ndarray")  # named, never constructed directly (no NEWOBJ of ndarray)
    out = {"numpy.ndarray": ndarray_ref, "numpy.dtype": make_dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[f"{module}._reconstruct"] = reconstruct
        out[f"{module}.scalar"] = scalar
    return out


# ---------------------------------------------------------------------------------------------------------------
# Entry points

# What a dict's next resize may allocate at once, per entry it holds (about 48 bytes; the old table stays until
# the new one is filled).
MEMO_BYTES_PER_ENTRY = 64


def restricted_load(file, path: Path, persistent_load: Callable | None = None):
    """Unpickle one object from `file` (bytes or a binary file) under the restrictions above."""
    if isinstance(file, (bytes, bytearray, memoryview)):
        file = io.BytesIO(file)
    unpickler = RestrictedUnpickler(file, path, persistent_load)
    if isinstance(file, MemoryCheckedFile):  # room for the memo's and the stack's next growth
        file.reserve = lambda: MEMO_BYTES_PER_ENTRY * len(unpickler.memo) + 8 * len(getattr(unpickler, "stack", ()))
    try:
        return unpickler.load()
    except CheckpointError:
        raise
    except RecursionError:
        raise CheckpointError(f"{path}: the checkpoint's pickle nests too deeply to read.") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError,
            OverflowError, MemoryError, UnicodeDecodeError, struct.error) as exc:
        raise CheckpointError(f"{path}: the checkpoint's pickle is not readable ({type(exc).__name__}: "
                              f"{str(exc)[:200]}). The file is truncated or corrupt; re-download or re-save "
                              "it.") from None


def storage_pid(path: Path, pid, storages: dict[str, StorageRecord]) -> StorageRecord:
    """A torch persistent id ('storage', storage type, key, location, numel[, view metadata]) -> its record."""
    if not isinstance(pid, tuple) or not pid:
        raise CheckpointError(f"{path}: the pickle holds an unknown persistent id {str(pid)[:80]}; "
                              "the file is corrupt or not a torch checkpoint.")
    if pid[0] == "module":  # legacy torch.save of a whole nn.Module: the class's source, kept as a name
        return pid[1]
    if pid[0] != "storage" or len(pid) not in (5, 6):
        raise CheckpointError(f"{path}: the pickle holds an unknown persistent id {str(pid)[:80]}; "
                              "the file is corrupt or not a torch checkpoint.")
    storage_type, key, location, numel = pid[1:5]
    if not isinstance(storage_type, StorageType):
        raise CheckpointError(f"{path}: a storage of type {storage_type!r} is not one torch writes; "
                              "the file is corrupt or holds a storage kind streammerge does not read.")
    key = str(key)
    record = storages.get(key)
    if record is None:
        record = storages[key] = StorageRecord(key, storage_type.dtype, int(numel), str(location))
    view = pid[5] if len(pid) == 6 else None
    if view is not None:  # very old files: a view (view key, element offset, size) into a root storage
        _view_key, view_offset, view_size = view
        return StorageRecord(key, record.dtype, int(view_size), record.location, int(view_offset))
    return record


def tensor_infos(path: Path, state_dict: dict, storage_offsets: dict[str, int], mapped: MappedFile
                 ) -> dict[str, TensorInfo]:
    """TensorInfo for each TensorRecord, given each storage's byte offset in the file; in file order."""
    infos = []
    for name, record in state_dict.items():
        storage = record.storage
        storage_start = storage_offsets[storage.key] + storage.view_offset * storage.dtype.itemsize
        first = storage_start + record.offset * record.dtype.itemsize  # byte offset of element 0 in the file
        if record.numel():
            last = record.offset + sum((n - 1) * s for n, s in zip(record.shape, record.stride))
            end = (last + 1) * record.dtype.itemsize
            if end > storage.nbytes:
                raise CheckpointError(f"{path}: tensor '{name}' reaches byte {end} of its storage "
                                      f"'{storage.key}', which holds {storage.nbytes}; the file is corrupt.")
        offset = first if record.numel() else 0
        stride = None if record.is_contiguous else record.stride
        info = TensorInfo(name, record.shape, record.dtype, mapped, offset, stride)
        check_span(info)
        infos.append(info)
    infos.sort(key=lambda i: i.offset)
    return {i.name: i for i in infos}
