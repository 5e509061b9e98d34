"""One big file from the Hub into the HF cache, hashed as it arrives and written straight to the disk.

``hf_hub_download`` writes through the page cache (on a virtual machine that copy costs more CPU than the network
itself: ~1.5 CPU-s per GB measured here) and verification then reads the file again to hash it. The streamed merge
downloads its base shards with :func:`download_verified` instead: the bytes are hashed on a thread while they are
appended with O_DIRECT on another (page cache where the filesystem refuses it), so a shard is verified the moment
its last byte lands, with no second read. A cut connection resumes where it stopped, as the client's does.

The result is the cache entry ``hf_hub_download`` makes: ``blobs/<sha256>`` (downloaded to a process-unique
``.incomplete`` file under the client's own lock, then renamed) and the relative link ``snapshots/<commit>/<name>``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpcore2
import httpx2

from ..directio import DirectAppender, Positioned, release_stage, stage_buffer
from ..errors import CorruptFileError, VerificationError
from ..progress import Progress
from ..verification.hashing import remember
from .hub import Hub, hub_errors
from .sources import Source, mismatch, repo_cache

# The client reads a response at most 64 KiB at a time, each read a trip through httpx's and h11's Python: for a
# shard of several GB, ~1 CPU-s and the GIL taken from the merge tens of thousands of times. A socket read returns
# what has arrived, so a larger bound changes nothing for small answers (at 400 MB/s: 0.85 CPU-s less, measured).
READ_BYTES = 1 << 20
httpcore2.HTTP11Connection.READ_NUM_BYTES = max(httpcore2.HTTP11Connection.READ_NUM_BYTES, READ_BYTES)
_MAX_ATTEMPTS = 20  # a bound of its own; the guard's retry budget (HUBMERGE_HUB_RETRIES) ends it well before


def download_verified(source: Source, name: str, hub: Hub, progress: Progress) -> Path:
    """Download the LFS file ``name`` of the Hub ``source`` into the cache and check its size and SHA256 against the
    Hub's record as it arrives, and against the known-hash table (a mismatch is downloaded once more before it is
    an error); returns the snapshot path. The SHA256 goes into ``source.hashes`` and the hash cache.

    Raises:
        HubAccessError, OutputError (the disk filled), VerificationError.
    """
    record = source.remote[name]
    if not record.sha256 or source.repo_id is None or source.commit is None or source.path is None:
        raise ValueError(f"{name}: not an LFS file of a fetched Hub source")  # a bug in the caller
    from huggingface_hub.utils import WeakFileLock

    cache = repo_cache(hub, source.repo_id)
    blob, link = cache / "blobs" / record.sha256, source.path / name
    lock = hub.cache_root / ".locks" / cache.name / f"{record.sha256}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    blob.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):
        # A blob already there (another run's, or the CLI's head start) is verified like any download (the hash
        # cache answers for one hashed before); a damaged one is downloaded again over it, as force_download does.
        problem = mismatch(source, name, blob, progress) if blob.exists() else "missing"
        for _ in range(2):  # a mismatch is downloaded once more before it is an error
            if problem is None:
                break
            problem = _fetch(source, name, hub, progress, blob)
        if problem is not None:
            raise VerificationError(
                f"{source.label}/{name}: {problem} even after downloading it again; the copy on the Hub is "
                "damaged or altered: report it to the repository owner",
                repo_id=source.repo_id,
            )
        link.parent.mkdir(parents=True, exist_ok=True)
        if not (link.exists() and link.resolve() == blob.resolve()):  # missing, or stale: this commit's file is blob
            fresh_link = link.with_name(f".{link.name}.{uuid.uuid4().hex[:8]}.link")
            fresh_link.symlink_to(os.path.relpath(blob, link.parent))
            os.replace(fresh_link, link)
    return link


def read_range(source: Source, name: str, hub: Hub, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of a Hub file (no more is read, even from a server that sends more).

    Raises:
        HubAccessError.
    """
    data = bytearray()
    with (
        hub_errors(hub, source.repo_id or "", revision=source.revision, filename=name),
        _hub_bytes(source, name, hub, start, end) as body,
    ):
        for piece in body:
            data += piece
            if len(data) >= end - start:
                break
    return bytes(data[: end - start])


