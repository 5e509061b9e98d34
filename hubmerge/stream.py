"""Merge-and-push as one stream: download, merge and upload overlap, and the disk holds a few shards at a time.

``hubmerge ADAPTER... --base org/base --push-to you/out`` runs here (:func:`merge_push`):

* the base's shards (safetensors, or torch ``.bin`` zips) are downloaded on a thread of their own, in the order the
  merge reads them and at most a couple ahead of it (:class:`ShardFeed`); their indexes are read from the Hub first
  by range requests (a safetensors header: one or two; a ``.bin``'s zip directory and ``data.pkl``: two or three) so
  the merge can be planned before any weight arrives. A shard's tensors are read only once the whole shard is
  downloaded, its SHA256 checked against the Hub's record and its tensors found to be the ones planned with.
  Shards this run downloaded are removed from the cache once merged when the disk cannot keep them (or with
  ``keep_downloads=False``); files that were in the cache before the run are never touched;
* each output shard is pre-uploaded (LFS) as soon as it is written (:class:`ShardUploader`) and, without ``--out``,
  deleted once the Hub has it; when the shards in flight fit in ``HOLD_BYTES`` they are held in memory instead and
  never touch the disk (a byte written and read back for its upload crosses the disk twice, and the disk is as much
  the stream's bottleneck as the CPU: 1.1 s of ~9.5 on the hub benchmark at 400 MB/s), up to ``HELD_IN_FLIGHT`` of
  them. One commit at the end adds every file with the model card, so the repo never shows half a model; a rerun
  after an interruption finds the shards already on the Hub (their LFS objects exist) and does not send them again.
  A repo this run created is deleted if the run fails before the commit (not when it is interrupted: its uploaded
  shards are what a rerun resumes from).

The output bytes are the ones a non-streaming run with the same ``max_shard_size`` writes: the same writers write
them; only where they go afterwards differs.
"""

from __future__ import annotations

import io
import math
import shutil
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, cast

import torch

from .constants import default_out_name
from .directio import DirectReader
from .errors import CorruptFileError, Interrupted, OutputError, VerificationError
from .headstart import fresh
from .inputs.download import RemoteFile, download_verified, read_range
from .inputs.hub import Hub, hub_errors
from .inputs.loading import open_inputs, resolve_inputs
from .inputs.sources import Source, fetch, fetch_file, not_cached, streamable_shards
from .merging import estimate_memory
from .output.staging import Written, check_output, partial_folder, write_outputs
from .plan import MergePlan, build_plan
from .progress import Progress
from .publish import PushTarget, check_push_target, push
from .resources import available_memory
from .result import MergeResult
from .sizes import format_size, parse_size
from .tensorio.output import HeldFiles, HeldReader
from .tensorio.safetensors import parse_header, read_safetensors
from .tensorio.source import TensorRef, TensorSource
from .tensorio.torchzip import read_torch_zip

# Output shards of a streamed push: about a sixteenth of the model, so the first upload starts early and the last
# one is a short tail, but never smaller than 128 MB (no flood of small files) nor larger than 2 GB (disk). Two
# are on disk at once (OUTPUT_IN_FLIGHT): for a 2.2 GB model in 450 MB base shards, 2 x 147 MB + 2 x 450 MB stays
# within 1.2 GB.
STREAM_SHARD_MIN, STREAM_SHARD_MAX, STREAM_SHARD_PARTS = 128 * 10**6, 2 * 10**9, 16
AHEAD = 1  # base shards downloaded beyond those the merge is reading
OUTPUT_IN_FLIGHT = 2  # output shards on disk at once: one uploading, one being written
# Output shards in flight up to this many bytes in all are held in memory, not written to disk (the default shards
# of models up to ~4 GB; 7B-sized ones go to disk).
HOLD_BYTES = 640 * 2**20
# Held in memory, up to this many are in flight: a backlog the uploads still send while the downloads slow the merge
# (with two, the link idled whenever a shard came late: a 2.2 GB push at 400 MB/s took 0.3-0.45 s longer).
HELD_IN_FLIGHT = 4
_HEADER_PROBE = 64 * 1024  # first range request of a remote header; LLaMA shard headers are a few tens of kB
_MAX_REMOTE_HEADER = 16 * 2**20
_MARGIN = 64 * 2**20  # small files (config, tokenizer, recipe) and filesystem slack


