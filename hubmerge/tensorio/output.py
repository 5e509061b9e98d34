"""An output file that is hashed while it is written and that reaches the disk without a detour through memory.

Hashing while writing saves reading every output back after the merge (a second pass over the largest files of the
run). Appending with O_DIRECT from an aligned buffer moves the bytes straight to the disk: buffered writes would copy
each byte into the page cache and leave the kernel's writeback to pace the run (several times slower than the disk
on a busy machine). Where the filesystem refuses O_DIRECT the file is written through the page cache, with writeback
started early so that the final fsync waits for the tail of the file, not all of it.

A file of :class:`HeldFiles` never reaches the disk at all: a streamed push uploads its shards from memory (each
byte would otherwise cross the disk twice, written and read back for the upload, on a disk that is the push's
bottleneck beside the CPU).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from ..directio import STAGE_BYTES, USE_DIRECT, DirectAppender, Positioned, StagePool
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

    ``held``: the bytes go into a :class:`HeldFile` of ``held`` under ``path`` instead, and no file is created.
    """

    def __init__(self, path: Path, *, direct: bool = False, held: HeldFiles | None = None):
        self.path = Path(path)
        self._held = held.create(self.path) if held is not None else None
        self._raw = io.FileIO(self.path, "w+") if self._held is None else None
        self._direct: DirectAppender | None = None
        if direct and USE_DIRECT and self._raw is not None:
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
            if self._held is not None:
                self._held.append(view)
            elif self._direct is not None:
                self._direct.append(view)
                if not self._direct.direct:
                    self._leave_direct()
            else:
                assert self._raw is not None  # a file that is not held has one
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
        if self._raw is None:
            raise io.UnsupportedOperation(f"{self.path.name} is held in memory: it has no file descriptor")
        return self._raw.fileno()

    @property
    def closed(self) -> bool:
        return self._raw.closed if self._raw is not None else self._held is None or self._held.closed

    def close(self) -> None:
        """Close the file. A direct file holds what :meth:`flush` (or :meth:`finish`) put in it: closing it without
        that abandons the bytes it still buffered (as an aborted writer does), and its SHA256 is then unknown. A held
        file closed before every job finished (an abort) gives its memory back."""
        if self.closed:
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
            if self._raw is not None:
                self._raw.close()
            elif self._held is not None:
                self._held.close(complete=self._digest is not None)

    def finish(self) -> None:
        """Complete the file: write out every byte, fsync, close, and record its SHA256 in the hash cache (a held
        file: close it, ready for :meth:`HeldFiles.take`)."""
        self.flush()
        if self._raw is None:
            self.close()
            return
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
            assert self._raw is not None  # only a file on disk is written with O_DIRECT
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
        if self._direct is not None or self._raw is None:
            return  # nothing of it is in the page cache
        if end - self._advised >= WRITEBACK_BYTES and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._raw.fileno(), self._advised, end - self._advised, os.POSIX_FADV_DONTNEED)
            self._advised = end


