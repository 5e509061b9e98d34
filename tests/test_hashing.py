"""The hash cache (hubmerge/verification/hashing.py): a file is hashed once in its life, and never trusted after it
changed, was copied or replaced; the cache file stays bounded and a damaged one is ignored."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from huggingface_hub import HfApi
from support import ALPACA_REPO as ALPACA
from support import spy

from hubmerge.inputs.hub import Hub
from hubmerge.inputs.sources import fetch, resolve
from hubmerge.verification import hashing
from hubmerge.verification.checklists import check_files


@pytest.fixture
def reads(tmp_path, monkeypatch):
    """A private cache file for the test, and the list of files hashing reads (appended to as they are read)."""
    monkeypatch.setenv("HUBMERGE_HASH_CACHE", str(tmp_path / "hashes.json"))
    seen: list[Path] = []
    spy(monkeypatch, hashing, "_read_into", lambda path, hashers, progress=None: seen.append(Path(path)))
    return seen


def settled_file(path: Path, data: bytes) -> Path:
    """Write ``data`` and wait until the write is older than the cache's clock-tick guard (files that changed in the
    tick their hashing began are never cached)."""
    path.write_bytes(data)
    time.sleep(0.05)
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_unchanged_file_is_read_once_and_a_changed_one_again(tmp_path, reads):
    f = settled_file(tmp_path / "w.bin", b"a" * 5000)
    assert hashing.file_digest(f) == sha(b"a" * 5000)
    assert hashing.file_digest(f) == sha(b"a" * 5000)
    assert reads == [f]  # the second answer came from the cache
    assert json.loads((tmp_path / "hashes.json").read_text())["version"] == 1

    # Same size, mtime set back as `cp -p` / `rsync -t` would: only the ctime tells, and it is part of the key.
    st = f.stat()
    settled_file(f, b"b" * 5000)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    assert hashing.file_digest(f) == sha(b"b" * 5000)
    assert reads == [f, f]


def test_copied_or_replaced_file_with_a_new_inode_is_rehashed(tmp_path, reads):
    original = settled_file(tmp_path / "w.bin", b"x" * 4096)
    assert hashing.file_digest(original) == sha(b"x" * 4096)
    copy = tmp_path / "copy.bin"
    shutil.copy2(original, copy)  # same bytes, size and mtime; another inode
    assert hashing.file_digest(copy) == sha(b"x" * 4096)
    assert reads == [original, copy]

    other = tmp_path / "other.bin"
    other.write_bytes(b"y" * 4096)
    shutil.copystat(original, other)  # same size and mtime as the cached original...
    os.replace(other, original)  # ...now under its name
    time.sleep(0.05)
    assert hashing.file_digest(original) == sha(b"y" * 4096)
    assert reads[-1] == original and len(reads) == 3


def test_file_changing_while_hashed_is_not_cached(tmp_path, reads):
    """A file whose last change is not yet a clock tick in the past when hashing starts could change again without
    its identity showing it: its hash is not kept. (A change time in the future stands for "just now", whatever
    the scheduler does between the write and the hashing.)"""
    f = tmp_path / "fresh.bin"
    f.write_bytes(b"z" * 1000)
    soon = time.time_ns() + 10**9
    os.utime(f, ns=(soon, soon))
    assert hashing.file_digest(f) == sha(b"z" * 1000)
    assert hashing.file_digest(f) == sha(b"z" * 1000)
    assert reads == [f, f]


def test_cache_file_is_bounded_and_keeps_the_most_recent(tmp_path):
    cache = hashing.HashCache(tmp_path / "hashes.json", max_entries=5)
    for i in range(20):
        cache.put((1, i, 10, 0, 0), sha(str(i).encode()))
    table = json.loads((tmp_path / "hashes.json").read_text())["sha256"]
    assert len(table) == 5
    fresh = hashing.HashCache(tmp_path / "hashes.json", max_entries=5)
    assert fresh.get((1, 19, 10, 0, 0)) == sha(b"19")
    assert fresh.get((1, 0, 10, 0, 0)) is None
    assert (tmp_path / "hashes.json").stat().st_size <= fresh.max_bytes


@pytest.mark.parametrize(
    "content",
    [
        b"\x00\xffnot json at all",
        b'["a", "list"]',
        b'{"version": 1, "sha256": {"1:2:3:4:5": ["not-a-digest", 1], "6:7:8:9:10": "x"}}',
        b'{"version": 99, "sha256": {}}',
        b"{" + b" " * (2 * 256 * 4096) + b"}",  # bigger than the cache may be
    ],
    ids=["garbage", "list", "bad-entries", "future-version", "oversized"],
)
def test_corrupt_cache_file_is_ignored_and_replaced(tmp_path, reads, content):
    (tmp_path / "hashes.json").write_bytes(content)
    f = settled_file(tmp_path / "w.bin", b"q" * 3000)
    assert hashing.file_digest(f) == sha(b"q" * 3000)
    assert hashing.file_digest(f) == sha(b"q" * 3000)
    assert reads == [f]
    doc = json.loads((tmp_path / "hashes.json").read_text())
    assert doc["version"] == 1 and [v[0] for v in doc["sha256"].values()] == [sha(b"q" * 3000)]


def test_unwritable_cache_is_not_fatal(tmp_path, reads, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("HUBMERGE_HASH_CACHE", str(blocker / "hashes.json"))
    f = settled_file(tmp_path / "w.bin", b"r" * 100)
    assert hashing.file_digest(f) == sha(b"r" * 100)


def test_verification_reads_the_bytes_whatever_the_cache_says(tmp_path, reads):
    """A flipped bit on disk leaves a file's identity alone: `hubmerge verify` must not trust the cache."""
    f = settled_file(tmp_path / "w.bin", b"v" * 2048)
    hashing.cache().put(hashing.file_key(f.stat()), sha(b"rotten"))
    assert hashing.file_digest(f) == sha(b"rotten")  # what a merge would trust
    (row,) = check_files(tmp_path, {"w.bin": sha(b"v" * 2048)})
    assert row.status == "ok" and row.actual == sha(b"v" * 2048)
    assert hashing.file_digest(f) == sha(b"v" * 2048)  # and the cache was corrected


