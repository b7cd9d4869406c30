"""Reads PyTorch zip checkpoints (`torch.save`, PyTorch >= 1.6) into numpy without torch and without running
arbitrary pickle code.

Layout of such a file: a zip holding `<archive>/data.pkl` (the pickled object tree), one raw little-endian
storage per tensor buffer at `<archive>/data/<key>`, and `<archive>/byteorder` (absent in old files: little).
Tensors are pickled as `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` where `storage`
is a persistent id `('storage', torch.<Type>Storage, key, location, numel)`.

`_SafeUnpickler.find_class` resolves the globals in `_ALLOWED`, each mapped to a stand-in defined here (torch
itself is never imported). Any other global (the `argparse.Namespace` or custom config class that training
scripts such as the official RepOpt Hyper-Search pickle beside their tensors) becomes an `Opaque` placeholder
class: "calling" it, or rebuilding an instance of it, only records the arguments, so no code from the file ever
runs; `strict=True` refuses such globals instead (`UnsafePickleError`). A state_dict entry that is a placeholder
is an error naming the key and the global.

Memory is bounded before anything is read: each storage's size in the zip directory must equal what the pickled
metadata says (numel x element size), and the bytes of all entries read together may not exceed `max_inflation`
times the file's size on disk (PyTorch stores entries uncompressed, ratio 1; a small file that inflates to
gigabytes is refused). Tensor views (offset, strides) are bounds-checked against their storage and copied out as
contiguous arrays. bfloat16 becomes `ml_dtypes.bfloat16` (exact; shipped with JAX).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np


class UnsafePickleError(pickle.UnpicklingError):
    """The checkpoint's pickle references a global outside the whitelist (it was not executed)."""


class TorchZipError(ValueError):
    """The file is not a well-formed PyTorch zip checkpoint."""


DEFAULT_MAX_INFLATION = 16.0  # bytes read / bytes on disk; torch.save writes uncompressed entries (ratio 1)


class Opaque:
    """An instance of a pickled class outside the whitelist, kept inert: the arguments and state the pickle
    gave it are recorded (`args`, `state`, `items`), nothing of the class is imported or run."""

    global_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:  # NEWOBJ / NEWOBJ_EX
        obj = object.__new__(cls)
        obj.__dict__.update(args=args, kwargs=kwargs, state=None, items=[])
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # REDUCE calls the class: already recorded
        pass

    def __setstate__(self, state: Any) -> None:  # BUILD
        self.__dict__["state"] = state

    def append(self, item: Any) -> None:  # APPEND(S)
        self.__dict__["items"].append(item)

    def extend(self, items: Any) -> None:
        self.__dict__["items"].extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEM(S)
        self.__dict__["items"].append((key, value))

    def __repr__(self) -> str:
        return f"<inert {self.global_name}>"


def _placeholder(module: str, name: str) -> type[Opaque]:
    """A fresh `Opaque` subclass standing in for the global `module.name` (defined here, nothing imported)."""
    return type(name, (Opaque,), {"global_name": f"{module}.{name}", "__module__": __name__})


_STORAGE_DTYPES: dict[str, Any] = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
    "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
}
_TORCH_DTYPES: dict[str, Any] = {
    "float32": np.float32, "float": np.float32, "float16": np.float16, "half": np.float16,
    "bfloat16": ml_dtypes.bfloat16, "float64": np.float64, "double": np.float64, "int64": np.int64,
    "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8,
    "bool": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """Stand-in for `torch.<Type>Storage`: only carries the element dtype."""

    dtype: np.dtype


def _view(storage: np.ndarray, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> np.ndarray:
    """Contiguous copy of the strided view `storage[offset + sum(i_k * stride_k)]`, bounds-checked."""
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or min((*size, *stride, offset), default=0) < 0:
        raise TorchZipError(f"bad tensor geometry: offset {offset}, size {size}, stride {stride}")
    if 0 in size:
        return np.zeros(size, storage.dtype.newbyteorder("="))
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise TorchZipError(f"tensor view (offset {offset}, size {size}, stride {stride}) exceeds its storage "
                            f"of {storage.size} elements")
    if not size:  # 0-d tensor
        return np.array(storage[offset]).astype(storage.dtype.newbyteorder("="))
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], size, tuple(s * item for s in stride), writeable=False)
    return np.ascontiguousarray(view).astype(storage.dtype.newbyteorder("="), copy=False)


