"""A head start for a streamed push: the first base shard starts downloading while torch imports.

``import torch`` takes seconds before the first line of the merge runs; a streamed push spends them waiting for
nothing. The CLI calls :func:`head_start` first (this module and what it imports never import torch): it resolves a
Hub base, notes which of its shards the cache already holds (so that :mod:`hubmerge.stream` still knows which ones
this run downloads, see :func:`fresh`), and downloads the first shard on a background thread, verified as it
arrives (:func:`~hubmerge.inputs.download.download_verified`). The stream checks the cached file again (the hash
cache answers) before any of its tensors is read, as it does for every shard.
"""

from __future__ import annotations

import threading

from .inputs.download import download_verified
from .inputs.hub import Hub
from .inputs.sources import Source, fetch, resolve, streamable_shards
from .progress import Progress
from .publish import check_push_target

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


def head_start(base: str, hub: Hub, push_to: str, *, overwrite: bool) -> None:
    """Start downloading the first safetensors shard of the Hub base ``base`` on a daemon thread. Does nothing for a
    local folder, other weight formats, a push the run will refuse (the push-target check says no), or when anything
    goes wrong (the run itself then reports it)."""

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
                download_verified(source, names[0], hub, Progress())
        except Exception:  # the run resolves and downloads again, and reports what is wrong in one line
            pass

    threading.Thread(target=run, name="hubmerge-head-start", daemon=True).start()
