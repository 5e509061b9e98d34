"""safetensors: header parsing into :class:`TensorRef` values, and a streaming writer.

The format is 8 bytes of little-endian header length, a JSON header, then raw tensor bytes. The ``safetensors``
package needs a whole shard in memory to write and mmaps whole files to read, so this module does both in a
streaming way; tests read every file written here back with the ``safetensors`` package itself.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..errors import CorruptFileError, InputError
from .output import OutputFile
from .source import Entry, StreamingTensorWriter, TensorRef, close_written

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


def read_safetensors(path: Path) -> dict[str, TensorRef]:
    """Parse a safetensors file's header.

    Returns:
        ``{name: TensorRef}`` in the header's order.
    Raises:
        CorruptFileError: truncated file, unreadable header, offsets outside the data or not matching the shape.
    """
    path = Path(path)
    fix = "download or copy it again"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CorruptFileError(f"{path}: too short to be a safetensors file ({size} bytes); {fix}")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > _MAX_HEADER or 8 + hlen > size:
                raise CorruptFileError(
                    f"{path}: safetensors header length {hlen} does not fit the file "
                    f"({size} bytes): truncated or not safetensors; {fix}"
                )
            raw = f.read(hlen)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path}: safetensors header is not valid JSON ({exc}); {fix}") from None
    data_start = 8 + hlen
    refs: dict[str, TensorRef] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CorruptFileError(f"{path}: header entry for {name!r} is malformed; {fix}") from None
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= d
        if any(d < 0 for d in shape) or not 0 <= begin <= end or end - begin != nbytes or data_start + end > size:
            raise CorruptFileError(
                f"{path}: tensor {name!r} lies outside the file or does not match its shape "
                f"{list(shape)}: the file is truncated or damaged; {fix}"
            )
        refs[name] = TensorRef(path, data_start + begin, dtype, shape)
    return refs


class SafetensorsWriter(StreamingTensorWriter):
    """Writes one safetensors file from tensors declared up front and then streamed in order.

    The header is written first (every offset is known from the declared shapes), so no tensor is ever held whole.
    """

    def __init__(self, path: Path, entries: Sequence[Entry], metadata: Mapping[str, str] | None = None):
        super().__init__(path, entries)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        offset = 0
        for e in self.entries:
            header[e.name] = {
                "dtype": DTYPE_NAMES[e.dtype],
                "shape": list(e.shape),
                "data_offsets": [offset, offset + e.nbytes],
            }
            offset += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned, as the reference writer does
        self.size = 8 + len(raw) + offset
        self._file = OutputFile(self.path, direct=True)
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def _put(self, data: memoryview) -> None:
        self._file.write(data)

    def _close(self, complete: bool) -> None:
        close_written(self._file, complete)
