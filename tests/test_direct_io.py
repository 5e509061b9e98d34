"""Files written with O_DIRECT (hubmerge/directio.py, through hubmerge/tensorio/output.py) hold the same bytes and
SHA256 as through the page cache, whether the filesystem refuses O_DIRECT from the start or refuses a write halfway,
for safetensors and torch zips alike."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hubmerge import directio as direct
from hubmerge.errors import CorruptFileError
from hubmerge.tensorio import SafetensorsWriter, TorchZipWriter, output
from hubmerge.tensorio.source import Entry

STAGE = 3 * direct.ALIGN  # a small aligned buffer: blocks cross it many times


@pytest.fixture(autouse=True)
def small_stage(monkeypatch):
    monkeypatch.setattr(direct, "STAGE_BYTES", STAGE)


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    shapes = [(37, 41), (1,), (300, 97), (5, 4096), (2, 3)]
    return {f"t{i}": torch.randn(s, generator=g).to(torch.float16) for i, s in enumerate(shapes)}


def write(path: Path) -> tuple[str | None, bool]:
    """Write tensors() as safetensors in odd-sized blocks; returns (SHA256 while writing, still direct at the end)."""
    ts = tensors()
    w = SafetensorsWriter(path, [Entry(k, v.dtype, tuple(v.shape)) for k, v in ts.items()], metadata={"a": "b"})
    for v in ts.values():
        for block in v.split(13):
            w.write(block)
    still = w._file.direct
    w.close()
    return w.sha256, still


def check_same(a: Path, b: Path, digests: list[str | None]) -> None:
    data = a.read_bytes()
    assert data == b.read_bytes()
    assert set(digests) == {hashlib.sha256(data).hexdigest()}
    loaded = load_file(a)
    assert all(torch.equal(loaded[k], v) for k, v in tensors().items())


def supports_direct(folder: Path) -> bool:
    try:
        fd = os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


def reference(tmp_path: Path, monkeypatch) -> tuple[Path, str | None]:
    with monkeypatch.context() as m:
        m.setattr(output, "USE_DIRECT", False)
        digest, still = write(tmp_path / "buffered.safetensors")
    assert not still
    return tmp_path / "buffered.safetensors", digest


def test_direct_writes_match_page_cache_writes(tmp_path, monkeypatch):
    ref, ref_digest = reference(tmp_path, monkeypatch)
    digest, still = write(tmp_path / "direct.safetensors")
    assert still == supports_direct(tmp_path)
    assert (tmp_path / "direct.safetensors").stat().st_size > 4 * STAGE  # many full buffers and a padded tail
    check_same(tmp_path / "direct.safetensors", ref, [digest, ref_digest])


def test_filesystem_refusing_o_direct_falls_back_at_open(tmp_path, monkeypatch):
    ref, ref_digest = reference(tmp_path, monkeypatch)
    real = fcntl.fcntl

    def refuse(fd, cmd, arg=0):
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, cmd, arg)

    monkeypatch.setattr(direct.fcntl, "fcntl", refuse)
    digest, still = write(tmp_path / "refused.safetensors")
    assert not still
    check_same(tmp_path / "refused.safetensors", ref, [digest, ref_digest])


@pytest.mark.parametrize("after", [0, 3])
def test_filesystem_refusing_a_direct_write_falls_back_midway(tmp_path, monkeypatch, after):
    ref, ref_digest = reference(tmp_path, monkeypatch)
    real, calls = os.pwrite, []

    def refuse_later(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            calls.append(offset)
            if len(calls) > after:
                raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(direct.os, "pwrite", refuse_later)
    digest, still = write(tmp_path / "midway.safetensors")
    assert not still and len(calls) == after + 1  # refused once, never tried again
    check_same(tmp_path / "midway.safetensors", ref, [digest, ref_digest])


def test_a_torch_zip_is_written_front_to_back_direct_and_hashed(tmp_path, monkeypatch):
    """A .pth (torch zip) carries each record's CRC after its data, so nothing is patched: the file stays direct to
    its end, its SHA256 is known as it closes, and torch.load reads it (mmap too), as through the page cache."""
    ts = tensors()
    files = {}
    for name, use_direct in (("direct", True), ("buffered", False)):
        path = tmp_path / name / "consolidated.00.pth"  # the zip's records live under the file's name
        path.parent.mkdir()
        with monkeypatch.context() as m:
            m.setattr(output, "USE_DIRECT", use_direct)
            w = TorchZipWriter(path, [Entry(k, v.dtype, tuple(v.shape)) for k, v in ts.items()])
            for v in ts.values():
                for block in v.split(13):
                    w.write(block)
            assert w._file.direct == (use_direct and supports_direct(tmp_path))
            w.close()
        files[name] = path.read_bytes()
        assert w.sha256 == hashlib.sha256(files[name]).hexdigest()
        for mmap in (False, True):
            loaded = torch.load(path, weights_only=True, mmap=mmap)
            assert all(torch.equal(loaded[k], v) for k, v in ts.items())
    assert files["direct"] == files["buffered"]
    assert all(info.flag_bits & 0x08 for info in zipfile.ZipFile(tmp_path / "direct" / path.name).infolist())


def test_disk_full_mid_write_then_abort_raises_nothing_more(tmp_path, monkeypatch):
    """The writer's error surfaces once; aborting (closing without finishing) must not try the failed write again."""
    real, calls = os.pwrite, []

    def disk_full_later(fd, data, offset):
        calls.append(offset)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(direct.os, "pwrite", disk_full_later)
    ts = tensors()
    w = SafetensorsWriter(tmp_path / "full.safetensors", [Entry(k, v.dtype, tuple(v.shape)) for k, v in ts.items()])
    with pytest.raises(OSError) as failure:
        for v in ts.values():
            w.write(v)
    assert failure.value.errno == errno.ENOSPC
    tries = len(calls)
    w.abort()
    assert len(calls) == tries and w.sha256 is None


