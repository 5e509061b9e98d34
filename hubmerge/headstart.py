"""A head start for a streamed push: the first base shard starts downloading while torch imports.

``import torch`` takes seconds before the first line of the merge runs; a streamed push spends them waiting for
nothing. The CLI calls :func:`head_start` first (this module and what it imports never import torch): it resolves a
Hub base, notes which of its shards the cache already holds (so that :mod:`hubmerge.stream` still knows which ones
this run downloads, see :func:`fresh`), and downloads the first shard on a background thread, verified as it
arrives (:func:`~hubmerge.inputs.download.download_verified`). The stream checks the cached file again (the hash
cache answers) before any of its tensors is read, as it does for every shard.

The CLI imports torch only once the download has begun (the returned event): the Hub calls before it are Python
that holds the GIL, as torch's import does, so run side by side each slowed the other and the link sat idle for
both (0.43 s to the first byte instead of ~0.2 s, profiled on the hub benchmark). The download itself hashes and
writes off the GIL, so the import then runs beside it at full speed.
"""

from __future__ import annotations

import threading

from .inputs.download import download_verified
from .inputs.hub import Hub
from .inputs.sources import Source, fetch, resolve, streamable_shards
from .progress import Progress
from .publish import check_push_target

# How long the CLI holds torch's import back for the first byte: on a slow Hub the import should not wait for it.
HEAD_START_WAIT = 1.0  # seconds

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


def head_start(base: str, hub: Hub, push_to: str, *, overwrite: bool) -> threading.Event:
    """Start downloading the first safetensors shard of the Hub base ``base`` on a daemon thread. Does nothing for a
    local folder, other weight formats, a push the run will refuse (the push-target check says no), or when anything
    goes wrong (the run itself then reports it).

    Returns:
        an event set once the download has begun, or once the head start has nothing (more) to do.
    """
    begun = threading.Event()

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
                download_verified(source, names[0], hub, Progress(lambda _: begun.set()))
        except Exception:  # the run resolves and downloads again, and reports what is wrong in one line
            pass
        finally:
            begun.set()

    threading.Thread(target=run, name="hubmerge-head-start", daemon=True).start()
    return begun
