"""Files read and written with O_DIRECT, so their bytes never pass through the page cache.

On the machines hubmerge runs on (virtual machines, containers), filling the page cache is the costliest part of
moving a byte: measured here, ~1 CPU-s per GB written or read through it, against ~0.1 with O_DIRECT, which moves
the bytes between the disk and an aligned buffer directly. A file crossed once (a downloaded shard the merge reads,
an output shard the upload reads) gains nothing from being cached. Where the filesystem refuses O_DIRECT (tmpfs,
some network filesystems), both classes fall back to ordinary reads and writes, with the same bytes.
"""

from __future__ import annotations

import errno
import fcntl
import io
import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

ALIGN = 4096  # O_DIRECT wants offsets, lengths and addresses aligned to the disk's block (512 or 4096 bytes)
STAGE_BYTES = 16 * 2**20  # the aligned buffer of a direct file: big writes keep the disk's queue full
_REFUSED = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)  # what a filesystem without O_DIRECT answers
_DIRECT_FLAG = getattr(os, "O_DIRECT", 0)
USE_DIRECT = bool(_DIRECT_FLAG)  # False: every file goes through the page cache (tests force the fallback)


class StagePool:
    """Page-aligned buffers kept for reuse: fresh memory costs ~1 CPU-s per GB at its first touch here (page faults,
    zeroing), a reused buffer nothing. Up to ``spares`` buffers given back are kept; beyond them, a buffer is left to
    the garbage collector, which unmaps it once its last view is gone."""

    def __init__(self, spares: int) -> None:
        self.spares = spares
        self._spare: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self, size: int) -> mmap.mmap:
        """A buffer of ``size`` bytes, one given back when there is one."""
        with self._lock:
            while self._spare:
                buffer = self._spare.pop()
                if len(buffer) == size:  # (tests change the size)
                    return buffer
        return mmap.mmap(-1, size)

    def give(self, buffer: mmap.mmap) -> None:
        """Give back a buffer that nothing reads or writes any more."""
        with self._lock:
            if len(self._spare) < self.spares:
                self._spare.append(buffer)


# The stage buffers of direct files: as many spares as a streamed push has in use at once (128 MiB).
_STAGES = StagePool(8)


def stage_buffer() -> mmap.mmap:
    """A buffer of ``STAGE_BYTES`` from the direct files' pool (one a closed direct file gave back, if any)."""
    return _STAGES.take(STAGE_BYTES)


def release_stage(buffer: mmap.mmap) -> None:
    """Give back a :func:`stage_buffer` that nothing reads or writes any more."""
    _STAGES.give(buffer)


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for ``fd``; False when the filesystem refuses it."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | _DIRECT_FLAG if on else flags & ~_DIRECT_FLAG)
    except OSError as exc:
        if exc.errno not in _REFUSED:
            raise
        return False
    return True