def test_closed_direct_files_give_their_buffers_to_the_next(tmp_path):
    """Fresh memory is costly at its first touch: a closed appender's or reader's buffers serve the next file, and
    a closed reader cannot read from a buffer that is another file's by now."""
    with open(tmp_path / "a", "wb") as f:
        first = direct.DirectAppender(f.fileno())
        first.append(memoryview(b"x" * (STAGE + 5)))
        first.flush(STAGE + 5)
        used = {id(b) for b in first._maps}
        first.close()
    with open(tmp_path / "b", "wb") as f:
        second = direct.DirectAppender(f.fileno())
        assert {id(b) for b in second._maps} == used
        second.append(memoryview(b"y" * 7))
        second.flush(7)
        second.close()
    assert (tmp_path / "a").read_bytes() == b"x" * (STAGE + 5) and (tmp_path / "b").read_bytes() == b"y" * 7

    reader = direct.DirectReader(open(tmp_path / "a", "rb", buffering=0))
    assert reader.read(STAGE + 5) == b"x" * (STAGE + 5)
    buffer = reader._map
    reader.close()
    with pytest.raises(ValueError):
        reader.read(1)
    assert direct.stage_buffer() is buffer


@pytest.mark.parametrize("refuse", [False, True])
def test_a_downloaded_shard_is_read_past_the_page_cache_with_the_same_rows(tmp_path, monkeypatch, refuse):
    """The merge reads a shard this run downloaded with O_DIRECT (TensorRef.direct), into an aligned buffer: every
    block of rows, at any offset, equals an ordinary read; a filesystem refusing O_DIRECT gets ordinary reads; a
    file cut short is refused in one line naming it."""
    from dataclasses import replace

    from hubmerge.tensorio.safetensors import read_safetensors
    from hubmerge.tensorio.source import aligned_buffer

    path = tmp_path / "shard.safetensors"
    with monkeypatch.context() as m:
        m.setattr(output, "USE_DIRECT", False)
        write(path)
    real_open, direct_opens = os.open, []

    def recording_open(name, flags, *args, **kw):
        if flags & os.O_DIRECT:
            direct_opens.append(name)
            if refuse:
                raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(name, flags, *args, **kw)

    monkeypatch.setattr(direct.os, "open", recording_open)
    refs = read_safetensors(path)
    for name, ref in refs.items():
        rows = ref.shape[0]
        for start, stop in {(0, rows), (0, 1), (rows // 3, rows), (1, max(1, rows - 1)), (rows - 1, rows)}:
            buffer = aligned_buffer((stop - start) * ref.row_bytes)
            got = replace(ref, direct=True).read_into(buffer, start, stop)
            assert torch.equal(got, ref.read(start, stop)), (name, start, stop)
    assert direct_opens and (refuse or supports_direct(tmp_path))

    last = max(refs.values(), key=lambda r: r.offset)
    os.truncate(path, last.offset + last.nbytes - 5)
    with pytest.raises(CorruptFileError, match=f"{path}: file is truncated"):
        replace(last, direct=True).read_into(aligned_buffer(last.nbytes), 0, last.shape[0])
