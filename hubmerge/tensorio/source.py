"""What a readable tensor is (:class:`TensorSource`), its file-backed form (:class:`TensorRef`), and the shared
machinery of the streaming writers."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from ..directio import ALIGN, pread_direct
from ..errors import CorruptFileError, InputError
from .output import OutputFile


@runtime_checkable
class TensorSource(Protocol):
    """Anything that can hand out blocks of rows of one tensor (dim 0), e.g. a :class:`TensorRef` or a tensor
    joined from model-parallel slices. ``label`` names where it comes from, for error messages."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def label(self) -> str: ...

    def read(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Return rows ``[start, stop)`` (all rows by default) as a new CPU tensor of ``self.dtype``."""
        ...

    def read_into(self, buffer: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Like :meth:`read`, into ``buffer`` (1-D uint8 with room for the rows, and ``2 * ALIGN`` bytes more when
        it is an :func:`aligned_buffer`); returns the typed view of ``buffer`` holding them (at its front unless a
        direct read put them where the disk's alignment falls), so a caller reading block after block reuses one
        buffer."""
        ...

    def prefetch(self) -> None:
        """Ask the kernel to start reading the tensor's bytes, so a later read finds them in the page cache."""
        ...


def read_rows_into(source: TensorSource, buffer: torch.Tensor, start: int, stop: int | None) -> torch.Tensor:
    """:meth:`TensorSource.read_into` for sources that can only :meth:`~TensorSource.read`: copy into ``buffer``."""
    block = source.read(start, stop)
    data = buffer[: block.numel() * block.element_size()]
    data.view(block.dtype).copy_(block.reshape(-1))
    return data.view(block.dtype).reshape(block.shape)


def row_count(shape: Sequence[int]) -> int:
    """Rows along dim 0; a 0-d tensor counts as one row."""
    return shape[0] if shape else 1


@dataclass(frozen=True)
class TensorRef:
    """A tensor stored in a file: ``nbytes`` bytes at absolute ``offset``, row-major unless ``stride`` says otherwise."""

    path: Path
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...] | None = None  # only set for non-contiguous tensors (rare in pickles)
    span: int = 0  # elements of storage covered from ``offset`` (non-contiguous only)
    direct: bool = False  # read with O_DIRECT: a file written that way and read once (a downloaded shard)

    @property
    def label(self) -> str:
        return self.path.name

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def read(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        rows = row_count(self.shape)
        stop = rows if stop is None else stop
        if self.stride is not None:
            # A strided view: read its storage span once and let torch do the indexing.
            flat = _pread_tensor(self.path, self.offset, self.span, self.dtype)
            return flat.as_strided(self.shape, self.stride)[start:stop].clone()
        return self.read_into(aligned_buffer((stop - start) * self.row_bytes), start, stop)

    @property
    def row_bytes(self) -> int:
        rows = row_count(self.shape)
        return self.nbytes // rows if rows else 0

    def prefetch(self) -> None:
        """Ask the kernel to start reading this tensor's bytes into the page cache (asynchronously), so that a later
        :meth:`read` finds them there instead of waiting for the disk."""
        if self.direct or not hasattr(os, "posix_fadvise"):  # a direct read bypasses the page cache
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return  # read() reports it
        try:
            os.posix_fadvise(
                fd, self.offset, self.span * self.dtype.itemsize if self.stride else self.nbytes, os.POSIX_FADV_WILLNEED
            )
        finally:
            os.close(fd)

    def read_into(self, buffer: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Like :meth:`read`, but into ``buffer`` (a 1-D uint8 tensor with room for the rows), so a caller reading
        block after block reuses one buffer instead of faulting in fresh memory each time. Returns the typed view
        of ``buffer`` holding the rows: at its front, or, for a :attr:`direct` file read into an
        :func:`aligned_buffer`, where the disk's alignment puts them."""
        if self.stride is not None:
            return read_rows_into(self, buffer, start, stop)
        stop = row_count(self.shape) if stop is None else stop
        nbytes, offset = (stop - start) * self.row_bytes, self.offset + start * self.row_bytes
        at = None
        if self.direct and nbytes and offset % self.dtype.itemsize == 0 and buffer.data_ptr() % ALIGN == 0:
            try:
                at = pread_direct(self.path, offset, nbytes, buffer.numpy().data)
            except OSError as exc:
                raise _unreadable(self.path, exc) from None
            except EOFError as exc:
                raise _truncated(self.path, nbytes, offset, max(0, exc.args[0])) from None
        if at is None:
            at = 0
            _pread_into(self.path, offset, buffer[:nbytes])
        data = buffer[at : at + nbytes]
        return data.view(self.dtype).reshape((stop - start, *self.shape[1:]) if self.shape else ())


def aligned_buffer(nbytes: int) -> torch.Tensor:
    """A page-aligned uint8 buffer for ``nbytes`` with ``ALIGN`` to spare at each end: room for the aligned stretch
    a :attr:`TensorRef.direct` read covers, so :meth:`TensorRef.read_into` can read straight into it."""
    raw = torch.empty(nbytes + 3 * ALIGN, dtype=torch.uint8)
    pad = -raw.data_ptr() % ALIGN
    return raw[pad : pad + nbytes + 2 * ALIGN]


def _unreadable(path: Path, exc: OSError) -> InputError:
    return InputError(f"{path}: cannot read ({exc.strerror}); check the file exists and is readable")


def _truncated(path: Path, nbytes: int, offset: int, got: int) -> CorruptFileError:
    return CorruptFileError(
        f"{path}: file is truncated (needed {nbytes} bytes at offset {offset}, got {got}); download it again"
    )


def _pread_tensor(path: Path, offset: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Read ``numel`` elements at ``offset`` straight into a fresh tensor's memory (one copy, no mmap)."""
    out = torch.empty(numel * dtype.itemsize, dtype=torch.uint8)
    _pread_into(path, offset, out)
    return out.view(dtype)


def _pread_into(path: Path, offset: int, out: torch.Tensor) -> None:
    """Fill the uint8 tensor ``out`` with the bytes of ``path`` at ``offset`` (positioned reads, no mmap)."""
    nbytes = out.numel()
    view = out.numpy().data
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise _unreadable(path, exc) from None
    try:
        done = 0
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise _truncated(path, nbytes, offset, done)
            done += got
    finally:
        os.close(fd)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, without a copy when it is already contiguous."""
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data


@dataclass(frozen=True)
class Entry:
    """One tensor a writer will receive: its name, dtype and shape, declared before any byte is written."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class StreamingTensorWriter:
    """Shared logic of the file writers: tensors arrive as row blocks in the declared order; the writer checks that
    every declared byte arrives exactly once, and subclasses only move bytes, into ``_file`` (opened by them)."""

    _file: OutputFile

    def __init__(self, path: Path, entries: Sequence[Entry]):
        self.path = Path(path)
        self.entries = list(entries)
        self._index = 0
        self._written = 0  # bytes of the current entry

    def write(self, block: torch.Tensor) -> None:
        """Append a block of rows of the current tensor (the next declared one once the previous is complete)."""
        if block.numel() == 0:
            return
        while self._index < len(self.entries) and self.entries[self._index].nbytes == 0 and self._written == 0:
            self._begin(self._index)
            self._finish(self._index)
            self._index += 1
        if self._index >= len(self.entries):
            raise ValueError(f"{self.path.name}: more data than declared")
        entry = self.entries[self._index]
        if block.dtype != entry.dtype:
            raise ValueError(f"{entry.name}: got {block.dtype}, declared {entry.dtype}")
        data = tensor_bytes(block)
        if self._written == 0:
            self._begin(self._index)
        if self._written + data.nbytes > entry.nbytes:
            raise ValueError(f"{entry.name}: more bytes than its shape {entry.shape} holds")
        self._put(data)
        self._written += data.nbytes
        if self._written == entry.nbytes:
            self._finish(self._index)
            self._index += 1
            self._written = 0

    @property
    def complete(self) -> bool:
        """Every declared byte has arrived: the file can be closed now, before the next file's first block."""
        return all(e.nbytes == 0 for e in self.entries[self._index :])

    def close(self) -> None:
        """Finish the file; raises ``ValueError`` when a declared tensor did not fully arrive."""
        while self._index < len(self.entries) and self.entries[self._index].nbytes == 0:
            self._begin(self._index)
            self._finish(self._index)
            self._index += 1
        if self._index != len(self.entries):
            raise ValueError(f"{self.path.name}: {self.entries[self._index].name} was not fully written")
        self._close(complete=True)

    def abort(self) -> None:
        """Close without completing; the caller removes the partial file."""
        self._close(complete=False)

    @property
    def sha256(self) -> str | None:
        """SHA256 of the closed file when it was hashed while being written, else None (hash the file)."""
        return self._file.digest()

    # Subclass hooks.
    def _begin(self, index: int) -> None:
        pass

    def _put(self, data: memoryview) -> None:
        raise NotImplementedError

    def _finish(self, index: int) -> None:
        pass

    def _close(self, complete: bool) -> None:
        """Close the file; a complete one is written out, fsynced and its SHA256 recorded first (it is moved into
        place next, so it must be on disk)."""
        if self._file.closed:
            return
        if complete:
            self._file.finish()
        else:
            self._file.close()
