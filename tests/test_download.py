"""Big Hub files hashed as they arrive and written with O_DIRECT (hubmerge/inputs/download.py), and output shards
read for their upload with O_DIRECT (hubmerge/directio.py): the client's own cache entry, verified before anyone
uses it, a damaged copy downloaded once more, nothing half-written left in the cache, the same bytes where the
filesystem refuses O_DIRECT."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random

import pytest
from huggingface_hub import hf_hub_download
from support import spy

from hubmerge import directio
from hubmerge.errors import CorruptFileError, HubAccessError, VerificationError
from hubmerge.inputs import download
from hubmerge.inputs.hub import Hub
from hubmerge.inputs.sources import fetch, resolve
from hubmerge.progress import Progress, ProgressEvent
from hubmerge.tensorio import output

REPO, NAME = "alice/download-blobs", "model.safetensors"
SMALL = 64 * 1024  # small buffers: a ~1 MB file crosses many of them


@pytest.fixture
def blob(hub, monkeypatch):
    monkeypatch.setattr(directio, "STAGE_BYTES", 3 * directio.ALIGN)  # small buffers: the file crosses many
    data = random.Random(12).randbytes(16 * SMALL + 4321)  # not a multiple of any buffer: a padded, cut-back tail
    try:
        hub.create_repo(REPO, private=True)
        hub.commit_files(REPO, {NAME: data, "config.json": b"{}\n"})
    except Exception:  # committed by an earlier test on the shared Hub
        pass
    return data


def _source(hub, tmp_path):
    settings = Hub(endpoint=hub.url, token=hub.tokens["alice"], cache_dir=tmp_path / "cache")
    source = resolve(REPO, "base", settings)
    fetch(source, settings, weights=False)
    assert source.remote[NAME].sha256  # an LFS file
    return source, settings


def _cache_files(tmp_path) -> list[str]:
    return sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "cache").rglob("*") if p.is_file())


def _weights_in_cache(tmp_path, data: bytes) -> list[str]:
    """The cache's files holding the weights: their blob, or a partial download of it."""
    sha = hashlib.sha256(data).hexdigest()
    return [f for f in _cache_files(tmp_path) if f"/blobs/{sha}" in f]


def test_download_is_the_clients_cache_entry_verified(hub, blob, tmp_path):
    source, settings = _source(hub, tmp_path)
    events: list[ProgressEvent] = []
    path = download.download_verified(source, NAME, settings, Progress(events.append))
    assert path.read_bytes() == blob and path.is_symlink() and not os.path.isabs(os.readlink(path))
    assert source.hashes[NAME] == hashlib.sha256(blob).hexdigest()
    assert [e for e in events if e.stage == "verify" and e.finished], "the verification is reported"
    assert sum(e.done for e in events if e.stage == "download" and e.finished) == len(blob)
    assert not [f for f in _cache_files(tmp_path) if f.endswith(".incomplete")]
    # the client finds it where it would have put it, offline
    again = hf_hub_download(REPO, NAME, revision=source.commit, cache_dir=tmp_path / "cache", local_files_only=True)
    assert os.path.samefile(again, path)


def test_a_download_reads_the_socket_in_large_pieces(hub, blob, tmp_path, monkeypatch):
    """Each read of a response is a trip through the HTTP client's Python: a big file is read up to READ_BYTES at a
    time, not the client's default 64 KiB."""
    from httpcore2._backends.sync import SyncStream

    source, settings = _source(hub, tmp_path)
    asked: list[int] = []
    spy(monkeypatch, SyncStream, "read", lambda self, max_bytes, timeout=None: asked.append(max_bytes))
    path = download.download_verified(source, NAME, settings, Progress())
    assert path.read_bytes() == blob
    assert asked and min(asked) >= download.READ_BYTES > 64 * 1024


