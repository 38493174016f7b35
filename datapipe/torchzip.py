"""Reading the tensors of a torch.save zip archive without torch or pickle code execution.

A file written by torch.save is a zip archive: `<name>/data.pkl` describes every tensor
(storage key, dtype, offset, shape, strides) and `<name>/data/<key>` holds each storage,
uncompressed. `read_index` reads the zip directory and unpickles data.pkl with an unpickler
that imports and runs nothing (the tensor rebuild becomes a plain record; TensorDict classes,
old or new, become inert stand-ins), then places every tensor at its byte offset in the file.
A range of rows of a tensor is then one byte range: a local read or one ranged request.

A file in torch's legacy format (one pickle stream, written before torch 1.6 or with
`_use_new_zipfile_serialization=False`) has no such layout: it is recognised by its first
pickle, torch's magic number, and refused with the one-line conversion to the zip format.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import shlex
import struct
import zipfile
from collections import deque
from dataclasses import dataclass

import numpy as np

from datapipe.errors import SourceError

REFETCH = "re-download or regenerate it"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a legacy (non-zip) torch.save file
_MAX_PICKLE = 16 << 20  # a chunk's data.pkl is under 1 KiB; refuse absurd ones before reading
_STORAGE_DTYPES = {  # torch.<X>Storage in data.pkl -> the dtype of its elements
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
_NUMPY_DTYPES = {  # the dtypes we can read (numpy has no bfloat16); nothing else is ever viewed
    "float64": "f8",
    "float32": "f4",
    "float16": "f2",
    "int64": "i8",
    "int32": "i4",
    "int16": "i2",
    "int8": "i1",
    "uint64": "u8",
    "uint32": "u4",
    "uint16": "u2",
    "uint8": "u1",
    "bool": "?",
    "complex64": "c8",
    "complex128": "c16",
}


@dataclass(frozen=True)
class ChunkTensor:
    """One tensor of a chunk, as data.pkl and the zip headers place it: where its bytes are."""

    dtype: str  # torch's name: "float32", "int32", ...
    shape: tuple[int, ...]
    stride: tuple[int, ...]  # in elements, all >= 0
    start: int  # file offset of element [0, 0, ...] in bytes (-1 if the dtype is unreadable)
    byteorder: str  # "little" or "big", from the archive's byteorder record

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def np_dtype(self) -> np.dtype | None:
        code = _NUMPY_DTYPES.get(self.dtype)
        return None if code is None else np.dtype(code).newbyteorder(self.byteorder)

    def span(self, lo: int, hi: int) -> tuple[int, int]:
        """(file offset, length) in bytes of the smallest byte range holding episodes [lo, hi)."""
        if hi <= lo or 0 in self.shape[1:]:
            return self.start, 0
        inner = sum((d - 1) * s for d, s in zip(self.shape[1:], self.stride[1:], strict=True))
        count = (hi - lo - 1) * self.stride[0] + inner + 1  # elements from episode lo's first
        item = self.np_dtype.itemsize
        return self.start + lo * self.stride[0] * item, count * item

    def view(self, buf: np.ndarray, n: int, writeable: bool = False) -> np.ndarray:
        """`n` episodes as an array view of `buf`, the bytes of `span(lo, lo + n)`."""
        dtype, shape = self.np_dtype, (n, *self.shape[1:])
        if buf.size == 0:
            return np.zeros(shape, dtype)
        steps = tuple(s * dtype.itemsize for s in self.stride)
        return np.lib.stride_tricks.as_strided(buf.view(dtype), shape, steps, writeable=writeable)


# --- the inert unpickler ---------------------------------------------------------------------


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: str


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str


class _StorageType:
    """What torch.FloatStorage & co. unpickle to: only their element dtype."""

    def __init__(self, dtype: str):
        self.dtype = dtype


class _Opaque:
    """What every global outside the allow-list unpickles to (the TensorDict classes, old or
    new, and anything else): an inert record of what the pickle passes it."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        self.args, self.kwargs, self.state, self.items, self.values = args, kwargs, None, {}, []
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items[key] = value

    def append(self, value):
        self.values.append(value)

    def extend(self, values):
        self.values.extend(values)