class HeldFiles:
    """Output files held in memory instead of written to disk, each until its reader is closed: a streamed push
    writes its shards here and uploads them from here (:meth:`take`).

    The bytes live in buffers of ``STAGE_BYTES`` (a :class:`~hubmerge.directio.StagePool` of its own) that are
    reused as each file's reader closes. The caller bounds what is held at once: at most ``nbytes`` in ``files`` files
    (the pool keeps no more buffers than that takes; :attr:`budget` is the memory it comes to).
    """

    def __init__(self, nbytes: int, files: int) -> None:
        self.stage = STAGE_BYTES
        self.budget = self.memory(nbytes, files)
        self.held = 0  # bytes in the files not yet released
        self.live = 0  # files not yet released
        self._files: dict[Path, HeldFile] = {}
        self._stages = StagePool(self.budget // self.stage)
        self._lock = threading.Lock()

    @staticmethod
    def memory(nbytes: int, files: int) -> int:
        """The memory that holding ``nbytes`` in ``files`` files takes: each file's last buffer is partly empty."""
        return nbytes + files * STAGE_BYTES

    def create(self, path: Path) -> HeldFile:
        """A new empty file held under ``path`` (one held there before, never taken, is dropped)."""
        held = HeldFile(self)
        with self._lock:
            old = self._files.pop(path, None)
            self._files[path] = held
            self.live += 1
        if old is not None:
            old.release()
        return held

    def take(self, path: Path) -> HeldFile | None:
        """The complete file held under ``path``, now the caller's to read (and release by closing its reader); None
        when there is none."""
        with self._lock:
            held = self._files.get(path)
            if held is None or not held.complete:
                return None
            del self._files[path]
            return held

    def _buffer(self) -> mmap.mmap:
        return self._stages.take(self.stage)

    def _grew(self, nbytes: int) -> None:
        with self._lock:
            self.held += nbytes

    def _give_back(self, buffers: list[mmap.mmap], nbytes: int) -> None:
        with self._lock:
            self.held -= nbytes
            self.live -= 1
        for buffer in buffers:
            self._stages.give(buffer)


class HeldFile:
    """The bytes of one file of :class:`HeldFiles`, appended front to back, then read by :meth:`reader`."""

    def __init__(self, pool: HeldFiles) -> None:
        self._pool = pool
        self._buffers: list[mmap.mmap] = []
        self.size = 0
        self.closed = False
        self.complete = False
        self._released = False

    def append(self, view: memoryview) -> None:
        src, stage = np.frombuffer(view, dtype=np.uint8), self._pool.stage
        done = 0
        while done < len(src):
            at = self.size % stage
            if at == 0:
                self._buffers.append(self._pool._buffer())
            k = min(len(src) - done, stage - at)
            np.frombuffer(self._buffers[-1], dtype=np.uint8)[at : at + k] = src[done : done + k]  # copies off the GIL
            self.size += k
            done += k
        self._pool._grew(len(src))

    def close(self, *, complete: bool) -> None:
        """No more bytes; an incomplete file (its writer aborted) gives its memory back at once."""
        self.closed, self.complete = True, complete
        if not complete:
            self.release()

    def reader(self, on_read: Callable[[int], object] | None = None) -> HeldReader:
        """A reader of the bytes; closing it gives their memory back."""
        return HeldReader(self, on_read)

    def release(self) -> None:
        """Give the memory back (once)."""
        if not self._released:
            self._released = True
            buffers, self._buffers = self._buffers, []
            self._pool._give_back(buffers, self.size)

    def view(self, start: int, size: int) -> memoryview:
        """``size`` bytes from ``start`` within one buffer (``start`` to the end of its buffer at most)."""
        stage = self._pool.stage
        k, at = divmod(start, stage)
        return memoryview(self._buffers[k])[at : at + min(size, stage - at, self.size - start)]


class HeldReader(Positioned, io.BufferedIOBase):
    """A :class:`HeldFile` read like the file it stands for (``read``, ``readinto``, ``seek``, ``tell``), as an
    upload reads it (and rewinds it to retry). ``on_read`` is told how many bytes each read returned. A read within
    one buffer returns a view of it, not a copy: valid until the reader is closed."""

    def __init__(self, held: HeldFile, on_read: Callable[[int], object] | None = None) -> None:
        super().__init__()
        self._held, self.on_read = held, on_read

    def _size(self) -> int:
        return self._held.size

    def read(self, size: int | None = -1) -> bytes | memoryview:  # type: ignore[override]
        if self.closed:  # its buffers may be another file's by now
            raise ValueError("read of a closed file")
        left = max(0, self._held.size - self._pos)
        size = left if size is None or size < 0 else min(size, left)
        first = self._held.view(self._pos, size) if size else memoryview(b"")
        if len(first) == size:  # the usual upload read, within one buffer
            self._pos += size
            if self.on_read is not None and size:
                self.on_read(size)
            return first
        out = bytearray(size)
        got = self.readinto(out)
        return bytes(out[:got])

    def read1(self, size: int = -1) -> bytes | memoryview:  # type: ignore[override]
        return self.read(size)

    def readinto(self, b) -> int:
        if self.closed:
            raise ValueError("read of a closed file")
        out = memoryview(b).cast("B")
        got = 0
        while got < len(out) and self._pos < self._held.size:
            piece = self._held.view(self._pos, len(out) - got)
            out[got : got + len(piece)] = piece
            got += len(piece)
            self._pos += len(piece)
        if self.on_read is not None and got:
            self.on_read(got)
        return got

    def close(self) -> None:
        if not self.closed:
            self._held.release()
        super().close()
