"""torch's zip pickle format (``torch.save`` since 1.6): a safe lazy reader and a streaming writer.

The reader unpickles only ``data.pkl`` with an allow-list of the globals plain tensor rebuilding uses, so nothing in
a downloaded file is ever executed, and it locates each tensor's bytes inside the (uncompressed) zip so rows can be
read on demand. ``torch.load(mmap=True, weights_only=True)`` is safe too, but it maps whole shards for as long as any
tensor lives, which makes resident memory grow with the model; positioned reads do not.

The writer produces the layout ``torch.save`` does (``<root>/data.pkl``, ``<root>/byteorder``, ``<root>/data/<key>``
64-byte aligned, ``<root>/version``) with the pickle written first, so tensors are streamed in and never held whole.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import CorruptFileError, InputError, UnsafeFileError
from .output import OutputFile
from .source import Entry, StreamingTensorWriter, TensorRef, close_written

_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}
_STORAGE_NAMES = {v: k for k, v in _STORAGE_DTYPES.items() if k != "UntypedStorage"}
_MAX_PICKLE = 256 * 1024 * 1024
_ALIGN = 64  # torch.save aligns record data so that mmap loading works


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _Storage:
    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _LazyTensor:
    def __init__(self, storage: _Storage, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride


class _Marker:
    """Stands for a class the pickle may name only as an argument (torch.Tensor, nn.Parameter)."""


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor without storage")
    return _LazyTensor(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in (_rebuild_tensor_v2, _rebuild_parameter) or not isinstance(new_type, _Marker):
        raise pickle.UnpicklingError("unexpected tensor subclass")
    return func(*args)


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _Marker(),
    ("torch.nn.parameter", "Parameter"): _Marker(),
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise UnsafeFileError(
            f"{self.path}: the pickle references {module}.{name}, which is not plain tensor data; hubmerge refuses "
            "to run code from weight files: get this file from its original publisher or as safetensors"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.80}")
        return _Storage(str(pid[2]), pid[1].dtype, int(pid[4]))


def read_torch_zip(path: Path) -> dict[str, TensorRef]:
    """Index the tensors of a ``torch.save`` zip file without loading them or executing anything.

    Returns:
        ``{name: TensorRef}`` for a top-level dict of tensors (non-tensor values are ignored).
    Raises:
        UnsafeFileError: the pickle names a global outside plain tensor rebuilding.
        CorruptFileError: truncated or damaged zip / pickle, tensor outside its storage.
        InputError: the legacy (pre-1.6) format, or compressed records.
    """
    path = Path(path)
    fix = "download or copy it again"
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    if magic[:2] == b"\x80\x02" or magic[:1] == b"\x80":
        raise InputError(f"{path}: legacy (pre-1.6) torch pickle; re-save it with a current torch or use safetensors")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError):
        raise CorruptFileError(f"{path}: not a complete torch zip file (truncated or damaged); {fix}") from None
    with zf, open(path, "rb") as raw:
        pkl_names = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl_names) != 1:
            raise CorruptFileError(f"{path}: zip file without a torch data.pkl; {fix}")
        prefix = pkl_names[0][: -len("data.pkl")]
        info = zf.getinfo(pkl_names[0])
        if info.file_size > _MAX_PICKLE:
            raise CorruptFileError(f"{path}: data.pkl is implausibly large ({info.file_size} bytes); {fix}")
        try:
            with zf.open(info) as f:
                obj = _SafeUnpickler(f, path).load()
        except UnsafeFileError:
            raise
        except Exception as exc:  # any unpickling failure means damaged data, never a reason to execute more
            raise CorruptFileError(f"{path}: damaged pickle ({type(exc).__name__}); {fix}") from None
        if not isinstance(obj, dict):
            raise InputError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
        refs: dict[str, TensorRef] = {}
        starts: dict[str, tuple[int, int]] = {}
        for name, value in obj.items():
            if not isinstance(value, _LazyTensor):
                continue
            st = value.storage
            if st.key not in starts:
                starts[st.key] = _record_start(zf, raw, f"{prefix}data/{st.key}", st, path)
            start, _ = starts[st.key]
            refs[str(name)] = _tensor_ref(path, start, value)
    return refs


def _record_start(zf: zipfile.ZipFile, raw, name: str, storage: _Storage, path: Path) -> tuple[int, int]:
    """Absolute file offset of a stored record's data, checked against the storage size."""
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise CorruptFileError(f"{path}: tensor data {name} is missing from the zip; the file is damaged") from None
    if info.compress_type != zipfile.ZIP_STORED:
        raise InputError(f"{path}: compressed tensor records are not supported; re-save it with torch.save")
    if info.file_size != storage.numel * storage.dtype.itemsize:
        raise CorruptFileError(
            f"{path}: tensor data {name} has {info.file_size} bytes, expected "
            f"{storage.numel * storage.dtype.itemsize}; the file is damaged"
        )
    raw.seek(info.header_offset)
    head = raw.read(30)
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        raise CorruptFileError(f"{path}: broken zip entry {name}; the file is damaged")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.file_size > os.fstat(raw.fileno()).st_size:
        raise CorruptFileError(f"{path}: file is truncated inside {name}; download or copy it again")
    return start, info.file_size