def _tensor(storage, offset, size, stride, dtype: str | None = None) -> _TensorRef:
    if not isinstance(storage, _StorageRef) or len(size) != len(stride):
        raise pickle.UnpicklingError("a tensor without a storage, or with bad shape and strides")
    if not all(type(v) is int and v >= 0 for v in (offset, *size, *stride)):
        raise pickle.UnpicklingError(
            f"a tensor with offset {offset}, shape {size}, strides {stride}"
        )
    return _TensorRef(storage, offset, tuple(size), tuple(stride), dtype or storage.dtype)


def _rebuild_tensor_v2(storage, offset, size, stride, *_):
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *_):
    name = getattr(dtype, "qualname", "?").removeprefix("torch.")  # a torch.<dtype> stand-in
    return _tensor(storage, offset, size, stride, name if name in _NUMPY_DTYPES else "?")


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch", "Size"): tuple,
    ("collections", "OrderedDict"): dict,
}


class _InertUnpickler(pickle.Unpickler):
    """Unpickles torch's data.pkl without importing or calling anything outside `_ALLOWED`."""

    def __init__(self, file):
        super().__init__(file)
        self._stand_ins: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[module, name]
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) not in self._stand_ins:
            attrs = {"qualname": f"{module}.{name}"}
            self._stand_ins[module, name] = type(name, (_Opaque,), attrs)
        return self._stand_ins[module, name]

    def persistent_load(self, pid):
        # torch.save: ("storage", storage type, key, location, numel)
        if (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
        ):
            return _StorageRef(pid[2], pid[1].dtype)
        raise pickle.UnpicklingError(f"unsupported persistent id {str(pid)[:80]}")


def _tensor_mapping(root) -> dict | None:
    """The shallowest dict holding tensors in the unpickled graph: the chunk's keys. A plain
    dict is the root itself; a TensorDict keeps its tensors in a dict inside the arguments or
    the state it was pickled with, whatever its class and version."""
    queue, seen = deque([root]), set()
    while queue:
        obj = queue.popleft()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, dict):
            if any(isinstance(v, _TensorRef) for v in obj.values()):
                return obj
            queue.extend(obj.values())
        elif isinstance(obj, list | tuple):
            queue.extend(obj)
        elif isinstance(obj, _Opaque):
            queue.extend((obj.args, obj.kwargs, obj.state, obj.items, obj.values))
    return None


def describe(obj) -> str:
    if isinstance(obj, _TensorRef | ChunkTensor):
        return "a tensor"
    if isinstance(obj, _Opaque) or (isinstance(obj, type) and issubclass(obj, _Opaque)):
        return f"a {obj.qualname}"
    return f"a {type(obj).__name__}"