def _rebuild_tensor_v2(storage: np.ndarray, offset: int, size: tuple, stride: tuple, requires_grad: bool = False,
                       backward_hooks: Any = None, metadata: Any = None) -> np.ndarray:
    if not isinstance(storage, np.ndarray):
        raise TorchZipError(f"tensor storage must come from the archive, got {type(storage).__name__}")
    return _view(storage, int(offset), tuple(size), tuple(stride))


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple) -> np.ndarray:
    return _rebuild_tensor_v2(storage, offset, size, stride)


def _rebuild_parameter(data: np.ndarray, requires_grad: bool = True, backward_hooks: Any = None,
                       state: Any = None) -> np.ndarray:
    if not isinstance(data, np.ndarray):
        raise TorchZipError(f"parameter data must be a tensor, got {type(data).__name__}")
    return data


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "UntypedStorage"): _StorageType(np.dtype(np.uint8)),
    **{("torch", name): _StorageType(np.dtype(dt)) for name, dt in _STORAGE_DTYPES.items()},
    **{("torch", name): np.dtype(dt) for name, dt in _TORCH_DTYPES.items()},
}


class _SafeUnpickler(pickle.Unpickler):
    """Whitelisted globals; storages resolved from the zip by persistent id."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, byteorder: str, *, strict: bool,
                 budget: _Budget):
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix, self._order = archive, prefix, "<" if byteorder == "little" else ">"
        self._storages: dict[str, np.ndarray] = {}
        self._strict, self._budget = strict, budget
        self._placeholders: dict[tuple[str, str], type[Opaque]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if self._strict:
            raise UnsafePickleError(f"checkpoint references the global '{module}.{name}', which is not in the "
                                    "whitelist of tensor-rebuilding functions; refusing to load it") from None
        if (module, name) not in self._placeholders:
            self._placeholders[(module, name)] = _placeholder(module, name)
        return self._placeholders[(module, name)]

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise UnsafePickleError(f"unsupported persistent id {pid!r:.200}")
        _, kind, key, _location, numel = pid
        key = str(key)
        if key not in self._storages:
            dtype = kind.dtype.newbyteorder(self._order) if kind.dtype.itemsize > 1 else kind.dtype
            if not isinstance(numel, int) or numel < 0:
                raise TorchZipError(f"storage '{key}' has a bad element count {numel!r}")
            need = numel * dtype.itemsize
            name = f"{self._prefix}data/{key}"
            try:
                info = self._archive.getinfo(name)
            except KeyError:
                raise TorchZipError(f"storage '{key}' is missing from the archive") from None
            if info.file_size != need:  # checked on the zip directory, before reading a byte
                raise TorchZipError(f"storage '{key}' holds {info.file_size} bytes, but its tensor metadata says "
                                    f"{numel} x {dtype.itemsize} = {need} bytes")
            raw = self._budget.read(self._archive, info)
            self._storages[key] = np.frombuffer(raw, dtype, count=numel)
        return self._storages[key]


class _Budget:
    """Reads zip entries while the total stays within `limit` bytes (checked on each entry's declared size
    before reading it, and the read itself stops at that size)."""

    def __init__(self, path: str, limit: int, max_inflation: float):
        self.path, self.limit, self.max_inflation, self.used = path, limit, max_inflation, 0

    def read(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
        if self.used + info.file_size > self.limit:
            raise TorchZipError(
                f"{self.path!r} inflates to more than {self.limit} bytes ({self.max_inflation:g}x its size on "
                f"disk; entry {info.filename!r} alone is {info.file_size} bytes): refusing to read it (a zip bomb, "
                "or a re-compressed checkpoint: pass a larger max_inflation if you trust the file)")
        self.used += info.file_size
        try:
            with archive.open(info) as f:
                raw = f.read(info.file_size)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
            raise TorchZipError(f"{self.path!r} is damaged: entry {info.filename!r}: {e}") from e
        if len(raw) != info.file_size:
            raise TorchZipError(f"{self.path!r} is damaged: entry {info.filename!r} has {len(raw)} of its "
                                f"{info.file_size} bytes")
        return raw


def _record_prefix(archive: zipfile.ZipFile, path: str) -> str:
    pickles = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
    if not pickles:
        raise TorchZipError(f"{path!r} is a zip but has no data.pkl: not a PyTorch checkpoint")
    return min(pickles, key=lambda n: n.count("/"))[: -len("data.pkl")]


def load(path: str | os.PathLike, *, strict: bool = False, max_inflation: float = DEFAULT_MAX_INFLATION) -> Any:
    """The object tree saved with `torch.save` (dicts, lists, numbers...), every tensor as a numpy array.

    Objects of classes outside the whitelist come back as inert `Opaque` placeholders (or, with `strict`, raise
    `UnsafePickleError`). At most `max_inflation` x the file's size is read (at least 1 MiB).
    """
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(4)
        if head.startswith(b"PK"):
            raise TorchZipError(f"{path!r} is a truncated or damaged zip (its central directory is unreadable)")
        raise TorchZipError(f"{path!r} is not a zip-format PyTorch checkpoint (legacy pre-1.6 format?); load it "
                            "with torch.load and re-save it with a current torch.save, or convert it to .npz")
    budget = _Budget(path, max(int(os.path.getsize(path) * max_inflation), 2**20), max_inflation)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise TorchZipError(f"{path!r} is a damaged zip: {e}") from e
    with archive:
        prefix = _record_prefix(archive, path)
        names = set(archive.namelist())
        byteorder = "little"
        if f"{prefix}byteorder" in names:
            byteorder = budget.read(archive, archive.getinfo(f"{prefix}byteorder")).decode(errors="replace").strip()
        if byteorder not in ("little", "big"):
            raise TorchZipError(f"unknown byteorder {byteorder!r} in {path!r}")
        pkl = budget.read(archive, archive.getinfo(f"{prefix}data.pkl"))
        unpickler = _SafeUnpickler(pkl, archive, prefix, byteorder, strict=strict, budget=budget)
        try:
            return unpickler.load()
        except (TypeError, AttributeError, IndexError, ValueError, KeyError, EOFError, pickle.UnpicklingError,
                RecursionError, MemoryError) as e:
            if isinstance(e, TorchZipError | UnsafePickleError):
                raise
            raise TorchZipError(f"malformed checkpoint {path!r}: {type(e).__name__}: {e}") from e


def load_state_dict(path: str | os.PathLike, *, upcast_bfloat16: bool = False,
                    max_inflation: float = DEFAULT_MAX_INFLATION) -> dict[str, np.ndarray]:
    """A state_dict (key -> array) from a zip checkpoint; `{'state_dict': ...}` / `{'model': ...}` wrappers and
    a DataParallel `module.` prefix are removed as in `repjax.io.torch.load_state_dict`; other objects beside
    the state_dict (a pickled training config, an epoch count) are ignored. bfloat16 tensors stay
    `ml_dtypes.bfloat16` unless `upcast_bfloat16` (then float32, as `repjax.io.torch.load_state_dict` returns)."""
    from repjax.io.torch import _unwrap

    obj = load(path, max_inflation=max_inflation)
    if not isinstance(obj, Mapping):
        raise TorchZipError(f"{os.fspath(path)!r} holds a {'placeholder for ' if isinstance(obj, Opaque) else ''}"
                            f"{obj!r:.100}, not a state_dict")
    sd = _unwrap(obj)
    inert = [f"{k} ({v.global_name}, not executed)" for k, v in sd.items() if isinstance(v, Opaque)]
    if inert:
        raise UnsafePickleError(f"{os.fspath(path)!r}: state_dict entries pickled as objects outside the whitelist: "
                                f"{', '.join(inert[:10])}")
    others = [k for k, v in sd.items() if not isinstance(v, np.ndarray)]
    if others:
        raise TorchZipError(f"{os.fspath(path)!r}: entries that are not tensors: {others[:10]}")
    if upcast_bfloat16:
        return {k: v.astype(np.float32) if v.dtype == ml_dtypes.bfloat16 else v for k, v in sd.items()}
    return dict(sd)
