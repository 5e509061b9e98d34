"""An output file that is hashed while it is written and whose writeback to disk starts as it grows.

Hashing while writing saves reading every output back after the merge (a second pass over the largest files of the
run); starting writeback early lets the disk work while the merge computes, so the final fsync waits for the tail
of the file, not all of it.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

WRITEBACK_BYTES = 64 * 2**20  # start writing out final bytes every this many
_READBACK_CHUNK = 8 * 2**20
_PARALLEL_HASH_BYTES = 2**20
_HASHER: ThreadPoolExecutor | None = None


def _hasher() -> ThreadPoolExecutor:
    """The thread that hashes output files in order while the writing thread writes (both release the GIL)."""
    global _HASHER
    if _HASHER is None:
        _HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hubmerge-hash")
    return _HASHER


class OutputFile:
    """A new binary file written front to back (``write``, ``tell``, ``seek``, ``flush``, ``fileno``, ``close``:
    enough for ``zipfile``).

    SHA256: the bytes are hashed in file order on a hashing thread, while the writing thread goes on: each large
    write is hashed from the caller's buffer during the write syscall. A writer that patches bytes after writing
    them (a zip record's header gets its CRC once the record is complete) brackets them with :meth:`hold` /
    :meth:`release`; held bytes are read back (from the page cache) and hashed after release. Patching a byte that
    was already hashed, or failing to read one back, makes :meth:`digest` return None: callers then hash the file.

    Writeback: every ``WRITEBACK_BYTES`` of hashed (final) bytes, ``posix_fadvise(DONTNEED)`` asks the kernel to
    start writing them out (asynchronously) and to drop those of them already on disk from the page cache.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._raw = open(self.path, "w+b", buffering=0)
        self._pos = 0  # where the next write goes
        self._end = 0  # bytes in the file
        self._claimed = 0  # [0, _claimed) is final and handed to the hashing thread
        self._advised = 0  # [0, _advised) was handed to writeback (hashing thread only)
        self._held = False
        self._valid = True
        self._sha = hashlib.sha256()
        self._last: Future | None = None  # the latest hashing job (jobs run in order)
        self._digest: str | None = None

    # The file interface zipfile and the writers use.
    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = view.nbytes
        if self._pos < self._claimed:
            self._valid = False  # a final byte changed: the running hash no longer describes the file
        direct = self._valid and not self._held and self._pos == self._claimed
        if direct and n < _PARALLEL_HASH_BYTES:
            self._submit(self._hash_bytes, bytes(view), self._pos + n)  # a copy: no need to wait for it
            direct = False
            self._claimed += n
        elif direct:
            job = self._submit(self._hash_bytes, view, self._pos + n)
            self._claimed += n
        done = 0
        try:
            while done < n:
                done += self._raw.write(view[done:])
        finally:
            if direct:
                job.result()  # the caller may reuse ``data`` once write returns
        self._pos += n
        self._end = max(self._end, self._pos)
        return n

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._pos = self._raw.seek(offset, whence)
        return self._pos

    def seekable(self) -> bool:
        return True

    def flush(self) -> None:
        pass  # unbuffered

    def fileno(self) -> int:
        return self._raw.fileno()

    @property
    def closed(self) -> bool:
        return self._raw.closed

    def close(self) -> None:
        if self._raw.closed:
            return
        try:
            if not self._held:
                self._read_back()
            if self._last is not None:
                self._last.result()  # every job is done: the hash is complete
            if self._valid and not self._held:
                self._digest = self._sha.hexdigest()
        finally:
            self._raw.close()

    # Hashing.
    def hold(self) -> None:
        """Bytes written from now until :meth:`release` may still be patched: hash them after release."""
        self._held = True

    def release(self) -> None:
        """The held bytes are final: read them back and hash them (on the hashing thread)."""
        self._held = False
        self._read_back()

    def digest(self) -> str | None:
        """SHA256 (hex) of the closed file, or None when it is unknown (hash the file instead)."""
        return self._digest

    def _submit(self, job, *args) -> Future:
        self._last = _hasher().submit(self._guarded, job, *args)
        return self._last

    def _guarded(self, job, *args) -> None:
        try:
            if self._valid:
                job(*args)
        except BaseException:
            self._valid = False
            raise

    def _read_back(self) -> None:
        if self._valid and self._claimed < self._end:
            self._submit(self._hash_file, self._claimed, self._end)
            self._claimed = self._end

    def _hash_bytes(self, data, end: int) -> None:
        self._sha.update(data)  # releases the GIL for large buffers
        self._advise(end)

    def _hash_file(self, start: int, end: int) -> None:
        buf = bytearray(min(_READBACK_CHUNK, end - start))
        view = memoryview(buf)
        fd = self._raw.fileno()
        while start < end:
            got = os.preadv(fd, [view[: min(len(buf), end - start)]], start)
            if got <= 0:
                raise OSError(f"{self.path}: could not read back bytes at {start}")
            self._sha.update(view[:got])
            start += got
        self._advise(end)

    def _advise(self, hashed: int) -> None:
        if hashed - self._advised >= WRITEBACK_BYTES and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._raw.fileno(), self._advised, hashed - self._advised, os.POSIX_FADV_DONTNEED)
            self._advised = hashed
