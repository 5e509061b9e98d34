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
import contextlib
import io
import math
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, cast

import torch

from ..errors import CorruptFileError, InputError, UnsafeFileError
from .output import OutputFile
from .source import Entry, StreamingTensorWriter, TensorRef

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
# Real data.pkl files take ~150 bytes and ~15 values per tensor: these allow ~30k tensors per file (LLaMA shards hold
# under 1000) and bound what a hostile pickle can make the reader hold (~100 bytes per value) or do (a step per byte).
_MAX_PICKLE = 4 * 1024 * 1024
_MAX_OBJECTS = 500_000
_MAX_DIMS = 64  # torch's own limit on tensor dimensions
_MAX_DIM = 1 << 48
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


class _Damaged(Exception):
    """The pickle is malformed or outside what torch.save writes; the message says where, in a few words."""


def _sizes(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or len(value) > _MAX_DIMS:
        raise _Damaged(f"tensor {what} is not a tuple of at most {_MAX_DIMS} numbers")
    if not all(type(d) is int and 0 <= d < _MAX_DIM for d in value):
        raise _Damaged(f"tensor {what} holds a value that is not a plausible size")
    return value


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise _Damaged("tensor without storage")
    if type(storage_offset) is not int or not 0 <= storage_offset < _MAX_DIM:
        raise _Damaged("tensor offset is not a plausible number")
    shape, strides = _sizes(size, "size"), _sizes(stride, "stride")
    if len(shape) != len(strides):
        raise _Damaged("tensor size and stride differ in length")
    return _LazyTensor(storage, storage_offset, shape, strides)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, _LazyTensor):
        raise _Damaged("parameter without tensor")
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in (_rebuild_tensor_v2, _rebuild_parameter) or not isinstance(new_type, _Marker):
        raise _Damaged("unexpected tensor subclass")
    if not isinstance(args, tuple):
        raise _Damaged("tensor arguments are not a tuple")
    return func(*args)


def _ordered_dict(*args):
    if args:  # torch.save reduces an OrderedDict to OrderedDict() and adds its items afterwards
        raise _Damaged("OrderedDict with arguments")
    return collections.OrderedDict()


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _Marker(),
    ("torch.nn.parameter", "Parameter"): _Marker(),
    ("collections", "OrderedDict"): _ordered_dict,
}
_CALLABLE = (_rebuild_tensor_v2, _rebuild_parameter, _rebuild_from_type_v2, _ordered_dict)