def stream_shard_size(nbytes: int) -> int:
    """The default output shard size of a streamed push for a model of ``nbytes``."""
    return min(STREAM_SHARD_MAX, max(STREAM_SHARD_MIN, nbytes // STREAM_SHARD_PARTS))


def output_in_flight(shard_limit: int, largest: int = 0, shards: int = OUTPUT_IN_FLIGHT) -> int:
    """The most output bytes a streamed push holds on disk or in memory with ``shards`` in flight (see
    :class:`ShardUploader`): the uploads the next shard may be written beside, and that shard (a tensor larger than
    ``shard_limit``, ``largest``, fills one alone)."""
    return (shards - 1) * shard_limit + max(shard_limit, largest)


def held_in_memory(shard_limit: int, largest: int, keep_output: bool, spare: int | None = None) -> int:
    """How many output shards in flight a streamed push holds in memory: ``HELD_IN_FLIGHT``, or fewer (down to two)
    so that they fit in ``HOLD_BYTES`` and in ``spare`` (the memory the machine has beyond the merge's own, when
    known); 0 when it keeps its output on disk or even two do not fit (then ``OUTPUT_IN_FLIGHT`` are on disk)."""

    def fits(n: int) -> bool:
        nbytes = output_in_flight(shard_limit, largest, n)
        return nbytes <= HOLD_BYTES and (spare is None or HeldFiles.memory(nbytes, n) <= spare)

    return 0 if keep_output else next((n for n in range(HELD_IN_FLIGHT, 1, -1) if fits(n)), 0)


# -- download ahead ---------------------------------------------------------------------------------------------------
@dataclass
class _Shard:
    name: str
    path: Path  # where the download lands (the cache snapshot)
    size: int
    fresh: bool  # not in the cache before this run: this run downloads it and may remove it
    refs: dict[str, TensorRef]  # planned from the Hub's copy of its index; the downloaded file's once verified
    ready: threading.Event
    error: BaseException | None = None
    first: int = -1  # plan positions of its first and last tensor the merge reads; -1: none
    last: int = -1
    released: bool = False


class _Arriving:
    """A base tensor whose shard is still arriving: reading it waits until the shard is downloaded and verified."""

    def __init__(self, feed: ShardFeed, shard: _Shard, name: str) -> None:
        self._feed, self._shard, self._name = feed, shard, name

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shard.refs[self._name].shape

    @property
    def dtype(self) -> torch.dtype:
        return self._shard.refs[self._name].dtype

    @property
    def label(self) -> str:
        return self._shard.name

    def _ready(self) -> TensorRef:
        self._feed.reached(self)
        while not self._shard.ready.wait(0.2):  # a timed wait keeps Ctrl-C working
            pass
        if self._shard.error is not None:
            raise self._shard.error
        return self._shard.refs[self._name]

    def read(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self._ready().read(start, stop)

    def read_into(self, buffer: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self._ready().read_into(buffer, start, stop)

    def prefetch(self) -> None:
        if self._shard.ready.is_set() and self._shard.error is None:
            self._shard.refs[self._name].prefetch()


class ShardFeed:
    """The shards of a Hub base, downloaded on a thread in the order the merge reads them, a bounded
    number ahead of it, each verified before any of its tensors is read (see the module docstring).

    Use: :meth:`open` (indexes from the Hub; None for a local or Meta base), ``open_base(...,
    arriving=feed)``, :meth:`start` with the plan, then :meth:`close` once the merge is done (or failed).
    """

    def __init__(self, source: Source, hub: Hub, shards: list[_Shard], progress: Progress) -> None:
        self.source, self.hub, self.shards, self.progress = source, hub, shards, progress
        self._by_path = {s.path: s for s in shards}
        self._positions: dict[int, list[int]] = {}  # id(arriving tensor) -> its plan positions, ascending
        self._cursor = 0  # the plan position the merge is at
        self._cond = threading.Condition()
        self._live = 0  # shards downloading or downloaded and not yet merged
        self.window = AHEAD + 1
        self.remove = False
        self.removed = 0
        self._stop = False
        self._thread: threading.Thread | None = None

    @classmethod
    def open(cls, source: Source, hub: Hub, progress: Progress) -> ShardFeed | None:
        """Read the indexes of a Hub base's shards from the Hub (``source`` fetched without weights).

        Returns:
            the feed, or None for a local base or Meta ``.pth`` weights (downloaded whole, as before).
        Raises:
            HubAccessError; CorruptFileError, UnsafeFileError, InputError (an index hubmerge cannot read).
        """
        if source.repo_id is None or source.path is None:
            return None
        names = streamable_shards(source)
        if not names:
            return None
        shards = []
        for name in names:
            record = source.remote[name]
            path = source.path / name
            refs = _remote_refs(source, name, hub, path)
            shards.append(_Shard(name, path, record.size, fresh(source, name, hub), refs, threading.Event()))
            if record.sha256:  # what verification will confirm before any of its bytes is used
                source.hashes.setdefault(name, record.sha256)
        return cls(source, hub, shards, progress)

    # ArrivingWeights, for open_base
    def has(self, path: Path) -> bool:
        return path in self._by_path

    def read(self, path: Path) -> dict[str, TensorSource]:
        shard = self._by_path[path]
        return {name: _Arriving(self, shard, name) for name in shard.refs}

    @property
    def fresh_bytes(self) -> int:
        return sum(s.size for s in self.shards if s.fresh)

    def in_flight_bytes(self) -> int:
        """The most base bytes on disk at once when merged shards are removed: the ``window`` largest shards."""
        return sum(sorted((s.size for s in self.shards if s.fresh), reverse=True)[: self.window])

    def schedule(self, plan: MergePlan) -> None:
        """Learn the order the merge reads the shards in (``plan``) and size the window: the most shards the merge
        needs at once, plus those downloaded ahead."""
        self._positions.clear()
        for pos, t in enumerate(plan.tensors):
            if isinstance(t.source, _Arriving):
                self._positions.setdefault(id(t.source), []).append(pos)
                shard = t.source._shard
                shard.first = pos if shard.first < 0 else shard.first
                shard.last = pos
        used = [s for s in self.shards if s.first >= 0]
        overlap = max((sum(s.first <= p <= s.last for s in used) for p in range(len(plan.tensors))), default=1)
        self.window = max(overlap, 1) + AHEAD

    def start(self, remove: bool) -> None:
        """Start downloading; ``remove``: delete each shard this run downloaded once it is merged."""
        self.remove = remove
        order = sorted((s for s in self.shards if s.first >= 0), key=lambda s: s.first)
        self._thread = threading.Thread(target=self._run, args=(order,), name="hubmerge-download", daemon=True)
        self._thread.start()

    def _run(self, order: list[_Shard]) -> None:
        failure: BaseException | None = None
        for shard in order:
            with self._cond:
                while self._live >= self.window and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                self._live += 1
            try:
                if failure is not None:  # the merge stops at the first failed shard: none after it is fetched
                    raise failure
                self._fetch(shard)
            except BaseException as exc:  # handed to the merge, which raises it where it reads the shard
                failure = shard.error = exc
            finally:
                shard.ready.set()

    def _fetch(self, shard: _Shard) -> None:
        """Download ``shard`` (hashed as it arrives: verified when its last byte lands) or verify the cached copy,
        then check it holds the tensors planned with, and read them from it from now on."""
        downloaded = shard.fresh and bool(self.source.remote[shard.name].sha256)
        if downloaded:
            local = download_verified(self.source, shard.name, self.hub, self.progress)
        else:
            local = fetch_file(self.source, shard.name, self.hub, self.progress)
        refs = _read_weights(local)
        if downloaded:  # written with O_DIRECT and read once: the merge reads it the same way, past the page cache
            refs = {name: replace(ref, direct=True) for name, ref in refs.items()}
        if _layout(refs) != _layout(shard.refs):
            raise VerificationError(
                f"{self.source.label}/{shard.name}: its tensors differ from those of the index the Hub served "
                "before the download; the repository changed or the Hub is inconsistent: run again",
                repo_id=self.source.repo_id,
            )
        shard.refs = refs

    def reached(self, tensor: _Arriving) -> None:
        """The merge starts reading ``tensor`` (on the merge thread): shards it is past are merged."""
        positions = self._positions.get(id(tensor), [])
        pos = next((p for p in positions if p >= self._cursor), None)
        if pos is None or pos <= self._cursor:
            return
        self._cursor = pos
        self._release(lambda s: s.last < pos)

    def _release(self, done: Callable[[_Shard], bool]) -> None:
        for shard in self.shards:
            if shard.released or shard.first < 0 or not done(shard):
                continue
            shard.released = True
            if self.remove and shard.fresh and shard.ready.is_set():
                _remove_download(shard.path)
                self.removed += 1
            with self._cond:
                self._live -= 1
                self._cond.notify_all()

    def close(self, *, merged: bool) -> None:
        """Stop downloading; with ``merged`` (the merge read everything) release every shard as merged."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if merged:
            if self._thread is not None:
                self._thread.join()
            self._release(lambda s: True)


def _read_weights(path: Path) -> dict[str, TensorRef]:
    return read_safetensors(path) if path.name.endswith(".safetensors") else read_torch_zip(path)


def _layout(refs: dict[str, TensorRef]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    return {name: (ref.dtype, ref.shape) for name, ref in refs.items()}


def _remote_refs(source: Source, name: str, hub: Hub, path: Path) -> dict[str, TensorRef]:
    """The tensors of the Hub file ``name`` (to land at ``path``), from its index alone, read by range requests."""
    if name.endswith(".safetensors"):
        return parse_header(path, _remote_header(source, name, hub), source.remote[name].size)
    return read_torch_zip(Path(f"{source.label}/{name}"), fileobj=io.BufferedReader(RemoteFile(source, name, hub)))


def _remote_header(source: Source, name: str, hub: Hub) -> bytes:
    """The JSON header of a safetensors file on the Hub, from range requests (bounded, never the whole file)."""
    size = source.remote[name].size
    first = read_range(source, name, hub, 0, min(size, _HEADER_PROBE))
    fix = "the file on the Hub is not a valid safetensors file: report it to the repository owner"
    if len(first) < 8:
        raise CorruptFileError(
            f"{source.label}/{name}: too short to be a safetensors file; {fix}", repo_id=source.repo_id
        )
    (hlen,) = struct.unpack("<Q", first[:8])
    if hlen > _MAX_REMOTE_HEADER or 8 + hlen > size:
        raise CorruptFileError(
            f"{source.label}/{name}: safetensors header length {hlen} does not fit; {fix}", repo_id=source.repo_id
        )
    if len(first) >= 8 + hlen:
        return first[8 : 8 + hlen]
    return first[8:] + read_range(source, name, hub, len(first), 8 + hlen)


def _remove_download(path: Path) -> None:
    """Remove a file this run downloaded into the HF cache: the snapshot link and the blob it points to."""
    blob = path.resolve()
    path.unlink(missing_ok=True)
    if blob != path:
        blob.unlink(missing_ok=True)


# -- upload as written ------------------------------------------------------------------------------------------------
class ShardUploader:
    """Uploads each finished output file (LFS pre-upload) on a thread of its own while the merge goes on.

    Called by the HF writer as each shard is complete (on the writer thread), it starts that shard's upload at once,
    beside the previous one's, then waits until the shards still uploading leave room for the next one (up to
    ``shard_limit``) within ``shards`` in flight: uploads share the link, so one's requests (upload modes, LFS batch,
    verify) overlap another's bytes and the link never idles between shards, yet the output never holds more than
    ``shards`` shards' worth of disk or memory (a shard larger than the limit, one tensor alone, is uploaded before
    the next one is written). With ``remove``, a shard's name is removed as its upload starts and its disk
    space is freed when the upload ends (the open file keeps it until then).
    :meth:`finish` returns the uploaded operations for the final commit.
    """

    def __init__(
        self,
        hub: Hub,
        repo_id: str,
        *,
        remove: bool,
        progress: Progress,
        shard_limit: int,
        shards: int = OUTPUT_IN_FLIGHT,
        held: HeldFiles | None = None,
    ) -> None:
        self.hub, self.repo_id, self.remove, self.progress, self.held = hub, repo_id, remove, progress, held
        # may still upload while the next one is written: in bytes, and in shards (small ones would fit more)
        self.room = output_in_flight(shard_limit, shards=shards) - shard_limit, shards - 1
        self.ops: dict[str, Any] = {}
        self.sent = 0  # bytes actually sent (shards already on the Hub are skipped by the client)
        self.skipped = 0  # shards the Hub already had
        self._pending: list[tuple[threading.Thread, int]] = []  # uploads running, oldest first, with their size
        self._failure: BaseException | None = None
        self._lock = threading.Lock()  # two upload threads count into the same totals

    def __call__(self, path: Path, digest: str) -> None:
        from huggingface_hub import CommitOperationAdd
        from huggingface_hub.lfs import UploadInfo

        self._wait(*self.room)  # raises a failed upload's error before starting another
        path = Path(path)
        # Opened here, on the writer's thread, while the name is certain: once the last shard is done, the staging
        # folder is moved into place (or removed) and the upload thread could no longer find it by name.
        body: DirectReader | HeldReader
        if (held := self.held.take(path) if self.held is not None else None) is not None:
            body, size = held.reader(), held.size  # its memory is given back when the upload closes it
        else:
            body, size = DirectReader(io.FileIO(path, "r")), path.stat().st_size
            if self.remove:  # the name goes now; the bytes, when the upload closes the file
                path.unlink()
        sample = bytes(body.read(512))
        body.seek(0)
        # Built empty, then given the body and the SHA256 the writer computed while writing: built from the body, it
        # would read and hash the whole shard again (the Hub checks the bytes against that SHA256 anyway).
        op = CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=b"")
        op.path_or_fileobj = cast(BinaryIO, body)  # an io.BufferedIOBase, as the client requires
        op.upload_info = UploadInfo(size=size, sample=sample, sha256=bytes.fromhex(digest))
        thread = threading.Thread(target=self._upload, args=(op, body, size), name="hubmerge-upload", daemon=True)
        thread.start()
        self._pending.append((thread, size))
        self._wait(*self.room)

    def _wait(self, room: int, files: int) -> None:
        """Wait until the uploads still running (the newest) hold at most ``room`` bytes in ``files`` shards; raise
        what an upload raised."""
        while self._pending and (sum(size for _, size in self._pending) > room or len(self._pending) > files):
            oldest, _ = self._pending.pop(0)
            while oldest.is_alive():  # a timed join keeps Ctrl-C working
                oldest.join(0.2)
        if self._failure is not None:
            raise self._failure

    def _upload(self, op: Any, body: DirectReader | HeldReader, size: int) -> None:
        try:
            sent = 0
            # the upload reads through ``body`` (progress; no page cache, or memory), not by the file's name
            with body as f, self.progress.task("upload", op.path_in_repo, size) as update:

                def count(n: int) -> None:
                    nonlocal sent
                    sent += n
                    update(n)

                f.on_read = count
                with hub_errors(self.hub, self.repo_id, action="write to"):
                    self.hub.api().preupload_lfs_files(self.repo_id, additions=[op], free_memory=True)
                if sent < size:  # the Hub had it (a rerun): done all the same
                    update(size - sent)
            with self._lock:
                self.skipped += sent < size
                self.ops[op.path_in_repo] = op
                self.sent += sent
        except BaseException as exc:  # raised on the writer thread at the next shard, or by finish()
            self._failure = exc

    def finish(self) -> dict[str, Any]:
        """Wait for the last upload; returns ``{name in repo: uploaded CommitOperationAdd}``.

        Raises:
            whatever an upload raised (HubAccessError...).
        """
        self._wait(0, 0)
        return self.ops


# -- the push target ---------------------------------------------------------------------------------------------------
class TargetRepo:
    """The repo a streamed push goes to, created (or taken) as :func:`~hubmerge.publish.check_push_target` found it,
    before anything is downloaded. :meth:`discard` deletes it if this run created it."""

    def __init__(self, hub: Hub, target: PushTarget) -> None:
        self.hub, self.repo_id = hub, target.repo_id
        with hub_errors(hub, target.repo_id, action="create or write to"):
            hub.api().create_repo(target.repo_id, private=target.private, exist_ok=not target.will_create)
        self.created = target.will_create

    def discard(self) -> None:
        """Delete the repo if this run created it (a failure before the commit: leave no empty repo behind)."""
        if self.created:
            try:
                self.hub.api().delete_repo(self.repo_id, missing_ok=True)
            except Exception:  # the original error matters more; the repo is private and empty
                pass


# -- disk ------------------------------------------------------------------------------------------------------------
@dataclass
class DiskPlan:
    """What a streamed push keeps on disk: the base shards this run downloads (``base_fresh`` in all, at most
    ``base_in_flight`` at once when merged ones are removed), the adapters to download, and the output on disk at
    once (``output``: two shards, none when they are ``held`` in memory, or the whole output with ``--out``)."""

    base_fresh: int
    base_in_flight: int
    adapters: int
    output: int
    keep: bool  # downloaded base shards stay in the cache
    reason: str  # why they stay or go
    held: int = 0  # output bytes in flight held in memory instead of on disk

    @property
    def peak(self) -> int:
        return (self.base_fresh if self.keep else self.base_in_flight) + self.adapters + self.output + _MARGIN

    def lines(self, shard_limit: int, base_from: str) -> list[str]:
        """What the plan (dry run, summary) says about the stream; ``base_from``: ``stream`` (shards from the
        Hub), ``whole`` (Meta weights from the Hub) or ``local``."""
        base = {
            "stream": f"base shards downloaded ahead of the merge and verified before use; "
            f"{format_size(self.base_fresh)} to download, "
            f"{'kept in the cache' if self.keep else 'each removed from the cache once merged'} ({self.reason})",
            "whole": "base downloaded whole before the merge (its weights are Meta .pth files)",
            "local": "base read from its local folder",
        }[base_from]
        return [
            f"stream: {base}",
            f"stream: output shards of up to {format_size(shard_limit)} uploaded as they are written"
            + (f", held in memory ({format_size(self.held)} at most)" if self.held else "")
            + f"; peak disk about {format_size(self.peak)}",
        ]


def disk_plan(
    feed_fresh: int,
    feed_in_flight: int,
    adapters: int,
    output: int,
    keep_downloads: bool,
    cache: Path,
    out: Path,
    held: int = 0,
) -> DiskPlan:
    """Decide whether downloaded base shards stay in the cache: when asked to and the disk holds them with the rest.

    Raises:
        OutputError: not even the shards in flight fit.
    """
    cache_free = shutil.disk_usage(_existing(cache)).free
    same_disk = _existing(cache).stat().st_dev == _existing(out).stat().st_dev
    rest = adapters + (output if same_disk else 0) + _MARGIN
    keep = keep_downloads and cache_free >= feed_fresh + rest
    reason = "--no-keep-downloads" if not keep_downloads else ("the disk holds them" if keep else "not enough room")
    plan = DiskPlan(feed_fresh, feed_in_flight, adapters, output, keep, reason, held)
    need = (feed_fresh if keep else feed_in_flight) + rest
    if cache_free < need:
        raise OutputError(
            f"{_existing(cache)}: {format_size(cache_free)} free but streaming the merge needs "
            f"{format_size(need)}; free some space or choose another --cache-dir",
            path=_existing(cache),
        )
    if not same_disk:
        out_free = shutil.disk_usage(_existing(out)).free
        if out_free < output + _MARGIN:
            raise OutputError(
                f"{_existing(out)}: {format_size(out_free)} free but the output needs {format_size(output + _MARGIN)}; "
                "free some space or choose another folder",
                path=_existing(out),
            )
    return plan


def _existing(path: Path) -> Path:
    return next(p for p in [path, *path.parents] if p.exists())


def preview_disk(
    base_src: Source,
    adapter_srcs: Sequence[Source],
    hub: Hub,
    out_nbytes: int,
    *,
    max_shard_size: str | int | None,
    keep_downloads: bool,
    out: Path,
    keep_output: bool,
) -> tuple[DiskPlan, int, list[str]]:
    """The dry run of a streamed push (sources fetched without weights): its disk plan (what it needs, whether
    downloaded base shards stay in the cache), the output shard size, and the plan's lines saying so."""
    shard_limit = parse_size(max_shard_size) if max_shard_size is not None else stream_shard_size(out_nbytes)
    names = streamable_shards(base_src) if base_src.repo_id else []
    sizes = sorted((base_src.remote[n].size for n in names if fresh(base_src, n, hub)), reverse=True)
    whole = 0 if names else sum(base_src.remote[n].size for n in not_cached(base_src, hub))
    adapters = sum(s.remote[n].size for s in adapter_srcs for n in not_cached(s, hub))
    held_shards = held_in_memory(shard_limit, 0, keep_output)
    in_flight = output_in_flight(shard_limit, shards=held_shards or OUTPUT_IN_FLIGHT)
    held = in_flight if held_shards else 0
    output = out_nbytes if keep_output else in_flight - held
    plan = disk_plan(
        sum(sizes) + whole, sum(sizes[: AHEAD + 1]) + whole, adapters, output, keep_downloads, hub.cache_root, out, held
    )
    return plan, shard_limit, plan.lines(shard_limit, _base_from(base_src, bool(names)))


# -- the whole run -----------------------------------------------------------------------------------------------------
def in_flight_folder(push_to: str, work_dir: str | Path | None) -> Path:
    """Where a push without ``out`` writes its shards in flight: ``<work_dir or .>/<org>--<name>.hubmerge-push``."""
    return (Path(work_dir or ".").expanduser() / f"{push_to.replace('/', '--')}.hubmerge-push").resolve()


def merge_push(
    adapters: Sequence[str | Path],
    base: str | Path,
    out: str | Path | None,
    *,
    push_to: str,
    hub: Hub,
    formats: Sequence[str],
    dtype: str | None,
    max_shard_size: str | int | None,
    pth_shards: int | None,
    overwrite: bool,
    public: bool,
    verify: bool,
    progress: Progress,
    block_bytes: int,
    keep_downloads: bool,
    work_dir: str | Path | None = None,
) -> MergeResult:
    """``hubmerge.merge(..., push_to=...)``: merge and publish as one stream (see the module docstring). Without
    ``out`` (and with only the HF format) nothing of the output stays on disk but the shards in flight, in a folder
    of ``work_dir`` (default: the current folder) removed after the commit; with ``out``, the output is kept.

    Returns:
        a :class:`~hubmerge.pipeline.MergeResult`.
    Raises:
        HubmergeError subclasses, as :func:`hubmerge.merge`; Interrupted on Ctrl-C (a rerun resumes).
    """
    started = time.monotonic()
    # whoami, the token's role for the namespace and the repo's state, before anything is resolved or downloaded
    checked = check_push_target(push_to, hub, overwrite=overwrite, private=not public).require()
    base_src, adapter_srcs = resolve_inputs(adapters, base, hub)
    keep_output = out is not None or list(formats) != ["hf"]
    if keep_output:
        out_dir = Path(out if out is not None else default_out_name(adapter_srcs[-1].name)).expanduser().resolve()
    else:  # only the files in flight and the small ones, removed after the commit
        out_dir = in_flight_folder(push_to, work_dir)
    inputs_paths = [s.path for s in (base_src, *adapter_srcs) if s.path] + [hub.cache_root]
    check_output(out_dir, inputs_paths, overwrite or not keep_output)
    target = TargetRepo(hub, checked)
    feed: ShardFeed | None = None
    uploader: ShardUploader | None = None
    try:
        fetch(base_src, hub, weights=False, progress=progress)
        feed = ShardFeed.open(base_src, hub, progress)
        inputs = open_inputs(base_src, adapter_srcs, hub, progress=progress, verify=verify, arriving=feed)
        plan = build_plan(inputs.base, inputs.adapters, dtype)
        shard_limit = parse_size(max_shard_size) if max_shard_size is not None else stream_shard_size(plan.nbytes)
        largest = max(plan.out_dtype(t).itemsize * math.prod(t.shape) for t in plan.tensors)
        available = available_memory()  # a machine short of memory writes its shards to disk instead
        spare = None if available is None else available - estimate_memory(plan, block_bytes)
        held_shards = held_in_memory(shard_limit, largest, keep_output, spare)
        shards = held_shards or OUTPUT_IN_FLIGHT
        in_flight = output_in_flight(shard_limit, largest, shards)
        held = HeldFiles(in_flight, shards) if held_shards else None
        output = plan.nbytes * len(formats) if keep_output else 0 if held else in_flight
        if feed is not None:
            feed.schedule(plan)
        disk = disk_plan(
            feed.fresh_bytes if feed else 0,
            feed.in_flight_bytes() if feed else 0,
            0,  # the adapters are downloaded already
            output,
            keep_downloads,
            hub.cache_root,
            out_dir.parent,
            in_flight if held else 0,
        )
        uploader = ShardUploader(
            hub, push_to, remove=not keep_output, progress=progress, shard_limit=shard_limit, shards=shards, held=held
        )
        if feed is not None:
            feed.start(remove=not disk.keep)
        written = write_outputs(
            plan,
            inputs,
            out_dir,
            formats,
            max_shard_size=shard_limit,
            pth_shards=pth_shards,
            progress=progress,
            block_bytes=block_bytes,
            disk_needed=output + _MARGIN,
            on_file_done=uploader,
            held=held,
        )
        if feed is not None:
            feed.close(merged=True)
        uploaded = uploader.finish()
        pushed = push(
            out_dir,
            push_to,
            private=not public,
            overwrite=overwrite,
            hub=hub,
            verify=False,
            progress=progress,
            uploaded=uploaded,
        )
    except BaseException as exc:
        if feed is not None:
            feed.close(merged=False)
        if not isinstance(exc, (KeyboardInterrupt, Interrupted)):
            target.discard()
            raise
        if keep_output and isinstance(exc, Interrupted):
            local = str(exc).removeprefix("interrupted: ") + "; "
        elif any(partial_folder(out_dir).glob("*.safetensors")):  # (shards held in memory are gone)
            local = f"{partial_folder(out_dir)} keeps the shards written but not yet uploaded; "
        else:
            local = ""
        raise Interrupted(
            f"interrupted: {local}nothing is committed to {push_to} yet; run the same command again to resume: "
            "the shards already uploaded are not sent again"
        ) from None
    finally:
        if not keep_output:
            shutil.rmtree(out_dir, ignore_errors=True)
    notes = disk.lines(shard_limit, _base_from(base_src, feed is not None))
    if feed is not None and feed.removed:
        notes.append(f"stream: removed {feed.removed} base shards this run downloaded from the cache once merged")
    notes.append(
        f"stream: uploaded {format_size(uploader.sent)} as the shards were written"
        + (f"; {uploader.skipped} shards were on the Hub already (not sent again)" if uploader.skipped else "")
    )
    folders = written.folders if keep_output else {}
    result = MergeResult.finish(
        out_dir, Written(folders, written.files, written.kept), plan, started, pushed, inputs.sources
    )
    result.notes = notes
    return result


def _base_from(base_src: Source, streamed: bool) -> str:
    return "local" if base_src.repo_id is None else ("stream" if streamed else "whole")
