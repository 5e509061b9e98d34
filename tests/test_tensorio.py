"""The streaming readers and writers against the reference libraries (safetensors, torch.save / torch.load)."""

from __future__ import annotations

import gc
import json
import struct
import sys
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hubmerge.errors import CorruptFileError, InputError, UnsafeFileError
from hubmerge.tensorio import SafetensorsWriter, TorchZipWriter, read_safetensors, read_torch_zip
from hubmerge.tensorio.source import Entry


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "half": torch.randn(7, 5, generator=g).half(),
        "bf16": torch.randn(11, generator=g).to(torch.bfloat16),
        "fp32-3d": torch.randn(3, 4, 2, generator=g),
        "int64": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "empty": torch.zeros(0, 4, dtype=torch.float16),
    }


@pytest.mark.parametrize(
    "writer,reference_load",
    [
        (SafetensorsWriter, load_file),
        (TorchZipWriter, lambda p: torch.load(p, weights_only=True)),
    ],
)
def test_streamed_file_reads_back_with_the_reference_library(tmp_path, writer, reference_load):
    tensors = _tensors()
    path = tmp_path / "out.bin"
    w = writer(path, [Entry(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()])
    for v in tensors.values():  # in blocks of at most two rows, as the merge streams them
        for start in range(0, max(len(v), 1), 2):
            w.write(v[start : start + 2])
    w.close()
    back = reference_load(path)
    assert list(back) == list(tensors)
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype and torch.equal(back[name], value), name


def test_an_aborted_zip_writer_leaves_nothing_to_fail_when_collected(tmp_path):
    """A merge that fails mid-tensor (e.g. NaN found) aborts the writer; zipfile must not try to finish the file
    later, from the garbage collector, into the closed file (a stray traceback after the one-line error)."""
    unraisable = []
    hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        w = TorchZipWriter(tmp_path / "x.pth", [Entry("a", torch.float16, (4, 2))])
        w.write(torch.zeros(2, 2, dtype=torch.float16))
        w.abort()
        del w
        gc.collect()
    finally:
        sys.unraisablehook = hook
    assert not unraisable, unraisable[0].exc_value


def test_writer_refuses_missing_or_extra_data(tmp_path):
    w = SafetensorsWriter(tmp_path / "x", [Entry("a", torch.float16, (4, 2))])
    w.write(torch.zeros(2, 2, dtype=torch.float16))
    with pytest.raises(ValueError, match="not fully written"):
        w.close()
    w = SafetensorsWriter(tmp_path / "y", [Entry("a", torch.float16, (1, 2))])
    with pytest.raises(ValueError, match="more bytes"):
        w.write(torch.zeros(2, 2, dtype=torch.float16))


def test_readers_give_any_rows_of_reference_files(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "a.safetensors")
    transposed = torch.randn(5, 6).t()  # a non-contiguous tensor, as pickles may hold
    torch.save({**tensors, "transposed": transposed}, tmp_path / "a.pth")
    for refs, extra in (
        (read_safetensors(tmp_path / "a.safetensors"), {}),
        (read_torch_zip(tmp_path / "a.pth"), {"transposed": transposed}),
    ):
        for name, value in {**tensors, **extra}.items():
            assert torch.equal(refs[name].read(), value), name
            if len(value) > 3:
                assert torch.equal(refs[name].read(1, 3), value[1:3]), name


def test_torch_zip_reader_never_runs_pickled_code(tmp_path):
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    torch.save({"w": torch.ones(2), "x": Exploit()}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeFileError, match=r"__builtin__\.exec"):
        read_torch_zip(tmp_path / "evil.pth")
    assert not marker.exists()


@pytest.mark.parametrize("cut", [5, 40, 200])
def test_truncated_files_are_reported_not_misread(tmp_path, cut):
    save_file(_tensors(), tmp_path / "a.safetensors")
    torch.save(_tensors(), tmp_path / "a.pth")
    for name, reader in (("a.safetensors", read_safetensors), ("a.pth", read_torch_zip)):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) - cut] if cut > 100 else data[:cut])
        with pytest.raises(CorruptFileError, match=name):
            refs = reader(tmp_path / name)
            for ref in refs.values():
                ref.read()


# ----------------------------------------------------------------------------------- hostile files, built by hand


def _torch_zip(path: Path, pickle_bytes: bytes, records: dict[str, bytes] | None = None, *, deflate=False) -> Path:
    """A torch.save-shaped zip: ``archive/data.pkl`` (optionally deflated) then ``archive/<name>`` records, in order
    (a name may repeat)."""
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as zf:
        warnings.simplefilter("ignore")  # zipfile warns about a repeated name, which some cases want
        zf.writestr("archive/data.pkl", pickle_bytes, zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED)
        for name, data in (records or {}).items():
            zf.writestr(f"archive/{name}", data)
    return path