class DirectAppender:
    """Appends to an open file with O_DIRECT through two page-aligned buffers of ``STAGE_BYTES``: bytes are copied
    into one while the other, full, is being written out on a writing thread (so copying overlaps the disk; one
    write in flight at a time); :meth:`flush` writes the partial buffer padded to ``ALIGN`` and cuts the file back to
    its real length. Where the filesystem refuses O_DIRECT (when opening or at a write), the bytes go through the
    page cache instead and :attr:`direct` is False (an owner that also seeks then stops using it). Call
    :meth:`close` before closing the file: a write may still be in flight, and the buffers go back for reuse."""

    def __init__(self, fd: int, at: int = 0):
        self.fd = fd
        self.direct = USE_DIRECT and _set_direct(fd, True)
        self._maps = [stage_buffer(), stage_buffer()]
        self._cur = 0  # the buffer being filled
        self._buf = np.frombuffer(self._maps[0], dtype=np.uint8)
        self._pending: Future[None] | None = None  # the write of the other buffer
        self.at = at  # file offset of the current buffer's first byte (a multiple of ALIGN)
        self.staged = 0  # bytes in the current buffer
        self._flushed = 0  # the file's length after the last flush: flushing again changes nothing

    def append(self, view: memoryview) -> None:
        src = np.frombuffer(view, dtype=np.uint8)
        done = 0
        while done < len(src):
            k = min(len(src) - done, STAGE_BYTES - self.staged)
            self._buf[self.staged : self.staged + k] = src[done : done + k]  # numpy copies without the GIL
            self.staged += k
            done += k
            if self.staged == STAGE_BYTES:
                self.wait()  # the other buffer's write is done: it can be refilled, and writes stay one at a time
                self._pending = _WRITERS.submit(self._write, self._maps[self._cur], STAGE_BYTES, STAGE_BYTES, self.at)
                self._cur = 1 - self._cur
                self._buf = np.frombuffer(self._maps[self._cur], dtype=np.uint8)
                self.at += STAGE_BYTES
                self.staged = 0

    def wait(self) -> None:
        """Wait for the write in flight (raising its error, if any)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def flush(self, end: int) -> None:
        """Put the buffered bytes in the file too (the file is then ``end`` bytes long); appending goes on."""
        self.wait()
        if self.staged and end != self._flushed:
            self._flushed = end
            padded = -(-self.staged // ALIGN) * ALIGN
            self._buf[self.staged : padded] = 0
            self._write(self._maps[self._cur], padded if self.direct else self.staged, self.staged, self.at)
            os.ftruncate(self.fd, end)

    def close(self) -> None:
        """Wait for the write in flight (raising its error, if any) and give the buffers back; nothing is appended
        after this."""
        pending = self._pending
        try:
            self.wait()
        finally:
            if pending is None or pending.done():  # no thread writes from them any more
                for buffer in self._maps:
                    release_stage(buffer)
            self._maps, self._buf = [], np.empty(0, dtype=np.uint8)

    @property
    def flushed(self) -> bool:
        """Every byte appended is in the file."""
        return self._pending is None and (self.staged == 0 or self._flushed == self.at + self.staged)

    def stop(self) -> None:
        """Write the buffered bytes through the page cache and leave O_DIRECT: the filesystem refused a direct write,
        and the rest of the file goes through the page cache."""
        self.wait()
        self._fall_back()
        self._write(self._maps[self._cur], self.staged, self.staged, self.at)
        self.staged = 0

    def _fall_back(self) -> None:
        if self.direct:
            self.direct = False
            _set_direct(self.fd, False)

    def _write(self, buffer: mmap.mmap, nbytes: int, real: int, at: int) -> None:
        """Write ``nbytes`` of ``buffer`` at ``at`` (``real`` of them are data, the rest padding)."""
        buf = memoryview(buffer)
        done = 0
        while done < nbytes:
            try:
                done += os.pwrite(self.fd, buf[done:nbytes], at + done)
            except OSError as exc:
                if not self.direct or exc.errno not in _REFUSED:
                    raise
                self._fall_back()  # refused (or a short direct write left the rest unaligned): use the page cache
                nbytes = min(nbytes, real)  # and no padding


def pread_direct(path: os.PathLike | str, offset: int, nbytes: int, buffer: memoryview) -> int | None:
    """Read the ``nbytes`` at ``offset`` of ``path`` with O_DIRECT into ``buffer`` (page-aligned, with room for the
    aligned stretch around them: ``nbytes + 2 * ALIGN``). Returns where in ``buffer`` they start, or None when the
    file cannot be read that way (no O_DIRECT, a refusing filesystem, a buffer too small): read them another way.
    Fewer bytes than asked (the file is shorter) raise ``EOFError``."""
    start = offset - offset % ALIGN
    length = -(-(offset + nbytes - start) // ALIGN) * ALIGN
    if not USE_DIRECT or len(buffer) < length:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | _DIRECT_FLAG)
    except OSError as exc:
        if exc.errno in _REFUSED:
            return None
        raise
    try:
        done = 0
        while done < length:
            try:
                got = os.preadv(fd, [buffer[done:length]], start + done)
            except OSError as exc:
                if exc.errno in _REFUSED and done == 0:
                    return None
                raise
            if got == 0:
                break
            done += got
            if done % ALIGN:  # a short read ends at the end of the file
                break
    finally:
        os.close(fd)
    if done < offset - start + nbytes:
        raise EOFError(done - (offset - start))
    return offset - start


# The writing threads of every DirectAppender (each has at most one write in flight).
_WRITERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="hubmerge-direct-write")


class Positioned:
    """The position keeping of a seekable reader that reads at ``_pos`` (``readable``, ``seekable``, ``tell``,
    ``seek``, never before the start); the reader says how long its file is (:meth:`_size`)."""

    _pos = 0

    def _size(self) -> int:
        raise NotImplementedError

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size()}[whence]
        self._pos = max(0, base + offset)
        return self._pos


class DirectReader(Positioned, io.BufferedIOBase):
    """A file read front to back (and rewound by retries) with O_DIRECT, ``STAGE_BYTES`` at a time into one aligned
    buffer: what an upload reads through (``read``, ``readinto``, ``seek``, ``tell``, ``fileno``). ``on_read`` is
    told how many bytes each read returned. Falls back to ordinary reads where the filesystem refuses O_DIRECT."""

    def __init__(self, raw: io.FileIO, on_read: Callable[[int], object] | None = None) -> None:
        super().__init__()
        self._raw, self.on_read = raw, on_read
        self._fd = raw.fileno()
        self._direct = USE_DIRECT and _set_direct(self._fd, True)
        self._map = stage_buffer()
        self._at = 0  # file offset of the buffer's first byte (a multiple of ALIGN)
        self._len = 0  # valid bytes in the buffer
        self._pos = 0

    def _size(self) -> int:
        return os.fstat(self._fd).st_size

    def fileno(self) -> int:
        return self._fd

    def read(self, size: int | None = -1) -> bytes:
        if self.closed:  # its buffer may be another file's by now
            raise ValueError("read of a closed file")
        if size is None or size < 0:
            size = max(0, self._size() - self._pos)
        start = self._pos - self._at
        if 0 <= start and start + size <= self._len:  # the usual upload read: one copy, out of the buffer
            self._pos += size
            if self.on_read is not None:
                self.on_read(size)
            return self._map[start : start + size]
        out = bytearray(size)
        view, got = memoryview(out), 0
        while got < size and (n := self.readinto(view[got:])):
            got += n
        del view
        del out[got:]
        return bytes(out)

    def read1(self, size: int = -1) -> bytes:
        return self.read(size)

    def readinto(self, b) -> int:
        if self.closed:
            raise ValueError("read of a closed file")
        out = memoryview(b).cast("B")
        if not self._at <= self._pos < self._at + self._len and not self._fill():
            return 0
        start = self._pos - self._at
        n = min(len(out), self._len - start)
        out[:n] = memoryview(self._map)[start : start + n]
        self._pos += n
        if self.on_read is not None:
            self.on_read(n)
        return n

    def _fill(self) -> bool:
        """Read the aligned stretch holding ``_pos`` into the buffer; False at the end of the file."""
        self._at = self._pos - self._pos % ALIGN
        try:
            self._len = os.preadv(self._fd, [self._map], self._at)
        except OSError as exc:
            if not self._direct or exc.errno not in _REFUSED:
                raise
            self._direct = False
            _set_direct(self._fd, False)
            self._len = os.preadv(self._fd, [self._map], self._at)
        return self._len > self._pos - self._at

    def close(self) -> None:
        if not self.closed:
            release_stage(self._map)
            self._raw.close()
        super().close()
