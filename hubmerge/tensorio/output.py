"""An output file that is hashed while it is written and that reaches the disk without a detour through memory.

Hashing while writing saves reading every output back after the merge (a second pass over the largest files of the
run). Appending with O_DIRECT from an aligned buffer moves the bytes straight to the disk: buffered writes would copy
each byte into the page cache and leave the kernel's writeback to pace the run (several times slower than the disk
on a busy machine). Where the filesystem refuses O_DIRECT the file is written through the page cache, with writeback
started early so that the final fsync waits for the tail of the file, not all of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from concurrent.futures import Future
from pathlib import Path

from ..directio import USE_DIRECT, DirectAppender
from ..verification.hashing import remember, submit

WRITEBACK_BYTES = 64 * 2**20  # start writing out final bytes every this many
_PARALLEL_HASH_BYTES = 2**20


class OutputFile:
    """A new binary file written front to back, never patched (``write``, ``tell``, ``flush``, ``fileno``,
    ``close``; a zip is written with data descriptors, see :class:`~hubmerge.tensorio.torchzip.TorchZipWriter`).

    SHA256: the bytes are hashed in file order on the outputs' hashing thread while the writer goes on: each large
    write is hashed from the caller's buffer while it is being written, a small one from a copy. A failed hashing job
    makes :meth:`digest` return None: callers then hash the file.

    ``direct``: append with O_DIRECT (see :class:`DirectAppender`); a filesystem that refuses it (at the start or
    halfway) gets the rest of the file through the page cache. Bytes written the one way or the other are the same.

    Writeback (page cache only): every ``WRITEBACK_BYTES`` of hashed bytes, ``posix_fadvise(DONTNEED)`` asks the
    kernel to start writing them out (asynchronously) and to drop those of them already on disk from the cache.
    """

    def __init__(self, path: Path, *, direct: bool = False):
        self.path = Path(path)
        self._raw = open(self.path, "w+b", buffering=0)
        self._direct: DirectAppender | None = None
        if direct and USE_DIRECT:
            appender = DirectAppender(self._raw.fileno())
            if appender.direct:
                self._direct = appender
            else:
                appender.close()
        self._end = 0  # bytes in the file (where the next write goes)
        self._advised = 0  # [0, _advised) was handed to writeback (hashing thread only)
        self._valid = True
        self._sha = hashlib.sha256()
        self._last: Future | None = None  # the latest hashing job (jobs run in order)
        self._digest: str | None = None

    @property
    def direct(self) -> bool:
        """Bytes are still being appended with O_DIRECT."""
        return self._direct is not None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = view.nbytes
        inline = n >= _PARALLEL_HASH_BYTES  # hashed from the caller's buffer, while it is written
        job = self._submit(self._hash_bytes, view if inline else bytes(view), self._end + n)
        try:
            if self._direct is not None:
                self._direct.append(view)
                if not self._direct.direct:
                    self._leave_direct()
            else:
                done = 0
                while done < n:
                    done += self._raw.write(view[done:])
        finally:
            if inline:
                job.result()  # the caller may reuse ``data`` once write returns
        self._end += n
        return n

    def tell(self) -> int:
        return self._end

    def flush(self) -> None:
        """Put every byte written so far into the file (only a direct file holds some back)."""
        if self._direct is not None:
            self._direct.flush(self._end)

    def fileno(self) -> int:
        return self._raw.fileno()

    @property
    def closed(self) -> bool:
        return self._raw.closed

    def close(self) -> None:
        """Close the file. A direct file holds what :meth:`flush` (or :meth:`finish`) put in it: closing it without
        that abandons the bytes it still buffered (as an aborted writer does), and its SHA256 is then unknown."""
        if self._raw.closed:
            return
        try:
            if self._direct is not None:
                self._valid = self._valid and self._direct.flushed
            if self._last is not None:
                self._last.result()  # every job is done: the hash is complete
            if self._valid:
                self._digest = self._sha.hexdigest()
        finally:
            if self._direct is not None:
                with contextlib.suppress(OSError):  # no write may outlive the file (an abort: its error is moot)
                    self._direct.close()
            self._direct = None
            self._raw.close()

    def finish(self) -> None:
        """Complete the file: write out every byte, fsync, close, and record its SHA256 in the hash cache."""
        self.flush()
        os.fsync(self.fileno())
        st = os.fstat(self.fileno())
        self.close()
        if self._digest is not None:
            remember(st, self._digest)

    def _leave_direct(self) -> None:
        """The filesystem refused a direct write: the rest goes through the page cache, after the staged bytes."""
        if self._direct is not None:
            end = self._direct.at + self._direct.staged
            self._direct.stop()
            self._direct.close()
            self._direct = None
            self._raw.seek(end)  # direct writes were positioned: the file's own offset never moved

    def digest(self) -> str | None:
        """SHA256 (hex) of the closed file, or None when it is unknown (hash the file instead)."""
        return self._digest

    def _submit(self, job, *args) -> Future:
        self._last = submit(self._guarded, job, *args)
        return self._last

    def _guarded(self, job, *args) -> None:
        try:
            if self._valid:
                job(*args)
        except BaseException:
            self._valid = False
            raise

    def _hash_bytes(self, data, end: int) -> None:
        self._sha.update(data)  # releases the GIL for large buffers
        if self._direct is not None:
            return  # nothing of it is in the page cache
        if end - self._advised >= WRITEBACK_BYTES and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._raw.fileno(), self._advised, end - self._advised, os.POSIX_FADV_DONTNEED)
            self._advised = end
