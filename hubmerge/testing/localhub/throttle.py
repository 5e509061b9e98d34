"""A network link for the local Hub: N bytes/s in each direction, shared by every transfer at once.

Each direction is a :class:`Link`: a transfer reserves the next free slot of the link for each chunk it moves and
waits until that slot has passed, so concurrent transfers share the rate (round robin by chunk) and the sum never
exceeds it. Used by the benchmark to put the Hub behind something shaped like a real connection.
"""

from __future__ import annotations

import threading
import time
from typing import Any

CHUNK = 256 * 1024  # bytes moved per reservation: small enough that concurrent transfers interleave finely
BUFFER_S = 0.01  # seconds of the link's capacity a momentarily late sender can still use (see Link.take)


class Link:
    """One direction of a link of ``rate`` bytes per second."""

    def __init__(self, rate: int) -> None:
        if rate <= 0:
            raise ValueError("bandwidth must be a positive number of bytes per second")
        self.rate = rate
        self._lock = threading.Lock()
        self._free_at = 0.0  # monotonic time at which the link is next idle

    def take(self, nbytes: int) -> None:
        """Wait until ``nbytes`` have had their turn on the link."""
        with self._lock:
            now = time.monotonic()
            # A link's buffer keeps it busy while a sender prepares its next chunk: time up to BUFFER_S ago that
            # went unused still counts, so one transfer alone gets the whole rate, as over a real link.
            self._free_at = max(now - BUFFER_S, self._free_at) + nbytes / self.rate
            done = self._free_at
        delay = done - time.monotonic()
        if delay > 0:
            time.sleep(delay)


class ThrottledReader:
    """The request stream of a connection, read through a :class:`Link` (client -> server: uploads)."""

    def __init__(self, raw: Any, link: Link) -> None:
        self._raw, self._link = raw, link

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            parts = []
            while chunk := self.read(CHUNK):
                parts.append(chunk)
            return b"".join(parts)
        data = self._raw.read(min(n, CHUNK))
        self._link.take(len(data))
        return data

    def readline(self, limit: int = -1) -> bytes:
        line = self._raw.readline(limit)
        self._link.take(len(line))
        return line

    def __getattr__(self, name: str) -> Any:  # close, fileno...: the wrapped stream's
        return getattr(self._raw, name)


class ThrottledWriter:
    """The response stream of a connection, written through a :class:`Link` (server -> client: downloads)."""

    def __init__(self, raw: Any, link: Link) -> None:
        self._raw, self._link = raw, link

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), CHUNK):
            piece = view[start : start + CHUNK]
            self._link.take(len(piece))
            self._raw.write(piece)
        return len(view)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)