def test_a_damaged_download_is_fetched_again_then_refused(hub, blob, tmp_path):
    source, settings = _source(hub, tmp_path)
    hub.faults.corrupt(REPO, NAME, times=1)
    assert download.download_verified(source, NAME, settings, Progress()).read_bytes() == blob

    other = tmp_path / "other"
    source, settings = _source(hub, other)
    hub.faults.corrupt(REPO, NAME)  # always
    with pytest.raises(VerificationError, match="even after downloading it again") as err:
        download.download_verified(source, NAME, settings, Progress())
    assert NAME in str(err.value) and "\n" not in str(err.value)
    assert _weights_in_cache(other, blob) == [] and not (source.local / NAME).exists()


def test_a_file_the_known_hash_table_knows_otherwise_is_refused(hub, blob, tmp_path, monkeypatch):
    # the same check as every other download: the published SHA256 of a known repo's file wins over the Hub's
    import hubmerge.verification.known as known

    table = json.loads(json.dumps(known.known_hashes()))
    table["adapters"].append({"name": "a published file", "repos": [REPO], "file": NAME, "sha256": "0" * 64})
    monkeypatch.setattr(known, "known_hashes", lambda: table)
    source, settings = _source(hub, tmp_path)
    with pytest.raises(VerificationError, match="published a published file"):
        download.download_verified(source, NAME, settings, Progress())
    assert _weights_in_cache(tmp_path, blob) == [] and not (source.local / NAME).exists()


def test_a_cut_download_resumes_where_it_stopped(hub, blob, tmp_path):
    source, settings = _source(hub, tmp_path)
    hub.faults.drop_after(REPO, NAME, 5 * SMALL + 77)  # once, mid-buffer
    hub.clear_requests()
    assert download.download_verified(source, NAME, settings, Progress()).read_bytes() == blob
    gets = [r for r in hub.requests if r.method == "GET" and r.path.split("?")[0].endswith(NAME)]
    assert len(gets) == 2  # the second asked only for the rest (Range), and the SHA256 still matched


def test_a_download_that_never_progresses_gives_up_in_one_line_leaving_nothing(hub, blob, tmp_path):
    source, settings = _source(hub, tmp_path)
    hub.faults.drop_after(REPO, NAME, 0, times=None)
    with pytest.raises(HubAccessError) as err:
        download.download_verified(source, NAME, settings, Progress())
    assert "\n" not in str(err.value)
    assert _weights_in_cache(tmp_path, blob) == [] and not (source.local / NAME).exists()


