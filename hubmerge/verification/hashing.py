"""Hashing files: SHA256 (and md5/sha1 for checklists, git blob ids for the Hub's small files), in one read loop.

SHA256 of local inputs can be started early (:func:`prehash`) and is then reused by :func:`file_digest`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

_CHUNK = 8 * 1024 * 1024


def _read_into(path: Path, hashers: Iterable[Any], progress: Callable[[int], object] | None = None) -> None:
    """Feed a file to every hasher in one pass of 8 MB reads, reporting bytes read to ``progress``."""
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            for h in hashers:
                h.update(chunk)
            if progress is not None:
                progress(len(chunk))


# SHA256 started early by prehash(), keyed by file identity so a file changed since is hashed afresh.
_EARLY: dict[tuple[str, int, int], Future] = {}
_EARLY_POOL: ThreadPoolExecutor | None = None
PREHASH_SUFFIXES = (".safetensors", ".bin", ".pth")


def _identity(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def prehash(folders: Iterable[str | Path]) -> None:
    """Start hashing (SHA256, one background thread) the weight files of whichever of ``folders`` exist locally.

    The CLI calls this before importing torch: the import keeps one core busy for seconds, during which the other
    reads and hashes the inputs the recipe must record (and leaves them in the page cache for the merge).
    """
    global _EARLY_POOL
    for folder in folders:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix in PREHASH_SUFFIXES and path.is_file():
                if _EARLY_POOL is None:
                    _EARLY_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hubmerge-prehash")
                _EARLY.setdefault(_identity(path), _EARLY_POOL.submit(file_digests, path, ("sha256",)))


def file_digest(path: Path, algorithm: str = "sha256", progress: Callable[[int], object] | None = None) -> str:
    """Hex digest of a file (``sha256``, ``md5``, ...); ``progress`` is called with the bytes read so far."""
    if algorithm == "sha256" and progress is None and _EARLY:
        early = _EARLY.get(_identity(path))
        if early is not None:
            return early.result()["sha256"]
    return file_digests(path, (algorithm,), progress)[algorithm]


def file_digests(
    path: Path, algorithms: Iterable[str], progress: Callable[[int], object] | None = None
) -> dict[str, str]:
    """Several hex digests of a file from a single read (e.g. a checklist's md5 and the known-table's sha256)."""
    hashes = {a: hashlib.new(a) for a in algorithms}
    _read_into(path, hashes.values(), progress)
    return {a: h.hexdigest() for a, h in hashes.items()}


def git_blob_sha1(path: Path) -> str:
    """The git blob id of a file (what the Hub records for files not stored in LFS)."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    _read_into(path, (h,))
    return h.hexdigest()