def test_output_files_are_recorded_as_written(tmp_path, reads):
    import torch

    from hubmerge.tensorio import SafetensorsWriter
    from hubmerge.tensorio.source import Entry

    t = torch.arange(3000, dtype=torch.float16).reshape(30, 100)
    w = SafetensorsWriter(tmp_path / "o.safetensors", [Entry("t", t.dtype, tuple(t.shape))])
    w.write(t)
    w.close()
    assert hashing.file_digest(tmp_path / "o.safetensors") == w.sha256 == sha((tmp_path / "o.safetensors").read_bytes())
    assert reads == []


def test_hub_download_is_hashed_once_across_runs(hub, tmp_path, reads):
    """The SHA256 download verification computed is reused by the next run over the cached files (a weights file
    big enough to be worth it: the cache waits out the clock tick of a file written that instant)."""
    repo = "alice/big-adapter"
    folder = tmp_path / "upload"
    folder.mkdir()
    shutil.copy(Path(hub.local[ALPACA]) / "adapter_config.json", folder)
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(hashing._WAIT_BYTES + 1))
    api = HfApi(endpoint=hub.url, token=hub.tokens["alice"])
    api.create_repo(repo, private=True)
    api.upload_folder(repo_id=repo, folder_path=folder)
    settings = Hub(endpoint=hub.url, token=hub.tokens["alice"], cache_dir=tmp_path / "cache")

    def weights_reads(source) -> int:
        blob = (source.path / "adapter_model.safetensors").resolve()
        return sum(p.resolve() == blob for p in reads)

    first = resolve(repo, "adapter", settings)
    fetch(first, settings)
    assert weights_reads(first) == 1
    again = resolve(repo, "adapter", settings)
    fetch(again, settings)
    assert again.hashes["adapter_model.safetensors"] == first.hashes["adapter_model.safetensors"]
    assert weights_reads(again) == 1  # not read a second time


def test_an_output_is_hashed_without_waiting_behind_the_inputs():
    # The CLI hashes the inputs (for the recipe) while torch imports and the merge starts; an output shard's close
    # waits for its own hash, so it must not queue behind that pass (measured: a first run 5.5 -> 5.0 s on 1b).
    inputs_busy = threading.Event()
    try:
        hashing.submit(inputs_busy.wait, 30, inputs=True)
        output = hashing.submit(hashlib.sha256, b"shard bytes")
        assert output.result(timeout=10).hexdigest() == hashlib.sha256(b"shard bytes").hexdigest()
    finally:
        inputs_busy.set()
