"""A head start for a streamed push: the first base shard starts downloading while torch imports.

``import torch`` takes seconds before the first line of the merge runs; a streamed push spends them waiting for
nothing. The CLI calls :func:`head_start` first (this module and what it imports never import torch): it resolves a
Hub base, notes which of its shards the cache already holds (so that :mod:`hubmerge.stream` still knows which ones
this run downloads, see :func:`fresh`), and downloads the first shard on a background thread, verified as it
arrives (:func:`~hubmerge.inputs.download.download_verified`). The stream checks the cached file again (the hash
cache answers) before any of its tensors is read, as it does for every shard.

The CLI imports torch only once the download has begun (:attr:`HeadStart.begun`): the Hub calls before it are Python
that holds the GIL, as torch's import does, so run side by side each slowed the other and the link sat idle for
both (0.43 s to the first byte instead of ~0.2 s, profiled on the hub benchmark). The download itself hashes and
writes off the GIL, so the import then runs beside it at full speed.
"""

from __future__ import annotations

import atexit
import threading

from .errors import Interrupted
from .inputs.download import download_verified
from .inputs.hub import Hub
from .inputs.sources import Source, fetch, resolve, streamable_shards
from .progress import Progress, ProgressEvent
from .publish import check_push_target

# How long the CLI holds torch's import back for the first byte: on a slow Hub the import should not wait for it.
HEAD_START_WAIT = 1.0  # seconds
# How long a cancelled download may take to stop: its next 16 MB chunk must arrive (over 3 MB/s).
CANCEL_WAIT = 5.0  # seconds

_FRESH: dict[tuple[str, str, str], bool] = {}  # (repo, commit, file) -> its blob was not in the cache before the run


def blob_cached(source: Source, name: str, hub: Hub) -> bool:
    """Whether the cache holds the content (blob) of Hub file ``name``, at any commit. False when unknown."""
    from huggingface_hub.file_download import repo_folder_name

    sha256 = source.remote[name].sha256
    if sha256 is None or source.repo_id is None:
        return False
    return (hub.cache_root / repo_folder_name(repo_id=source.repo_id, repo_type="model") / "blobs" / sha256).exists()


def fresh(source: Source, name: str, hub: Hub) -> bool:
    """Whether this run is the one that downloads ``name`` (its blob was not in the cache before the run; one the
    cache already held, even for another commit, predates the run and is never removed)."""
    key = (source.repo_id or "", source.commit or "", name)
    if key in _FRESH:
        return _FRESH[key]
    return source.remote[name].sha256 is not None and not blob_cached(source, name, hub)


class HeadStart:
    """A head start under way: ``begun`` is set once the download has begun, or once there is nothing (more) to do;
    :meth:`cancel` ends the download if it is still running (its partial file is removed, as on any failure)."""

    def __init__(self) -> None:
        self.begun = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _report(self, _: ProgressEvent) -> None:
        if self._stop.is_set():  # raised out of the download's progress report: the download cleans up and ends
            raise Interrupted("the head start was cancelled")
        self.begun.set()

    def cancel(self, wait: float = CANCEL_WAIT) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(wait)


def head_start(base: str, hub: Hub, push_to: str, *, overwrite: bool) -> HeadStart:
    """Start downloading the first shard of the Hub base ``base`` on a daemon thread. Does nothing for a local
    folder, Meta weights, a push the run will refuse (the push-target check says no), or when anything goes wrong
    (the run itself then reports it). A run that ends first (it failed early) cancels it on its way out: a daemon
    thread killed at exit would leave its partial download in the cache.

    Returns:
        the :class:`HeadStart`.
    """
    started = HeadStart()

    def run() -> None:
        try:
            if not check_push_target(push_to, hub, overwrite=overwrite).can_write:
                return
            source = resolve(base, "base", hub)
            if source.repo_id is None:
                return
            fetch(source, hub, weights=False)
            names = streamable_shards(source)
            for name in names:
                _FRESH[(source.repo_id, source.commit or "", name)] = fresh(source, name, hub)
            if names and fresh(source, names[0], hub):  # the stream finds it in the cache, verified
                download_verified(source, names[0], hub, Progress(started._report))
        except Exception:  # the run resolves and downloads again, and reports what is wrong in one line
            pass
        finally:
            started.begun.set()

    started._thread = threading.Thread(target=run, name="hubmerge-head-start", daemon=True)
    started._thread.start()
    atexit.register(started.cancel)
    return started