class RemoteFile(Positioned, io.RawIOBase):
    """A Hub file read by range requests, for a parser that seeks about a file it only needs a little of (the zip
    directory and ``data.pkl`` of a torch checkpoint). Reads are widened to ``chunk`` bytes (near the end, to the
    file's last ``chunk`` bytes, where a zip keeps its directory) and every chunk is kept, so the parser's many small
    reads cost two or three requests; at most ``budget`` bytes are fetched in all (a damaged or hostile file cannot
    make it read gigabytes).

    Raises (from reads):
        HubAccessError; CorruptFileError past the budget.
    """

    def __init__(self, source: Source, name: str, hub: Hub, *, chunk: int = 64 * 1024, budget: int = 32 * 2**20):
        super().__init__()
        self.source, self.name, self.hub = source, name, hub
        self.size = source.remote[name].size
        self._chunk, self._left = chunk, budget
        self._chunks: list[tuple[int, bytes]] = []  # (file offset, bytes) of every range fetched
        self._pos = 0

    def _size(self) -> int:
        return self.size

    def readinto(self, b) -> int:
        out = memoryview(b).cast("B")
        want = min(len(out), self.size - self._pos)
        if want <= 0:
            return 0
        at, data = next(((a, d) for a, d in self._chunks if a <= self._pos < a + len(d)), (0, b""))
        if not data:
            at = max(0, self.size - self._chunk) if self._pos >= self.size - self._chunk else self._pos
            end = min(self.size, max(self._pos + want, at + self._chunk))
            if end - at > self._left:
                raise CorruptFileError(
                    f"{self.source.label}/{self.name}: its index would take more than {self._left} more bytes to "
                    "read; the file on the Hub is damaged: report it to the repository owner",
                    repo_id=self.source.repo_id,
                )
            data = read_range(self.source, self.name, self.hub, at, end)
            self._left -= len(data)
            self._chunks.append((at, data))
            if self._pos >= at + len(data):  # the server sent less than asked: the file ends there
                return 0
        start = self._pos - at
        n = min(want, len(data) - start)
        out[:n] = data[start : start + n]
        self._pos += n
        return n


@contextmanager
def _hub_bytes(
    source: Source, name: str, hub: Hub, start: int, end: int | None = None
) -> Iterator[Iterator[memoryview]]:
    """The bytes of the Hub file ``name`` from ``start`` (to ``end``, or to its end) as they arrive, from one GET with
    a Range header: a server that ignores Range sends the whole file, whose first ``start`` bytes are dropped here."""
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(source.repo_id or "", name, revision=source.commit, endpoint=hub.url)
    headers = build_hf_headers(token=hub.token)
    if start or end is not None:
        headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
    with get_session().stream(
        "GET", url, headers=headers, follow_redirects=True, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT
    ) as response:
        hf_raise_for_status(response)
        yield _skipped(response.iter_bytes(), start if response.status_code == 200 else 0)


def _skipped(chunks: Iterator[bytes], skip: int) -> Iterator[memoryview]:
    for chunk in chunks:
        piece = memoryview(chunk)[skip:]
        skip = max(0, skip - len(chunk))
        if piece:
            yield piece


def _fetch(source: Source, name: str, hub: Hub, progress: Progress, blob: Path) -> str | None:
    """Download into a temporary file beside ``blob`` and rename it to ``blob`` when it passes :func:`mismatch`
    (size, SHA256 as it arrived, the known-hash table); returns what differs, or None. The temporary file never
    outlives the call.

    The socket is read into one of two buffers while the other, once full, is hashed and written (each on a thread
    of its own): receiving never waits for the disk or the hash unless both buffers are still busy."""
    record = source.remote[name]
    tmp = blob.with_name(f"{blob.name}.{uuid.uuid4().hex[:8]}.incomplete")
    stages = [stage_buffer(), stage_buffer()]  # the receiving buffers
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    # Its own hashing and writing threads: the outputs' hashing thread is busy with the output shards the merge
    # writes meanwhile, and a download queued behind them would hold up both.
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hubmerge-download-write")
    hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hubmerge-download-hash")
    out = None
    try:
        sha, out = hashlib.sha256(), DirectAppender(fd)
        buffers = [memoryview(stage) for stage in stages]
        chunk = len(stages[0])  # bytes gathered from the socket before they are hashed and written in one go
        busy: list[list[Future]] = [[], []]
        current, filled, total = 0, 0, 0

        def hand_over(update) -> None:  # the current buffer is done: hash and write it, go on in the other one
            nonlocal current, filled, total
            data = buffers[current][:filled]
            busy[current] = [hasher.submit(sha.update, data), writer.submit(out.append, data)]
            total += filled
            update(filled)
            current, filled = 1 - current, 0
            for job in busy[current]:
                job.result()

        with (
            progress.task("download", name, record.size) as update,
            hub_errors(hub, source.repo_id or "", revision=source.revision, filename=name, expected=record.expected),
        ):
            for attempt in range(_MAX_ATTEMPTS):
                # A cut connection resumes where the bytes stopped (Range), as the client's own downloads do; the
                # guard counts the attempts and gives up, in one line, after the --retries budget.
                try:
                    with _hub_bytes(source, name, hub, total + filled) as body:
                        for piece in body:
                            while piece:
                                k = min(len(piece), chunk - filled)
                                buffers[current][filled : filled + k] = piece[:k]
                                filled, piece = filled + k, piece[k:]
                                if filled == chunk:
                                    hand_over(update)
                    break
                except httpx2.TransportError:
                    if attempt == _MAX_ATTEMPTS - 1:
                        raise
            hand_over(update)
        for job in busy[1 - current]:
            job.result()
        out.flush(total)
        problem = mismatch(source, name, tmp, progress, sha256=sha.hexdigest())
        if problem is None:
            os.replace(tmp, blob)
            remember(os.stat(blob), sha.hexdigest())
        return problem
    finally:
        for pool in (writer, hasher):
            pool.shutdown(wait=True, cancel_futures=True)
        for stage in stages:  # no job reads them any more
            release_stage(stage)
        if out is not None:
            with contextlib.suppress(OSError):  # no write may outlive the file descriptor
                out.close()
        os.close(fd)
        tmp.unlink(missing_ok=True)