class _PickleReader:
    """A pickle machine for exactly what ``torch.save`` writes (protocols 2 to 5), and nothing more.

    Python's unpickler cannot be bounded: one memo index makes it allocate gigabytes, BUILD sets attributes on any
    object (even this module's functions), and a value repeated through the memo can make a repr or a hash take
    exponential time. This reader keeps the memo in a dict, admits only the opcodes and callables tensor
    rebuilding needs, accepts BUILD only as the attribute dict torch.save adds to an OrderedDict (and ignores it),
    allows only string and integer dict keys, and stops after ``_MAX_OBJECTS`` values, so its work is linear in
    the pickle and its memory bounded.
    """

    def __init__(self, data: bytes, path: Path):
        self.data, self.path, self.pos = data, path, 0
        self.stack: list[Any] = []
        self.marks: list[int] = []
        self.memo: dict[int, Any] = {}
        self.made = 0

    def load(self) -> Any:
        data = self.data
        while True:
            if self.pos >= len(data):
                raise _Damaged("truncated")
            code = data[self.pos]
            self.pos += 1
            op = _OPS.get(code)
            if op is None:
                raise _Damaged(f"opcode {code:#04x} at byte {self.pos - 1}, which torch.save never writes")
            if op is _PickleReader._stop:
                if len(self.stack) != 1 or self.marks:
                    raise _Damaged("unbalanced stack at the end")
                return self.stack.pop()
            op(self)

    # --------------------------------------------------------------------------------------------- primitives
    def _take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise _Damaged("truncated")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def _uint(self, n: int) -> int:
        return int.from_bytes(self._take(n), "little")

    def _push(self, value: Any) -> None:
        self.made += 1
        if self.made > _MAX_OBJECTS:
            raise _Damaged(f"more than {_MAX_OBJECTS} values")
        self.stack.append(value)

    def _pop(self) -> Any:
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise _Damaged("stack underflow")
        return self.stack.pop()

    def _top(self) -> Any:
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise _Damaged("stack underflow")
        return self.stack[-1]

    def _pop_mark(self) -> list[Any]:
        if not self.marks:
            raise _Damaged("no mark")
        at = self.marks.pop()
        items = self.stack[at:]
        del self.stack[at:]
        return items

    def _text(self, n: int) -> str:
        try:
            return self._take(n).decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise _Damaged("a string is not UTF-8") from None

    # ---------------------------------------------------------------------------------------------- opcodes
    def _stop(self) -> None:  # handled in load()
        pass

    def _proto(self) -> None:
        if self._uint(1) > 5:
            raise _Damaged("unknown pickle protocol")

    def _frame(self) -> None:
        if self._uint(8) > len(self.data) - self.pos:  # frames only group opcodes: check the length, read on
            raise _Damaged("frame longer than the pickle")

    def _mark(self) -> None:
        self.marks.append(len(self.stack))

    def _pop_op(self) -> None:
        self._pop()

    def _pop_mark_op(self) -> None:
        self._pop_mark()

    def _dup(self) -> None:
        self._push(self._top())

    def _long1(self) -> None:
        n = self._uint(1)
        if n > 8:
            raise _Damaged("integer longer than 8 bytes")
        self._push(int.from_bytes(self._take(n), "little", signed=True))

    def _binfloat(self) -> None:
        self._push(struct.unpack(">d", self._take(8))[0])

    def _tuple(self) -> None:
        self._push(tuple(self._pop_mark()))

    def _list(self) -> None:
        self._push(self._pop_mark())

    def _dict(self) -> None:
        items = self._pop_mark()
        self._push({})
        self._set_items(self.stack[-1], items)

    def _append(self) -> None:
        value = self._pop()
        self._append_to(self._top(), [value])

    def _appends(self) -> None:
        items = self._pop_mark()
        self._append_to(self._top(), items)

    def _setitem(self) -> None:
        value, key = self._pop(), self._pop()
        self._set_items(self._top(), [key, value])

    def _setitems(self) -> None:
        items = self._pop_mark()
        self._set_items(self._top(), items)

    def _append_to(self, target: Any, items: list[Any]) -> None:
        if type(target) is not list:
            raise _Damaged("append to something that is not a list")
        target.extend(items)

    def _set_items(self, target: Any, items: list[Any]) -> None:
        if not isinstance(target, dict) or len(items) % 2:
            raise _Damaged("items set on something that is not a dict")
        for i in range(0, len(items), 2):
            if type(items[i]) not in (str, int):  # hashing anything else can take exponential time
                raise _Damaged("a dict key that is not a string or an integer")
            target[items[i]] = items[i + 1]

    def _line(self) -> str:
        end = self.data.find(b"\n", self.pos, self.pos + 256)
        if end < 0:
            raise _Damaged("malformed global name")
        text = self._text(end - self.pos)
        self.pos += 1
        return text

    def _global(self) -> None:
        module = self._line()
        self._push(self._find_class(module, self._line()))

    def _stack_global(self) -> None:
        name, module = self._pop(), self._pop()
        if type(module) is not str or type(name) is not str:
            raise _Damaged("malformed global name")
        self._push(self._find_class(module, name))

    def _find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise UnsafeFileError(
            f"{self.path}: the pickle references {module[:100]}.{name[:100]}, which is not plain tensor data; "
            "hubmerge refuses to run code from weight files: get this file from its original publisher or as "
            "safetensors"
        )

    def _reduce(self) -> None:
        args, func = self._pop(), self._pop()
        if not any(func is f for f in _CALLABLE) or type(args) is not tuple:
            raise _Damaged("a call that is not tensor rebuilding")
        try:
            self._push(func(*args))
        except TypeError:  # too many or too few arguments
            raise _Damaged("tensor rebuilding with the wrong arguments") from None

    def _build(self) -> None:
        state = self._pop()
        if type(self._top()) is not collections.OrderedDict or type(state) is not dict:
            raise UnsafeFileError(
                f"{self.path}: the pickle sets attributes of an object (BUILD), which plain tensor data never "
                "needs; hubmerge refuses it: get this file from its original publisher or as safetensors"
            )
        # state_dict()'s ``_metadata`` attribute: not tensor data, and never applied

    def _persid(self) -> None:
        pid = self._pop()
        if not (
            type(pid) is tuple
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and type(pid[2]) is str
            and len(pid[2]) <= 64
            and type(pid[4]) is int
            and 0 <= pid[4] < _MAX_DIM
        ):
            raise _Damaged("a persistent id that is not a tensor storage")
        self._push(_Storage(pid[2], pid[1].dtype, pid[4]))

    def _memo_put(self, index: int) -> None:
        if index > len(self.data):  # indices count up from 0: a real one never exceeds the pickle's length
            raise _Damaged("memo index beyond the pickle's size")
        self.memo[index] = self._top()

    def _memo_get(self, index: int) -> None:
        if index not in self.memo:
            raise _Damaged("memo index never stored")
        self._push(self.memo[index])


