"""Reads PyTorch zip checkpoints (`torch.save`, PyTorch >= 1.6) into numpy without torch and without running
arbitrary pickle code.

Layout of such a file: a zip holding `<archive>/data.pkl` (the pickled object tree), one raw little-endian
storage per tensor buffer at `<archive>/data/<key>`, and `<archive>/byteorder` (absent in old files: little).
Tensors are pickled as `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` where `storage`
is a persistent id `('storage', torch.<Type>Storage, key, location, numel)`.

`_SafeUnpickler.find_class` resolves only the globals in `_ALLOWED`, each mapped to a stand-in defined here
(torch itself is never imported); any other global raises `UnsafePickleError` before anything is called.
Tensor views (offset, strides) are bounds-checked against their storage and copied out as contiguous arrays.
bfloat16 becomes `ml_dtypes.bfloat16` (exact; shipped with JAX).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np


class UnsafePickleError(pickle.UnpicklingError):
    """The checkpoint's pickle references a global outside the whitelist (it was not executed)."""


class TorchZipError(ValueError):
    """The file is not a well-formed PyTorch zip checkpoint."""


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

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix, self._order = archive, prefix, "<" if byteorder == "little" else ">"
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"checkpoint references the global '{module}.{name}', which is not in the "
                                    "whitelist of tensor-rebuilding functions; refusing to load it") from None

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise UnsafePickleError(f"unsupported persistent id {pid!r:.200}")
        _, kind, key, _location, numel = pid
        key = str(key)
        if key not in self._storages:
            dtype = kind.dtype.newbyteorder(self._order) if kind.dtype.itemsize > 1 else kind.dtype
            try:
                raw = self._archive.read(f"{self._prefix}data/{key}")
            except KeyError:
                raise TorchZipError(f"storage '{key}' is missing from the archive") from None
            if len(raw) < int(numel) * dtype.itemsize:
                raise TorchZipError(f"storage '{key}' holds {len(raw)} bytes, needs {numel} x {dtype.itemsize}")
            self._storages[key] = np.frombuffer(raw, dtype, count=int(numel))
        return self._storages[key]


def _record_prefix(archive: zipfile.ZipFile, path: str) -> str:
    pickles = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
    if not pickles:
        raise TorchZipError(f"{path!r} is a zip but has no data.pkl: not a PyTorch checkpoint")
    return min(pickles, key=lambda n: n.count("/"))[: -len("data.pkl")]


def load(path: str | os.PathLike) -> Any:
    """The object tree saved with `torch.save` (dicts, lists, numbers...), every tensor as a numpy array."""
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        raise TorchZipError(f"{path!r} is not a zip-format PyTorch checkpoint (legacy pre-1.6 format?); load it "
                            "with torch.load and re-save it with a current torch.save, or convert it to .npz")
    with zipfile.ZipFile(path) as archive:
        prefix = _record_prefix(archive, path)
        names = set(archive.namelist())
        byteorder = "little"
        if f"{prefix}byteorder" in names:
            byteorder = archive.read(f"{prefix}byteorder").decode().strip()
        if byteorder not in ("little", "big"):
            raise TorchZipError(f"unknown byteorder {byteorder!r} in {path!r}")
        unpickler = _SafeUnpickler(archive.read(f"{prefix}data.pkl"), archive, prefix, byteorder)
        try:
            return unpickler.load()
        except (TypeError, AttributeError, IndexError) as e:
            raise TorchZipError(f"malformed checkpoint {path!r}: {e}") from e


def load_state_dict(path: str | os.PathLike, *, upcast_bfloat16: bool = False) -> dict[str, np.ndarray]:
    """A state_dict (key -> array) from a zip checkpoint; `{'state_dict': ...}` / `{'model': ...}` wrappers and
    a DataParallel `module.` prefix are removed as in `repjax.io.torch.load_state_dict`. bfloat16 tensors stay
    `ml_dtypes.bfloat16` unless `upcast_bfloat16` (then float32, as `repjax.io.torch.load_state_dict` returns)."""
    from repjax.io.torch import _unwrap

    obj = load(path)
    if not isinstance(obj, Mapping):
        raise TorchZipError(f"{os.fspath(path)!r} holds a {type(obj).__name__}, not a state_dict")
    sd = _unwrap(obj)
    others = [k for k, v in sd.items() if not isinstance(v, np.ndarray)]
    if others:
        raise TorchZipError(f"{os.fspath(path)!r}: entries that are not tensors: {others[:10]}")
    if upcast_bfloat16:
        return {k: v.astype(np.float32) if v.dtype == ml_dtypes.bfloat16 else v for k, v in sd.items()}
    return dict(sd)