class _BareUnpickler(pickle.Unpickler):
    """Unpickles plain values only: no global is ever looked up, no object is ever built."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"a global ({module}.{name})")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("a persistent id")


def _is_legacy(f) -> bool:
    """Whether the file open as `f` starts with the legacy torch.save magic number."""
    f.seek(0)
    head = f.read(64)
    try:
        return _BareUnpickler(io.BytesIO(head)).load() == _LEGACY_MAGIC
    except Exception:  # any other bytes: not a legacy file
        return False


def conversion_command(where: str) -> str:
    """The shell line that rewrites the legacy torch.save file `where` in the zip format."""
    path = where if "://" not in where else "LOCAL_COPY.pt"  # torch.load reads local files
    tmp = f"{path}.zip"
    quoted, quoted_tmp = json.dumps(path), json.dumps(tmp)  # Python literals the shell keeps
    code = f"import torch; torch.save(torch.load({quoted}, weights_only=False), {quoted_tmp})"
    return f"python -c {shlex.quote(code)} && mv {shlex.quote(tmp)} {shlex.quote(path)}"


def _legacy_error(where: str) -> SourceError:
    copy = " of a local copy, then upload it" if "://" in where else ""
    return SourceError(
        f"{where}: is a legacy torch.save file (the single-pickle format of torch < 1.6, or "
        f"_use_new_zipfile_serialization=False), not torch's zip format, which datapipe reads "
        f"as byte ranges without running pickled code. Convert it once{copy}, with torch and "
        f"tensordict installed (this unpickles it: only for a file you trust): "
        f"{conversion_command(where)}"
    )


# --- the chunk index -------------------------------------------------------------------------


# What zipfile and the unpickler raise on bytes that are not a torch zip file. Anything else
# (AttributeError, TypeError, ...) is a bug of ours and keeps its traceback.
_UNREADABLE = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    pickle.UnpicklingError,
    EOFError,
    ValueError,  # also UnicodeDecodeError
    KeyError,
    IndexError,
    OSError,
    struct.error,
)


def read_index(f, where: str) -> dict:
    """key -> ChunkTensor (or whatever else the chunk holds there) of the chunk open as `f`,
    from the zip directory, data.pkl and each storage's local header; reads no tensor data."""
    if _is_legacy(f):
        raise _legacy_error(where)
    try:
        archive = zipfile.ZipFile(f)
        pkls = [i for i in archive.infolist() if re.fullmatch(r"[^/]+/data\.pkl", i.filename)]
        if len(pkls) != 1:
            raise ValueError("a zip file without <archive>/data.pkl: not written by torch.save")
        if pkls[0].file_size > _MAX_PICKLE:
            raise ValueError(f"its data.pkl is {pkls[0].file_size} bytes")
        prefix = pkls[0].filename.removesuffix("data.pkl")
        root = _InertUnpickler(io.BytesIO(archive.read(pkls[0]))).load()
        byteorder = "little"  # what torch assumes when the record is missing (older files)
        if prefix + "byteorder" in archive.NameToInfo:
            byteorder = archive.read(prefix + "byteorder").decode()
        if byteorder not in ("little", "big"):
            raise ValueError(f"unknown byte order {byteorder!r}")
    except _UNREADABLE as e:  # what a damaged or foreign file makes zipfile or pickle raise
        raise SourceError(
            f"{where}: cannot be read as a torch-saved TensorDict ({type(e).__name__}: {e}). "
            f"It may be truncated or not an MT30 chunk: {REFETCH}."
        ) from e
    mapping = _tensor_mapping(root)
    if mapping is None:
        raise SourceError(
            f"{where}: holds {describe(root)}, not a TensorDict of obs/action/reward/task "
            f"tensors: is this an MT30 chunk?"
        )
    f.seek(0, io.SEEK_END)
    size, starts = f.tell(), {}
    out = {}
    for key, value in mapping.items():
        if isinstance(value, _TensorRef):
            name = f"{prefix}data/{value.storage.key}"
            if name not in starts:
                starts[name] = _storage_start(f, archive, name, size, where)
            value = _place(value, *starts[name], byteorder, f"{where}: {key}")
        out[key] = value
    return out


def _storage_start(f, archive: zipfile.ZipFile, name: str, size: int, where: str):
    """(file offset, length) of the bytes of storage member `name`, checked stored whole."""
    info = archive.NameToInfo.get(name)
    if info is None:
        raise SourceError(f"{where}: its tensor storage {name} is missing: {REFETCH}.")
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        raise SourceError(
            f"{where}: {name} is compressed, but torch.save stores tensors uncompressed: the "
            f"file was rewritten by another tool: {REFETCH}."
        )
    f.seek(info.header_offset)
    head = f.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise SourceError(f"{where}: the zip header of {name} is damaged: {REFETCH}.")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.file_size > size:
        raise SourceError(f"{where}: {name} runs past the end of the file (truncated): {REFETCH}.")
    return start, info.file_size


def _place(t: _TensorRef, start: int, length: int, byteorder: str, where: str) -> ChunkTensor:
    """`t` with its file offset, after checking that its storage holds every element."""
    placed = ChunkTensor(t.dtype, t.shape, t.stride, -1, byteorder)
    dtype = placed.np_dtype
    if dtype is None:
        return placed  # unreadable dtype: check_structure names it if the key matters
    last = t.offset + sum((d - 1) * s for d, s in zip(t.shape, t.stride, strict=True))
    needed = 0 if 0 in t.shape else (last + 1) * dtype.itemsize
    if needed > length:
        raise SourceError(
            f"{where} needs {needed} bytes of storage, the file holds {length}: it is damaged "
            f"or truncated: {REFETCH}."
        )
    return ChunkTensor(t.dtype, t.shape, t.stride, start + t.offset * dtype.itemsize, byteorder)