_Op = Callable[[_PickleReader], None]


def _pushes(make: Callable[[_PickleReader], Any]) -> _Op:
    return lambda r: r._push(make(r))


def _tuple_of(n: int) -> _Op:
    return lambda r: r._push(tuple(reversed([r._pop() for _ in range(n)])))


# opcode -> action (the opcodes torch.save writes with protocols 2 to 5); anything else is refused.
_OPS: dict[int, _Op] = {
    ord(code): op
    for code, op in {
        ".": _PickleReader._stop,
        "\x80": _PickleReader._proto,
        "\x95": _PickleReader._frame,
        "(": _PickleReader._mark,
        "0": _PickleReader._pop_op,
        "1": _PickleReader._pop_mark_op,
        "2": _PickleReader._dup,
        "N": _pushes(lambda r: None),
        "\x88": _pushes(lambda r: True),
        "\x89": _pushes(lambda r: False),
        "J": _pushes(lambda r: int.from_bytes(r._take(4), "little", signed=True)),
        "K": _pushes(lambda r: r._uint(1)),
        "M": _pushes(lambda r: r._uint(2)),
        "\x8a": _PickleReader._long1,
        "G": _PickleReader._binfloat,
        "X": _pushes(lambda r: r._text(r._uint(4))),
        "\x8c": _pushes(lambda r: r._text(r._uint(1))),
        "\x8d": _pushes(lambda r: r._text(r._uint(8))),
        "}": _pushes(lambda r: {}),
        "]": _pushes(lambda r: []),
        ")": _pushes(lambda r: ()),
        "t": _PickleReader._tuple,
        "\x85": _tuple_of(1),
        "\x86": _tuple_of(2),
        "\x87": _tuple_of(3),
        "l": _PickleReader._list,
        "d": _PickleReader._dict,
        "a": _PickleReader._append,
        "e": _PickleReader._appends,
        "s": _PickleReader._setitem,
        "u": _PickleReader._setitems,
        "q": lambda r: r._memo_put(r._uint(1)),
        "r": lambda r: r._memo_put(r._uint(4)),
        "\x94": lambda r: r._memo_put(len(r.memo)),
        "h": lambda r: r._memo_get(r._uint(1)),
        "j": lambda r: r._memo_get(r._uint(4)),
        "c": _PickleReader._global,
        "\x93": _PickleReader._stack_global,
        "R": _PickleReader._reduce,
        "b": _PickleReader._build,
        "Q": _PickleReader._persid,
    }.items()
}


