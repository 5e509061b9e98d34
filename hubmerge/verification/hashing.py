"""Hashing files: SHA256 (and md5/sha1 for checklists, git blob ids for the Hub's small files), in one read loop.

Every SHA256 of a whole file goes through here, so that a file is hashed once in its life:

* a persistent cache (:class:`HashCache`, a small JSON file beside the HF cache) maps a file's identity (device,
  inode, size, mtime, ctime) to its SHA256; a file whose identity changed is hashed afresh;
* :func:`prehash` starts hashing local inputs early; output files hashed while they are written are recorded with
  :func:`remember`;
* one background thread does every hashing job of the process (:func:`submit`), in submission order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

_CHUNK = 8 * 1024 * 1024
_AHEAD = 4  # chunks the kernel is asked to read ahead of the hashing


def _read_into(path: Path, hashers: Iterable[Any], progress: Callable[[int], object] | None = None) -> None:
    """Feed a file to every hasher in one pass of 8 MB reads, reporting bytes read to ``progress``. The disk reads
    the next chunks while the current one is hashed (cold: ~2x faster than the kernel's own readahead)."""
    advise = getattr(os, "posix_fadvise", None)
    with open(path, "rb") as f:
        if advise is not None:
            advise(f.fileno(), 0, _AHEAD * _CHUNK, os.POSIX_FADV_WILLNEED)
        done = 0
        while chunk := f.read(_CHUNK):
            done += len(chunk)
            if advise is not None:
                advise(f.fileno(), done + (_AHEAD - 1) * _CHUNK, _CHUNK, os.POSIX_FADV_WILLNEED)
            for h in hashers:
                h.update(chunk)
            if progress is not None:
                progress(len(chunk))


# The hashing threads: one for the outputs (a shard's close waits for its hash), one for the inputs (the recipe's
# hashes), so that an output never waits behind a pass over the inputs and hashing takes a core per side at most.
_POOLS: dict[bool, ThreadPoolExecutor] = {}
_POOL_LOCK = threading.Lock()


def submit(job: Callable[..., Any], *args: Any, inputs: bool = False) -> Future:
    """Run ``job(*args)`` on the outputs' hashing thread (with ``inputs``, on the inputs'). Each thread runs its jobs
    one at a time, in the order they were submitted, so a job must never wait for a later one of the same thread."""
    with _POOL_LOCK:
        if inputs not in _POOLS:
            name = "hubmerge-input-hash" if inputs else "hubmerge-hash"
            _POOLS[inputs] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        return _POOLS[inputs].submit(job, *args)


Key = tuple[int, int, int, int, int]


def file_key(st: os.stat_result) -> Key:
    """A file's identity for the hash cache. ctime is part of it because, unlike mtime, no one can set it back:
    ``cp -p``, ``rsync -t`` or ``touch -d`` over an existing file keep its mtime and size, not its ctime."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


_TICK_NS = 20 * 10**6  # longer than a tick of the clock the kernel stamps file changes with (1-10 ms)
_WAIT_BYTES = 32 * 2**20  # files worth waiting _TICK_NS for: hashing them takes longer than that


def _unsettled_ns(st: os.stat_result) -> int:
    """How long until the file's last change lies a clock tick in the past (0: it does). Until then a change could
    land in the same tick and leave its identity alone. Filesystems with whole-second times need two seconds."""
    coarse = st.st_mtime_ns % 10**9 == 0 and st.st_ctime_ns % 10**9 == 0
    return max(0, max(st.st_mtime_ns, st.st_ctime_ns) + (2 * 10**9 if coarse else _TICK_NS) - time.time_ns())


class HashCache:
    """SHA256 by file identity, persisted in a small JSON file (``{"sha256": {key: [digest, last used]}}``).

    Bounded: at most ``max_entries`` (the most recently used are kept), and a file bigger than ``max_bytes`` is not
    read. An unreadable, corrupt or foreign file counts as empty; failing to save is ignored: the cache only saves
    work. Writes go to a temporary file renamed over the old one, merged with what other processes saved meanwhile.
    """

    VERSION = 1

    def __init__(self, path: Path | None, max_entries: int = 4096):
        self.path = path
        self.max_entries = max_entries
        self.max_bytes = 256 * max_entries  # an entry takes 140-200 bytes
        self._entries: dict[str, list] | None = None
        self._clock = 0
        self._lock = threading.Lock()

    @staticmethod
    def _name(key: Key) -> str:
        return ":".join(map(str, key))

    def _read(self) -> dict[str, list]:
        if self.path is None:
            return {}
        try:
            if self.path.stat().st_size > self.max_bytes:
                return {}
            doc = json.loads(self.path.read_bytes())
        except (OSError, ValueError):
            return {}
        table = doc.get("sha256") if isinstance(doc, dict) and doc.get("version") == self.VERSION else None
        if not isinstance(table, dict):
            return {}
        good = {}
        for name, value in table.items():
            if (
                isinstance(value, list)
                and len(value) == 2
                and isinstance(value[0], str)
                and len(value[0]) == 64
                and all(c in "0123456789abcdef" for c in value[0])
                and isinstance(value[1], int)
            ):
                good[name] = value
        return good

    def _table(self) -> dict[str, list]:
        if self._entries is None:
            self._entries = self._read()
        return self._entries

    def _now(self) -> int:
        """Last-use stamp: nanoseconds, and strictly increasing within a process, so that the newest entries win."""
        self._clock = max(time.time_ns(), self._clock + 1)
        return self._clock

    def get(self, key: Key) -> str | None:
        """The SHA256 recorded for a file with identity ``key``, or None."""
        with self._lock:
            entry = self._table().get(self._name(key))
            if entry is None:
                return None
            entry[1] = self._now()
            return entry[0]

    def put(self, key: Key, digest: str) -> None:
        """Record ``digest`` for identity ``key`` and save the cache."""
        with self._lock:
            self._table()[self._name(key)] = [digest, self._now()]
            if self.path is None:
                return
            merged = {**self._read(), **self._table()}
            keep = sorted(merged.items(), key=lambda kv: kv[1][1], reverse=True)[: self.max_entries]
            self._entries = dict(keep)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_text(json.dumps({"version": self.VERSION, "sha256": self._entries}, separators=(",", ":")))
                os.replace(tmp, self.path)
            except OSError:
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)


def default_cache_path() -> Path | None:
    """Where the hash cache lives: ``$HUBMERGE_HASH_CACHE`` (empty or ``off``: no cache), else
    ``hubmerge/file-hashes.json`` in the Hugging Face home (``$HF_HOME``, default ``~/.cache/huggingface``)."""
    chosen = os.environ.get("HUBMERGE_HASH_CACHE")
    if chosen is not None:
        return Path(chosen).expanduser() if chosen not in ("", "off") else None
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hubmerge" / "file-hashes.json"


_CACHE: HashCache | None = None


def cache() -> HashCache:
    """The process's hash cache (opened on first use, at :func:`default_cache_path`)."""
    global _CACHE
    if _CACHE is None or _CACHE.path != default_cache_path():
        _CACHE = HashCache(default_cache_path())
    return _CACHE


def remember(st: os.stat_result, digest: str) -> None:
    """Record the SHA256 of a file its writer hashed while writing it (``st``: its status after the last write)."""
    cache().put(file_key(st), digest)


# SHA256 jobs started by prehash(), by file identity, so that file_digest() waits for them instead of hashing again.
_EARLY: dict[Key, Future] = {}
PREHASH_SUFFIXES = (".safetensors", ".bin", ".pth")
_READAHEAD_BYTES = [4 * 2**30]  # what prehash may still ask the kernel to read ahead, for files it need not hash


def prehash(folders: Iterable[str | Path]) -> None:
    """Start hashing (SHA256, on the inputs' hashing thread) the weight files of whichever of ``folders`` exist
    locally.

    The CLI calls this before importing torch: the import keeps one core busy for seconds, during which the other
    reads and hashes the inputs the recipe must record, leaving them in the page cache for the merge. Files the hash
    cache knows are not read: the kernel is asked to read them ahead instead (up to 4 GB in all).
    """
    for folder in folders:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix in PREHASH_SUFFIXES and path.is_file():
                key = file_key(path.stat())
                if key not in _EARLY:
                    _EARLY[key] = submit(_sha256, path, None, True, inputs=True)


def _sha256(path: Path, progress: Callable[[int], object] | None = None, read_ahead: bool = False) -> str:
    st = os.stat(path)
    digest = cache().get(file_key(st))
    if digest is None:
        return file_digests(path, ("sha256",), progress)["sha256"]
    if progress is not None:
        progress(st.st_size)
    if read_ahead and _READAHEAD_BYTES[0] > 0 and hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, min(st.st_size, _READAHEAD_BYTES[0]), os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
        _READAHEAD_BYTES[0] -= st.st_size
    return digest


def file_digest(
    path: Path, algorithm: str = "sha256", progress: Callable[[int], object] | None = None, *, fresh: bool = False
) -> str:
    """Hex digest of a file (``sha256``, ``md5``, ...); ``progress`` is called with the bytes read so far.

    A SHA256 comes from the hash cache when the file is unchanged since it was hashed (``fresh``: read it anyway,
    as a verification that must see the bytes on disk does).
    """
    if algorithm != "sha256" or fresh:
        return file_digests(path, (algorithm,), progress)[algorithm]
    early = _EARLY.get(file_key(os.stat(path))) if _EARLY else None
    if early is None:
        return _sha256(path, progress)
    digest = early.result()
    if progress is not None:
        progress(os.stat(path).st_size)
    return digest


def file_digests(
    path: Path, algorithms: Iterable[str], progress: Callable[[int], object] | None = None
) -> dict[str, str]:
    """Several hex digests of a file from a single read (e.g. a checklist's md5 and the known-table's sha256).
    A SHA256 is recorded in the hash cache when the file did not change while it was read, nor in the clock tick
    reading began (a big file changed that recently, as a fresh download, is given that tick to pass first)."""
    hashes = {a: hashlib.new(a) for a in algorithms}
    before = os.stat(path)
    wait = _unsettled_ns(before) if "sha256" in hashes else 0
    if 0 < wait <= _TICK_NS and before.st_size >= _WAIT_BYTES:  # just written (a download): let its tick pass
        time.sleep(wait / 1e9)
        before = os.stat(path)
    settled = _unsettled_ns(before) == 0  # so a change from now on will show in its identity
    _read_into(path, hashes.values(), progress)
    digests = {a: h.hexdigest() for a, h in hashes.items()}
    if "sha256" in digests and settled and file_key(os.stat(path)) == file_key(before):
        cache().put(file_key(before), digests["sha256"])
    return digests


def git_blob_sha1(path: Path) -> str:
    """The git blob id of a file (what the Hub records for files not stored in LFS)."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    _read_into(path, (h,))
    return h.hexdigest()