def _tensor_ref(path: Path, start: int, t: _LazyTensor) -> TensorRef:
    st = t.storage
    contiguous = tuple(math.prod(t.shape[i + 1 :]) for i in range(len(t.shape)))
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride)) if all(t.shape) else 0
    if t.offset < 0 or t.offset + extent > st.numel or any(s < 0 for s in t.stride):
        raise CorruptFileError(f"{path}: a tensor reaches outside its storage; the file is damaged")
    offset = start + t.offset * st.dtype.itemsize
    if t.stride == contiguous or math.prod(t.shape) <= 1:
        return TensorRef(path, offset, st.dtype, t.shape)
    return TensorRef(path, offset, st.dtype, t.shape, stride=t.stride, span=extent)


class _StoragePlaceholder:
    def __init__(self, key: str, entry: Entry):
        self.key, self.entry = key, entry


class _TensorPlaceholder:
    """Pickles exactly as a contiguous CPU tensor does under ``torch.save``."""

    def __init__(self, key: str, entry: Entry):
        self.storage = _StoragePlaceholder(key, entry)
        self.entry = entry

    def __reduce__(self):
        shape = self.entry.shape
        stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
        return (torch._utils._rebuild_tensor_v2, (self.storage, 0, shape, stride, False, collections.OrderedDict()))


class _PlaceholderPickler(pickle.Pickler):
    def persistent_id(self, obj: Any):
        if isinstance(obj, _StoragePlaceholder):
            e = obj.entry
            return ("storage", getattr(torch, _STORAGE_NAMES[e.dtype]), obj.key, "cpu", math.prod(e.shape))
        return None


class TorchZipWriter(StreamingTensorWriter):
    """Writes a ``torch.save``-compatible zip holding a flat ``{name: tensor}`` dict, streaming the tensor data.

    Output is deterministic (fixed timestamps, keys in declared order): the same input gives the same bytes.
    """

    def __init__(self, path: Path, entries: Sequence[Entry]):
        super().__init__(path, entries)
        self._root = self.path.name.rsplit(".", 1)[0]
        self._file = OutputFile(self.path)
        self._zip = zipfile.ZipFile(self._file, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._handle = None
        buf = io.BytesIO()
        _PlaceholderPickler(buf, protocol=2).dump(
            {e.name: _TensorPlaceholder(str(i), e) for i, e in enumerate(self.entries)}
        )
        self._record("data.pkl", buf.getvalue())
        self._record("byteorder", b"little")

    def _zipinfo(self, name: str, size: int) -> zipfile.ZipInfo:
        info = zipfile.ZipInfo(f"{self._root}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        info.file_size = size
        zip64 = size * 1.05 > zipfile.ZIP64_LIMIT  # the same rule zipfile applies when opening for write
        header = 30 + len(info.filename.encode()) + (20 if zip64 else 0)
        pad = -(self._file.tell() + header + 4) % _ALIGN
        info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # 'FB' padding field, as torch writes
        return info

    def _record(self, name: str, data: bytes) -> None:
        self._file.hold()  # zipfile patches each record's header (its CRC) once the record is complete
        with self._zip.open(self._zipinfo(name, len(data)), "w") as f:
            f.write(data)
        self._file.release()

    def _begin(self, index: int) -> None:
        self._file.hold()
        self._handle = self._zip.open(self._zipinfo(f"data/{index}", self.entries[index].nbytes), "w")

    def _put(self, data: memoryview) -> None:
        self._handle.write(data)

    def _finish(self, index: int) -> None:
        self._handle.close()
        self._handle = None
        self._file.release()

    def _close(self, complete: bool) -> None:
        if self._file.closed:
            return
        if complete:
            self._record("version", b"3\n")
            self._zip.close()
        close_written(self._file, complete)