def _rewritten(src: Path, dst: Path, edit) -> Path:
    """A copy of the torch zip ``src`` whose data.pkl is ``edit(data.pkl)`` (records and CRCs otherwise intact)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info, edit(data) if info.filename.endswith("/data.pkl") else data)
    return dst


def _nested_memo_tuple(levels: int) -> bytes:
    """Pickle opcodes leaving one tuple on the stack whose two halves are the same tuple, ``levels`` deep: a few bytes
    per level, 2**levels leaves for anything that walks it (repr, hash)."""
    ops = b"X\x01\x00\x00\x00aq\x000"  # push 'a', memo 0, pop
    for i in range(levels):  # push (memo[i], memo[i]) as memo[i + 1], pop
        ops += b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86q" + bytes([i + 1]) + b"0"
    return ops + b"h" + bytes([levels])


_STORAGE_PID = b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQ"


def _tensor_pickle(size: bytes = b"K\x01\x85", stride: bytes = b"K\x01\x85") -> bytes:
    """{'w': _rebuild_tensor_v2(storage '0' of one float, offset 0, size, stride)}, as torch.save writes it."""
    return (
        b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n("
        + _STORAGE_PID
        + b"K\x00"
        + size
        + stride
        + b"\x89)tRs."
    )


HOSTILE_PICKLES = [
    ("memo index 2**31 (the C unpickler allocates it)", b"\x80\x02}r\xff\xff\xff\x7f.", CorruptFileError, "memo"),
    (
        "a memo-shared tuple as dict key",
        b"\x80\x02}" + _nested_memo_tuple(60) + b"K\x00s.",
        CorruptFileError,
        "key",
    ),
    (
        "a memo-shared tuple as storage id",
        b"\x80\x02}X\x01\x00\x00\x00w" + _nested_memo_tuple(60) + b"Qs.",
        CorruptFileError,
        "persistent id",
    ),
    (
        "BUILD on the reader's own function",
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x08\x00\x00\x00__name__X\x01\x00\x00\x00xsb.",
        UnsafeFileError,
        "BUILD",
    ),
    (
        "BUILD on a storage type",
        b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeK\x01sb.",
        UnsafeFileError,
        "BUILD",
    ),
    ("an opcode torch.save never writes (INST)", b"\x80\x02ios\nsystem\n.", CorruptFileError, "opcode"),
    (
        "600k empty lists: past the value budget",
        b"\x80\x02(" + b"]" * 600_000 + b"l.",
        CorruptFileError,
        "values",
    ),
    ("a 40-byte integer", b"\x80\x02\x8a\x28" + b"\x01" * 40 + b".", CorruptFileError, "integer"),
    (
        "a stride-0 view 1000 times its one-element storage",
        _tensor_pickle(b"M\xe8\x03\x85", b"K\x00\x85"),
        CorruptFileError,
        "holds more elements",
    ),
    ("a view past its storage", _tensor_pickle(b"K\x02\x85", b"K\x01\x85"), CorruptFileError, "outside"),
    ("a float tensor size", _tensor_pickle(b"G?\xf0\x00\x00\x00\x00\x00\x00\x85"), CorruptFileError, "size"),
]


@pytest.mark.parametrize("label,pickle_bytes,error,message", HOSTILE_PICKLES, ids=[c[0] for c in HOSTILE_PICKLES])
def test_hostile_pickles_are_refused_quickly(tmp_path, label, pickle_bytes, error, message):
    path = _torch_zip(tmp_path / "x.bin", pickle_bytes, {"data/0": b"\x00" * 4})
    started = time.monotonic()
    with pytest.raises(error, match=message) as caught:
        read_torch_zip(path)
    assert time.monotonic() - started < 5, label
    assert "x.bin" in str(caught.value) and "\n" not in str(caught.value)


def test_a_deflated_pickle_bomb_is_refused_before_it_is_unpacked(tmp_path):
    bomb = b"\x80\x02(" + b"]" * (64 << 20) + b"l."  # 64 MB of EMPTY_LIST deflates to ~64 KB
    path = _torch_zip(tmp_path / "bomb.bin", bomb, deflate=True)
    assert path.stat().st_size < 200_000
    started = time.monotonic()
    with pytest.raises(CorruptFileError, match="implausibly large"):
        read_torch_zip(path)
    assert time.monotonic() - started < 5


def test_torch_zip_readings_that_torch_load_would_differ_on_are_refused(tmp_path):
    torch.save({"a": torch.ones(2), "b": torch.ones(4, dtype=torch.float16)}, tmp_path / "two.bin")
    # the same record twice: torch.load reads one of them, so any choice could disagree with it
    duplicated = _torch_zip(
        tmp_path / "dup.bin",
        zipfile.ZipFile(tmp_path / "two.bin").read("two/data.pkl"),
        {"data/0": struct.pack("<2f", 1, 1), "data/1": b"\x00" * 8, "data/0 ": b"", "byteorder": b"little"},
    )
    with zipfile.ZipFile(duplicated, "a") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zf.writestr("archive/data/0", struct.pack("<2f", 2, 2))
    with pytest.raises(CorruptFileError, match="twice"):
        read_torch_zip(duplicated)
    # one storage named with two dtypes: torch.load reads both tensors with the first
    same_key = _rewritten(
        tmp_path / "two.bin", tmp_path / "same.bin", lambda p: p.replace(b"X\x01\x00\x00\x001", b"X\x01\x00\x00\x000")
    )
    with pytest.raises(CorruptFileError, match="two dtypes"):
        read_torch_zip(same_key)
    # big-endian data: torch.load byte-swaps it, hubmerge would not
    with zipfile.ZipFile(tmp_path / "two.bin") as zin, zipfile.ZipFile(tmp_path / "be.bin", "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, b"big" if info.filename.endswith("byteorder") else zin.read(info))
    with pytest.raises(InputError, match="big-endian"):
        read_torch_zip(tmp_path / "be.bin")


def test_state_dict_metadata_is_read_and_ignored(tmp_path):
    """``torch.save(module.state_dict())`` sets ``_metadata`` on the OrderedDict with BUILD: the one BUILD accepted."""
    layer = torch.nn.Linear(3, 2)
    torch.save(layer.state_dict(), tmp_path / "sd.bin")
    refs = read_torch_zip(tmp_path / "sd.bin")
    assert torch.equal(refs["weight"].read(), layer.weight.detach())
    assert torch.equal(refs["bias"].read(), layer.bias.detach())


def _safetensors(path: Path, header: bytes | dict, data: bytes) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _entry(shape, begin, end, dtype="U8"):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


_DATA = bytes(range(16))
SAFETENSORS_CASES = [
    ("plain", {"a": _entry([16], 0, 16)}, _DATA),
    ("leading space", b' {"a":{"dtype":"U8","shape":[16],"data_offsets":[0,16]}}', _DATA),
    ("padding after the header", b'{"a":{"dtype":"U8","shape":[16],"data_offsets":[0,16]}}    ', _DATA),
    ("empty tensors anywhere", {"e": _entry([0], 16, 16), "a": _entry([16], 0, 16), "f": _entry([0, 3], 0, 0)}, _DATA),
    ("unknown extra field", {"a": {**_entry([16], 0, 16), "note": 1}}, _DATA),
    (
        "duplicate key",
        b'{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},"a":{"dtype":"U8","shape":[8],"data_offsets":[8,16]}}',
        _DATA,
    ),
    ("overlapping offsets", {"a": _entry([8], 0, 8), "b": _entry([8], 4, 12)}, _DATA[:12]),
    ("a hole", {"a": _entry([4], 0, 4), "b": _entry([8], 8, 16)}, _DATA),
    ("bytes no tensor covers", {"a": _entry([8], 0, 8)}, _DATA),
    ("float shape", {"a": _entry([16.0], 0, 16)}, _DATA),
    ("string shape", {"a": _entry(["16"], 0, 16)}, _DATA),
    ("bool shape", {"a": _entry([True], 0, 1)}, _DATA[:1]),
    ("negative offset", {"a": _entry([16], -1, 15)}, _DATA),
    ("float offsets", {"a": {"dtype": "U8", "shape": [16], "data_offsets": [0.0, 16.0]}}, _DATA),
    ("three offsets", {"a": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16, 16]}}, _DATA),
    (
        "Infinity in the metadata",
        b'{"__metadata__":{"x":Infinity},"a":{"dtype":"U8","shape":[16],"data_offsets":[0,16]}}',
        _DATA,
    ),
    ("NaN as a shape", b'{"a":{"dtype":"U8","shape":[NaN],"data_offsets":[0,16]}}', _DATA),
    ("metadata that is not strings", {"__metadata__": {"x": 1}, "a": _entry([16], 0, 16)}, _DATA),
    ("deep nesting", b'{"__metadata__":' + b"[" * 100_000 + b"]" * 100_000 + b"}", b""),
    ("a header that is a list", b"[]", b""),
    ("a shape too large for the data", {"a": _entry([2**40], 0, 16)}, _DATA),
]


@pytest.mark.parametrize("label,header,data", SAFETENSORS_CASES, ids=[c[0] for c in SAFETENSORS_CASES])
def test_safetensors_reader_accepts_and_refuses_what_the_reference_does(tmp_path, label, header, data):
    from safetensors import safe_open

    path = _safetensors(tmp_path / "t.safetensors", header, data)
    try:
        with safe_open(path, "pt") as f:
            reference = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # noqa: BLE001 - the reference refuses, with its own exception types
        reference = None
    if reference is None:
        with pytest.raises(CorruptFileError, match="t.safetensors") as caught:
            read_safetensors(path)
        assert "\n" not in str(caught.value)
    else:
        refs = read_safetensors(path)
        assert sorted(refs) == sorted(reference)
        for name, ref in refs.items():
            assert torch.equal(ref.read(), reference[name]), name
