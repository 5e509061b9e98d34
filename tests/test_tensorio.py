"""The streaming readers and writers against the reference libraries (safetensors, torch.save / torch.load)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from hubmerge.errors import CorruptFileError, UnsafeFileError
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
