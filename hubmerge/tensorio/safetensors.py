"""safetensors: header parsing into :class:`TensorRef` values, and a streaming writer.

The format is 8 bytes of little-endian header length, a JSON header, then raw tensor bytes. The ``safetensors``
package needs a whole shard in memory to write and mmaps whole files to read, so this module does both in a
streaming way; tests read every file written here back with the ``safetensors`` package itself.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..errors import CorruptFileError, InputError
from ..jsonio import parse_json
from .output import HeldFiles, OutputFile
from .source import Entry, StreamingTensorWriter, TensorRef

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

# The format allows 100 MB; a header takes ~100 bytes per tensor and LLaMA shards hold under 10k tensors, so 16 MiB
# leaves room while bounding what parsing a hostile header can cost (Python's JSON objects take up to ~20x the text).
_MAX_HEADER = 16 * 1024 * 1024


def read_safetensors(path: Path) -> dict[str, TensorRef]:
    """Parse a safetensors file's header, as strictly as the reference reader: what it refuses is refused here.

    Returns:
        ``{name: TensorRef}`` in the header's order.
    Raises:
        CorruptFileError: truncated file, unreadable header (bad JSON, a key twice, Infinity/NaN, shapes or offsets
        that are not non-negative integers), tensors that overlap, leave holes or do not cover the data exactly.
        InputError: a dtype hubmerge does not handle.
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
    return parse_header(path, raw, size)


def parse_header(path: Path, raw: bytes, size: int) -> dict[str, TensorRef]:
    """The ``{name: TensorRef}`` of the JSON header ``raw`` of a safetensors file of ``size`` bytes at ``path``
    (which need not exist yet: the header can come from elsewhere, e.g. the first bytes of a file on the Hub), read
    as strictly as the reference reader.

    Raises:
        CorruptFileError: see :func:`read_safetensors`. InputError: a dtype hubmerge does not handle.
    """
    fix = "download or copy it again"
    header = parse_json(raw, f"{path}: safetensors header", unique_keys=True, corrupt=True)
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CorruptFileError(f"{path}: safetensors __metadata__ is not a map of strings; {fix}")
    data_start = 8 + len(raw)
    refs: dict[str, TensorRef] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if not (
            isinstance(info, dict)
            and _counts(info.get("shape"))
            and _counts(info.get("data_offsets"))
            and len(info["data_offsets"]) == 2
            and isinstance(info.get("dtype"), str)
        ):
            raise CorruptFileError(
                f"{path}: header entry for {name[:200]!r} is malformed (dtype, shape and data_offsets must be a "
                f"string and lists of non-negative integers); {fix}"
            )
        if info["dtype"] not in DTYPES:
            raise InputError(
                f"{path}: tensor {name[:200]!r} has dtype {info['dtype'][:20]!r}, which hubmerge does "
                f"not handle ({', '.join(DTYPES)})"
            )
        dtype, shape, offsets = DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
        begin, end = offsets
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise CorruptFileError(
                f"{path}: tensor {name[:200]!r} has data_offsets {offsets} that do not match its shape {shape}; {fix}"
            )
        refs[name] = TensorRef(path, data_start + begin, dtype, tuple(shape))
        spans.append((begin, end, name))
    covered = 0
    for begin, end, name in sorted(spans):  # the reference reader's rule: back to back, no holes, no overlaps
        if begin != covered:
            raise CorruptFileError(
                f"{path}: tensor {name[:200]!r} {'overlaps another' if begin < covered else 'leaves a hole'} in the "
                f"data: the file is damaged or not written by a safetensors writer; {fix}"
            )
        covered = end
    if data_start + covered != size:
        raise CorruptFileError(
            f"{path}: the tensors cover {covered} bytes but the file holds {size - data_start} after the header: "
            f"truncated or damaged; {fix}"
        )
    return refs


def _counts(value: object) -> bool:
    """A list of non-negative integers (never bools or floats, as the reference reader's usize)."""
    return isinstance(value, list) and all(type(v) is int and 0 <= v < 1 << 64 for v in value)


class SafetensorsWriter(StreamingTensorWriter):
    """Writes one safetensors file from tensors declared up front and then streamed in order.

    The header is written first (every offset is known from the declared shapes), so no tensor is ever held whole.
    With ``held`` the file is held in memory there instead of written to disk (see :class:`HeldFiles`).
    """

    def __init__(
        self,
        path: Path,
        entries: Sequence[Entry],
        metadata: Mapping[str, str] | None = None,
        *,
        held: HeldFiles | None = None,
    ):
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
        self._file = OutputFile(self.path, direct=True, held=held)
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def _put(self, data: memoryview) -> None:
        self._file.write(data)