def read_torch_zip(path: Path, *, fileobj: IO[bytes] | None = None) -> dict[str, TensorRef]:
    """Index the tensors of a ``torch.save`` zip file without loading them or executing anything.

    Everything ``torch.load(weights_only=True)`` would read differently is refused: a record stored twice, big-endian
    data, a storage named with two dtypes, a view reaching past its storage or repeating elements beyond it.

    Args:
        path: the file, or with ``fileobj`` the name its errors give.
        fileobj: the file as read from elsewhere (a Hub file read by range requests). Only its index is read then
            (the zip directory and ``data.pkl``, not each record's own header), so the refs have the right names,
            dtypes and shapes but offset 0: a layout to plan with, never to read from.
    Returns:
        ``{name: TensorRef}`` for a top-level dict of tensors (non-tensor values are ignored).
    Raises:
        UnsafeFileError: the pickle names a global outside plain tensor rebuilding, or sets attributes.
        CorruptFileError: truncated, damaged or ambiguous zip / pickle, tensor outside its storage.
        InputError: the legacy (pre-1.6) format, or compressed records.
    """
    path = Path(path)
    fix = "download or copy it again"
    with contextlib.ExitStack() as stack:
        try:
            raw = fileobj if fileobj is not None else stack.enter_context(open(path, "rb"))
            magic = raw.read(4)
        except OSError as exc:
            raise InputError(f"{path}: cannot read ({exc.strerror})") from None
        if magic[:2] == b"\x80\x02" or magic[:1] == b"\x80":
            raise InputError(
                f"{path}: legacy (pre-1.6) torch pickle; re-save it with a current torch or use safetensors"
            )
        try:
            zf = stack.enter_context(zipfile.ZipFile(raw))
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error, NotImplementedError):
            raise CorruptFileError(f"{path}: not a complete torch zip file (truncated or damaged); {fix}") from None
        return _index(zf, raw if fileobj is None else None, path)


def _index(zf: zipfile.ZipFile, raw: IO[bytes] | None, path: Path) -> dict[str, TensorRef]:
    """:func:`read_torch_zip` on the open zip; ``raw`` (the file, to read each record's own header) or None for
    a layout without offsets."""
    fix = "download or copy it again"
    names = zf.namelist()
    twice = next((n for n, count in collections.Counter(names).items() if count > 1), None)
    if twice is not None:
        raise CorruptFileError(
            f"{path}: the zip holds the record {twice[:200]!r} twice; torch.load would read only one of them, "
            f"so hubmerge refuses to guess; {fix}"
        )
    # torch.load reads the records under the first entry's folder
    prefix = names[0].split("/", 1)[0] + "/" if names and "/" in names[0] else ""
    if not prefix or prefix + "data.pkl" not in names:
        raise CorruptFileError(f"{path}: zip file without a torch data.pkl; {fix}")
    if prefix + "byteorder" in names and _small_record(zf, prefix + "byteorder", path) != b"little":
        raise InputError(f"{path}: big-endian tensor data is not supported; re-save it on a little-endian machine")
    data = _small_record(zf, prefix + "data.pkl", path, _MAX_PICKLE)
    try:
        obj = _PickleReader(data, path).load()
    except _Damaged as exc:
        raise CorruptFileError(f"{path}: damaged or unsupported pickle in data.pkl ({exc}); {fix}") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    refs: dict[str, TensorRef] = {}
    starts: dict[str, tuple[int, _Storage]] = {}
    for name, value in obj.items():
        if not isinstance(value, _LazyTensor):
            continue
        st = value.storage
        if st.key not in starts:
            info = _record_info(zf, f"{prefix}data/{st.key}", st, path)
            starts[st.key] = (0 if raw is None else _record_start(raw, info, path), st)
        start, first = starts[st.key]
        if (first.dtype, first.numel) != (st.dtype, st.numel):
            raise CorruptFileError(
                f"{path}: storage {st.key} is named with two dtypes or sizes; torch.load would read it as the "
                f"first; {fix}"
            )
        refs[str(name)] = _tensor_ref(path, start, value)
    return refs


def _small_record(zf: zipfile.ZipFile, name: str, path: Path, limit: int = 64) -> bytes:
    """A metadata record's bytes, read (and decompressed, when it is) no further than ``limit``."""
    try:
        with zf.open(name) as f:
            data = f.read(limit + 1)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, zlib.error):
        raise CorruptFileError(f"{path}: {name} is damaged in the zip; download or copy it again") from None
    if len(data) > limit:
        raise CorruptFileError(f"{path}: {name} is implausibly large (over {limit} bytes); the file is damaged")
    return data