def test_a_damaged_blob_already_in_the_cache_is_replaced(hub, blob, tmp_path):
    source, settings = _source(hub, tmp_path)
    path = download.download_verified(source, NAME, settings, Progress())
    target = path.resolve()
    os.chmod(target, 0o644)
    with open(target, "r+b") as f:  # a bit flipped on disk after the download
        f.seek(len(blob) // 2)
        byte = f.read(1)
        f.seek(len(blob) // 2)
        f.write(bytes([byte[0] ^ 1]))
    assert download.download_verified(source, NAME, settings, Progress()).read_bytes() == blob


def test_a_stale_snapshot_link_is_pointed_at_the_verified_blob(hub, blob, tmp_path):
    source, settings = _source(hub, tmp_path)
    other = tmp_path / "cache" / "elsewhere"
    other.write_bytes(b"not the weights")
    link = source.local / NAME
    link.symlink_to(other)  # the snapshot's name points at something else
    assert download.download_verified(source, NAME, settings, Progress()).read_bytes() == blob
    assert other.read_bytes() == b"not the weights"  # left as it was


def test_download_without_o_direct_gives_the_same_file(hub, blob, tmp_path, monkeypatch):
    monkeypatch.setattr(directio, "USE_DIRECT", False)
    source, settings = _source(hub, tmp_path)
    assert download.download_verified(source, NAME, settings, Progress()).read_bytes() == blob


def test_remote_file_reads_by_few_ranges_within_its_budget(hub, blob, tmp_path):
    source, settings = _source(hub, tmp_path)
    before = len(hub.requests)
    f = io.BufferedReader(download.RemoteFile(source, NAME, settings, chunk=SMALL))
    assert f.read(10) == blob[:10] and f.read(100) == blob[10:110]  # one range: the first chunk
    f.seek(-30, io.SEEK_END)
    assert f.read() == blob[-30:]  # one range: the last chunk
    f.seek(-SMALL // 2, io.SEEK_END)
    f.seek(5)
    assert f.read(7) == blob[5:12] and f.read(SMALL) == blob[12 : 12 + SMALL]  # the first chunk, then one more range
    assert [r.range for r in hub.requests[before:] if r.method == "GET"] == [
        f"bytes=0-{SMALL - 1}",
        f"bytes={len(blob) - SMALL}-{len(blob) - 1}",
        f"bytes={SMALL}-{2 * SMALL - 1}",
    ]
    greedy = io.BufferedReader(download.RemoteFile(source, NAME, settings, chunk=SMALL, budget=3 * SMALL))
    greedy.read(2 * SMALL)
    with pytest.raises(CorruptFileError, match=f"{NAME}: its index would take more than"):
        greedy.read(2 * SMALL)


def _write_held(path, data: bytes, pool) -> None:
    """``data`` written as an output file held in ``pool``, as a streamed push's HF writer does."""
    out = output.OutputFile(path, direct=True, held=pool)
    for k in range(0, len(data), 4000):  # odd sizes cross the buffers
        out.write(data[k : k + 4000])
    assert pool.take(path) is None  # not complete yet
    out.finish()
    assert out.digest() == hashlib.sha256(data).hexdigest() and not path.exists()


@pytest.mark.parametrize("source", ["direct", "refused", "held"])
def test_upload_readers_read_the_file_as_written_and_rewind(tmp_path, monkeypatch, source):
    """What an output shard's upload reads through: the file with O_DIRECT (or without, where the filesystem refuses
    it), or the shard held in memory."""
    monkeypatch.setattr(directio, "STAGE_BYTES", 3 * directio.ALIGN)
    monkeypatch.setattr(output, "STAGE_BYTES", 3 * directio.ALIGN)
    if source == "refused":  # a filesystem without O_DIRECT: refused at the first read
        real = os.preadv

        def preadv(fd, buffers, offset):
            if directio.fcntl.fcntl(fd, directio.fcntl.F_GETFL) & directio._DIRECT_FLAG:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(fd, buffers, offset)

        monkeypatch.setattr(directio.os, "preadv", preadv)
    data = os.urandom(7 * directio.ALIGN + 555)
    pool = output.HeldFiles(len(data), 1)
    if source == "held":
        _write_held(tmp_path / "shard", data, pool)
        reader = pool.take(tmp_path / "shard").reader()
        assert pool.live == 1 and pool.held == len(data)
    else:
        (tmp_path / "shard").write_bytes(data)
        reader = directio.DirectReader(io.FileIO(tmp_path / "shard", "r"))
    seen: list[int] = []
    with reader as f:
        f.on_read = seen.append
        assert isinstance(f, io.BufferedIOBase)  # what huggingface_hub uploads from
        parts = []
        while chunk := f.read(5000):  # odd sizes cross the aligned buffer
            parts.append(bytes(chunk))
        assert b"".join(parts) == data and sum(seen) == len(data)
        f.seek(0)  # a retried upload starts over
        assert bytes(f.read()) == data
        f.seek(-100, io.SEEK_END)
        assert bytes(f.read(1000)) == data[-100:] and f.tell() == len(data)
    assert pool.live == 0 and pool.held == 0  # a held shard's memory is given back when its upload closes it
    with pytest.raises(ValueError):
        f.read(1)


@pytest.mark.parametrize("held", [False, True], ids=["on-disk", "in-memory"])
def test_an_upload_sends_large_pieces_and_a_retry_sends_the_whole_shard(hub, tmp_path, monkeypatch, held):
    """An output shard's upload (the streamed push's ShardUploader) hands the socket UPLOAD_CHUNK bytes at a time,
    not the client's default 64 KiB; when the Hub fails the first attempt, the retry sends the shard whole again
    (the Hub checks its size and SHA256), from its file or from memory (buffers smaller than a piece: pieces cross
    them)."""
    from httpcore2._backends.sync import SyncStream

    from hubmerge.inputs import guard
    from hubmerge.stream import ShardUploader

    repo = f"alice/upload-pieces-{held}"
    hub.create_repo(repo, private=True)
    data = os.urandom(3 * guard.UPLOAD_CHUNK + 4321)
    path = tmp_path / "model-00001-of-00001.safetensors"
    monkeypatch.setattr(output, "STAGE_BYTES", guard.UPLOAD_CHUNK * 3 // 4)
    pool = output.HeldFiles(len(data), 1) if held else None
    if pool is not None:
        _write_held(path, data, pool)
    else:
        path.write_bytes(data)
    sent: list[int] = []
    spy(monkeypatch, SyncStream, "write", lambda self, buffer, timeout=None: sent.append(len(buffer)))
    hub.faults.fail_status("/_localhub/lfs-upload/", 500, times=1, method="PUT")
    hub.clear_requests()
    settings = Hub(endpoint=hub.url, token=hub.tokens["alice"], cache_dir=tmp_path / "cache")
    uploader = ShardUploader(settings, repo, remove=False, progress=Progress(), shard_limit=len(data), held=pool)
    sha = hashlib.sha256(data).hexdigest()
    uploader(path, sha)
    assert list(uploader.finish()) == [path.name]
    assert hub.storage.object_path("model", repo, sha).read_bytes() == data
    assert [r.status for r in hub.requests if r.method == "PUT"] == [500, 200]
    # the body in full pieces (three, and a short tail, in the attempt the Hub took), never more at once
    assert sent.count(guard.UPLOAD_CHUNK) >= 3 and max(sent) == guard.UPLOAD_CHUNK > 64 * 1024
    assert pool is None or (pool.live == 0 and not path.exists())  # sent from memory, given back


def test_a_multipart_upload_part_is_sent_as_its_slice_alone(tmp_path):
    """The real Hub may ask for a big file in parts: each part's request carries that slice (its length declared,
    not chunk-encoded), in UPLOAD_CHUNK pieces, and a body sent again (a redirect) is whole again."""
    from huggingface_hub.utils._lfs import SliceFileObj

    from hubmerge.inputs import guard

    data = os.urandom(5 * guard.UPLOAD_CHUNK // 2)
    (tmp_path / "shard").write_bytes(data)
    client = guard._client()
    with (
        open(tmp_path / "shard", "rb") as f,
        SliceFileObj(f, seek_from=1000, read_limit=guard.UPLOAD_CHUNK + 7) as part,
    ):
        request = client.build_request("PUT", "http://127.0.0.1:9/part", data=part)
        assert request.headers["content-length"] == str(guard.UPLOAD_CHUNK + 7)
        assert "transfer-encoding" not in request.headers
        first = list(request.stream)
        assert [len(c) for c in first] == [guard.UPLOAD_CHUNK, 7]
        assert b"".join(first) == b"".join(request.stream) == data[1000 : 1000 + guard.UPLOAD_CHUNK + 7]


def test_a_body_that_cannot_seek_is_still_sent(tmp_path):
    """A file body that cannot tell its position (a pipe) is sent as the HTTP client sends it, chunk-encoded, rather
    than refused."""
    from hubmerge.inputs import guard

    read_end, write_end = os.pipe()
    os.write(write_end, b"piped bytes")
    os.close(write_end)
    with open(read_end, "rb") as pipe:
        request = guard._client().build_request("PUT", "http://127.0.0.1:9/pipe", content=pipe)
        assert request.headers.get("transfer-encoding") == "chunked"
        assert b"".join(request.stream) == b"piped bytes"