def _record_info(zf: zipfile.ZipFile, name: str, storage: _Storage, path: Path) -> zipfile.ZipInfo:
    """The directory entry of a storage's record, checked: stored (not compressed), of the storage's size."""
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
    return info


def _record_start(raw: IO[bytes], info: zipfile.ZipInfo, path: Path) -> int:
    """Absolute file offset of a stored record's data, from its own local header."""
    name = info.filename
    raw.seek(info.header_offset)
    head = raw.read(30)
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        raise CorruptFileError(f"{path}: broken zip entry {name}; the file is damaged")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    if raw.read(name_len) != info.orig_filename.encode():  # the local header must be this record's own
        raise CorruptFileError(f"{path}: zip entry {name} points at another record; the file is damaged")
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.file_size > os.fstat(raw.fileno()).st_size:
        raise CorruptFileError(f"{path}: file is truncated inside {name}; download or copy it again")
    return start


def _tensor_ref(path: Path, start: int, t: _LazyTensor) -> TensorRef:
    st = t.storage
    numel = math.prod(t.shape)
    contiguous = tuple(math.prod(t.shape[i + 1 :]) for i in range(len(t.shape)))
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride)) if numel else 0
    # A view may select, reorder or overlap elements, but never hold more than its storage: a stride-0 view of
    # a few bytes would otherwise expand to gigabytes in the output.
    if t.offset + extent > st.numel or numel > st.numel:
        raise CorruptFileError(
            f"{path}: a tensor of shape {list(t.shape)} reaches outside its storage or holds more elements than it "
            f"({st.numel}); the file is damaged"
        )
    offset = start + t.offset * st.dtype.itemsize
    if t.stride == contiguous or numel <= 1:
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


class _AppendOnly:
    """An output file as ``zipfile`` sees it: without ``seek``, zipfile puts each record's CRC and sizes after its
    data (a data descriptor, which torch.load and every zip reader read) instead of going back to patch its header,
    so the file is written front to back: with O_DIRECT, and hashed as it is written."""

    def __init__(self, file: OutputFile) -> None:
        self._file = file

    def write(self, data) -> int:
        return self._file.write(data)

    def tell(self) -> int:
        return self._file.tell()

    def flush(self) -> None:
        self._file.flush()


class TorchZipWriter(StreamingTensorWriter):
    """Writes a ``torch.save``-compatible zip holding a flat ``{name: tensor}`` dict, streaming the tensor data.

    Output is deterministic (fixed timestamps, keys in declared order): the same input gives the same bytes.
    """

    def __init__(self, path: Path, entries: Sequence[Entry]):
        super().__init__(path, entries)
        self._root = self.path.name.rsplit(".", 1)[0]
        self._file = OutputFile(self.path, direct=True)
        append_only = cast(IO[bytes], _AppendOnly(self._file))  # zipfile calls only write, tell and flush on it
        self._zip = zipfile.ZipFile(append_only, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._handle: IO[bytes] | None = None
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
        with self._zip.open(self._zipinfo(name, len(data)), "w") as f:
            f.write(data)

    def _begin(self, index: int) -> None:
        self._handle = self._zip.open(self._zipinfo(f"data/{index}", self.entries[index].nbytes), "w")

    def _put(self, data: memoryview) -> None:
        assert self._handle is not None  # between _begin and _finish
        self._handle.write(data)

    def _finish(self, index: int) -> None:
        assert self._handle is not None
        self._handle.close()
        self._handle = None

    def _close(self, complete: bool) -> None:
        if self._file.closed:
            return
        if complete:
            self._record("version", b"3\n")
            self._zip.close()
        else:
            # Closed now, or zipfile writes its directory when collected, into the closed file (a stray traceback
            # on stderr). The aborted file is deleted, so what this writes does not matter, nor does it failing.
            for finish in (self._handle, self._zip):
                with contextlib.suppress(OSError, ValueError):
                    if finish is not None:
                        finish.close()
        super()._close(complete)
